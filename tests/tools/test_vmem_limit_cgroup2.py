#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""
vmem-limit on a real cgroup v2 memory controller (issue 17, item 5).

This host's memory controller is v1, so the tool's v2 code (memory.max,
memory.high, memory.current, memory.events; cgroup.procs and the
"0::" line of /proc/PID/cgroup for the peer check) runs here inside a
booted Debian 13 guest: systemd as PID 1, the unified hierarchy.  The
host-built tool (build/vmem-limit) and a QMP stand-in
(tests/tools/qmp_standin.py: QEMU with one virtio-mem device and its
guest, as one process that holds the memory they would) come in on a
disk of their own; the image is scripts/build-tools-image's.  The
stand-in runs in a cgroup of its own, /sys/fs/cgroup/vmtest/vm1, and is
the process behind the QMP socket that the tool checks (SO_PEERCRED).

1. show on a fresh v2 cgroup: memory.max and memory.high read "max", the
   charge is memory.current, the limit named "... (v2)";
2. a socket whose listener is in another v2 cgroup is refused (exit 1,
   naming that cgroup), one below the cgroup given is accepted; a v2
   directory without the memory controller is no memory cgroup (exit 3);
3. a resize the VMM refuses after the limit was set: memory.max and
   memory.high are both written back to "max" (exit 5);
4. resize 0 -> 256 MiB -> 64 MiB: memory.max == memory.high == base +
   devices + headroom + margin after each step, the charge following
   the plugged memory;
5. a limit below the charge (--base too low for what the stand-in
   holds): refused, exit 7 with its message, memory.max and memory.high
   unchanged, no OOM kill;
6. the charge rises between the tool's reading and its lowering (the
   charge_on_open.c fault: 96 MiB charged as the tool opens memory.high):
   v2 would take the lower memory.max and OOM-kill, so the tool must read
   the charge again and refuse (exit 7), nothing killed;
7. a user the cgroup is not delegated to: exit 2 naming memory.max,
   nothing changed or resized; with memory.max and memory.high chowned
   to the user (v2 delegation), the user's resize sets both;
8. follow: a resize by another QMP client and memory.high lowered by
   hand are set right, the line saying what memory.high was;
9. the stand-in outgrows the limit: the kernel OOM-kills it, and follow
   exits 8 naming memory.events' oom_kill count and the limit met.

VMEM_LIMIT_TOOL=PATH runs another build of the tool (the one before the
v2 re-read of the charge fails case 6 with oom_kill 1).
"""

import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)),
                                '..', 'guest'))

# pylint: disable=wrong-import-position
from vmtest import (BUILD, MiB, TOP, HarnessError, SystemdGuest,  # noqa: E402
                    Tests, check, log, poll, require_kit)

TOOL = os.environ.get('VMEM_LIMIT_TOOL') or os.path.join(BUILD, 'vmem-limit')
STANDIN = os.path.join(TOP, 'tests', 'tools', 'qmp_standin.py')
SHIM = os.path.join(TOP, 'tests', 'tools', 'charge_on_open.c')
EXIT = {'usage': 1, 'permission': 2, 'cgroup': 3, 'lost': 4, 'refused': 5,
        'timeout': 6, 'below': 7, 'oom': 8}

# In the guest.
MNT = '/mnt/tools'
GTOOL = f'{MNT}/vmem-limit'
GSTANDIN = f'python3 {MNT}/qmp_standin.py'
PARENT = '/sys/fs/cgroup/vmtest'
CG = f'{PARENT}/vm1'
SOCK = '/run/vm1.qmp'
STATE = '/run/vmem-limit-test'

# The stand-in's VM, and the tool's defaults.
BOOT_RAM = 128 * MiB
TOUCHED = 64 * MiB
MAX_SIZE = 512 * MiB
OVERHEAD = 256 * MiB
MARGIN = 64 * MiB
BASE = BOOT_RAM + OVERHEAD
# What the guest charges while the tool lowers the limit.
RISE = 96 * MiB
REFUSAL = 'virtio-mem device cannot get resized while migration is running'


def page_up(n):
    return (n + 4095) & ~4095


def want(base, held):
    """base + devices + headroom (memmap of growing to max-size) + margin."""
    return page_up(base + held + page_up((MAX_SIZE - held) // 64) + MARGIN)


def mib(n):
    """As the tool prints sizes."""
    return f'{n / MiB:.1f} MiB'


class ToolsGuest(SystemdGuest):
    """The tools image (scripts/build-tools-image) booted without an
    initramfs: root and the tools disk are namespaces 1 and 2 of one NVMe
    controller, whose driver Debian's cloud kernel has built in."""

    def __init__(self, image, kernel, tools):
        super().__init__('vmem-limit-v2', image, kernel, None, mem='1536M',
                         smp=2, cgroup=False)
        self.tools = tools

    def cmdline(self):
        return 'root=/dev/nvme0n1 rootwait rw console=ttyS0 panic=-1'

    def boot_args(self):
        return ['-kernel', self.kernel, '-append', self.cmdline(),
                '-drive', f'file={self.image},if=none,id=disk0,format=raw,'
                'snapshot=on',
                '-drive', f'file={self.tools},if=none,id=tools,format=raw,'
                'readonly=on',
                '-device', 'nvme,id=nvme0,serial=vmtest',
                '-device', 'nvme-ns,bus=nvme0,nsid=1,drive=disk0',
                '-device', 'nvme-ns,bus=nvme0,nsid=2,drive=tools']

    def wait_ready(self, timeout, what='guest boot'):
        # No udev in the image (nothing for it to load): READY is enough.
        super(SystemdGuest, self).wait_ready(timeout, what)  # noqa


