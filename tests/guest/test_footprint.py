#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""
Reduced footprint and usable-memory scenarios (the full ones are in
scripts/bench.py), asserting the project's targets:

- usable: MemTotal gain == size - vmemmap-size exactly, vmemmap-size ==
  2 MiB per 128 MiB memory block, and the guest's own count agrees;
- footprint, on every cycle and step: boot RAM resident on the host stays
  within max(4 MiB, 0.1% of N) of its baseline (no memmap hidden in it),
  the guest's memory resident on the host (boot RAM + the device's
  memory) never exceeds baseline + size + bound, and after the guest
  touched everything it is baseline + size within the bound plus what the
  touch left out on purpose; after unplug it is back at baseline;
- the same run on the stock arm shows its memmap in boot RAM after unplug,
  in boot RAM and in the cgroup charge, which proves the measurement can
  see it.  QEMU's own memory (the charge beyond the guest's RAM) grows by
  several MiB in both arms under TCG; it is reported, not asserted.
"""

from scenarios import bound, footprint, usable
from vmtest import GiB, MiB, Tests, check, log

N = 1 * GiB
MEMORY_BLOCK = 128 * MiB
MEMMAP_PER_BLOCK = 2 * MiB


def test_usable():
    r = usable('project', n=N)
    check(not r['log_errors'], 'guest log: ' + '; '.join(r['log_errors']))
    check(r['size'] == N, f'size {r["size"]} != requested {N}')
    blocks = r['size'] // MEMORY_BLOCK
    check(r['vmemmap_size'] == blocks * MEMMAP_PER_BLOCK,
          f'vmemmap-size {r["vmemmap_size"]} != {blocks} x 2 MiB')
    check(r['memtotal_gain'] == r['size'] - r['vmemmap_size'],
          f'MemTotal gain {r["memtotal_gain"]} != size - vmemmap-size '
          f'{r["size"] - r["vmemmap_size"]}')
    check(r['guest_vmemmap'] == r['vmemmap_size'],
          f'guest reports {r["guest_vmemmap"]} bytes of memmap, device '
          f'{r["vmemmap_size"]}')


def unplugged(r, key):
    return [x[key] for x in r['samples'] if x['step'] == 'unplug']


def test_footprint():
    res = {arm: footprint(arm, n=N, cycles=2 if arm == 'project' else 1)
           for arm in ('stock', 'project')}
    b = bound(N)
    memmap = N // MEMORY_BLOCK * MEMMAP_PER_BLOCK
    p = res['project']
    check(not p['log_errors'], 'guest log: ' + '; '.join(p['log_errors']))
    for s in p['samples']:
        at = f'project {s["cycle"]}:{s["step"]}'
        guest = s['boot_ram'] + s['device_ram']
        # No memmap, nor anything else, hidden in boot RAM.
        check(s['boot_ram'] <= b, f'{at}: boot RAM grew '
              f'{s["boot_ram"] / MiB:.1f} MiB')
        # Never more guest memory resident than plugged.
        check(s['guest_drift'] <= b, f'{at}: guest memory resident '
              f'{guest / MiB:.1f} MiB, plugged {s["size"] / MiB:.0f} MiB')
        if s['step'] == 'touch':
            # ... and all of it once the guest used it all.
            check(s['guest_drift'] >= -(s['untouched'] + b),
                  f'{at}: guest memory resident {guest / MiB:.1f} MiB, '
                  f'plugged {s["size"] / MiB:.0f} MiB, left untouched '
                  f'{s["untouched"] / MiB:.1f} MiB')
    s_boot = unplugged(res['stock'], 'boot_ram')[-1]
    s_drift = unplugged(res['stock'], 'drift')[-1]
    log(f'after unplug, stock: charge {s_drift / MiB:+.1f} MiB, boot RAM '
        f'{s_boot / MiB:+.1f} MiB (its memmap: {memmap / MiB:.0f} MiB); '
        'project: charge '
        + ', '.join(f'{x / MiB:+.1f}' for x in unplugged(p, 'drift'))
        + ' MiB, boot RAM '
        + ', '.join(f'{x / MiB:+.1f}' for x in unplugged(p, 'boot_ram'))
        + ' MiB, QEMU\'s own '
        + ', '.join(f'{x / MiB:+.1f}' for x in unplugged(p, 'vmm')) + ' MiB')
    # The same measurement sees stock's memmap left in boot RAM ...
    check(s_boot >= memmap * 3 // 4,
          f'stock kept only {s_boot / MiB:.1f} MiB of boot RAM after unplug: '
          'the measurement cannot see a memmap left behind')
    # ... and in the charge, beside QEMU's own memory in both arms.
    check(s_drift - unplugged(p, 'drift')[0] >= memmap // 2,
          f'project charge after unplug {unplugged(p, "drift")[0] / MiB:.1f}'
          f' MiB, stock {s_drift / MiB:.1f} MiB: the memmap did not go '
          'away with the memory')


def main():
    t = Tests()
    t.case('usable: MemTotal gain == size - vmemmap-size (1 GiB)', test_usable)
    t.case('footprint: guest memory on the host tracks size (1 GiB)',
           test_footprint)
    t.done()


if __name__ == '__main__':
    main()
