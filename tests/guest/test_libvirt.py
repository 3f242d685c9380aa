#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""
Real libvirt drives the fork: a libvirtd of the test's own defines the
documented domain (docs/system/devices/virtio-mem-vmemmap-domain.xml) with
the fork as <emulator> and the project's guest kit, under TCG.  The guest
must boot with ACPI and see the domain's NUMA node and CPUs; then
`virsh update-memory-device` grows and shrinks the virtio-mem device and,
at each settled step, libvirt's <current>, QEMU's size and vmemmap-size
(query-memory-devices through virsh) and the guest's MemTotal must agree.

The emulator is vmtest's QEMU (the fork in build/, or VMTEST_QEMU=PATH,
which tests/packaging/test_host_package.py sets to the installed
package's /usr/bin/qemu-system-x86_64-vmemmap); vmem-limit is
build/vmem-limit, or VMTEST_VMEM_LIMIT=PATH.

The daemon runs in a mount namespace of its own, with /etc/libvirt,
/run/libvirt, /var/lib/libvirt, /var/log/libvirt and /var/cache/libvirt
bound to a temporary directory and its socket outside them, so it shares
nothing with a system libvirtd.  No systemd is assumed.  The test stops
the domain and the daemon it started, also on failure.
"""

import contextlib
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import xml.etree.ElementTree as ET

from vmtest import (GUEST, MiB, QEMU, TOP, GiB, Guest, HarnessError, Tests,
                    check, log, poll, require_kit)

DOC_XML = os.path.join(TOP, 'docs', 'system', 'devices',
                       'virtio-mem-vmemmap-domain.xml')
LIBVIRTD = '/usr/sbin/libvirtd'
QEMU_NS = 'http://libvirt.org/schemas/domain/qemu/1.0'
ET.register_namespace('qemu', QEMU_NS)

# Requested sizes, in order: up twice, then down twice.
STEPS = (1 * GiB, 2 * GiB, 512 * MiB, 0)

# The same through the host tool's libvirt mode.
TOOL_STEPS = (1536 * MiB, 0)
VMEM_LIMIT = (os.environ.get('VMTEST_VMEM_LIMIT') or
              os.path.join(TOP, 'build', 'vmem-limit'))

# Memory blocks are 128 MiB on x86-64 and each holds its own 2 MiB memmap.
MEMMAP_RATIO = 64


def machine_partitions():
    return set(glob.glob('/sys/fs/cgroup/machine') +
               glob.glob('/sys/fs/cgroup/*/machine'))


class Libvirtd:
    """A privileged libvirtd of our own, isolated by a mount namespace."""

    # The daemon's directories, each bound to one under the temp dir.
    DIRS = ('/etc/libvirt', '/run/libvirt', '/var/lib/libvirt',
            '/var/log/libvirt', '/var/cache/libvirt')

    def __init__(self):
        self.tmp = None
        self.proc = None
        self.uri = None
        self.created = []
        self.partitions = set()

    def start(self):
        self.tmp = tempfile.mkdtemp(prefix='vmtest-libvirtd-')
        # Without systemd, libvirtd puts domains in a "machine" cgroup at
        # the root of each hierarchy: remove those it adds when it stops.
        self.partitions = machine_partitions()
        sock_dir = os.path.join(self.tmp, 'sock')
        os.makedirs(sock_dir)
        binds = []
        for d in self.DIRS:
            mine = os.path.join(self.tmp, d.strip('/').replace('/', '-'))
            os.makedirs(mine)
            if not os.path.isdir(d):
                os.makedirs(d)
                self.created.append(d)
            binds.append(f'mount --bind {mine} {d}')
        etc = os.path.join(self.tmp, 'etc-libvirt')
        self.log_path = os.path.join(self.tmp, 'libvirtd.log')
        conf = os.path.join(etc, 'libvirtd.conf')
        with open(conf, 'w') as f:
            f.write(f'unix_sock_dir = "{sock_dir}"\n'
                    'auth_unix_rw = "none"\n'
                    'auth_unix_ro = "none"\n'
                    f'log_outputs = "3:file:{self.log_path}"\n')
        # QEMU as root without relabelling; its stdout to a plain file, so
        # no virtlogd is needed.
        with open(os.path.join(etc, 'qemu.conf'), 'w') as f:
            f.write('user = "root"\n'
                    'group = "root"\n'
                    'dynamic_ownership = 0\n'
                    'remember_owner = 0\n'
                    'security_driver = "none"\n'
                    'namespaces = [ ]\n'
                    'stdio_handler = "file"\n')
        script = ' && '.join(binds) + \
            f' && exec {LIBVIRTD} --config {conf} ' \
            f'--pid-file {os.path.join(self.tmp, "libvirtd.pid")}'
        self.proc = subprocess.Popen(
            ['unshare', '--mount', '--propagation', 'private',
             '/bin/sh', '-c', script],
            stdout=subprocess.DEVNULL,
            stderr=open(os.path.join(self.tmp, 'libvirtd.stderr'), 'w'))
        self.uri = ('qemu:///system?socket='
                    + os.path.join(sock_dir, 'libvirt-sock'))

        def up():
            if self.proc.poll() is not None:
                raise HarnessError(f'libvirtd exited ({self.proc.returncode}):'
                                   f'\n{self.tail()}')
            return subprocess.run(['virsh', '-c', self.uri, 'version'],
                                  capture_output=True).returncode == 0
        poll(up, 60, 'libvirtd to answer')
        return self

    def tail(self, n=30):
        out = []
        for name in ('libvirtd.stderr', 'libvirtd.log'):
            with contextlib.suppress(OSError):
                with open(os.path.join(self.tmp, name), errors='replace') as f:
                    out += f.read().splitlines()[-n:]
        return '\n'.join(out)

    def virsh(self, *args, check_=True, timeout=120):
        p = subprocess.run(['virsh', '-q', '-c', self.uri, *args],
                           capture_output=True, text=True, timeout=timeout)
        if check_ and p.returncode:
            raise HarnessError(f'virsh {" ".join(args)} failed:\n'
                               f'{p.stderr.strip()}')
        return p.stdout

    def qemu_pids(self):
        """QEMU processes this daemon started (its pid files)."""
        pids = []
        run = os.path.join(self.tmp, 'run-libvirt', 'qemu')
        with contextlib.suppress(OSError):
            for name in os.listdir(run):
                if name.endswith('.pid'):
                    with contextlib.suppress(OSError, ValueError):
                        pids.append(int(open(os.path.join(run, name)).read()))
        return pids

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.tmp:
            # A domain the daemon could not destroy must not outlive it.
            for pid in self.qemu_pids():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
            if not os.environ.get('VMTEST_KEEP'):
                shutil.rmtree(self.tmp, ignore_errors=True)
        # Domain cgroups libvirtd left behind (a domain destroyed while it
        # booted) go too; rmdir takes only empty cgroups.
        for p in machine_partitions() - self.partitions:
            for d, _, _ in sorted(os.walk(p), reverse=True):
                with contextlib.suppress(OSError):
                    os.rmdir(d)
        for d in self.created:
            with contextlib.suppress(OSError):
                os.rmdir(d)
        self.proc = None

    def __enter__(self):
        try:
            return self.start()
        except BaseException:
            if self.tmp:
                print('---- libvirtd (tail) ----\n' + self.tail(),
                      flush=True)
            self.stop()
            raise

    def __exit__(self, *exc):
        if exc[0] is not None:
            print('---- libvirtd (tail) ----\n' + self.tail(), flush=True)
        self.stop()


def doc_domain():
    return ET.parse(DOC_XML).getroot()


def vmem_alias(dom):
    return dom.find("devices/memory[@model='virtio-mem']/alias").get('name')


class LibvirtGuest(Guest):
    """The documented domain, booted by libvirtd with the guest kit.

    The harness's guest protocol (run, meminfo, wait_guest_at_rest) is
    Guest's; QOM reads go through `virsh qemu-monitor-command`, since
    libvirt owns the domain's monitor."""

    def __init__(self, daemon, name):
        super().__init__(name, memmap_on_memory=True, cgroup=False,
                         accel_='tcg', boot_timeout=180)
        self.daemon = daemon
        self.domain = f'{name}-{os.getpid()}'
        self.defined = False

    def domain_xml(self):
        dom = doc_domain()
        doc_cmdline = dom.find('os/cmdline').text.split()
        missing = [a for a in doc_cmdline if a not in self.cmdline().split()]
        if missing:
            raise HarnessError(f'{DOC_XML}: the harness command line lacks '
                               f'{missing}: keep the two in step')
        dom.find('name').text = self.domain
        dom.find('devices/emulator').text = QEMU
        dom.find('os/kernel').text = os.path.join(GUEST, 'vmlinuz')
        dom.find('os/initrd').text = os.path.join(GUEST, 'initramfs.cpio.gz')
        dom.find('os/cmdline').text = self.cmdline()
        devices = dom.find('devices')
        for el in devices.findall('serial') + devices.findall('console'):
            devices.remove(el)
        console = ET.SubElement(devices, 'serial', type='file')
        ET.SubElement(console, 'source', path=self.console_path)
        ET.SubElement(console, 'target', port='0')
        ctl = ET.SubElement(devices, 'serial', type='unix')
        ET.SubElement(ctl, 'source', mode='bind', path=self.ctl_path)
        ET.SubElement(ctl, 'target', port='1')
        # A guest that panics (panic=-1 reboots it) ends the domain, so the
        # command channel closes instead of the test waiting for a reboot.
        ET.SubElement(dom, 'on_reboot').text = 'destroy'
        ET.SubElement(dom, 'on_crash').text = 'destroy'
        return ET.tostring(dom, encoding='unicode')

    def start(self):
        self.tmp = tempfile.mkdtemp(prefix=f'vmtest-{self.name}-')
        self.console_path = os.path.join(self.tmp, 'console.log')
        self.ctl_path = os.path.join(self.tmp, 'ctl.sock')
        xml = os.path.join(self.tmp, 'domain.xml')
        with open(xml, 'w') as f:
            f.write(self.domain_xml())
        self.daemon.virsh('define', xml)
        self.defined = True
        self.daemon.virsh('start', self.domain)
        self.connect_ctl(self.ctl_path)
        return self

    def stop(self):
        if self.ctl:
            self.ctl.close()
            self.ctl = None
        if self.defined:
            self.daemon.virsh('destroy', self.domain, check_=False)
            self.daemon.virsh('undefine', self.domain, check_=False)
            self.defined = False
        if self.tmp and not os.environ.get('VMTEST_KEEP'):
            shutil.rmtree(self.tmp, ignore_errors=True)

    def dump_console(self):
        super().dump_console()
        qemu_log = os.path.join(self.daemon.tmp, 'var-log-libvirt', 'qemu',
                                f'{self.domain}.log')
        with contextlib.suppress(OSError):
            print('---- QEMU log (tail) ----\n' + '\n'.join(
                open(qemu_log, errors='replace').read().splitlines()[-20:]),
                flush=True)

    # -- through libvirt --

    def qmp(self, cmd, **args):
        msg = {'execute': cmd}
        if args:
            msg['arguments'] = args
        out = self.daemon.virsh('qemu-monitor-command', self.domain,
                                json.dumps(msg))
        return json.loads(out)['return']

    def qom_get(self, prop, path=None):
        return self.qmp('qom-get', path=path or self.alias, property=prop)

    def qom_set(self, prop, value, path=None):
        raise HarnessError('libvirt owns this device: resize with '
                           'update_memory_device()')

    @property
    def alias(self):
        return vmem_alias(doc_domain())

    def memory_device_info(self):
        """This device's entry in query-memory-devices."""
        for d in self.qmp('query-memory-devices'):
            if d['type'] == 'virtio-mem' and d['data'].get('id') == self.alias:
                return d['data']
        raise HarnessError(f'no virtio-mem device {self.alias} in '
                           'query-memory-devices')

    def libvirt_device(self):
        """libvirt's live view of the device: requested and current bytes."""
        dom = ET.fromstring(self.daemon.virsh('dumpxml', self.domain))
        target = next(m.find('target') for m in
                      dom.findall("devices/memory[@model='virtio-mem']")
                      if m.find(f"alias[@name='{self.alias}']") is not None)

        def nbytes(tag):
            el = target.find(tag)
            if el is None:
                return None
            unit = el.get('unit', 'KiB')
            return int(el.text) * {'b': 1, 'bytes': 1, 'KiB': 1 << 10,
                                   'MiB': MiB, 'GiB': GiB}[unit]
        return {'requested': nbytes('requested'),
                'current': nbytes('current')}

    def update_memory_device(self, requested):
        self.daemon.virsh('update-memory-device', self.domain,
                          '--alias', self.alias, '--live',
                          '--requested-size', f'{requested >> 10}KiB')


