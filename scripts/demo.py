#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""
The main job on the embedded default guest: boot a small guest with a
virtio-mem device, grow and shrink it, and show at each step what the
device reports (size, vmemmap-size), what the guest sees (MemTotal) and
what the host memory cgroup is charged.  Writes build/demo/footprint.png
and build/demo/steps.json.
"""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', 'tests',
                                'guest'))
# pylint: disable=wrong-import-position
import scenarios as sc  # noqa: E402
from vmtest import BUILD, GiB, MiB, log  # noqa: E402

STEPS = [0, 1 * GiB, 2 * GiB, 512 * MiB, 2 * GiB, 0]


def main():
    outdir = os.path.join(BUILD, 'demo')
    os.makedirs(outdir, exist_ok=True)
    log('booting a 512 MiB guest: the fork with vmemmap-accounting=on, the '
        'patched virtio_mem, memory_hotplug.memmap_on_memory=1')
    rows = []
    with sc.guest_for('project', 'demo', '512M', '4G') as g:
        base_charge = g.charge()
        base_boot = g.ram_rss()['pc.ram']
        print(f'{"step":>4} {"requested":>10} {"size":>10} {"vmemmap":>8} '
              f'{"MemTotal+":>10} {"charge+":>10} {"drift":>8} '
              f'{"boot RAM+":>10}   (MiB)')
        for i, req in enumerate(STEPS):
            log(f'step {i}: requested-size {req >> 20} MiB')
            secs = g.resize(req)
            size = g.qom_get('size')
            vmm = g.vmemmap_size()
            gain = g.mem_total() - g.boot_total
            sc.touch_plugged(g, f'step {i}', timeout=300)
            charge = g.charge() - base_charge
            boot = g.ram_rss()['pc.ram'] - base_boot
            drift = charge - size
            rows.append({'step': i, 'requested': req, 'size': size,
                         'vmemmap_size': vmm, 'memtotal_gain': gain,
                         'charge_over_baseline': charge, 'drift': drift,
                         'boot_ram_growth': boot, 'seconds': secs})
            print(f'{i:>4} {req >> 20:>10} {size >> 20:>10} {vmm >> 20:>8} '
                  f'{gain / MiB:>10.1f} {charge / MiB:>10.1f} '
                  f'{drift / MiB:>8.1f} {boot / MiB:>10.1f}', flush=True)
        bad = g.bad_log_lines()
    with open(os.path.join(outdir, 'steps.json'), 'w') as f:
        json.dump(rows, f, indent=1)
    plot(rows, os.path.join(outdir, 'footprint.png'))
    log(f'wrote {outdir}/steps.json and {outdir}/footprint.png')
    if bad:
        print('guest log has errors:\n' + '\n'.join(bad))
        return 1
    return 0


def plot(rows, path):
    import matplotlib
    matplotlib.use('Agg')
    import matplotlib.pyplot as plt
    x = [r['step'] for r in rows]
    fig, ax = plt.subplots(figsize=(7, 4))
    ax.plot(x, [r['requested'] / MiB for r in rows], 'k--', label='requested-size')
    ax.plot(x, [r['size'] / MiB for r in rows], 'o-', label='size (plugged)')
    ax.plot(x, [r['charge_over_baseline'] / MiB for r in rows], 's-',
            label='host cgroup charge - baseline')
    ax.plot(x, [r['memtotal_gain'] / MiB for r in rows], '^-',
            label='guest MemTotal gain')
    ax.plot(x, [r['boot_ram_growth'] / MiB for r in rows], 'v-',
            label='boot RAM growth on the host')
    ax.set_xlabel('step')
    ax.set_ylabel('MiB')
    ax.set_title('virtio-mem footprint, demo guest')
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)


if __name__ == '__main__':
    sys.exit(main())
