#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""
Count what the guest asks of the device: every PLUG, UNPLUG and VMEMMAP
request the patched driver sends, read from the fork's own trace events
(virtio_mem_plug_request, virtio_mem_unplug_request,
virtio_mem_vmemmap_request; QEMU's log backend writes them to a file).

With memory_hotplug.memmap_on_memory=1, in SBM and in BBM:
- a shrink by k memory blocks unplugs exactly k blocks of device memory
  (memmap included) and plugs nothing back;
- a grow plugs exactly what was asked where that is whole blocks, and
  never more than was asked otherwise;
- every memory block the guest added is reported once.

And what mm does per block on the guest's side (function_graph, see
scenarios.onlining and docs/devel/cost.rst): the project's blocks pass
through set_zone_contiguous() twice on plug and twice on unplug, stock's
once each.  That walk is what makes the project's plug slower at scale; if
a guest kernel stops doing it twice, this case fails and the cost document
must be rewritten.  With guest/experiments/zone_walk_skip.c loaded (the
mm change that document proposes, checked against a real walk), every
walk of a plug and all but the first of an unplug return at once, their
outcome agrees with the walk's, and the guest still ends with exactly
what it asked for.

Stock beside it: Debian's QEMU and Debian's module (memmap in boot
memory) plug and unplug exactly what is asked, 2 MiB subblocks included,
and send no vmemmap request.

