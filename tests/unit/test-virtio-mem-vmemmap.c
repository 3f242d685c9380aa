/*
 * Unit tests for the virtio-mem vmemmap accounting
 *
 * Copyright (c) 2026 The virtio-mem-vmemmap authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qemu/bitmap.h"
#include "qemu/units.h"
#include "qemu/module.h"
#include "migration/vmstate.h"
#include "migration/qemu-file-types.h"
#include "../migration/qemu-file.h"
#include "io/channel-file.h"
#include "hw/virtio/virtio-mem-vmemmap.h"

#define BASE        (4 * GiB)
#define REGION      (1 * GiB)
#define BLOCK       (2 * MiB)
#define NR_BLOCKS   (REGION / BLOCK)

typedef struct Fixture {
    VirtIOMEMVmemmap vm;
    unsigned long *plugged;
} Fixture;

static void fixture_setup(Fixture *f, gconstpointer data)
{
    f->plugged = bitmap_new(NR_BLOCKS);
    virtio_mem_vmemmap_init(&f->vm);
    virtio_mem_vmemmap_set_geometry(&f->vm, REGION, BLOCK, f->plugged);
}

static void fixture_teardown(Fixture *f, gconstpointer data)
{
    virtio_mem_vmemmap_destroy(&f->vm);
    g_free(f->plugged);
}

static void plug(Fixture *f, uint64_t offset, uint64_t size)
{
    bitmap_set(f->plugged, offset / BLOCK, size / BLOCK);
}

/* Check and, if accepted, mark; like the device does. */
static VirtIOMEMVmemmapCheck report(Fixture *f, uint64_t offset, uint64_t size)
{
    VirtIOMEMVmemmapCheck c;

    c = virtio_mem_vmemmap_check(&f->vm, BASE, REGION, BASE + offset, size);
    if (c == VIRTIO_MEM_VMEMMAP_OK) {
        virtio_mem_vmemmap_mark(&f->vm, offset, size);
    }
    return c;
}

/*
 * The runs must be sorted, disjoint, non-adjacent, on plugged blocks and
 * sum to ->size; returns how many there are.
 */
static uint64_t assert_invariants(const VirtIOMEMVmemmap *vm)
{
    uint64_t offset = 0, prev_end = 0, start, size, sum = 0, n = 0;

    while (virtio_mem_vmemmap_next_range(vm, offset, &start, &size)) {
        g_assert_cmpuint(size, >, 0);
        g_assert(QEMU_IS_ALIGNED(start | size, 4 * KiB));
        if (n) {
            g_assert_cmpuint(prev_end, <, start);
        }
        g_assert(find_next_zero_bit(vm->plugged,
                                    (start + size - 1) / vm->block_size + 1,
                                    start / vm->block_size) >
                 (start + size - 1) / vm->block_size);
        prev_end = offset = start + size;
        sum += size;
        n++;
    }
    g_assert_cmpuint(sum, ==, vm->size);
    g_assert_cmpuint(n, ==, virtio_mem_vmemmap_nr_ranges(vm));
    return n;
}

static void test_sbm_blocks(Fixture *f, gconstpointer data)
{
    /* SBM: a 128 MiB Linux block's 2 MiB memmap is its first device block. */
    plug(f, 0, 256 * MiB);
    g_assert_cmpint(report(f, 0, 2 * MiB), ==, VIRTIO_MEM_VMEMMAP_OK);
    g_assert_cmpint(report(f, 128 * MiB, 2 * MiB), ==, VIRTIO_MEM_VMEMMAP_OK);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==, 4 * MiB);
    g_assert_cmpuint(assert_invariants(&f->vm), ==, 2);

    /* Unplugging the second Linux block drops its memmap only. */
    g_assert_cmpuint(virtio_mem_vmemmap_unmark(&f->vm, 128 * MiB, 128 * MiB),
                     ==, 2 * MiB);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==, 2 * MiB);
    assert_invariants(&f->vm);
}

