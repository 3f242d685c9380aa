#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""
The three ways vmem-limit with its documented defaults got a well-behaved
VM OOM-killed (issue 17), each on a real memory cgroup, with a 512 MiB
guest and an 8 GiB virtio-mem device:

1. a fresh guest, `follow --once`, then the guest writes 300 MiB into a
   tmpfs of its boot RAM;
2. stock QEMU: `resize vm0 1G`, then `follow --once` again (as after a
   restart of the service), then the guest writes 1000 MiB into a tmpfs;
3. `follow` runs; someone else grows the device to 512 MiB and shrinks it
   to 0, and 2 ms after follow has lowered the limit sets 8 GiB: the guest
   writes the new memory's memmap (128 MiB) before follow reacts.

Each passes when QEMU is alive, the cgroup counted no OOM kill and the
limit covers what the VM holds; each logs the limits before and after and
the oom_kill count.  Also: 3 again with no slack but the headroom (a
measured base, --margin 32M), where the charge must rise above what the
limit would be without it; and follow ending with exit 0 when QEMU is
shut down through QMP.  VMEM_LIMIT_TOOL=/path/to/an/older/vmem-limit runs
the same scenarios against that build (the previous tool fails all three).
"""

import contextlib
import os
import re
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'guest'))

# pylint: disable=wrong-import-position
from vmtest import (STOCK_QEMU, MiB, GiB, HarnessError, Tests,  # noqa: E402
                    check, log, poll, require_kit)
from test_vmem_limit import TOOL, Vm, finish  # noqa: E402

DEVICE = {'size': '8G', 'block_size': '2M', 'requested': 0,
          'vmemmap_accounting': True}
STOCK_DEVICE = {'size': '8G', 'block_size': '2M', 'requested': 0}


def mib(n):
    return 'unlimited' if n is None else f'{n / MiB:.1f} MiB'


def no_swap(vm):
    """On a host with swap the cgroup would swap instead of killing."""
    name = 'memory.swap.max' if vm.cg.version == 2 else 'memory.swappiness'
    with contextlib.suppress(OSError), \
            open(os.path.join(vm.cg.path, name), 'w') as f:
        f.write('0\n')


def write_tmpfs(vm, want_mib):
    """The guest writes up to want_mib MiB into a tmpfs (less if it has
    not that much available); returns the MiB written, None if QEMU died
    meanwhile."""
    avail = vm.g.meminfo()['MemAvailable'] // MiB
    n = min(want_mib, avail - 48)
    cmd = (f'mkdir -p /mnt/fill && mount -t tmpfs -o size={n + 16}m fill '
           f'/mnt/fill && dd if=/dev/zero of=/mnt/fill/f bs=1M count={n} '
           '2>&1 | tail -n 1')
    try:
        st, out = vm.g.run(cmd, timeout=300)
    except (HarnessError, OSError) as e:
        log(f'guest writing {n} MiB: {type(e).__name__}, QEMU running: '
            f'{vm.g.vm.is_running()}')
        return None
    log(f'guest wrote {n} MiB into a tmpfs (MemAvailable was {avail} MiB): '
        f'{out.strip()}')
    check(st == 0, f'dd in the guest failed: {out}')
    return n


def verdict(vm, what, **figures):
    """Log the figures and assert QEMU alive and no OOM kill.  A live
    QEMU's own memory (the charge less the guest RAM resident on the
    host) is logged too: what --overhead stands for."""
    alive = vm.g.vm.is_running()
    kills = vm.oom_kills()
    if alive:
        figures['QEMU outside guest RAM'] = mib(
            vm.g.charge() - sum(vm.g.ram_rss().values()))
    log(f'{what}: {TOOL}: ' + ', '.join(f'{k} {v}' for k, v in
                                        figures.items())
        + f', oom_kill {kills}, QEMU {"alive" if alive else "killed"}')
    check(alive and kills == 0, f'{what}: QEMU {"alive" if alive else "gone"}'
          f', oom_kill {kills}')


# --- 1 --------------------------------------------------------------------

def fresh_guest_writes_boot_ram(vm):
    no_swap(vm)
    charge = vm.g.charge()
    vm.tool('follow', '--once')
    limit = vm.limit()
    wrote = write_tmpfs(vm, 300)
    if wrote is None:
        poll(lambda: not vm.g.vm.is_running(), 30, 'QEMU to exit')
    verdict(vm, 'reproducer 1', **{'charge at start': mib(charge),
                                   'limit after follow --once': mib(limit),
                                   'wrote': f'{wrote} MiB',
                                   'peak': mib(vm.peak())})
    check(vm.limit() == limit, f'limit moved to {vm.limit()}')


# --- 2 --------------------------------------------------------------------

def restart_after_resize_stock_qemu(vm):
    no_swap(vm)
    vm.tool('resize', 'vm0', '1G')
    vm.g.wait_guest_at_rest()
    after_resize = vm.limit()
    vm.tool('follow', '--once')
    after_restart = vm.limit()
    wrote = write_tmpfs(vm, 1000)
    if wrote is None:
        poll(lambda: not vm.g.vm.is_running(), 30, 'QEMU to exit')
    verdict(vm, 'reproducer 2', **{'limit after resize 1G':
                                   mib(after_resize),
                                   'after a second follow --once':
                                   mib(after_restart),
                                   'wrote': f'{wrote} MiB',
                                   'peak': mib(vm.peak())})
    check(after_restart >= after_resize,
          f'the second run lowered the limit: {mib(after_resize)} -> '
          f'{mib(after_restart)}')


# --- 3 --------------------------------------------------------------------

def reset_peak(vm):
    """Start the cgroup's peak afresh; False where the kernel cannot."""
    name = 'memory.peak' if vm.cg.version == 2 else \
        'memory.max_usage_in_bytes'
    try:
        with open(os.path.join(vm.cg.path, name), 'w') as f:
            f.write('0\n')
        return True
    except OSError:
        return False


