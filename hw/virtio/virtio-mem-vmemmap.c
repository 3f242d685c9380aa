/*
 * virtio-mem: accounting of the plugged ranges that hold the guest's memmap
 *
 * Copyright (c) 2026 The virtio-mem-vmemmap authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qemu/bitmap.h"
#include "qemu/error-report.h"
#include "hw/virtio/virtio-mem-vmemmap.h"

#define RANGE(vm, i) (&g_array_index((vm)->ranges, VirtIOMEMVmemmapRange, (i)))

static inline uint64_t range_end(const VirtIOMEMVmemmapRange *r)
{
    return r->start + r->size;
}

void virtio_mem_vmemmap_init(VirtIOMEMVmemmap *vm)
{
    memset(vm, 0, sizeof(*vm));
    vm->ranges = g_array_new(false, false, sizeof(VirtIOMEMVmemmapRange));
}

void virtio_mem_vmemmap_destroy(VirtIOMEMVmemmap *vm)
{
    if (vm->ranges) {
        g_array_free(vm->ranges, true);
        vm->ranges = NULL;
    }
    g_free(vm->mig_ranges);
    vm->mig_ranges = NULL;
    vm->size = 0;
}

void virtio_mem_vmemmap_set_geometry(VirtIOMEMVmemmap *vm,
                                     uint64_t region_size,
                                     uint64_t block_size,
                                     const unsigned long *plugged)
{
    vm->region_size = region_size;
    vm->block_size = block_size;
    vm->plugged = plugged;
}

/* Index of the first range that ends after @offset (may be ->len). */
static guint virtio_mem_vmemmap_first_after(const VirtIOMEMVmemmap *vm,
                                            uint64_t offset)
{
    guint lo = 0, hi = vm->ranges->len;

    while (lo < hi) {
        const guint mid = lo + (hi - lo) / 2;

        if (range_end(RANGE(vm, mid)) <= offset) {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    return lo;
}

bool virtio_mem_vmemmap_intersects(const VirtIOMEMVmemmap *vm,
                                   uint64_t start, uint64_t size)
{
    const guint i = virtio_mem_vmemmap_first_after(vm, start);

    return size && i < vm->ranges->len && RANGE(vm, i)->start < start + size;
}

/* Are all device blocks intersecting [@start, @start + @size) plugged? */
static bool virtio_mem_vmemmap_plugged(const VirtIOMEMVmemmap *vm,
                                       uint64_t start, uint64_t size)
{
    const unsigned long first = start / vm->block_size;
    const unsigned long last = (start + size - 1) / vm->block_size;

    if (!vm->plugged) {
        return false;
    }
    return find_next_zero_bit(vm->plugged, last + 1, first) > last;
}

VirtIOMEMVmemmapCheck virtio_mem_vmemmap_check(const VirtIOMEMVmemmap *vm,
                                               uint64_t base,
                                               uint64_t usable_size,
                                               uint64_t addr, uint64_t size)
{
    uint64_t start;

    if (!size) {
        return VIRTIO_MEM_VMEMMAP_EMPTY;
    }
    if (!QEMU_IS_ALIGNED(addr, VIRTIO_MEM_VMEMMAP_ALIGN) ||
        !QEMU_IS_ALIGNED(size, VIRTIO_MEM_VMEMMAP_ALIGN)) {
        return VIRTIO_MEM_VMEMMAP_UNALIGNED;
    }
    if (addr + size < addr) {
        return VIRTIO_MEM_VMEMMAP_OVERFLOW;
    }
    if (addr < base || addr - base > usable_size ||
        size > usable_size - (addr - base)) {
        return VIRTIO_MEM_VMEMMAP_OUTSIDE;
    }
    start = addr - base;
    if (!virtio_mem_vmemmap_plugged(vm, start, size)) {
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
    }
    g_assert_not_reached();
}

void virtio_mem_vmemmap_mark(VirtIOMEMVmemmap *vm, uint64_t start,
                             uint64_t size)
{
    const guint i = virtio_mem_vmemmap_first_after(vm, start);
    VirtIOMEMVmemmapRange *prev = i ? RANGE(vm, i - 1) : NULL;
    VirtIOMEMVmemmapRange *next = i < vm->ranges->len ? RANGE(vm, i) : NULL;
    const uint64_t end = start + size;

    g_assert(size && end > start);
    g_assert(!next || next->start >= end);

    vm->size += size;
    if (prev && range_end(prev) == start) {
        prev->size += size;
        if (next && next->start == end) {
            prev->size += next->size;
            g_array_remove_index(vm->ranges, i);
        }
    } else if (next && next->start == end) {
        next->start = start;
        next->size += size;
    } else {
        const VirtIOMEMVmemmapRange r = { .start = start, .size = size };

        g_array_insert_val(vm->ranges, i, r);
    }
}

uint64_t virtio_mem_vmemmap_unmark(VirtIOMEMVmemmap *vm, uint64_t start,
                                   uint64_t size)
{
    const uint64_t end = start + size;
    guint i = virtio_mem_vmemmap_first_after(vm, start);
    uint64_t dropped = 0;

    while (i < vm->ranges->len && RANGE(vm, i)->start < end) {
        VirtIOMEMVmemmapRange *r = RANGE(vm, i);
        const uint64_t r_end = range_end(r);

        if (r->start < start && r_end > end) {
            /* The hole splits the range in two. */
            const VirtIOMEMVmemmapRange tail = {
                .start = end, .size = r_end - end,
            };

            r->size = start - r->start;
            g_array_insert_val(vm->ranges, i + 1, tail);
            dropped += size;
            break;
        } else if (r->start < start) {
            dropped += r_end - start;
            r->size = start - r->start;
            i++;
        } else if (r_end > end) {
            dropped += end - r->start;
            r->size = r_end - end;
            r->start = end;
            break;
        } else {
            dropped += r->size;
            g_array_remove_index(vm->ranges, i);
        }
    }
    g_assert(dropped <= vm->size);
    vm->size -= dropped;
    return dropped;
}

void virtio_mem_vmemmap_clear(VirtIOMEMVmemmap *vm)
{
    g_array_set_size(vm->ranges, 0);
    vm->size = 0;
}

static int virtio_mem_vmemmap_pre_save(void *opaque)
{
    VirtIOMEMVmemmap *vm = opaque;

    g_free(vm->mig_ranges);
    vm->mig_nr_ranges = vm->ranges->len;
    vm->mig_ranges = g_memdup2(vm->ranges->data, vm->ranges->len *
                               sizeof(VirtIOMEMVmemmapRange));
    return 0;
}

static int virtio_mem_vmemmap_post_save(void *opaque)
{
    VirtIOMEMVmemmap *vm = opaque;

    g_free(vm->mig_ranges);
    vm->mig_ranges = NULL;
    vm->mig_nr_ranges = 0;
    return 0;
}

static int virtio_mem_vmemmap_post_load(void *opaque, int version_id)
{
    VirtIOMEMVmemmap *vm = opaque;
    g_autofree VirtIOMEMVmemmapRange *ranges = vm->mig_ranges;
    const int32_t nr = vm->mig_nr_ranges;
    int32_t i;

    vm->mig_ranges = NULL;
    vm->mig_nr_ranges = 0;
    virtio_mem_vmemmap_clear(vm);

    /* Each range must pass what a request for it would have to pass. */
    for (i = 0; i < nr; i++) {
        const uint64_t start = ranges[i].start, size = ranges[i].size;
        VirtIOMEMVmemmapCheck check = VIRTIO_MEM_VMEMMAP_UNPLUGGED;

        if (vm->block_size) {
            check = virtio_mem_vmemmap_check(vm, 0, vm->region_size,
                                             start, size);
        }
        if (check != VIRTIO_MEM_VMEMMAP_OK) {
            error_report("virtio-mem: incoming vmemmap range 0x%" PRIx64
                         "+0x%" PRIx64 ": %s", start, size,
                         virtio_mem_vmemmap_check_str(check));
            virtio_mem_vmemmap_clear(vm);
            return -EINVAL;
        }
        virtio_mem_vmemmap_mark(vm, start, size);
    }
    return 0;
}

/*
 * Ranges are disjoint and never adjacent, so a region holds at most one
 * range per two 4 KiB pages.  Check before the array is allocated.
 */
static bool virtio_mem_vmemmap_nr_ranges_valid(void *opaque, int version_id)
{
    VirtIOMEMVmemmap *vm = opaque;

    if (vm->mig_nr_ranges < 0 || (uint64_t)vm->mig_nr_ranges >
        vm->region_size / VIRTIO_MEM_VMEMMAP_ALIGN / 2 + 1) {
        error_report("virtio-mem: incoming vmemmap state claims %" PRId32
                     " ranges in a region of 0x%" PRIx64 " bytes",
                     vm->mig_nr_ranges, vm->region_size);
        return false;
    }
    return true;
}

static const VMStateDescription vmstate_virtio_mem_vmemmap_range = {
    .name = "virtio-mem-vmemmap-range",
    .version_id = 1,
    .minimum_version_id = 1,
    .fields = (const VMStateField[]) {
        VMSTATE_UINT64(start, VirtIOMEMVmemmapRange),
        VMSTATE_UINT64(size, VirtIOMEMVmemmapRange),
        VMSTATE_END_OF_LIST()
    },
};

const VMStateDescription vmstate_virtio_mem_vmemmap = {
    .name = "virtio-mem-vmemmap",
    .version_id = 1,
    .minimum_version_id = 1,
    .pre_save = virtio_mem_vmemmap_pre_save,
    .post_save = virtio_mem_vmemmap_post_save,
    .post_load = virtio_mem_vmemmap_post_load,
    .fields = (const VMStateField[]) {
        VMSTATE_INT32(mig_nr_ranges, VirtIOMEMVmemmap),
        VMSTATE_VALIDATE("vmemmap range count",
                         virtio_mem_vmemmap_nr_ranges_valid),
        VMSTATE_STRUCT_VARRAY_ALLOC(mig_ranges, VirtIOMEMVmemmap,
                                    mig_nr_ranges, 0,
                                    vmstate_virtio_mem_vmemmap_range,
                                    VirtIOMEMVmemmapRange),
        VMSTATE_END_OF_LIST()
    },
};
