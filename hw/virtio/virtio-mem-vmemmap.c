/*
 * virtio-mem: accounting of the plugged ranges that hold the guest's memmap
 *
 * Copyright (c) 2026 The virtio-mem-vmemmap authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qemu/bitmap.h"
#include "qemu/bswap.h"
#include "qemu/host-utils.h"
#include "qemu/madvise.h"
#include "hw/virtio/virtio-mem-vmemmap.h"

#define PAGE VIRTIO_MEM_VMEMMAP_ALIGN

/*
 * The bitmap is a private anonymous mapping of its own: pages no mark
 * ever touched cost no memory, and a clear gives all of it back, which
 * malloc would not promise (freed and reallocated, glibc may hand out
 * heap memory and zero it, making the whole bitmap resident).
 */
static size_t virtio_mem_vmemmap_bitmap_bytes(const VirtIOMEMVmemmap *vm)
{
    return ROUND_UP(BITS_TO_LONGS(vm->nr_pages) * sizeof(unsigned long),
                    qemu_real_host_page_size());
}

static unsigned long *virtio_mem_vmemmap_bitmap_alloc(size_t bytes)
{
    void *p = mmap(NULL, bytes, PROT_READ | PROT_WRITE,
                   MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);

    if (p == MAP_FAILED) {
        g_error("virtio-mem: cannot map a vmemmap bitmap of %zu bytes: %s",
                bytes, strerror(errno));
    }
    return p;
}

void virtio_mem_vmemmap_init(VirtIOMEMVmemmap *vm)
{
    memset(vm, 0, sizeof(*vm));
}

void virtio_mem_vmemmap_destroy(VirtIOMEMVmemmap *vm)
{
    if (vm->bitmap) {
        munmap(vm->bitmap, virtio_mem_vmemmap_bitmap_bytes(vm));
    }
    g_free(vm->mig_buf);
    virtio_mem_vmemmap_init(vm);
}

void virtio_mem_vmemmap_set_geometry(VirtIOMEMVmemmap *vm,
                                     uint64_t region_size,
                                     uint64_t block_size,
                                     const unsigned long *plugged)
{
    virtio_mem_vmemmap_destroy(vm);
    if (!region_size) {
        return;
    }
    g_assert(block_size && QEMU_IS_ALIGNED(block_size, PAGE) &&
             QEMU_IS_ALIGNED(region_size, block_size));
    vm->region_size = region_size;
    vm->block_size = block_size;
    vm->plugged = plugged;
    vm->nr_pages = region_size / PAGE;
    vm->bitmap = virtio_mem_vmemmap_bitmap_alloc(
        virtio_mem_vmemmap_bitmap_bytes(vm));
}

bool virtio_mem_vmemmap_intersects(const VirtIOMEMVmemmap *vm,
                                   uint64_t start, uint64_t size)
{
    const uint64_t first = start / PAGE;
    const uint64_t end = DIV_ROUND_UP(start + size, PAGE);

    if (!vm->size || !size) {
        return false;
    }
    return find_next_bit(vm->bitmap, end, first) < end;
}

/* Are all device blocks intersecting [@start, @start + @size) plugged? */
static bool virtio_mem_vmemmap_is_plugged(const VirtIOMEMVmemmap *vm,
                                          uint64_t start, uint64_t size)
{
    const unsigned long first = start / vm->block_size;
    const unsigned long last = (start + size - 1) / vm->block_size;

    return find_next_zero_bit(vm->plugged, last + 1, first) > last;
}

VirtIOMEMVmemmapCheck virtio_mem_vmemmap_check(const VirtIOMEMVmemmap *vm,
                                               uint64_t base,
                                               uint64_t usable_size,
                                               uint64_t addr, uint64_t size)
{
    uint64_t start;

    if (!virtio_mem_vmemmap_enabled(vm)) {
        return VIRTIO_MEM_VMEMMAP_DISABLED;
    }
    if (!size) {
        return VIRTIO_MEM_VMEMMAP_EMPTY;
    }
    if (!QEMU_IS_ALIGNED(addr, PAGE) || !QEMU_IS_ALIGNED(size, PAGE)) {
        return VIRTIO_MEM_VMEMMAP_UNALIGNED;
    }
    if (!QEMU_IS_ALIGNED(addr, VIRTIO_MEM_VMEMMAP_START_ALIGN)) {
        return VIRTIO_MEM_VMEMMAP_UNALIGNED_START;
    }
    if (addr + size < addr) {
        return VIRTIO_MEM_VMEMMAP_OVERFLOW;
    }
    usable_size = MIN(usable_size, vm->region_size);
    if (addr < base || addr - base > usable_size ||
        size > usable_size - (addr - base)) {
        return VIRTIO_MEM_VMEMMAP_OUTSIDE;
    }
    start = addr - base;
    if (!virtio_mem_vmemmap_is_plugged(vm, start, size)) {
        return VIRTIO_MEM_VMEMMAP_UNPLUGGED;
    }
    if (virtio_mem_vmemmap_intersects(vm, start, size)) {
        return VIRTIO_MEM_VMEMMAP_OVERLAP;
    }
    return VIRTIO_MEM_VMEMMAP_OK;
}

