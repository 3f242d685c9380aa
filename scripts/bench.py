#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""
Benchmark: every scenario of tests/guest/scenarios.py, stock and project
arms, in one run on the same QEMU build.  Writes build/bench/results.json,
build/bench/results.md and PNG plots.

Usage: scripts/bench.py [--quick] [--only footprint,usable,capacity,speed]
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

ALL = ('usable', 'footprint', 'speed', 'capacity')
JOINT = ('speed',)      # scenarios that run both arms together


def run(args):
    quick = args.quick
    plan = {
        'usable': lambda arm: sc.usable(arm, n=1 * GiB),
        'footprint': lambda arm: sc.footprint(arm, n=(1 if quick else 4) * GiB,
                                              cycles=2 if quick else 3),
        # Both arms at once: see scenarios.speed().
        'speed': lambda: sc.speed(n=(1 if quick else 4) * GiB,
                                  reps=3 if quick else 9),
        'capacity': lambda arm: sc.capacity(arm, want=(16 if quick else 64) * GiB),
    }
    results = {'started': time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime()),
               'quick': quick, 'kernel': open(f'{BUILD}/guest/kernel-release').read().strip()}
    for name in args.only:
        if name in JOINT:
            log(f'== {name}: {", ".join(sc.ARMS)} side by side')
            results[name] = plan[name]()
            continue
        results[name] = {}
        for arm in sc.ARMS:
            log(f'== {name}: {arm}')
            results[name][arm] = plan[name](arm)
    return results


def mib(x):
    return f'{x / MiB:.1f}'


def ratio(a, b):
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
    return '\n'.join(lines) + '\n'


def plots(res, outdir):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
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
        fig, ax = plt.subplots(figsize=(8, 3.5))
        for arm, style in (('stock', 'r'), ('project', 'g')):
            smp = res['footprint'][arm]['samples']
            ax.plot(range(len(smp)), [x['drift'] / MiB for x in smp],
                    style + 'o-', label=f'{arm}: charge - (baseline + size)')
            ax.plot(range(len(smp)), [x['boot_ram'] / MiB for x in smp],
                    style + 's:', label=f'{arm}: boot RAM growth')
        b = sc.bound(res['footprint']['stock']['n']) / MiB
        ax.axhspan(-b, b, color='g', alpha=0.1, label='target bound')
        ax.set_xticks(range(len(smp)))
        ax.set_xticklabels([f'{x["cycle"]}:{x["step"]}' for x in smp],
                           rotation=45, fontsize=7)
        ax.set_ylabel('MiB')
        top = max(max(x['drift'], x['boot_ram'])
                  for a in ('stock', 'project')
                  for x in res['footprint'][a]['samples'])
        ax.set_ylim(-10, max(top, b) * 1.3)
        ax.set_title('drift (plug rows are below the axis: size not yet '
                     'touched)', fontsize=9)
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
        save(fig, 'drift.png')
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


def main():
    ap = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    ap.add_argument('--quick', action='store_true',
                    help='smaller sizes and fewer repetitions')
    ap.add_argument('--only', default=','.join(ALL),
                    help='comma-separated scenarios (default: all)')
    args = ap.parse_args()
    args.only = [x for x in args.only.split(',') if x]
    for x in args.only:
        if x not in ALL:
            ap.error(f'unknown scenario {x!r}; choose from {", ".join(ALL)}')
    outdir = os.path.join(BUILD, 'bench')
    os.makedirs(outdir, exist_ok=True)
    res = run(args)
    with open(os.path.join(outdir, 'results.json'), 'w') as f:
        json.dump(res, f, indent=1)
    md = table(res)
    with open(os.path.join(outdir, 'results.md'), 'w') as f:
        f.write(f'# Benchmark, {res["started"]}, guest {res["kernel"]}\n\n'
                + md)
    files = plots(res, outdir)
    print(md)
    log(f'wrote {outdir}/results.json, results.md, '
        + ', '.join(os.path.basename(x) for x in files))
    errors = [(s, a) for s in args.only for a in sc.ARMS
              if a == 'project' and res[s][a].get('log_errors')]
    return 1 if errors else 0


if __name__ == '__main__':
    sys.exit(main())
