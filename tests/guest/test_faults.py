#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""
Fault tests (issue 10): what a migration, a reset, a reboot, a module
reload or a failing host allocation does to the device's accounting.

Each step ends in vmtest.check_invariants: the device's own state is
consistent (size is the sum of the plugged runs, the vmemmap runs lie
inside them and add up to vmemmap-size) and the guest agrees (MemTotal
gain == size - memmap, the memory blocks it added cover what is plugged,
/proc/iomem, the patched driver's own memmap count, the marks at the
start of each added block).

  - live migration between two fork processes while the guest plugs and
    while it unplugs, with marks set: both sides identical afterwards,
    and the guest goes on (commands answer, a later resize settles);
  - system_reset in the middle of an unplug: the rebooted guest's fresh
    driver finds an empty device and plugs again;
  - reloading the guest module after unplug and with memory plugged;
  - a device reset followed by a driver that does not negotiate
    VIRTIO_MEM_F_VMEMMAP (the stock module): the marks are dropped,
    nothing else changes;
  - migration with marks, or with the feature negotiated and nothing
    marked, to a fork with x-vmemmap-accounting=off and to stock QEMU fails
    early (while loading the early section, before RAM) with a message
    naming the cause, and the source runs on unchanged; with a driver
    that did not negotiate the feature both succeed;
  - prealloc=on under a host memory cgroup limit: a plug the host cannot
    back gets BUSY, nothing is half plugged or half marked, QEMU lives.

Guests are small (256 MiB, a 1-2 GiB device) so that the whole file runs
in a few minutes under TCG.

