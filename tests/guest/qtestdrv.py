# SPDX-License-Identifier: GPL-2.0-or-later
"""
A virtio-mem driver over QEMU's qtest protocol: no guest, no TCG.

QEMU runs with the qtest accelerator; this module finds the virtio-mem-pci
device in PCI config space, maps its BAR, negotiates features, sets up the
request queue in guest RAM and sends plug / unplug (and, on the fork,
VMEMMAP) requests one at a time, as Linux's driver does in Sub Block Mode:
one request per 128 MiB memory block.  The device handles a request while
the notify write is processed (no ioeventfd without KVM), so each request
is complete when the write returns.

Used by scripts/qemu-anon-growth to measure the device's own allocations
apart from TCG's.
"""

import os
import struct
import sys

from vmtest import BUILD, GiB, MiB, QEMU, STOCK_QEMU

sys.path.insert(0, os.path.join(BUILD, 'qemu-src', 'python'))
# pylint: disable=wrong-import-position
from qemu.machine.qtest import QEMUQtestMachine  # noqa: E402

VENDOR = 0x1af4
DEVICE = 0x1040 + 24            # modern virtio-mem
BAR_ADDR = 0xc0000000           # q35: above MMCONFIG (0xb0000000, 256 MiB)
RING = 0x100000                 # descriptor table, avail and used rings
REQ = 0x110000                  # the request and the response
MEMORY_BLOCK = 128 * MiB        # Linux's memory block on x86-64
MEMMAP = MEMORY_BLOCK // 64     # its memmap: 64 bytes per 4 KiB page

REQ_PLUG, REQ_UNPLUG, REQ_VMEMMAP = 0, 1, 4
F_VMEMMAP = 3
F_VERSION_1 = 32


