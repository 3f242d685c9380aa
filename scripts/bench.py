#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""
Benchmark: every scenario of tests/guest/scenarios.py, stock and project
arms, in one run on the same QEMU build.  Writes build/bench/results.json,
build/bench/results.md and PNG plots.

Usage: scripts/bench.py [--quick] [--only usable,footprint,speed,capacity,...]
(--help lists the scenarios and what each one runs.)  With --only, the
scenarios of an earlier results.json that this run does not repeat are
kept beside the new ones (each with the time it started).
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests',
                                'guest'))
# pylint: disable=wrong-import-position
import scenarios as sc  # noqa: E402
from vmtest import BUILD, GiB, MiB, log  # noqa: E402

ALL = ('usable', 'footprint', 'speed', 'capacity', 'scaling', 'onlining',
       'zonewalk', 'margin', 'kernels')
# Scenarios that run both arms together.
JOINT = ('speed', 'scaling', 'zonewalk', 'kernels')

# Sizes and repetitions, full run and --quick.  Measured under TCG on 2
# cores (shared): one round at 64 GiB, plug and unplug in both arms, took
# 4.3 minutes (unplug about 105 s per arm) and time grows faster than the
# size, so 256 GiB (one round, both arms, measured 2026-11-25: 28 minutes,
# plug 166 / 302 s and unplug 508 / 695 s, stock / project) is only
# run with --big.  A margin run at 64 GiB takes about 2.5 minutes, so the
# 64 GiB margin gets one trial beside its run without a limit.
SCALING = {False: {'sizes': (4, 16, 64), 'mem': '6G',
                   'reps': {4: 3, 16: 2, 64: 1, 256: 1}},
           True: {'sizes': (1, 4), 'mem': '2G', 'reps': {1: 2, 4: 2}}}
# scaling on each Debian kernel the driver supports (6.1: Debian 12,
# 6.12: Debian 13, 7.3: trixie-backports), each in its own kit
# (scripts/build-guest --kernel SERIES): the same 6 GiB guest with the
# same 64 GiB device on all three (6 GiB of boot RAM gives x86's 128 MiB
# memory blocks, as in scaling), 4 and 16 GiB on each, 64 GiB on 7.3
# only (one round of it costs minutes under TCG).  The full run took
# 20.4 minutes on 2026-12-02 (TCG, 2 shared cores, load 6-9).
KERNELS = {False: {'plan': {'6.1': (4, 16), '6.12': (4, 16),
                            '7.3': (4, 16, 64)},
                   'mem': '6G', 'reps': {4: 3, 16: 3, 64: 2}},
           True: {'plan': {'6.1': (1,), '6.12': (1,), '7.3': (1, 4)},
                  'mem': '2G', 'reps': {1: 2, 4: 1}}}
MARGIN = {False: {'sizes': (4, 64), 'touch': 4, 'mem': '2G',
                  'trials': {4: 3, 64: 1}},
          True: {'sizes': (1,), 'touch': 1, 'mem': '1G', 'trials': {1: 2}}}


def capped(reps, rounds):
    """reps ({GiB: rounds}) in bytes, at most `rounds` each (None: as is)."""
    return {k * GiB: min(v, rounds or v) for k, v in reps.items()}


