#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""
vmem-limit against the fork and a real memory cgroup (v2 or v1, whichever
the harness's Cgroup found), through a second QMP monitor of the guest.

1. resize up and down: after each step the limit is base + size + margin,
   and while the tool works it never falls below base + size + margin
   (sampled from the side every 20 ms);
2. the tool holds a guest through grow, touch and shrink under a limit
   with the default margin, and the same limit OOM-kills a second guest
   when it is raised only after the guest grew and touched its memory;
3. error paths: socket missing, cgroup missing, no permission (a
   read-only limit file, written by root without CAP_DAC_OVERRIDE), QMP
   lost in follow mode: each a non-zero exit with its documented code, a
   sentence naming the object, and the limit unchanged;
4. follow mode, events only, tracks a resize done by someone else's
   qom-set, and never lowers below base + size + margin;
and, where the host's memory controller is v1, the v2 rules on a
directory holding v2's files.
"""

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'guest'))

# pylint: disable=wrong-import-position
from vmtest import (BUILD, MiB, GiB, Guest, HarnessError, Tests,  # noqa: E402
                    check, log, poll, require_kit)

# VMEM_LIMIT_TOOL: another build (test_vmem_limit_oom.py runs the
# previous tool through the same scenarios).
TOOL = os.environ.get('VMEM_LIMIT_TOOL') or os.path.join(BUILD, 'vmem-limit')
MARGIN = 64 * MiB       # the tool's default
DEV_MAX = 2 * GiB
DEVICE = {'size': '2G', 'block_size': '2M', 'requested': 0,
          'vmemmap_accounting': True}
# What the guest touches after growing: most of the 1 GiB it gets.
GROW = 1 * GiB
TOUCH_MIB = 900

EXIT = {'usage': 1, 'permission': 2, 'cgroup': 3, 'lost': 4, 'refused': 5,
        'timeout': 6, 'below': 7, 'oom': 8}


def page_up(n):
    return (n + 4095) & ~4095


class Vm:
    """A guest with QMP monitors of its own for the tool (`monitors` of
    them: sock, then socks[1:]), and its cgroup.  The tool keeps its lock
    and base files in the Vm's directory ($RUNTIME_DIRECTORY)."""

    def __init__(self, name, device=None, qemu=None, monitors=1,
                 memmap_on_memory=True):
        self.dir = tempfile.mkdtemp(prefix='vmem-limit-')
        self.socks = [os.path.join(self.dir, f'qmp{i}.sock')
                      for i in range(monitors)]
        self.sock = self.socks[0]
        extra = []
        for i, sock in enumerate(self.socks):
            extra += ['-chardev', f'socket,id=vmlimit{i},path={sock},'
                      'server=on,wait=off',
                      '-mon', f'chardev=vmlimit{i},mode=control']
        self.g = Guest(name, mem='512M', device=dict(device or DEVICE),
                       memmap_on_memory=memmap_on_memory, extra_args=extra,
                       **({'qemu': qemu} if qemu else {}))

    def __enter__(self):
        self.g.__enter__()
        return self

    def __exit__(self, *exc):
        self.g.__exit__(*exc)
        shutil.rmtree(self.dir, ignore_errors=True)

    def env(self):
        return {**os.environ, 'RUNTIME_DIRECTORY': self.dir}

    def lock_path(self, cgroup=None):
        """The tool's per-VM lock file for this cgroup."""
        key = hashlib.sha256(os.path.realpath(cgroup or self.cg.path)
                             .encode()).hexdigest()[:16]
        return os.path.join(self.dir, f'cgroup-{key}.lock')

    def popen(self, *args, **kw):
        """The tool in the background; its stdout and stderr lines gather
        in .out and .err (see finish())."""
        p = subprocess.Popen(self.tool_args(*args, **kw), env=self.env(),
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             text=True)
        p.out, p.err = [], []
        p.readers = [threading.Thread(target=lambda: p.out.extend(p.stdout),
                                      daemon=True),
                     threading.Thread(target=lambda: p.err.extend(p.stderr),
                                      daemon=True)]
        for t in p.readers:
            t.start()
        return p


    @property
    def cg(self):
        return self.g.cg

    def limit_file(self):
        return 'memory.max' if self.cg.version == 2 else \
            'memory.limit_in_bytes'

    def read(self, name):
        with open(os.path.join(self.cg.path, name)) as f:
            return f.read()

    def limit(self):
        v = self.read(self.limit_file()).strip()
        return None if v == 'max' or int(v) >= 1 << 62 else int(v)

    def oom_kills(self):
        text = self.read('memory.events' if self.cg.version == 2
                         else 'memory.oom_control')
        for line in text.splitlines():
            k, v = line.split()
            if k == 'oom_kill':
                return int(v)
        raise HarnessError(f'no oom_kill counter in {self.cg.path}')

    def peak(self):
        name = 'memory.peak' if self.cg.version == 2 else \
            'memory.max_usage_in_bytes'
        with contextlib.suppress(OSError):
            return int(self.read(name))
        return None

    def tool_args(self, *args, sock=None, cgroup=None):
        return [TOOL, '--qmp', sock or self.sock,
                '--cgroup', cgroup or self.cg.path, *args]

    def tool(self, *args, expect=0, wrap=(), **kw):
        p = subprocess.run([*wrap, *self.tool_args(*args, **kw)],
                           capture_output=True, text=True, timeout=600,
                           env=self.env())
        for line in p.stdout.splitlines():
            log(f'  | {line}')
        for line in p.stderr.splitlines():
            log(f'  ! {line}')
        check(p.returncode == expect,
              f'vmem-limit {" ".join(args)}: exit {p.returncode}, '
              f'expected {expect}\n{p.stderr}')
        return p

    def show(self, *args):
        return json.loads(self.tool('show', '--json', *args).stdout)


def finish(p, timeout):
    """Wait for a popen'ed tool to exit and for all its output."""
    rc = p.wait(timeout=timeout)
    for t in p.readers:
        t.join(timeout)
    return rc


class Sampler:
    """Reads limit and size every 20 ms from the side and keeps the
    smallest limit - (base + size + margin) seen."""

    def __init__(self, vm, base):
        self.vm, self.base = vm, base
        self.worst = None
        self.samples = 0
        self.size = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)

    def run(self):
        # The limit first: size only falls while the tool may lower, so a
        # limit that was right when read is right for the size read after.
        # The sampler is the only QMP user while it runs (QMP is not
        # thread-safe); the main thread reads self.size.
        while not self.stop.is_set():
            limit = self.vm.limit()
            size = self.size = self.vm.g.qom_get('size')
            if limit is not None:
                slack = limit - (self.base + size + MARGIN)
                self.worst = slack if self.worst is None else \
                    min(self.worst, slack)
                self.samples += 1
            self.stop.wait(0.02)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def headroom(size):
    """The memmap of growing the device from size to its max-size."""
    return page_up((DEV_MAX - size) // 64)


def want(base, size):
    return page_up(base + size + headroom(size) + MARGIN)


def lines_index(out, *needles):
    """Index of the first line holding each needle (-1 if none)."""
    lines = out.splitlines()
    return [next((i for i, l in enumerate(lines) if n in l), -1)
            for n in needles]


# --- 1 ------------------------------------------------------------------

def resize_steps(vm, base):
    steps = (512 * MiB, GROW, 256 * MiB, 0)
    rows = []
    for req in steps:
        before = vm.g.qom_get('size')
        with Sampler(vm, base) as s:
            p = vm.tool('--base', str(base), 'resize', 'vm0', str(req))
        vm.g.wait_guest_at_rest()
        size, limit = vm.g.qom_get('size'), vm.limit()
        rows.append((req, size, limit, s.worst, s.samples))
        log(f'step {before >> 20} -> {req >> 20} MiB: size {size >> 20} MiB, '
            f'limit {limit} = base + {(limit - base) >> 20} MiB, wanted '
            f'{want(base, req)}; worst slack while resizing '
            f'{s.worst / MiB:.1f} MiB over {s.samples} samples')
        check(size == req, f'size {size} != requested {req}')
        check(limit == want(base, req),
              f'limit {limit} != base + size + margin = {want(base, req)}')
        check(s.worst is not None and s.worst >= 0,
              f'limit fell {-(s.worst or 0)} bytes below base + size + '
              'margin while resizing')
        raised, setreq, settled, lowered = lines_index(
            p.stdout, '(before growing', 'set requested-size', 'settled',
            'lowered')
        if req > before:
            check(0 <= raised < setreq,
                  f'grow: limit not raised before requested-size:\n{p.stdout}')
        else:
            check(0 <= setreq < settled < lowered and raised < 0,
                  'shrink: limit not lowered after settling:\n' + p.stdout)
    return rows


# --- 2 ------------------------------------------------------------------

def touch(vm):
    st, out = vm.g.run(f'memtouch {TOUCH_MIB}', timeout=300)
    log(f'guest: {out.strip()}')
    return st


def hold_through_grow_touch_shrink(vm, base):
    vm.tool('--base', str(base), 'follow', '--once')
    limit0 = vm.limit()
    vm.tool('--base', str(base), 'resize', 'vm0', str(GROW))
    vm.g.wait_guest_at_rest()
    before = vm.g.charge()
    touch(vm)
    charge = vm.g.charge()
    vm.tool('--base', str(base), 'resize', 'vm0', '0')
    vm.g.wait_guest_at_rest()
    log(f'tool order: limit {limit0 >> 20} -> {want(base, GROW) >> 20} -> '
        f'{vm.limit() >> 20} MiB, charge after touch {charge >> 20} MiB, '
        f'peak {(vm.peak() or 0) >> 20} MiB, oom kills {vm.oom_kills()}')
    check(vm.g.vm.is_running(), 'QEMU died under the tool')
    check(vm.oom_kills() == 0, f'{vm.oom_kills()} OOM kill(s) in the cgroup')
    check(charge - before > TOUCH_MIB * MiB - 64 * MiB,
          f'charge {before} -> {charge} touching {TOUCH_MIB} MiB: the guest '
          'did not touch its memory, the test proves nothing')
    check(vm.limit() == want(base, 0), f'limit {vm.limit()} != '
          f'{want(base, 0)} after shrinking back to 0')
    return charge


def hold_lock(vm):
    """Take the VM's lock as another instance would; close() releases."""
    fd = os.open(vm.lock_path(), os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.write(fd, f'{os.getpid()}\n'.encode())
    return fd


def oom_when_raised_after():
    """The wrong order on a fresh guest: grow, touch, then raise.  A
    follow kept from raising (the test holds the VM's lock) reports the
    OOM kill as such: exit 8, the counter that rose, the limit."""
    with Vm('vmem-limit-oom') as vm:
        base = vm.show()['base']
        # On a host with swap the cgroup would swap instead: keep it out.
        name = 'memory.swap.max' if vm.cg.version == 2 else \
            'memory.swappiness'
        with contextlib.suppress(OSError), \
                open(os.path.join(vm.cg.path, name), 'w') as f:
            f.write('0\n')
        vm.tool('--base', str(base), 'follow', '--once')
        limit = vm.limit()
        fd = hold_lock(vm)
        try:
            f = vm.popen('--base', str(base), 'follow')
            poll(lambda: any('waiting for another' in l for l in f.err), 30,
                 'follow to wait for the lock')
            vm.g.resize(GROW)
            log(f'wrong order: limit {limit >> 20} MiB (base {base >> 20} + '
                f'0 + headroom {headroom(0) >> 20} + margin {MARGIN >> 20}'
                f'), size now {vm.g.qom_get("size") >> 20} MiB, touching '
                'before raising')
            with contextlib.suppress(HarnessError, OSError):
                touch(vm)
            poll(lambda: not vm.g.vm.is_running(), 30, 'QEMU to be killed')
        finally:
            os.close(fd)
        rc = finish(f, 60)
        err = ''.join(f.err)
        kills = vm.oom_kills()
        log(f'wrong order: QEMU gone (exit {vm.g.vm.exitcode()}), oom kills '
            f'{kills}, peak {(vm.peak() or 0) >> 20} MiB under limit '
            f'{limit >> 20} MiB')
        log(f'follow: exit {rc}: {err.strip()}')
        check(kills >= 1, 'QEMU exited without an OOM kill')
        check(rc == EXIT['oom'], f'follow exited {rc}, not {EXIT["oom"]}')
        check('OOM-killed' in err and 'oom_kill in' in err and
              vm.cg.path in err, f'follow said: {err}')


# --- 3 ------------------------------------------------------------------

def error_paths(vm, base):
    limit = vm.limit()
    req = vm.g.qom_get('requested-size')

    def unchanged(what):
        check(vm.limit() == limit, f'{what}: limit {vm.limit()} != {limit}')
        check(vm.g.qom_get('requested-size') == req,
              f'{what}: requested-size changed')

    p = vm.tool('resize', 'vm0', '512M', sock=vm.sock + '.missing',
                expect=EXIT['lost'])
    check(vm.sock + '.missing' in p.stderr and 'QEMU' in p.stderr,
          f'socket missing: message does not name it: {p.stderr}')
    unchanged('socket missing')

    gone = vm.cg.path + '-gone'
    p = vm.tool('resize', 'vm0', '512M', cgroup=gone,
                expect=EXIT['cgroup'])
    check(gone in p.stderr, f'cgroup missing: not named: {p.stderr}')
    unchanged('cgroup missing')

    # Root without CAP_DAC_OVERRIDE meets the file's mode like anyone.
    files = [vm.limit_file()] + (['memory.high'] if vm.cg.version == 2
                                 else [])
    paths = [os.path.join(vm.cg.path, f) for f in files]
    modes = [os.stat(f).st_mode & 0o777 for f in paths]
    try:
        for f in paths:
            os.chmod(f, 0o444)
        p = vm.tool('--base', str(base), 'resize', 'vm0', '512M',
                    expect=EXIT['permission'],
                    wrap=('setpriv', '--inh-caps=-all',
                          '--bounding-set=-all', '--'))
    finally:
        for f, m in zip(paths, modes):
            os.chmod(f, m)
    check(paths[0] in p.stderr and 'root' in p.stderr,
          f'no permission: message does not name the file: {p.stderr}')
    unchanged('no permission')

    p = vm.tool('resize', 'vm1', '512M', expect=EXIT['usage'])
    check("'vm1'" in p.stderr and 'vm0' in p.stderr, p.stderr)
    p = vm.tool('resize', 'vm0', '3M', expect=EXIT['usage'])
    check('block size' in p.stderr, p.stderr)
    unchanged('bad arguments')

    p = vm.tool('--dry-run', '--base', str(base), 'resize', 'vm0', '1G')
    check('would raise' in p.stdout and 'would set requested-size'
          in p.stdout, f'dry run says nothing: {p.stdout}')
    unchanged('dry run')


# --- one VM, one instance at a time, sizes, QMP only ---------------------

def sizes_checked(vm):
    """Sizes that overflow, or add up past 4 PiB, and a margin below its
    floor: exit 1 with a sentence, the limit unchanged."""
    limit = vm.limit()
    for args, words in (
            (('resize', 'vm0', '99999999999999999999'), 'more than 4 PiB'),
            (('--base', '16777215T', 'show'), 'more than 4 PiB'),
            (('--base', '4096T', 'follow', '--once'), 'add up to more'),
            (('--margin', '0', 'follow', '--once'), 'floor of 32 MiB'),
            (('--margin', '31M', 'follow', '--once'), 'floor of 32 MiB')):
        p = vm.tool(*args, expect=EXIT['usage'])
        check(words in p.stderr, f'{args}: {p.stderr}')
    check(vm.limit() == limit, f'limit {vm.limit()} != {limit}')


def socket_of_another_vm(vm):
    """The QEMU behind the socket must be in the cgroup: a typo in
    --cgroup is refused, naming QEMU's pid and both cgroups."""
    other = vm.cg.path + '-other'
    os.makedirs(other)
    try:
        limit = vm.limit()
        p = vm.tool('follow', '--once', cgroup=other, expect=EXIT['usage'])
        pid = vm.g.vm.get_pid()
        check(f'pid {pid}' in p.stderr and other in p.stderr and
              vm.cg.path in p.stderr and 'not the same VM' in p.stderr,
              f'message: {p.stderr}')
        with open(os.path.join(other, vm.limit_file())) as f:
            v = f.read().strip()
        check(v == 'max' or int(v) >= 1 << 62,
              f'the other cgroup got a limit: {v}')
        check(vm.limit() == limit, f'limit {vm.limit()} != {limit}')
    finally:
        os.rmdir(other)


class FakeMonitor:
    """A unix socket that is not QMP: it sends `greeting` (None: nothing)
    to whoever connects and keeps what it receives in .got."""

    def __init__(self, path, greeting):
        self.path, self.greeting = path, greeting
        self.got = b''
        self.srv = socket.socket(socket.AF_UNIX)
        self.srv.bind(path)
        self.srv.listen(1)
        self.thread = threading.Thread(target=self.serve, daemon=True)

    def serve(self):
        conn, _ = self.srv.accept()
        with conn:
            if self.greeting:
                try:
                    conn.sendall(self.greeting)
                except OSError:
                    return      # the tool hung up before reading it all
            while True:
                data = conn.recv(4096)
                if not data:
                    return
                self.got += data

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.thread.join(30)
        self.srv.close()
        os.unlink(self.path)


def qmp_socket_errors(vm):
    """Each wrong --qmp gets its own sentence and exit code, and nothing
    is written into a socket before it has greeted as QMP."""
    limit = vm.limit()
    path = os.path.join(vm.dir, 'regular-file')
    open(path, 'w').close()
    p = vm.tool('show', sock=path, expect=EXIT['usage'])
    check(f'{path} is not a socket' in p.stderr, p.stderr)

    path = os.path.join(vm.dir, 'stale.sock')
    s = socket.socket(socket.AF_UNIX)
    s.bind(path)
    s.close()
    p = vm.tool('show', sock=path, expect=EXIT['lost'])
    check(f'nobody listens on QMP socket {path}' in p.stderr, p.stderr)

    path = os.path.join(vm.dir, 'console.sock')
    with FakeMonitor(path, b'\r\nDebian GNU/Linux 12 vm1 ttyS0\r\n\r\n'
                     b'vm1 login: ') as m:
        p = vm.tool('show', sock=path, expect=EXIT['usage'])
    check('is not a QMP socket' in p.stderr and 'Debian GNU' in p.stderr,
          p.stderr)
    check(m.got == b'', f'the tool wrote {m.got!r} into a console')

    with FakeMonitor(path, None) as m:
        t0 = time.monotonic()
        p = vm.tool('show', sock=path, expect=EXIT['lost'])
    log(f'silent socket: exit after {time.monotonic() - t0:.1f} s')
    check('sent no QMP greeting' in p.stderr, p.stderr)
    check(m.got == b'', f'the tool wrote {m.got!r} into a silent socket')

    # JSON-looking bytes that never end a line: the tool stops reading at
    # a bound, it does not buffer all of them until the greeting timeout.
    with FakeMonitor(path, b'{' + b'a' * (8 << 20)) as m:
        t0 = time.monotonic()
        p = vm.tool('show', sock=path, expect=EXIT['usage'])
        took = time.monotonic() - t0
    log(f'endless greeting line: exit after {took:.1f} s')
    check('is not a QMP socket' in p.stderr, p.stderr)
    check(took < 3, f'the tool read an endless greeting line for {took:.1f} '
          f's (the greeting timeout is 5 s): it buffered it unbounded')
    check(m.got == b'', f'the tool wrote {m.got!r} into a non-QMP socket')
    check(vm.limit() == limit, f'limit {vm.limit()} != {limit}')


def instances_take_turns(vm, base):
    """A resize waits while another instance holds the VM's lock (here the
    test): neither the limit nor requested-size moves until it is
    released.  And a second follow on the same VM is refused."""
    limit, req0 = vm.limit(), vm.g.qom_get('requested-size')
    fd = hold_lock(vm)
    try:
        p = vm.popen('--base', str(base), 'resize', 'vm0', '256M',
                     sock=vm.socks[1])
        poll(lambda: any('waiting for another vmem-limit' in l and
                         f'pid {os.getpid()}' in l for l in p.err), 30,
             'resize to wait for the lock')
        check(vm.limit() == limit and
              vm.g.qom_get('requested-size') == req0,
              'resize went ahead while the lock was held')
    finally:
        os.close(fd)
    rc = finish(p, 300)
    check(rc == 0, f'resize after the lock: exit {rc}: {"".join(p.err)}')
    check(vm.limit() == want(base, 256 * MiB),
          f'limit {vm.limit()} != {want(base, 256 * MiB)}')

    a = vm.popen('--base', str(base), 'follow')
    try:
        poll(lambda: any('following' in l for l in a.out), 30,
             'the first follow to start')
        p = vm.tool('--base', str(base), 'follow', sock=vm.socks[1],
                    expect=EXIT['usage'])
        check('already follows' in p.stderr and f'pid {a.pid}' in p.stderr,
              p.stderr)
    finally:
        a.terminate()
        finish(a, 10)
    vm.tool('--base', str(base), 'resize', 'vm0', '0')
    vm.g.wait_guest_at_rest()


def restart_keeps_base(vm):
    """A base once used for this run of the VM is kept (state file): a
    later run that would work out less takes it, not its own figure."""
    vm.tool('--overhead', '1G', 'follow', '--once')
    high = vm.limit()
    p = vm.tool('follow', '--once')
    line = next(l for l in p.stdout.splitlines() if l.startswith('base '))
    shown = vm.show()
    log(f'after a run with --overhead 1G: limit {high >> 20} MiB; a run '
        f'with the default overhead: {line}; limit {vm.limit() >> 20} MiB')
    check('kept from an earlier run' in line and vm.limit() == high,
          f'the second run lowered the limit {high} -> {vm.limit()}: {line}')
    check(shown['base'] == shown['wanted'] - shown['headroom'] -
          shown['margin'] - shown['devices'] and
          shown['base'] >= 512 * MiB + 1 * GiB,
          f'show: base {shown["base"]}')


def lost_in_follow(vm, base):
    p = vm.popen('--base', str(base), 'follow')
    out = p.out
    poll(lambda: any('following' in l for l in out), 30, 'follow to start')
    limit = vm.limit()
    vm.g.vm.shutdown(hard=True)
    rc = finish(p, 30)
    err = ''.join(p.err)
    log(f'follow after QEMU died: exit {rc}: {err.strip()}')
    check(rc == EXIT['lost'], f'follow exited {rc}, expected {EXIT["lost"]}')
    check(vm.sock in err and 'stays' in err, f'message: {err}')
    check(vm.limit() == limit, f'limit {vm.limit()} != {limit}')


def cgroup_v2_files(vm, base):
    """Where the host has no v2 memory controller (this one has v1), the
    v2 rules run on a directory holding v2's files: memory.max and
    memory.high both set, a lowering below memory.current refused."""
    if vm.cg.version == 2:
        log('the guest runs in a real cgroup v2: nothing more to show')
        return
    d = tempfile.mkdtemp(prefix='vmem-limit-v2-')
    # The tool writes only the stand-in: lift the real limit meanwhile,
    # or the guest is OOM-killed by a grow its real limit never saw.
    vm.cg.set_limit(None)

    def put(name, value):
        with open(os.path.join(d, name), 'w') as f:
            f.write(f'{value}\n')

    def get(name):
        with open(os.path.join(d, name)) as f:
            return f.read().strip()
    try:
        put('memory.current', vm.g.charge())
        put('memory.max', 'max')
        put('memory.high', 'max')
        for req in (256 * MiB, 0):
            vm.tool('--base', str(base), '--no-pid-check', 'resize', 'vm0',
                    str(req), cgroup=d)
            check(get('memory.max') == get('memory.high') ==
                  str(want(base, req)),
                  f'v2 after resize to {req}: memory.max {get("memory.max")}'
                  f', memory.high {get("memory.high")}, want '
                  f'{want(base, req)}')
            vm.g.wait_guest_at_rest()
        # margin 32M wants 32 MiB less than the default: below the charge
        put('memory.current', want(base, 0) + 16 * MiB)
        p = vm.tool('--base', str(base), '--margin', '32M', '--no-pid-check',
                    'follow', '--once', cgroup=d, expect=7)
        check(get('memory.max') == get('memory.high') == str(want(base, 0)),
              'v2: limit changed by a refused lowering')
        check('not lowering' in p.stderr and 'memory.current' in p.stderr,
              p.stderr)
    finally:
        for f in os.listdir(d):
            os.unlink(os.path.join(d, f))
        os.rmdir(d)
        vm.tool('--base', str(base), 'follow', '--once')


# --- 4 ------------------------------------------------------------------

def follow_others(vm, base):
    p = vm.popen('--base', str(base), '--interval', '0', 'follow')
    out = p.out
    try:
        poll(lambda: any('following' in l for l in out), 30,
             'follow to start')
        for req in (768 * MiB, 0):
            t0 = time.monotonic()
            vm.g.qom_set('requested-size', req)
            with Sampler(vm, base) as s:
                poll(lambda r=req: s.size == r and
                     vm.limit() == want(base, r), 60,
                     f'size {req} and limit {want(base, req)} (now '
                     f'{s.size}, {vm.limit()})')
            vm.g.wait_guest_at_rest()
            log(f'follow: qom-set {req >> 20} MiB by the test, limit '
                f'{vm.limit()} = base + {(vm.limit() - base) >> 20} MiB '
                f'after {time.monotonic() - t0:.1f} s; worst slack '
                f'{s.worst / MiB:.1f} MiB over {s.samples} samples')
            if req == 0:
                # Shrinking, the limit must never drop below what is held.
                check(s.worst >= 0, f'follow lowered below base + size + '
                      f'margin by {-s.worst} bytes')
        check(p.poll() is None, 'follow exited early')
    finally:
        p.terminate()
        p.wait(timeout=10)
    for line in out:
        log(f'  | {line.rstrip()}')
    check(any('size change event' in l for l in out),
          'follow never acted on an event')


def follow_undoes_hand_change(vm, base):
    """With its 1 s re-read, follow sets a limit changed by hand back."""
    p = vm.popen('--base', str(base), 'follow')
    out = p.out
    try:
        poll(lambda: any('following' in l for l in out), 30,
             'follow to start')
        size = vm.g.qom_get('size')
        vm.cg.set_limit(want(base, size) + 128 * MiB)
        t0 = time.monotonic()
        poll(lambda: vm.limit() == want(base, size), 10,
             f'limit back at {want(base, size)} (now {vm.limit()})')
        log(f'follow: a limit raised by hand by 128 MiB was set back after '
            f'{time.monotonic() - t0:.1f} s')
    finally:
        p.terminate()
        p.wait(timeout=10)


def main():
    require_kit()
    if not os.access(TOOL, os.X_OK):
        raise HarnessError(f'{TOOL} missing: run scripts/build-tools')
    t = Tests()
    with Vm('vmem-limit', monitors=2) as vm:
        vm.tool('show')
        info = vm.show()
        base = info['base']
        log(f'measured base {base} ({info["base-source"]}), margin '
            f'{info["margin"]}, charge {info["charge"]}, '
            f'limit {info["limit"]}, {vm.limit_file()} (v{vm.cg.version})')
        t.case('resize up and down keeps limit = base + size + headroom '
               '+ margin',
               lambda: resize_steps(vm, base))
        t.case('the tool holds the guest through grow, touch, shrink',
               lambda: hold_through_grow_touch_shrink(vm, base))
        t.case('follow tracks a qom-set by someone else (events only)',
               lambda: follow_others(vm, base))
        t.case('follow sets back a limit changed by hand',
               lambda: follow_undoes_hand_change(vm, base))
        t.case('cgroup v2 rules on v2 files: memory.max and memory.high, '
               'no lowering below memory.current',
               lambda: cgroup_v2_files(vm, base))
        t.case('errors: socket, cgroup, permission, usage; limit unchanged',
               lambda: error_paths(vm, base))
        t.case('sizes: overflow, past 4 PiB, margin below its floor: exit 1',
               lambda: sizes_checked(vm))
        t.case('socket and cgroup of different VMs: refused',
               lambda: socket_of_another_vm(vm))
        t.case('not a socket, nobody listening, not QMP, no greeting: '
               'each told, nothing sent', lambda: qmp_socket_errors(vm))
        t.case('instances on one VM take turns; one follow per VM',
               lambda: instances_take_turns(vm, base))
        t.case('a restart never lowers the base: kept for this run of '
               'the VM', lambda: restart_keeps_base(vm))
        t.case('follow: QMP lost is exit 4, limit unchanged',
               lambda: lost_in_follow(vm, base))
    t.case('the same limit raised only after growing: OOM kill, reported '
           'by follow as such (exit 8)',
           oom_when_raised_after)
    t.done()


if __name__ == '__main__':
    main()