class QtestMem:
    """arm 'stock': stock QEMU, the device as upstream has it; 'project':
    the fork with x-vmemmap-accounting=on and a driver that marks the first
    MEMMAP bytes of each memory block it plugs."""

    def __init__(self, arm, size, region, dev_opts=''):
        self.arm = arm
        qemu = STOCK_QEMU if arm == 'stock' else QEMU
        dev = (f'virtio-mem-pci,id=vm0,memdev=mem0,block-size=2M,'
               f'requested-size=0')
        if arm == 'project':
            # The property's name as this binary has it (x- while the
            # feature bit is not reserved in the virtio spec).
            from scenarios import device_has
            prop = 'x-vmemmap-accounting' \
                if device_has('x-vmemmap-accounting', qemu) \
                else 'vmemmap-accounting'
            dev += f',{prop}=on'
        self.vm = QEMUQtestMachine(qemu, args=[
            '-machine', 'q35', '-m', '512M,maxmem=80G',
            '-name', f'qtest-{arm},debug-threads=on',
            '-object', f'memory-backend-ram,id=mem0,size={region}',
            '-device', dev])
        self.plugged = []

    # -- qtest protocol --

    def q(self, cmd):
        r = self.vm.qtest(cmd)
        if not r.startswith('OK'):
            raise RuntimeError(f'qtest "{cmd}": {r}')
        return r

    def rd(self, width, addr):
        return int(self.q(f'read{width} {addr:#x}').split()[1], 16)

    def wr(self, width, addr, val):
        self.q(f'write{width} {addr:#x} {val:#x}')

    def mem_write(self, addr, data):
        self.q(f'write {addr:#x} {len(data)} 0x{data.hex()}')

    def mem_read(self, addr, n):
        return bytes.fromhex(self.q(f'read {addr:#x} {n}').split()[1][2:])

    def cfg_addr(self, reg):
        return 0x80000000 | (self.devfn << 8) | (reg & 0xfc)

    def cfg_read(self, reg, width):
        self.q(f'outl 0xcf8 {self.cfg_addr(reg):#x}')
        io = {1: 'inb', 2: 'inw', 4: 'inl'}[width]
        return int(self.q(f'{io} {0xcfc + (reg & 3):#x}').split()[1], 16)

    def cfg_write(self, reg, width, val):
        self.q(f'outl 0xcf8 {self.cfg_addr(reg):#x}')
        io = {1: 'outb', 2: 'outw', 4: 'outl'}[width]
        self.q(f'{io} {0xcfc + (reg & 3):#x} {val:#x}')

    def hmp(self, cmd):
        return self.vm.cmd('human-monitor-command', command_line=cmd)

    # -- bring-up --

    def __enter__(self):
        self.vm.launch()
        self.pid = self.vm.get_pid()
        self.devfn = next(
            (d for d in range(256) if
             (lambda v: v == (DEVICE << 16 | VENDOR))(
                 self._probe(d))), None)
        if self.devfn is None:
            raise RuntimeError('no virtio-mem-pci device on bus 0')
        self._map()
        self._negotiate()
        cfg = self.dev_cfg
        self.block_size = self.rd('q', cfg)
        self.addr = self.rd('q', cfg + 16)
        self.region_size = self.rd('q', cfg + 24)
        return self

    def _probe(self, devfn):
        self.devfn = devfn
        return self.cfg_read(0, 4)

    def _map(self):
        caps = {}
        ptr = self.cfg_read(0x34, 1)
        while ptr:
            if self.cfg_read(ptr, 1) == 0x09:       # vendor: virtio
                kind = self.cfg_read(ptr + 3, 1)
                caps[kind] = (self.cfg_read(ptr + 4, 1),
                              self.cfg_read(ptr + 8, 4), ptr)
            ptr = self.cfg_read(ptr + 1, 1)
        bars = {caps[k][0] for k in (1, 2, 4)}
        if len(bars) != 1:
            raise RuntimeError(f'virtio caps in several BARs: {caps}')
        bar = bars.pop()
        self.cfg_write(0x10 + 4 * bar, 4, BAR_ADDR)
        self.cfg_write(0x14 + 4 * bar, 4, 0)        # 64-bit BAR
        self.cfg_write(0x04, 2, self.cfg_read(0x04, 2) | 0x6)
        self.common = BAR_ADDR + caps[1][1]
        self.notify = BAR_ADDR + caps[2][1]
        self.notify_mult = self.cfg_read(caps[2][2] + 16, 4)
        self.dev_cfg = BAR_ADDR + caps[4][1]

    def _negotiate(self):
        c = self.common
        self.wr('b', c + 0x14, 0)                   # reset
        self.wr('b', c + 0x14, 1 | 2)               # ACKNOWLEDGE | DRIVER
        offered = 0
        for sel in (0, 1):
            self.wr('l', c + 0x00, sel)
            offered |= self.rd('l', c + 0x04) << (32 * sel)
        want = (offered & ((1 << 24) - 1)) | (1 << F_VERSION_1)
        if self.arm != 'project':
            want &= ~(1 << F_VMEMMAP)
        elif not offered & (1 << F_VMEMMAP):
            raise RuntimeError('the fork does not offer VIRTIO_MEM_F_VMEMMAP')
        self.marks = bool(want & (1 << F_VMEMMAP))
        for sel in (0, 1):
            self.wr('l', c + 0x08, sel)
            self.wr('l', c + 0x0c, (want >> (32 * sel)) & 0xffffffff)
        self.wr('b', c + 0x14, 1 | 2 | 8)           # FEATURES_OK
        if not self.rd('b', c + 0x14) & 8:
            raise RuntimeError(f'device refused features {want:#x}')
        self.wr('w', c + 0x16, 0)                   # queue 0
        self.qsize = min(self.rd('w', c + 0x18), 16)
        self.wr('w', c + 0x18, self.qsize)
        self.desc = RING
        self.avail = RING + 16 * self.qsize
        self.used = (self.avail + 6 + 2 * self.qsize + 3) & ~3
        for off, val in ((0x20, self.desc), (0x28, self.avail),
                         (0x30, self.used)):
            self.wr('l', c + off, val & 0xffffffff)
            self.wr('l', c + off + 4, val >> 32)
        self.notify_off = self.rd('w', c + 0x1e)
        self.wr('w', c + 0x1c, 1)                   # queue_enable
        self.wr('b', c + 0x14, 1 | 2 | 8 | 4)       # DRIVER_OK
        self.idx = 0

    def __exit__(self, *exc):
        self.vm.shutdown()

    # -- requests --

    def request(self, kind, addr, arg):
        if kind == REQ_VMEMMAP:
            req = struct.pack('<H6xQQ', kind, addr, arg)
        else:
            req = struct.pack('<H6xQH6x', kind, addr, arg)
        resp = REQ + 64
        self.mem_write(REQ, req)
        self.mem_write(resp, b'\xff' * 10)
        self.mem_write(self.desc, struct.pack('<QIHHQIHH',
                                              REQ, len(req), 1, 1,
                                              resp, 10, 2, 0))
        self.wr('w', self.avail + 4 + 2 * (self.idx % self.qsize), 0)
        self.idx = (self.idx + 1) & 0xffff
        self.wr('w', self.avail + 2, self.idx)
        self.wr('w', self.notify + self.notify_off * self.notify_mult, 0)
        if self.rd('w', self.used + 2) != self.idx:
            raise RuntimeError(f'request {kind} at {addr:#x} not answered')
        typ = self.rd('w', resp)
        if typ != 0:
            raise RuntimeError(f'request {kind} at {addr:#x} ({arg}): '
                               f'response {typ}')

    def set_requested(self, size):
        self.vm.cmd('qom-set', path='vm0', property='requested-size',
                    value=size)

    def grow(self, size):
        """Plug `size` from the start of the region, a memory block at a
        time, marking each block's memmap on the fork."""
        self.set_requested(size)
        for off in range(0, size, MEMORY_BLOCK):
            self.request(REQ_PLUG, self.addr + off,
                         MEMORY_BLOCK // self.block_size)
            if self.marks:
                self.request(REQ_VMEMMAP, self.addr + off, MEMMAP)
            self.plugged.append(off)
        got = self.vm.cmd('qom-get', path='vm0', property='size')
        if got != size:
            raise RuntimeError(f'device size {got} after plugging {size}')

    def shrink(self):
        """Unplug everything, the last block first, as Linux does."""
        self.set_requested(0)
        while self.plugged:
            off = self.plugged.pop()
            self.request(REQ_UNPLUG, self.addr + off,
                         MEMORY_BLOCK // self.block_size)
        got = self.vm.cmd('qom-get', path='vm0', property='size')
        if got != 0:
            raise RuntimeError(f'device size {got} after unplugging all')


if __name__ == '__main__':
    with QtestMem(sys.argv[1] if len(sys.argv) > 1 else 'project', 4 * GiB,
                  '8G') as m:
        m.grow(4 * GiB)
        print('vmemmap-size',
              m.vm.cmd('qom-get', path='vm0', property='x-vmemmap-size')
              if m.arm == 'project' else '-')
        m.shrink()
        print('ok')