def run(args, save=None):
    """Run args.only; save(results so far), if given, is called when a
    long scenario has measured a part."""
    quick = args.quick
    plan = {
        'usable': lambda arm: sc.usable(arm, n=1 * GiB),
        'footprint': lambda arm: sc.footprint(arm, n=(1 if quick else 4) * GiB,
                                              cycles=2 if quick else 3),
        # Both arms at once: see scenarios.speed().
        'speed': lambda: sc.speed(n=(1 if quick else 4) * GiB,
                                  reps=3 if quick else 9),
        'capacity': lambda arm: sc.capacity(arm, want=(16 if quick else 64) * GiB),
        'scaling': lambda: sc.scaling(
            sizes=[x * GiB for x in SCALING[quick]['sizes']
                   + ((256,) if args.big else ())],
            reps=capped(SCALING[quick]['reps'], args.rounds),
            mem=SCALING[quick]['mem']),
        # scaling on each kernel, the kernel a parameter of the same code.
        'kernels': lambda: sc.kernels(
            {k: [x * GiB for x in v]
             for k, v in KERNELS[quick]['plan'].items()},
            reps=capped(KERNELS[quick]['reps'], args.rounds),
            mem=KERNELS[quick]['mem'],
            done=lambda series, part: save and save(dict(
                results, kernels=dict(part, partial=True)))),
        # scaling, one round per size, with mm's zone walk changed as
        # docs/devel/cost.rst proposes (guest/experiments/zone_walk_skip.c,
        # in both arms).
        'zonewalk': lambda: sc.scaling(
            sizes=[x * GiB for x in SCALING[quick]['sizes']],
            reps={k * GiB: 1 for k in SCALING[quick]['sizes']},
            mem=SCALING[quick]['mem'], append=sc.ZONE_WALK_SKIP),
        # One traced plug and unplug per arm: where the guest's time goes
        # (docs/devel/cost.rst).
        'onlining': lambda arm: sc.onlining(arm, n=(2 if quick else 16) * GiB),
        'margin': lambda arm: {
            str(n * GiB): sc.margin(arm, n * GiB,
                                    touch=MARGIN[quick]['touch'] * GiB,
                                    mem=MARGIN[quick]['mem'],
                                    trials=MARGIN[quick]['trials'][n])
            for n in MARGIN[quick]['sizes']},
    }
    results = {'started': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
               'quick': quick, 'kernel': open(f'{BUILD}/guest/kernel-release').read().strip()}
    for name in args.only:
        t0 = time.monotonic()
        t_start = time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())
        if name in JOINT:
            log(f'== {name}: {", ".join(sc.ARMS)} side by side')
            results[name] = plan[name]()
            results.setdefault('seconds', {})[name] = time.monotonic() - t0
            results.setdefault('scenario_started', {})[name] = t_start
            continue
        results[name] = {}
        for arm in sc.ARMS:
            log(f'== {name}: {arm}')
            results[name][arm] = plan[name](arm)
        results.setdefault('seconds', {})[name] = time.monotonic() - t0
        results.setdefault('scenario_started', {})[name] = t_start
    return results


def merge(old, new):
    """new, with the scenarios of old (an earlier results.json) that new
    did not run."""
    out = dict(new)
    for name in ALL:
        if name in old and name not in new:
            out[name] = old[name]
            for key in ('seconds', 'scenario_started'):
                if name in old.get(key, {}):
                    out.setdefault(key, {})[name] = old[key][name]
            out.setdefault('scenario_started', {}).setdefault(
                name, old.get('started'))
    return out


def mib(x):
    return f'{x / MiB:.1f}'


def ratio(a, b):
    if a is None or b is None:
        return 'n/a'
    return f'{a / b:.3f}' if b else 'n/a'