# --- guest side ----------------------------------------------------------

def sh(g, cmd, timeout=120):
    return g.run(cmd, timeout=timeout, check=True)[1]


def cgfiles(g, *names, cg=CG):
    out = sh(g, ' '.join(f'echo "{n}=$(cat {cg}/{n} | tr "\\n" " ")";'
                         for n in names))
    return {k: v.strip() for k, v in
            (line.split('=', 1) for line in out.splitlines() if '=' in line)}


def charge(g):
    return int(cgfiles(g, 'memory.current')['memory.current'])


def oom_kills(g, cg=CG):
    events = cgfiles(g, 'memory.events', cg=cg)['memory.events'].split()
    return int(events[events.index('oom_kill') + 1])


def limits(g):
    f = cgfiles(g, 'memory.max', 'memory.high')
    return f['memory.max'], f['memory.high']


def tool(g, *args, expect=0, sock=SOCK, cg=CG, pre='', wrap='',
         state=STATE):
    """Run the tool in the guest: (stdout, stderr, status), the status
    checked unless expect is None.  pre: shell commands before it, in the
    subshell that runs it; wrap: a command that runs it."""
    cmd = (f'({pre} exec {wrap} {GTOOL} --state-dir {state} -q {sock} '
           f'-c {cg} '
           + ' '.join(args) + ') 2> /tmp/vl.err; rc=$?; echo @@STDERR@@; '
           'cat /tmp/vl.err; exit $rc')
    st, out = g.run(cmd, timeout=300)
    stdout, _, stderr = out.partition('@@STDERR@@\n')
    for line in stdout.splitlines():
        log(f'  | {line}')
    for line in stderr.splitlines():
        log(f'  ! {line}')
    check(expect is None or st == expect, f'vmem-limit {" ".join(args)}: '
          f'exit {st}, expected {expect}\n{stderr}')
    return stdout, stderr, st


def call(g, cmd, args=None, sock=SOCK, check_=True):
    """One QMP command to the stand-in from another client."""
    a = f" '{json.dumps(args)}'" if args is not None else ''
    st, out = g.run(f'{GSTANDIN} call --socket {sock} {cmd}{a}', timeout=120)
    if check_:
        check(st == 0, f'{cmd} to the stand-in failed: {out}')
        return json.loads(out)
    return st, out


def start_standin(g, cg, sock, touched=TOUCHED):
    """The stand-in in cg: a subshell moves itself there, then runs it;
    it returns once the socket listens.  Returns its pid."""
    sh(g, f'mkdir -p {cg} && (echo $BASHPID > {cg}/cgroup.procs && exec '
       f'{GSTANDIN} serve --socket {sock} --boot-ram {BOOT_RAM} '
       f'--touched {touched} --max-size {MAX_SIZE} --daemonize)')
    pid = call(g, 'x-stats', sock=sock)['pid']
    procs = sh(g, f'cat {cg}/cgroup.procs').split()
    where = sh(g, f'cat /proc/{pid}/cgroup').strip()
    check(str(pid) in procs and where == f'0::{cg[len("/sys/fs/cgroup"):]}',
          f'stand-in {pid} not in {cg}: procs {procs}, /proc/{pid}/cgroup '
          f'{where!r}')
    return pid


