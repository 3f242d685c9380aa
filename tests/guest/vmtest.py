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


def guest_kit_dir(kernel=None):
    """The guest kit: build/guest (the default kernel, 6.12), or for a
    kernel release or series (6.1, 6.12, 7.3) build/guest/<release>
    (scripts/build-guest --kernel SERIES)."""
    base = os.path.join(BUILD, 'guest')
    if not kernel:
        return base
    if os.path.isfile(os.path.join(base, kernel, 'vmlinuz')):
        return os.path.join(base, kernel)
    found = sorted(e for e in os.listdir(base)
                   if e.startswith(kernel + '.') and
                   os.path.isfile(os.path.join(base, e, 'vmlinuz'))) \
        if os.path.isdir(base) else []
    if len(found) != 1:
        raise ValueError(f'no single guest kit for kernel {kernel} in '
                         f'{base} ({found}): run "scripts/build-guest '
                         f'--kernel SERIES"')
    return os.path.join(base, found[0])


# VMTEST_KERNEL=<release or series>: run the guests on that kernel's kit.
GUEST = guest_kit_dir(os.environ.get('VMTEST_KERNEL'))


def use_kernel(kernel):
    """Boot the guests started from now on with that kernel's kit (a
    release or series, see guest_kit_dir; None: the default); returns
    the kit's directory."""
    global GUEST  # pylint: disable=global-statement
    GUEST = guest_kit_dir(kernel)
    return GUEST


def kernel_release(kit=None):
    """The kernel release of a kit (default: the one guests boot)."""
    with open(os.path.join(kit or GUEST, 'kernel-release')) as f:
        return f.read().strip()


def kernel_series(kit=None):
    """The series (6.1, 6.12, 7.3) of a kit's kernel (default: the one
    guests boot): what a test's per-kernel expectations are keyed by."""
    return '.'.join(kernel_release(kit).split('.')[:2])
# VMTEST_QEMU: another build of the fork (scripts/check-asan: the ASan one).
QEMU = (os.environ.get('VMTEST_QEMU') or
        os.path.join(BUILD, 'qemu-system-x86_64'))
STOCK_QEMU = os.path.join(BUILD, 'qemu-system-x86_64-stock')
sys.path.insert(0, os.path.join(BUILD, 'qemu-src', 'python'))

# pylint: disable=wrong-import-position
from qemu.machine import QEMUMachine  # noqa: E402
from qemu.qmp import ExecuteError  # noqa: E402

import anon  # noqa: E402  (smaps, shared with scripts/qemu-anon-growth)

MiB = 1 << 20
GiB = 1 << 30

# Lines that must never appear in a guest log: warnings, oopses and the
# failures the project exists to remove.
BAD_LOG = re.compile(r'WARNING:|\bBUG:|\bOops:|Call Trace:|Kernel panic|'
                     r'vmemmap alloc failure|adding memory failed|'
                     r'page allocation failure')


