/*
 * virtio-mem: migration of the vmemmap accounting
 *
 * On the wire: a 32-bit length, then that many bytes of the encoded
 * state (virtio_mem_vmemmap_encode(): nothing while nothing is marked,
 * else a 16-bit count of marked pages per marking unit of each plugged
 * block).  Its size depends on the configuration and the plugged blocks
 * only, never on the pattern of the marks: at most 2 bytes per MiB
 * plugged, 1 MiB per TiB with blocks of 2 MiB or more.  Plain VMState
 * (a uint32 and a buffer), so the vmdesc describes it and
 * scripts/analyze-migration.py can read it.
 *
 * The destination checks the length before it allocates anything, and
 * the contents against its own plugged bitmap (which arrived before, in
 * the same section) before it changes anything; a stream that claims
 * anything the device could not hold fails the load with an error.
 *
 * Copyright (c) 2026 The virtio-mem-vmemmap authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qemu/error-report.h"
#include "hw/virtio/virtio-mem-vmemmap.h"

static int virtio_mem_vmemmap_pre_save(void *opaque)
{
    VirtIOMEMVmemmap *vm = opaque;
    const uint64_t len = virtio_mem_vmemmap_encoded_size(vm);

    g_free(vm->mig_buf);
    vm->mig_buf = NULL;
    /* 2 bytes per MiB at most: a 2 TiB region of 1 MiB blocks is 4 MiB. */
    if (len > UINT32_MAX) {
        error_report("virtio-mem: vmemmap state of %" PRIu64 " bytes does"
                     " not fit the migration stream", len);
        return -EINVAL;
    }
    vm->mig_len = len;
    if (len) {
        vm->mig_buf = g_malloc(len);
        virtio_mem_vmemmap_encode(vm, vm->mig_buf);
    }
    return 0;
}

static int virtio_mem_vmemmap_post_save(void *opaque)
{
    VirtIOMEMVmemmap *vm = opaque;

    g_free(vm->mig_buf);
    vm->mig_buf = NULL;
    vm->mig_len = 0;
    return 0;
}

static int virtio_mem_vmemmap_pre_load(void *opaque)
{
    return virtio_mem_vmemmap_post_save(opaque);
}

/* Runs before the buffer is allocated: refuse a length we cannot take. */
static bool virtio_mem_vmemmap_len_valid(void *opaque, int version_id)
{
    VirtIOMEMVmemmap *vm = opaque;

    if (!virtio_mem_vmemmap_enabled(vm)) {
        error_report("virtio-mem: the source's guest uses vmemmap accounting,"
                     " but this device has x-vmemmap-accounting=off; start the"
                     " destination with x-vmemmap-accounting=on");
        return false;
    }
    /* The exact length needs the plugged bitmap: post_load checks it. */
    if (vm->mig_len % 2 ||
        vm->mig_len > 2 * (vm->region_size / virtio_mem_vmemmap_unit(vm))) {
        error_report("virtio-mem: incoming vmemmap state of %" PRIu32
                     " bytes cannot describe a region of 0x%" PRIx64
                     " bytes", vm->mig_len, vm->region_size);
        return false;
    }
    return true;
}

static int virtio_mem_vmemmap_post_load(void *opaque, int version_id)
{
    VirtIOMEMVmemmap *vm = opaque;
    const uint32_t len = vm->mig_len;
    VirtIOMEMVmemmapCheck check;

    check = virtio_mem_vmemmap_decode(vm, vm->mig_buf, len);
    virtio_mem_vmemmap_post_save(vm);
    if (check != VIRTIO_MEM_VMEMMAP_OK) {
        error_report("virtio-mem: incoming vmemmap state of %" PRIu32
                     " bytes for the plugged blocks of a region of 0x%"
                     PRIx64 " bytes: %s", len, vm->region_size,
                     virtio_mem_vmemmap_check_str(check));
        return -EINVAL;
    }
    return 0;
}

const VMStateDescription vmstate_virtio_mem_vmemmap = {
    .name = "virtio-mem-vmemmap",
    .version_id = 1,
    .minimum_version_id = 1,
    .pre_save = virtio_mem_vmemmap_pre_save,
    .post_save = virtio_mem_vmemmap_post_save,
    .pre_load = virtio_mem_vmemmap_pre_load,
    .post_load = virtio_mem_vmemmap_post_load,
    .fields = (const VMStateField[]) {
        VMSTATE_UINT32(mig_len, VirtIOMEMVmemmap),
        VMSTATE_VALIDATE("vmemmap state length",
                         virtio_mem_vmemmap_len_valid),
        VMSTATE_VBUFFER_ALLOC_UINT32(mig_buf, VirtIOMEMVmemmap, 0, NULL,
                                     mig_len),
        VMSTATE_END_OF_LIST()
    },
};