/* Encode @vm, decode it into a copy on the same blocks, compare. */
static void assert_round_trip(const VirtIOMEMVmemmap *vm)
{
    const uint64_t len = virtio_mem_vmemmap_encoded_size(vm);
    g_autofree uint8_t *buf = g_malloc0(len + 1);
    VirtIOMEMVmemmap copy;
    uint64_t off = 0, start, size, start2, size2;

    virtio_mem_vmemmap_encode(vm, buf);
    virtio_mem_vmemmap_init(&copy);
    virtio_mem_vmemmap_set_geometry(&copy, vm->region_size, vm->block_size,
                                    vm->plugged);
    g_assert_cmpint(virtio_mem_vmemmap_decode(&copy, buf, len), ==,
                    VIRTIO_MEM_VMEMMAP_OK);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&copy), ==,
                     virtio_mem_vmemmap_size(vm));
    while (virtio_mem_vmemmap_next_range(vm, off, &start, &size)) {
        g_assert_true(virtio_mem_vmemmap_next_range(&copy, off, &start2,
                                                    &size2));
        g_assert_cmpuint(start, ==, start2);
        g_assert_cmpuint(size, ==, size2);
        off = start + size;
    }
    g_assert_false(virtio_mem_vmemmap_next_range(&copy, off, &start2,
                                                 &size2));
    virtio_mem_vmemmap_destroy(&copy);
}

static void test_bbm_ranges(Fixture *f, gconstpointer data)
{
    /* BBM: one device block spans memory blocks; memmaps inside it. */
    const uint64_t bbm_block = 256 * MiB;
    g_autofree unsigned long *plugged = bitmap_new(REGION / bbm_block);
    VirtIOMEMVmemmap vm;

    virtio_mem_vmemmap_init(&vm);
    virtio_mem_vmemmap_set_geometry(&vm, REGION, bbm_block, plugged);
    g_assert_cmpuint(virtio_mem_vmemmap_unit(&vm), ==, 2 * MiB);
    bitmap_set(plugged, 0, 1);
    g_assert_cmpint(virtio_mem_vmemmap_check(&vm, BASE, REGION, BASE,
                                             2 * MiB), ==,
                    VIRTIO_MEM_VMEMMAP_OK);
    virtio_mem_vmemmap_mark(&vm, 0, 2 * MiB);
    virtio_mem_vmemmap_mark(&vm, 128 * MiB, 2 * MiB);
    /* A partial unit is fine too, if it starts at 2 MiB. */
    virtio_mem_vmemmap_mark(&vm, 64 * MiB, 36 * KiB);
    g_assert_cmpint(virtio_mem_vmemmap_check(&vm, BASE, REGION,
                                             BASE + 65 * MiB, 4 * KiB), ==,
                    VIRTIO_MEM_VMEMMAP_UNALIGNED_START);
    g_assert_cmpuint(assert_invariants(&vm), ==, 3);
    /* One count per 2 MiB unit of the plugged block: 128 of them. */
    g_assert_cmpuint(virtio_mem_vmemmap_encoded_size(&vm), ==, 256);
    assert_round_trip(&vm);
    virtio_mem_vmemmap_destroy(&vm);
}

static void test_merge_and_split(Fixture *f, gconstpointer data)
{
    plug(f, 0, 8 * MiB);
    g_assert_cmpint(report(f, 0, 4 * KiB), ==, VIRTIO_MEM_VMEMMAP_OK);
    /* Marks start at 2 MiB: no holes inside a unit. */
    g_assert_cmpint(report(f, 8 * KiB, 4 * KiB), ==,
                    VIRTIO_MEM_VMEMMAP_UNALIGNED_START);
    g_assert_cmpint(report(f, 4 * KiB, 4 * KiB), ==,
                    VIRTIO_MEM_VMEMMAP_UNALIGNED_START);
    g_assert_cmpint(report(f, 2 * MiB, 2 * MiB), ==, VIRTIO_MEM_VMEMMAP_OK);
    g_assert_cmpint(report(f, 4 * MiB, 4 * KiB), ==, VIRTIO_MEM_VMEMMAP_OK);
    /* Adjacent marks merge into one run. */
    g_assert_cmpuint(assert_invariants(&f->vm), ==, 2);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==, 2 * MiB + 8 * KiB);
    assert_round_trip(&f->vm);
    /* Unplugging a block splits a run at the block boundary. */
    g_assert_cmpuint(virtio_mem_vmemmap_unmark(&f->vm, 2 * MiB, 2 * MiB), ==,
                     2 * MiB);
    g_assert_cmpuint(assert_invariants(&f->vm), ==, 2);
    assert_round_trip(&f->vm);
    g_assert_cmpuint(virtio_mem_vmemmap_unmark(&f->vm, 0, 8 * MiB), ==,
                     8 * KiB);
    g_assert_cmpuint(assert_invariants(&f->vm), ==, 0);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==, 0);
}