def ramblocks(info):
    """{name: (hva, size)} of every RAMBlock in the text of HMP "info
    ramblock" (name, page size in two words, offset, used, total, HVA,
    RO)."""
    blocks = {}
    for line in info.splitlines():
        f = line.split()
        if len(f) == 8 and f[0] != 'Block':
            blocks[f[0]] = (int(f[6], 16), int(f[5], 16))
    return blocks


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

    def set_limit(self, limit):
        """Cap the charge at `limit` bytes (None: no limit)."""
        if self.version == 2:
            name, value = 'memory.max', 'max' if limit is None else limit
        else:
            name, value = 'memory.limit_in_bytes', -1 if limit is None \
                else limit
        with open(os.path.join(self.path, name), 'w') as f:
            f.write(f'{value}\n')

    def no_oom_kill(self, pid):
        """Make a charge beyond the limit fail instead of killing: v1
        turns the cgroup's OOM killer off (an allocation QEMU makes for
        itself, such as preallocation, then fails with ENOMEM), v2 exempts
        `pid` from it (needs CAP_SYS_RESOURCE)."""
        if self.version == 1:
            path, value = os.path.join(self.path, 'memory.oom_control'), 1
        else:
            path, value = f'/proc/{pid}/oom_score_adj', -1000
        try:
            with open(path, 'w') as f:
                f.write(f'{value}\n')
        except OSError as e:
            raise HarnessError(f'cannot keep the OOM killer off QEMU '
                               f'({path}: {e})') from e

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
                 qemu=QEMU, incoming=False):
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
        # A migration destination: started paused with "-incoming defer",
        # no boot to wait for (see incoming_for and migrate).
        self.incoming = incoming
        self.vm = None
        self.cg = None
        self.tmp = None
        self.ctl = None
        self._buf = b''
        self._seq = 0

    # -- life cycle --

    def cmdline(self):
        # no_timer_check: at boot the kernel checks that the IO-APIC
        # timer ticks within a busy loop; on a loaded host a TCG guest
        # misses it now and then and panics ("IO-APIC + timer doesn't
        # work!"), which failed driver cases on 7.3 at random.
        parts = ['console=ttyS0', 'panic=-1', 'oops=panic', 'no_timer_check',
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

    def boot_args(self):
        """How the guest boots: the test kit's kernel and initramfs."""
        return ['-kernel', os.path.join(GUEST, 'vmlinuz'),
                '-initrd', os.path.join(GUEST, 'initramfs.cpio.gz'),
                '-append', self.cmdline()]

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
            dev += ',x-vmemmap-accounting=' + \
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
                *self.boot_args(),
                '-serial', f'file:{self.console_path}',
                '-chardev', f'socket,id=ctl,path={ctl_path},server=on,wait=off',
                '-serial', 'chardev:ctl']
        args += self.device_args() + self.extra_args
        if self.incoming:
            args += ['-incoming', 'defer', '-S']
        self.vm = QEMUMachine(self.qemu, args=args, wrapper=wrapper,
                              name=self.name, base_temp_dir=self.tmp,
                              log_dir=self.tmp)
        self.vm.launch()
        self.connect_ctl(ctl_path, ready=not self.incoming)
        return self

    def connect_ctl(self, path, ready=True):
        """Connect to the guest's command channel (ttyS1, a unix socket
        the VMM listens on) and wait for init's READY line (not for a
        migration destination, whose guest is already past it)."""
        self.ctl = socket.socket(socket.AF_UNIX)
        poll(lambda: self.ctl.connect_ex(path) == 0, 10, 'control socket')
        self.ctl.settimeout(0.5)
        if ready:
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

    def vmemmap_negotiated(self):
        """Whether the guest driver negotiated VIRTIO_MEM_F_VMEMMAP (bit 3
        of the virtio-mem device's (id 24) features, one character per
        bit).  Fails unless the guest has exactly one virtio-mem device."""
        st, out = self.run('for d in /sys/bus/virtio/devices/*; do '
                           '[ "$(cat $d/device)" = 0x0018 ] && '
                           'cat $d/features; done')
        feats = out.split()
        check(st == 0 and len(feats) == 1,
              f'no single virtio-mem device in the guest: {out.strip()}')
        return len(feats[0]) > 3 and feats[0][3] == '1'

    def meminfo(self):
        out = self.run('cat /proc/meminfo', check=True)[1]
        return {k: int(v) * 1024 for k, v in
                re.findall(r'^(\w+):\s+(\d+) kB', out, re.M)}

    def mem_total(self):
        return self.meminfo()['MemTotal']

    def qemu_log(self):
        """What QEMU wrote to stdout and stderr so far."""
        try:
            with open(os.path.join(self.tmp, self.name + '.log'),
                      errors='replace') as f:
                return f.read()
        except (OSError, TypeError):
            return ''

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
        out = self.vm.cmd('human-monitor-command', command_line='info ramblock')
        blocks = {name.split('/')[-1]: b for name, b in ramblocks(out).items()
                  if name.split('/')[-1] in ('pc.ram', 'mem0')}
        if 'pc.ram' not in blocks:
            raise HarnessError(f'no boot RAM in "info ramblock": {out}')
        rss = {name: 0 for name in blocks}
        covered = {name: 0 for name in blocks}
        for v in anon.vmas(self.vm.get_pid()):
            name = next((n for n, (hva, size) in blocks.items()
                         if hva <= v['start'] and v['end'] <= hva + size),
                        None)
            if name:
                covered[name] += v['end'] - v['start']
                rss[name] += v['rss']
        for name, (hva, size) in blocks.items():
            if covered[name] != size:
                raise HarnessError(f'RAMBlock {name} at {hva:#x}: smaps '
                                   f'covers {covered[name]} of {size} bytes')
        return rss

    def vmemmap_size(self):
        """The device's vmemmap-size; 0 where the binary lacks it."""
        try:
            return self.qom_get('x-vmemmap-size')
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


