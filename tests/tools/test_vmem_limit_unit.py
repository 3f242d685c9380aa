#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""
The systemd unit tools/vmem-limit/vmem-limit@.service, without a systemd
(this machine's PID 1 is not one):

1. `systemd-analyze verify` finds nothing wrong with it (its ExecStart
   binary pointed at the build where /usr/bin/vmem-limit is not
   installed: the only change);
2. its ExecStart command line, parsed out of the unit (%i the domain,
   $VMEM_LIMIT_OPTS from its Environment=), runs as systemd would run it
   (RUNTIME_DIRECTORY, NOTIFY_SOCKET) against the documented domain under
   a private libvirtd (tests/guest/test_libvirt.py's): READY=1 comes once
   hard_limit is set; a grow and a shrink by `virsh update-memory-device`
   move hard_limit and soft_limit, each with one line that has the limit,
   the charge and the headroom;
3. an OOM kill of the domain ends it with exit 8 (a failure: systemd
   restarts it) and says so;
4. run again for the restarted domain, `virsh destroy` ends it with
   exit 0 (no restart).
"""

import contextlib
import fcntl
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.join(HERE, '..', 'guest'))

# pylint: disable=wrong-import-position
from vmtest import (BUILD, TOP, MiB, GiB, HarnessError, Tests,  # noqa: E402
                    check, log, poll, require_kit)
from test_libvirt import (Libvirtd, LibvirtGuest,  # noqa: E402
                          settled_views_agree)

UNIT = os.path.join(TOP, 'tools', 'vmem-limit', 'vmem-limit@.service')
BUILT = os.path.join(BUILD, 'vmem-limit')


def unit_service():
    """The [Service] section: {key: [values]} in file order."""
    out, section = {}, None
    with open(UNIT) as f:
        for line in f:
            line = line.strip()
            if not line or line[0] in '#;':
                continue
            if line.startswith('['):
                section = line
                continue
            if section == '[Service]':
                k, v = line.split('=', 1)
                out.setdefault(k.strip(), []).append(v.strip())
    return out


def unit_environment(service):
    env = {}
    for value in service.get('Environment', []):
        for word in shlex.split(value):
            k, v = word.split('=', 1)
            env[k] = v
    return env


def exec_start(service, instance, env):
    """ExecStart as systemd runs it: %i replaced, $VAR split into words,
    ${VAR} kept as one."""
    (line,) = service['ExecStart']
    line = line.replace('%i', instance)
    argv = []
    for word in shlex.split(line):
        m = re.fullmatch(r'\$(\w+)', word)
        if m:
            argv += env.get(m.group(1), '').split()
        else:
            argv.append(re.sub(r'\$\{(\w+)\}',
                               lambda m: env.get(m.group(1), ''), word))
    return argv


def verify():
    """systemd-analyze verify on a copy whose ExecStart names the build."""
    tool = shutil.which('systemd-analyze')
    if not tool:
        raise HarnessError('systemd-analyze missing: apt-get install systemd '
                           '(scripts/install-deps)')
    d = tempfile.mkdtemp(prefix='vmem-limit-unit-')
    try:
        with open(UNIT) as f:
            text = f.read()
        if not os.access('/usr/bin/vmem-limit', os.X_OK):
            text = text.replace('/usr/bin/vmem-limit', BUILT)
        with open(os.path.join(d, 'vmem-limit@.service'), 'w') as f:
            f.write(text)
        inst = os.path.join(d, 'vmem-limit@vm1.service')
        os.symlink('vmem-limit@.service', inst)
        p = subprocess.run([tool, 'verify', '--man=no', inst],
                           capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(d)
    out = (p.stdout + p.stderr).strip()
    log(f'systemd-analyze verify: exit {p.returncode}'
        + (f'\n{out}' if out else ''))
    ours = [l for l in out.splitlines() if 'vmem-limit' in l]
    check(p.returncode == 0 and not ours,
          f'systemd-analyze verify: exit {p.returncode}: {ours or out}')


def memtune(daemon, domain):
    tune = {k.strip(): v.strip() for k, v in
            (line.split(':', 1) for line in
             daemon.virsh('memtune', domain).splitlines() if ':' in line)}
    return int(tune['hard_limit']) << 10, int(tune['soft_limit']) << 10


class Notify:
    """NOTIFY_SOCKET of a service manager: the datagrams that come."""

    def __init__(self, path):
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(path)
        self.sock.settimeout(0.2)
        self.msgs = []
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.stop.is_set():
            try:
                self.msgs.append((time.monotonic(),
                                  self.sock.recv(4096).decode()))
            except socket.timeout:
                pass

    def close(self):
        self.stop.set()
        self.thread.join()
        self.sock.close()


class Service:
    """The unit's ExecStart, run as systemd would run it for domain
    `g.domain`: the unit's Environment= (and `opts` in VMEM_LIMIT_OPTS,
    as /etc/default/vmem-limit would give them), RUNTIME_DIRECTORY,
    NOTIFY_SOCKET, and the private daemon's URI in LIBVIRT_DEFAULT_URI."""

    def __init__(self, daemon, g, run, opts=''):
        service = unit_service()
        check(service.get('Type') == ['notify'] and
              service.get('Restart') == ['on-failure'],
              f'unit: Type {service.get("Type")}, Restart '
              f'{service.get("Restart")}')
        env = unit_environment(service)
        if opts:
            env['VMEM_LIMIT_OPTS'] = opts
        self.argv = exec_start(service, g.domain, env)
        log(f'ExecStart: {shlex.join(self.argv)}')
        if not os.access(self.argv[0], os.X_OK):
            log(f'{self.argv[0]} is not installed: running {BUILT} in its '
                'place')
            self.argv[0] = BUILT
        self.notify = Notify(os.path.join(run, f'notify-{time.time()}'))
        self.env = {**os.environ, **env, 'RUNTIME_DIRECTORY': run,
                    'NOTIFY_SOCKET': self.notify.path,
                    'LIBVIRT_DEFAULT_URI': daemon.uri}
        self.out = []
        self.p = None

    def start(self):
        """Start it and wait for READY=1, as systemctl start does."""
        self.p = subprocess.Popen(self.argv, env=self.env,
                                  stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True)
        self.reader = threading.Thread(
            target=lambda: self.out.extend(self.p.stdout), daemon=True)
        self.reader.start()
        poll(lambda: self.ready() or self.p.poll() is not None, 120,
             'READY=1 from the service')
        check(self.p.poll() is None,
              f'the service exited {self.p.returncode}: {self.out}')

    def ready(self):
        return any(m == 'READY=1' for _, m in self.notify.msgs)

    def wait(self, timeout):
        rc = self.p.wait(timeout=timeout)
        self.reader.join(10)
        return rc

    def stop(self):
        if self.p and self.p.poll() is None:
            self.p.send_signal(signal.SIGTERM)
            self.p.wait(timeout=10)
        self.notify.close()
        for line in self.out:
            log(f'  journal | {line.rstrip()}')


def tool_show(svc, g):
    return json.loads(subprocess.run(
        [BUILT, '-d', g.domain, 'show', '--json'], env=svc.env, check=True,
        capture_output=True, text=True).stdout)


def follow_domain(daemon, g, run):
    """READY=1 once hard_limit is set; a grow and a shrink by others, one
    journal line per change with limit, charge and headroom."""
    svc = Service(daemon, g, run)
    shown = tool_show(svc, g)
    base, margin = shown['base'], shown['margin']
    max_size = shown['virtio-mem'][0]['max-size']
    log(f'base {base / MiB:.1f} MiB ({shown["base-source"]}), margin '
        f'{margin / MiB:.1f} MiB, device max-size {max_size / GiB:g} GiB')

    def want(size):
        return base + size + (max_size - size) // 64 + margin
    try:
        svc.start()
        hard, soft = memtune(daemon, g.domain)
        log(f'READY=1: hard_limit {hard / MiB:.1f} MiB, soft_limit '
            f'{soft / MiB:.1f} MiB, wanted {want(0) / MiB:.1f} MiB')
        check(hard == soft == want(0),
              f'at READY=1 hard_limit {hard}, soft_limit {soft}, want '
              f'{want(0)}')
        for req in (1 * GiB, 0):
            n = len(svc.out)
            t0 = time.monotonic()
            g.update_memory_device(req)
            poll(lambda r=req: memtune(daemon, g.domain) ==
                 (want(r), want(r)), 120,
                 f'hard_limit = soft_limit = {want(req) >> 20} MiB')
            settled_views_agree(g, req, g.boot_total, t0)
            changes = [l for l in svc.out[n:]
                       if re.match(r'(raised|lowered) ', l)]
            log(f'update-memory-device {req >> 20} MiB: hard_limit '
                f'{want(req) >> 20} MiB after {time.monotonic() - t0:.1f} s')
            check(changes and all(re.search(r'; charge [\d.]+ MiB, headroom '
                                            r'[\d.]+ MiB$', l.strip())
                                  for l in changes),
                  f'no journal line with limit, charge and headroom: '
                  f'{svc.out[n:]}')
        check(any(m.startswith('STATUS=limit') for _, m in svc.notify.msgs),
              f'no STATUS= sent: {svc.notify.msgs}')
    finally:
        svc.stop()


def oom_kill_reported(daemon, g, run):
    """A domain OOM-killed under the service ends it with exit 8 and the
    kernel's word for it (libvirt has removed the domain's cgroup by
    then).  To get there the operator's options are wrong on purpose
    (--base 64M, below the boot RAM) and the test holds the VM's lock, so
    that the service cannot raise the limit for the grow."""
    svc = Service(daemon, g, run, opts='--base 64M --margin 32M')
    uuid = daemon.virsh('domuuid', g.domain).strip()
    try:
        svc.start()
        limit = memtune(daemon, g.domain)[0]
        fd = os.open(os.path.join(run, f'domain-{uuid}.lock'),
                     os.O_RDWR | os.O_CREAT, 0o644)
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            g.update_memory_device(1 * GiB)
            poll(lambda: g.memory_device_info()['size'] == 1 * GiB, 120,
                 'the device to grow')
            g.wait_guest_at_rest(120)
            log(f'hard_limit {limit / MiB:.1f} MiB, grown to 1 GiB, the '
                'guest writes 1000 MiB')
            with contextlib.suppress(HarnessError, OSError):
                g.run('mkdir -p /mnt/fill && mount -t tmpfs -o size=1100m '
                      'fill /mnt/fill && dd if=/dev/zero of=/mnt/fill/f '
                      'bs=1M count=1000', timeout=120)
            poll(lambda: 'shut off' in daemon.virsh('domstate', g.domain),
                 60, 'the domain to stop')
        finally:
            os.close(fd)
        rc = svc.wait(60)
        log(f'service: exit {rc}: {svc.out[-1].strip()}')
        check(rc == 8 and 'OOM-killed' in svc.out[-1] and
              'Killed process' in svc.out[-1],
              f'exit {rc}: {svc.out[-1:]}')
    finally:
        svc.stop()


def restarted_then_destroyed(daemon, g, run):
    """The domain started again and the service restarted (as
    Restart=on-failure does): a new run of the VM, so the base kept for
    the old one is not taken; `virsh destroy` then ends it with exit 0."""
    g.ctl.close()
    g._buf = b''        # pylint: disable=protected-access
    daemon.virsh('start', g.domain)
    g.connect_ctl(g.ctl_path)
    svc = Service(daemon, g, run)
    try:
        svc.start()
        base = [l for l in svc.out if l.startswith('base ')]
        check(base and 'kept' not in base[0], f'base: {base}')
        daemon.virsh('destroy', g.domain)
        rc = svc.wait(60)
        log(f'after virsh destroy: exit {rc}: {svc.out[-1].strip()}')
        check(rc == 0 and 'was shut down' in svc.out[-1],
              f'after destroy: exit {rc}, {svc.out[-1:]}')
    finally:
        svc.stop()


def main():
    require_kit()
    if not os.access(BUILT, os.X_OK):
        raise HarnessError(f'{BUILT} missing: run scripts/build-tools')
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t = Tests()
    t.case('systemd-analyze verify vmem-limit@.service', verify)
    run = tempfile.mkdtemp(prefix='vmem-limit-unit-run-')
    try:
        with Libvirtd() as daemon, LibvirtGuest(daemon, 'vmem-unit') as g:
            t.case('the unit\'s ExecStart follows a libvirt domain: READY=1 '
                   'once set, a grow and a shrink by others',
                   lambda: follow_domain(daemon, g, run))
            t.case('an OOM kill of the domain ends it with exit 8, said so',
                   lambda: oom_kill_reported(daemon, g, run))
            t.case('restarted with the domain, then virsh destroy: exit 0',
                   lambda: restarted_then_destroyed(daemon, g, run))
    finally:
        shutil.rmtree(run, ignore_errors=True)
    t.done()


if __name__ == '__main__':
    main()
