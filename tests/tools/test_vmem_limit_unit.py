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
   the charge and the headroom; `virsh destroy` ends it with exit 0.
"""

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


def follow_domain(daemon, g):
    service = unit_service()
    check(service.get('Type') == ['notify'] and
          service.get('Restart') == ['on-failure'],
          f'unit: Type {service.get("Type")}, Restart '
          f'{service.get("Restart")}')
    env = unit_environment(service)
    argv = exec_start(service, g.domain, env)
    log(f'ExecStart: {shlex.join(argv)}')
    if not os.access(argv[0], os.X_OK):
        log(f'{argv[0]} is not installed: running {BUILT} in its place')
        argv[0] = BUILT
    run = tempfile.mkdtemp(prefix='vmem-limit-unit-run-')
    notify = Notify(os.path.join(run, 'notify'))
    env = {**os.environ, **env, 'RUNTIME_DIRECTORY': run,
           'NOTIFY_SOCKET': notify.path, 'LIBVIRT_DEFAULT_URI': daemon.uri}
    shown = json.loads(subprocess.run(
        [BUILT, '-d', g.domain, 'show', '--json'], env=env, check=True,
        capture_output=True, text=True).stdout)
    base, margin = shown['base'], shown['margin']
    max_size = shown['virtio-mem'][0]['max-size']
    log(f'base {base / MiB:.1f} MiB ({shown["base-source"]}), margin '
        f'{margin / MiB:.1f} MiB, device max-size {max_size / GiB:g} GiB')

    def want(size):
        return base + size + (max_size - size) // 64 + margin

    p = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE,
                         stderr=subprocess.STDOUT, text=True)
    out = []
    reader = threading.Thread(target=lambda: out.extend(p.stdout),
                              daemon=True)
    reader.start()
    journal = []
    try:
        poll(lambda: any(m == 'READY=1' for _, m in notify.msgs) or
             p.poll() is not None, 120, 'READY=1 from the service')
        check(p.poll() is None, f'the service exited {p.returncode}: {out}')
        hard, soft = memtune(daemon, g.domain)
        log(f'READY=1: hard_limit {hard / MiB:.1f} MiB, soft_limit '
            f'{soft / MiB:.1f} MiB, wanted {want(0) / MiB:.1f} MiB')
        check(hard == soft == want(0),
              f'at READY=1 hard_limit {hard}, soft_limit {soft}, want '
              f'{want(0)}')
        for req in (1 * GiB, 0):
            n = len(out)
            t0 = time.monotonic()
            g.update_memory_device(req)
            poll(lambda r=req: memtune(daemon, g.domain) ==
                 (want(r), want(r)), 120,
                 f'hard_limit = soft_limit = {want(req) >> 20} MiB')
            settled_views_agree(g, req, g.boot_total, t0)
            changes = [l for l in out[n:] if re.match(r'(raised|lowered) ',
                                                      l)]
            log(f'update-memory-device {req >> 20} MiB: hard_limit '
                f'{want(req) >> 20} MiB after {time.monotonic() - t0:.1f} s')
            check(changes and all(re.search(r'; charge [\d.]+ MiB, headroom '
                                            r'[\d.]+ MiB$', l.strip())
                                  for l in changes),
                  f'no journal line with limit, charge and headroom: '
                  f'{out[n:]}')
            journal += changes
        check(any(m.startswith('STATUS=limit') for _, m in notify.msgs),
              f'no STATUS= sent: {notify.msgs}')
        g.daemon.virsh('destroy', g.domain)
        rc = p.wait(timeout=60)
        reader.join(10)
        log(f'after virsh destroy: exit {rc}: {out[-1].strip()}')
        check(rc == 0 and 'was shut down' in out[-1],
              f'after destroy: exit {rc}, {out[-1:]}')
    finally:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
            p.wait(timeout=10)
        notify.close()
        shutil.rmtree(run, ignore_errors=True)
        for line in out:
            log(f'  journal | {line.rstrip()}')
    return journal


def main():
    require_kit()
    if not os.access(BUILT, os.X_OK):
        raise HarnessError(f'{BUILT} missing: run scripts/build-tools')
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    t = Tests()
    t.case('systemd-analyze verify vmem-limit@.service', verify)
    with Libvirtd() as daemon:
        with LibvirtGuest(daemon, 'vmem-unit') as g:
            t.case('the unit\'s ExecStart follows a libvirt domain: READY=1 '
                   'once set, a grow and a shrink by others, exit 0 at '
                   'destroy', lambda: follow_domain(daemon, g))
    t.done()


if __name__ == '__main__':
    main()
