# SPDX-License-Identifier: GPL-2.0-or-later
"""
Guest harness: boot the fork's QEMU with the project's guest kit, drive
QMP, run commands in the guest and read the host memory cgroup charge.

This is the one place that knows how to boot a test guest; the guest
tests, the demo and the benchmark all use it.  QMP and process handling
come from QEMU's own python/ tree (qemu.machine, qemu.qmp) of the source
tree the fork was built from.
"""

import contextlib
import os
import re
import shutil
import socket
import sys
import tempfile
import time

TOP = os.path.abspath(os.path.join(os.path.dirname(__file__), '..', '..'))
BUILD = os.path.join(TOP, 'build')
GUEST = os.path.join(BUILD, 'guest')
QEMU = os.path.join(BUILD, 'qemu-system-x86_64')
STOCK_QEMU = os.path.join(BUILD, 'qemu-system-x86_64-stock')
sys.path.insert(0, os.path.join(BUILD, 'qemu-src', 'python'))

# pylint: disable=wrong-import-position
from qemu.machine import QEMUMachine  # noqa: E402
from qemu.qmp import ExecuteError  # noqa: E402

SMAPS_VMA = re.compile(r'^([0-9a-f]+)-([0-9a-f]+) ')

MiB = 1 << 20
GiB = 1 << 30

# Lines that must never appear in a guest log: warnings, oopses and the
# failures the project exists to remove.
BAD_LOG = re.compile(r'WARNING:|\bBUG:|\bOops:|Call Trace:|Kernel panic|'
                     r'vmemmap alloc failure|adding memory failed|'
                     r'page allocation failure')


class HarnessError(Exception):
    pass


def log(msg):
    print(f'  [{time.strftime("%H:%M:%S")}] {msg}', flush=True)


def poll(fn, timeout, what, interval=0.05, backoff=True):
    """Call fn() until it returns a true value or timeout seconds pass.
    The interval doubles up to 0.5 s unless backoff is False (timing)."""
    deadline = time.monotonic() + timeout
    while True:
        val = fn()
        if val:
            return val
        if time.monotonic() > deadline:
            raise HarnessError(f'timed out after {timeout}s waiting for {what}')
        time.sleep(interval)
        if backoff:
            interval = min(interval * 2, 0.5)


# --- host memory cgroup ------------------------------------------------

class Cgroup:
    """A memory cgroup of its own for one QEMU process (v2 or v1)."""

    V2 = '/sys/fs/cgroup'
    V1 = '/sys/fs/cgroup/memory'

    def __init__(self, name):
        if os.path.exists(os.path.join(self.V2, 'cgroup.controllers')) and \
                'memory' in open(os.path.join(self.V2,
                                              'cgroup.controllers')).read():
            parent = self._v2_parent()
            self.path = os.path.join(parent, name)
            self.usage_file = 'memory.current'
            self.version = 2
        elif os.path.exists(os.path.join(self.V1, 'memory.usage_in_bytes')):
            self.path = os.path.join(self.V1, 'vmtest', name)
            self.usage_file = 'memory.usage_in_bytes'
            self.version = 1
        else:
            raise HarnessError('no memory cgroup controller on this host '
                               '(need cgroup v2 with memory, or v1 memory)')
        os.makedirs(self.path, exist_ok=True)

    def _v2_parent(self):
        # Our own cgroup may not delegate "memory" to children; a sibling
        # under the root does (we run as root).
        parent = os.path.join(self.V2, 'vmtest')
        os.makedirs(parent, exist_ok=True)
        ctl = os.path.join(self.V2, 'cgroup.subtree_control')
        with contextlib.suppress(OSError), open(ctl, 'w') as f:
            f.write('+memory')
        with contextlib.suppress(OSError), \
                open(os.path.join(parent, 'cgroup.subtree_control'), 'w') as f:
            f.write('+memory')
        return parent

    @property
    def procs(self):
        return os.path.join(self.path, 'cgroup.procs')

    def charge(self):
        with open(os.path.join(self.path, self.usage_file)) as f:
            return int(f.read())

    def remove(self):
        with contextlib.suppress(OSError):
            os.rmdir(self.path)


# --- accelerator -------------------------------------------------------

