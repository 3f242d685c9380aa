/*
 * virtio-mem: QMP views of a device's memory
 *
 * 'size' says what the device allows the guest to use and 'vmemmap-size'
 * what the guest claims; neither is a measurement.  This file measures
 * the host memory resident inside plugged and inside unplugged blocks,
 * discards what should not be resident (unplugged memory) on request,
 * and dumps the device's state for tests that check it against the
 * guest's view.
 *
 * Copyright (c) 2026 The virtio-mem-vmemmap authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qemu/bitops.h"
#include "qemu/host-utils.h"
#include "qemu/units.h"
#include "qapi/error.h"
#include "qapi/qapi-commands-machine.h"
#include "qobject/qdict.h"
#include "monitor/hmp.h"
#include "monitor/monitor.h"
#include "migration/misc.h"
#include "exec/cpu-common.h"
#include "hw/virtio/virtio-mem.h"

/*
 * Scan at most this much memory per mincore() call: the result vector is
 * one byte per host page, so this bounds what a scan allocates (64 KiB
 * with 4 KiB pages) whatever the size of the device.
 */
#define VIRTIO_MEM_FOOTPRINT_CHUNK (256 * MiB)

/* Resident bytes in [@offset, @offset + @size) of the device's memory. */
static int virtio_mem_resident(VirtIOMEM *vmem, uint64_t offset,
                               uint64_t size, uint64_t *resident,
                               Error **errp)
{
    const size_t page = qemu_real_host_page_size();
    const size_t vec_len = VIRTIO_MEM_FOOTPRINT_CHUNK / page;
    uint8_t *host = memory_region_get_ram_ptr(&vmem->memdev->mr);
    g_autofree uint64_t *vec = g_malloc(ROUND_UP(vec_len, 8));
    uint64_t done;

    *resident = 0;
    for (done = 0; done < size; done += VIRTIO_MEM_FOOTPRINT_CHUNK) {
        const uint64_t len = MIN(size - done, VIRTIO_MEM_FOOTPRINT_CHUNK);
        const size_t pages = DIV_ROUND_UP(len, page);
        size_t i;

        memset(vec, 0, ROUND_UP(pages, 8));
        if (mincore(host + offset + done, len, (unsigned char *)vec)) {
            error_setg_errno(errp, errno, "mincore() on the memory of"
                             " virtio-mem device failed");
            return -errno;
        }
        /* One byte per page, bit 0 set if resident: eight pages a word. */
        for (i = 0; i < DIV_ROUND_UP(pages, 8); i++) {
            if (vec[i]) {
                *resident += ctpop64(vec[i] & 0x0101010101010101ULL) * page;
            }
        }
    }
    return 0;
}

/*
 * Call @fn for each maximal run of blocks that are all plugged or all
 * unplugged, with the run's offset, size and state.
 */
static int virtio_mem_for_each_run(VirtIOMEM *vmem,
                                   int (*fn)(VirtIOMEM *vmem, uint64_t offset,
                                             uint64_t size, bool plugged,
                                             void *opaque, Error **errp),
                                   void *opaque, Error **errp)
{
    unsigned long first = 0, end;
    int ret;

    while (first < vmem->bitmap_size) {
        const bool plugged = test_bit(first, vmem->bitmap);

        end = plugged ?
              find_next_zero_bit(vmem->bitmap, vmem->bitmap_size, first) :
              find_next_bit(vmem->bitmap, vmem->bitmap_size, first);
        ret = fn(vmem, first * vmem->block_size,
                 (end - first) * vmem->block_size, plugged, opaque, errp);
        if (ret) {
            return ret;
        }
        first = end;
    }
    return 0;
}