# --- the cases -------------------------------------------------------------

def show_fresh(g, st):
    out = sh(g, f'cat {CG}/memory.current; {GTOOL} --state-dir {STATE} '
             f'-q {SOCK} -c {CG} show --json; cat {CG}/memory.current')
    lines = out.splitlines()
    before, after = int(lines[0]), int(lines[-1])
    info = json.loads('\n'.join(lines[1:-1]))
    log(f'show: charge {info["charge"]} (memory.current {before} before, '
        f'{after} after), limit {info["limit"]}, soft-limit '
        f'{info["soft-limit"]}, base {info["base"]} ({info["base-source"]})'
        f', wanted {info["wanted"]}')
    check(info['limit-name'] ==
          f'memory.max and memory.high of cgroup {CG} (v2)',
          f'limit-name {info["limit-name"]!r}')
    check(info['limit'] == -1 and info['soft-limit'] == -1,
          f'memory.max/memory.high "max" read as {info["limit"]}, '
          f'{info["soft-limit"]}')
    check(min(before, after) - MiB <= info['charge'] <=
          max(before, after) + MiB,
          f'charge {info["charge"]} is not memory.current ({before}, '
          f'{after})')
    check(info['charge'] >= TOUCHED, f'charge {info["charge"]} below the '
          f'{TOUCHED} bytes the stand-in touched: not its cgroup?')
    check(info['base'] == BASE and info['wanted'] == want(BASE, 0),
          f'base {info["base"]}, wanted {info["wanted"]}; expected {BASE}, '
          f'{want(BASE, 0)}')
    st['charge0'] = info['charge']


def other_cgroups(g, st):
    cg2, sock2 = f'{PARENT}/vm2', '/run/vm2.qmp'
    pid2 = start_standin(g, cg2, sock2, touched=0)
    try:
        _, err, _ = tool(g, 'show', sock=sock2, expect=EXIT['usage'])
        check(f'belongs to QEMU pid {pid2}, which is not in cgroup {CG} '
              f'(nor below it) but in {cg2}' in err, f'message: {err}')
    finally:
        call(g, 'quit', sock=sock2)
    poll(lambda: not sh(g, f'cat {cg2}/cgroup.procs').strip(), 30,
         f'{cg2} to empty')
    sh(g, f'rmdir {cg2}')

    # The listener below the cgroup given is the VM's (a scope's child).
    out, _, _ = tool(g, 'show', cg=PARENT)
    check(f'memory.max and memory.high of cgroup {PARENT} (v2)' in out,
          f'show -c {PARENT}: {out}')

    sub = f'{CG}/nomem'
    sh(g, f'mkdir {sub}')
    try:
        check(sh(g, f'cat {sub}/cgroup.controllers').strip() == '',
              f'{sub} has controllers')
        _, err, _ = tool(g, 'show', cg=sub, expect=EXIT['cgroup'])
        check(f'{sub} is not a memory cgroup' in err and
              'cgroup.subtree_control' in err, f'message: {err}')
    finally:
        sh(g, f'rmdir {sub}')
    check(limits(g) == ('max', 'max'), f'limits changed: {limits(g)}')


def refused_resize(g, st):
    call(g, 'x-refuse-resize', {'desc': REFUSAL})
    try:
        out, err, _ = tool(g, 'resize', 'vm0', '256M', expect=EXIT['refused'])
    finally:
        call(g, 'x-refuse-resize', {'desc': None})
    during = want(BASE, 256 * MiB)
    check(f'(v2) from unlimited to {mib(during)} (before growing vm0' in out,
          f'the limit was not set before the resize: {out}')
    check(f'QEMU refused qom-set: {REFUSAL}' in err and
          'The limit is back at unlimited' in err, f'message: {err}')
    check(limits(g) == ('max', 'max'),
          f'memory.max, memory.high after the refusal: {limits(g)}, not '
          f'"max" again')


