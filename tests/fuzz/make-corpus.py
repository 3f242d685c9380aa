#!/usr/bin/python3
# SPDX-License-Identifier: GPL-2.0-or-later
"""Write the seed corpora of the fuzz harnesses (tests/fuzz/corpus/).

Each seed is a scenario written in the harness's input language (see the
decoder in tests/fuzz/fuzz-vmemmap-*.c): the patterns a driver sends
(SBM memmaps as whole blocks, BBM memmaps inside a big block), the worst
pattern a guest can send (descending single pages), migration streams
exact and corrupted, hostile ranges.  libFuzzer mutates from there.
Deterministic: running it again writes the same files.

    tests/fuzz/make-corpus.py        (rewrites both corpus folders)
"""

import os
import struct

HERE = os.path.dirname(os.path.abspath(__file__))


def u8(*v):
    return bytes(x & 0xFF for x in v)


def u16(v):
    return struct.pack('<H', v & 0xFFFF)


def u64(v):
    return struct.pack('<Q', v & 0xFFFFFFFFFFFFFFFF)


# ---- fuzz-vmemmap-ranges ----
# geometry byte: block index (bits 0-2: 2M 2M 4M 8M 32M 64M 128M 256M),
# region (bits 3-4: 64/128/192/256 MiB), base (bits 5-6: 4G, 0, 1T+block,
# top of the address space); flags: bit 0 usable == region, bits 1-3
# usable blocks otherwise, 0x20 half-size destination, 0x40 source
# accounting off, 0x80 destination accounting off.

def geo(block=0, region=0, base=0):
    return block | region << 3 | base << 5


def plug(first, n):                 # n blocks from first (n >= 1)
    return u8(0, first, n - 1)


def unplug(first, n):
    return u8(2, first, n - 1)


UNPLUG_ALL = u8(3)
CLEAR = u8(9)


def report_unit(unit, n):           # n pages from the start of 2 MiB unit
    return u8(4, 0) + u16(unit) + u16(n - 1)


def report_pages(first, n):         # n in 1..64 pages at page first
    return u8(4, 3) + u16(first) + u8(n - 1)


def report_big(first, n):           # up to the whole region
    return u8(4, 4) + u16(first) + u16(n)


def report_blocks(block, n):        # whole blocks (SBM memmap)
    return u8(4, 5, block, n - 1)


def report_end(n, k=0):             # ending at the usable size
    return u8(4, 6, n - 1, k)


def report_below(k, n):
    return u8(4, 7, k - 1, n - 1)


def report_unaligned(page, off, n, extra):
    return u8(4, 8) + u16(page) + u16(off) + u8(n - 1) + u16(extra)


def report_raw(addr, size):
    return u8(4, 9) + u64(addr) + u64(size)


def unmark(first, n):               # n blocks from block first
    return u8(8, first, n)


def intersects(first, n):
    return u8(10) + u16(first) + u16(n)


def next_range(page):
    return u8(11) + u16(page)


def copy_plugged(flip=None):
    return u8(12, 0) if flip is None else u8(12, 1, flip)


def migrate(*mutation):             # mutation: kind, count, its bytes
    return u8(13) + (u8(*mutation) if mutation else u8(0))


def migrate_self(*mutation):        # the source's state back into it
    return u8(14) + (u8(*mutation) if mutation else u8(0))


def usable(blocks):
    return u8(15, blocks - 1)