static int virtio_mem_footprint_run(VirtIOMEM *vmem, uint64_t offset,
                                    uint64_t size, bool plugged,
                                    void *opaque, Error **errp)
{
    VirtioMEMFootprint *fp = opaque;
    uint64_t resident;
    int ret;

    ret = virtio_mem_resident(vmem, offset, size, &resident, errp);
    if (!ret) {
        if (plugged) {
            fp->plugged_resident += resident;
        } else {
            fp->unplugged_resident += resident;
        }
    }
    return ret;
}

/* The memory device a virtio-mem backend belongs to (virtio-mem-pci). */
static DeviceState *virtio_mem_proxy(VirtIOMEM *vmem)
{
    Object *parent = OBJECT(vmem)->parent;

    return parent ? DEVICE(parent) : DEVICE(vmem);
}

typedef struct VirtIOMEMFootprintWalk {
    VirtioMEMFootprintList **tail;
    Error **errp;
} VirtIOMEMFootprintWalk;

static int virtio_mem_footprint_one(Object *obj, void *opaque)
{
    VirtIOMEMFootprintWalk *walk = opaque;
    VirtIOMEM *vmem = (VirtIOMEM *)object_dynamic_cast(obj, TYPE_VIRTIO_MEM);
    g_autoptr(VirtioMEMFootprint) fp = NULL;
    DeviceState *proxy;

    if (!vmem || !DEVICE(vmem)->realized) {
        return 0;
    }
    proxy = virtio_mem_proxy(vmem);
    fp = g_new0(VirtioMEMFootprint, 1);
    fp->qom_path = object_get_canonical_path(OBJECT(proxy));
    fp->id = g_strdup(proxy->id);
    fp->size = vmem->size;
    fp->has_vmemmap_size = vmem->vmemmap_accounting;
    fp->vmemmap_size = virtio_mem_vmemmap_size(&vmem->vmemmap);
    fp->region_size = memory_region_size(&vmem->memdev->mr);
    if (virtio_mem_for_each_run(vmem, virtio_mem_footprint_run, fp,
                                walk->errp)) {
        return -1;
    }
    QAPI_LIST_APPEND(walk->tail, g_steal_pointer(&fp));
    return 0;
}

VirtioMEMFootprintList *qmp_query_virtio_mem_footprint(Error **errp)
{
    VirtioMEMFootprintList *list = NULL;
    VirtIOMEMFootprintWalk walk = { .tail = &list, .errp = errp };

    if (object_child_foreach_recursive(object_get_root(),
                                       virtio_mem_footprint_one, &walk)) {
        qapi_free_VirtioMEMFootprintList(list);
        return NULL;
    }
    return list;
}

/* A virtio-mem memory device (or its backend) by QOM path. */
static VirtIOMEM *virtio_mem_find(const char *path, Error **errp)
{
    Object *obj = object_resolve_path(path, NULL);
    Object *backend;

    if (!obj) {
        error_setg(errp, "no object at '%s'", path);
        return NULL;
    }
    backend = object_dynamic_cast(obj, TYPE_VIRTIO_MEM) ? obj :
              object_resolve_path_component(obj, "virtio-backend");
    if (!backend || !object_dynamic_cast(backend, TYPE_VIRTIO_MEM)) {
        error_setg(errp, "'%s' is not a virtio-mem device", path);
        return NULL;
    }
    if (!DEVICE(backend)->realized) {
        error_setg(errp, "virtio-mem device '%s' is not realized", path);
        return NULL;
    }
    return VIRTIO_MEM(backend);
}

static int virtio_mem_scrub_run(VirtIOMEM *vmem, uint64_t offset,
                                uint64_t size, bool plugged, void *opaque,
                                Error **errp)
{
    uint64_t *discarded = opaque, resident;
    int ret;

    if (plugged) {
        return 0;
    }
    ret = virtio_mem_resident(vmem, offset, size, &resident, errp);
    if (ret || !resident) {
        return ret;
    }
    ret = ram_block_discard_range(vmem->memdev->mr.ram_block, offset, size);
    if (ret) {
        error_setg_errno(errp, -ret, "discarding unplugged memory at offset"
                         " 0x%" PRIx64 " failed", offset);
        return ret;
    }
    *discarded += resident;
    return 0;
}