The migration tests run one vCPU.  With two, a guest migrated while its
virtio-mem driver unplugs comes up on the destination with corrupted
timer lists now and then ("WARNING ... timerqueue_del", a general
protection fault on LIST_POISON, or no answer at all), and so does stock
QEMU 10.0 with Debian's own module: 2 of 6 stock runs here, against 0 of
12 with one vCPU and 0 of 6 for a two-vCPU guest migrated while busy
copying files without resizing.  That is QEMU's (multi-threaded TCG)
problem, not the accounting's, and it would only make these tests flaky.
"""

import json
import os
import re
import subprocess
import time

from vmtest import (QEMU, STOCK_QEMU, GiB, Guest, HarnessError, MiB, Tests,
                    check, check_invariants, device_state, guest_view,
                    incoming_for, log, migrate, poll, require_kit)

VMEMMAP = 2 * MiB       # memmap of one memory block
SETTLE = 90             # seconds a resize may take to settle under TCG
RESP_NACK, RESP_BUSY = '1', '2'     # virtio_mem_resp.type, as traced
SLOW_LINK = 32 * MiB    # bytes/s: a migration takes seconds, not ms
MIG_SMP = 1             # vCPUs of a guest that migrates (see above)


def device(accounting=True, size='2G', **kw):
    """A device dict for vmtest.Guest; accounting None: no property (the
    stock binary knows none)."""
    d = {'size': size, 'block_size': '2M', 'requested': 0}
    if accounting is not None:
        d['vmemmap_accounting'] = accounting
    d.update(kw)
    return d


def project(name, module='patched', dev=None, **kw):
    """The project's guest: fork, x-vmemmap-accounting=on, the patched
    module with memory_hotplug.memmap_on_memory=1."""
    return Guest(f'flt-{name}', mem='256M', maxmem='8G',
                 device=dev or device(), module=module,
                 memmap_on_memory=True, **kw)


def settle(g, size, timeout=SETTLE):
    g.resize(size, timeout=timeout)
    return check_invariants(g)


def clean_log(*guests):
    for g in guests:
        bad = g.bad_log_lines()
        check(not bad, f'{g.name} guest log: ' + '\n'.join(bad))


def same_state(a, b, what):
    """Device states of both sides of a migration: identical (only the
    keys both binaries report where one lacks x-query-virtio-mem-state)."""
    keys = [k for k in a if k in b and a[k] is not None and b[k] is not None]
    diff = {k: (a[k], b[k]) for k in keys if a[k] != b[k]}
    check(not diff, f'{what}: source and destination differ: {diff}')


def state_note(st):
    return (f'size {st["size"] >> 20} MiB, requested '
            f'{st["requested-size"] >> 20} MiB, vmemmap-size '
            f'{st["vmemmap-size"] / MiB:g} MiB')


# -- x-query-virtio-mem-state -------------------------------------------

def test_state_command():
    # Without it the invariant check cannot see the runs; make that a
    # failure of its own rather than a silently weaker check.
    qmp = subprocess.run(
        [QEMU, '-machine', 'none', '-nodefaults', '-display', 'none',
         '-qmp', 'stdio'],
        input='{"execute": "qmp_capabilities"}\n'
              '{"execute": "query-commands"}\n{"execute": "quit"}\n',
        capture_output=True, text=True, timeout=60, check=False).stdout
    names = set()
    for line in qmp.splitlines():
        with_return = json.loads(line).get('return')
        if isinstance(with_return, list):
            names |= {c['name'] for c in with_return}
    check('x-query-virtio-mem-state' in names,
          'the fork has no x-query-virtio-mem-state: the invariant check '
          'cannot compare plugged and vmemmap runs')


# -- live migration between two forks -------------------------------------

def migrate_mid_resize(name, start, target, after, wait_start=False):
    """Settle at `start`, ask for `target` and migrate over a slow link at
    once (or, wait_start, as soon as `size` moved), so that the guest's
    requests meet the migration; then compare both sides, resume the
    destination and resize to `after`."""
    with project(name, smp=MIG_SMP) as src:
        settle(src, start)
        with incoming_for(src, f'flt-{name}-dst') as dst:
            src.qom_set('requested-size', target)
            if wait_start:
                poll(lambda: src.qom_get('size') != start, 30,
                     'the resize to start', interval=0.005, backoff=False)
            res = migrate(src, dst, bandwidth=SLOW_LINK)
            log(f'{name}: migration {res["status"]} in {res["seconds"]:.1f}s'
                f', {res["transferred"] >> 20} MiB sent')
            check(res['status'] == 'completed' and
                  res['dst_status'] == 'completed',
                  f'migration failed: {res}')
            a, b = device_state(src), device_state(dst)
            log(f'{name}: at switchover {state_note(a)}')
            check(a['size'] != target,
                  'the resize was over before the migration began')
            same_state(a, b, name)
            check_invariants(dst, guest=False)
            dst.vm.cmd('cont')
            check(dst.run('echo alive', timeout=30)[1].strip() == 'alive',
                  'the guest does not answer after migration')
            # The driver may be waiting out a BUSY (its retry timer runs
            # for 50 s): a new request wakes it.
            settle(dst, after)
            settle(dst, 0)
            clean_log(src, dst)


def test_migrate_while_plugging():
    migrate_mid_resize('mig-plug', 256 * MiB, 1 * GiB, 640 * MiB)


def test_migrate_while_unplugging():
    migrate_mid_resize('mig-unplug', 1 * GiB, 128 * MiB, 384 * MiB,
                       wait_start=True)


# -- reboot in the middle of an unplug ------------------------------------

def test_reboot_mid_unplug():
    with project('reboot') as g:
        settle(g, 1 * GiB)
        g.qom_set('requested-size', 0)
        poll(lambda: g.qom_get('size') < 1 * GiB, 30, 'the unplug to start',
             interval=0.005, backoff=False)
        at = g.qom_get('size')
        g.vm.cmd('system_reset')
        g.vm.event_wait('RESET', timeout=30)
        log(f'reset with {at >> 20} MiB of 1024 still plugged')
        st = check_invariants(g, guest=False)
        check(st['size'] == 0 and st['vmemmap-size'] == 0,
              f'after system_reset: {state_note(st)}')
        g.wait_ready(120, 'guest reboot')
        check(g.run('grep -q "^virtio_mem " /proc/modules')[0] == 0,
              'no virtio_mem driver after the reboot')
        check_invariants(g)
        settle(g, 512 * MiB)
        settle(g, 0)
        clean_log(g)


# -- reloading the guest module -------------------------------------------

def rmmod(g):
    st, out = g.run('rmmod virtio_mem', timeout=120)
    log(f'rmmod virtio_mem: status {st} {out.strip()}')
    return st


def insmod(g, which):
    st, out = g.run(f'insmod /lib/vmtest/virtio_mem-{which}.ko', timeout=120)
    log(f'insmod virtio_mem-{which}.ko: status {st} {out.strip()}')
    return st


def driver_lines(g, since):
    return [l for l in g.console()[since:].splitlines() if 'virtio_mem' in l]


def test_module_reload():
    with project('reload') as g:
        settle(g, 384 * MiB)
        settle(g, 0)
        check(rmmod(g) == 0, 'rmmod of an empty device failed')
        check_invariants(g)
        check(insmod(g, 'patched') == 0, 'insmod failed')
        st = settle(g, 384 * MiB)
        check(st['vmemmap-size'] == 3 * VMEMMAP,
              f'the reloaded driver reported {st["vmemmap-size"]} bytes')
        # With memory plugged the driver cannot give it back to the
        # device; it goes and leaves the memory (and its memmap) to the
        # kernel.  The device must keep what it knows.
        before = device_state(g)
        mark = len(g.console())
        st_rm = rmmod(g)
        after = check_invariants(g)
        same_state(before, after, 'rmmod with memory plugged')
        if st_rm == 0:
            # A new instance of the same driver negotiates the feature
            # again: the marks stay valid, and nothing may be unplugged
            # under the memory the kernel still uses.  insmod returns
            # after the probe; a driver that failed it does nothing more.
            insmod(g, 'patched')
            bound = guest_view(g)['driver'] is not None
            log(f'the new driver instance is {"" if bound else "not "}bound')
            same_state(after, check_invariants(g), 'insmod with memory left')
        for line in driver_lines(g, mark):
            log(f'guest: {line.strip()}')
        clean_log(g)


# -- device reset, then a driver without the feature ----------------------

def test_reset_then_stock_driver():
    with project('stock-driver') as g:
        before = settle(g, 384 * MiB)
        check(before['vmemmap-size'] == 3 * VMEMMAP,
              f'patched driver reported {before["vmemmap-size"]} bytes')
        total = g.mem_total()
        mark = len(g.console())
        check(rmmod(g) == 0, 'rmmod failed')
        # The device reset by the removal keeps plugged memory and marks;
        # the stock driver's feature negotiation must drop the marks.
        insmod(g, 'stock')
        for line in driver_lines(g, mark):
            log(f'guest: {line.strip()}')
        last = [None]

        def marks_gone():
            last[0] = device_state(g)
            return last[0]['vmemmap-size'] == 0
        try:
            poll(marks_gone, 10, 'the marks to go')
        except HarnessError:
            check(False, 'a driver without VIRTIO_MEM_F_VMEMMAP, yet '
                  f'{state_note(last[0])}')
        st = check_invariants(g, guest=False)
        check(st['requested-size'] == before['requested-size'],
              'requested-size changed')
        if st['size']:
            # The stock driver could not take over (the old instance
            # left its memory to the kernel): nothing else may change.
            check(st.get('plugged') == before.get('plugged') and
                  st['size'] == before['size'],
                  f'plugged memory changed: {state_note(st)}')
            check(g.mem_total() == total, 'guest MemTotal changed')
            log(f'stock driver: marks dropped, {st["size"] >> 20} MiB stay '
                'plugged for the memory the old driver left behind')
        else:
            log('stock driver took over: unplugged all, marks dropped')
        # A reboot brings the patched driver back on an empty device.
        g.vm.cmd('system_reset')
        g.vm.event_wait('RESET', timeout=30)
        st = check_invariants(g, guest=False)
        check(st['size'] == 0 and st['vmemmap-size'] == 0,
              f'after system_reset: {state_note(st)}')
        g.wait_ready(120, 'guest reboot')
        check_invariants(g)
        st = settle(g, 256 * MiB)
        check(st['vmemmap-size'] == 2 * VMEMMAP,
              f'after reboot: {state_note(st)}')
        clean_log(g)


# -- migration to a destination without the feature -----------------------

def early_failure(res, dst, why):
    """Check a migration that must fail failed while the destination
    loaded the early section, before any RAM, with `why` in its words."""
    said = ' '.join(filter(None, (res['dst_error'], res['error'],
                                  dst.qemu_log())))
    log(f'{why}: source {res["status"]} after {res["seconds"]:.2f}s, '
        f'{res["transferred"] >> 20} MiB sent; destination '
        f'{res["dst_status"]}: {res["dst_error"]}')
    for line in dst.qemu_log().splitlines():
        log(f'  destination: {line}')
    check(res['status'] == 'failed',
          f'migration with marks to {why}: source says {res["status"]}')
    check(res['dst_status'] in ('failed', 'exited'),
          f'destination ({why}) says {res["dst_status"]}')
    return said


def migrate_to_no_feature(name, vmemmap, plugged=256 * MiB, **kw):
    """A guest whose driver negotiated the feature (and marked `vmemmap`
    bytes with `plugged` bytes plugged) cannot move to a device without
    it."""
    with project(name, smp=MIG_SMP, **kw) as src:
        st0 = settle(src, plugged)
        check(st0['vmemmap-size'] == vmemmap, state_note(st0))
        for label, qemu, dev, words in (
                ('x-vmemmap-accounting=off', QEMU, device(False),
                 ('x-vmemmap-accounting',)),
                ('stock QEMU', STOCK_QEMU, device(None),
                 ('virtio-mem-device-early',))):
            with incoming_for(src, f'flt-{name}-{label.split()[0]}',
                              qemu=qemu, device=dev) as dst:
                res = migrate(src, dst, bandwidth=SLOW_LINK)
                said = early_failure(res, dst, label)
            check(res['transferred'] < 16 * MiB,
                  f'{label}: failed after {res["transferred"] >> 20} MiB of '
                  'RAM, not early')
            missing = [w for w in words if w not in said]
            check(not missing, f'{label}: the error does not name {missing}')
            check(src.vm.cmd('query-status')['status'] == 'running',
                  'the source stopped after the failed migration')
            same_state(st0, check_invariants(src), f'source after {label}')
        settle(src, 512 * MiB)
        clean_log(src)


def test_migrate_marks_to_no_feature():
    migrate_to_no_feature('mig-off', 2 * VMEMMAP)


def test_migrate_negotiated_to_no_feature():
    # Nothing plugged yet: the driver negotiated the feature but has not
    # marked anything.  The destination could not honour the feature all
    # the same, and must say so before RAM, not when the device section
    # arrives at the end.  (A driver with memmap_on_memory off does not
    # negotiate the feature at all: test_driver checks that.)
    migrate_to_no_feature('mig-nomarks', 0, plugged=0)


def test_migrate_unused_feature():
    # The stock module never negotiates the feature: no marks, so the
    # fork with the property off and stock QEMU take the guest as is.
    with project('mig-unused', module='stock', smp=MIG_SMP) as src:
        st0 = settle(src, 256 * MiB)
        check(st0['vmemmap-size'] == 0, state_note(st0))
        with incoming_for(src, 'flt-mig-unused-off',
                          device=device(False)) as off:
            res = migrate(src, off)
            check(res['status'] == res['dst_status'] == 'completed',
                  f'to x-vmemmap-accounting=off: {res}')
            same_state(device_state(src), device_state(off), 'to off')
            off.vm.cmd('cont')
            settle(off, 384 * MiB)
            with incoming_for(off, 'flt-mig-unused-stock', qemu=STOCK_QEMU,
                              device=device(None)) as stock:
                res = migrate(off, stock)
                check(res['status'] == res['dst_status'] == 'completed',
                      f'to stock QEMU: {res}')
                same_state(device_state(off), device_state(stock),
                           'to stock')
                stock.vm.cmd('cont')
                settle(stock, 128 * MiB)
                clean_log(src, off, stock)


# -- prealloc under a host memory limit -----------------------------------

def test_prealloc_limit():
    # Boot RAM preallocated too, so that only the device's plugs move the
    # charge once the limit is set.
    boot = ['-object', 'memory-backend-ram,id=boot,size=256M,prealloc=on',
            '-machine', 'memory-backend=boot']
    with project('prealloc', dev=device(size='1G', prealloc='on'),
                 extra_args=boot) as g:
        settle(g, 128 * MiB)
        # Nothing in the cgroup may be killed: a charge that cannot be
        # met must fail the allocation (QEMU's preallocation), not kill.
        g.cg.no_oom_kill(g.vm.get_pid())
        # QEMU's own warning about the failed preallocation is written
        # while the cgroup is at its limit, and its log file's page cache
        # is charged there too: the write fails.  The response, traced
        # after the rollback, is what shows.
        g.vm.cmd('trace-event-set-state', name='virtio_mem_send_response',
                 enable=True)
        mark = len(g.qemu_log())
        # Room for one more memory block (128 MiB) but not two.
        limit = g.charge() + 192 * MiB
        g.cg.set_limit(limit)
        try:
            g.qom_set('requested-size', 640 * MiB)
            seen = [g.qom_get('size'), time.monotonic()]

            def stalled():
                cur = g.qom_get('size')
                if cur != seen[0]:
                    seen[:] = [cur, time.monotonic()]
                return time.monotonic() - seen[1] > 5
            poll(stalled, 120, 'the plug to stop', interval=0.2)
            check(g.vm.is_running(), 'QEMU died under the limit')
            st = check_invariants(g)
            log(f'under a limit of charge + 192 MiB: {state_note(st)}; '
                f'charge {g.charge() >> 20} MiB of {limit >> 20} MiB')
            check(st['size'] < 640 * MiB,
                  'the plug went through: the limit did not bite')
            check(st['size'] > 128 * MiB,
                  'nothing plugged under the limit: the margin is too small')
            answers = re.findall(r'virtio_mem_send_response type=(\d+)',
                                 g.qemu_log()[mark:])
            log(f'responses under the limit: {answers}')
            check(set(answers) & {RESP_NACK, RESP_BUSY},
                  'the guest got no NACK or BUSY under the limit')
        finally:
            g.cg.set_limit(None)
        # Room again: a new request completes.
        settle(g, 512 * MiB)
        settle(g, 0)
        check(g.vm.is_running(), 'QEMU died')
        clean_log(g)


def main():
    require_kit()
    t = Tests()
    t.case('x-query-virtio-mem-state dumps the device state',
           test_state_command)
    t.case('live migration while the guest plugs', test_migrate_while_plugging)
    t.case('live migration while the guest unplugs',
           test_migrate_while_unplugging)
    t.case('system_reset in the middle of an unplug', test_reboot_mid_unplug)
    t.case('guest module reload: after unplug, with memory plugged',
           test_module_reload)
    t.case('device reset, then a driver without the feature',
           test_reset_then_stock_driver)
    t.case('migration with marks to x-vmemmap-accounting=off and to stock '
           'QEMU fails early', test_migrate_marks_to_no_feature)
    t.case('migration with the feature negotiated, nothing marked, to '
           'x-vmemmap-accounting=off and stock QEMU fails early',
           test_migrate_negotiated_to_no_feature)
    t.case('migration without marks to x-vmemmap-accounting=off and stock '
           'QEMU', test_migrate_unused_feature)
    t.case('prealloc=on under a host memory limit: BUSY, nothing half done',
           test_prealloc_limit)
    t.done()


if __name__ == '__main__':
    os.environ.setdefault('PYTHONUNBUFFERED', '1')
    main()