def grow_by_another_right_after_lowering(vm, *opts, what='reproducer 3'):
    """follow (with opts) runs; someone else grows to 512 MiB, shrinks to
    0 and, 2 ms after follow lowered the limit, sets 8 GiB.  Returns the
    limit and headroom follow lowered to and the peak charge after."""
    no_swap(vm)
    p = vm.popen(*opts, 'follow')
    lowered = lowered_at = headroom = peak = None
    try:
        poll(lambda: any('following' in l for l in p.out), 30,
             'follow to start')
        n = len(p.out)
        vm.g.resize(512 * MiB)
        poll(lambda: any('raised' in l for l in p.out[n:]), 10,
             'follow to raise after the grow to 512 MiB')
        n = len(p.out)
        vm.g.qom_set('requested-size', 0)

        def lowered_for_zero():
            # follow prints the devices it read, then what it did
            lines = p.out[n:]
            return any(a.startswith('device vm0: size 0.0 MiB') and
                       b.startswith('lowered')
                       for a, b in zip(lines, lines[1:]))
        poll(lowered_for_zero, 60, 'follow to lower the limit once the '
             'shrink to 0 settled', interval=0.001, backoff=False)
        lowered = vm.limit()
        reset = reset_peak(vm)
        # The scenario's own 2 ms, not a wait for anything.
        time.sleep(0.002)
        vm.g.qom_set('requested-size', 8 * GiB)
        lowered_at = time.monotonic()
        line = [l for l in p.out[n:] if l.startswith('lowered')][-1]
        m = re.search(r'headroom ([\d.]+) MiB', line)
        headroom = float(m.group(1)) * MiB if m else None

        def settled_or_dead():
            return not vm.g.vm.is_running() or \
                vm.g.qom_get('size') == 8 * GiB
        with contextlib.suppress(Exception):
            poll(settled_or_dead, 180, 'size 8 GiB or QEMU gone')
        peak = vm.peak() if reset else None
        if vm.g.vm.is_running():
            vm.g.wait_guest_at_rest(180)
            poll(lambda: vm.limit() >= vm.g.charge() and
                 vm.limit() > 8 * GiB, 10, 'follow to raise for 8 GiB')
    finally:
        p.terminate()
        finish(p, 10)
    for line in p.out:
        log(f'  | {line.rstrip()}')
    verdict(vm, what, **{'limit lowered to': mib(lowered),
                         'its headroom': 'none' if headroom is None
                         else mib(headroom),
                         'grown to 8 GiB; limit now':
                         mib(vm.limit() if vm.g.vm.is_running() else None),
                         'seconds after the grow':
                         f'{time.monotonic() - lowered_at:.1f}'
                         if lowered_at else '?',
                         'peak charge while it grew': mib(peak)})
    return lowered, headroom, peak