class SystemdGuest(Guest):
    """A Debian guest booted from a disk image (scripts/build-images):
    systemd as PID 1, root on a virtio-blk disk, Debian's kernel and
    initramfs given with -kernel/-initrd.  The image's vmtest-ctl.service
    (guest/debian/vmtest-ctl) serves the same command channel on ttyS1 as
    the test initramfs's init, after basic.target; serial-getty on ttyS1
    is masked in the image.  Which virtio_mem loads is the image's
    business (udev and modprobe), not the harness's.

    image: raw disk image; snapshot (default) keeps it unchanged, the
    guest's writes last until QEMU exits (across guest reboots).
    append: kernel parameters after root=/dev/vda."""

    def __init__(self, name, image, kernel, initrd, append='',
                 snapshot=True, mem='1G', maxmem='16G', smp=1,
                 boot_timeout=300, **kw):
        super().__init__(name, mem=mem, maxmem=maxmem, smp=smp,
                         module=None, append=append,
                         boot_timeout=boot_timeout, **kw)
        self.image = image
        self.kernel = kernel
        self.initrd = initrd
        self.snapshot = snapshot
        self.exit_status = None

    def cmdline(self):
        return ' '.join(p for p in ('root=/dev/vda rw console=ttyS0 '
                                    'panic=-1', self.append) if p)

    def boot_args(self):
        drive = f'file={self.image},if=none,id=disk0,format=raw'
        if self.snapshot:
            drive += ',snapshot=on'
        return ['-kernel', self.kernel, '-initrd', self.initrd,
                '-append', self.cmdline(),
                '-drive', drive, '-device', 'virtio-blk-pci,drive=disk0']

    def wait_ready(self, timeout, what='guest boot'):
        """READY comes after basic.target, when udev may still be loading
        the drivers of the devices present at boot (virtio_mem among
        them): wait for its queue to empty too.  That narrows the window
        without closing it (udevd may not have read every coldplug event
        yet), so a test that needs a driver bound polls for it."""
        t0 = time.monotonic()
        super().wait_ready(timeout, what)
        left = max(10, int(timeout - (time.monotonic() - t0)))
        self.run(f'udevadm settle --timeout={left}', timeout=left + 10,
                 check=True)

    def reboot(self, timeout=None):
        """systemctl reboot, then wait for the channel's next READY."""
        self._seq += 1
        self.ctl.sendall(f'{self._seq} systemctl reboot\n'.encode())
        self.wait_ready(timeout or self.boot_timeout, 'guest reboot')

    def poweroff(self, timeout=120):
        """systemctl poweroff; wait for QEMU to exit and return its exit
        status (0: the guest powered the machine off)."""
        self._seq += 1
        self.ctl.sendall(f'{self._seq} systemctl poweroff\n'.encode())
        poll(lambda: not self.vm.is_running(), timeout,
             'QEMU to exit after the guest powered off', interval=0.5)
        self.exit_status = self.vm.exitcode()
        self.vm.wait()
        return self.exit_status