def runs_emulator(daemon, g):
    """The domain's <emulator> is QEMU as given (a link stays a link) and
    the process libvirt started runs that binary."""
    named = ET.fromstring(daemon.virsh('dumpxml', g.domain)).find(
        'devices/emulator').text
    check(named == QEMU, f'domain <emulator> {named}, want {QEMU}')
    pidfile = os.path.join(daemon.tmp, 'run-libvirt', 'qemu',
                           f'{g.domain}.pid')
    with open(pidfile) as f:
        exe = os.path.realpath(f'/proc/{int(f.read())}/exe')
    check(exe == os.path.realpath(QEMU),
          f'the domain\'s QEMU runs {exe}, the domain names {QEMU}')
    log(f'emulator {QEMU}: runs {exe}')


def boots_with_acpi_numa_cpus(g):
    dom = doc_domain()
    cell = dom.find('cpu/numa/cell')
    vcpus = int(dom.find('vcpu').text)
    check(g.run('test -d /sys/firmware/acpi')[0] == 0,
          'guest has no /sys/firmware/acpi: booted without ACPI')
    cmdline = g.run('cat /proc/cmdline', check=True)[1]
    check('acpi=off' not in cmdline, f'guest command line: {cmdline}')
    st, cpulist = g.run('cat /sys/devices/system/node/node'
                        f'{cell.get("id")}/cpulist')
    check(st == 0, f'guest has no NUMA node {cell.get("id")}')
    check(cpulist.strip() == cell.get('cpus'),
          f'node{cell.get("id")} has CPUs {cpulist.strip()}, '
          f'the domain says {cell.get("cpus")}')
    online = g.run('cat /sys/devices/system/cpu/online', check=True)[1]
    check(online.strip() == f'0-{vcpus - 1}',
          f'guest CPUs online {online.strip()}, the domain has {vcpus}')
    log(f'guest: ACPI on, node{cell.get("id")} CPUs {cpulist.strip()}, '
        f'online {online.strip()}')