def accel():
    """'kvm' only where KVM demonstrably boots the test guest, else 'tcg'.

    /dev/kvm can exist and still fail on a Linux guest (a paging-only KVM
    ends in internal emulation errors), so probe once by booting the guest
    and cache the verdict next to the build.
    """
    forced = os.environ.get('VMTEST_ACCEL')
    if forced:
        return forced
    if not os.access('/dev/kvm', os.R_OK | os.W_OK):
        return 'tcg'
    stamp = os.path.join(BUILD, 'kvm-probe')
    key = f'{os.stat(QEMU).st_mtime_ns}:{os.stat(os.path.join(GUEST, "vmlinuz")).st_mtime_ns}'
    with contextlib.suppress(OSError):
        k, verdict = open(stamp).read().split()
        if k == key:
            return verdict
    log('probing whether KVM can boot the guest (once)')
    verdict = 'tcg'
    try:
        with Guest('kvm-probe', mem='256M', accel_='kvm', cgroup=False,
                   boot_timeout=30, device=None, module='none') as g:
            if g.run('echo ok')[1].strip() == 'ok':
                verdict = 'kvm'
    except Exception as e:  # pylint: disable=broad-except
        log(f'KVM cannot boot the guest here ({type(e).__name__}): using TCG')
    with open(stamp, 'w') as f:
        f.write(f'{key} {verdict}\n')
    return verdict


# --- the guest ---------------------------------------------------------

