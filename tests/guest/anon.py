# SPDX-License-Identifier: GPL-2.0-or-later
"""
Where a QEMU process's anonymous memory is: smaps split by owner, glibc's
arenas named by the thread that uses them, malloc_trim(0) and
malloc_info() called in the live process through gdb.

Used by scripts/qemu-anon-growth (docs/devel/cost.rst, "QEMU's own memory
after a grow and a shrink").  Needs gdb and libc6-dbg for the gdb parts.
"""

import os
import re
import subprocess
import tempfile

MiB = 1 << 20
HEAP_MAX = 64 * MiB             # glibc's HEAP_MAX_SIZE on 64-bit hosts

VMA = re.compile(r'^([0-9a-f]+)-([0-9a-f]+) (\S{4}) \S+ \S+ (\d+)\s*(.*)$')


def vmas(pid):
    """The process's mappings from smaps: dicts with start, end, perms,
    name, anon (Anonymous: bytes), rss."""
    out = []
    cur = None
    with open(f'/proc/{pid}/smaps') as f:
        for line in f:
            m = VMA.match(line)
            if m:
                cur = {'start': int(m.group(1), 16),
                       'end': int(m.group(2), 16), 'perms': m.group(3),
                       'inode': int(m.group(4)),
                       'name': m.group(5).strip(), 'anon': 0, 'rss': 0}
                out.append(cur)
            elif line.startswith('Anonymous:'):
                cur['anon'] = int(line.split()[1]) * 1024
            elif line.startswith('Rss:'):
                cur['rss'] = int(line.split()[1]) * 1024
    return out


def rollup_anon(pid):
    with open(f'/proc/{pid}/smaps_rollup') as f:
        for line in f:
            if line.startswith('Anonymous:'):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f'no Anonymous: in /proc/{pid}/smaps_rollup')


def classify(pid, ramblocks, arenas=None):
    """Anonymous bytes by owner:
      ram        the guest's RAMBlocks (ramblocks: {name: (hva, size)})
      heap       glibc's main arena ([heap], the brk heap)
      arena      glibc's other arenas (64 MiB-aligned heaps; per arena
                 start in `arenas` if given, see arena_threads())
      tcg-code   TCG's code buffer (the anonymous rwx mapping)
      other      everything else (thread stacks, mmap'd large mallocs,
                 the project's vmemmap bitmap, ...)
    Returns (totals dict, per-arena dict {heap start: anon bytes})."""
    tot = {'ram': 0, 'heap': 0, 'arena': 0, 'tcg-code': 0, 'other': 0}
    per_heap = {}
    maps = vmas(pid)
    for i, v in enumerate(maps):
        if not v['anon']:
            continue
        if any(h <= v['start'] and v['end'] <= h + s
               for h, s in ramblocks.values()):
            tot['ram'] += v['anon']
        elif v['name'] == '[heap]':
            tot['heap'] += v['anon']
        elif 'x' in v['perms'] and not v['name']:
            tot['tcg-code'] += v['anon']
        elif (v['start'] % HEAP_MAX == 0 and not v['name'] and
              i + 1 < len(maps) and maps[i + 1]['perms'] == '---p' and
              maps[i + 1]['start'] == v['end'] and
              maps[i + 1]['end'] - v['start'] == HEAP_MAX) or \
                (v['start'] % HEAP_MAX == 0 and not v['name'] and
                 v['end'] - v['start'] == HEAP_MAX):
            tot['arena'] += v['anon']
            per_heap[v['start']] = v['anon']
        else:
            tot['other'] += v['anon']
    return tot, per_heap


def gdb(pid, commands, timeout=120):
    """Run gdb commands in the live process (stopped while gdb runs)."""
    # /proc/PID/exe: the binary may have been relinked since QEMU started
    args = ['gdb', f'/proc/{pid}/exe', '-p', str(pid), '-batch', '-nx',
            '-ex', 'set pagination off', '-ex', 'set confirm off']
    for c in commands:
        args += ['-ex', c]
    r = subprocess.run(args, capture_output=True, text=True, timeout=timeout,
                       check=False)
    if r.returncode:
        raise RuntimeError(f'gdb -p {pid} failed ({r.returncode}): '
                           f'{r.stderr[-2000:]}')
    return r.stdout