# --- migration ---------------------------------------------------------

def incoming_for(src, name, qemu=None, device=None):
    """A migration destination for the running guest `src`, not started:
    the same machine and guest kit on `qemu` (default: src's binary), with
    `device` (default: src's) as its virtio-mem device.  It starts paused
    with "-incoming defer"; enter it like any Guest, then call migrate()."""
    return Guest(name, mem=src.mem, maxmem=src.maxmem, smp=src.smp,
                 device=dict(src.device if device is None else device),
                 module=src.module, modparams=src.modparams,
                 append=src.append, online=src.online,
                 memmap_on_memory=src.memmap_on_memory,
                 cgroup=src.want_cgroup, accel_=src.accel,
                 boot_timeout=src.boot_timeout, extra_args=src.extra_args,
                 qemu=qemu or src.qemu, incoming=True)


def migrate(src, dst, timeout=120, bandwidth=None):
    """Live-migrate `src` to the started destination `dst` (see
    incoming_for) over a unix socket and wait until both sides are done.

    The destination keeps running when the load fails (exit-on-error off),
    so its own error can be read.  Returns a dict: status and error (the
    source's query-migrate), dst_status and dst_error (the destination's;
    'exited' if it is gone), seconds (until the source finished) and
    transferred (the most RAM bytes the source reported sending).  On
    success dst takes over src's boot MemTotal; it stays paused (-S) so
    that both sides can be compared before the guest moves on."""
    sock = os.path.join(dst.tmp, 'migrate.sock')
    dst.vm.cmd('migrate-incoming', uri=f'unix:{sock}',
               **{'exit-on-error': False})
    if bandwidth:
        src.vm.cmd('migrate-set-parameters', **{'max-bandwidth': bandwidth})
    seen = {'transferred': 0}
    t0 = time.monotonic()
    src.vm.cmd('migrate', uri=f'unix:{sock}')

    def src_done():
        info = src.vm.cmd('query-migrate')
        seen['transferred'] = max(seen['transferred'],
                                  info.get('ram', {}).get('transferred', 0))
        seen['info'] = info
        return info.get('status') in ('completed', 'failed', 'cancelled')
    poll(src_done, timeout, 'the source to finish migrating', interval=0.02,
         backoff=False)
    info = seen['info']
    res = {'status': info['status'], 'error': info.get('error-desc'),
           'seconds': time.monotonic() - t0,
           'transferred': seen['transferred'], 'dst_status': 'exited',
           'dst_error': None}

    def dst_done():
        if not dst.vm.is_running():
            return True
        d = dst.vm.cmd('query-migrate')
        res['dst_status'], res['dst_error'] = d.get('status'), \
            d.get('error-desc')
        return res['dst_status'] in ('completed', 'failed')
    poll(dst_done, 30, 'the destination to finish loading')
    if res['status'] == res['dst_status'] == 'completed':
        dst.boot_total = src.boot_total
    return res


# --- device state and invariants ---------------------------------------

_warned_fallback = []


def device_state(g, dev='vm0'):
    """The virtio-mem device's state: x-query-virtio-mem-state (size,
    requested-size, vmemmap-size, block-size, region-size, plugged and
    vmemmap runs, offsets relative to the device's region), plus 'memaddr'
    (guest physical base, from query-memory-devices).  Where the binary
    lacks the command (stock QEMU, an older fork) the same keys come from
    query-memory-devices, with plugged and vmemmap None."""
    md = next((d['data'] for d in g.vm.cmd('query-memory-devices')
               if d['data'].get('id') == dev), None)
    if md is None:
        raise HarnessError(f'no memory device {dev!r}')
    try:
        st = g.vm.cmd('x-query-virtio-mem-state',
                      **{'qom-path': f'/machine/peripheral/{dev}'})
    except ExecuteError as e:
        if e.error_class != 'CommandNotFound':
            raise
        if not _warned_fallback:
            log('no x-query-virtio-mem-state in this QEMU: runs unchecked')
            _warned_fallback.append(True)
        st = {'size': md['size'], 'requested-size': md['requested-size'],
              'vmemmap-size': md.get('vmemmap-size', 0),
              'block-size': md['block-size'], 'region-size': md['max-size'],
              'plugged': None, 'vmemmap': None}
    st['memaddr'] = md['memaddr']
    return st