def table(res):
    lines = ['| metric | stock | project | project / stock |',
             '| --- | ---: | ---: | ---: |']

    def row(name, s, p, fmt=mib, rat=True):
        lines.append(f'| {name} | {fmt(s)} | {fmt(p)} | '
                     f'{ratio(p, s) if rat else ""} |')

    if 'capacity' in res:
        s, p = res['capacity']['stock'], res['capacity']['project']
        row(f'capacity: MiB plugged of {s["requested"] >> 20} (128 MiB guest, movable)',
            s['size'], p['size'])
        row('capacity: allocation failures logged', s['alloc_failures'],
            p['alloc_failures'], fmt=str, rat=False)
    if 'usable' in res:
        s, p = res['usable']['stock'], res['usable']['project']
        row('usable: size (MiB)', s['size'], p['size'])
        row('usable: vmemmap-size (MiB)', s['vmemmap_size'], p['vmemmap_size'], rat=False)
        row('usable: MemTotal gain (MiB)', s['memtotal_gain'], p['memtotal_gain'])
        row('usable: size - vmemmap - MemTotal gain (MiB)',
            s['size'] - s['vmemmap_size'] - s['memtotal_gain'],
            p['size'] - p['vmemmap_size'] - p['memtotal_gain'], rat=False)
    if 'footprint' in res:
        s, p = res['footprint']['stock'], res['footprint']['project']
        n = s['n']

        def worst(r, step, key):
            v = [x[key] for x in r['samples'] if x['step'] == step]
            return max(v, key=abs) if v else 0

        for step in ('plug', 'touch', 'unplug'):
            row(f'footprint {n >> 30} GiB: worst charge drift after {step} '
                '(MiB)', worst(s, step, 'drift'), worst(p, step, 'drift'),
                rat=False)
        for step in ('plug', 'touch', 'unplug'):
            row(f'footprint: worst boot RAM growth after {step} (MiB)',
                worst(s, step, 'boot_ram'), worst(p, step, 'boot_ram'),
                rat=False)
        row(f'footprint: worst guest memory drift after unplug (MiB), bound '
            f'{mib(sc.bound(n))}', worst(s, 'unplug', 'guest_drift'),
            worst(p, 'unplug', 'guest_drift'), rat=False)
        row('footprint: worst QEMU own-memory growth (MiB)',
            max((x['vmm'] for x in s['samples']), key=abs),
            max((x['vmm'] for x in p['samples']), key=abs), rat=False)
    if 'speed' in res:
        s, p = res['speed']['stock'], res['speed']['project']
        for op in ('plug', 'unplug'):
            row(f'speed: {op} {s["n"] >> 30} GiB, median s '
                f'({len(s[op + "_s"])} rounds)', s[op + '_median'],
                p[op + '_median'], fmt=lambda x: f'{x:.3f}')
            row(f'speed: {op}, min - max s', s[op + '_s'], p[op + '_s'],
                fmt=lambda v: f'{min(v):.3f} - {max(v):.3f}', rat=False)
    for name in ('scaling', 'zonewalk'):
        if name not in res:
            continue
        sca = res[name]
        for op in ('plug', 'unplug'):
            for n in sca['sizes']:
                s, p = sca['stock'][str(n)], sca['project'][str(n)]
                row(f'{name} ({sca["mem"]} guest): {op} {n >> 30} GiB, median'
                    f' of {len(s[op + "_s"])} (s)', s[op + '_median'],
                    p[op + '_median'], fmt=lambda x: f'{x:.2f}')
        if name == 'zonewalk':
            for k, what in (('skipped', 'skipped, after a move into the zone'),
                            ('kept', 'skipped, contiguous zone shrunk at an end'),
                            ('walked', 'walked')):
                row(f'zonewalk: set_zone_contiguous calls {what}',
                    (sca['stock']['zone_walks'] or {}).get(k),
                    (sca['project']['zone_walks'] or {}).get(k),
                    fmt=str, rat=False)
    if 'kernels' in res:
        ker = res['kernels']
        for series, sca in ker['kernels'].items():
            for n in sca['sizes']:
                for op in ('plug', 'unplug'):
                    s, p = sca['stock'][str(n)], sca['project'][str(n)]
                    row(f'kernels: Linux {series} ({sca["kernel"]}, '
                        f'{sca["mem"]} guest): {op} {n >> 30} GiB, median '
                        f'of {len(s[op + "_s"])} (s)', s[op + '_median'],
                        p[op + '_median'], fmt=lambda x: f'{x:.2f}')
    if 'onlining' in res:
        s, p = res['onlining']['stock'], res['onlining']['project']
        size = f'{s["n"] >> 30} GiB ({s["blocks"]} blocks, {s["mem"]} guest)'
        for op in ('plug', 'unplug'):
            fs, fp = s[op]['funcs'], p[op]['funcs']
            row(f'onlining {size}: {op}, traced wall time (s)',
                s[op]['seconds'], p[op]['seconds'], fmt=lambda x: f'{x:.2f}')
            z = lambda f, k: f.get('set_zone_contiguous', {}).get(k, 0)
            row(f'onlining: {op}, set_zone_contiguous calls',
                z(fs, 'calls'), z(fp, 'calls'), fmt=str)
            row(f'onlining: {op}, set_zone_contiguous total (ms)',
                z(fs, 'total_ms'), z(fp, 'total_ms'), fmt=lambda x: f'{x:.0f}')
            row(f'onlining: {op}, set_zone_contiguous per call, last quarter '
                '(ms)', z(fs, 'last_q_ms'), z(fp, 'last_q_ms'),
                fmt=lambda x: f'{x:.2f}')
            others = sorted(set(fs) | set(fp), key=lambda f: -max(
                fs.get(f, {}).get('total_ms', 0), fp.get(f, {}).get('total_ms', 0)))
            for f in [x for x in others if x != 'set_zone_contiguous'][:4]:
                row(f'onlining: {op}, {f} total (ms)',
                    fs.get(f, {}).get('total_ms', 0),
                    fp.get(f, {}).get('total_ms', 0), fmt=lambda x: f'{x:.0f}')
    if 'margin' in res:
        for n in res['margin']['stock']:
            s, p = res['margin']['stock'][n], res['margin']['project'][n]
            size = f'{int(n) >> 30} GiB'
            row(f'margin {size}: smallest that survived (MiB)',
                s['margin'], p['margin'], fmt=opt_mib)
            row(f'margin {size}: largest that failed (MiB)', s['failed_at'],
                p['failed_at'], fmt=opt_mib, rat=False)
            row(f'margin {size}: peak over base + size without a limit '
                '(MiB)', s['needed_unlimited'], p['needed_unlimited'])
            row(f'margin {size}: runs (1 without a limit + trials)',
                1 + len(s['trials']), 1 + len(p['trials']), fmt=str,
                rat=False)
    return '\n'.join(lines) + '\n'