def malloc_trim(pid):
    out = gdb(pid, ['call (int)malloc_trim(0)'])
    m = re.search(r'\$1 = (-?\d+)', out)
    if not m:
        raise RuntimeError(f'malloc_trim(0) through gdb printed no result '
                           f'(is libc6-dbg installed?): {out[-1000:]}')
    return int(m.group(1))


def malloc_info(pid):
    """glibc's malloc_info() XML of the live process, as a list of dicts
    per arena: heap (index), system (bytes mapped), in-use estimate
    (system - free), free (fast + rest)."""
    fd, path = tempfile.mkstemp(prefix='malloc-info-', suffix='.xml')
    os.close(fd)
    os.chmod(path, 0o666)
    try:
        gdb(pid, [f'set $f = (void *)fopen("{path}", "w")',
                  'call (int)malloc_info(0, $f)',
                  'call (int)fclose($f)'])
        with open(path) as f:
            xml = f.read()
    finally:
        os.unlink(path)
    heaps = []
    for m in re.finditer(r'<heap nr="(\d+)">(.*?)</heap>', xml, re.S):
        body = m.group(2)
        tail = body[body.rfind('</sizes>'):]

        def total(kind, what, s=tail):
            t = re.search(rf'<total type="{kind}" count="\d+" '
                          rf'size="(\d+)"/>', s)
            return int(t.group(1)) if t else 0
        system = re.search(r'<system type="current" size="(\d+)"/>', tail)
        free = total('fast', 0) + total('rest', 0)
        sys_b = int(system.group(1)) if system else 0
        heaps.append({'nr': int(m.group(1)), 'system': sys_b, 'free': free,
                      'used': sys_b - free})
    return heaps


def arena_threads(pid):
    """{arena address: [thread names]} from each thread's thread_arena
    (glibc's TLS pointer to the arena the thread allocates from)."""
    out = gdb(pid, ['thread apply all p/x (unsigned long)thread_arena'])
    res = {}
    name = None
    for line in out.splitlines():
        m = re.match(r'Thread \S+ \(Thread 0x[0-9a-f]+ \(LWP (\d+)\) '
                     r'"([^"]*)"', line)
        if m:
            name = m.group(2)
            continue
        m = re.match(r'\$\d+ = (0x[0-9a-f]+|0)', line)
        if m and name is not None:
            res.setdefault(int(m.group(1), 16), []).append(name)
            name = None
    return res


TLB_GDB = '''
set $c = cpus_queue.tqh_first
printf "entry %lu %lu\\n", sizeof(CPUTLBEntry), sizeof(CPUTLBEntryFull)
while $c
  set $i = 0
  while $i < 16
    printf "tlb %d %d %lu\\n", $c->cpu_index, $i, \\
      ($c->neg.tlb.f[$i].mask >> 5) + 1
    set $i = $i + 1
  end
  set $c = $c->node.tqe_next
end
'''


def tcg_tlbs(pid):
    """TCG's softmmu TLBs now: {'bytes': total, 'entries': {cpu: [per MMU
    index]}}; each entry costs a CPUTLBEntry and a CPUTLBEntryFull, both
    g_new()'d by the vCPU thread (cputlb.c: tlb_mmu_resize_locked)."""
    fd, path = tempfile.mkstemp(prefix='tlb-', suffix='.gdb')
    with os.fdopen(fd, 'w') as f:
        f.write(TLB_GDB)
    try:
        out = gdb(pid, [f'source {path}'])
    finally:
        os.unlink(path)
    m = re.search(r'^entry (\d+) (\d+)$', out, re.M)
    if not m:
        raise RuntimeError(f'gdb could not read the TLBs: {out[-1000:]}')
    per = int(m.group(1)) + int(m.group(2))
    entries = {}
    for cpu, _, n in re.findall(r'^tlb (\d+) (\d+) (\d+)$', out, re.M):
        entries.setdefault(int(cpu), []).append(int(n))
    return {'bytes': per * sum(sum(v) for v in entries.values()),
            'entry_bytes': per, 'entries': entries}