def _run_errors(runs, what, align, end):
    """Sentences on what is wrong with a list of runs that must be
    aligned, inside [0, end), sorted, disjoint and merged."""
    errs = []
    prev = None
    for r in runs:
        o, n = r['offset'], r['length']
        if n <= 0 or o % align or n % align:
            errs.append(f'{what} run {o:#x}+{n:#x} empty or not '
                        f'{align:#x} aligned')
        if o + n > end:
            errs.append(f'{what} run {o:#x}+{n:#x} beyond {end:#x}')
        if prev is not None and o <= prev:
            errs.append(f'{what} run {o:#x}+{n:#x} '
                        f'{"adjacent to" if o == prev else "before"} the '
                        f'previous run ending at {prev:#x}')
        prev = o + n
    return errs


def device_errors(st):
    """What is wrong with a device state (see device_state) on its own,
    as sentences: these hold at every instant, whatever the guest does."""
    errs = []
    size, vmm, bs = st['size'], st['vmemmap-size'], st['block-size']
    end = st.get('usable-region-size', st['region-size'])
    if size % bs or size > st['region-size']:
        errs.append(f'size {size:#x} not a multiple of the block size '
                    f'{bs:#x} or beyond the region')
    if vmm > size or vmm % 4096:
        errs.append(f'vmemmap-size {vmm:#x} beyond size {size:#x} or not '
                    '4 KiB aligned')
    plugged, marks = st.get('plugged'), st.get('vmemmap')
    if plugged is not None:
        errs += _run_errors(plugged, 'plugged', bs, end)
        total = sum(r['length'] for r in plugged)
        if total != size:
            errs.append(f'plugged runs hold {total:#x} bytes, size says '
                        f'{size:#x}')
    if marks is not None:
        errs += _run_errors(marks, 'vmemmap', 4096, end)
        total = sum(r['length'] for r in marks)
        if total != vmm:
            errs.append(f'vmemmap runs hold {total:#x} bytes, vmemmap-size '
                        f'says {vmm:#x}')
        for r in marks if plugged is not None else ():
            o, n = r['offset'], r['length']
            if not any(p['offset'] <= o and o + n <= p['offset'] + p['length']
                       for p in plugged):
                errs.append(f'vmemmap run {o:#x}+{n:#x} not inside plugged '
                            'memory')
    return errs


# One command for everything the guest says about its memory: memory
# block size and states, MemTotal, the virtio-mem device's negotiated
# features and driver, the patched driver's memmap bytes, iomem.
GUEST_VIEW = (
    'cd /sys/devices/system/memory && echo "bs $(cat block_size_bytes)" && '
    'for d in memory*; do echo "mb ${d#memory} $(cat $d/state)"; done; '
    'awk \'/^MemTotal:/ {print "memtotal", $2}\' /proc/meminfo; '
    'for v in /sys/bus/virtio/devices/*; do '
    '[ "$(cat $v/device)" = 0x0018 ] || continue; '
    'echo "features $(cat $v/features)"; '
    '[ -e $v/driver ] && echo "driver $(basename $(readlink $v/driver))"; '
    'done; '
    'for p in /sys/bus/virtio/drivers/virtio_mem/virtio*/vmemmap_bytes '
    '/sys/module/virtio_mem/parameters/vmemmap_bytes; do '
    '[ -r $p ] && echo "vmemmap_bytes $(cat $p)" && break; done; '
    'grep "System RAM (virtio_mem)" /proc/iomem | '
    'sed "s/^ *\\([0-9a-f]*\\)-\\([0-9a-f]*\\) .*/iomem \\1 \\2/"; true')


