# SPDX-License-Identifier: GPL-2.0-or-later
"""
The measured scenarios, shared by the benchmark (scripts/bench.py) and the
reduced end-to-end tests (tests/guest/test_footprint.py).

Each scenario runs one "arm":
  stock    Debian's QEMU without the project's series
           (build/qemu-system-x86_64-stock), Debian's unpatched virtio_mem,
           memmap_on_memory off: memmap comes from boot RAM;
  project  the fork with x-vmemmap-accounting=on, the patched module,
           memory_hotplug.memmap_on_memory=1.
"""

import contextlib
import math
import os
import statistics
import re
import subprocess
import time

import vmtest
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
              reserve=True, modparams=None, maxmem=None, extra_args=(),
              append=''):
    a = ARMS[arm]
    dev = {'size': device_size, 'block_size': '2M', 'requested': 0,
           'reserve': reserve}
    if a['vmemmap_accounting'] is not None:
        dev['vmemmap_accounting'] = a['vmemmap_accounting']
    return Guest(f'{name}-{arm}', mem=mem, maxmem=maxmem or '80G',
                 device=dev, module=a['module'], online=online,
                 memmap_on_memory=a['memmap_on_memory'],
                 modparams=modparams, qemu=a['qemu'], extra_args=extra_args,
                 append=append)


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
    st, out = g.run('cat /sys/bus/virtio/drivers/virtio_mem/virtio*/'
                    'vmemmap_bytes 2>/dev/null || '
                    'cat /sys/module/virtio_mem/parameters/vmemmap_bytes '
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
        # The device answers the last plug before the guest has added,
        # onlined and reported that block: wait for the guest to catch up
        # before reading vmemmap-size and MemTotal.
        try:
            g.wait_guest_at_rest(60)
        except HarnessError as e:
            log(f'{arm} capacity: guest not at rest: {e}')
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


def memtotal_after(arm, g, n):
    """The guest's MemTotal once n bytes are plugged and online: stock
    gains all of it, the project all but the memmap at the start of each
    128 MiB memory block (2 MiB)."""
    memmap = n // (128 * MiB) * 2 * MiB if ARMS[arm]['memmap_on_memory'] \
        else 0
    return g.boot_total + n - memmap


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


# Loads guest/experiments/zone_walk_skip.c before virtio_mem: mm's
# set_zone_contiguous() as docs/devel/cost.rst proposes to change it
# (with ':verify=1' it also walks, and counts disagreements).
ZONE_WALK_SKIP = 'vmtest.preload=zone_walk_skip'


def scaling(sizes=(4 * GiB, 16 * GiB), reps=None, mem='6G', timeout=1800,
            append='', kernel=None, device=None):
    """Plug and unplug time against size, both arms in guests of the same
    size (mem), side by side and taking turns as in speed(): each size in
    round r runs stock first when r + its index is even, else project.
    One guest per arm serves all sizes (its device is the largest one).
    reps maps a size to its number of rounds (default 3).  Returns
    {'sizes': [...], arm: {size: {'plug_s': [...], 'unplug_s': [...]}}}
    with sizes as strings of bytes (JSON keys).  append goes on both
    guests' kernel command line (ZONE_WALK_SKIP: with mm's walk changed).
    kernel (a release or series: 6.1, 6.12, 7.3) boots both guests on
    that kernel's kit instead of the default one; device (bytes, default
    the largest size) sizes both devices, so that runs of different sizes
    can have the same guest."""
    if kernel:
        kit, vmtest.GUEST = vmtest.GUEST, vmtest.guest_kit_dir(kernel)
        try:
            return dict(scaling(sizes, reps, mem, timeout, append,
                                device=device),
                        kernel=open(os.path.join(vmtest.GUEST,
                                                 'kernel-release'))
                        .read().strip())
        finally:
            vmtest.GUEST = kit
    reps = reps or {}
    top = max(max(sizes), device or 0)
    times = {arm: {str(n): {'plug_s': [], 'unplug_s': []} for n in sizes}
             for arm in ARMS}
    with contextlib.ExitStack() as stack:
        guests = {}
        for arm in ARMS:
            t0 = time.monotonic()
            guests[arm] = stack.enter_context(guest_for(
                arm, 'scaling', mem, f'{top // GiB}G', reserve=False,
                maxmem=f'{top // GiB + 16}G', append=append))
            log(f'scaling {arm}: booted {os.path.basename(vmtest.GUEST)} '
                f'in {time.monotonic() - t0:.1f}s')
        rounds = max(reps.get(n, 3) for n in sizes)
        for r in range(rounds):
            for i, n in enumerate(sizes):
                if r >= reps.get(n, 3):
                    continue
                order = list(ARMS) if (r + i) % 2 == 0 else list(ARMS)[::-1]
                for arm in order:
                    g, t = guests[arm], times[arm][str(n)]
                    t['plug_s'].append(timed_resize(
                        g, n, memtotal_after(arm, g, n), timeout))
                    t['unplug_s'].append(timed_resize(
                        g, 0, g.boot_total, timeout))
                    log(f'scaling {arm} {n >> 30} GiB round {r + 1}: plug '
                        f'{t["plug_s"][-1]:.2f}s, unplug '
                        f'{t["unplug_s"][-1]:.2f}s')
        bad = {arm: g.bad_log_lines() for arm, g in guests.items()}
        walks = {arm: zone_walks(g) for arm, g in guests.items()}
    res = {'sizes': list(sizes), 'mem': mem, 'append': append,
           'device': top}
    for arm in ARMS:
        res[arm] = {'log_errors': bad[arm], 'zone_walks': walks[arm]}
        for n in sizes:
            t = times[arm][str(n)]
            res[arm][str(n)] = dict(t, plug_median=statistics.median(
                t['plug_s']), unplug_median=statistics.median(t['unplug_s']))
    return res


def kernels(plan, reps=None, mem='6G', device=None, timeout=1800,
            done=None):
    """scaling() on each kernel of plan ({series: [sizes]}, in order):
    the same guest (mem, device: default the largest size of all) on
    every kernel, both arms side by side and taking turns.  done(series,
    result), if given, is called after each kernel (to save what is
    measured so far).  Returns {'mem', 'device', 'kernels': {series:
    scaling result, with 'kernel': the release}}."""
    device = device or max(n for sizes in plan.values() for n in sizes)
    res = {'mem': mem, 'device': device, 'kernels': {}}
    for series, sizes in plan.items():
        log(f'kernels: Linux {series}, {mem} guests, '
            + ', '.join(f'{n >> 30} GiB' for n in sizes))
        res['kernels'][series] = scaling(sizes, reps, mem, timeout,
                                         kernel=series, device=device)
        if done:
            done(series, res)
    return res


def zone_walks(g):
    """zone_walk_skip's counters ({'skipped', 'kept', 'walked',
    'disagreed'}), or None if it is not loaded."""
    st, out = g.run('cd /sys/module/zone_walk_skip/parameters 2>/dev/null && '
                    'for f in skipped kept walked disagreed; do '
                    'echo "$f $(cat $f)"; done')
    if st or not out.strip():
        return None
    return {k: int(v) for k, v in (line.split() for line in out.splitlines())}


# --- where the guest spends a plug and an unplug ---------------------

# Functions of mm's memory hotplug path that run at most once per memory
# block (or once per hotplug) and never inside one another, so that
# function_graph with max_graph_depth=1 times each call on its own.
# set_zone_contiguous() is the one that matters (docs/devel/cost.rst): it
# walks the zone from its start, one pageblock at a time, and runs at the
# end of every move_pfn_range_to_zone() and remove_pfn_range_from_zone().
ONLINING_FUNCS = (
    'set_zone_contiguous', 'memmap_init_range', 'sparse_add_section',
    'sparse_remove_section', 'create_memory_block_devices',
    'remove_memory_block_devices', 'start_isolate_page_range',
    'undo_isolate_page_range', 'test_pages_isolated', 'scan_movable_pages',
    'do_migrate_range', 'init_per_zone_wmark_min', 'build_all_zonelists',
    'online_mem_sections', 'offline_mem_sections', 'kswapd_run',
    'kcompactd_run', 'writeback_set_ratelimit', 'lru_add_drain_all',
    'drain_all_pages')

TRACEFS = '/sys/kernel/tracing'

# Sums the function_graph lines " CPU) DURATION us | name();" per
# function: calls, total microseconds, and the mean of the last quarter of
# the calls (a cost that grows with the number of blocks shows there).
_TRACE_SUM = (r"""awk -F'|' 'NF >= 2 && $NF ~ /\(\);/ {"""
              r""" d = $(NF - 1); sub(/ us.*/, "", d); sub(/.*[ )!#*@$+]/, "", d);"""
              r""" f = $NF; gsub(/[ ();]/, "", f);"""
              r""" n[f]++; t[f] += d; v[f, n[f]] = d }"""
              r""" END { for (f in n) { q = int(n[f] / 4); if (q < 1) q = 1;"""
              r""" l = 0; for (i = n[f] - q + 1; i <= n[f]; i++) l += v[f, i];"""
              r""" printf "%s %d %.1f %.1f\n", f, n[f], t[f], l / q } }'""")


class GraphTrace:
    """function_graph over ONLINING_FUNCS in a running guest.  Only the
    per-function sums leave the guest: the console is too slow for the
    trace itself."""

    def __init__(self, g):
        self.g = g
        g.run(f'mountpoint -q {TRACEFS} || mount -t tracefs nodev {TRACEFS}',
              check=True)
        st, out = g.run(
            'for f in ' + ' '.join(ONLINING_FUNCS) + '; do grep -qx "$f" '
            f'{TRACEFS}/available_filter_functions && echo "$f"; done',
            timeout=120)
        self.funcs = out.split()
        if 'set_zone_contiguous' not in self.funcs:
            raise HarnessError('guest kernel cannot trace set_zone_contiguous '
                               f'(traceable: {self.funcs})')
        cmds = [f'echo 0 > {TRACEFS}/tracing_on', f'echo nop > {TRACEFS}/current_tracer']
        cmds += [f'echo {f} >> {TRACEFS}/set_graph_function' for f in self.funcs]
        cmds += [f'echo 1 > {TRACEFS}/max_graph_depth',
                 f'echo 4096 > {TRACEFS}/buffer_size_kb',
                 f'echo function_graph > {TRACEFS}/current_tracer',
                 f'echo nofuncgraph-irqs > {TRACEFS}/trace_options']
        g.run(' && '.join(cmds), check=True, timeout=120)

    def start(self):
        self.g.run(f'echo > {TRACEFS}/trace && echo 1 > {TRACEFS}/tracing_on',
                   check=True)

    def stop(self):
        """Stop tracing; {function: {'calls', 'total_ms', 'last_q_ms'}}.
        Raises if the ring buffer overran: the sums would be short."""
        g = self.g
        g.run(f'echo 0 > {TRACEFS}/tracing_on', check=True)
        st, out = g.run(f'cat {TRACEFS}/per_cpu/cpu*/stats', check=True)
        lost = sum(int(x) for x in re.findall(r'^overrun: (\d+)', out, re.M))
        if lost:
            raise HarnessError(f'trace ring buffer overran ({lost} events '
                               'lost): raise buffer_size_kb')
        out = g.run(f'cat {TRACEFS}/trace > /tmp/graph.trace && '
                    + _TRACE_SUM + ' /tmp/graph.trace', check=True,
                    timeout=300)[1]
        res = {}
        for line in out.splitlines():
            f, calls, tot, lastq = line.split()
            res[f] = {'calls': int(calls), 'total_ms': float(tot) / 1e3,
                      'last_q_ms': float(lastq) / 1e3}
        return res


def onlining(arm, n=16 * GiB, mem='6G', timeout=1800, append=''):
    """One plug of n and one unplug back to 0 under function_graph: per
    function of mm's hotplug path, the calls and the time.  Tracing costs
    time itself, so the wall times here are not those of scaling()."""
    with guest_for(arm, 'onlining', mem, f'{n // GiB}G', reserve=False,
                   maxmem=f'{n // GiB + 16}G', append=append) as g:
        tr = GraphTrace(g)
        r = {'n': n, 'mem': mem, 'blocks': n // (128 * MiB)}
        for op, want, total in (('plug', n, memtotal_after(arm, g, n)),
                                ('unplug', 0, g.boot_total)):
            tr.start()
            secs = timed_resize(g, want, total, timeout)
            r[op] = {'seconds': secs, 'funcs': tr.stop()}
            z = r[op]['funcs'].get('set_zone_contiguous', {})
            log(f'onlining {arm} {op} {n >> 30} GiB {append}: {secs:.2f}s '
                'traced, '
                f'set_zone_contiguous {z.get("calls", 0)} calls, '
                f'{z.get("total_ms", 0):.0f} ms')
        r['log_errors'] = g.bad_log_lines()
        r['zone_walks'] = zone_walks(g)
    return r


# --- cgroup limits, for the margin benchmark --------------------------

class Limit:
    """The memory limit of a guest's cgroup, and the kernel's record of
    what happened under it: v2 memory.max, memory.events (max, oom_kill)
    and memory.peak; v1 memory.limit_in_bytes, memory.failcnt,
    memory.oom_control (oom_kill) and memory.max_usage_in_bytes."""

    def __init__(self, g):
        self.cg = g.cg
        self.v2 = g.cg.version == 2
        self._peak_fd = None

    def _path(self, name):
        return os.path.join(self.cg.path, name)

    def _read(self, name):
        with open(self._path(name)) as f:
            return f.read()

    def _keyed(self, name, key):
        for line in self._read(name).splitlines():
            k, _, v = line.partition(' ')
            if k == key:
                return int(v)
        return 0

    def set(self, nbytes):
        """Set the limit (None: none).  Returns None, or why the kernel
        refused (v1 refuses to go below the current charge)."""
        if nbytes is None:
            val = 'max' if self.v2 else '-1'
        else:
            val = str(max(0, int(nbytes)) // 4096 * 4096)
        try:
            with open(self._path('memory.max' if self.v2 else
                                 'memory.limit_in_bytes'), 'w') as f:
                f.write(val)
        except OSError as e:
            return f'limit {val} refused: {e.strerror}'
        return None

    def hits(self):
        """How many times the charge ran into the limit (reclaim)."""
        if self.v2:
            return self._keyed('memory.events', 'max')
        return int(self._read('memory.failcnt'))

    def oom_kills(self):
        return self._keyed('memory.events' if self.v2 else
                           'memory.oom_control', 'oom_kill')

    def reset_peak(self):
        """Start a new peak; peak() is the highest charge since."""
        if not self.v2:
            with open(self._path('memory.max_usage_in_bytes'), 'w') as f:
                f.write('0')
            return
        # v2 (6.12+): a write resets the peak seen through this fd.
        if self._peak_fd is None:
            self._peak_fd = os.open(self._path('memory.peak'), os.O_RDWR)
        os.write(self._peak_fd, b'reset\n')

    def peak(self):
        if not self.v2:
            return int(self._read('memory.max_usage_in_bytes'))
        os.lseek(self._peak_fd, 0, os.SEEK_SET)
        return int(os.read(self._peak_fd, 64))

    def close(self):
        if self._peak_fd is not None:
            os.close(self._peak_fd)
            self._peak_fd = None


def margin_run(arm, n, touch, mem, margin=None, ref=None, timeout=900):
    """One grow/touch/shrink run in a fresh guest, under the limit a
    resize-aware tool keeps: base + max(size, requested) + margin, raised
    before the grow and lowered only once the shrink settled.  base is
    the charge after boot, before any plug.

    The guest touches `touch` bytes of what it gained (the host cannot
    hold 64 GiB for it).  The limit leaves out what the guest leaves
    untouched on purpose (its MemTotal gain less `touch`), so the run
    needs the margin a guest that used all its memory would need.

    margin None: no limit; measures per phase the peak charge over
    base + max(size, requested) [- untouched], the margin that run
    needed.  Else the run survives if QEMU is never OOM-killed, the
    charge never runs into the limit (no reclaim), every limit write is
    accepted, and no step takes longer than 2x its time in `ref` + 20 s.
    """
    r = {'arm': arm, 'n': n, 'margin': margin, 'need': {}, 'secs': {},
         'survived': True, 'why': ''}
    phase_limit = {}
    g = guest_for(arm, 'margin', mem, f'{max(4, n // GiB)}G', reserve=False,
                  maxmem=f'{n // GiB + 8}G')
    with g:
        g.run('memtouch 1', check=True)     # warm the tool's code paths
        lim = Limit(g)
        base = g.charge()
        oom0, hits0 = lim.oom_kills(), lim.hits()
        r['base'] = base

        def phase(name, formula, step):
            """Run step under base + formula + margin; record the peak
            over base + formula and the step's seconds."""
            phase_limit[name] = base + formula
            if margin is not None:
                why = lim.set(base + formula + margin)
                if why:
                    raise HarnessError(f'{name}: {why}')
            lim.reset_peak()
            t0 = time.monotonic()
            step()
            r['secs'][name] = time.monotonic() - t0
            r['need'][name] = lim.peak() - phase_limit[name]
            bound = (2 * ref['secs'][name] + 20) if ref else None
            if bound and r['secs'][name] > bound:
                raise HarnessError(f'{name} took {r["secs"][name]:.1f}s, '
                                   f'bound {bound:.1f}s (reclaim stall)')

        def do_touch():
            _, out = g.run(f'memtouch {r["touch_target"] >> 20}',
                           timeout=timeout, check=True)
            r['touched'] = int(re.match(r'touched (\d+) MiB',
                                        out).group(1)) * MiB

        # Whatever fails once a limit is set (QEMU killed, QMP or the
        # control channel lost, a step too slow) fails the run, quietly.
        try:
            phase('grow', n, lambda: g.resize(n, timeout=timeout))
            gain = g.mem_total() - g.boot_total
            r['gain'] = gain
            r['touch_target'] = min(touch, movable_free(g)) // MiB * MiB
            untouched = gain - r['touch_target']
            phase('touch', n - untouched, do_touch)
            phase('shrink', n - untouched,
                  lambda: g.resize(0, timeout=timeout))
            # A few seconds at rest under the lowered limit; each read
            # of MemTotal is a guest command: the guest keeps working.
            phase('rest', 0, lambda: [g.mem_total() for _ in range(20)])
            r['hits'] = lim.hits() - hits0
            if margin is not None and r['hits']:
                raise HarnessError(f'the charge ran into the limit '
                                   f'{r["hits"]} time(s): reclaim')
        except Exception as e:  # pylint: disable=broad-except
            if margin is None:
                raise
            r['survived'] = False
            r['why'] = f'{type(e).__name__}: {str(e).splitlines()[0]}'
        with contextlib.suppress(OSError):
            r['oom_kills'] = lim.oom_kills() - oom0
            r['hits'] = lim.hits() - hits0
        if r.get('oom_kills'):
            r['survived'] = False
            r['why'] = f'{r["oom_kills"]} OOM kill(s); ' + r['why']
        lim.close()
        r['log_errors'] = g.bad_log_lines() if r['survived'] else []
    r['phase_limit'] = {k: v - r.get('base', 0) for k, v in phase_limit.items()}
    r['needed'] = max(r['need'].values()) if r['need'] else None
    return r


def margin(arm, n, touch, mem='2G', trials=3, resolution=2 * MiB):
    """The smallest margin (limit = base + max(size, requested) + margin)
    under which a fresh guest survives margin_run(): one run without a
    limit measures what it needed; then at most `trials` runs bisect,
    starting just above and just below that figure, until the bracket
    is within `resolution`."""
    ref = margin_run(arm, n, touch, mem)
    if not ref['survived']:
        raise HarnessError(f'{arm} {n >> 30} GiB without a limit: '
                           f'{ref["why"]}')
    need = max(0, ref['needed'])
    log(f'margin {arm} {n >> 30} GiB: without a limit it needed '
        f'{need / MiB:.1f} MiB (' + ', '.join(
            f'{k} {v / MiB:+.1f}' for k, v in ref['need'].items()) + ')')
    step = max(resolution, need // 8)
    lo, hi = None, None      # largest failing, smallest surviving margin
    runs = []
    for i in range(trials):
        if hi is None:
            m = need + step if lo is None else 2 * lo + step
        elif lo is None:
            if hi == 0:
                break
            m = max(0, min(need, hi) - step)
        elif hi - lo > resolution:
            m = (lo + hi) // 2
        else:
            break
        m = int(math.ceil(m / MiB)) * MiB
        if m in (lo, hi):
            break
        run = margin_run(arm, n, touch, mem, margin=m, ref=ref)
        runs.append(run)
        log(f'margin {arm} {n >> 30} GiB trial {i + 1}: {m >> 20} MiB: '
            + ('survived' if run['survived'] else f'failed ({run["why"]})'))
        if run['survived']:
            hi = m if hi is None else min(hi, m)
        else:
            lo = m if lo is None else max(lo, m)
    return {'n': n, 'touch': touch, 'mem': mem, 'reference': ref,
            'trials': runs, 'margin': hi, 'failed_at': lo,
            'needed_unlimited': need}


__all__ = ['ARMS', 'footprint', 'usable', 'capacity', 'speed', 'bound',
           'scaling', 'kernels', 'margin', 'margin_run', 'Limit',
           'memtotal_after',
           'device_has', 'HarnessError', 'GiB', 'MiB']
