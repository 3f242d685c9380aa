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
        g_assert(find_next_zero_bit(vm->plugged, (start + size - 1) / BLOCK + 1,
                                    start / BLOCK) >
                 (start + size - 1) / BLOCK);
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

static void test_bbm_ranges(Fixture *f, gconstpointer data)
{
    /* BBM: one device block spans memory blocks; memmaps inside it. */
    plug(f, 0, BLOCK);
    g_assert_cmpint(report(f, 0, 32 * KiB), ==, VIRTIO_MEM_VMEMMAP_OK);
    g_assert_cmpint(report(f, 1 * MiB, 32 * KiB), ==, VIRTIO_MEM_VMEMMAP_OK);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==, 64 * KiB);
    assert_invariants(&f->vm);
}

static void test_merge_and_split(Fixture *f, gconstpointer data)
{
    plug(f, 0, 8 * MiB);
    g_assert_cmpint(report(f, 0, 4 * KiB), ==, VIRTIO_MEM_VMEMMAP_OK);
    g_assert_cmpint(report(f, 8 * KiB, 4 * KiB), ==, VIRTIO_MEM_VMEMMAP_OK);
    g_assert_cmpuint(assert_invariants(&f->vm), ==, 2);
    /* Filling the hole merges all three. */
    g_assert_cmpint(report(f, 4 * KiB, 4 * KiB), ==, VIRTIO_MEM_VMEMMAP_OK);
    g_assert_cmpuint(assert_invariants(&f->vm), ==, 1);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==, 12 * KiB);
    /* Unmarking the middle splits it again. */
    g_assert_cmpuint(virtio_mem_vmemmap_unmark(&f->vm, 4 * KiB, 4 * KiB), ==,
                     4 * KiB);
    g_assert_cmpuint(assert_invariants(&f->vm), ==, 2);
    /* Unmark across both, partially covering nothing else. */
    g_assert_cmpuint(virtio_mem_vmemmap_unmark(&f->vm, 0, 1 * MiB), ==,
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
    g_assert_cmpint(virtio_mem_vmemmap_check(&f->vm, BASE, REGION,
                                             UINT64_MAX - 4095, 8 * KiB),
                    ==, VIRTIO_MEM_VMEMMAP_OVERFLOW);
    g_assert_cmpint(virtio_mem_vmemmap_check(&f->vm, BASE, REGION,
                                             BASE - 4 * KiB, 8 * KiB),
                    ==, VIRTIO_MEM_VMEMMAP_OUTSIDE);
    g_assert_cmpint(report(f, REGION - 4 * KiB, 8 * KiB), ==,
                    VIRTIO_MEM_VMEMMAP_OUTSIDE);
    g_assert_cmpint(report(f, REGION, 4 * KiB), ==,
                    VIRTIO_MEM_VMEMMAP_OUTSIDE);
    /* Half plugged, half not. */
    g_assert_cmpint(report(f, 3 * MiB, 2 * MiB), ==,
                    VIRTIO_MEM_VMEMMAP_UNPLUGGED);
    g_assert_cmpint(report(f, 8 * MiB, 4 * KiB), ==,
                    VIRTIO_MEM_VMEMMAP_UNPLUGGED);
    g_assert_cmpint(report(f, 1 * MiB, 2 * MiB), ==,
                    VIRTIO_MEM_VMEMMAP_OVERLAP);
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
                                             BASE + 64 * MiB - 4 * KiB,
                                             4 * KiB),
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