def override_and_module(g):
    check(g.qom_get('x-vmemmap-accounting') is True,
          'qemu:override did not turn x-vmemmap-accounting on')
    check(g.run('grep -q "^virtio_mem " /proc/modules')[0] == 0,
          'virtio_mem-patched.ko not loaded')


def resize_step(g, requested, base):
    """Resize through libvirt and check every view once settled."""
    t0 = time.monotonic()
    g.update_memory_device(requested)
    settled_views_agree(g, requested, base, t0)


def settled_views_agree(g, requested, base, t0):
    """Wait for the device and the guest to settle at `requested`, then
    check libvirt's, QEMU's and the guest's view against each other."""
    poll(lambda: g.memory_device_info()['size'] == requested, 600,
         f'QEMU size == {requested >> 20} MiB')
    g.wait_guest_at_rest(600)
    # MEMORY_DEVICE_SIZE_CHANGE is rate limited (one a second per device):
    # libvirt's <current> follows within that.
    poll(lambda: g.libvirt_device()['current'] == requested, 10,
         f'libvirt <current> == {requested >> 20} MiB')
    secs = time.monotonic() - t0
    info = g.memory_device_info()
    lv = g.libvirt_device()
    vmemmap = g.qom_get('x-vmemmap-size')
    gain = g.mem_total() - base
    log(f'requested {requested >> 20} MiB: size {info["size"] >> 20}, '
        f'vmemmap-size {vmemmap >> 20}, <current> {lv["current"] >> 20}, '
        f'MemTotal +{gain >> 20} MiB ({secs:.1f}s)')
    check(info['requested-size'] == requested and lv['requested'] == requested,
          f'requested: QEMU {info["requested-size"]}, libvirt '
          f'{lv["requested"]}, asked {requested}')
    check(info['size'] == requested == g.qom_get('size'),
          f'size {info["size"]} (QOM {g.qom_get("size")}) != {requested}')
    check(lv['current'] == info['size'],
          f'libvirt <current> {lv["current"]} != size {info["size"]}')
    check(info.get('vmemmap-size') == vmemmap,
          f'query-memory-devices vmemmap-size {info.get("vmemmap-size")} '
          f'!= QOM {vmemmap}')
    check(vmemmap == requested // MEMMAP_RATIO,
          f'vmemmap-size {vmemmap} != size / {MEMMAP_RATIO}')
    check(gain == info['size'] - vmemmap,
          f'MemTotal gain {gain} != size - vmemmap-size '
          f'{info["size"] - vmemmap}')


