#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""
The driver on each Debian kernel the project supports: Debian 12's 6.1
(bookworm-security), 6.12 (the default kit) and trixie-backports' 7.3,
each with its own kit (scripts/build-guest --kernel SERIES) and its own
port of the series (guest/linux/patches-<series>/).

Per kernel, two arms side by side (tests/guest/scenarios.py):
  stock    Debian's QEMU and Debian's virtio_mem, memmap_on_memory off;
  project  the fork (x-vmemmap-accounting=on), the patched module,
           memory_hotplug.memmap_on_memory=1.
Each runs 0 -> 4 GiB -> 1 GiB -> 0 in SBM (2 MiB device blocks,
ZONE_MOVABLE) and asserts at every settled step:
  - the guest runs that kernel and loaded that arm's module;
  - size == requested;
  - project: VIRTIO_MEM_F_VMEMMAP negotiated, vmemmap-size == 2 MiB per
    added 128 MiB memory block, MemTotal gain == size - vmemmap-size;
  - stock: no feature, nothing reported, MemTotal gain == size (the
    memmap comes from boot RAM);
  - a clean guest log.

On 6.1, where mm does not export whether memory_hotplug.memmap_on_memory
is on and refuses MHP_MEMMAP_ON_MEMORY for more than one memory block,
two more cases: with memory_hotplug.memmap_on_memory off, mm's -EINVAL on
the first add turns memmap_on_memory off (said once), nothing else
breaks and nothing is reported; in BBM (force_bbm=1) the driver never
asks for it.