def opt_mib(x):
    return 'none' if x is None else mib(x)


def plots(res, outdir):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    import matplotlib.ticker  # noqa: F401 (used as matplotlib.ticker)
    files = []

    def save(fig, name):
        fig.tight_layout()
        files.append(os.path.join(outdir, name))
        fig.savefig(files[-1], dpi=100)
        plt.close(fig)

    if 'footprint' in res:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for arm, style in (('stock', 'r'), ('project', 'g')):
            smp = res['footprint'][arm]['samples']
            t = [x['t'] for x in smp]
            ax.plot(t, [x['charge'] / MiB for x in smp], style + 'o-',
                    label=f'{arm}: cgroup charge - baseline')
            ax.plot(t, [x['size'] / MiB for x in smp], style + '--',
                    alpha=0.5, label=f'{arm}: size (plugged)')
        ax.set_xlabel('seconds')
        ax.set_ylabel('MiB')
        ax.set_title('host charge vs plugged size (plug, touch, unplug cycles)')
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, 'footprint.png')
        # After a plug nothing is touched yet: drift is minus the plugged
        # size there, so those steps are left out; the rest is on one
        # MiB scale.
        fig, ax = plt.subplots(figsize=(8, 4.5))
        b = sc.bound(res['footprint']['stock']['n']) / MiB
        ax.axhspan(-b, b, color='g', alpha=0.12,
                   label=f'target bound: +/- {b:.1f} MiB')
        ax.axhline(0, color='k', lw=0.8)
        for arm, style in (('stock', 'r'), ('project', 'g')):
            smp = [x for x in res['footprint'][arm]['samples']
                   if x['step'] != 'plug']
            ax.plot(range(len(smp)), [x['drift'] / MiB for x in smp],
                    style + 'o-', label=f'{arm}: charge - (baseline + size)')
            ax.plot(range(len(smp)), [x['boot_ram'] / MiB for x in smp],
                    style + 's:', label=f'{arm}: boot RAM growth')
        ax.set_xticks(range(len(smp)))
        ax.set_xticklabels([f'cycle {x["cycle"]}\n{x["step"]}' for x in smp],
                           fontsize=8)
        ax.set_xlabel('step (after each plug the drift is -size: not shown)')
        ax.set_ylabel('MiB over baseline')
        ax.set_title(f'host charge drift, {res["footprint"]["stock"]["n"] >> 30}'
                     ' GiB plug / touch / unplug cycles')
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=8)
        save(fig, 'drift.png')
    if 'onlining' in res:
        on = res['onlining']
        fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
        for ax, op in zip(axes, ('plug', 'unplug')):
            fs, fp = on['stock'][op]['funcs'], on['project'][op]['funcs']
            names = sorted(set(fs) | set(fp), key=lambda f: -max(
                fs.get(f, {}).get('total_ms', 0),
                fp.get(f, {}).get('total_ms', 0)))[:6]
            y = range(len(names))
            for arm, f, color, off in (('stock', fs, 'r', -0.2),
                                       ('project', fp, 'g', 0.2)):
                v = [f.get(x, {}).get('total_ms', 0) / 1e3 for x in names]
                c = [f.get(x, {}).get('calls', 0) for x in names]
                ax.barh([i + off for i in y], v, height=0.4, color=color,
                        label=f'{arm} ({on[arm][op]["seconds"]:.1f} s traced)')
                for i, (vv, cc) in enumerate(zip(v, c)):
                    ax.text(vv, i + off, f' {cc} calls', va='center',
                            fontsize=7)
            ax.set_yticks(list(y))
            ax.set_yticklabels(names, fontsize=8)
            ax.invert_yaxis()
            ax.set_xlabel('seconds in the function (sum of calls)')
            ax.set_title(f'{op} {on["stock"]["n"] >> 30} GiB '
                         f'({on["stock"]["blocks"]} memory blocks)')
            ax.grid(True, axis='x', alpha=0.3)
            ax.legend(fontsize=8, loc='lower right')
        fig.suptitle('guest time in mm hotplug functions (function_graph)')
        save(fig, 'onlining.png')
    for name, what in (('scaling', ''), ('zonewalk', ', mm zone walk changed')):
        if name not in res:
            continue
        sca = res[name]
        sizes = [n / GiB for n in sca['sizes']]
        fig, (ax, ax2) = plt.subplots(1, 2, figsize=(11, 4.5),
                                      gridspec_kw={'width_ratios': [3, 2]})
        plot_arms(ax, sca)
        ax.set_xscale('log', base=2)
        ax.set_yscale('log')
        ax.set_xticks(sizes)
        ax.set_xticklabels([f'{n:g}' for n in sizes])
        ax.set_xlabel('GiB plugged, then unplugged')
        ax.set_ylabel('seconds (median line, dots: each round)')
        ax.set_title(f'resize time, {sca["mem"]} guest{what}')
        ax.grid(True, which='both', alpha=0.3)
        ax.legend(fontsize=8)
        for op, style in (('plug', 'bo-'), ('unplug', 'ms--')):
            rat = [sca['project'][str(n)][op + '_median'] /
                   sca['stock'][str(n)][op + '_median'] for n in sca['sizes']]
            ax2.plot(sizes, rat, style, label=op)
            for n, v in zip(sizes, rat):
                ax2.annotate(f'{v:.2f}', (n, v), textcoords='offset points',
                             xytext=(0, 6), ha='center', fontsize=8)
        ax2.axhline(1.0, color='k', lw=1, ls=':', label='target: at most 1.0')
        ax2.set_xscale('log', base=2)
        ax2.set_xticks(sizes)
        ax2.set_xticklabels([f'{n:g}' for n in sizes])
        ax2.set_xlabel('GiB')
        ax2.set_ylabel('project / stock (median time)')
        ax2.set_title('ratio')
        ax2.grid(True, alpha=0.3)
        ax2.legend(fontsize=8)
        save(fig, f'{name}.png')
    if 'kernels' in res:
        kernels_plot(res['kernels'], plt, save)
    if 'margin' in res:
        mar = res['margin']
        keys = list(mar['stock'])
        fig, ax = plt.subplots(figsize=(8, 4.5))
        width = 0.38
        for j, (arm, color) in enumerate((('stock', 'r'), ('project', 'g'))):
            xs = [i + (j - 0.5) * width for i in range(len(keys))]
            vals = [(mar[arm][k]['margin'] or 0) / MiB for k in keys]
            ax.bar(xs, vals, width, color=color, alpha=0.8,
                   label=f'{arm}: smallest margin that survived')
            fails = [mar[arm][k]['failed_at'] for k in keys]
            ax.plot([x for x, f in zip(xs, fails) if f is not None],
                    [max(f / MiB, 0.5) for f in fails if f is not None],
                    'kx', ms=9, label='largest margin that failed'
                    if j == 0 else None)
            for x, v in zip(xs, vals):
                ax.annotate(f'{v:.0f} MiB', (x, max(v, 0.5)), ha='center',
                            va='bottom', fontsize=9)
        memmap = [int(k) / 64 / MiB for k in keys]
        ax.hlines(memmap, [i - 0.45 for i in range(len(keys))],
                  [i + 0.45 for i in range(len(keys))], colors='k',
                  linestyles='--', label='memmap of the whole device (1/64)')
        ax.set_yscale('log')
        ax.set_ylim(top=ax.get_ylim()[1] * 4)
        for axis in (ax.yaxis.set_major_formatter,
                     ax.yaxis.set_minor_formatter):
            axis(matplotlib.ticker.FuncFormatter(lambda v, _: f'{v:g}'))
        ax.set_xticks(range(len(keys)))
        ax.set_xticklabels([f'{int(k) >> 30} GiB device' for k in keys])
        ax.set_ylabel('MiB above base + max(size, requested)')
        ax.set_title('cgroup margin a VM needs to grow, touch and shrink '
                     'without OOM or reclaim')
        ax.grid(True, axis='y', which='both', alpha=0.3)
        ax.legend(fontsize=8, loc='upper left')
        save(fig, 'margin.png')
    if 'capacity' in res:
        fig, ax = plt.subplots(figsize=(5, 3.5))
        arms = ['stock', 'project']
        vals = [res['capacity'][a]['size'] / GiB for a in arms]
        ax.bar(arms, vals, color=['r', 'g'])
        for i, v in enumerate(vals):
            ax.text(i, v, f'{v:.2f} GiB', ha='center', va='bottom')
        ax.axhline(res['capacity']['stock']['requested'] / GiB, color='k',
                   ls='--', label='requested')
        ax.set_ylabel('GiB plugged')
        ax.set_title('128 MiB guest (online_movable): capacity')
        ax.legend()
        save(fig, 'capacity.png')
    return files


