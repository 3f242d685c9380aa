/*
 * libFuzzer harness: the virtio-mem vmemmap accounting core
 *
 * What it fuzzes: hw/virtio/virtio-mem-vmemmap.c (the bitmap of marked
 * pages, with QEMU's util/bitmap.c and util/bitops.c, and the encoding
 * of that state that migration sends: virtio_mem_vmemmap_encode() and
 * _decode(); the VMState glue around them is plain VMState).
 *
 * How: any byte string is a geometry (region size, block size, the
 * device's base address, a usable size, a second instance for the
 * migration destination) followed by operations the device performs:
 * plug and unplug of blocks (unplug unmarks, as virtio_mem_set_range_*
 * does), the VMEMMAP request (check, then mark), unmark of whole blocks,
 * clear, encode and decode of the state (exact, mutated and arbitrary).
 * A reference model keeps one byte per 4 KiB page and one per block and
 * predicts every verdict and every count independently of the code under
 * test.  After each operation the runs enumerated with
 * virtio_mem_vmemmap_next_range() must be sorted, disjoint, non-adjacent,
 * start at a marking unit, lie inside plugged blocks and equal the model
 * page for page, and size == sum of the runs == the model's count.  Any
 * difference aborts.
 *
 * Build and run: scripts/fuzz (make fuzz); corpus in
 * tests/fuzz/corpus/vmemmap-ranges/, made by scripts/fuzz --seed-corpus.
 *
 * Copyright (c) 2026 The virtio-mem-vmemmap authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qemu/bitmap.h"
#include "qemu/bswap.h"
#include "qemu/units.h"
#include "hw/virtio/virtio-mem-vmemmap.h"
#include "vmemmap-model.h"
#include "fuzz-input.h"

#define PAGE        MODEL_PAGE
#define UNIT        (2 * MiB)     /* every block size here is >= 2 MiB */
/* The encoded state: 2 bytes per unit, plus room to grow it. */
#define MAX_STREAM  (2 * MODEL_MAX_REGION / UNIT + 64)

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/*
 * The one call virtio-mem-vmemmap.c makes outside the bitmap code (it
 * gives emptied bitmap pages back): the harness links no more of QEMU's
 * utility library, whose osdep.c would pull in QOM.
 */
int qemu_madvise(void *addr, size_t len, int advice)
{
    return madvise(addr, len, advice);
}

/* ---- the reference model ---- */

typedef struct Side {
    Model m;                    /* what the code must hold */
    VirtIOMEMVmemmap vm;
    unsigned long *plugged;     /* the device's bitmap, bit per block */
} Side;

static Side src_side, dst_side;
static uint64_t block_size, base, usable;
static uint8_t stream_buf[MAX_STREAM];

static void side_setup(Side *s, uint64_t region, bool enabled)
{
    virtio_mem_vmemmap_destroy(&s->vm);
    g_free(s->plugged);
    model_init(&s->m, region, block_size, enabled);
    s->plugged = bitmap_new(s->m.nr_blocks);
    virtio_mem_vmemmap_init(&s->vm);
    if (enabled) {
        virtio_mem_vmemmap_set_geometry(&s->vm, region, block_size,
                                        s->plugged);
    }
}


/*
 * The invariants.  The runs come from the bitmap; each page of each run
 * must be marked in the model, and the runs hold as many pages as the
 * model marks: so the two sets are equal, without a scan of the region.
 */
