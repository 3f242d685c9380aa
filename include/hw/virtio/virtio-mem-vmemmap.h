/*
 * virtio-mem: accounting of the plugged ranges that hold the guest's memmap
 *
 * A driver that negotiated VIRTIO_MEM_F_VMEMMAP tells the device which
 * plugged byte ranges it uses for its own memory map (Linux:
 * memory_hotplug.memmap_on_memory).  The device keeps that set exactly, at
 * 4 KiB granularity, always as a subset of the plugged memory, and reports
 * its total beside the plugged size.  See docs/specs/virtio-mem-vmemmap.rst.
 *
 * The set is a bitmap with one bit per 4 KiB page of the device's memory
 * region, allocated when the device is configured for accounting.  What
 * the device holds is therefore fixed by its configuration (1 bit per
 * 4 KiB, 32 KiB per GiB of region) and no guest can make it larger; a
 * request costs one pass over the bitmap words it covers.
 *
 * This file only knows pages; it does not know the device.  The device
 * passes what it knows (usable region, block size, plugged bitmap).
 *
 * Copyright (c) 2026 The virtio-mem-vmemmap authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#ifndef HW_VIRTIO_MEM_VMEMMAP_H
#define HW_VIRTIO_MEM_VMEMMAP_H

#include "migration/vmstate.h"

/* Granularity of a vmemmap range: the smallest page size of any guest. */
#define VIRTIO_MEM_VMEMMAP_ALIGN 4096

typedef struct VirtIOMEMVmemmap {
    /* One bit per VIRTIO_MEM_VMEMMAP_ALIGN bytes of the region. */
    unsigned long *bitmap;
    uint64_t nr_pages;
    /* Total of all marked bytes. */
    uint64_t size;

    /* Geometry, set by the device. */
    uint64_t region_size;
    uint64_t block_size;
    const unsigned long *plugged;
} VirtIOMEMVmemmap;

/* Why a range may not be marked (or loaded). */
typedef enum VirtIOMEMVmemmapCheck {
    VIRTIO_MEM_VMEMMAP_OK = 0,
    VIRTIO_MEM_VMEMMAP_EMPTY,
    VIRTIO_MEM_VMEMMAP_UNALIGNED,
    VIRTIO_MEM_VMEMMAP_OVERFLOW,
    VIRTIO_MEM_VMEMMAP_OUTSIDE,
    VIRTIO_MEM_VMEMMAP_UNPLUGGED,
    VIRTIO_MEM_VMEMMAP_OVERLAP,
    VIRTIO_MEM_VMEMMAP_UNORDERED,
    VIRTIO_MEM_VMEMMAP_DISABLED,
} VirtIOMEMVmemmapCheck;

void virtio_mem_vmemmap_init(VirtIOMEMVmemmap *vm);
void virtio_mem_vmemmap_destroy(VirtIOMEMVmemmap *vm);

/*
 * Enable accounting for a region of @region_size bytes made of blocks of
 * @block_size, with @plugged the device's bitmap of plugged blocks (bit
 * set == plugged).  Allocates region_size / 32768 bytes.  Without this
 * call every range is refused with VIRTIO_MEM_VMEMMAP_DISABLED.
 */
void virtio_mem_vmemmap_set_geometry(VirtIOMEMVmemmap *vm,
                                     uint64_t region_size,
                                     uint64_t block_size,
                                     const unsigned long *plugged);

static inline bool virtio_mem_vmemmap_enabled(const VirtIOMEMVmemmap *vm)
{
    return vm->bitmap;
}

/*
 * May [@addr, @addr + @size) (guest physical) be marked?  @base is the
 * device's address and @usable_size its usable region size.
 */
VirtIOMEMVmemmapCheck virtio_mem_vmemmap_check(const VirtIOMEMVmemmap *vm,
                                               uint64_t base,
                                               uint64_t usable_size,
                                               uint64_t addr, uint64_t size);
const char *virtio_mem_vmemmap_check_str(VirtIOMEMVmemmapCheck check);

/* Mark a range (offset into the region) that the check accepted. */
void virtio_mem_vmemmap_mark(VirtIOMEMVmemmap *vm, uint64_t start,
                             uint64_t size);
/* Unmark everything inside [@start, @start + @size); returns the bytes. */
uint64_t virtio_mem_vmemmap_unmark(VirtIOMEMVmemmap *vm, uint64_t start,
                                   uint64_t size);
void virtio_mem_vmemmap_clear(VirtIOMEMVmemmap *vm);

static inline uint64_t virtio_mem_vmemmap_size(const VirtIOMEMVmemmap *vm)
{
    return vm->size;
}

/* Is any byte of [@start, @start + @size) marked? */
bool virtio_mem_vmemmap_intersects(const VirtIOMEMVmemmap *vm,
                                   uint64_t start, uint64_t size);

/*
 * The first run of marked bytes at or after @offset, as @start and @size;
 * false if there is none.  From 0 or from the end of the previous run,
 * this walks the maximal runs, which are what migration sends and what
 * tools show: sorted, disjoint and never adjacent.  (From an offset
 * inside a run it returns the rest of that run.)
 */
bool virtio_mem_vmemmap_next_range(const VirtIOMEMVmemmap *vm,
                                   uint64_t offset, uint64_t *start,
                                   uint64_t *size);
uint64_t virtio_mem_vmemmap_nr_ranges(const VirtIOMEMVmemmap *vm);

/*
 * The most runs a region can hold: they are never adjacent, so one per
 * two pages.  Bounds what a migration stream may claim.
 */
uint64_t virtio_mem_vmemmap_max_ranges(const VirtIOMEMVmemmap *vm);

/*
 * Loading runs one by one from an untrusted source: each must be one
 * that the check accepts and start after the end of the one before it
 * plus at least one page (@cursor, 0 before the first).  Marks it and
 * advances @cursor, or changes nothing and says why.
 */
VirtIOMEMVmemmapCheck virtio_mem_vmemmap_load_range(VirtIOMEMVmemmap *vm,
                                                    uint64_t *cursor,
                                                    uint64_t start,
                                                    uint64_t size);

/*
 * Migration: the runs as a count and (start, size) pairs, written from
 * the bitmap and read back through virtio_mem_vmemmap_load_range(), so
 * neither side ever holds a copy.  virtio-mem-vmemmap-migration.c.
 */
extern const VMStateDescription vmstate_virtio_mem_vmemmap;

#endif
