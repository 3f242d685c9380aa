# SPDX-License-Identifier: GPL-2.0-or-later
"""
The measured scenarios, shared by the benchmark (scripts/bench.py) and the
reduced end-to-end tests (tests/guest/test_footprint.py).

Each scenario runs one "arm":
  stock    Debian's QEMU without the project's series
           (build/qemu-system-x86_64-stock), Debian's unpatched virtio_mem,
           memmap_on_memory off: memmap comes from boot RAM;
  project  the fork with vmemmap-accounting=on, the patched module,
           memory_hotplug.memmap_on_memory=1.
"""

import contextlib
import statistics
import re
import subprocess
import time

from vmtest import (QEMU, STOCK_QEMU, GiB, MiB, Guest, HarnessError, log,
                    poll)

ARMS = {
    'stock': {'qemu': STOCK_QEMU, 'module': 'stock',
              'memmap_on_memory': False, 'vmemmap_accounting': None},
    'project': {'qemu': QEMU, 'module': 'patched', 'memmap_on_memory': True,
                'vmemmap_accounting': True},
}

_props = {}


def device_has(prop, qemu=QEMU):
    """Whether virtio-mem-pci of the binary qemu has property prop."""
    if qemu not in _props:
        _props[qemu] = subprocess.run([qemu, '-device', 'virtio-mem-pci,help'],
                                      capture_output=True, text=True,
                                      check=False).stdout
    return f' {prop}=' in _props[qemu]


def guest_for(arm, name, mem, device_size, online='online_movable',
              reserve=True, modparams=None, maxmem=None):
    a = ARMS[arm]
    dev = {'size': device_size, 'block_size': '2M', 'requested': 0,
           'reserve': reserve}
    if a['vmemmap_accounting'] is not None:
        dev['vmemmap_accounting'] = a['vmemmap_accounting']
    return Guest(f'{name}-{arm}', mem=mem, maxmem=maxmem or '80G',
                 device=dev, module=a['module'], online=online,
                 memmap_on_memory=a['memmap_on_memory'],
                 modparams=modparams, qemu=a['qemu'])