static void test_bad_requests(Fixture *f, gconstpointer data)
{
    plug(f, 0, 4 * MiB);
    g_assert_cmpint(report(f, 0, 2 * MiB), ==, VIRTIO_MEM_VMEMMAP_OK);

    g_assert_cmpint(report(f, 2 * MiB, 0), ==, VIRTIO_MEM_VMEMMAP_EMPTY);
    g_assert_cmpint(report(f, 2 * MiB + 512, 4 * KiB), ==,
                    VIRTIO_MEM_VMEMMAP_UNALIGNED);
    g_assert_cmpint(report(f, 2 * MiB, 100), ==, VIRTIO_MEM_VMEMMAP_UNALIGNED);
    g_assert_cmpint(report(f, 2 * MiB + 4 * KiB, 4 * KiB), ==,
                    VIRTIO_MEM_VMEMMAP_UNALIGNED_START);
    g_assert_cmpint(report(f, 1 * MiB, 2 * MiB), ==,
                    VIRTIO_MEM_VMEMMAP_UNALIGNED_START);
    g_assert_cmpint(virtio_mem_vmemmap_check(&f->vm, BASE, REGION,
                                             UINT64_MAX - 2 * MiB + 1,
                                             4 * MiB),
                    ==, VIRTIO_MEM_VMEMMAP_OVERFLOW);
    g_assert_cmpint(virtio_mem_vmemmap_check(&f->vm, BASE, REGION,
                                             BASE - 2 * MiB, 4 * MiB),
                    ==, VIRTIO_MEM_VMEMMAP_OUTSIDE);
    g_assert_cmpint(report(f, REGION - 2 * MiB, 4 * MiB), ==,
                    VIRTIO_MEM_VMEMMAP_OUTSIDE);
    g_assert_cmpint(report(f, REGION, 4 * KiB), ==,
                    VIRTIO_MEM_VMEMMAP_OUTSIDE);
    /* Half plugged, half not. */
    g_assert_cmpint(report(f, 2 * MiB, 4 * MiB), ==,
                    VIRTIO_MEM_VMEMMAP_UNPLUGGED);
    g_assert_cmpint(report(f, 8 * MiB, 4 * KiB), ==,
                    VIRTIO_MEM_VMEMMAP_UNPLUGGED);
    g_assert_cmpint(report(f, 0, 4 * MiB), ==, VIRTIO_MEM_VMEMMAP_OVERLAP);
    g_assert_cmpint(report(f, 0, 2 * MiB), ==, VIRTIO_MEM_VMEMMAP_OVERLAP);

    /* Nothing of the refused requests stuck. */
    g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==, 2 * MiB);
    g_assert_cmpuint(assert_invariants(&f->vm), ==, 1);
    g_assert_cmpstr(virtio_mem_vmemmap_check_str(VIRTIO_MEM_VMEMMAP_UNPLUGGED),
                    ==, "not plugged");
}

static void test_usable_region(Fixture *f, gconstpointer data)
{
    /* Only the usable part of the region counts. */
    plug(f, 0, REGION);
    g_assert_cmpint(virtio_mem_vmemmap_check(&f->vm, BASE, 64 * MiB,
                                             BASE + 64 * MiB, 4 * KiB),
                    ==, VIRTIO_MEM_VMEMMAP_OUTSIDE);
    g_assert_cmpint(virtio_mem_vmemmap_check(&f->vm, BASE, 64 * MiB,
                                             BASE + 62 * MiB,
                                             2 * MiB + 4 * KiB),
                    ==, VIRTIO_MEM_VMEMMAP_OUTSIDE);
    g_assert_cmpint(virtio_mem_vmemmap_check(&f->vm, BASE, 64 * MiB,
                                             BASE + 62 * MiB, 2 * MiB),
                    ==, VIRTIO_MEM_VMEMMAP_OK);
}