static uint64_t check_invariants(Side *s)
{
    uint64_t offset = 0, prev_end = 0, start, size, sum = 0, n = 0, b;

    g_assert(virtio_mem_vmemmap_enabled(&s->vm) == s->m.enabled);
    while (virtio_mem_vmemmap_next_range(&s->vm, offset, &start, &size)) {
        g_assert(size && !(start % PAGE) && !(size % PAGE));
        g_assert(start + size <= s->m.region);
        /* sorted, disjoint, and never adjacent (so maximal) */
        g_assert(!n || start > prev_end);
        /* a run starts at a marking unit, so a unit holds a prefix */
        g_assert(!(start % UNIT));
        g_assert(model_all(&s->m, start / PAGE, (start + size) / PAGE, 1));
        /* on plugged blocks only */
        for (b = start / block_size; b <= (start + size - 1) / block_size;
             b++) {
            g_assert(test_bit(b, s->plugged) && s->m.blk[b]);
        }
        prev_end = offset = start + size;
        sum += size;
        n++;
    }
    g_assert(sum == virtio_mem_vmemmap_size(&s->vm));
    g_assert(sum == s->m.nr_marked * PAGE);
    return n;
}

/*
 * At the end of an input: the counts the code derives on its own, and the
 * harness's bookkeeping of the plugged blocks.
 */
static void check_all(Side *s)
{
    uint64_t i;

    g_assert(check_invariants(s) == virtio_mem_vmemmap_nr_ranges(&s->vm));
    g_assert(s->m.enabled || !s->m.nr_marked);
    for (i = 0; i < s->m.nr_blocks; i++) {
        g_assert(!!test_bit(i, s->plugged) == s->m.blk[i]);
    }
}

/* ---- operations ---- */

/* An address range for a request: mostly plausible, sometimes hostile. */
static void gen_range(Input *in, const Side *s, uint64_t *addr, uint64_t *size)
{
    const unsigned mode = U8(in) % 10;
    uint64_t first, n;

    switch (mode) {
    case 0 ... 2:   /* pages from a 2 MiB start, as a driver marks */
        first = U16(in) % (s->m.region / UNIT + 2) * (UNIT / PAGE);
        n = 1 + U16(in) % (3 * UNIT / PAGE);
        break;
    case 3:         /* a few pages anywhere in or just past the region */
        first = U16(in) % (s->m.nr_pages + 16);
        n = 1 + U8(in) % 64;
        break;
    case 4:         /* up to the whole region */
        first = U16(in) % (s->m.nr_pages + 16);
        n = U16(in) % (s->m.nr_pages + 16);
        break;
    case 5:         /* whole blocks, like an SBM memmap */
        first = U8(in) % (s->m.nr_blocks + 1) * (block_size / PAGE);
        n = (1 + U8(in) % 4) * (block_size / PAGE);
        break;
    case 6:         /* ending at the usable size */
        n = 1 + U8(in) % 64;
        first = MIN(usable, s->m.region) / PAGE - n + U8(in) % 3;
        break;
    case 7:         /* below the base, or straddling it */
        *addr = base - (uint64_t)(1 + U8(in) % 16) * PAGE;
        *size = (uint64_t)(1 + U8(in) % 32) * PAGE;
        return;
    case 8:         /* not page aligned */
        *addr = base + (uint64_t)(U16(in) % s->m.nr_pages) * PAGE +
                U16(in) % PAGE;
        *size = (uint64_t)(1 + U8(in) % 8) * PAGE + U16(in) % PAGE;
        return;
    default:        /* anything */
        *addr = U64(in);
        *size = U64(in);
        return;
    }
    *addr = base + first * PAGE;
    *size = n * PAGE;
}

static void op_plug(Input *in, Side *s, bool plug)
{
    const uint64_t first = U8(in) % s->m.nr_blocks;
    const uint64_t n = 1 + U8(in) % (s->m.nr_blocks - first);
    uint64_t i, dropped;

    for (i = first; i < first + n; i++) {
        s->m.blk[i] = plug;
    }
    if (plug) {
        bitmap_set(s->plugged, first, n);
        return;
    }
    /* As the device unplugs: the blocks, then the marks on them. */
    bitmap_clear(s->plugged, first, n);
    dropped = model_count(&s->m, first * block_size / PAGE,
                          (first + n) * block_size / PAGE);
    g_assert(virtio_mem_vmemmap_unmark(&s->vm, first * block_size,
                                       n * block_size) == dropped * PAGE);
    model_set(&s->m, first * block_size / PAGE, n * block_size / PAGE, 0);
}

