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
import json
import os
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

TOOL = os.path.join(BUILD, 'vmem-limit')
MARGIN = 64 * MiB       # the tool's default
DEVICE = {'size': '2G', 'block_size': '2M', 'requested': 0,
          'vmemmap_accounting': True}
# What the guest touches after growing: most of the 1 GiB it gets.
GROW = 1 * GiB
TOUCH_MIB = 900

EXIT = {'usage': 1, 'permission': 2, 'cgroup': 3, 'lost': 4}


def page_up(n):
    return (n + 4095) & ~4095


class Vm:
    """A guest with a second QMP monitor for the tool, and its cgroup."""

    def __init__(self, name):
        self.dir = tempfile.mkdtemp(prefix='vmem-limit-')
        self.sock = os.path.join(self.dir, 'qmp.sock')
        self.g = Guest(name, mem='512M', device=dict(DEVICE),
                       memmap_on_memory=True,
                       extra_args=['-chardev', 'socket,id=vmlimit,path='
                                   f'{self.sock},server=on,wait=off',
                                   '-mon', 'chardev=vmlimit,mode=control'])

    def __enter__(self):
        self.g.__enter__()
        return self

    def __exit__(self, *exc):
        self.g.__exit__(*exc)
        with contextlib.suppress(OSError):
            os.unlink(self.sock)
        with contextlib.suppress(OSError):
            os.rmdir(self.dir)

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
                           capture_output=True, text=True, timeout=600)
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


def want(base, size):
    return page_up(base + size + MARGIN)


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
    touch(vm)
    charge = vm.g.charge()
    vm.tool('--base', str(base), 'resize', 'vm0', '0')
    vm.g.wait_guest_at_rest()
    log(f'tool order: limit {limit0 >> 20} -> {want(base, GROW) >> 20} -> '
        f'{vm.limit() >> 20} MiB, charge after touch {charge >> 20} MiB, '
        f'peak {(vm.peak() or 0) >> 20} MiB, oom kills {vm.oom_kills()}')
    check(vm.g.vm.is_running(), 'QEMU died under the tool')
    check(vm.oom_kills() == 0, f'{vm.oom_kills()} OOM kill(s) in the cgroup')
    check(charge > base + TOUCH_MIB * MiB - 64 * MiB,
          f'charge {charge} after touching {TOUCH_MIB} MiB: the guest did '
          'not touch its memory, the test proves nothing')
    check(vm.limit() == want(base, 0), f'limit {vm.limit()} != '
          f'{want(base, 0)} after shrinking back to 0')
    return charge


def oom_when_raised_after():
    """The wrong order on a fresh guest: grow, touch, then raise."""
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
        vm.g.resize(GROW)
        log(f'wrong order: limit {limit >> 20} MiB (base {base >> 20} + 0 + '
            f'margin {MARGIN >> 20}), size now {vm.g.qom_get("size") >> 20}'
            ' MiB, touching before raising')
        with contextlib.suppress(HarnessError, OSError):
            touch(vm)
        poll(lambda: not vm.g.vm.is_running(), 30, 'QEMU to be killed')
        kills = vm.oom_kills()
        log(f'wrong order: QEMU gone (exit {vm.g.vm.exitcode()}), oom kills '
            f'{kills}, peak {(vm.peak() or 0) >> 20} MiB under limit '
            f'{limit >> 20} MiB')
        check(kills >= 1, 'QEMU exited without an OOM kill')


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


def lost_in_follow(vm, base):
    p = subprocess.Popen(vm.tool_args('--base', str(base), 'follow'),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    out = []
    t = threading.Thread(target=lambda: out.extend(p.stdout), daemon=True)
    t.start()
    poll(lambda: any('following' in l for l in out), 30, 'follow to start')
    limit = vm.limit()
    vm.g.vm.shutdown(hard=True)
    rc = p.wait(timeout=30)
    err = p.stderr.read()
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
            vm.tool('--base', str(base), 'resize', 'vm0', str(req), cgroup=d)
            check(get('memory.max') == get('memory.high') ==
                  str(want(base, req)),
                  f'v2 after resize to {req}: memory.max {get("memory.max")}'
                  f', memory.high {get("memory.high")}, want '
                  f'{want(base, req)}')
            vm.g.wait_guest_at_rest()
        put('memory.current', want(base, 0) + 32 * MiB)
        p = vm.tool('--base', str(base), '--margin', '0', 'follow', '--once',
                    cgroup=d, expect=7)
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
    p = subprocess.Popen(vm.tool_args('--base', str(base), '--interval', '0',
                                      'follow'),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    out = []
    t = threading.Thread(target=lambda: out.extend(p.stdout), daemon=True)
    t.start()
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
    p = subprocess.Popen(vm.tool_args('--base', str(base), 'follow'),
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    out = []
    threading.Thread(target=lambda: out.extend(p.stdout), daemon=True).start()
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
    with Vm('vmem-limit') as vm:
        vm.tool('show')
        info = vm.show()
        base = info['base']
        log(f'measured base {base} ({info["base-source"]}), margin '
            f'{info["margin"]}, charge {info["charge"]}, '
            f'limit {info["limit"]}, {vm.limit_file()} (v{vm.cg.version})')
        t.case('resize up and down keeps limit = base + size + margin',
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
        t.case('follow: QMP lost is exit 4, limit unchanged',
               lambda: lost_in_follow(vm, base))
    t.case('the same limit raised only after growing: OOM kill',
           oom_when_raised_after)
    t.done()


if __name__ == '__main__':
    main()