Then, on 6.1 and 7.3, a subset of the driver's own end-to-end tests
(test_driver, test_requests, test_faults run in full on the default 6.12
kit), the same functions with the expectations each of them writes down
per kernel (what differs on 6.1 is asserted as the difference, see
test_driver's docstring).  The subset (SUBSET below) is what a port can
break, because they meet mm or the virtio core: the resize paths in SBM
and BBM, the unplug limit of SBM with memmap on memory, negotiation with
memmap_on_memory switched off (module parameter, kernel switch), where
mm put the memmap, the requests counted (stock's beside them), and a
reboot in the middle of an unplug and module reload.  On 6.1 also D1 in
SBM, whose fallback after a refused add is the 6.1 port's own code.
Left to the 6.12 run: the other fault-injection cases (D2-D6: the
driver's own error paths, the same code in the 6.12 and 7.3 series),
BUSY during a migration, a device reset followed by the stock driver and
the migrations of test_faults (QEMU's side of the protocol; on 7.3 a
guest migrated while it unplugs sometimes hits a kernel BUG that is
being investigated apart), HVO, 2 GiB memory blocks, 1 GiB pages and the
capacity of a small guest (up to minutes each; the capacity figures are
the benchmark's).  Each of those runs under VMTEST_KERNEL=6.1 or 7.3
with its per-kernel expectations.

VMTEST_KERNELS=6.1,7.3 limits the kernels (default: 6.1,6.12,7.3).
"""

import os

import test_driver
import test_faults
import test_requests
import vmtest
from scenarios import guest_for
from test_driver import BBM_OFF, REFUSED
from vmtest import QEMU, GiB, Guest, MiB, Tests, check, log

MB = 128 * MiB          # Linux memory block on x86-64 (512 MiB guests)
VMEMMAP = 2 * MiB       # memmap of one memory block
STEPS = (4 * GiB, 1 * GiB, 0)
KERNELS = [k for k in os.environ.get('VMTEST_KERNELS',
                                     '6.1,6.12,7.3').split(',') if k]



def loaded_module(g):
    """Which of the kit's two modules the guest loaded: the patched one
    has the memmap_on_memory parameter."""
    st, _ = g.run('[ -e /sys/module/virtio_mem/parameters/memmap_on_memory ]')
    return 'patched' if st == 0 else 'stock'


def cycle(kernel, arm):
    kit = vmtest.guest_kit_dir(kernel)
    release = open(os.path.join(kit, 'kernel-release')).read().strip()
    # The harness boots the kit that vmtest.GUEST names.
    vmtest.GUEST = kit
    project = arm == 'project'
    steps = []
    with guest_for(arm, f'kern-{kernel}', '512M', '4G') as g:
        uname = g.run('uname -r', check=True)[1].strip()
        check(uname == release, f'guest runs {uname}, not {release}')
        module = loaded_module(g)
        check(module == ('patched' if project else 'stock'),
              f'{arm} arm loaded the {module} module')
        neg = g.vmemmap_negotiated()
        check(neg == project,
              f'VIRTIO_MEM_F_VMEMMAP negotiated: {neg}, expected {project}')
        base = g.mem_total()
        for req in STEPS:
            secs = g.resize(req)
            size = g.qom_get('size')
            vmm = g.vmemmap_size()
            gain = g.mem_total() - base
            blocks = -(-size // MB)
            want_vmm = blocks * VMEMMAP if project else 0
            check(size == req, f'size {size >> 20} MiB != requested '
                  f'{req >> 20} MiB')
            check(vmm == want_vmm, f'vmemmap-size {vmm / MiB} MiB != '
                  f'{want_vmm / MiB} MiB ({blocks} blocks)')
            check(gain == size - vmm, f'MemTotal gain {gain / MiB} MiB != '
                  f'size - vmemmap-size {(size - vmm) / MiB} MiB')
            bad = g.bad_log_lines()
            check(not bad, 'guest log: ' + '\n'.join(bad))
            steps.append(f'{req >> 20} MiB: size {size >> 20} MiB, '
                         f'vmemmap-size {vmm >> 20} MiB, MemTotal '
                         f'+{gain >> 20} MiB, {secs:.1f} s')
    log(f'{release} {arm} ({module}): ' + '; '.join(steps))


def plain_resizes(g, steps):
    """Resize through steps with no memmap on added memory: size ==
    requested, vmemmap-size 0, MemTotal gain == size, clean log."""
    base = g.mem_total()
    for req in steps:
        g.resize(req)
        size = g.qom_get('size')
        gain = g.mem_total() - base
        check(size == req, f'size {size >> 20} MiB != {req >> 20} MiB')
        check(g.vmemmap_size() == 0,
              f'vmemmap-size {g.vmemmap_size()} with no memmap on memory')
        check(gain == size, f'MemTotal gain {gain >> 20} MiB != size')
        bad = g.bad_log_lines()
        check(not bad, 'guest log: ' + '\n'.join(bad))


def said_once(g, line):
    n = g.console().count(line)
    check(n == 1, f'guest log says "{line}" {n} times, not once')


def test_61_mm_refuses():
    vmtest.use_kernel('6.1')
    dev = {'size': '4G', 'block_size': '2M', 'requested': 0,
           'vmemmap_accounting': True}
    # memory_hotplug.memmap_on_memory not given: Debian's 6.1 has it off.
    with Guest('kern-6.1-mm-off', mem='512M', maxmem='80G', device=dev,
               module='patched', qemu=QEMU) as g:
        check(g.run('grep -q "^virtio_mem " /proc/modules')[0] == 0,
              'virtio_mem-patched.ko not loaded')
        plain_resizes(g, (1 * GiB, 256 * MiB, 0, 512 * MiB, 0))
        said_once(g, REFUSED)
        log('6.1, memory_hotplug.memmap_on_memory off: mm refused the '
            'first add, the driver went on without memmap on memory')


def test_61_bbm():
    vmtest.use_kernel('6.1')
    with guest_for('project', 'kern-6.1-bbm', '512M', '4G',
                   modparams={'force_bbm': 1}) as g:
        check(not g.vmemmap_negotiated(),
              'VIRTIO_MEM_F_VMEMMAP negotiated in BBM on 6.1')
        plain_resizes(g, (1 * GiB, 0))
        said_once(g, BBM_OFF)
        log('6.1 BBM: no memmap on memory, resizes exact')


# The cases of the driver's own tests run on 6.1 and 7.3 (see the
# docstring for the choice): (file, case name, function).
SUBSET = [
    ('driver', 'SBM, ZONE_MOVABLE: resizes and cycles to 0',
     test_driver.test_sbm_movable),
    ('driver', 'BBM, ZONE_MOVABLE: resizes and cycles to 0',
     test_driver.test_bbm_movable),
    ('driver', 'never unplugs beyond the request (-ENOSPC short, no '
     'retries)', test_driver.test_unplug_stops_short),
    ('driver', 'memmap_on_memory off: module parameter, kernel switch',
     test_driver.test_memmap_off),
    ('driver', 'memmap placement checked against mm, SBM and BBM',
     test_driver.test_mm_placement),
    ('requests', 'SBM: shrink by k blocks unplugs k blocks, grow never '
     'overshoots', lambda: test_requests.test_mode(False)),
    ('requests', 'BBM: shrink by k blocks unplugs k blocks, grow never '
     'overshoots', lambda: test_requests.test_mode(True)),
    ('requests', 'stock, SBM: plugs and unplugs exactly what is asked, no '
     'vmemmap request', lambda: test_requests.test_mode(False, 'stock')),
    ('faults', 'system_reset in the middle of an unplug',
     test_faults.test_reboot_mid_unplug),
    ('faults', 'guest module reload: after unplug, with memory plugged',
     test_faults.test_module_reload),
]
# Only on 6.1, whose port differs there.
SUBSET_61 = [
    ('driver', 'D1 (SBM): memmap misplaced by mm while adding: refused, '
     'removed, memmap_on_memory off',
     lambda: test_driver.misplaced_at_add(False)),
]


def on_kernel(k, fn):
    """Run fn with the guests booting kernel k's kit."""
    def run():
        kit = vmtest.GUEST
        vmtest.use_kernel(k)
        try:
            fn()
        finally:
            vmtest.GUEST = kit
    return run


def main():
    vmtest.require_kit()
    t = Tests()
    for k in KERNELS:
        for arm in ('stock', 'project'):
            t.case(f'Linux {k}, {arm}: 0 -> 4 GiB -> 1 GiB -> 0',
                   lambda k=k, arm=arm: cycle(k, arm))
    if '6.1' in KERNELS:
        t.case('Linux 6.1, memory_hotplug.memmap_on_memory off: mm\'s '
               '-EINVAL turns it off, nothing breaks', test_61_mm_refuses)
        t.case('Linux 6.1, BBM: never asks mm for memmap on memory',
               test_61_bbm)
    for k in KERNELS:
        if k == '6.12':
            continue        # the default kit: those files run in full
        for what, name, fn in SUBSET + (SUBSET_61 if k == '6.1' else []):
            t.case(f'Linux {k}, {what}: {name}', on_kernel(k, fn))
    t.done()


if __name__ == '__main__':
    main()