static void test_clear(Fixture *f, gconstpointer data)
{
    int i;

    plug(f, 0, REGION);
    for (i = 0; i < 16; i++) {
        g_assert_cmpint(report(f, i * 64 * MiB, 1 * MiB), ==,
                        VIRTIO_MEM_VMEMMAP_OK);
    }
    g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==, 16 * MiB);
    virtio_mem_vmemmap_clear(&f->vm);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==, 0);
    g_assert_cmpuint(assert_invariants(&f->vm), ==, 0);
    g_assert_cmpint(report(f, 0, 1 * MiB), ==, VIRTIO_MEM_VMEMMAP_OK);
}

/*
 * Random marks (at unit starts, up to three units long) and unplugs of
 * whole blocks against a page-granular shadow; the encoding must carry
 * every state exactly.
 */
static void test_random(Fixture *f, gconstpointer data)
{
    const uint64_t pages = 64 * MiB / (4 * KiB);
    const uint64_t unit_pages = 2 * MiB / (4 * KiB);
    g_autofree bool *shadow = g_new0(bool, pages);
    GRand *rand = g_rand_new_with_seed(42);
    int round;

    plug(f, 0, 64 * MiB);
    for (round = 0; round < 4000; round++) {
        uint64_t first = g_rand_int_range(rand, 0, pages / unit_pages) *
                         unit_pages;
        uint64_t nr = g_rand_int_range(rand, 1, 3 * unit_pages + 1);
        uint64_t i, expect = 0, sum = 0;

        nr = MIN(nr, pages - first);
        if (g_rand_int_range(rand, 0, 4)) {
            bool overlap = false;

            for (i = first; i < first + nr; i++) {
                overlap |= shadow[i];
            }
            g_assert_cmpint(report(f, first * 4 * KiB, nr * 4 * KiB), ==,
                            overlap ? VIRTIO_MEM_VMEMMAP_OVERLAP :
                            VIRTIO_MEM_VMEMMAP_OK);
            for (i = first; !overlap && i < first + nr; i++) {
                shadow[i] = true;
            }
        } else {
            /* As an unplug of the block does. */
            first = QEMU_ALIGN_DOWN(first, BLOCK / (4 * KiB));
            nr = BLOCK / (4 * KiB);
            for (i = first; i < first + nr; i++) {
                expect += shadow[i] ? 4 * KiB : 0;
                shadow[i] = false;
            }
            g_assert_cmpuint(virtio_mem_vmemmap_unmark(&f->vm, first * 4 * KiB,
                                                       nr * 4 * KiB),
                             ==, expect);
        }
        for (i = 0; i < pages; i++) {
            sum += shadow[i] ? 4 * KiB : 0;
        }
        g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==, sum);
        assert_invariants(&f->vm);
        if (!(round % 100)) {
            assert_round_trip(&f->vm);
        }
    }
    g_rand_free(rand);
}

/*
 * Write a stream with @write(@opaque) into a file, end it as the section
 * that holds the state would, and load it into @dst; returns the load
 * result.
 */
static int load_written(void (*write)(QEMUFile *f, const void *opaque),
                        const void *opaque, VirtIOMEMVmemmap *dst)
{
    g_autofree char *path = NULL;
    QIOChannelFile *ioc;
    QEMUFile *f;
    int fd, ret;

    fd = g_file_open_tmp("vmemmap-XXXXXX", &path, NULL);
    g_assert(fd >= 0);
    ioc = qio_channel_file_new_fd(dup(fd));
    f = qemu_file_new_output(QIO_CHANNEL(ioc));
    object_unref(OBJECT(ioc));
    write(f, opaque);
    qemu_put_byte(f, 0);
    qemu_fclose(f);

    lseek(fd, 0, SEEK_SET);
    ioc = qio_channel_file_new_fd(fd);
    f = qemu_file_new_input(QIO_CHANNEL(ioc));
    object_unref(OBJECT(ioc));
    ret = vmstate_load_state(f, &vmstate_virtio_mem_vmemmap, dst, 1);
    qemu_fclose(f);
    unlink(path);
    return ret;
}

static void write_state(QEMUFile *f, const void *opaque)
{
    g_assert_cmpint(vmstate_save_state(f, &vmstate_virtio_mem_vmemmap,
                                       (void *)opaque, NULL), ==, 0);
}