const char *virtio_mem_vmemmap_check_str(VirtIOMEMVmemmapCheck check)
{
    switch (check) {
    case VIRTIO_MEM_VMEMMAP_OK:
        return "ok";
    case VIRTIO_MEM_VMEMMAP_EMPTY:
        return "zero size";
    case VIRTIO_MEM_VMEMMAP_UNALIGNED:
        return "not 4 KiB aligned";
    case VIRTIO_MEM_VMEMMAP_UNALIGNED_START:
        return "does not start at a multiple of 2 MiB";
    case VIRTIO_MEM_VMEMMAP_OVERFLOW:
        return "address overflow";
    case VIRTIO_MEM_VMEMMAP_OUTSIDE:
        return "outside the usable region";
    case VIRTIO_MEM_VMEMMAP_UNPLUGGED:
        return "not plugged";
    case VIRTIO_MEM_VMEMMAP_OVERLAP:
        return "already marked";
    case VIRTIO_MEM_VMEMMAP_DISABLED:
        return "x-vmemmap-accounting is off";
    case VIRTIO_MEM_VMEMMAP_MALFORMED:
        return "not a state this device can hold";
    }
    g_assert_not_reached();
}

void virtio_mem_vmemmap_mark(VirtIOMEMVmemmap *vm, uint64_t start,
                             uint64_t size)
{
    g_assert(size && QEMU_IS_ALIGNED(start | size, PAGE) &&
             start / PAGE + size / PAGE <= vm->nr_pages);

    bitmap_set(vm->bitmap, start / PAGE, size / PAGE);
    vm->size += size;
}

/*
 * Give back the bitmap's host pages around bits [first, end) that no longer
 * hold a mark.  A mark makes its bitmap page resident (with 4 KiB host
 * pages, a bitmap page covers 128 MiB of region: a driver marking one range
 * per memory block touches a page per block); without this, an unplug back
 * to 0 kept all of them resident until the next reset.  Pages that still
 * hold a mark stay.
 */
static void virtio_mem_vmemmap_release(VirtIOMEMVmemmap *vm, uint64_t first,
                                       uint64_t end)
{
    const size_t host_page = qemu_real_host_page_size();
    const uint64_t bits = host_page * BITS_PER_BYTE;
    uint64_t p, p_end;

    for (p = QEMU_ALIGN_DOWN(first, bits); p < end; p += bits) {
        p_end = MIN(p + bits, vm->nr_pages);
        if (find_next_bit(vm->bitmap, p_end, p) >= p_end) {
            qemu_madvise((uint8_t *)vm->bitmap + p / BITS_PER_BYTE, host_page,
                         QEMU_MADV_DONTNEED);
        }
    }
}

uint64_t virtio_mem_vmemmap_unmark(VirtIOMEMVmemmap *vm, uint64_t start,
                                   uint64_t size)
{
    uint64_t first, end, dropped;

    /* Nothing marked is the common case: keep unplug as cheap as before. */
    if (!vm->size || !size) {
        return 0;
    }
    first = start / PAGE;
    end = MIN(DIV_ROUND_UP(start + size, PAGE), vm->nr_pages);
    if (first >= end) {
        return 0;
    }
    dropped = bitmap_count_one_with_offset(vm->bitmap, first,
                                           end - first) * PAGE;
    g_assert(dropped <= vm->size);
    if (dropped) {
        bitmap_clear(vm->bitmap, first, end - first);
        virtio_mem_vmemmap_release(vm, first, end);
    }
    vm->size -= dropped;
    return dropped;
}

void virtio_mem_vmemmap_clear(VirtIOMEMVmemmap *vm)
{
    if (!vm->size) {
        return;
    }
    /*
     * Dropping the pages rather than a memset: clearing a large region
     * must not make its whole bitmap resident, and must free what marks
     * made resident.  A private anonymous mapping reads zero afterwards.
     */
    qemu_madvise(vm->bitmap, virtio_mem_vmemmap_bitmap_bytes(vm),
                 QEMU_MADV_DONTNEED);
    vm->size = 0;
}

bool virtio_mem_vmemmap_next_range(const VirtIOMEMVmemmap *vm,
                                   uint64_t offset, uint64_t *start,
                                   uint64_t *size)
{
    uint64_t first, end;

    if (!vm->size || offset >= vm->region_size) {
        return false;
    }
    first = find_next_bit(vm->bitmap, vm->nr_pages, offset / PAGE);
    if (first >= vm->nr_pages) {
        return false;
    }
    end = find_next_zero_bit(vm->bitmap, vm->nr_pages, first);
    *start = first * PAGE;
    *size = (end - first) * PAGE;
    return true;
}

uint64_t virtio_mem_vmemmap_nr_ranges(const VirtIOMEMVmemmap *vm)
{
    uint64_t offset = 0, start, size, n = 0;

    while (virtio_mem_vmemmap_next_range(vm, offset, &start, &size)) {
        offset = start + size;
        n++;
    }
    return n;
}

