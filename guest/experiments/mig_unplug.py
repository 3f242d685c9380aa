#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""
Reproducer: live migration while the guest unplugs (test_faults'
"live migration while the guest unplugs", repeated), with evidence.

Per run: boot, settle at 1 GiB, ask for 128 MiB, migrate over a 32 MiB/s
link as soon as `size` moves.  With the destination still paused and the
source stopped, both sides' guest RAM (boot RAM above 1 MiB and the
device's plugged runs) is read with pmemsave and compared page by page,
and the device states (x-query-virtio-mem-state where the binary has it)
are compared.  Then the destination runs on: 384 MiB, 0.  A run fails
with "ram-differs" if any page differs (the destination got a stale
copy: a write the migration lost), "oops" if either guest logs one
("BUG", "Oops", list_debug ...).

--mode cancel starts the same migration to a sink and cancels it before
switchover: the guest sees the device answer BUSY exactly as during a
real migration, but never moves; an oops there is the guest's own.
--mode churn migrates without a resize while the guest fills and drops
300 MiB of page cache in a loop: lost pages without virtio-mem requests.
--qemu takes fork, stock or the path of any other build.

  VMTEST_KERNEL=7.3 guest/experiments/mig_unplug.py --qemu fork \
      --module patched --runs 5 --out /tmp/mig-unplug

Per run, OUT/<qemu>-<module>-<mode>-<pid>-<n>/ keeps both consoles,
both QEMU logs and result.json (device states, the differing pages with
their first differing words, source then destination).  Prints one line
per run and a summary; exits 1 if any run failed.
"""

import argparse
import json
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), '..', '..',
                                'tests', 'guest'))
# pylint: disable=wrong-import-position
from vmtest import (QEMU, STOCK_QEMU, GiB, Guest, MiB, device_state,  # noqa
                    incoming_for, log, migrate, poll)

PAGE = 4096
BAD = ('BUG', 'Oops', 'list_del corruption', 'list_add corruption',
       'general protection', 'Kernel panic', 'WARNING:')


def guest(name, args):
    dev = {'size': '2G', 'block_size': '2M', 'requested': 0}
    if args.qemu == 'fork':
        dev['vmemmap_accounting'] = True
    qemu = {'fork': QEMU, 'stock': STOCK_QEMU}.get(args.qemu, args.qemu)
    return Guest(name, mem='256M', maxmem='8G', smp=args.smp, device=dev,
                 module=args.module, memmap_on_memory=True, qemu=qemu,
                 boot_timeout=300)


def bad_lines(g):
    return [l for l in g.console().splitlines() if any(b in l for b in BAD)]


def ranges(st):
    """Guest-physical ranges to compare: boot RAM above 1 MiB, and the
    device's plugged runs (the whole region where the binary cannot say)."""
    out = [(1 * MiB, 255 * MiB)]
    base = st['memaddr']
    if st.get('plugged') is None:
        out.append((base, st['region-size']))
    else:
        out += [(base + r['offset'], r['length']) for r in st['plugged']]
    return out


def pmem(g, addr, size, path):
    g.vm.cmd('pmemsave', val=addr, size=size, filename=path)


def compare_ram(src, dst, st, workdir):
    """Pages of `ranges(st)` that differ: [(gpa, 'zero-on-dst' | ...)]."""
    diffs = []
    for i, (addr, size) in enumerate(ranges(st)):
        a, b = (os.path.join(workdir, f'mu-{os.getpid()}-{w}-{i}.bin')
                for w in ('src', 'dst'))
        pmem(src, addr, size, a)
        pmem(dst, addr, size, b)
        poll(lambda: all(os.path.exists(p) and os.path.getsize(p) == size
                         for p in (a, b)), 120, 'pmemsave')
        zero = bytes(PAGE)
        with open(a, 'rb') as fa, open(b, 'rb') as fb:
            off = 0
            while off < size:
                ca, cb = fa.read(1 << 20), fb.read(1 << 20)
                if ca != cb:
                    for p in range(0, len(ca), PAGE):
                        pa, pb = ca[p:p + PAGE], cb[p:p + PAGE]
                        if pa != pb:
                            kind = ('zero-on-dst' if pb == zero else
                                    'zero-on-src' if pa == zero else
                                    'differ')
                            words = [(hex(w), pa[w:w + 8][::-1].hex(),
                                      pb[w:w + 8][::-1].hex())
                                     for w in range(0, PAGE, 8)
                                     if pa[w:w + 8] != pb[w:w + 8]]
                            diffs.append((addr + off + p, kind,
                                          len(words), words[:8]))
                off += len(ca)
        os.unlink(a)
        os.unlink(b)
    return diffs