VirtioMEMScrubResult *qmp_x_virtio_mem_scrub(const char *qom_path,
                                             Error **errp)
{
    VirtIOMEM *vmem = virtio_mem_find(qom_path, errp);
    uint64_t discarded = 0;
    VirtioMEMScrubResult *res;

    if (!vmem) {
        return NULL;
    }
    /* Unplugged memory is not migrated; leave it alone until the end. */
    if (migration_is_running() || migration_in_incoming_postcopy()) {
        error_setg(errp, "a migration is running; scrub '%s' after it has"
                   " finished", qom_path);
        return NULL;
    }
    if (virtio_mem_for_each_run(vmem, virtio_mem_scrub_run, &discarded,
                                errp)) {
        return NULL;
    }
    res = g_new0(VirtioMEMScrubResult, 1);
    res->discarded = discarded;
    return res;
}

void hmp_info_virtio_mem_footprint(Monitor *mon, const QDict *qdict)
{
    Error *err = NULL;
    g_autoptr(VirtioMEMFootprintList) list =
        qmp_query_virtio_mem_footprint(&err);
    VirtioMEMFootprintList *l;

    if (hmp_handle_error(mon, err)) {
        return;
    }
    for (l = list; l; l = l->next) {
        const VirtioMEMFootprint *fp = l->value;

        monitor_printf(mon, "%s (%s):\n", fp->qom_path,
                       fp->id ? fp->id : "no id");
        monitor_printf(mon, "  size: %" PRIu64 "\n", fp->size);
        if (fp->has_vmemmap_size) {
            monitor_printf(mon, "  vmemmap-size: %" PRIu64 " (guest-reported)\n",
                           fp->vmemmap_size);
        }
        monitor_printf(mon, "  region-size: %" PRIu64 "\n", fp->region_size);
        monitor_printf(mon, "  plugged-resident: %" PRIu64 "\n",
                       fp->plugged_resident);
        monitor_printf(mon, "  unplugged-resident: %" PRIu64 "\n",
                       fp->unplugged_resident);
    }
}

static int virtio_mem_state_run(VirtIOMEM *vmem, uint64_t offset,
                                uint64_t size, bool plugged, void *opaque,
                                Error **errp)
{
    VirtioMEMRangeList ***tail = opaque;
    VirtioMEMRange *r;

    if (plugged) {
        r = g_new0(VirtioMEMRange, 1);
        r->offset = offset;
        r->length = size;
        QAPI_LIST_APPEND(*tail, r);
    }
    return 0;
}

VirtioMEMState *qmp_x_query_virtio_mem_state(const char *qom_path,
                                             Error **errp)
{
    VirtIOMEM *vmem = virtio_mem_find(qom_path, errp);
    VirtioMEMRangeList **tail;
    uint64_t offset = 0, start, size;
    VirtioMEMState *st;

    if (!vmem) {
        return NULL;
    }
    st = g_new0(VirtioMEMState, 1);
    st->size = vmem->size;
    st->requested_size = vmem->requested_size;
    st->vmemmap_size = virtio_mem_vmemmap_size(&vmem->vmemmap);
    st->block_size = vmem->block_size;
    st->region_size = memory_region_size(&vmem->memdev->mr);
    st->usable_region_size = vmem->usable_region_size;
    tail = &st->plugged;
    virtio_mem_for_each_run(vmem, virtio_mem_state_run, &tail, &error_abort);
    tail = &st->vmemmap;
    while (virtio_mem_vmemmap_next_range(&vmem->vmemmap, offset, &start,
                                         &size)) {
        VirtioMEMRange *r = g_new0(VirtioMEMRange, 1);

        r->offset = start;
        r->length = size;
        QAPI_LIST_APPEND(tail, r);
        offset = start + size;
    }
    return st;
}