def vmem_limit(daemon, g, *args):
    p = subprocess.run([VMEM_LIMIT, '--connect', daemon.uri, '-d', g.domain,
                        *args], capture_output=True, text=True, timeout=900)
    out = p.stdout + p.stderr
    if p.returncode:
        raise HarnessError(f'vmem-limit {" ".join(args)} exited '
                           f'{p.returncode}:\n{out}')
    return out


def tool_base(daemon, g):
    """The base vmem-limit measures now, rounded up to a MiB: given back
    with --base, so that the limit it sets is an exact expectation."""
    shown = json.loads(vmem_limit(daemon, g, 'show', '--json'))
    return -(-shown['base'] // MiB) * MiB


def tool_resize(daemon, g, requested, base, tool_base_):
    """vmem-limit in libvirt mode resizes the device and sets the
    domain's hard_limit to base + max(size, requested-size) + margin."""
    t0 = time.monotonic()
    opt = f'--base={tool_base_ >> 20}M'
    out = vmem_limit(daemon, g, opt, 'resize', g.alias, f'{requested >> 20}M')
    for line in out.splitlines():
        log(f'vmem-limit: {line}')
    settled_views_agree(g, requested, base, t0)
    shown = json.loads(vmem_limit(daemon, g, opt, 'show', '--json'))
    tune = {k.strip(): v.strip() for k, v in
            (line.split(':', 1) for line in
             daemon.virsh('memtune', g.domain).splitlines() if ':' in line)}
    hard = int(tune['hard_limit']) << 10
    soft = int(tune['soft_limit']) << 10
    want = tool_base_ + requested + shown['headroom'] + shown['margin']
    log(f'hard_limit {hard >> 20} MiB, soft_limit {soft >> 20} MiB = base '
        f'{tool_base_ >> 20} + size {requested >> 20} + headroom '
        f'{shown["headroom"] >> 20} + margin {shown["margin"] >> 20} MiB; '
        f'charge {shown["charge"] >> 20} MiB')
    check(hard == soft == want,
          f'hard_limit {hard}, soft_limit {soft}: want base {tool_base_} + '
          f'size {requested} + headroom {shown["headroom"]} + margin '
          f'{shown["margin"]} = {want}')
    check(shown['limit'] == hard and shown['wanted'] == want,
          f'vmem-limit show: limit {shown["limit"]}, wanted '
          f'{shown["wanted"]}; libvirt has {hard}, want {want}')
    check(hard >= shown['charge'],
          f'hard_limit {hard} below the charge {shown["charge"]}')


def tool_follow(daemon, g, base, tool_base_):
    """vmem-limit -d ... follow, on libvirt's memory-device-size-change
    events alone, moves hard_limit and soft_limit after resizes done by
    someone else (virsh update-memory-device)."""
    opt = f'--base={tool_base_ >> 20}M'
    shown = json.loads(vmem_limit(daemon, g, opt, 'show', '--json'))
    max_size = shown['virtio-mem'][0]['max-size']
    p = subprocess.Popen([VMEM_LIMIT, '--connect', daemon.uri, '-d',
                          g.domain, opt, '--interval', '0', 'follow'],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         text=True)
    out = []
    threading.Thread(target=lambda: out.extend(p.stdout), daemon=True).start()

    def limits():
        tune = {k.strip(): v.strip() for k, v in
                (line.split(':', 1) for line in
                 daemon.virsh('memtune', g.domain).splitlines()
                 if ':' in line)}
        return int(tune['hard_limit']) << 10, int(tune['soft_limit']) << 10
    try:
        poll(lambda: any('following' in line for line in out), 30,
             'vmem-limit follow to start')
        for req in (1 * GiB, 0):
            t0 = time.monotonic()
            g.update_memory_device(req)
            # headroom: the memmap of growing to max-size
            want = tool_base_ + req + (max_size - req) // 64 + \
                shown['margin']
            poll(lambda w=want: limits() == (w, w), 60,
                 f'hard_limit = soft_limit = {want >> 20} MiB (now '
                 f'{[v >> 20 for v in limits()]} MiB)')
            log(f'follow: update-memory-device {req >> 20} MiB, hard_limit '
                f'{limits()[0] >> 20} MiB after {time.monotonic() - t0:.1f}s')
            settled_views_agree(g, req, base, t0)
        check(p.poll() is None, 'vmem-limit follow exited early')
    finally:
        p.terminate()
        p.wait(timeout=10)
    for line in out:
        log(f'vmem-limit: {line.rstrip()}')
    check(any('size change event' in line for line in out),
          'vmem-limit follow never acted on an event')


def main():
    require_kit()
    # A stopped test stops its domain and daemon too.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t = Tests()
    with Libvirtd() as daemon:
        log(f'libvirtd {daemon.virsh("version", "--daemon").split()[-1]} '
            f'at {daemon.uri}')
        with LibvirtGuest(daemon, 'libvirt') as g:
            t.case(f'libvirt runs the emulator {QEMU}',
                   lambda: runs_emulator(daemon, g))
            t.case('documented domain boots with ACPI, its NUMA node and '
                   'CPUs', lambda: boots_with_acpi_numa_cpus(g))
            t.case('qemu:override turns x-vmemmap-accounting on; the patched '
                   'module is loaded', lambda: override_and_module(g))
            base = g.boot_total
            for req in STEPS:
                t.case(f'update-memory-device to {req >> 20} MiB: <current>, '
                       'size, vmemmap-size, MemTotal agree',
                       lambda req=req: resize_step(g, req, base))
            tb = tool_base(daemon, g)
            for req in TOOL_STEPS:
                t.case(f'vmem-limit -d (libvirt) resize to {req >> 20} MiB: '
                       'hard_limit = base + size + margin, views agree',
                       lambda req=req: tool_resize(daemon, g, req, base, tb))
            t.case('vmem-limit -d (libvirt) follow: hard_limit follows '
                   'update-memory-device by events',
                   lambda: tool_follow(daemon, g, base, tb))
            t.case('guest log clean', lambda: check(
                not g.bad_log_lines(),
                'guest log has errors:\n' + '\n'.join(g.bad_log_lines())))
    t.done()


if __name__ == '__main__':
    main()