def ranges_seeds():
    s = {}
    g = geo(0, 1)                   # 2 MiB blocks, 128 MiB, base 4 GiB
    s['sbm-memmaps'] = u8(g, 1) + plug(0, 64) + report_blocks(0, 1) + \
        report_blocks(32, 1) + report_blocks(0, 1) + unplug(32, 32) + \
        next_range(0)
    s['bbm-memmaps'] = u8(geo(6, 1), 1) + plug(0, 1) + \
        report_unit(0, 8) + report_unit(16, 8) + report_pages(8, 8) + \
        intersects(0, 32768) + migrate() + unmark(0, 1)
    worst = b''.join(report_pages(p, 1) for p in range(254, -1, -2))
    s['worst-descending'] = u8(g, 1) + plug(0, 1) + worst + migrate() + \
        unplug(0, 1)
    s['merge-split'] = u8(g, 1) + plug(0, 4) + report_unit(0, 512) + \
        report_unit(1, 3) + report_pages(1, 1) + unmark(1, 1) + \
        report_unit(1, 1) + next_range(1) + migrate()
    s['unplug-all'] = u8(g, 1) + plug(0, 16) + report_big(0, 4096) + \
        UNPLUG_ALL + report_pages(0, 1) + plug(3, 2) + report_blocks(3, 2)
    s['clear'] = u8(g, 1) + plug(0, 8) + report_pages(10, 30) + CLEAR + \
        report_pages(10, 30)
    s['bad-requests'] = u8(g, 1) + plug(0, 2) + report_pages(0, 0x40) + \
        report_unaligned(3, 512, 1, 0) + report_unaligned(3, 0, 1, 100) + \
        report_raw(0xFFFFFFFFFFFFF000, 0x2000) + report_below(1, 2) + \
        report_pages(512, 1) + report_pages(0, 1) + report_end(4, 1)
    s['usable-region'] = u8(g, 0b0110) + plug(0, 8) + report_end(1) + \
        report_end(2, 1) + usable(8) + report_end(1) + report_end(3, 2)
    for kind in range(7):
        s['migrate-mutation-%d' % kind] = u8(g, 1) + plug(0, 64) + \
            report_unit(0, 16) + report_unit(3, 600) + \
            report_blocks(10, 1) + copy_plugged() + \
            migrate(kind, 1, 7, 3, 9, 0x55, 0xAA, 0x10, 2, 3, 4, 5, 6, 7, 8)
    s['migrate-unplugged-dest'] = u8(g, 1) + plug(0, 8) + \
        report_unit(2, 4) + copy_plugged(1) + migrate()
    s['migrate-half-dest'] = u8(g, 0x21) + plug(0, 64) + \
        report_blocks(40, 1) + report_unit(0, 2) + copy_plugged() + migrate()
    s['migrate-dest-off'] = u8(g, 0x81) + plug(0, 4) + report_unit(0, 2) + \
        migrate()
    s['source-off'] = u8(g, 0x41) + plug(0, 4) + report_unit(0, 2) + \
        unmark(0, 8) + migrate() + migrate_self()
    s['migrate-self'] = u8(g, 1) + plug(0, 8) + report_unit(1, 5) + \
        migrate_self(4, 1, 9) + migrate_self(6, 7, 0, 1, 2, 3)
    s['base-zero'] = u8(geo(0, 0, 1), 1) + plug(0, 4) + report_pages(0, 1) + \
        report_below(1, 1) + report_raw(0, 0x1000)
    s['base-top'] = u8(geo(0, 0, 3), 1) + plug(0, 32) + \
        report_end(4) + report_end(4, 1) + report_raw(0xFFFFFFFFFFFFF000,
                                                      0x1000)
    s['base-1t'] = u8(geo(2, 2, 2), 1) + plug(0, 48) + report_big(0, 49152)
    s['big-blocks'] = u8(geo(7, 3), 1) + plug(0, 1) + report_big(1, 65534) + \
        unplug(0, 1) + migrate()
    s['64m-blocks'] = u8(geo(5, 1), 1) + plug(1, 1) + report_pages(16384, 1) + \
        report_pages(16383, 1) + migrate()
    s['every-op'] = u8(geo(3, 2), 1) + b''.join([
        plug(0, 24), report_pages(5, 5), unplug(1, 1), UNPLUG_ALL,
        plug(2, 2), report_blocks(2, 1), unmark(0, 3), CLEAR,
        intersects(0, 100), next_range(3), copy_plugged(), migrate(),
        migrate_self(), usable(3)])
    return s


# ---- fuzz-vmemmap-device ----
# first byte: bit 0 renegotiate, bit 1 without VIRTIO_MEM_F_VMEMMAP,
# bits 2-4 requested-size (0 16M 64M 128M 200M 512M 768M 1G); then
# operations: 0 requested-size, 1 new driver, others a batch of requests.