The cases run on the kit VMTEST_KERNEL names (default 6.12); test_kernels
runs the counts on 6.1 and 7.3 too.  On 6.1 BBM adds memory without
memmap_on_memory (the 6.1 series has no BBM patch): the same plugs and
unplugs, and no vmemmap request.  zone_walk_skip.ko does not build for
6.1 (its ftrace API), so that case is not run there (and not counted).
"""

import os

import vmtest
from scenarios import (ZONE_WALK_SKIP, device_has, guest_for, memtotal_after,
                       onlining, timed_resize, zone_walks)
from vmtest import GiB, MiB, Tests, TraceLog, check, log, poll

MB = 128 * MiB          # Linux memory block on x86-64
DEV_BLOCK = 2 * MiB     # the device's block size (scenarios.guest_for)

EVENTS = ('virtio_mem_plug_request', 'virtio_mem_unplug_request',
          'virtio_mem_unplug_all_request', 'virtio_mem_vmemmap_request')


def take(trace):
    """Requests traced since the last call: bytes plugged and unplugged
    (and in how many requests), unplug-all and vmemmap requests."""
    got = {'plug': 0, 'unplug': 0, 'unplug_all': 0, 'vmemmap': 0,
           'plug_reqs': 0, 'unplug_reqs': 0}
    for event, args in trace.take():
        kind = event[len('virtio_mem_'):-len('_request')]
        if kind in ('plug', 'unplug'):
            got[kind] += args['nb_blocks'] * DEV_BLOCK
            got[kind + '_reqs'] += 1
        else:
            got[kind] += 1
    return got


def settle(g, requested, size):
    """Ask for `requested`, wait for `size` plugged and the guest at rest."""
    g.qom_set('requested-size', requested)
    poll(lambda: g.qom_get('size') == size, 300,
         f'size == {size >> 20} MiB')
    g.wait_guest_at_rest()


def fmt(got):
    return (f'plugged {got["plug"] / MiB:g} MiB in {got["plug_reqs"]} '
            f'requests, unplugged {got["unplug"] / MiB:g} MiB in '
            f'{got["unplug_reqs"]} requests, {got["vmemmap"]} vmemmap '
            f'reports, {got["unplug_all"]} unplug-all')


def counts(bbm, arm='project'):
    """Walk one guest through grows and shrinks and check, per step, the
    requests it sent.  Returns a list of sentences for what was wrong."""
    mode = 'bbm' if bbm else 'sbm'
    trace = TraceLog(EVENTS)
    errs = []
    # Memory blocks the driver adds with their memmap on them, each
    # reported once: none for stock, none in BBM on 6.1.
    reports = arm == 'project' and not (bbm and
                                        vmtest.kernel_series() == '6.1')
    # requested, settled size, plug bytes expected (None: at most the
    # request), unplug bytes expected
    steps = [
        (1 * GiB, 1 * GiB, 1 * GiB, 0),
        (1 * GiB - MB, 1 * GiB - MB, 0, MB),               # k = 1
        (512 * MiB, 512 * MiB, 0, 3 * MB),                  # k = 3
        # 258 MiB more: two blocks, then 2 MiB that cannot hold a
        # block's memmap plus usable memory (SBM: -ENOSPC; BBM: not a
        # whole big block): never more than asked.
        (770 * MiB, 768 * MiB, None, 0),
        (640 * MiB, 640 * MiB, 0, MB),                      # k = 1
        (0, 0, 0, 640 * MiB),
    ]
    if arm == 'stock' and not bbm:
        # Stock's memmap is in boot memory: the 2 MiB plug exactly.
        steps[3:5] = [(770 * MiB, 770 * MiB, 258 * MiB, 0),
                      (640 * MiB, 640 * MiB, 0, MB + 2 * MiB)]
    try:
        with guest_for(arm, f'req-{mode}', '512M', '4G',
                       modparams={'force_bbm': 1} if bbm else None,
                       extra_args=trace.args()) as g:
            take(trace)
            prev = 0
            for req, size, plug, unplug in steps:
                settle(g, req, size)
                got = take(trace)
                what = f'{mode} {prev >> 20} -> {req >> 20} MiB'
                log(f'{what}: {fmt(got)}')
                if plug is None:
                    if got['plug'] > req - prev:
                        errs.append(f'{what}: plugged {got["plug"] / MiB:g} '
                                    f'MiB, asked for {(req - prev) / MiB:g}')
                elif got['plug'] != plug:
                    errs.append(f'{what}: plugged {got["plug"] / MiB:g} MiB, '
                                f'expected {plug / MiB:g}')
                if got['unplug'] != unplug:
                    errs.append(f'{what}: unplugged {got["unplug"] / MiB:g} '
                                f'MiB, expected {unplug / MiB:g}')
                if got['unplug_all']:
                    errs.append(f'{what}: {got["unplug_all"]} unplug-all')
                # Every grow here plugs whole blocks: one report each.
                plugged = got['plug'] if plug is None else plug
                want = plugged // MB if reports else 0
                if got['vmemmap'] != want:
                    errs.append(f'{what}: {got["vmemmap"]} vmemmap reports, '
                                f'expected {want}')
                prev = size
            bad = g.bad_log_lines()
            if bad:
                errs.append('guest log: ' + '; '.join(bad))
    finally:
        trace.remove()
    return errs


def test_mode(bbm, arm='project'):
    errs = counts(bbm, arm)
    check(not errs, '\n'.join(errs))


def test_zone_walks():
    n = 1 * GiB
    walks = {}
    for arm in ('stock', 'project'):
        r = onlining(arm, n=n, mem='1G', timeout=300)
        check(not r['log_errors'], f'{arm}: guest log: {r["log_errors"]}')
        walks[arm] = {op: r[op]['funcs'].get('set_zone_contiguous',
                                             {}).get('calls', 0)
                      for op in ('plug', 'unplug')}
        log(f'{arm}: set_zone_contiguous per {n >> 30} GiB: {walks[arm]}')
    blocks = n // MB
    want = {'stock': {'plug': blocks, 'unplug': blocks},
            'project': {'plug': 2 * blocks, 'unplug': 2 * blocks}}
    check(walks == want, f'zone walks {walks}, expected {want}')


def test_zone_walk_skip():
    n = 1 * GiB
    for arm, per_block in (('stock', 1), ('project', 2)):
        with guest_for(arm, 'zonewalk', '1G', f'{n >> 30}G',
                       append=ZONE_WALK_SKIP + ':verify=1') as g:
            w0 = zone_walks(g)
            check(w0 is not None, f'{arm}: zone_walk_skip not loaded')
            timed_resize(g, n, memtotal_after(arm, g, n), 300)
            w1 = zone_walks(g)
            timed_resize(g, 0, g.boot_total, 300)
            w2 = zone_walks(g)
            plug = {k: w1[k] - w0[k] for k in w0}
            unplug = {k: w2[k] - w1[k] for k in w0}
            log(f'{arm}: plug {plug}, unplug {unplug}')
            walks = per_block * n // MB
            check(plug == {'skipped': walks, 'kept': 0, 'walked': 0,
                           'disagreed': 0},
                  f'{arm}: plug {plug}: expected all {walks} walks skipped')
            # The first walk of the unplug finds the zone contiguous; each
            # later one removes a range at the zone's top.
            check(unplug['disagreed'] == 0 and unplug['kept'] >= walks - 1
                  and sum(unplug.values()) == walks,
                  f'{arm}: unplug {unplug}: expected {walks} walks, all but '
                  'the first kept, none disagreeing')
            bad = g.bad_log_lines()
            check(not bad, f'{arm}: guest log: {bad}')


def main():
    check(device_has('x-vmemmap-accounting'),
          'fork lacks x-vmemmap-accounting')
    t = Tests()
    t.case('SBM: shrink by k blocks unplugs k blocks, grow never overshoots',
           lambda: test_mode(False))
    t.case('BBM: shrink by k blocks unplugs k blocks, grow never overshoots',
           lambda: test_mode(True))
    t.case('stock, SBM: plugs and unplugs exactly what is asked, no '
           'vmemmap request', lambda: test_mode(False, 'stock'))
    t.case('mm walks the zone twice per block with memmap_on_memory, once '
           'without', test_zone_walks)
    if os.path.exists(os.path.join(vmtest.GUEST, 'zone_walk_skip.ko')):
        t.case('with the proposed mm change simulated, resizes skip the '
               'walks and agree with them', test_zone_walk_skip)
    else:
        print(f'# not run: zone_walk_skip.ko is not in the kit of Linux '
              f'{vmtest.kernel_series()} (it does not build there)',
              flush=True)
    t.done()


if __name__ == '__main__':
    main()