/* Save @src and load it into @dst; returns the load result. */
static int migrate(VirtIOMEMVmemmap *src, VirtIOMEMVmemmap *dst)
{
    return load_written(write_state, src, dst);
}

static void test_migration(Fixture *f, gconstpointer data)
{
    g_autofree unsigned long *dst_plugged = bitmap_new(NR_BLOCKS);
    VirtIOMEMVmemmap dst;

    plug(f, 0, 256 * MiB);
    g_assert_cmpint(report(f, 0, 2 * MiB), ==, VIRTIO_MEM_VMEMMAP_OK);
    g_assert_cmpint(report(f, 128 * MiB, 2 * MiB), ==, VIRTIO_MEM_VMEMMAP_OK);

    /* Destination with the same plugged blocks: state arrives intact. */
    virtio_mem_vmemmap_init(&dst);
    virtio_mem_vmemmap_set_geometry(&dst, REGION, BLOCK, dst_plugged);
    bitmap_set(dst_plugged, 0, 256 * MiB / BLOCK);
    g_assert_cmpint(migrate(&f->vm, &dst), ==, 0);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&dst), ==, 4 * MiB);
    g_assert_cmpuint(assert_invariants(&dst), ==, 2);

    /* A stream claiming vmemmap on unplugged memory fails the load. */
    bitmap_clear(dst_plugged, 128 * MiB / BLOCK, 1);
    g_assert_cmpint(migrate(&f->vm, &dst), ==, -EINVAL);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&dst), ==, 4 * MiB);

    /* ... and so does one outside the region. */
    virtio_mem_vmemmap_set_geometry(&dst, 64 * MiB, BLOCK, dst_plugged);
    g_assert_cmpint(migrate(&f->vm, &dst), !=, 0);
    virtio_mem_vmemmap_destroy(&dst);
}

typedef struct RawStream {
    uint32_t len;
    const uint16_t *counts;
    int nr_counts;
} RawStream;

static void write_raw(QEMUFile *f, const void *opaque)
{
    const RawStream *raw = opaque;
    int i;

    qemu_put_be32(f, raw->len);
    for (i = 0; i < raw->nr_counts; i++) {
        qemu_put_be16(f, raw->counts[i]);
    }
}

/* Load a hand-made stream: length @len, then @nr_counts 16-bit counts. */
static int load_raw(Fixture *f, uint32_t len, const uint16_t *counts,
                    int nr_counts)
{
    const RawStream raw = { .len = len, .counts = counts,
                            .nr_counts = nr_counts };

    return load_written(write_raw, &raw, &f->vm);
}

/* The destination accepts only what a sequence of requests could make. */
static void test_migration_untrusted(Fixture *f, gconstpointer data)
{
    /* Two plugged blocks: two units of 2 MiB. */
    const uint16_t good[] = { 512, 3 };
    const uint16_t too_many[] = { 513, 0 };
    const uint16_t three[] = { 1, 1, 1 };

    plug(f, 0, 4 * MiB);
    g_assert_cmpint(load_raw(f, 4, good, 2), ==, 0);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==, 2 * MiB + 12 * KiB);
    g_assert_cmpuint(assert_invariants(&f->vm), ==, 1);

    /* More pages than a unit holds. */
    g_assert_cmpint(load_raw(f, 4, too_many, 2), ==, -EINVAL);
    /* A length that does not match the plugged blocks ... */
    g_assert_cmpint(load_raw(f, 2, good, 1), ==, -EINVAL);
    g_assert_cmpint(load_raw(f, 6, three, 3), ==, -EINVAL);
    /* ... and one no region can hold, refused before it is read. */
    g_assert_cmpint(load_raw(f, 3, good, 2), !=, 0);
    g_assert_cmpint(load_raw(f, 2 * (REGION / (2 * MiB)) + 2, good, 2), !=,
                    0);
    g_assert_cmpint(load_raw(f, UINT32_MAX - 1, good, 2), !=, 0);
    /* A length larger than what follows ends in a stream error. */
    bitmap_set(f->plugged, 0, 3);
    g_assert_cmpint(load_raw(f, 6, good, 2), !=, 0);
    /* None of the refused streams changed anything. */
    g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==, 2 * MiB + 12 * KiB);

    /* Nothing marked is an empty state, whatever is plugged. */
    g_assert_cmpint(load_raw(f, 0, NULL, 0), ==, 0);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==, 0);
    g_assert_cmpuint(assert_invariants(&f->vm), ==, 0);
}