static void op_unplug_all(Side *s)
{
    bitmap_clear(s->plugged, 0, s->m.nr_blocks);
    memset(s->m.blk, 0, s->m.nr_blocks);
    virtio_mem_vmemmap_clear(&s->vm);
    model_set(&s->m, 0, s->m.nr_pages, 0);
}

static void op_report(Input *in, Side *s)
{
    uint64_t addr, size;
    VirtIOMEMVmemmapCheck want, got;

    gen_range(in, s, &addr, &size);
    want = model_check(&s->m, base, usable, addr, size);
    got = virtio_mem_vmemmap_check(&s->vm, base, usable, addr, size);
    if (got != want) {
        fprintf(stderr, "check 0x%" PRIx64 "+0x%" PRIx64 " (base 0x%" PRIx64
                " usable 0x%" PRIx64 "): got '%s', model '%s'\n", addr, size,
                base, usable, virtio_mem_vmemmap_check_str(got),
                virtio_mem_vmemmap_check_str(want));
        abort();
    }
    g_assert(strlen(virtio_mem_vmemmap_check_str(got)));
    if (got == VIRTIO_MEM_VMEMMAP_OK) {
        virtio_mem_vmemmap_mark(&s->vm, addr - base, size);
        model_set(&s->m, (addr - base) / PAGE, size / PAGE, 1);
    }
}

/* Unmark whole blocks (the device never unmarks less), maybe past the end. */
static void op_unmark(Input *in, Side *s)
{
    const uint64_t bp = block_size / PAGE;
    const uint64_t first = U8(in) % (s->m.nr_blocks + 2) * bp;
    const uint64_t n = U8(in) % (s->m.nr_blocks + 2) * bp;
    const uint64_t end = MIN(first + n, s->m.nr_pages);
    uint64_t want = 0;

    if (first < end) {
        want = model_count(&s->m, first, end);
        model_set(&s->m, first, end - first, 0);
    }
    g_assert(virtio_mem_vmemmap_unmark(&s->vm, first * PAGE, n * PAGE) ==
             want * PAGE);
}

static void op_intersects(Input *in, Side *s)
{
    const uint64_t first = U16(in) % s->m.nr_pages;
    const uint64_t n = U16(in) % (s->m.nr_pages - first + 1);

    g_assert(virtio_mem_vmemmap_intersects(&s->vm, first * PAGE, n * PAGE) ==
             (n && model_count(&s->m, first, first + n)));
}

/* Where does the run that holds or follows page @first start and end? */
static void op_next_range(Input *in, Side *s)
{
    const uint64_t offset = U16(in) % (s->m.nr_pages + 1) * PAGE;
    uint64_t first = offset / PAGE, end, start, size;
    bool found;

    if (!model_next_run(&s->m, first, s->m.nr_pages, &first, &end)) {
        first = s->m.nr_pages;
    }
    found = virtio_mem_vmemmap_next_range(&s->vm, offset, &start, &size);
    g_assert(found == (first < s->m.nr_pages));
    /*
     * From inside a run the code returns the run's part from @offset on
     * (header: "the first maximal run ... that ends after @offset");
     * callers only ever pass 0 or the end of the previous run.
     */
    g_assert(!found || (start == first * PAGE && start + size == end * PAGE));
}

/* The model's own encoding of its state: what encode must write. */
static size_t model_encode(const Side *s, uint8_t *buf)
{
    const uint64_t up = UNIT / PAGE;
    uint64_t b, p, n;
    size_t len = 0;

    if (!s->m.nr_marked) {
        return 0;
    }
    for (b = 0; b < s->m.nr_blocks; b++) {
        if (!s->m.blk[b]) {
            continue;
        }
        for (p = b * block_size / PAGE; p < (b + 1) * block_size / PAGE;
             p += up) {
            for (n = 0; n < up && s->m.marked[p + n]; n++) {
                ;
            }
            g_assert(len + 2 <= MAX_STREAM);
            stw_be_p(buf + len, n);
            len += 2;
        }
    }
    return len;
}

