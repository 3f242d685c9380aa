#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""
Real Debian guests with the DKMS package (issue 15, item 4).

Builds the DKMS package (scripts/build-dkms-deb: lintian must be silent)
and minimal Debian 12 and 13 images (scripts/build-images: debootstrap,
systemd, Debian's cloud kernels, dkms and headers; Debian 13 also
trixie-backports' 7.3), installs the package in each image with
"apt install ./<deb>" in a chroot, where DKMS builds the module for each
kernel, and boots the images from a virtio-blk disk under TCG:

- under the fork, per kernel: the kernel command line is the one the
  package's grub drop-in put in grub.cfg; virtio_mem is the DKMS module
  (modinfo -n under updates/dkms, and the loaded module's srcversion is
  that file's); VIRTIO_MEM_F_VMEMMAP negotiated; 0 -> 4 GiB -> 1 GiB ->
  0 with size, vmemmap-size and MemTotal gain == size - vmemmap-size at
  every settled step; systemctl poweroff and QEMU exits 0;
- under stock QEMU, per release: the DKMS module loads, no feature is
  negotiated, 1 GiB plugs and unplugs with the guest's accounting; then
  "apt purge" in the guest, a reboot, and the kernel's own virtio_mem
  (kernel/drivers/virtio) is loaded and behaves as stock; poweroff.

A kernel base the package does not carry (its series not written yet)
is a failed case, never a skipped one.
"""

import os
import re
import subprocess
import time

from vmtest import (GiB, MiB, QEMU, STOCK_QEMU, TOP, SystemdGuest, Tests,
                    check, check_invariants, guest_view, log, poll)

CACHE = os.environ.get('VMM_CACHE') or os.path.join(
    os.environ.get('XDG_CACHE_HOME') or os.path.expanduser('~/.cache'),
    'virtio-mem-vmemmap')
IMAGES = os.path.join(CACHE, 'images')
DEB_DIR = os.path.join(TOP, 'build', 'deb')
PARAMS = ('memory_hotplug.memmap_on_memory=1',
          'memhp_default_state=online_movable')
# (Debian release, kernel base) booted under the fork.
PLAN = ((13, '6.12'), (13, '7.3'), (12, '6.1'))
# The kernel each release's stock-QEMU and purge case boots.
DEFAULT_BASE = {12: '6.1', 13: '6.12'}
STEPS = (0, 4 * GiB, 1 * GiB, 0)

state = {'deb': None, 'bases': [], 'images': {}}


def sh(cmd, timeout=3600):
    """Run a host command; (status, output)."""
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                       text=True, timeout=timeout, check=False)
    return p.returncode, p.stdout


def deb_version():
    return subprocess.run(
        ['dpkg-parsechangelog', '-l',
         os.path.join(TOP, 'packaging/dkms/debian/changelog'),
         '-S', 'Version'], capture_output=True, text=True,
        check=True).stdout.strip()


def deb_path():
    return os.path.join(DEB_DIR,
                        f'virtio-mem-vmemmap-dkms_{deb_version()}_all.deb')


def kernel_of(n, base):
    """The image's kernel release of a base (e.g. 6.12.118+deb13-...)."""
    with open(os.path.join(IMAGES, f'debian-{n}', 'kernels')) as f:
        for line in f:
            k = line.split()[0]
            if k.startswith(base + '.'):
                return k
    raise AssertionError(f'the Debian {n} image has no Linux {base} kernel')


def grub_args(n, k):
    """Kernel parameters of k's first (non-recovery) grub.cfg entry as the
    package's postinst left it, less root= and ro."""
    with open(os.path.join(IMAGES, f'debian-{n}', 'dkms-grub.cfg')) as f:
        for m in re.finditer(r'^\s*linux\s+/boot/vmlinuz-(\S+)\s+(.*)$',
                             f.read(), re.M):
            args = m.group(2).split()
            if m.group(1) == k and 'single' not in args:
                return [a for a in args
                        if not a.startswith('root=') and a != 'ro']
    raise AssertionError(f'no grub.cfg entry for {k} in the Debian {n} image')


def boot(n, k, name, qemu, device):
    d = os.path.join(IMAGES, f'debian-{n}')
    args = grub_args(n, k)
    missing = [p for p in PARAMS if p not in args]
    check(not missing, f'grub.cfg for {k} lacks {missing}: the drop-in did '
          f'not reach the command line ({" ".join(args)})')
    return SystemdGuest(name, image=os.path.join(d, 'dkms.img'),
                        kernel=os.path.join(d, 'dkms-boot', k, 'vmlinuz'),
                        initrd=os.path.join(d, 'dkms-boot', k, 'initrd.img'),
                        append=' '.join(args), qemu=qemu, device=device)


def loaded_module(g, timeout=120):
    """(path modinfo -n resolves virtio_mem to, whether the loaded module
    is out of tree (taint O: built by DKMS, not the kernel's), uname -r),
    once udev has bound a driver to the virtio-mem device (udevd may
    still be reading the coldplug events when udevadm settle finds its
    queue empty).  Debian's kernels have no srcversion for modules
    without MODULE_VERSION, so the taint tells the two apart."""
    poll(lambda: g.run('for d in /sys/bus/virtio/devices/*; do '
                       '[ "$(cat $d/device)" = 0x0018 ] && '
                       '[ -e $d/driver ] && exit 0; done; exit 1')[0] == 0,
         timeout, 'a driver bound to the virtio-mem device', interval=1)
    out = g.run('uname -r; modinfo -n virtio_mem; '
                'echo "taint=$(cat /sys/module/virtio_mem/taint)"; '
                'echo "version=$(cat /sys/module/virtio_mem/version '
                '2>/dev/null)"', check=True)[1]
    lines = out.split()
    check(len(lines) == 4 and lines[2].startswith('taint='),
          f'virtio_mem not loaded or not found: {out}')
    k, path, taint, version = lines
    state['loaded_version'] = version[len('version='):]
    return path, 'O' in taint[len('taint='):], k


def settle(g, req, memmap=None, timeout=600):
    """Set requested-size, wait for size to follow and the guest to agree
    with the device (check_invariants: MemTotal gain == size - the
    memmap the guest holds on plugged memory).  Under stock QEMU the
    patched driver's memmap is on the blocks but unreported, which
    Guest.resize's rest test (gain == size - vmemmap-size) cannot see."""
    t0 = time.monotonic()
    g.qom_set('requested-size', req)
    poll(lambda: g.qom_get('size') == req, timeout, f'size == {req >> 20} MiB',
         interval=0.2)
    st = check_invariants(g, memmap=memmap, timeout=timeout)
    return st, time.monotonic() - t0


def gain_figures(g, st):
    gain = g.mem_total() - g.boot_total
    return (f'size {st["size"] // MiB} MiB, vmemmap-size '
            f'{st["vmemmap-size"] // MiB} MiB, MemTotal gain '
            f'{gain // MiB} MiB'), gain


def test_package():
    rc, out = sh([os.path.join(TOP, 'scripts', 'build-dkms-deb')])
    for line in out.splitlines():
        if line.startswith(('==>', 'warning:', 'error:')) or \
                re.match(r'^[EWIPXO]: ', line):
            log(line)
    check(rc == 0, f'scripts/build-dkms-deb failed ({rc}):\n{out[-3000:]}')
    state['deb'] = deb_path()
    check(os.path.exists(state['deb']), f'{state["deb"]} not written')
    with open(os.path.join(DEB_DIR, 'virtio-mem-vmemmap-dkms.bases')) as f:
        state['bases'] = f.read().split()
    tags = [l for l in out.splitlines() if re.match(r'^[EWIPXO]: ', l)]
    check(not tags, 'lintian tags: ' + '; '.join(tags))
    log(f'{os.path.basename(state["deb"])}: Linux {" ".join(state["bases"])}')


def test_refusal():
    # The package's Kbuild against real kernel headers whose base the tree
    # does not carry: the build stops with one line naming what it does.
    rc, out = sh(['sh', '-c', 'ls -d "$0"/linux-6.12.*/root/usr/src/'
                  'linux-headers-*-cloud-amd64 | head -n1', CACHE])
    headers = out.strip()
    check(rc == 0 and headers, f'no Linux 6.12 kit headers under {CACHE}')
    tmp = os.path.join(CACHE, 'dkms-refusal')
    sh(['rm', '-rf', tmp])
    os.makedirs(tmp)
    rc, out = sh(['sh', '-c', f'dpkg-deb --fsys-tarfile "{state["deb"]}" | '
                  f'tar -x -C "{tmp}" --wildcards "./usr/src/*"'])
    check(rc == 0, f'cannot unpack the package: {out}')
    src = subprocess.run(['sh', '-c', f'ls -d {tmp}/usr/src/*/'],
                         capture_output=True, text=True).stdout.split()[0]
    os.rename(os.path.join(src, 'linux-6.12'), os.path.join(src, 'linux-9.9'))
    rc, out = sh(['make', '-C', headers, f'M={src.rstrip("/")}', 'modules'])
    errs = [l for l in out.splitlines() if 'virtio-mem-vmemmap supports' in l]
    named = re.search(r'supports Linux ([\d. ]+) only, not 6\.12\.', errs[0]) \
        if len(errs) == 1 else None
    check(rc != 0 and named and '9.9' in named.group(1).split() and
          '6.12' not in named.group(1).split(),
          f'build for an unsupported base did not stop with one '
          f'line naming the supported ones (rc {rc}):\n{out[-2000:]}')
    log('unsupported kernel: ' + errs[0].split('*** ')[-1])
    sh(['rm', '-rf', tmp])


def test_image(n):
    check(state['deb'], 'no package (the package case failed)')
    t0 = time.monotonic()
    rc, out = sh([os.path.join(TOP, 'scripts', 'build-images'), '--install',
                  state['deb'], str(n)])
    check(rc == 0, f'scripts/build-images --install failed ({rc}):\n'
          f'{out[-3000:]}')
    log(f'Debian {n} image ready in {time.monotonic() - t0:.0f}s')
    with open(os.path.join(IMAGES, f'debian-{n}', 'dkms-install.log')) as f:
        inst = f.read()
    with open(os.path.join(IMAGES, f'debian-{n}', 'dkms-modules')) as f:
        modules = dict(l.split() for l in f if l.strip())
    for k, path in modules.items():
        base = '.'.join(k.split('.')[:2])
        built = path.startswith(f'/lib/modules/{k}/updates/dkms/')
        if base in state['bases']:
            check(built, f'DKMS did not install virtio_mem for {k}: modinfo '
                  f'-n gives {path}\n{inst[-2000:]}')
            log(f'Debian {n}: DKMS built virtio_mem for {k}: {path}')
        else:
            check(not built, f'DKMS built virtio_mem for unsupported {k}')
            log(f'Debian {n}: DKMS refused {k} (package carries no Linux '
                f'{base})')
    state['images'][n] = True


def test_fork(n, base):
    check(base in state['bases'], f'the package carries no Linux {base} '
          f'driver (guest/linux/patches-{base}/ not there yet)')
    check(state['images'].get(n), f'no Debian {n} image')
    k = kernel_of(n, base)
    dev = {'size': '4G', 'block_size': '2M', 'vmemmap_accounting': True}
    t0 = time.monotonic()
    with boot(n, k, f'deb{n}-{base}', QEMU, dev) as g:
        log(f'Debian {n}, Linux {k}: booted in {time.monotonic() - t0:.0f}s')
        cmdline = g.run('cat /proc/cmdline', check=True)[1]
        check(all(p in cmdline.split() for p in PARAMS),
              f'/proc/cmdline lacks {PARAMS}: {cmdline}')
        path, oot, kr = loaded_module(g)
        check(kr == k, f'booted {kr}, not {k}')
        check(path.startswith(f'/lib/modules/{k}/updates/dkms/virtio_mem.ko'),
              f'modinfo -n virtio_mem is {path}, not the DKMS module')
        check(oot, 'the loaded virtio_mem is not out of tree (no taint O)')
        want = deb_version() + '-vmemmap'
        check(state['loaded_version'] == want, f'the loaded virtio_mem is '
              f'version {state["loaded_version"]!r}, not the package\'s '
              f'{want!r}')
        log(f'virtio_mem {want} loaded from {path} (taint O)')
        for req in STEPS:
            secs = g.resize(req)
            st = check_invariants(g)
            figs, gain = gain_figures(g, st)
            v = guest_view(g)
            check(v['features'] is not None and v['features'][3] == '1',
                  f'VIRTIO_MEM_F_VMEMMAP not negotiated ({v["features"]})')
            check(gain == st['size'] - st['vmemmap-size'],
                  f'MemTotal gain != size - vmemmap-size: {figs}')
            check(st['size'] == req, f'size {st["size"]} != requested {req}')
            # 2 MiB of memmap per 128 MiB memory block.
            check(st['vmemmap-size'] == req // 64,
                  f'vmemmap-size {st["vmemmap-size"]} != {req // 64}')
            log(f'requested {req // MiB} MiB ({secs:.1f}s): {figs}')
        bad = g.bad_log_lines()
        check(not bad, 'guest log has errors:\n' + '\n'.join(bad))
        t1 = time.monotonic()
        status = g.poweroff()
        check(status == 0, f'QEMU exited {status} after poweroff')
        log(f'poweroff: QEMU exited 0 after {time.monotonic() - t1:.0f}s; '
            f'{time.monotonic() - t0:.0f}s in all')


def test_stock_and_purge(n):
    base = DEFAULT_BASE[n]
    check(base in state['bases'], f'the package carries no Linux {base} '
          'driver')
    check(state['images'].get(n), f'no Debian {n} image')
    k = kernel_of(n, base)
    dev = {'size': '4G', 'block_size': '2M'}
    t0 = time.monotonic()
    with boot(n, k, f'deb{n}-stock', STOCK_QEMU, dev) as g:
        log(f'Debian {n}, Linux {k} under stock QEMU: booted in '
            f'{time.monotonic() - t0:.0f}s')
        path, oot, _ = loaded_module(g)
        check('/updates/dkms/' in path and oot,
              f'virtio_mem is not the DKMS module ({path}, '
              f'{"" if oot else "not "}out of tree)')
        check('vmemmap-size' not in g.vm.cmd('query-memory-devices')[0]
              ['data'], 'stock QEMU reports vmemmap-size')
        for req in (1 * GiB, 0):
            st, _ = settle(g, req)
            v = guest_view(g)
            check(v['features'] is not None and v['features'][3] != '1',
                  'VIRTIO_MEM_F_VMEMMAP negotiated with stock QEMU')
            figs, _ = gain_figures(g, st)
            log(f'stock QEMU, DKMS module: requested {req // MiB} MiB: '
                f'{figs} (memmap {v["vmemmap_bytes"] // MiB if v["vmemmap_bytes"] else 0} MiB '
                'on the blocks, unreported)')

        t1 = time.monotonic()
        st, out = g.run('DEBIAN_FRONTEND=noninteractive apt-get purge -y '
                        'virtio-mem-vmemmap-dkms 2>&1', timeout=900)
        check(st == 0, f'apt-get purge failed ({st}):\n{out[-3000:]}')
        log(f'apt-get purge in the guest: {time.monotonic() - t1:.0f}s')
        st, out = g.run('modinfo -n virtio_mem; '
                        'ls /etc/default/grub.d/virtio-mem-vmemmap.cfg; '
                        'grep -c memmap_on_memory /boot/grub/grub.cfg')
        lines = out.split('\n')
        check(lines[0].startswith(f'/lib/modules/{k}/kernel/drivers/virtio/'),
              f'after purge modinfo -n virtio_mem is {lines[0]}')
        check('No such file' in out, 'the grub drop-in is still there')
        check(re.search(r'^0$', out, re.M),
              f'grub.cfg still has memmap_on_memory after purge:\n{out}')

        t1 = time.monotonic()
        g.reboot()
        log(f'rebooted in {time.monotonic() - t1:.0f}s')
        path, oot, _ = loaded_module(g)
        check(path.startswith(f'/lib/modules/{k}/kernel/drivers/virtio/') and
              not oot and not state['loaded_version'], f'after purge and reboot virtio_mem is {path} '
              f'(the loaded module {"is" if oot else "is not"} out of tree)')
        check(g.run('test -e /sys/module/virtio_mem/parameters/'
                    'memmap_on_memory')[0] != 0,
              'the loaded virtio_mem has the patched driver\'s parameter')
        log(f'stock module loaded: {path}')
        for req in (1 * GiB, 0):
            st, _ = settle(g, req, memmap=0)
            figs, gain = gain_figures(g, st)
            check(gain == st['size'], f'stock driver: {figs}')
            log(f'stock module: requested {req // MiB} MiB: {figs}')
        bad = g.bad_log_lines()
        check(not bad, 'guest log has errors:\n' + '\n'.join(bad))
        status = g.poweroff()
        check(status == 0, f'QEMU exited {status} after poweroff')
        log(f'poweroff: QEMU exited 0; {time.monotonic() - t0:.0f}s in all')


def main():
    t = Tests()
    t0 = time.monotonic()
    t.case('DKMS package: make dkms-deb, lintian silent', test_package)
    t.case('DKMS package: an unsupported kernel stops the build in one line',
           test_refusal)
    for n in (13, 12):
        t.case(f'Debian {n} image: debootstrap, apt install ./deb',
               lambda n=n: test_image(n))
    for n, base in PLAN:
        t.case(f'Debian {n}, Linux {base}, fork: DKMS module, feature, '
               '0 -> 4 GiB -> 1 GiB -> 0, poweroff',
               lambda n=n, base=base: test_fork(n, base))
    for n in (13, 12):
        t.case(f'Debian {n}, stock QEMU: stock device; purge, reboot onto '
               'the stock module', lambda n=n: test_stock_and_purge(n))
    log(f'real Debian guests: {time.monotonic() - t0:.0f}s')
    t.done()


if __name__ == '__main__':
    main()