def headroom_alone(vm):
    """Reproducer 3 with no slack but the headroom and the margin's floor:
    the base as measured (--overhead 0; case 1 left the guest's boot RAM
    written full), --margin 32M.  The charge must rise above what the
    limit would have been without the headroom: the headroom is what held
    the memmap the guest wrote before follow raised."""
    vm.g.resize(0, timeout=300)
    # A state directory of its own: the base case 3 kept is not taken.
    state = os.path.join(vm.dir, 'headroom-alone')
    lowered, headroom, peak = grow_by_another_right_after_lowering(
        vm, '--overhead', '0', '--margin', '32M', '--state-dir', state,
        what='headroom alone')
    if peak is None:
        raise HarnessError('this kernel cannot reset the cgroup\'s peak: '
                           'the headroom\'s use cannot be shown')
    log(f'headroom alone: without it the limit would have been '
        f'{mib(lowered - headroom)}; the charge peaked at {mib(peak)}')
    check(peak > lowered - headroom,
          f'the charge ({mib(peak)}) stayed under the limit without '
          f'headroom ({mib(lowered - headroom)}): nothing shown')


def follow_ends_at_shutdown(vm):
    """QEMU asked to quit sends SHUTDOWN before it closes QMP: follow
    says the VM was shut down and exits 0, the limit left as it was."""
    p = vm.popen('follow')
    try:
        poll(lambda: any('following' in l for l in p.out), 30,
             'follow to start')
        limit = vm.limit()
        vm.g.vm.shutdown()
        rc = finish(p, 30)
    finally:
        if p.poll() is None:
            p.terminate()
            finish(p, 10)
    log(f'follow after QMP quit: exit {rc}: {p.out[-1].strip()}')
    check(rc == 0 and 'was shut down' in p.out[-1] and
          'stays at' in p.out[-1], f'exit {rc}: {p.out[-1:]} {p.err}')
    check(vm.limit() == limit, f'limit {vm.limit()} != {limit}')


def main():
    require_kit()
    if not os.access(TOOL, os.X_OK):
        raise HarnessError(f'{TOOL} missing: run scripts/build-tools')
    t = Tests()
    guest = [None]

    def fork_guest(name, fresh=False):
        """The fork's guest, booted again only when needed."""
        g = guest[0]
        if g and (fresh or not g.g.vm.is_running()):
            g.__exit__(None, None, None)
            g = None
        if not g:
            g = Vm(name, device=DEVICE).__enter__()
        guest[0] = g
        return g
    try:
        t.case('1: fresh guest, follow --once, the guest writes 300 MiB '
               'into its boot RAM: no OOM kill',
               lambda: fresh_guest_writes_boot_ram(
                   fork_guest('oom-r1', fresh=True)))
        t.case('3: follow; a grow to 8 GiB by another client 2 ms after '
               'follow lowered: no OOM kill',
               lambda: grow_by_another_right_after_lowering(
                   fork_guest('oom-r3')))
        t.case('3 with no slack but the headroom (measured base, margin '
               '32M): no OOM kill, the headroom used',
               lambda: headroom_alone(fork_guest('oom-r3')))
    finally:
        if guest[0]:
            guest[0].__exit__(None, None, None)

    # Stock QEMU cannot tell the guest's memmap apart: kept in boot RAM
    # (the harness's at-rest rule needs MemTotal = boot + size).
    with Vm('oom-r2', device=STOCK_DEVICE, qemu=STOCK_QEMU,
            memmap_on_memory=False) as vm:
        t.case('2: stock QEMU, resize 1G, follow --once again, the guest '
               'writes 1000 MiB: no OOM kill, limit not lowered',
               lambda: restart_after_resize_stock_qemu(vm))
        t.case('follow ends with exit 0 when QEMU is shut down (QMP quit)',
               lambda: follow_ends_at_shutdown(vm))
    t.done()


if __name__ == '__main__':
    main()
