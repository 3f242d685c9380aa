/*
 * virtio-mem: migration of the vmemmap accounting
 *
 * On the wire: a 32-bit count, then that many (start, size) pairs of
 * 64-bit offsets into the device's region, the maximal runs of marked
 * memory in ascending order.  Both sides stream them straight from and
 * into the bitmap; the destination takes each run only if a request for
 * it would have been accepted and it starts after the previous one, so a
 * stream can neither allocate memory nor leave a state the device could
 * not have reached.
 *
 * Copyright (c) 2026 The virtio-mem-vmemmap authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qemu/error-report.h"
#include "migration/qemu-file-types.h"
#include "hw/virtio/virtio-mem-vmemmap.h"

static int virtio_mem_vmemmap_put(QEMUFile *f, void *pv, size_t size,
                                  const VMStateField *field,
                                  JSONWriter *vmdesc)
{
    const VirtIOMEMVmemmap *vm = pv;
    const uint64_t nr = virtio_mem_vmemmap_nr_ranges(vm);
    uint64_t offset = 0, start, len;

    if (nr > INT32_MAX) {
        error_report("virtio-mem: %" PRIu64 " vmemmap ranges do not fit the"
                     " migration stream", nr);
        return -EINVAL;
    }
    qemu_put_be32(f, nr);
    while (virtio_mem_vmemmap_next_range(vm, offset, &start, &len)) {
        qemu_put_be64(f, start);
        qemu_put_be64(f, len);
        offset = start + len;
    }
    return 0;
}

static int virtio_mem_vmemmap_get(QEMUFile *f, void *pv, size_t size,
                                  const VMStateField *field)
{
    VirtIOMEMVmemmap *vm = pv;
    const int32_t nr = qemu_get_be32(f);
    uint64_t cursor = 0;
    int32_t i;

    if (!virtio_mem_vmemmap_enabled(vm)) {
        error_report("virtio-mem: the source's guest uses vmemmap accounting,"
                     " but this device has vmemmap-accounting=off; start the"
                     " destination with vmemmap-accounting=on");
        return -EINVAL;
    }
    if (nr < 0 || nr > virtio_mem_vmemmap_max_ranges(vm)) {
        error_report("virtio-mem: incoming vmemmap state claims %" PRId32
                     " ranges in a region of 0x%" PRIx64 " bytes", nr,
                     vm->region_size);
        return -EINVAL;
    }

    virtio_mem_vmemmap_clear(vm);
    for (i = 0; i < nr; i++) {
        const uint64_t start = qemu_get_be64(f);
        const uint64_t len = qemu_get_be64(f);
        VirtIOMEMVmemmapCheck check;
        int ret = qemu_file_get_error(f);

        if (ret) {
            virtio_mem_vmemmap_clear(vm);
            return ret;
        }
        check = virtio_mem_vmemmap_load_range(vm, &cursor, start, len);
        if (check != VIRTIO_MEM_VMEMMAP_OK) {
            error_report("virtio-mem: incoming vmemmap range 0x%" PRIx64
                         "+0x%" PRIx64 ": %s", start, len,
                         virtio_mem_vmemmap_check_str(check));
            virtio_mem_vmemmap_clear(vm);
            return -EINVAL;
        }
    }
    return 0;
}

static const VMStateInfo vmstate_info_virtio_mem_vmemmap = {
    .name = "virtio-mem-vmemmap-ranges",
    .get = virtio_mem_vmemmap_get,
    .put = virtio_mem_vmemmap_put,
};

const VMStateDescription vmstate_virtio_mem_vmemmap = {
    .name = "virtio-mem-vmemmap",
    .version_id = 1,
    .minimum_version_id = 1,
    .fields = (const VMStateField[]) {
        {
            .name = "ranges",
            .version_id = 0,
            .size = sizeof(VirtIOMEMVmemmap),
            .info = &vmstate_info_virtio_mem_vmemmap,
            .flags = VMS_SINGLE,
            .offset = 0,
        },
        VMSTATE_END_OF_LIST()
    },
};