uint64_t virtio_mem_vmemmap_unit(const VirtIOMEMVmemmap *vm)
{
    return MIN(vm->block_size, VIRTIO_MEM_VMEMMAP_START_ALIGN);
}

/* How many marking units the plugged blocks hold. */
static uint64_t virtio_mem_vmemmap_plugged_units(const VirtIOMEMVmemmap *vm)
{
    const uint64_t nr_blocks = vm->region_size / vm->block_size;

    return bitmap_count_one(vm->plugged, nr_blocks) *
           (vm->block_size / virtio_mem_vmemmap_unit(vm));
}

uint64_t virtio_mem_vmemmap_encoded_size(const VirtIOMEMVmemmap *vm)
{
    if (!vm->size) {
        return 0;
    }
    return virtio_mem_vmemmap_plugged_units(vm) * sizeof(uint16_t);
}

/*
 * Marked pages at the start of the unit at page @first, @unit_pages long.
 * Nothing after them inside the unit may be marked: runs start at unit
 * boundaries only (see VIRTIO_MEM_VMEMMAP_START_ALIGN).
 */
static uint64_t virtio_mem_vmemmap_prefix(const VirtIOMEMVmemmap *vm,
                                          uint64_t first, uint64_t unit_pages)
{
    const uint64_t end = first + unit_pages;
    const unsigned long *w;
    uint64_t zero, n, i;

    if (first % BITS_PER_LONG || unit_pages % BITS_PER_LONG) {
        if (!test_bit(first, vm->bitmap)) {
            g_assert(find_next_bit(vm->bitmap, end, first) >= end);
            return 0;
        }
        zero = find_next_zero_bit(vm->bitmap, end, first);
        g_assert(zero >= end || find_next_bit(vm->bitmap, end, zero) >= end);
        return MIN(zero, end) - first;
    }
    /*
     * Whole words (a unit of 1 MiB or more): ones, then at most one
     * partial word, then zeroes.  Encoding a TiB of units is one pass
     * over its 32 MiB of bitmap, under the BQL.
     */
    w = vm->bitmap + first / BITS_PER_LONG;
    for (i = 0, n = 0; i < unit_pages / BITS_PER_LONG && w[i] == ~0UL; i++) {
        n += BITS_PER_LONG;
    }
    if (i < unit_pages / BITS_PER_LONG) {
        const unsigned ones = ctzl(~w[i]);

        g_assert(!(w[i] >> ones));
        n += ones;
        for (i++; i < unit_pages / BITS_PER_LONG; i++) {
            g_assert(!w[i]);
        }
    }
    return n;
}

void virtio_mem_vmemmap_encode(const VirtIOMEMVmemmap *vm, uint8_t *buf)
{
    uint64_t nr_blocks, unit_pages, block_pages, b, p;

    if (!vm->size) {
        return;
    }
    nr_blocks = vm->region_size / vm->block_size;
    unit_pages = virtio_mem_vmemmap_unit(vm) / PAGE;
    block_pages = vm->block_size / PAGE;
    for (b = find_first_bit(vm->plugged, nr_blocks); b < nr_blocks;
         b = find_next_bit(vm->plugged, nr_blocks, b + 1)) {
        for (p = b * block_pages; p < (b + 1) * block_pages;
             p += unit_pages) {
            stw_be_p(buf, virtio_mem_vmemmap_prefix(vm, p, unit_pages));
            buf += sizeof(uint16_t);
        }
    }
}

VirtIOMEMVmemmapCheck virtio_mem_vmemmap_decode(VirtIOMEMVmemmap *vm,
                                                const uint8_t *buf,
                                                uint64_t len)
{
    uint64_t nr_blocks, unit_pages, block_pages, b, p, i, n;

    if (!virtio_mem_vmemmap_enabled(vm)) {
        return VIRTIO_MEM_VMEMMAP_DISABLED;
    }
    nr_blocks = vm->region_size / vm->block_size;
    unit_pages = virtio_mem_vmemmap_unit(vm) / PAGE;
    block_pages = vm->block_size / PAGE;
    if (len && len != 2 * virtio_mem_vmemmap_plugged_units(vm)) {
        return VIRTIO_MEM_VMEMMAP_MALFORMED;
    }
    for (i = 0; i < len; i += sizeof(uint16_t)) {
        if (lduw_be_p(buf + i) > unit_pages) {
            return VIRTIO_MEM_VMEMMAP_MALFORMED;
        }
    }
    virtio_mem_vmemmap_clear(vm);
    if (!len) {
        return VIRTIO_MEM_VMEMMAP_OK;
    }
    for (b = find_first_bit(vm->plugged, nr_blocks); b < nr_blocks;
         b = find_next_bit(vm->plugged, nr_blocks, b + 1)) {
        for (p = b * block_pages; p < (b + 1) * block_pages;
             p += unit_pages) {
            n = lduw_be_p(buf);
            buf += sizeof(uint16_t);
            if (n) {
                bitmap_set(vm->bitmap, p, n);
                vm->size += n * PAGE;
            }
        }
    }
    return VIRTIO_MEM_VMEMMAP_OK;
}