def batch(*reqs):
    return u8(2, len(reqs) - 1) + b''.join(reqs)


def d_plug(block, n, unplug=False):
    op = 2 if unplug else 0
    if n > 8:
        return u8(op, 5) + u16(block) + u16(n)
    return u8(op, 0) + u16(block) + u8(n - 1)


def d_unplug(block, n):
    return d_plug(block, n, True)


D_UNPLUG_ALL = u8(4)


def d_state(block, n):
    return u8(5) + u16(block) + u8(n - 1)


def d_vmemmap_pages(page, n):       # n in 1..64 pages at any page
    return u8(6, 2) + u16(page) + u8(page >> 16, n - 1)


def d_vmemmap_unit(unit, n):        # n pages from the start of 2 MiB unit
    return u8(6, 0) + u16(unit) + u16(n - 1)


def d_vmemmap_block(block, n=1):
    return u8(6, 4) + u16(block) + u8(n - 1)


def d_vmemmap_raw(addr, size):
    return u8(6, 7) + u64(addr) + u64(size)


def d_raw(typ, addr, size, short=None):
    tail = u8(0) if short is None else u8(1, short[0], short[1])
    return u8(11) + u16(typ) + u64(addr) + u64(size) + tail


def device_seeds():
    s = {}
    full = 7 << 2                   # requested-size == region
    s['sbm'] = u8(full) + batch(d_plug(0, 64)) + \
        batch(d_vmemmap_block(0), d_vmemmap_block(64)) + \
        batch(d_state(0, 4), d_unplug(64, 64)) + batch(D_UNPLUG_ALL)
    s['bbm'] = u8(full) + batch(d_plug(0, 8)) + \
        batch(d_vmemmap_unit(0, 8), d_vmemmap_unit(4, 8)) + \
        batch(d_unplug(0, 1), d_state(0, 8))
    s['worst-descending'] = u8(full) + batch(d_plug(0, 2)) + b''.join(
        batch(*[d_vmemmap_pages(p - 2 * i, 1) for i in range(8)])
        for p in range(254, 0, -16))
    s['nack'] = u8(1 << 2) + batch(d_plug(0, 8), d_plug(8, 1)) + \
        u8(0, 3) + batch(d_plug(8, 1))
    s['errors'] = u8(full) + batch(
        d_plug(0, 1), d_plug(0, 1), d_unplug(5, 1), d_state(127, 2),
        d_vmemmap_pages(600, 1), d_vmemmap_raw(0, 4096),
        d_vmemmap_raw(0xFFFFFFFFFFFFF000, 0x2000), d_vmemmap_pages(0, 64))
    s['reset-without-feature'] = u8(full) + batch(d_plug(0, 4)) + \
        batch(d_vmemmap_unit(0, 4)) + u8(1, 0) + batch(d_state(0, 4)) + \
        u8(1, 1) + batch(d_vmemmap_unit(0, 4))
    s['unknown-type'] = u8(full) + batch(d_plug(0, 1)) + \
        batch(d_raw(9, 0, 0)) + batch(d_state(0, 1))
    s['short-buffers'] = u8(full) + batch(d_raw(0, 0, 0, (8, 10))) + \
        batch(d_raw(4, 0, 0, (24, 2)))
    s['not-negotiated'] = u8(3 | full) + batch(d_plug(0, 1)) + \
        batch(d_vmemmap_block(0))
    s['usable-shrinks'] = u8(full) + batch(d_plug(100, 2)) + \
        batch(d_vmemmap_block(100)) + u8(0, 1) + \
        batch(d_vmemmap_block(101), d_plug(110, 1))
    return s


def write(name, seeds):
    d = os.path.join(HERE, 'corpus', name)
    os.makedirs(d, exist_ok=True)
    for f in os.listdir(d):
        os.unlink(os.path.join(d, f))
    for k, v in sorted(seeds.items()):
        with open(os.path.join(d, k), 'wb') as f:
            f.write(v)
    print('%s: %d seeds' % (d, len(seeds)))


if __name__ == '__main__':
    write('vmemmap-ranges', ranges_seeds())
    write('vmemmap-device', device_seeds())