def bound(n):
    """Footprint tolerance: max(4 MiB, 0.1% of the plugged size)."""
    return max(4 * MiB, n // 1000)


def footprint(arm, n=2 * GiB, cycles=3, mem='512M'):
    """Plug n, touch what was added, unplug to 0; `cycles` times.

    At each step records, relative to the baseline taken after boot
    (before any plug):
      charge      the cgroup's charge;
      drift       charge - size: the issue's measure;
      boot_ram    boot RAM resident on the host (smaps of 'pc.ram');
      device_ram  the device's memory resident on the host;
      guest_drift boot_ram + device_ram - size: drift of guest memory;
      vmm         the rest of the charge: QEMU's own memory;
    and after touch, `untouched`: what the touch left out on purpose.
    """
    samples = []
    with guest_for(arm, 'footprint', mem, f'{max(4, 2 * n // GiB)}G') as g:
        g.run('memtouch 1', check=True)     # warm the tool's code paths
        base = g.charge()
        base_rss = g.ram_rss()
        t0 = time.monotonic()

        def sample(cycle, step):
            size = g.qom_get('size')
            rss = g.ram_rss()
            s = {'cycle': cycle, 'step': step, 't': time.monotonic() - t0,
                 'size': size, 'vmemmap_size': g.vmemmap_size(),
                 'memtotal_gain': g.mem_total() - g.boot_total,
                 'charge': g.charge() - base,
                 'boot_ram': rss['pc.ram'] - base_rss['pc.ram'],
                 'device_ram': rss['mem0'] - base_rss['mem0']}
            s['drift'] = s['charge'] - size
            s['guest_drift'] = s['boot_ram'] + s['device_ram'] - size
            s['vmm'] = s['charge'] - s['boot_ram'] - s['device_ram']
            samples.append(s)
            log(f'{arm} cycle {cycle} {step:>6}: size {size / MiB:6.0f} '
                f'charge+ {s["charge"] / MiB:7.1f} drift '
                f'{s["drift"] / MiB:+5.1f} = boot RAM {s["boot_ram"] / MiB:+5.1f}'
                f' + device RAM - size {(s["device_ram"] - size) / MiB:+5.1f}'
                f' + QEMU {s["vmm"] / MiB:+4.1f} MiB')
            return s

        sample(0, 'boot')
        for c in range(1, cycles + 1):
            g.resize(n)
            sample(c, 'plug')
            touched = touch_plugged(g, f'{arm} cycle {c}')
            sample(c, 'touch')['untouched'] = \
                g.mem_total() - g.boot_total - touched
            g.resize(0)
            sample(c, 'unplug')
        bad = g.bad_log_lines()
    return {'n': n, 'baseline_mem': mem, 'samples': samples, 'log_errors': bad}


def movable_free(g):
    """Bytes of ZONE_MOVABLE that can be touched without spilling into
    boot RAM: its free pages less its high watermark, below which the
    page allocator turns to the next zone.  Pages freed a moment ago may
    still sit on per-CPU lists, which do not count as free."""
    _, out = g.run("awk '/^Node .* zone +Movable/ {m=1; next} /^Node/ {m=0} "
                   "m && $1 == \"pages\" && $2 == \"free\" {f=$3} "
                   "m && $1 == \"high\" {h=$2} END {print f - h}' "
                   "/proc/zoneinfo", check=True)
    return max(0, int(out.strip() or 0)) * 4096


def touch_plugged(g, what, timeout=600):
    """Have the guest touch what was plugged, as far as it goes without
    spilling into boot RAM: up to movable_free(), and memtouch itself
    stops where the allocator starts to take boot memory.  Logs memtouch's
    account under `what`; returns the bytes it wrote."""
    want = movable_free(g) >> 20
    if not want:
        return 0
    _, out = g.run(f'memtouch {want}', timeout=timeout, check=True)
    log(f'{what}: memtouch {want}: {out.strip()}')
    return int(re.match(r'touched (\d+) MiB', out).group(1)) * MiB


def usable(arm, n=1 * GiB, mem='512M'):
    """MemTotal gain against size and vmemmap-size after plugging n."""
    with guest_for(arm, 'usable', mem, f'{max(2, 2 * n // GiB)}G') as g:
        base_total = g.mem_total()
        g.resize(n)
        r = {'n': n, 'size': g.qom_get('size'), 'vmemmap_size': g.vmemmap_size(),
             'memtotal_gain': g.mem_total() - base_total,
             'guest_vmemmap': guest_vmemmap_bytes(g)}
        g.resize(0)
        r['log_errors'] = g.bad_log_lines()
    return r


def guest_vmemmap_bytes(g):
    """What the patched driver says it placed as memmap (None if unknown)."""
    st, out = g.run('cat /sys/module/virtio_mem/parameters/vmemmap_bytes '
                    '2>/dev/null')
    return int(out) if st == 0 and out.strip().isdigit() else None


def capacity(arm, want=64 * GiB, mem='128M', quiet=20, timeout=1800):
    """The most a small guest (online_movable) plugs out of `want`.

    Waits until `size` reaches `want` or stops growing for `quiet` seconds.
    """
    with guest_for(arm, 'capacity', mem, f'{want // GiB}G', reserve=False,
                   maxmem=f'{want // GiB + 4}G') as g:
        base_total = g.mem_total()
        t0 = time.monotonic()
        g.qom_set('requested-size', want)
        last = [-1, time.monotonic()]

        def done():
            size = g.qom_get('size')
            now = time.monotonic()
            if size != last[0]:
                if size >> 30 != last[0] >> 30:
                    log(f'{arm} capacity: {size >> 20} MiB plugged')
                last[:] = [size, now]
            return size == want or now - last[1] > quiet
        poll(done, timeout, f'{arm} capacity run to settle', interval=0.5)
        size = g.qom_get('size')
        secs = time.monotonic() - t0 - (0 if size == want else quiet)
        r = {'requested': want, 'size': size, 'vmemmap_size': g.vmemmap_size(),
             'memtotal_gain': g.mem_total() - base_total, 'seconds': secs,
             'log_errors': g.bad_log_lines(),
             'alloc_failures': sum('vmemmap alloc failure' in l or
                                   'adding memory failed' in l
                                   for l in g.console().splitlines())}
    log(f'{arm} capacity: {size >> 20} MiB of {want >> 20} MiB '
        f'({r["alloc_failures"]} allocation failures logged)')
    return r


def timed_resize(g, requested, expect_total, timeout=600):
    """Seconds from qom-set until size == requested and MemTotal ==
    expect_total.  size is polled over QMP every 5 ms, which costs the
    guest nothing; MemTotal, read by a command in the guest, only after
    that, every 10 ms."""
    t0 = time.monotonic()
    g.qom_set('requested-size', requested)
    poll(lambda: g.qom_get('size') == requested, timeout,
         f'size == {requested >> 20} MiB', interval=0.005, backoff=False)
    poll(lambda: g.mem_total() == expect_total, timeout,
         f'MemTotal == {expect_total}', interval=0.01, backoff=False)
    return time.monotonic() - t0


def speed(n=2 * GiB, reps=3, mem='512M'):
    """Wall time from qom-set to settled size and MemTotal, plug and unplug,
    both arms in one run.  The two guests run side by side and take turns,
    each round in the other order, so that whatever else the host does
    falls on both alike.  Returns a result per arm."""
    times = {arm: {'plug': [], 'unplug': []} for arm in ARMS}
    with contextlib.ExitStack() as stack:
        guests = {arm: stack.enter_context(
            guest_for(arm, 'speed', mem, f'{max(4, 2 * n // GiB)}G'))
            for arm in ARMS}
        full = {}
        for arm, g in guests.items():
            g.resize(n)                  # learn the settled MemTotal once
            full[arm] = g.mem_total()
            g.resize(0)
        for r in range(reps):
            for arm in (list(ARMS) if r % 2 == 0 else list(ARMS)[::-1]):
                g = guests[arm]
                times[arm]['plug'].append(timed_resize(g, n, full[arm]))
                times[arm]['unplug'].append(timed_resize(g, 0, g.boot_total))
                log(f'speed {arm} round {r + 1}: plug '
                    f'{times[arm]["plug"][-1]:.2f}s, unplug '
                    f'{times[arm]["unplug"][-1]:.2f}s')
        bad = {arm: g.bad_log_lines() for arm, g in guests.items()}
    return {arm: {'n': n, 'plug_s': t['plug'], 'unplug_s': t['unplug'],
                  'plug_median': statistics.median(t['plug']),
                  'unplug_median': statistics.median(t['unplug']),
                  'log_errors': bad[arm]}
            for arm, t in times.items()}


__all__ = ['ARMS', 'footprint', 'usable', 'capacity', 'speed', 'bound',
           'device_has', 'HarnessError', 'GiB', 'MiB']
