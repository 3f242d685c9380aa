/*
 * virtio-mem: accounting of the plugged ranges that hold the guest's memmap
 *
 * A driver that negotiated VIRTIO_MEM_F_VMEMMAP tells the device which
 * plugged byte ranges it uses for its own memory map (Linux:
 * memory_hotplug.memmap_on_memory).  The device keeps that set of ranges
 * exactly, in bytes, always as a subset of the plugged memory, and reports
 * its total beside the plugged size.  See docs/specs/virtio-mem-vmemmap.rst.
 *
 * This file only knows ranges; it does not know the device.  The device
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

/* A range, as an offset into the device's memory region. */
typedef struct VirtIOMEMVmemmapRange {
    uint64_t start;
    uint64_t size;
} VirtIOMEMVmemmapRange;

typedef struct VirtIOMEMVmemmap {
    /* VirtIOMEMVmemmapRange, sorted, disjoint and never adjacent. */
    GArray *ranges;
    /* Total of all ranges, in bytes. */
    uint64_t size;

    /* Geometry, set by the device for validating a migration stream. */
    uint64_t region_size;
    uint64_t block_size;
    const unsigned long *plugged;

    /* Flat copy of @ranges, valid only while saving or loading. */
    int32_t mig_nr_ranges;
    VirtIOMEMVmemmapRange *mig_ranges;
} VirtIOMEMVmemmap;

/* Why a VIRTIO_MEM_REQ_VMEMMAP request is refused (or not). */
typedef enum VirtIOMEMVmemmapCheck {
    VIRTIO_MEM_VMEMMAP_OK = 0,
    VIRTIO_MEM_VMEMMAP_EMPTY,
    VIRTIO_MEM_VMEMMAP_UNALIGNED,
    VIRTIO_MEM_VMEMMAP_OVERFLOW,
    VIRTIO_MEM_VMEMMAP_OUTSIDE,
    VIRTIO_MEM_VMEMMAP_UNPLUGGED,
    VIRTIO_MEM_VMEMMAP_OVERLAP,
} VirtIOMEMVmemmapCheck;

void virtio_mem_vmemmap_init(VirtIOMEMVmemmap *vm);
void virtio_mem_vmemmap_destroy(VirtIOMEMVmemmap *vm);

/*
 * Describe the device to the range set: region size, block size and the
 * bitmap of plugged blocks (bit set == plugged).  Used by
 * virtio_mem_vmemmap_check() callers and by migration.
 */
void virtio_mem_vmemmap_set_geometry(VirtIOMEMVmemmap *vm,
                                     uint64_t region_size,
                                     uint64_t block_size,
                                     const unsigned long *plugged);

/*
 * May [@addr, @addr + @size) (guest physical) be marked?  @base is the
 * device's address and @usable_size its usable region size.
 */
VirtIOMEMVmemmapCheck virtio_mem_vmemmap_check(const VirtIOMEMVmemmap *vm,
                                               uint64_t base,
                                               uint64_t usable_size,
                                               uint64_t addr, uint64_t size);
const char *virtio_mem_vmemmap_check_str(VirtIOMEMVmemmapCheck check);

/* Mark a range that virtio_mem_vmemmap_check() accepted. */
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
 * Migration: the ranges as a flat array.  Loading fails unless every range
 * is aligned, inside the region, sorted, disjoint and plugged.
 */
extern const VMStateDescription vmstate_virtio_mem_vmemmap;

#endif
