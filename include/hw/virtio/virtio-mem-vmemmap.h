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
#include "standard-headers/linux/virtio_mem.h"

/* Granularity of a vmemmap range: the smallest page size of any guest. */
#define VIRTIO_MEM_VMEMMAP_ALIGN 4096
/*
 * A range starts at a multiple of VIRTIO_MEM_VMEMMAP_START_ALIGN (guest
 * physical; the uapi header defines it).  With whole blocks unplugged at
 * once, every run of marks then starts at a multiple of the marking
 * unit, min(block size, that alignment), and the marks inside each unit
 * are a prefix of it: one count per unit is the whole state.
 */

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

    /* Migration only: the encoded state, between save or load steps. */
    uint32_t mig_len;
    uint8_t *mig_buf;
} VirtIOMEMVmemmap;

/* Why a range may not be marked (or loaded). */
typedef enum VirtIOMEMVmemmapCheck {
    VIRTIO_MEM_VMEMMAP_OK = 0,
    VIRTIO_MEM_VMEMMAP_EMPTY,
    VIRTIO_MEM_VMEMMAP_UNALIGNED,
    VIRTIO_MEM_VMEMMAP_UNALIGNED_START,
    VIRTIO_MEM_VMEMMAP_OVERFLOW,
    VIRTIO_MEM_VMEMMAP_OUTSIDE,
    VIRTIO_MEM_VMEMMAP_UNPLUGGED,
    VIRTIO_MEM_VMEMMAP_OVERLAP,
    VIRTIO_MEM_VMEMMAP_DISABLED,
    VIRTIO_MEM_VMEMMAP_MALFORMED,
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
/*
 * Unmark everything inside [@start, @start + @size); returns the bytes.
 * The device unmarks whole blocks: a range of whole marking units keeps
 * the marks of each unit a prefix of it, which the encoding relies on.
 */
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
 * this walks the maximal runs, which are what tools show: sorted,
 * disjoint and never adjacent.  (From an offset inside a run it returns
 * the rest of that run.)
 */
bool virtio_mem_vmemmap_next_range(const VirtIOMEMVmemmap *vm,
                                   uint64_t offset, uint64_t *start,
                                   uint64_t *size);
uint64_t virtio_mem_vmemmap_nr_ranges(const VirtIOMEMVmemmap *vm);

/* The marking unit: min(block size, VIRTIO_MEM_VMEMMAP_START_ALIGN). */
uint64_t virtio_mem_vmemmap_unit(const VirtIOMEMVmemmap *vm);

/*
 * The state as migration sends it: nothing while nothing is marked, else
 * one big-endian 16-bit count per marking unit of each plugged block, in
 * ascending order: the pages marked from the unit's start.  At most
 * 2 bytes per unit of plugged memory (1 MiB per TiB with units of 2 MiB),
 * whatever the guest did.  virtio_mem_vmemmap_encoded_size() is its
 * length in bytes; virtio_mem_vmemmap_encode() writes that many to @buf.
 */
uint64_t virtio_mem_vmemmap_encoded_size(const VirtIOMEMVmemmap *vm);
void virtio_mem_vmemmap_encode(const VirtIOMEMVmemmap *vm, uint8_t *buf);

/*
 * Replace the marks with the state in @buf (@len bytes) from an untrusted
 * source, for the plugged blocks the device has now.  The length must be
 * 0 or virtio_mem_vmemmap_encoded_size() with something marked, and no
 * count may exceed a unit; otherwise nothing changes and the answer is
 * VIRTIO_MEM_VMEMMAP_MALFORMED (VIRTIO_MEM_VMEMMAP_DISABLED without
 * accounting).
 */
VirtIOMEMVmemmapCheck virtio_mem_vmemmap_decode(VirtIOMEMVmemmap *vm,
                                                const uint8_t *buf,
                                                uint64_t len);

/*
 * Migration: the encoded state as a length and a buffer (made in
 * pre_save, freed in post_save; checked and applied in post_load), so
 * that the stream is plain VMState that analyze-migration.py can read.
 * virtio-mem-vmemmap-migration.c.
 */
extern const VMStateDescription vmstate_virtio_mem_vmemmap;

#endif