def plot_arms(ax, sca):
    """Plug and unplug time against size for both arms of a scaling run:
    the median as a line, each round as a dot."""
    sizes = [n / GiB for n in sca['sizes']]
    for arm, color in (('stock', 'r'), ('project', 'g')):
        for op, style in (('plug', 'o-'), ('unplug', 's--')):
            med = [sca[arm][str(n)][op + '_median'] for n in sca['sizes']]
            ax.plot(sizes, med, color + style, label=f'{arm}: {op}')
            for n, x in zip(sizes, sca['sizes']):
                pts = sca[arm][str(x)][op + '_s']
                ax.plot([n] * len(pts), pts, color + '.', alpha=0.4)


def kernels_plot(ker, plt, save):
    """One panel per kernel: plug and unplug time against size, both
    arms; a last one: project / stock per kernel."""
    runs = ker['kernels']
    fig, axes = plt.subplots(1, len(runs) + 1, figsize=(4.2 * (len(runs) + 1),
                                                        4.8))
    allsizes = sorted({n for sca in runs.values() for n in sca['sizes']})
    ticks = [n / GiB for n in allsizes]
    colors = ('tab:blue', 'tab:orange', 'tab:purple', 'tab:brown')
    ymin = min(min(sca[a][str(n)][op + '_s']) for sca in runs.values()
               for a in ('stock', 'project') for n in sca['sizes']
               for op in ('plug', 'unplug'))
    ymax = max(max(sca[a][str(n)][op + '_s']) for sca in runs.values()
               for a in ('stock', 'project') for n in sca['sizes']
               for op in ('plug', 'unplug'))
    rat_ax = axes[-1]
    for (series, sca), ax, kc in zip(runs.items(), axes, colors):
        sizes = [n / GiB for n in sca['sizes']]
        plot_arms(ax, sca)
        rounds = [f'{n >> 30} GiB: {len(sca["stock"][str(n)]["plug_s"])}'
                  for n in sca['sizes']]
        ax.set_xscale('log', base=2)
        ax.set_yscale('log')
        ax.set_xlim(ticks[0] / 1.5, ticks[-1] * 1.5)
        ax.set_ylim(ymin / 1.5, ymax * 1.5)
        ax.set_xticks(ticks)
        ax.set_xticklabels([f'{n:g}' for n in ticks])
        ax.set_xlabel('GiB plugged, then unplugged')
        ax.set_title(f'Linux {series}\n({sca["kernel"]})', fontsize=10)
        ax.grid(True, which='both', alpha=0.3)
        ax.text(0.98, 0.02, 'rounds per arm, ' + ', '.join(rounds),
                transform=ax.transAxes,
                ha='right', va='bottom', fontsize=8)
        for op, style in (('plug', 'o-'), ('unplug', 's--')):
            rat = [sca['project'][str(n)][op + '_median'] /
                   sca['stock'][str(n)][op + '_median'] for n in sca['sizes']]
            # The ratios sit close together: their values go in the
            # legend, not beside the points.
            rat_ax.plot(sizes, rat, style, color=kc,
                        label=f'{series} {op}: ' + ', '.join(
                            f'{v:.2f}' for v in rat))
    axes[0].set_ylabel('seconds (median line, dots: each round)')
    axes[0].legend(fontsize=8, loc='upper left')
    rat_ax.axhline(1.0, color='k', lw=1, ls=':')
    rat_ax.set_xscale('log', base=2)
    rat_ax.set_xlim(ticks[0] / 1.5, ticks[-1] * 1.5)
    rat_ax.set_xticks(ticks)
    rat_ax.set_xticklabels([f'{n:g}' for n in ticks])
    rat_ax.set_xlabel('GiB')
    rat_ax.set_ylabel('project / stock (median time)')
    rat_ax.set_title('project / stock (dotted: equal)\nlegend: ratio at '
                     + ', '.join(f'{n:g}' for n in ticks) + ' GiB',
                     fontsize=10)
    rat_ax.grid(True, alpha=0.3)
    rat_ax.legend(fontsize=7, loc='upper left')
    fig.suptitle(f'plug and unplug time per guest kernel, stock vs project '
                 f'({ker["mem"]} guest, {ker["device"] >> 30} GiB device, '
                 'TCG)')
    save(fig, 'kernels.png')