def guest_view(g):
    """What the guest says about its memory (see GUEST_VIEW): block_size,
    blocks {index: state}, memtotal, features (the bit string of the
    virtio-mem device, None without one), driver (None if unbound),
    vmemmap_bytes (None without the patched driver), iomem [(start,
    end)]."""
    out = g.run(GUEST_VIEW, check=True)[1]
    v = {'blocks': {}, 'features': None, 'driver': None,
         'vmemmap_bytes': None, 'iomem': []}
    for line in out.splitlines():
        f = line.split()
        if not f:
            continue
        if f[0] == 'bs':
            v['block_size'] = int(f[1], 16)
        elif f[0] == 'mb' and len(f) == 3:
            v['blocks'][int(f[1])] = f[2]
        elif f[0] == 'memtotal':
            v['memtotal'] = int(f[1]) * 1024
        elif f[0] in ('features', 'driver'):
            v[f[0]] = f[1]
        elif f[0] == 'vmemmap_bytes':
            v['vmemmap_bytes'] = int(f[1])
        elif f[0] == 'iomem':
            v['iomem'].append((int(f[1], 16), int(f[2], 16) + 1))
    return v


def _merge(ranges):
    out = []
    for s, e in sorted(ranges):
        if out and s <= out[-1][1]:
            out[-1] = (out[-1][0], max(out[-1][1], e))
        else:
            out.append((s, e))
    return out


def guest_errors(g, st, v, memmap=None):
    """What the guest's view `v` (guest_view) contradicts in the device
    state `st` (device_state), once the guest is at rest, as sentences.

    memmap: bytes of plugged memory the guest uses as memmap.  Default:
    what the bound patched driver says (vmemmap_bytes, a count that
    starts at 0 with each load of the module); with no driver bound,
    vmemmap-size (the marks of the memory an unloaded driver left
    behind); with the stock driver 0."""
    errs = []
    base, region = st['memaddr'], st['region-size']
    mb = v['block_size']
    present = {i: s for i, s in v['blocks'].items()
               if base <= i * mb < base + region}
    negotiated = v['features'] is not None and len(v['features']) > 3 and \
        v['features'][3] == '1'
    bound = v['driver'] is not None
    if memmap is None and not bound:
        memmap = st['vmemmap-size']
    elif memmap is None:
        memmap = v['vmemmap_bytes'] or 0
    gain = v['memtotal'] - g.boot_total
    if gain != st['size'] - memmap:
        errs.append(f'guest MemTotal gain {gain / MiB:g} MiB != size '
                    f'{st["size"] / MiB:g} - memmap {memmap / MiB:g} MiB')
    if bound and negotiated and st['vmemmap-size'] != memmap:
        errs.append(f'feature negotiated, but vmemmap-size '
                    f'{st["vmemmap-size"] / MiB:g} MiB != the guest\'s '
                    f'memmap {memmap / MiB:g} MiB')
    if bound and not negotiated and st['vmemmap-size']:
        errs.append(f'driver without the feature, but vmemmap-size '
                    f'{st["vmemmap-size"] / MiB:g} MiB')
    offline = sorted(i for i, s in present.items() if s != 'online')
    if offline:
        errs.append(f'memory blocks {offline} of the device not online')
    if st.get('plugged') is not None:
        for r in st['plugged']:
            first = (base + r['offset']) // mb
            last = (base + r['offset'] + r['length'] - 1) // mb
            missing = [i for i in range(first, last + 1) if i not in present]
            if missing:
                errs.append(f'plugged run {r["offset"]:#x}+{r["length"]:#x} '
                            f'in memory blocks {missing} the guest did not '
                            'add')
        stray = [i for i in present if not any(
            r['offset'] < (i + 1) * mb - base and
            i * mb - base < r['offset'] + r['length'] for r in st['plugged'])]
        if stray:
            errs.append(f'guest holds memory blocks {sorted(stray)} with '
                        'nothing plugged')
    # Marks come from a driver that negotiated the feature (or from one
    # that since went away and left its memory behind).
    if st.get('vmemmap') is not None and present and memmap and \
            (negotiated or not bound):
        per = memmap // len(present)
        want = [{'offset': i * mb - base, 'length': per}
                for i in sorted(present)]
        if st['vmemmap'] != want:
            errs.append(f'vmemmap runs {_fmt(st["vmemmap"])} != the first '
                        f'{per:#x} bytes of each added block {_fmt(want)}')
    added = _merge((i * mb, (i + 1) * mb) for i in present)
    iomem = _merge(r for r in v['iomem'] if base <= r[0] < base + region)
    if bound and iomem != added:
        errs.append(f'/proc/iomem virtio_mem RAM {iomem} != added memory '
                    f'blocks {added}')
    return errs