/* Random marks and unmarks against a page-granular shadow. */
static void test_random(Fixture *f, gconstpointer data)
{
    const uint64_t pages = 64 * MiB / (4 * KiB);
    g_autofree bool *shadow = g_new0(bool, pages);
    GRand *rand = g_rand_new_with_seed(42);
    int round;

    plug(f, 0, 64 * MiB);
    for (round = 0; round < 4000; round++) {
        const uint64_t first = g_rand_int_range(rand, 0, pages);
        const uint64_t nr = g_rand_int_range(rand, 1, MIN(pages - first, 64) + 1);
        uint64_t i, expect = 0, sum = 0;

        if (g_rand_boolean(rand)) {
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
    g_assert_cmpuint(virtio_mem_vmemmap_size(&dst), ==, 0);

    /* ... and so does one outside the region. */
    virtio_mem_vmemmap_set_geometry(&dst, 64 * MiB, BLOCK, dst_plugged);
    g_assert_cmpint(migrate(&f->vm, &dst), !=, 0);
    virtio_mem_vmemmap_destroy(&dst);
}

typedef struct RawStream {
    int32_t nr;
    const uint64_t *pairs;
    int nr_pairs;
} RawStream;

static void write_raw(QEMUFile *f, const void *opaque)
{
    const RawStream *raw = opaque;
    int i;

    qemu_put_be32(f, raw->nr);
    for (i = 0; i < raw->nr_pairs * 2; i++) {
        qemu_put_be64(f, raw->pairs[i]);
    }
}

/* Load a hand-made stream of @nr (start, size) pairs into @f's state. */
static int load_raw(Fixture *f, int32_t nr, const uint64_t *pairs,
                    int nr_pairs)
{
    const RawStream raw = { .nr = nr, .pairs = pairs, .nr_pairs = nr_pairs };

    return load_written(write_raw, &raw, &f->vm);
}

/* The destination accepts only what a sequence of requests could make. */
static void test_migration_untrusted(Fixture *f, gconstpointer data)
{
    const uint64_t good[] = { 0, 8 * KiB, 16 * KiB, 4 * KiB };
    const uint64_t unsorted[] = { 16 * KiB, 4 * KiB, 0, 8 * KiB };
    const uint64_t adjacent[] = { 0, 8 * KiB, 8 * KiB, 4 * KiB };
    const uint64_t overlapping[] = { 0, 8 * KiB, 4 * KiB, 8 * KiB };

    plug(f, 0, 4 * MiB);
    g_assert_cmpint(load_raw(f, 2, good, 2), ==, 0);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==, 12 * KiB);
    g_assert_cmpuint(assert_invariants(&f->vm), ==, 2);

    g_assert_cmpint(load_raw(f, 2, unsorted, 2), ==, -EINVAL);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==, 0);
    g_assert_cmpint(load_raw(f, 2, adjacent, 2), ==, -EINVAL);
    g_assert_cmpint(load_raw(f, 2, overlapping, 2), ==, -EINVAL);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==, 0);

    /* A count no region can hold is refused before anything is read. */
    g_assert_cmpint(load_raw(f, REGION / (8 * KiB) + 1, good, 2), ==,
                    -EINVAL);
    g_assert_cmpint(load_raw(f, -1, good, 2), ==, -EINVAL);
    /* A count larger than what follows ends in a stream error. */
    g_assert_cmpint(load_raw(f, 3, good, 2), !=, 0);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==, 0);
    g_assert_cmpuint(assert_invariants(&f->vm), ==, 0);
}

/* Without accounting, nothing can be marked and no state is accepted. */
static void test_disabled(Fixture *f, gconstpointer data)
{
    const uint64_t good[] = { 0, 8 * KiB };

    virtio_mem_vmemmap_destroy(&f->vm);
    plug(f, 0, 4 * MiB);
    g_assert_false(virtio_mem_vmemmap_enabled(&f->vm));
    g_assert_cmpint(report(f, 0, 4 * KiB), ==, VIRTIO_MEM_VMEMMAP_DISABLED);
    g_assert_cmpuint(virtio_mem_vmemmap_unmark(&f->vm, 0, REGION), ==, 0);
    virtio_mem_vmemmap_clear(&f->vm);
    g_assert_cmpint(load_raw(f, 1, good, 1), ==, -EINVAL);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==, 0);
    /* The worst case a region can hold is one run per two pages. */
    virtio_mem_vmemmap_set_geometry(&f->vm, REGION, BLOCK, f->plugged);
    g_assert_cmpuint(virtio_mem_vmemmap_max_ranges(&f->vm), ==,
                     REGION / (8 * KiB));
}

/*
 * The most fragmented state a guest can make: every other page marked,
 * in descending order.  The state is the bitmap, whatever the pattern.
 */
static void test_worst_pattern(Fixture *f, gconstpointer data)
{
    const uint64_t span = 64 * MiB;
    uint64_t off;

    plug(f, 0, span);
    for (off = span - 8 * KiB; ; off -= 8 * KiB) {
        g_assert_cmpint(report(f, off, 4 * KiB), ==, VIRTIO_MEM_VMEMMAP_OK);
        if (!off) {
            break;
        }
    }
    g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==, span / 2);
    g_assert_cmpuint(assert_invariants(&f->vm), ==, span / (8 * KiB));
    /* One unplug drops all of it in one pass. */
    g_assert_cmpuint(virtio_mem_vmemmap_unmark(&f->vm, 0, span), ==, span / 2);
    g_assert_cmpuint(assert_invariants(&f->vm), ==, 0);
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
#undef ADD
    return g_test_run();
}
