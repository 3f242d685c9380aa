#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""
A QMP stand-in for vmem-limit: one process that plays QEMU with one
virtio-mem device and its guest, and holds the memory they would, so that
a real memory cgroup charges it.  tests/tools/test_vmem_limit_cgroup2.py
runs it inside a Debian guest, in a cgroup v2 of its own, where QEMU
itself would not run.

    qmp_standin.py serve --socket PATH [--boot-ram 128M] [--touched 64M]
                         [--max-size 512M] [--block-size 2M]
                         [--pidfile FILE] [--daemonize]
    qmp_standin.py call --socket PATH COMMAND [JSON-ARGUMENTS]

serve answers what vmem-limit asks, as QEMU does: the greeting first,
qmp_capabilities, query-memory-size-summary (base-memory = --boot-ram),
query-memory-devices (device vm0), qom-get and qom-set of vm0's size and
requested-size, quit (a SHUTDOWN event, then it exits); any other command,
query-virtio-mem-footprint among them, is CommandNotFound, as in stock
QEMU.  After a qom-set of requested-size "the guest" plugs or unplugs
32 MiB every 100 ms, touching what it plugs and freeing (MADV_DONTNEED)
what it unplugs, and MEMORY_DEVICE_SIZE_CHANGE events follow at most one
a second, the last size always sent, as QEMU throttles them.  Any number
of clients, each its own monitor.

Test-only commands (x-): x-touch {bytes}: the guest touches its boot RAM
up to bytes; x-heap {bytes}: "QEMU" allocates and touches bytes more of
its own; x-refuse-resize {desc}: qom-set of requested-size fails with
desc (null: works again); x-stats: pid, touched bytes, heap, RSS.