class Guest:
    """One test guest with at most one virtio-mem device named vm0.

    device: dict with size, block_size, requested, and optional
    vmemmap_accounting (True/False/None), reserve (bool), prealloc...
    """

    def __init__(self, name, mem='512M', maxmem='64G', smp=2,
                 device=None, module='patched', modparams=None,
                 append='', online='online_movable', memmap_on_memory=None,
                 cgroup=True, accel_=None, boot_timeout=120, extra_args=(),
                 qemu=QEMU):
        self.name = name
        self.qemu = qemu
        self.mem = mem
        self.maxmem = maxmem
        self.smp = smp
        self.device = device if device is not None else None
        self.module = module
        self.modparams = modparams or {}
        self.append = append
        self.online = online
        self.memmap_on_memory = memmap_on_memory
        self.want_cgroup = cgroup
        self.accel = accel_
        self.boot_timeout = boot_timeout
        self.extra_args = list(extra_args)
        self.vm = None
        self.cg = None
        self.tmp = None
        self.ctl = None
        self._buf = b''
        self._seq = 0

    # -- life cycle --

    def cmdline(self):
        parts = ['console=ttyS0', 'panic=-1', 'oops=panic',
                 f'memhp_default_state={self.online}',
                 f'vmtest.module={self.module}']
        if self.memmap_on_memory is not None:
            parts.append('memory_hotplug.memmap_on_memory='
                         f'{1 if self.memmap_on_memory else 0}')
        if self.modparams:
            parts.append('vmtest.modparams=' + ','.join(
                f'{k}={v}' for k, v in self.modparams.items()))
        if self.append:
            parts.append(self.append)
        return ' '.join(parts)

    def device_args(self):
        d = self.device
        if not d:
            return []
        backend = f'memory-backend-ram,id=mem0,size={d["size"]}'
        if not d.get('reserve', True):
            backend += ',reserve=off'
        dev = (f'virtio-mem-pci,id=vm0,memdev=mem0,'
               f'block-size={d.get("block_size", "2M")},'
               f'requested-size={d.get("requested", 0)}')
        if d.get('vmemmap_accounting') is not None:
            dev += ',vmemmap-accounting=' + \
                ('on' if d['vmemmap_accounting'] else 'off')
        for k in ('prealloc', 'dynamic-memslots', 'unplugged-inaccessible'):
            if k in d:
                dev += f',{k}={d[k]}'
        return ['-object', backend, '-device', dev]

    def start(self):
        self.tmp = tempfile.mkdtemp(prefix=f'vmtest-{self.name}-')
        ctl_path = os.path.join(self.tmp, 'ctl.sock')
        self.console_path = os.path.join(self.tmp, 'console.log')
        accel_ = self.accel or accel()
        wrapper = ()
        if self.want_cgroup:
            self.cg = Cgroup(f'{self.name}-{os.getpid()}')
            wrapper = ('/bin/sh', '-c', 'echo $$ > "$0" && exec "$@"',
                       self.cg.procs)
        args = ['-nodefaults', '-machine', 'q35', '-accel', accel_,
                '-cpu', 'qemu64,phys-bits=40' if accel_ == 'tcg' else 'host',
                '-smp', str(self.smp),
                '-m', f'{self.mem},maxmem={self.maxmem}',
                '-kernel', os.path.join(GUEST, 'vmlinuz'),
                '-initrd', os.path.join(GUEST, 'initramfs.cpio.gz'),
                '-append', self.cmdline(),
                '-serial', f'file:{self.console_path}',
                '-chardev', f'socket,id=ctl,path={ctl_path},server=on,wait=off',
                '-serial', 'chardev:ctl']
        args += self.device_args() + self.extra_args
        self.vm = QEMUMachine(self.qemu, args=args, wrapper=wrapper,
                              name=self.name, base_temp_dir=self.tmp,
                              log_dir=self.tmp)
        self.vm.launch()
        self.connect_ctl(ctl_path)
        return self

    def connect_ctl(self, path):
        """Connect to the guest's command channel (ttyS1, a unix socket
        the VMM listens on) and wait for init's READY line."""
        self.ctl = socket.socket(socket.AF_UNIX)
        poll(lambda: self.ctl.connect_ex(path) == 0, 10, 'control socket')
        self.ctl.settimeout(0.5)
        self.wait_ready(self.boot_timeout)

    def wait_ready(self, timeout, what='guest boot'):
        """Wait for init's READY line; it carries MemTotal before the
        module was loaded, the reference against which resize() knows the
        guest is at rest.  Call again after a guest reboot."""
        m = self._read_until(rb'@@READY (\S+) (\d+)@@\n', timeout, what)
        self.boot_total = int(m.group(2)) * 1024

    def stop(self):
        if self.ctl:
            self.ctl.close()
            self.ctl = None
        if self.vm:
            with contextlib.suppress(Exception):
                self.vm.shutdown(hard=True)
            self.vm = None
        if self.cg:
            poll(lambda: not open(self.cg.procs).read().strip(), 10,
                 'cgroup to empty')
            self.cg.remove()
            self.cg = None
        if self.tmp and not os.environ.get('VMTEST_KEEP'):
            shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            if self.accel != 'kvm':
                self.dump_console()
            self.stop()
            raise

    def __exit__(self, *exc):
        if exc[0] is not None and self.accel != 'kvm':
            self.dump_console()
        self.stop()

    # -- guest side --

    def _read_until(self, pattern, timeout, what):
        rx = re.compile(pattern, re.S)
        deadline = time.monotonic() + timeout
        while True:
            m = rx.search(self._buf)
            if m:
                self._buf = self._buf[m.end():]
                return m
            if time.monotonic() > deadline:
                raise HarnessError(f'timed out after {timeout}s waiting for '
                                   f'{what}; console tail:\n'
                                   + self.console_tail())
            if self.vm and not self.vm.is_running():
                raise HarnessError(f'QEMU exited while waiting for {what}: '
                                   f'{self.vm.get_log()}')
            try:
                data = self.ctl.recv(65536)
            except socket.timeout:
                continue
            if not data:
                raise HarnessError(f'control channel closed ({what})')
            self._buf += data

    def run(self, cmd, timeout=60, check=False):
        """Run a shell command in the guest: (status, output)."""
        self._seq += 1
        seq = self._seq
        self.ctl.sendall(f'{seq} {cmd}\n'.encode())
        m = self._read_until(rb'(.*?)@@END %d (\d+)@@\n' % seq, timeout,
                             f'guest command {cmd!r}')
        out = m.group(1).decode(errors='replace')
        status = int(m.group(2))
        if check and status:
            raise HarnessError(f'guest command {cmd!r} failed ({status}):\n{out}')
        return status, out

    def meminfo(self):
        out = self.run('cat /proc/meminfo', check=True)[1]
        return {k: int(v) * 1024 for k, v in
                re.findall(r'^(\w+):\s+(\d+) kB', out, re.M)}

    def mem_total(self):
        return self.meminfo()['MemTotal']

    def console(self):
        try:
            with open(self.console_path, errors='replace') as f:
                return f.read()
        except OSError:
            return ''

    def console_tail(self, n=30):
        return '\n'.join(self.console().splitlines()[-n:])

    def dump_console(self):
        if self.tmp:
            print('---- guest console (tail) ----\n' + self.console_tail(60)
                  + '\n------------------------------', flush=True)

    def bad_log_lines(self):
        return [l for l in self.console().splitlines() if BAD_LOG.search(l)]

    # -- host side --

    def qom_get(self, prop, path='vm0'):
        return self.vm.cmd('qom-get', path=path, property=prop)

    def qom_set(self, prop, value, path='vm0'):
        return self.vm.cmd('qom-set', path=path, property=prop, value=value)

    def charge(self):
        return self.cg.charge()

    def ram_rss(self):
        """Host-resident bytes of the guest's RAM, per RAMBlock: 'pc.ram'
        (boot RAM) and 'mem0' (the virtio-mem device's memory, if any),
        from the QEMU process's smaps.  The rest of the cgroup's charge is
        QEMU's own memory."""
        blocks = {}
        out = self.vm.cmd('human-monitor-command', command_line='info ramblock')
        for line in out.splitlines():
            # name, page size (two words), offset, used, total, HVA, RO
            f = line.split()
            name = f[0].split('/')[-1] if f else ''
            if len(f) == 8 and name in ('pc.ram', 'mem0'):
                blocks[name] = (int(f[6], 16), int(f[5], 16))
        if 'pc.ram' not in blocks:
            raise HarnessError(f'no boot RAM in "info ramblock": {out}')
        rss = {name: 0 for name in blocks}
        covered = {name: 0 for name in blocks}
        vma = None
        with open(f'/proc/{self.vm.get_pid()}/smaps') as f:
            for line in f:
                m = SMAPS_VMA.match(line)
                if m:
                    start, end = int(m.group(1), 16), int(m.group(2), 16)
                    vma = next((n for n, (hva, size) in blocks.items()
                                if hva <= start and end <= hva + size), None)
                    if vma:
                        covered[vma] += end - start
                elif vma and line.startswith('Rss:'):
                    rss[vma] += int(line.split()[1]) * 1024
        for name, (hva, size) in blocks.items():
            if covered[name] != size:
                raise HarnessError(f'RAMBlock {name} at {hva:#x}: smaps '
                                   f'covers {covered[name]} of {size} bytes')
        return rss

    def vmemmap_size(self):
        """The device's vmemmap-size; 0 where the binary lacks it."""
        try:
            return self.qom_get('vmemmap-size')
        except ExecuteError:
            return 0

    def resize(self, requested, timeout=600, settle_size=None):
        """Set requested-size and wait until the device and the guest settle.

        Settled: `size` equals settle_size (default: requested) and the
        guest is at rest (see wait_guest_at_rest).  Returns the seconds it
        took.
        """
        want = requested if settle_size is None else settle_size
        t0 = time.monotonic()
        self.qom_set('requested-size', requested)
        poll(lambda: self.qom_get('size') == want, timeout,
             f'size == {want >> 20} MiB (now {self.qom_get("size") >> 20} MiB)')
        self.wait_guest_at_rest(timeout)
        return time.monotonic() - t0

    def wait_guest_at_rest(self, timeout=120):
        """Wait until the guest has onlined (or offlined) what the device
        says is plugged: MemTotal == boot MemTotal + size - vmemmap-size.
        The device answers a plug before the guest adds and onlines the
        memory, so `size` alone is no sign of rest.  A guest that never
        gets there fails here, with the figures, after `timeout` seconds."""
        last = [None]

        def at_rest():
            want = self.boot_total + self.qom_get('size') - self.vmemmap_size()
            last[0] = (self.mem_total(), want)
            return last[0][0] == want
        try:
            poll(at_rest, timeout, 'guest at rest', interval=0.2)
        except HarnessError as e:
            raise HarnessError(f'guest MemTotal {last[0][0] >> 10} KiB never '
                               f'reached boot + size - vmemmap-size = '
                               f'{last[0][1] >> 10} KiB') from e


def require_kit():
    for p in (QEMU, os.path.join(GUEST, 'vmlinuz'),
              os.path.join(GUEST, 'initramfs.cpio.gz')):
        if not os.path.exists(p):
            raise HarnessError(f'{p} missing: run "make" first')


class Tests:
    """Minimal TAP producer: one instance per test file."""

    def __init__(self):
        self.n = 0
        self.failed = 0

    def case(self, name, fn):
        self.n += 1
        t0 = time.monotonic()
        try:
            fn()
        except Exception as e:  # pylint: disable=broad-except
            self.failed += 1
            print(f'not ok {self.n} - {name}\n# {type(e).__name__}: '
                  + str(e).replace('\n', '\n# '), flush=True)
            return
        print(f'ok {self.n} - {name} ({time.monotonic() - t0:.1f}s)',
              flush=True)

    def done(self):
        print(f'1..{self.n}')
        sys.exit(1 if self.failed else 0)


def check(cond, msg):
    if not cond:
        raise AssertionError(msg)
