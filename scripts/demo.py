#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""
The main job on the embedded default guest: boot two small guests with a
virtio-mem device side by side, "stock" (Debian's QEMU and virtio_mem,
memmap in boot RAM) and "project" (the fork with x-vmemmap-accounting=on,
the patched virtio_mem, memory_hotplug.memmap_on_memory=1), grow and
shrink both the same way, and show at each step what the device reports
(size, vmemmap-size), what the guest sees (MemTotal) and what the host
memory cgroup is charged.  The drift, charge over baseline minus size,
is what an operator who sets a limit by `size` would get wrong.  Writes
build/demo/footprint.png and build/demo/steps.json.
"""

import contextlib
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests',
                                'guest'))
# pylint: disable=wrong-import-position
import scenarios as sc  # noqa: E402
from vmtest import BUILD, GiB, MiB, log  # noqa: E402

STEPS = [0, 1 * GiB, 2 * GiB, 512 * MiB, 2 * GiB, 0]
COLORS = {'stock': 'tab:red', 'project': 'tab:green'}


def measure(arm, g, base, i, req):
    """Resize guest g to req, let it use what it has, and measure."""
    g.resize(req)
    size = g.qom_get('size')
    vmm = g.vmemmap_size()
    gain = g.mem_total() - g.boot_total
    sc.touch_plugged(g, f'{arm} step {i}', timeout=300)
    charge = g.charge() - base['charge']
    return {'step': i, 'requested': req, 'size': size, 'vmemmap_size': vmm,
            'memtotal_gain': gain, 'charge_over_baseline': charge,
            'drift': charge - size,
            'boot_ram_growth': g.ram_rss()['pc.ram'] - base['boot']}


def main():
    outdir = os.path.join(BUILD, 'demo')
    os.makedirs(outdir, exist_ok=True)
    log('booting two 512 MiB guests, each with a 4 GiB virtio-mem device: '
        'stock and project')
    rows = {arm: [] for arm in sc.ARMS}
    bad = {}
    head = (f'{"":>4} {"":>9} | {"stock":^30} | {"project":^39}\n'
            f'{"step":>4} {"requested":>9} | {"size":>6} {"MemTot+":>7} '
            f'{"charge+":>7} {"drift":>7} | {"size":>6} {"vmemmap":>7} '
            f'{"MemTot+":>7} {"charge+":>7} {"drift":>7}   (MiB)')
    with contextlib.ExitStack() as stack:
        guests = {arm: stack.enter_context(
            sc.guest_for(arm, 'demo', '512M', '4G')) for arm in sc.ARMS}
        base = {arm: {'charge': g.charge(), 'boot': g.ram_rss()['pc.ram']}
                for arm, g in guests.items()}
        print(head, flush=True)
        for i, req in enumerate(STEPS):
            log(f'step {i}: requested-size {req >> 20} MiB, then the guests '
                'touch what they gained')
            for arm, g in guests.items():
                rows[arm].append(measure(arm, g, base[arm], i, req))
            s, p = rows['stock'][-1], rows['project'][-1]
            print(f'{i:>4} {req >> 20:>9} | {s["size"] >> 20:>6} '
                  f'{s["memtotal_gain"] / MiB:>7.0f} '
                  f'{s["charge_over_baseline"] / MiB:>7.1f} '
                  f'{s["drift"] / MiB:>+7.1f} | {p["size"] >> 20:>6} '
                  f'{p["vmemmap_size"] >> 20:>7} '
                  f'{p["memtotal_gain"] / MiB:>7.0f} '
                  f'{p["charge_over_baseline"] / MiB:>7.1f} '
                  f'{p["drift"] / MiB:>+7.1f}', flush=True)
        bad = {arm: g.bad_log_lines() for arm, g in guests.items()}
    print('drift = host cgroup charge over its baseline - size: what the '
          'host holds beyond what the device reports as plugged.  The '
          'guests touch all they gained (less a watermark), so after a '
          'grow the drift is also short by what they left untouched.')
    with open(os.path.join(outdir, 'steps.json'), 'w') as f:
        json.dump(rows, f, indent=1)
    path = os.path.join(outdir, 'footprint.png')
    plot(rows, path)
    log(f'wrote {outdir}/steps.json and {path}')
    if bad['project']:
        print('project guest log has errors:\n' + '\n'.join(bad['project']))
        return 1
    return 0


def plot(rows, path):
    """Drift of both arms per step, the requested size beside it."""
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    fig, (ax, ax2) = plt.subplots(2, 1, figsize=(8, 6), sharex=True,
                                  gridspec_kw={'height_ratios': [3, 1]})
    x = [r['step'] for r in rows['project']]
    b = sc.bound(max(STEPS)) / MiB
    ax.axhspan(-b, b, color='tab:green', alpha=0.12,
               label=f'+/- {b:.0f} MiB: the target')
    ax.axhline(0, color='k', lw=0.8)
    for arm, r in rows.items():
        d = [v['drift'] / MiB for v in r]
        ax.plot(x, d, 'o-', color=COLORS[arm], lw=2,
                label=f'{arm}: charge over baseline - size')
        for xi, di in zip(x, d):
            ax.annotate(f'{di:+.0f}', (xi, di), textcoords='offset points',
                        xytext=(0, 7 if arm == 'stock' else -14),
                        ha='center', fontsize=8, color=COLORS[arm])
    ax.set_ylabel('drift (MiB)')
    ax.set_title('host memory charged beyond what virtio-mem reports '
                 '(512 MiB guests)')
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8, loc='upper left')
    ax2.bar(x, [r['requested'] / MiB for r in rows['project']], 0.5,
            color='0.6', label='requested-size at this step')
    ax2.set_ylabel('MiB')
    ax2.set_xlabel('step (each: resize, settle, the guest touches its '
                   'memory)')
    ax2.set_xticks(x)
    ax2.grid(True, alpha=0.3)
    ax2.legend(fontsize=8, loc='upper right')
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == '__main__':
    sys.exit(main())