/* Without accounting, nothing can be marked and no state is accepted. */
static void test_disabled(Fixture *f, gconstpointer data)
{
    const uint16_t good[] = { 1 };

    virtio_mem_vmemmap_destroy(&f->vm);
    plug(f, 0, 2 * MiB);
    g_assert_false(virtio_mem_vmemmap_enabled(&f->vm));
    g_assert_cmpint(report(f, 0, 4 * KiB), ==, VIRTIO_MEM_VMEMMAP_DISABLED);
    g_assert_cmpuint(virtio_mem_vmemmap_unmark(&f->vm, 0, REGION), ==, 0);
    virtio_mem_vmemmap_clear(&f->vm);
    g_assert_cmpint(load_raw(f, 2, good, 1), !=, 0);
    g_assert_cmpint(load_raw(f, 0, NULL, 0), !=, 0);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==, 0);
}

/*
 * The most fragmented state a guest can try: every other page marked, in
 * descending order.  Only marks at 2 MiB starts are taken, and the state
 * migration sends is 2 bytes per 2 MiB plugged, whatever the pattern:
 * well inside 8 MiB per TiB of region.
 */
static void test_worst_pattern(Fixture *f, gconstpointer data)
{
    const uint64_t span = 64 * MiB;
    uint64_t off, len;

    plug(f, 0, span);
    for (off = span - 8 * KiB; ; off -= 8 * KiB) {
        g_assert_cmpint(report(f, off, 4 * KiB), ==,
                        QEMU_IS_ALIGNED(off, 2 * MiB) ?
                        VIRTIO_MEM_VMEMMAP_OK :
                        VIRTIO_MEM_VMEMMAP_UNALIGNED_START);
        if (!off) {
            break;
        }
    }
    g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==,
                     span / (2 * MiB) * 4 * KiB);
    g_assert_cmpuint(assert_invariants(&f->vm), ==, span / (2 * MiB));
    len = virtio_mem_vmemmap_encoded_size(&f->vm);
    g_assert_cmpuint(len, ==, 2 * span / (2 * MiB));
    /* Even with the whole region plugged: at most 8 MiB per TiB. */
    plug(f, 0, REGION);
    len = virtio_mem_vmemmap_encoded_size(&f->vm);
    g_assert_cmpuint(len * (TiB / REGION), <=, 8 * MiB);
    g_assert_cmpuint(len, ==, 2 * REGION / (2 * MiB));
    assert_round_trip(&f->vm);
    /* One unplug drops all of it in one pass. */
    g_assert_cmpuint(virtio_mem_vmemmap_unmark(&f->vm, 0, span), ==,
                     span / (2 * MiB) * 4 * KiB);
    g_assert_cmpuint(assert_invariants(&f->vm), ==, 0);
    g_assert_cmpuint(virtio_mem_vmemmap_encoded_size(&f->vm), ==, 0);
}

/*
 * A clear gives back what the marks made resident, and keeps the bitmap
 * of a large region non-resident however often it happens.
 */
static void test_clear_resident(Fixture *f, gconstpointer data)
{
    const uint64_t region = 64 * GiB;
    g_autofree unsigned long *plugged = bitmap_new(region / BLOCK);
    const size_t bytes = region / (4 * KiB) / 8;
    const long page = qemu_real_host_page_size();
    g_autofree unsigned char *vec = g_malloc(bytes / page);
    VirtIOMEMVmemmap vm;
    size_t i, resident;
    int round;

    virtio_mem_vmemmap_init(&vm);
    virtio_mem_vmemmap_set_geometry(&vm, region, BLOCK, plugged);
    bitmap_set(plugged, 0, region / BLOCK);
    for (round = 0; round < 3; round++) {
        virtio_mem_vmemmap_mark(&vm, 0, region);
        virtio_mem_vmemmap_clear(&vm);
        g_assert_cmpint(mincore(vm.bitmap, bytes, vec), ==, 0);
        for (i = 0, resident = 0; i < bytes / page; i++) {
            resident += vec[i] & 1;
        }
        g_assert_cmpuint(resident, ==, 0);
    }
    virtio_mem_vmemmap_destroy(&vm);
}