def one_run(args, n, outdir):
    rundir = os.path.join(outdir, f'{os.path.basename(args.qemu)}-'
                          f'{args.module}-{args.mode}-'
                          f'{os.getpid()}-{n}')
    os.makedirs(rundir, exist_ok=True)
    res = {'run': n, 'qemu': args.qemu, 'module': args.module,
           'mode': args.mode, 'kernel': os.environ.get('VMTEST_KERNEL'),
           'result': 'error'}
    src = guest(f'mu-{os.getpid()}-{n}', args)
    dst = None
    try:
        src.start()
        src.resize(1 * GiB, timeout=300)
        if args.mode in ('migrate', 'churn'):
            dst = incoming_for(src, f'mu-{os.getpid()}-{n}-dst')
            dst.start()
        if args.mode == 'churn':
            # No resize: the page allocator churns (page cache filled
            # and dropped) while the migration runs.
            src.run('(while :; do dd if=/dev/zero of=/churn bs=1M count=300'
                    ' 2>/dev/null; rm -f /churn; done) >/dev/null 2>&1 &')
        else:
            src.qom_set('requested-size', 128 * MiB)
            poll(lambda: src.qom_get('size') != 1 * GiB, 60, 'the unplug to '
                 'start', interval=0.005, backoff=False)
        if args.mode in ('migrate', 'churn'):
            m = migrate(src, dst, bandwidth=32 * MiB, timeout=300)
            res['migration'] = {k: m[k] for k in ('status', 'dst_status',
                                                  'seconds', 'transferred')}
            a, b = device_state(src), device_state(dst)
            res['src_state'], res['dst_state'] = a, b
            res['state_equal'] = all(a[k] == b[k] for k in a if k in b)
            if m['status'] == 'completed' and m['dst_status'] == 'completed':
                t0 = time.monotonic()
                res['status_after'] = (src.vm.cmd('query-status')['status'],
                                       dst.vm.cmd('query-status')['status'])
                d = compare_ram(src, dst, a, '/dev/shm')
                # Control: the stopped source against itself, read again
                # after the comparison (a source still running would
                # differ from itself too).
                d2 = compare_ram(src, src, a, '/dev/shm')
                res['src_self_diff_pages'] = len(d2)
                res['ram_diff_pages'] = len(d)
                res['ram_diff'] = [(hex(p), k, n, w) for p, k, n, w in d[:50]]
                log(f'run {n}: RAM compared in {time.monotonic() - t0:.0f}s:'
                    f' {len(d)} pages differ')
                dst.vm.cmd('cont')
                run_on = dst
            else:
                res['result'] = 'migration-failed'
                return res
        else:
            src.vm.cmd('migrate-set-parameters',
                       **{'max-bandwidth': 32 * MiB})
            src.vm.cmd('migrate', uri='exec:cat > /dev/null')
            time.sleep(args.cancel_after)
            res['at_cancel'] = src.vm.cmd('query-migrate').get('status')
            src.vm.cmd('migrate_cancel')
            poll(lambda: src.vm.cmd('query-migrate').get('status') in
                 ('cancelled', 'failed', 'completed'), 60, 'the cancel')
            run_on = src
        res['size_at_switch'] = src.qom_get('size')
        run_on.run('echo alive', timeout=60)
        run_on.resize(384 * MiB, timeout=300)
        run_on.resize(0, timeout=300)
        run_on.run('echo alive', timeout=60)
        res['result'] = 'ok'
    except Exception as e:  # pylint: disable=broad-except
        res['error'] = f'{type(e).__name__}: {str(e)[:300]}'
    finally:
        for g, w in ((src, 'src'), (dst, 'dst')):
            if g is None:
                continue
            con = g.console()
            with open(os.path.join(rundir, f'console-{w}.log'), 'w') as f:
                f.write(con)
            with open(os.path.join(rundir, f'qemu-{w}.log'), 'w') as f:
                f.write(g.qemu_log())
            bad = bad_lines(g)
            if bad:
                res.setdefault('oops', {})[w] = bad[:10]
            g.stop()
    if res.get('oops'):
        res['result'] = 'oops'
    elif res['result'] == 'ok' and res.get('ram_diff_pages'):
        # The guest survived, but the destination got stale pages.
        res['result'] = 'ram-differs'
    with open(os.path.join(rundir, 'result.json'), 'w') as f:
        json.dump(res, f, indent=1, default=str)
    return res


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n\n')[1])
    ap.add_argument('--qemu', default='fork',
                    help='fork, stock or the path of another QEMU binary')
    ap.add_argument('--module', choices=('patched', 'stock'),
                    default='patched')
    ap.add_argument('--mode', choices=('migrate', 'cancel', 'churn'),
                    default='migrate')
    ap.add_argument('--cancel-after', type=float, default=20)
    ap.add_argument('--smp', type=int, default=1)
    ap.add_argument('--runs', type=int, default=1)
    ap.add_argument('--out', default='/tmp/mig-unplug')
    args = ap.parse_args()
    counts = {}
    for n in range(args.runs):
        t0 = time.monotonic()
        for _ in range(20):
            r = one_run(args, n, args.out)
            # Exit code 126: the binary was being relinked by a build
            # (see the preamble); not a result, wait and run again.
            if 'Exit code: 126' not in r.get('error', ''):
                break
            time.sleep(15)
        counts[r['result']] = counts.get(r['result'], 0) + 1
        print(f'run {n}: {r["result"]} ({time.monotonic() - t0:.0f}s) '
              f'ram_diff={r.get("ram_diff_pages")} '
              f'state_equal={r.get("state_equal")} '
              f'size_at_switch={r.get("size_at_switch", 0) >> 20} MiB '
              f'{r.get("error", "")} {r.get("oops", "")}', flush=True)
    print(f'{args.qemu}+{args.module} {args.mode} on '
          f'{os.environ.get("VMTEST_KERNEL")}: {counts}', flush=True)
    sys.exit(0 if counts.get('ok', 0) == args.runs else 1)


if __name__ == '__main__':
    main()
