# SPDX-License-Identifier: GPL-2.0-or-later
"""
The measured scenarios, shared by the benchmark (scripts/bench.py) and the
reduced end-to-end tests (tests/guest/test_footprint.py).

Each scenario runs one "arm":
  stock    the device without vmemmap-accounting, Debian's unpatched
           virtio_mem, memmap_on_memory off: memmap comes from boot RAM;
  project  vmemmap-accounting=on, the patched module,
           memory_hotplug.memmap_on_memory=1.
Both arms run on the same QEMU build.
"""

import statistics
import subprocess
import time

from vmtest import BUILD, GiB, MiB, Guest, HarnessError, log, poll

ARMS = {
    'stock': {'module': 'stock', 'memmap_on_memory': False,
              'vmemmap_accounting': False},
    'project': {'module': 'patched', 'memmap_on_memory': True,
                'vmemmap_accounting': True},
}

_props = None


def device_has(prop):
    """Whether this build's virtio-mem-pci has property prop."""
    global _props  # pylint: disable=global-statement
    if _props is None:
        _props = subprocess.run([f'{BUILD}/qemu-system-x86_64', '-device',
                                 'virtio-mem-pci,help'], capture_output=True,
                                text=True, check=False).stdout
    return f' {prop}=' in _props


def guest_for(arm, name, mem, device_size, online='online_movable',
              reserve=True, modparams=None, maxmem=None):
    a = ARMS[arm]
    dev = {'size': device_size, 'block_size': '2M', 'requested': 0,
           'reserve': reserve}
    if device_has('vmemmap-accounting'):
        dev['vmemmap_accounting'] = a['vmemmap_accounting']
    return Guest(f'{name}-{arm}', mem=mem, maxmem=maxmem or '80G',
                 device=dev, module=a['module'], online=online,
                 memmap_on_memory=a['memmap_on_memory'],
                 modparams=modparams)


def bound(n):
    """Footprint tolerance: max(4 MiB, 0.1% of the plugged size)."""
    return max(4 * MiB, n // 1000)


def footprint(arm, n=2 * GiB, cycles=3, mem='512M'):
    """Plug n, touch what was added, unplug to 0; `cycles` times.

    Records the cgroup charge over (baseline + size) at each step.  The
    baseline is taken after boot, before any plug.
    """
    samples = []
    with guest_for(arm, 'footprint', mem, f'{max(4, 2 * n // GiB)}G') as g:
        g.run('memtouch 1', check=True)     # warm the tool's code paths
        base = g.charge()
        base_total = g.mem_total()
        t0 = time.monotonic()

        def sample(cycle, step):
            size = g.qom_get('size')
            s = {'cycle': cycle, 'step': step, 't': time.monotonic() - t0,
                 'size': size, 'vmemmap_size': g.vmemmap_size(),
                 'memtotal_gain': g.mem_total() - base_total,
                 'charge': g.charge() - base}
            s['drift'] = s['charge'] - size
            samples.append(s)
            log(f'{arm} cycle {cycle} {step:>7}: size {size / MiB:7.1f} '
                f'charge+ {s["charge"] / MiB:8.1f} drift {s["drift"] / MiB:+6.1f} MiB')
            return s

        sample(0, 'boot')
        for c in range(1, cycles + 1):
            g.resize(n)
            sample(c, 'plug')
            # Touch what was added, less what the page allocator keeps
            # free in ZONE_MOVABLE (its high watermark): touching that
            # too spills into boot RAM, which then stays resident and
            # would be charged to either arm as if it were drift.
            gain = g.mem_total() - base_total - movable_high(g)
            g.run(f'memtouch {gain >> 20}', timeout=600, check=True)
            sample(c, 'touch')
            g.resize(0)
            sample(c, 'unplug')
        bad = g.bad_log_lines()
    return {'n': n, 'baseline_mem': mem, 'samples': samples, 'log_errors': bad}


def movable_high(g):
    """Bytes ZONE_MOVABLE keeps free: its high watermark (0 if none)."""
    _, out = g.run("awk '/^Node .* zone +Movable/ {m=1} m && $1 == \"high\" "
                   "{print $2; exit}' /proc/zoneinfo", check=True)
    return int(out.strip() or 0) * 4096


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
    expect_total, polled every 20 ms (no settling heuristics)."""
    t0 = time.monotonic()
    g.qom_set('requested-size', requested)
    poll(lambda: g.qom_get('size') == requested, timeout,
         f'size == {requested >> 20} MiB', interval=0.02)
    poll(lambda: g.mem_total() == expect_total, timeout,
         f'MemTotal == {expect_total}', interval=0.02)
    return time.monotonic() - t0


def speed(arm, n=2 * GiB, reps=3, mem='512M'):
    """Wall time from qom-set to settled size and MemTotal, plug and unplug."""
    plug, unplug = [], []
    with guest_for(arm, 'speed', mem, f'{max(4, 2 * n // GiB)}G') as g:
        base_total = g.mem_total()
        g.resize(n)                      # learn the settled MemTotal once
        full_total = g.mem_total()
        g.resize(0)
        for _ in range(reps):
            plug.append(timed_resize(g, n, full_total))
            unplug.append(timed_resize(g, 0, base_total))
        bad = g.bad_log_lines()
    return {'n': n, 'plug_s': plug, 'unplug_s': unplug,
            'plug_median': statistics.median(plug),
            'unplug_median': statistics.median(unplug), 'log_errors': bad}


__all__ = ['ARMS', 'footprint', 'usable', 'capacity', 'speed', 'bound',
           'device_has', 'HarnessError', 'GiB', 'MiB']