/*
 * An unplug gives back the bitmap pages that its marks made resident: a
 * driver marks the first 2 MiB of each 128 MiB memory block it plugs
 * (Linux, memmap_on_memory), one bitmap page per block with 4 KiB host
 * pages; after unplugging every block none is left, and a page that still
 * holds a mark stays.
 */
static size_t resident_pages(const VirtIOMEMVmemmap *vm, size_t bytes)
{
    const long page = qemu_real_host_page_size();
    g_autofree unsigned char *vec = g_malloc(bytes / page);
    size_t i, resident = 0;

    g_assert_cmpint(mincore(vm->bitmap, bytes, vec), ==, 0);
    for (i = 0; i < bytes / page; i++) {
        resident += vec[i] & 1;
    }
    return resident;
}

static void test_unmark_resident(Fixture *f, gconstpointer data)
{
    const uint64_t region = 8 * GiB, mb = 128 * MiB, grow = 4 * GiB;
    g_autofree unsigned long *plugged = bitmap_new(region / BLOCK);
    const size_t bytes = region / (4 * KiB) / 8;
    /* The region one bitmap page covers: 128 MiB with 4 KiB host pages. */
    const uint64_t cover = qemu_real_host_page_size() * 8 * 4 * KiB;
    VirtIOMEMVmemmap vm;
    uint64_t off;

    virtio_mem_vmemmap_init(&vm);
    virtio_mem_vmemmap_set_geometry(&vm, region, BLOCK, plugged);
    bitmap_set(plugged, 0, grow / BLOCK);
    for (off = 0; off < grow; off += mb) {
        virtio_mem_vmemmap_mark(&vm, off, 2 * MiB);
    }
    g_assert_cmpuint(resident_pages(&vm, bytes), ==,
                     DIV_ROUND_UP(grow, MAX(cover, mb)));

    /* The last block first, as Linux unplugs; the first one stays. */
    for (off = grow - mb; off > 0; off -= mb) {
        g_assert_cmpuint(virtio_mem_vmemmap_unmark(&vm, off, mb), ==,
                         2 * MiB);
    }
    g_assert_cmpuint(resident_pages(&vm, bytes), ==, 1);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&vm), ==, 2 * MiB);
    g_assert_true(test_bit(0, vm.bitmap));

    /* Part of a block: the page keeps its remaining marks. */
    g_assert_cmpuint(virtio_mem_vmemmap_unmark(&vm, 0, 1 * MiB), ==, 1 * MiB);
    g_assert_cmpuint(resident_pages(&vm, bytes), ==, 1);
    g_assert_true(test_bit(1 * MiB / (4 * KiB), vm.bitmap));
    g_assert_cmpuint(virtio_mem_vmemmap_unmark(&vm, 0, mb), ==, 1 * MiB);
    g_assert_cmpuint(resident_pages(&vm, bytes), ==, 0);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&vm), ==, 0);
    virtio_mem_vmemmap_destroy(&vm);
}

int main(int argc, char **argv)
{
    module_call_init(MODULE_INIT_QOM);
    g_test_init(&argc, &argv, NULL);

#define ADD(name, fn) \
    g_test_add("/virtio-mem-vmemmap/" name, Fixture, NULL, fixture_setup, \
               fn, fixture_teardown)
    ADD("sbm-blocks", test_sbm_blocks);
    ADD("bbm-ranges", test_bbm_ranges);
    ADD("merge-and-split", test_merge_and_split);
    ADD("bad-requests", test_bad_requests);
    ADD("usable-region", test_usable_region);
    ADD("clear", test_clear);
    ADD("random", test_random);
    ADD("migration", test_migration);
    ADD("migration-untrusted", test_migration_untrusted);
    ADD("disabled", test_disabled);
    ADD("worst-pattern", test_worst_pattern);
    ADD("clear-resident", test_clear_resident);
    ADD("unmark-resident", test_unmark_resident);
#undef ADD
    return g_test_run();
}