def project_arms(r):
    """The project arm's results of one scenario (kernels: per kernel)."""
    if 'kernels' in r and 'project' not in r:
        return [x['project'] for x in r['kernels'].values()]
    return [r['project']]


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument('--quick', action='store_true',
                    help='smaller sizes and fewer repetitions')
    ap.add_argument('--big', action='store_true',
                    help='scaling also at 256 GiB (one round of both arms: '
                    'about 28 minutes under TCG)')
    ap.add_argument('--rounds', type=int, default=None,
                    help='at most this many rounds per size in scaling and '
                    'kernels (default: as configured, up to 3)')
    ap.add_argument('--only', default=','.join(ALL),
                    help='comma-separated scenarios (default: all)')
    args = ap.parse_args()
    args.only = [x for x in args.only.split(',') if x]
    for x in args.only:
        if x not in ALL:
            ap.error(f'unknown scenario {x!r}; choose from {", ".join(ALL)}')
    outdir = os.path.join(BUILD, 'bench')
    os.makedirs(outdir, exist_ok=True)
    path = os.path.join(outdir, 'results.json')
    old = {}
    if os.path.exists(path):
        with open(path) as f:
            old = json.load(f)

    def save(part):
        with open(path + '.tmp', 'w') as f:
            json.dump(merge(old, part), f, indent=1)
        os.replace(path + '.tmp', path)

    res = merge(old, run(args, save))
    with open(path, 'w') as f:
        json.dump(res, f, indent=1)
    md = table(res)
    with open(os.path.join(outdir, 'results.md'), 'w') as f:
        f.write(f'# Benchmark, {res["started"]}, guest {res["kernel"]}\n\n'
                + md)
    files = plots(res, outdir)
    print(md)
    log(f'wrote {outdir}/results.json, results.md, '
        + ', '.join(os.path.basename(x) for x in files))
    errors = [s for s in args.only if log_errors(project_arms(res[s]))]
    if errors:
        log('guest log errors in the project arm: ' + ', '.join(errors))
    return 1 if errors else 0


def log_errors(r):
    """The guest log errors in one arm's result, however nested."""
    if isinstance(r, dict):
        return list(r.get('log_errors') or []) + [
            e for k, v in r.items() if k != 'log_errors'
            for e in log_errors(v)]
    if isinstance(r, list):
        return [e for v in r for e in log_errors(v)]
    return []


if __name__ == '__main__':
    sys.exit(main())
