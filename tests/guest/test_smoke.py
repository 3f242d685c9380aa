#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""
Boot smoke test: the fork boots the guest kit, the virtio_mem module
loads, qom-set requested-size plugs memory, MemTotal grows by what was
plugged, and resizing back to 0 empties the device.
"""

from vmtest import GiB, Guest, Tests, check, log, require_kit

MODULES = ('stock', 'patched')


def smoke(module):
    dev = {'size': '2G', 'block_size': '2M', 'requested': 0}
    with Guest(f'smoke-{module}', mem='512M', device=dev,
               module=module) as g:
        check(g.run('grep -q "^virtio_mem " /proc/modules')[0] == 0,
              f'virtio_mem-{module}.ko not loaded')
        base = g.mem_total()
        secs = g.resize(1 * GiB)
        gain = g.mem_total() - base
        log(f'{module}: plugged {g.qom_get("size") >> 20} MiB in {secs:.2f}s, '
            f'MemTotal +{gain >> 20} MiB')
        # memmap_on_memory is off: the whole plugged size is usable.
        check(gain == 1 * GiB, f'MemTotal grew by {gain}, expected {GiB}')
        g.resize(0)
        check(g.qom_get('size') == 0, 'device not empty after resize to 0')
        check(g.mem_total() == base,
              f'MemTotal {g.mem_total()} != boot value {base} after unplug')
        bad = g.bad_log_lines()
        check(not bad, 'guest log has errors:\n' + '\n'.join(bad))


def main():
    require_kit()
    t = Tests()
    for m in MODULES:
        t.case(f'{m} module: boot, plug 1 GiB, unplug to 0',
               lambda m=m: smoke(m))
    t.done()


if __name__ == '__main__':
    main()