With --daemonize, serve forks first and listens in the child (QEMU's
-daemonize does so too: the pid behind the socket, SO_PEERCRED, is the
child's), and returns once the socket listens.

call sends one command and prints its return value as JSON; an error
reply is printed to stderr with exit 1.
"""

import argparse
import contextlib
import json
import mmap
import os
import selectors
import socket
import sys
import time

PAGE = 4096
STEP = 32 << 20          # bytes the guest plugs or unplugs per tick
TICK = 0.1               # seconds between the guest's steps
EVENT_EVERY = 1.0        # QEMU's throttle of MEMORY_DEVICE_SIZE_CHANGE


def size_arg(text):
    units = {'K': 10, 'M': 20, 'G': 30, 'T': 40}
    text = text.strip()
    if text and text[-1].upper() in units:
        return int(text[:-1]) << units[text[-1].upper()]
    return int(text)


def touch(m, start, end):
    """Write one byte per page of m[start:end]."""
    if end > start:
        m[start:end:PAGE] = b'\x01' * len(range(start, end, PAGE))


def timestamp():
    t = time.time()
    return {'seconds': int(t), 'microseconds': int((t % 1) * 1e6)}


class QmpError(Exception):
    def __init__(self, klass, desc):
        super().__init__(desc)
        self.klass = klass
        self.desc = desc


class Client:
    def __init__(self, sock):
        self.sock = sock
        self.buf = b''
        self.ready = False     # after qmp_capabilities
        self.out = b''


class StandIn:
    def __init__(self, args):
        self.boot_ram = args.boot_ram
        self.max_size = args.max_size
        self.block_size = args.block_size
        self.size = 0
        self.requested = 0
        self.refuse = None
        # Private anonymous memory: charged when touched, freed by
        # MADV_DONTNEED, as a guest's RAM in QEMU.
        flags = mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
        self.ram = mmap.mmap(-1, self.boot_ram, flags=flags)
        self.dev = mmap.mmap(-1, self.max_size, flags=flags)
        self.heap = []
        self.touched = 0
        self.touch_ram(args.touched)
        self.clients = {}
        self.sel = selectors.DefaultSelector()
        self.next_tick = None
        self.event_sent = 0.0
        self.event_due = False
        self.quitting = False

    # -- memory --

    def touch_ram(self, upto):
        upto = min(upto, self.boot_ram) // PAGE * PAGE
        touch(self.ram, self.touched, upto)
        self.touched = max(self.touched, upto)

    def grow_heap(self, n):
        m = mmap.mmap(-1, n, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        touch(m, 0, n)
        self.heap.append(m)

    def guest_step(self):
        """The guest plugs or unplugs one step toward requested-size."""
        if self.size < self.requested:
            new = min(self.requested, self.size + STEP)
            touch(self.dev, self.size, new)
        elif self.size > self.requested:
            new = max(self.requested, self.size - STEP)
            self.dev.madvise(mmap.MADV_DONTNEED, new, self.size - new)
        else:
            self.next_tick = None
            return
        self.size = new
        self.event_due = True
        self.next_tick = time.monotonic() + TICK

    # -- QMP --

    def device(self):
        return {'id': 'vm0', 'memdev': '/objects/mem0', 'node': 0,
                'memaddr': 1 << 32, 'size': self.size,
                'requested-size': self.requested, 'max-size': self.max_size,
                'block-size': self.block_size}

    def execute(self, cmd, a):
        if cmd == 'query-memory-size-summary':
            return {'base-memory': self.boot_ram, 'plugged-memory': self.size}
        if cmd == 'query-memory-devices':
            return [{'type': 'virtio-mem', 'data': self.device()}]
        if cmd == 'qom-get':
            self.check_path(a)
            prop = a.get('property')
            if prop not in self.device():
                raise QmpError('GenericError',
                               f"Property 'virtio-mem-pci.{prop}' not found")
            return self.device()[prop]
        if cmd == 'qom-set':
            self.check_path(a)
            if a.get('property') != 'requested-size':
                raise QmpError('GenericError', 'the stand-in sets only '
                               'requested-size')
            return self.set_requested(a.get('value'))
        if cmd == 'quit':
            self.quitting = True
            return {}
        if cmd == 'x-touch':
            self.touch_ram(int(a['bytes']))
            return {'touched': self.touched}
        if cmd == 'x-heap':
            self.grow_heap(int(a['bytes']))
            return {'heap': sum(len(m) for m in self.heap)}
        if cmd == 'x-refuse-resize':
            self.refuse = a.get('desc')
            return {}
        if cmd == 'x-stats':
            with open('/proc/self/statm') as f:
                rss = int(f.read().split()[1]) * PAGE
            return {'pid': os.getpid(), 'touched': self.touched,
                    'heap': sum(len(m) for m in self.heap), 'rss': rss,
                    'size': self.size, 'requested-size': self.requested}
        raise QmpError('CommandNotFound',
                       f'The command {cmd} has not been found')

    @staticmethod
    def check_path(a):
        if a.get('path') not in ('vm0', '/machine/peripheral/vm0'):
            raise QmpError('DeviceNotFound',
                           f"Device '{a.get('path')}' not found")

    def set_requested(self, value):
        if self.refuse:
            raise QmpError('GenericError', self.refuse)
        if not isinstance(value, int) or value < 0 or \
                value > self.max_size or value % self.block_size:
            raise QmpError('GenericError',
                           f"'requested-size' property must be a multiple "
                           f"of {self.block_size} and at most "
                           f"{self.max_size}")
        self.requested = value
        if self.next_tick is None:
            self.next_tick = time.monotonic() + TICK
        return {}

    def handle(self, c, line):
        try:
            msg = json.loads(line)
        except ValueError:
            self.send(c, {'error': {'class': 'GenericError',
                                    'desc': 'JSON parse error'}})
            return
        cmd = msg.get('execute')
        a = msg.get('arguments') or {}
        reply = {}
        if 'id' in msg:
            reply['id'] = msg['id']
        try:
            if cmd == 'qmp_capabilities':
                if c.ready:
                    raise QmpError('CommandNotFound', 'Capabilities '
                                   'negotiation is already complete, '
                                   'command ignored')
                c.ready = True
                reply['return'] = {}
            elif not c.ready:
                raise QmpError('CommandNotFound', 'Expecting capabilities '
                               "negotiation with 'qmp_capabilities'")
            else:
                reply['return'] = self.execute(cmd, a)
        except QmpError as e:
            reply['error'] = {'class': e.klass, 'desc': e.desc}
        except (KeyError, TypeError, ValueError) as e:
            reply['error'] = {'class': 'GenericError',
                              'desc': f'bad arguments: {e}'}
        self.send(c, reply)

    def send(self, c, obj):
        c.out += json.dumps(obj).encode() + b'\r\n'
        self.flush(c)

    def flush(self, c):
        try:
            while c.out:
                n = c.sock.send(c.out)
                c.out = c.out[n:]
        except BlockingIOError:
            pass
        except OSError:
            self.drop(c)

    def broadcast(self, event, data):
        msg = {'timestamp': timestamp(), 'event': event, 'data': data}
        for c in list(self.clients.values()):
            if c.ready:
                self.send(c, msg)

    def drop(self, c):
        if c.sock.fileno() in self.clients:
            del self.clients[c.sock.fileno()]
            self.sel.unregister(c.sock)
        c.sock.close()

    # -- main loop --

    def serve(self, lsock):
        lsock.setblocking(False)
        self.sel.register(lsock, selectors.EVENT_READ)
        greeting = {'QMP': {'version': {'qemu': {'micro': 0, 'minor': 0,
                                                 'major': 10},
                                        'package': ' (qmp_standin)'},
                            'capabilities': []}}
        while True:
            now = time.monotonic()
            waits = []
            if self.next_tick is not None:
                waits.append(self.next_tick - now)
            if self.event_due:
                waits.append(self.event_sent + EVENT_EVERY - now)
            timeout = max(0, min(waits)) if waits else None
            for key, _ in self.sel.select(timeout):
                if key.fileobj is lsock:
                    try:
                        s, _ = lsock.accept()
                    except BlockingIOError:
                        continue
                    s.setblocking(False)
                    c = Client(s)
                    self.clients[s.fileno()] = c
                    self.sel.register(s, selectors.EVENT_READ)
                    self.send(c, greeting)
                    continue
                c = self.clients.get(key.fileobj.fileno())
                if c is None:
                    continue
                try:
                    data = c.sock.recv(65536)
                except OSError:
                    data = b''
                if not data:
                    self.drop(c)
                    continue
                c.buf += data
                while b'\n' in c.buf:
                    line, c.buf = c.buf.split(b'\n', 1)
                    if line.strip():
                        self.handle(c, line)
                if self.quitting:
                    self.broadcast('SHUTDOWN', {'guest': False,
                                                'reason': 'host-qmp-quit'})
                    return
            now = time.monotonic()
            if self.next_tick is not None and now >= self.next_tick:
                self.guest_step()
            if self.event_due and now >= self.event_sent + EVENT_EVERY:
                self.event_due = False
                self.event_sent = now
                self.broadcast('MEMORY_DEVICE_SIZE_CHANGE',
                               {'id': 'vm0', 'size': self.size,
                                'qom-path': '/machine/peripheral/vm0'})


def serve(args):
    ready_r = ready_w = None
    if args.daemonize:
        ready_r, ready_w = os.pipe()
        if os.fork():
            os.close(ready_w)
            ok = os.read(ready_r, 1)
            sys.exit(0 if ok == b'1' else 1)
        os.close(ready_r)
        os.setsid()
    standin = StandIn(args)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.socket)
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    lsock.bind(args.socket)
    lsock.listen(8)
    if args.pidfile:
        with open(args.pidfile, 'w') as f:
            f.write(f'{os.getpid()}\n')
    if ready_w is not None:
        os.write(ready_w, b'1')
        os.close(ready_w)
        fd = os.open(os.devnull, os.O_RDWR)
        for i in (0, 1, 2):
            os.dup2(fd, i)
    try:
        standin.serve(lsock)
    finally:
        os.unlink(args.socket)


def call(args):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(args.socket)
    f = s.makefile('rwb')
    json.loads(f.readline())                    # the greeting
    for cmd, a in (('qmp_capabilities', None),
                   (args.command, json.loads(args.arguments or 'null'))):
        msg = {'execute': cmd}
        if a:
            msg['arguments'] = a
        f.write(json.dumps(msg).encode() + b'\n')
        f.flush()
        while True:
            reply = json.loads(f.readline())
            if 'event' not in reply:
                break
        if 'error' in reply:
            print(json.dumps(reply['error']), file=sys.stderr)
            return 1
    print(json.dumps(reply['return']))
    return 0


def main():
    p = argparse.ArgumentParser(
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest='what', required=True)
    s = sub.add_parser('serve')
    s.add_argument('--socket', required=True)
    s.add_argument('--boot-ram', type=size_arg, default=128 << 20)
    s.add_argument('--touched', type=size_arg, default=64 << 20)
    s.add_argument('--max-size', type=size_arg, default=512 << 20)
    s.add_argument('--block-size', type=size_arg, default=2 << 20)
    s.add_argument('--pidfile')
    s.add_argument('--daemonize', action='store_true')
    c = sub.add_parser('call')
    c.add_argument('--socket', required=True)
    c.add_argument('command')
    c.add_argument('arguments', nargs='?')
    args = p.parse_args()
    if args.what == 'serve':
        serve(args)
        return 0
    return call(args)


if __name__ == '__main__':
    sys.exit(main())