def resize_steps(g, st):
    c0 = charge(g)
    for req in (256 * MiB, 64 * MiB):
        out, _, _ = tool(g, 'resize', 'vm0', str(req))
        c = charge(g)
        lim = want(BASE, req)
        log(f'resize to {req >> 20} MiB: memory.max, memory.high '
            f'{limits(g)}, want {lim}; memory.current {c} '
            f'({(c - c0) / MiB:+.1f} MiB since 0 plugged)')
        check(limits(g) == (str(lim), str(lim)),
              f'memory.max, memory.high {limits(g)} != {lim}')
        # The stand-in touches what it plugs and frees what it unplugs.
        check(abs((c - c0) - req) < 8 * MiB,
              f'charge rose by {c - c0} with {req} plugged')
        m = re.search(r'settled at [\d.]+ MiB\); charge ([\d.]+) MiB', out)
        check(m and abs(float(m.group(1)) * MiB - c) < 2 * MiB,
              f'the tool read a charge of {m and m.group(1)} MiB, '
              f'memory.current is {c}')
    check(f'lowered memory.max and memory.high of cgroup {CG} (v2) from '
          f'{mib(want(BASE, 256 * MiB))} to {mib(want(BASE, 64 * MiB))}'
          in out, f'no lowering after the shrink settled: {out}')


def below_charge(g, st):
    call(g, 'x-heap', {'bytes': 96 * MiB})
    before = limits(g)
    c = charge(g)
    low = want(64 * MiB, 64 * MiB)
    check(c > low, f'charge {c} not above {low}: nothing to refuse')
    _, err, _ = tool(g, '--base', '64M', 'follow', '--once',
                  expect=EXIT['below'])
    m = re.search(rf'not lowering memory.max and memory.high of cgroup {CG} '
                  rf'\(v2\) from ([\d.]+ MiB) to ([\d.]+ MiB): the charge '
                  rf'\(memory.current\) is ([\d.]+) MiB, above it; the limit '
                  rf'stays at ([\d.]+ MiB)', err)
    check(m, f'message: {err}')
    log(f'refused: from {m.group(1)} to {m.group(2)}, charge {m.group(3)} '
        f'MiB (memory.current {c})')
    check(m.group(1) == m.group(4) == mib(int(before[0])) and
          m.group(2) == mib(low), f'limits in the message: {m.groups()}')
    check(abs(float(m.group(3)) * MiB - c) < 2 * MiB,
          f'charge {m.group(3)} MiB, memory.current {c}')
    check(limits(g) == before, f'limits {limits(g)} != {before}')
    events = cgfiles(g, 'memory.events')['memory.events']
    check(oom_kills(g) == 0 and ' max 0 ' in f' {events} ',
          f'memory.events: {events}')


