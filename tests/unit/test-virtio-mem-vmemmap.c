/*
 * Unit tests for the virtio-mem vmemmap range accounting
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

/* The ranges must be sorted, disjoint, non-adjacent and sum to ->size. */
static void assert_invariants(const VirtIOMEMVmemmap *vm)
{
    const VirtIOMEMVmemmapRange *r = (void *)vm->ranges->data;
    uint64_t sum = 0;
    guint i;

    for (i = 0; i < vm->ranges->len; i++) {
        g_assert_cmpuint(r[i].size, >, 0);
        if (i) {
            g_assert_cmpuint(r[i - 1].start + r[i - 1].size, <, r[i].start);
        }
        sum += r[i].size;
    }
    g_assert_cmpuint(sum, ==, vm->size);
}

static void test_sbm_blocks(Fixture *f, gconstpointer data)
{
    /* SBM: a 128 MiB Linux block's 2 MiB memmap is its first device block. */
    plug(f, 0, 256 * MiB);
    g_assert_cmpint(report(f, 0, 2 * MiB), ==, VIRTIO_MEM_VMEMMAP_OK);
    g_assert_cmpint(report(f, 128 * MiB, 2 * MiB), ==, VIRTIO_MEM_VMEMMAP_OK);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==, 4 * MiB);
    g_assert_cmpuint(f->vm.ranges->len, ==, 2);
    assert_invariants(&f->vm);

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
    g_assert_cmpuint(f->vm.ranges->len, ==, 2);
    /* Filling the hole merges all three. */
    g_assert_cmpint(report(f, 4 * KiB, 4 * KiB), ==, VIRTIO_MEM_VMEMMAP_OK);
    g_assert_cmpuint(f->vm.ranges->len, ==, 1);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&f->vm), ==, 12 * KiB);
    /* Unmarking the middle splits it again. */
    g_assert_cmpuint(virtio_mem_vmemmap_unmark(&f->vm, 4 * KiB, 4 * KiB), ==,
                     4 * KiB);
    g_assert_cmpuint(f->vm.ranges->len, ==, 2);
    assert_invariants(&f->vm);
    /* Unmark across both, partially covering nothing else. */
    g_assert_cmpuint(virtio_mem_vmemmap_unmark(&f->vm, 0, 1 * MiB), ==,
                     8 * KiB);
    g_assert_cmpuint(f->vm.ranges->len, ==, 0);
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
    g_assert_cmpuint(f->vm.ranges->len, ==, 1);
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
    g_assert_cmpuint(f->vm.ranges->len, ==, 0);
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

/* Save @src into a buffer and load it into @dst; returns the load result. */
static int migrate(VirtIOMEMVmemmap *src, VirtIOMEMVmemmap *dst)
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
    g_assert_cmpint(vmstate_save_state(f, &vmstate_virtio_mem_vmemmap, src,
                                       NULL), ==, 0);
    /* End of stream, as the section that holds the state would have. */
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
    g_assert_cmpuint(dst.ranges->len, ==, 2);
    assert_invariants(&dst);

    /* A stream claiming vmemmap on unplugged memory fails the load. */
    bitmap_clear(dst_plugged, 128 * MiB / BLOCK, 1);
    g_assert_cmpint(migrate(&f->vm, &dst), ==, -EINVAL);
    g_assert_cmpuint(virtio_mem_vmemmap_size(&dst), ==, 0);

    /* ... and so does one outside the region. */
    virtio_mem_vmemmap_set_geometry(&dst, 64 * MiB, BLOCK, dst_plugged);
    g_assert_cmpint(migrate(&f->vm, &dst), !=, 0);
    virtio_mem_vmemmap_destroy(&dst);
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
#undef ADD
    return g_test_run();
}