def _fmt(runs):
    return '[' + ', '.join(f'{r["offset"]:#x}+{r["length"]:#x}'
                           for r in runs) + ']'


def check_invariants(g, dev='vm0', guest=True, memmap=None, timeout=60):
    """Assert the device's invariants (device_errors) at once and, unless
    guest is False (a paused guest), that the guest's own view agrees
    (guest_errors), polling up to `timeout` seconds for the guest to come
    to rest.  Returns the device state."""
    last = [None, None]

    def consistent():
        st = device_state(g, dev)
        errs = device_errors(st)
        if errs:
            raise AssertionError('device state: ' + '; '.join(errs))
        last[0] = st
        if not guest:
            return True
        last[1] = guest_errors(g, st, guest_view(g), memmap)
        return not last[1]
    try:
        poll(consistent, timeout, 'the guest to agree with the device',
             interval=0.2)
    except HarnessError:
        if last[1] is None:
            raise
        raise AssertionError('guest view: ' + '; '.join(last[1])) from None
    st = last[0]
    log(f'invariants hold: size {st["size"] / MiB:g} MiB, vmemmap-size '
        f'{st["vmemmap-size"] / MiB:g} MiB'
        + ('' if st.get('plugged') is None else
           f', {len(st["plugged"])} plugged / {len(st["vmemmap"])} '
           'vmemmap runs'))
    return st


# --- QEMU trace events ---------------------------------------------------

class TraceLog:
    """QEMU trace events of one guest, written by QEMU's log backend to a
    file of their own, read step by step.

    Pass args() as extra_args; take() returns the (event, arguments) pairs
    traced since the last call, arguments as a dict of ints."""

    LINE = re.compile(r'^(?:\d+@[\d.]+:)?(\w+) ?(.*)$', re.M)
    ARG = re.compile(r'(\w+)=(0x[0-9a-f]+|\d+)')

    def __init__(self, events):
        self.events = tuple(events)
        self.dir = tempfile.mkdtemp(prefix='vmtest-trace-')
        self.path = os.path.join(self.dir, 'trace.log')
        self.pos = 0

    def args(self):
        out = ['-D', self.path]
        for e in self.events:
            out += ['-trace', f'enable={e}']
        return out

    def take(self):
        try:
            with open(self.path) as f:
                f.seek(self.pos)
                text = f.read()
                self.pos = f.tell()
        except FileNotFoundError:
            return []
        return [(m.group(1), {k: int(v, 0) for k, v in
                              self.ARG.findall(m.group(2))})
                for m in self.LINE.finditer(text)
                if m.group(1) in self.events]

    def remove(self):
        shutil.rmtree(self.dir, ignore_errors=True)


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
        # VMTEST_ONLY=substr[,substr...] runs only the matching cases; the
        # others are neither run nor counted (not reported as passed).
        only = [w for w in os.environ.get('VMTEST_ONLY', '').split(',') if w]
        if only and not any(w in name for w in only):
            return
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