/*
 * What decode must do with @buf: its verdict, and the destination model
 * updated as the code must leave it (unchanged unless OK).
 */
static VirtIOMEMVmemmapCheck model_decode(Side *d, const uint8_t *buf,
                                          size_t len)
{
    const uint64_t up = UNIT / PAGE;
    uint64_t b, p, units = 0;
    size_t i;

    if (!d->m.enabled) {
        return VIRTIO_MEM_VMEMMAP_DISABLED;
    }
    for (b = 0; b < d->m.nr_blocks; b++) {
        units += d->m.blk[b] ? block_size / UNIT : 0;
    }
    if (len && len != 2 * units) {
        return VIRTIO_MEM_VMEMMAP_MALFORMED;
    }
    for (i = 0; i < len; i += 2) {
        if (lduw_be_p(buf + i) > up) {
            return VIRTIO_MEM_VMEMMAP_MALFORMED;
        }
    }
    model_set(&d->m, 0, d->m.nr_pages, 0);
    for (b = 0, i = 0; i < len && b < d->m.nr_blocks; b++) {
        if (!d->m.blk[b]) {
            continue;
        }
        for (p = b * block_size / PAGE; p < (b + 1) * block_size / PAGE;
             p += up, i += 2) {
            model_set(&d->m, p, lduw_be_p(buf + i), 1);
        }
    }
    return VIRTIO_MEM_VMEMMAP_OK;
}

/* Change a valid state the way a corrupt or hostile source would. */
static size_t mutate_stream(Input *in, uint8_t *buf, size_t len)
{
    const unsigned kind = U8(in) % 7;
    const size_t k = len / 2 ? U16(in) % (len / 2) : 0;
    size_t i;

    switch (kind) {
    case 0:         /* exact */
        break;
    case 1:         /* one byte flipped */
        if (len) {
            buf[U16(in) % len] ^= 1 + U8(in) % 255;
        }
        break;
    case 2:         /* truncated, maybe to nothing or to an odd length */
        len = U16(in) % (len + 1);
        break;
    case 3:         /* grown by a count or a byte */
        if (len + 2 <= MAX_STREAM) {
            stw_be_p(buf + len, U16(in) % (UNIT / PAGE + 2));
            len += U8(in) & 1 ? 2 : 1;
        }
        break;
    case 4:         /* a count changed by a little */
        if (len) {
            stw_be_p(buf + 2 * k, lduw_be_p(buf + 2 * k) + (int8_t)U8(in));
        }
        break;
    case 5:         /* a count just past a unit */
        if (len) {
            stw_be_p(buf + 2 * k, UNIT / PAGE + U8(in) % 2);
        }
        break;
    default:        /* anything, of any length */
        len = U16(in) % MAX_STREAM;
        for (i = 0; i < len; i++) {
            buf[i] = U8(in);
        }
        break;
    }
    return len;
}

static void op_migrate(Input *in, Side *s, Side *d)
{
    static uint8_t want[MAX_STREAM];
    const size_t want_len = model_encode(s, want);
    uint64_t len = virtio_mem_vmemmap_encoded_size(&s->vm);
    VirtIOMEMVmemmapCheck expect, got;

    /* encode writes exactly the model's encoding */
    g_assert(len == want_len && len <= MAX_STREAM);
    memset(stream_buf, 0xa5, sizeof(stream_buf));
    virtio_mem_vmemmap_encode(&s->vm, stream_buf);
    g_assert(!memcmp(stream_buf, want, len));
    /* nothing past it */
    g_assert(len == MAX_STREAM || stream_buf[len] == 0xa5);

    len = mutate_stream(in, stream_buf, len);
    expect = model_decode(d, stream_buf, len);
    got = virtio_mem_vmemmap_decode(&d->vm, stream_buf, len);
    if (got != expect) {
        fprintf(stderr, "decode of %" PRIu64 " bytes: got '%s', model '%s'\n",
                len, virtio_mem_vmemmap_check_str(got),
                virtio_mem_vmemmap_check_str(expect));
        abort();
    }
    check_all(d);
}

