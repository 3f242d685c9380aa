/*
 * Reference model of the vmemmap accounting, for the fuzz harnesses
 *
 * One byte per 4 KiB page (1 == marked) and one per device block
 * (1 == plugged): deliberately nothing like the code under test (a
 * bitmap), so that the two can only agree by being right.  The verdict
 * of a VMEMMAP request follows docs/specs/virtio-mem-vmemmap.rst and the
 * order of the header's VirtIOMEMVmemmapCheck, with exact 128-bit
 * arithmetic where the code must avoid overflow.
 *
 * Copyright (c) 2026 The virtio-mem-vmemmap authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#ifndef TESTS_FUZZ_VMEMMAP_MODEL_H
#define TESTS_FUZZ_VMEMMAP_MODEL_H

#include "qemu/units.h"
#include "hw/virtio/virtio-mem-vmemmap.h"

#define MODEL_PAGE          VIRTIO_MEM_VMEMMAP_ALIGN
#define MODEL_MAX_REGION    (1 * GiB)
#define MODEL_MAX_PAGES     (MODEL_MAX_REGION / MODEL_PAGE)
#define MODEL_MAX_BLOCKS    (MODEL_MAX_REGION / (2 * MiB))

typedef struct Model {
    uint8_t marked[MODEL_MAX_PAGES];    /* 1 == page marked */
    uint8_t blk[MODEL_MAX_BLOCKS];      /* 1 == block plugged */
    uint64_t nr_marked;                 /* pages marked */
    uint64_t region, nr_pages, block_size, nr_blocks;
    bool enabled;                       /* vmemmap accounting on */
} Model;

static inline void model_init(Model *m, uint64_t region, uint64_t block_size,
                              bool enabled)
{
    g_assert(region <= MODEL_MAX_REGION && block_size >= 2 * MiB);
    m->region = region;
    m->nr_pages = region / MODEL_PAGE;
    m->block_size = block_size;
    m->nr_blocks = region / block_size;
    memset(m->marked, 0, m->nr_pages);
    memset(m->blk, 0, m->nr_blocks);
    m->nr_marked = 0;
    m->enabled = enabled;
}

/*
 * The next run of marked pages in [@first, @end) as [*@rs, *@re); false
 * if none.  memchr, so that a sparse model costs what its runs cost.
 */
static inline bool model_next_run(const Model *m, uint64_t first,
                                  uint64_t end, uint64_t *rs, uint64_t *re)
{
    const uint8_t *p, *z;

    if (first >= end) {
        return false;
    }
    p = memchr(m->marked + first, 1, end - first);
    if (!p) {
        return false;
    }
    z = memchr(p, 0, m->marked + end - p);
    *rs = p - m->marked;
    *re = z ? z - m->marked : end;
    return true;
}

static inline uint64_t model_count(const Model *m, uint64_t first,
                                   uint64_t end)
{
    uint64_t n = 0, rs, re;

    while (model_next_run(m, first, end, &rs, &re)) {
        n += re - rs;
        first = re;
    }
    return n;
}

static inline void model_set(Model *m, uint64_t first, uint64_t n, uint8_t v)
{
    const uint64_t was = model_count(m, first, first + n);

    memset(m->marked + first, v, n);
    m->nr_marked += v ? n - was : -was;
}

/*
 * What the device must answer for a VMEMMAP request, derived from the
 * spec's rules in the header's order, with exact 128-bit arithmetic.
 */
static inline VirtIOMEMVmemmapCheck model_check(const Model *m, uint64_t b,
                                                uint64_t u, uint64_t addr,
                                                uint64_t size)
{
    unsigned __int128 end = (unsigned __int128)addr + size;
    uint64_t start, i;

    if (!m->enabled) {
        return VIRTIO_MEM_VMEMMAP_DISABLED;
    }
    if (!size) {
        return VIRTIO_MEM_VMEMMAP_EMPTY;
    }
    if (addr % MODEL_PAGE || size % MODEL_PAGE) {
        return VIRTIO_MEM_VMEMMAP_UNALIGNED;
    }
    if (addr % (2 * MiB)) {
        return VIRTIO_MEM_VMEMMAP_UNALIGNED_START;
    }
    if (end > UINT64_MAX) {
        return VIRTIO_MEM_VMEMMAP_OVERFLOW;
    }
    if (addr < b || end > (unsigned __int128)b + MIN(u, m->region)) {
        return VIRTIO_MEM_VMEMMAP_OUTSIDE;
    }
    start = addr - b;
    for (i = start / m->block_size; i <= (start + size - 1) / m->block_size;
         i++) {
        if (!m->blk[i]) {
            return VIRTIO_MEM_VMEMMAP_UNPLUGGED;
        }
    }
    if (model_count(m, start / MODEL_PAGE, (start + size) / MODEL_PAGE)) {
        return VIRTIO_MEM_VMEMMAP_OVERLAP;
    }
    return VIRTIO_MEM_VMEMMAP_OK;
}

/* Are all pages in [@first, @end) marked (@v 1) or all unmarked (@v 0)? */
static inline bool model_all(const Model *m, uint64_t first, uint64_t end,
                             uint8_t v)
{
    return !memchr(m->marked + first, !v, end - first);
}

#endif
