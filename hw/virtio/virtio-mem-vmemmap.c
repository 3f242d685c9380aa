/*
 * virtio-mem: accounting of the plugged ranges that hold the guest's memmap
 *
 * Copyright (c) 2026 The virtio-mem-vmemmap authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qemu/bitmap.h"
#include "hw/virtio/virtio-mem-vmemmap.h"

#define PAGE VIRTIO_MEM_VMEMMAP_ALIGN

void virtio_mem_vmemmap_init(VirtIOMEMVmemmap *vm)
{
    memset(vm, 0, sizeof(*vm));
}

void virtio_mem_vmemmap_destroy(VirtIOMEMVmemmap *vm)
{
    g_free(vm->bitmap);
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
    /*
     * Large enough to come straight from mmap(): pages of the bitmap that
     * no mark ever touched cost no memory.
     */
    vm->bitmap = bitmap_new(vm->nr_pages);
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
    case VIRTIO_MEM_VMEMMAP_OVERFLOW:
        return "address overflow";
    case VIRTIO_MEM_VMEMMAP_OUTSIDE:
        return "outside the usable region";
    case VIRTIO_MEM_VMEMMAP_UNPLUGGED:
        return "not plugged";
    case VIRTIO_MEM_VMEMMAP_OVERLAP:
        return "already marked";
    case VIRTIO_MEM_VMEMMAP_UNORDERED:
        return "not after the previous range and apart from it";
    case VIRTIO_MEM_VMEMMAP_DISABLED:
        return "vmemmap-accounting is off";
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
    bitmap_clear(vm->bitmap, first, end - first);
    vm->size -= dropped;
    return dropped;
}

void virtio_mem_vmemmap_clear(VirtIOMEMVmemmap *vm)
{
    if (!vm->size) {
        return;
    }
    /*
     * A fresh allocation rather than a memset: clearing a large region
     * must not make its whole bitmap resident.
     */
    g_free(vm->bitmap);
    vm->bitmap = bitmap_new(vm->nr_pages);
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

uint64_t virtio_mem_vmemmap_max_ranges(const VirtIOMEMVmemmap *vm)
{
    return DIV_ROUND_UP(vm->nr_pages, 2);
}

VirtIOMEMVmemmapCheck virtio_mem_vmemmap_load_range(VirtIOMEMVmemmap *vm,
                                                    uint64_t *cursor,
                                                    uint64_t start,
                                                    uint64_t size)
{
    VirtIOMEMVmemmapCheck check;

    check = virtio_mem_vmemmap_check(vm, 0, vm->region_size, start, size);
    if (check == VIRTIO_MEM_VMEMMAP_OK && start < *cursor) {
        check = VIRTIO_MEM_VMEMMAP_UNORDERED;
    }
    if (check != VIRTIO_MEM_VMEMMAP_OK) {
        return check;
    }
    virtio_mem_vmemmap_mark(vm, start, size);
    /* Runs are maximal: the next one starts at least a page later. */
    *cursor = start + size + PAGE;
    return VIRTIO_MEM_VMEMMAP_OK;
}