def charge_rises_while_lowering(g, st):
    """v2 never refuses a memory.max below the charge (v1 says EBUSY): it
    reclaims, then OOM-kills.  The charge rises after the tool has read
    it, as the tool opens memory.high to lower the limit (the
    charge_on_open.so fault, in the tool run in the VM's cgroup): the
    tool must find it and refuse, not have the kernel kill the VM."""
    before = limits(g)
    c = charge(g)
    held = 64 * MiB
    # A base that puts the new limit 32 MiB above the charge now.
    base = (c + 32 * MiB - held - page_up((MAX_SIZE - held) // 64)
            - MARGIN) // MiB * MiB
    low = want(base, held)
    check(c < low < c + RISE, f'charge {c}, new limit {low}')
    _, err, rc = tool(g, '--base', str(base), 'follow', '--once',
                      expect=None,
                      pre=f'echo $BASHPID > {CG}/cgroup.procs && '
                      f'CHARGE_ON_OPEN=memory.high CHARGE_BYTES={RISE} '
                      f'LD_PRELOAD={MNT}/charge_on_open.so')
    events = cgfiles(g, 'memory.events')['memory.events']
    log(f'limit {before[0]}, lowering to {low} with the charge at {c}, '
        f'{RISE >> 20} MiB more charged meanwhile: exit {rc}, limits now '
        f'{limits(g)}, memory.events: {events}')
    check(rc == EXIT['below'], f'exit {rc}, expected {EXIT["below"]}')
    check(oom_kills(g) == 0, f'the lowering OOM-killed in the cgroup: '
          f'{events}')
    check(limits(g) == before, f'limits {limits(g)} != {before}')
    check('not lowering' in err and 'memory.current' in err,
          f'message: {err}')
    call(g, 'x-stats')


def delegation(g, st):
    """A user the cgroup is not delegated to cannot set its limit (exit 2,
    nothing changed, nothing resized); once memory.max and memory.high
    are the user's, as cgroup v2 delegates, the user's resize sets both."""
    user = 'setpriv --reuid=65534 --regid=65534 --clear-groups'
    state = '/tmp/vmem-limit-nobody'
    sh(g, f'chmod 666 {SOCK} && install -d -o 65534 {state}')
    before = limits(g)
    _, err, _ = tool(g, 'resize', 'vm0', '128M', wrap=user, state=state,
                     expect=EXIT['permission'])
    check(f'cannot write {CG}/memory.max: Permission denied; run as root or '
          'as the user the cgroup is delegated to' in err, f'message: {err}')
    check(limits(g) == before, f'limits {limits(g)} != {before}')
    check(call(g, 'qom-get', {'path': 'vm0', 'property': 'requested-size'})
          == 64 * MiB, 'resized without raising the limit')
    sh(g, f'chown 65534 {CG}/memory.max {CG}/memory.high')
    try:
        tool(g, 'resize', 'vm0', '128M', wrap=user, state=state)
    finally:
        sh(g, f'chown 0 {CG}/memory.max {CG}/memory.high')
    lim = want(BASE, 128 * MiB)
    check(limits(g) == (str(lim), str(lim)),
          f'memory.max, memory.high {limits(g)} != {lim}')
    log(f'as uid 65534: refused before, {lim} set once delegated')


def follow_others(g, st):
    sh(g, f'rm -f /tmp/follow.*; ({GTOOL} --state-dir {STATE} -q {SOCK} '
       f'-c {CG} follow > /tmp/follow.out 2> /tmp/follow.err; '
       'echo $? > /tmp/follow.rc) > /dev/null 2>&1 &')
    poll(lambda: 'following' in sh(g, 'cat /tmp/follow.out'), 60,
         'follow to start')
    lim = want(BASE, 192 * MiB)
    t0 = time.monotonic()
    call(g, 'qom-set', {'path': 'vm0', 'property': 'requested-size',
                        'value': 192 * MiB})
    poll(lambda: limits(g) == (str(lim), str(lim)), 60,
         f'memory.max and memory.high at {lim} (now {limits(g)})')
    log(f'follow: a qom-set of 192 MiB by another client; memory.max and '
        f'memory.high {lim} after {time.monotonic() - t0:.1f} s')
    sh(g, f'echo {lim - 64 * MiB} > {CG}/memory.high')
    t0 = time.monotonic()
    poll(lambda: limits(g) == (str(lim), str(lim)), 30,
         f'memory.high set back to {lim} (now {limits(g)})')
    log(f'follow: memory.high lowered by hand by 64 MiB, set back after '
        f'{time.monotonic() - t0:.1f} s')
    said = f'from {mib(lim)} (memory.high {mib(lim - 64 * MiB)}) to {mib(lim)}'
    poll(lambda: said in sh(g, 'cat /tmp/follow.out'), 10,
         f'follow to say "{said}"')
    check(sh(g, 'test -e /tmp/follow.rc || echo running').strip() ==
          'running', 'follow exited: ' + sh(g, 'cat /tmp/follow.err'))
    st['follow_limit'] = lim


def oom_reported(g, st):
    lim = st.get('follow_limit')
    check(lim, 'no follow running (the previous case failed)')
    pid = call(g, 'x-stats')['pid']
    check(oom_kills(g) == 0, 'an OOM kill before the test made one')
    # "QEMU" grows by more than the limit leaves: the kernel kills it.
    call(g, 'x-heap', {'bytes': 512 * MiB}, check_=False)
    poll(lambda: sh(g, 'cat /tmp/follow.rc 2> /dev/null').strip(), 120,
         'follow to exit')
    rc = int(sh(g, 'cat /tmp/follow.rc'))
    err = sh(g, 'cat /tmp/follow.err')
    for line in sh(g, 'cat /tmp/follow.out').splitlines():
        log(f'  | {line}')
    for line in err.splitlines():
        log(f'  ! {line}')
    kmsg = sh(g, f'dmesg | grep -E "Killed process {pid} |oom-kill:" || '
              'true')
    log('kernel: ' + kmsg.strip().replace('\n', '\n    '))
    check(oom_kills(g) == 1, f'memory.events oom_kill {oom_kills(g)}')
    check(f'Killed process {pid} ' in kmsg, f'no OOM kill of {pid} in dmesg')
    check(rc == EXIT['oom'], f'follow exited {rc}, expected {EXIT["oom"]}')
    check(f'was OOM-killed (QEMU pid {pid}): oom_kill in {CG}/memory.events'
          f' rose from 0 to 1.  The limit was {mib(lim)}' in err,
          f'message: {err}')


def setup(g, st):
    sh(g, f'mkdir -p {MNT} && mount -o ro /dev/nvme0n2 {MNT}')
    ver = sh(g, '. /etc/os-release; echo $VERSION_ID; cat /proc/1/comm; '
             'stat -fc %T /sys/fs/cgroup; '
             'cat /sys/fs/cgroup/cgroup.controllers').split('\n')
    log(f'guest: Debian {ver[0]}, PID 1 {ver[1]}, /sys/fs/cgroup {ver[2]}, '
        f'controllers {ver[3]}')
    check(ver[:3] == ['13', 'systemd', 'cgroup2fs'] and
          'memory' in ver[3].split(), f'not the guest wanted: {ver}')
    missing = sh(g, f'ldd {GTOOL} | grep "not found" || true')
    check(not missing.strip(), f'the tool lacks libraries in the guest:\n'
          f'{missing}')
    sh(g, 'echo +memory > /sys/fs/cgroup/cgroup.subtree_control && '
       f'mkdir -p {PARENT} && echo +memory > {PARENT}/cgroup.subtree_control')
    pid = start_standin(g, CG, SOCK)
    log(f'stand-in pid {pid} in {CG}, QMP socket {SOCK}')


# --- main --------------------------------------------------------------------

def build_image():
    p = subprocess.run([os.path.join(TOP, 'scripts', 'build-tools-image')],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                       text=True, timeout=3600, check=False)
    if p.returncode:
        raise HarnessError(f'scripts/build-tools-image failed '
                           f'({p.returncode}):\n{p.stderr[-3000:]}')
    image = p.stdout.strip().splitlines()[-1]
    d = os.path.dirname(image)
    with open(os.path.join(d, 'kernels')) as f:
        release = next(l.split()[0] for l in f if l.split()[1] == 'main')
    return image, os.path.join(d, 'boot', release, 'vmlinuz')


def tools_disk(tmp):
    src = os.path.join(tmp, 'tools')
    os.makedirs(src)
    shutil.copy2(TOOL, os.path.join(src, 'vmem-limit'))
    shutil.copy2(STANDIN, src)
    subprocess.run(['cc', '-shared', '-fPIC', '-O2', '-Wall', '-o',
                    os.path.join(src, 'charge_on_open.so'), SHIM, '-ldl'],
                   check=True)
    img = os.path.join(tmp, 'tools.img')
    subprocess.run(['mkfs.ext4', '-q', '-L', 'tools', '-d', src, img, '16M'],
                   check=True)
    return img


def main():
    require_kit()
    if not os.access(TOOL, os.X_OK):
        raise HarnessError(f'{TOOL} missing: run scripts/build-tools')
    t = Tests()
    t0 = time.monotonic()
    image, kernel = build_image()
    log(f'image {image}, kernel {kernel} ({time.monotonic() - t0:.1f} s)')
    tmp = tempfile.mkdtemp(prefix='vmem-limit-v2-')
    st = {}
    try:
        t0 = time.monotonic()
        with ToolsGuest(image, kernel, tools_disk(tmp)) as g:
            log(f'booted in {time.monotonic() - t0:.1f} s')
            t.case('the guest: Debian 13, systemd as PID 1, cgroup v2 '
                   'with memory; the stand-in in a cgroup of its own',
                   lambda: setup(g, st))
            t.case('v2: show reads memory.current, and memory.max and '
                   'memory.high at "max"', lambda: show_fresh(g, st))
            t.case('v2: a listener in another cgroup is refused, naming it, '
                   'one below accepted; a cgroup without the memory '
                   'controller is exit 3',
                   lambda: other_cgroups(g, st))
            t.case('v2: a refused resize writes "max" back to memory.max '
                   'and memory.high', lambda: refused_resize(g, st))
            t.case('v2: resize up and down: memory.max == memory.high == '
                   'the limit, the charge follows',
                   lambda: resize_steps(g, st))
            t.case('v2: a limit below memory.current is refused (exit 7), '
                   'nothing written', lambda: below_charge(g, st))
            t.case('v2: the charge rises while the limit is lowered: '
                   'refused (exit 7), nobody OOM-killed',
                   lambda: charge_rises_while_lowering(g, st))
            t.case('v2: not delegated to the user: exit 2, nothing '
                   'changed; delegated: the user\'s resize sets both',
                   lambda: delegation(g, st))
            t.case('v2: follow sets the limit after another client\'s '
                   'resize and memory.high changed by hand',
                   lambda: follow_others(g, st))
            t.case('v2: an OOM kill in the cgroup: follow exits 8 from '
                   'memory.events', lambda: oom_reported(g, st))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    t.done()


if __name__ == '__main__':
    main()