static void op_copy_plugged(Input *in, Side *s, Side *d)
{
    /* The destination's blocks as migrated RAM leaves them (sometimes not). */
    uint64_t b;

    for (b = 0; b < d->m.nr_blocks; b++) {
        d->m.blk[b] = b < s->m.nr_blocks && s->m.blk[b];
    }
    if (U8(in) & 1 && d->m.nr_blocks) {
        d->m.blk[U8(in) % d->m.nr_blocks] ^= 1;
    }
    bitmap_zero(d->plugged, d->m.nr_blocks);
    for (b = 0; b < d->m.nr_blocks; b++) {
        if (d->m.blk[b]) {
            set_bit(b, d->plugged);
        }
    }
    /* blocks that were unplugged lose their marks, as on the device */
    for (b = 0; b < d->m.nr_blocks; b++) {
        if (!d->m.blk[b]) {
            g_assert(virtio_mem_vmemmap_unmark(&d->vm, b * block_size,
                                               block_size) ==
                     model_count(&d->m, b * block_size / PAGE,
                                 (b + 1) * block_size / PAGE) * PAGE);
            model_set(&d->m, b * block_size / PAGE, block_size / PAGE, 0);
        }
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const uint64_t blocks[] = {
        2 * MiB, 2 * MiB, 4 * MiB, 8 * MiB, 32 * MiB, 64 * MiB, 128 * MiB,
        256 * MiB,
    };
    Input in = { data, data + size };
    uint64_t region, dregion;
    unsigned g, flags;

    /* geometry: block size, region, base, usable part, destination */
    g = U8(&in);
    flags = U8(&in);
    block_size = blocks[g % 8];
    region = QEMU_ALIGN_UP((1 + (g >> 3) % 4) * 64 * MiB, block_size);
    switch ((g >> 5) % 4) {
    case 0:
        base = 4 * GiB;
        break;
    case 1:
        base = 0;
        break;
    case 2:
        base = 1 * TiB + block_size;
        break;
    default:    /* the top of the address space */
        base = QEMU_ALIGN_DOWN(UINT64_MAX - region, block_size);
        break;
    }
    usable = flags & 1 ? region : (1 + (flags >> 1) % 8) * block_size;
    dregion = flags & 0x20 ? MAX(block_size, region / 2 / block_size *
                                             block_size) : region;
    side_setup(&src_side, region, !(flags & 0x40));
    side_setup(&dst_side, dregion, !(flags & 0x80));

    while (in_more(&in)) {
        switch (U8(&in) % 16) {
        case 0 ... 1:
            op_plug(&in, &src_side, true);
            break;
        case 2:
            op_plug(&in, &src_side, false);
            break;
        case 3:
            op_unplug_all(&src_side);
            break;
        case 4 ... 7:
            op_report(&in, &src_side);
            break;
        case 8:
            op_unmark(&in, &src_side);
            break;
        case 9:
            virtio_mem_vmemmap_clear(&src_side.vm);
            model_set(&src_side.m, 0, src_side.m.nr_pages, 0);
            break;
        case 10:
            op_intersects(&in, &src_side);
            break;
        case 11:
            op_next_range(&in, &src_side);
            break;
        case 12:
            op_copy_plugged(&in, &src_side, &dst_side);
            check_invariants(&dst_side);
            break;
        case 13:
            op_migrate(&in, &src_side, &dst_side);
            break;
        case 14:        /* the source's own state back into it */
            op_migrate(&in, &src_side, &src_side);
            break;
        default:        /* the usable region moves with requested-size */
            /* (one block past the region: the code must clamp it) */
            usable = (1 + U8(&in) % (region / block_size + 1)) * block_size;
            break;
        }
        check_invariants(&src_side);
    }
    check_all(&src_side);
    check_all(&dst_side);
    return 0;
}
