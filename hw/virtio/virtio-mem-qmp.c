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
#include <sys/vfs.h>
#include <linux/magic.h>
#include "qemu/bitops.h"
#include "qemu/host-utils.h"
#include "qemu/units.h"
#include "qapi/error.h"
#include "qapi/qapi-commands-machine.h"
#include "migration/misc.h"
#include "block/thread-pool.h"
#include "qemu/coroutine.h"
#include "system/runstate.h"
#include "exec/cpu-common.h"
#include "exec/ramblock.h"
#include "hw/virtio/virtio-mem.h"

/*
 * Scan at most this much memory per mincore() call: the result vector is
 * one byte per host page, so this bounds what a scan allocates (64 KiB
 * with 4 KiB pages) whatever the size of the device.
 */
#define VIRTIO_MEM_FOOTPRINT_CHUNK (256 * MiB)

/* Resident bytes in [@host, @host + @size). */
static int virtio_mem_resident(uint8_t *host, uint64_t size,
                               uint64_t *resident, Error **errp)
{
    const size_t page = qemu_real_host_page_size();
    const size_t vec_len = VIRTIO_MEM_FOOTPRINT_CHUNK / page;
    g_autofree uint64_t *vec = g_malloc(ROUND_UP(vec_len, 8));
    uint64_t done;

    *resident = 0;
    for (done = 0; done < size; done += VIRTIO_MEM_FOOTPRINT_CHUNK) {
        const uint64_t len = MIN(size - done, VIRTIO_MEM_FOOTPRINT_CHUNK);
        const size_t pages = DIV_ROUND_UP(len, page);
        size_t i;

        memset(vec, 0, ROUND_UP(pages, 8));
        if (mincore(host + done, len, (unsigned char *)vec)) {
            const int err = errno;

            error_setg_errno(errp, err, "mincore() on the memory of"
                             " virtio-mem device failed");
            return -err;
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
 * Call @fn for each maximal run of blocks in @bitmap (@nr_blocks bits,
 * set == plugged) that are all plugged or all unplugged, from block
 * @first on, with the run's offset, size and state.
 */
static int virtio_mem_for_each_run(const unsigned long *bitmap,
                                   unsigned long nr_blocks,
                                   uint64_t block_size, unsigned long first,
                                   int (*fn)(void *opaque, uint64_t offset,
                                             uint64_t size, bool plugged,
                                             Error **errp),
                                   void *opaque, Error **errp)
{
    unsigned long end;
    int ret;

    while (first < nr_blocks) {
        const bool plugged = test_bit(first, bitmap);

        end = plugged ? find_next_zero_bit(bitmap, nr_blocks, first) :
                        find_next_bit(bitmap, nr_blocks, first);
        ret = fn(opaque, first * block_size, (end - first) * block_size,
                 plugged, errp);
        if (ret) {
            return ret;
        }
        first = end;
    }
    return 0;
}

/* The memory device a virtio-mem backend belongs to (virtio-mem-pci). */
static DeviceState *virtio_mem_proxy(VirtIOMEM *vmem)
{
    Object *parent = OBJECT(vmem)->parent;

    return parent ? DEVICE(parent) : DEVICE(vmem);
}

/*
 * One device's footprint scan: what it needs, copied or referenced under
 * the BQL, so that it can run in a worker thread without it.
 */
typedef struct VirtIOMEMScan {
    Object *backend;            /* a reference: keeps the memory mapped */
    uint8_t *host;
    int fd;                     /* a shared shmem file, or -1 */
    uint64_t fd_offset;         /* where @host starts in @fd */
    uint64_t block_size;
    unsigned long nr_blocks;
    unsigned long *plugged;     /* a copy of the device's bitmap */
    VirtioMEMFootprint *fp;
    Error *err;
} VirtIOMEMScan;

/*
 * The file descriptor of @rb if its memory is a shared mapping of a shmem
 * file (memfd or tmpfs), else -1.  There, SEEK_DATA/SEEK_HOLE describe
 * the page cache exactly: a page is data once it exists, and a hole
 * holds no page.  A disk file system's page cache also holds pages over
 * holes (read-ahead around a fault), and a private mapping has anonymous
 * copies the file never sees, so those are scanned page by page.
 */
static int virtio_mem_shmem_fd(RAMBlock *rb)
{
    struct statfs fs;

    if (rb->fd < 0 || !qemu_ram_is_shared(rb) ||
        fstatfs(rb->fd, &fs) || fs.f_type != TMPFS_MAGIC) {
        return -1;
    }
    return rb->fd;
}

/*
 * Resident bytes in [@offset, @offset + @size) of a device whose memory is
 * a shared shmem mapping: only the file's data can be resident, so the
 * holes SEEK_DATA/SEEK_HOLE report are skipped and mincore() looks at the
 * data alone.  A sparse TiB with a few GiB written is then scanned in the
 * time those GiB take, where a page-by-page mincore() of the whole region
 * takes seconds.
 */
static int virtio_mem_resident_fd(VirtIOMEMScan *scan, uint64_t offset,
                                  uint64_t size, uint64_t *resident,
                                  Error **errp)
{
    const uint64_t page = qemu_real_host_page_size();
    const uint64_t start = scan->fd_offset + offset;
    const uint64_t end = start + size;
    uint64_t pos = start;

    *resident = 0;
    while (pos < end) {
        uint64_t count;
        off_t data, hole;
        int ret;

        data = lseek(scan->fd, pos, SEEK_DATA);
        if (data < 0 && errno == ENXIO) {
            break;                      /* no data from @pos to EOF */
        }
        hole = data < 0 ? -1 : lseek(scan->fd, data, SEEK_HOLE);
        if (data < 0 || hole < 0) {
            const int err = errno;

            error_setg_errno(errp, err, "lseek() on the memory of"
                             " virtio-mem device failed");
            return -err;
        }
        if (data >= end) {
            break;
        }
        /* Extents are in file system blocks: mincore() wants pages. */
        data = QEMU_ALIGN_DOWN(MAX(data, pos), page);
        hole = MIN(QEMU_ALIGN_UP(hole, page), end);
        if (hole <= data) {
            hole = MIN(data + page, end);
        }
        ret = virtio_mem_resident(scan->host + (data - scan->fd_offset),
                                  hole - data, &count, errp);
        if (ret) {
            return ret;
        }
        *resident += count;
        pos = hole;
    }
    return 0;
}

static int virtio_mem_footprint_run(void *opaque, uint64_t offset,
                                    uint64_t size, bool plugged,
                                    Error **errp)
{
    VirtIOMEMScan *scan = opaque;
    uint64_t resident;
    int ret;

    if (scan->fd >= 0) {
        ret = virtio_mem_resident_fd(scan, offset, size, &resident, errp);
    } else {
        ret = virtio_mem_resident(scan->host + offset, size, &resident, errp);
    }
    if (!ret) {
        if (plugged) {
            scan->fp->plugged_resident += resident;
        } else {
            scan->fp->unplugged_resident += resident;
        }
    }
    return ret;
}

/* The scan itself: no BQL needed, it touches only what @opaque holds. */
static int virtio_mem_footprint_scan(void *opaque)
{
    VirtIOMEMScan *scan = opaque;

    return virtio_mem_for_each_run(scan->plugged, scan->nr_blocks,
                                   scan->block_size, 0,
                                   virtio_mem_footprint_run, scan,
                                   &scan->err);
}

static int virtio_mem_footprint_one(Object *obj, void *opaque)
{
    GPtrArray *scans = opaque;
    VirtIOMEM *vmem = (VirtIOMEM *)object_dynamic_cast(obj, TYPE_VIRTIO_MEM);
    VirtioMEMFootprint *fp;
    VirtIOMEMScan *scan;
    DeviceState *proxy;
    RAMBlock *rb;

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

    scan = g_new0(VirtIOMEMScan, 1);
    scan->fp = fp;
    scan->backend = object_ref(OBJECT(vmem->memdev));
    scan->host = memory_region_get_ram_ptr(&vmem->memdev->mr);
    rb = vmem->memdev->mr.ram_block;
    scan->fd = virtio_mem_shmem_fd(rb);
    scan->fd_offset = rb->fd_offset;
    scan->block_size = vmem->block_size;
    scan->nr_blocks = vmem->bitmap_size;
    scan->plugged = bitmap_new(vmem->bitmap_size);
    bitmap_copy(scan->plugged, vmem->bitmap, vmem->bitmap_size);
    g_ptr_array_add(scans, scan);
    return 0;
}

/*
 * Under the BQL, only the copies: the devices' plugged bitmaps (64 KiB
 * for a TiB of 2 MiB blocks).  From the QMP coroutine each scan then runs
 * in the thread pool while the coroutine yields, so the BQL is free for
 * vCPUs and other monitors.  There is no HMP command: an HMP command,
 * coroutine or not, waits for its end in the main thread with the BQL
 * held, so the VM would stall for the whole scan.  Outside a coroutine
 * (no caller today) the scan runs right here.
 */
VirtioMEMFootprintList *coroutine_mixed_fn qmp_query_virtio_mem_footprint(
    Error **errp)
{
    g_autoptr(GPtrArray) scans = g_ptr_array_new();
    VirtioMEMFootprintList *list = NULL, **tail = &list;
    guint i;

    object_child_foreach_recursive(object_get_root(),
                                   virtio_mem_footprint_one, scans);
    for (i = 0; i < scans->len; i++) {
        VirtIOMEMScan *scan = g_ptr_array_index(scans, i);

        if (qemu_in_coroutine()) {
            thread_pool_submit_co(virtio_mem_footprint_scan, scan);
        } else {
            virtio_mem_footprint_scan(scan);
        }
        if (scan->err) {
            scan->fp->plugged_resident = 0;
            scan->fp->unplugged_resident = 0;
            scan->fp->error = g_strdup(error_get_pretty(scan->err));
            error_free(scan->err);
        }
        QAPI_LIST_APPEND(tail, scan->fp);
        object_unref(scan->backend);
        g_free(scan->plugged);
        g_free(scan);
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

typedef struct VirtIOMEMScrub {
    VirtIOMEM *vmem;
    uint64_t discarded;
} VirtIOMEMScrub;

static int virtio_mem_scrub_run(void *opaque, uint64_t offset,
                                uint64_t size, bool plugged, Error **errp)
{
    VirtIOMEMScrub *scrub = opaque;
    VirtIOMEM *vmem = scrub->vmem;
    uint8_t *host = memory_region_get_ram_ptr(&vmem->memdev->mr);
    uint64_t resident;
    int ret;

    if (plugged) {
        return 0;
    }
    ret = virtio_mem_resident(host + offset, size, &resident, errp);
    if (ret || !resident) {
        return ret;
    }
    ret = ram_block_discard_range(vmem->memdev->mr.ram_block, offset, size);
    if (ret) {
        error_setg_errno(errp, -ret, "discarding unplugged memory at offset"
                         " 0x%" PRIx64 " failed", offset);
        return ret;
    }
    scrub->discarded += resident;
    return 0;
}

/*
 * Scrubbing discards memory this QEMU believes unplugged.  That belief
 * is only the guest's truth while this QEMU owns the guest's memory and
 * its plugged bitmap is current; refuse whenever it may not be.
 */
static bool virtio_mem_scrub_allowed(VirtIOMEM *vmem, const char *qom_path,
                                     Error **errp)
{
    const RunState state = runstate_get();

    /*
     * A destination before (or while) its state arrives: with
     * x-early-migration=off, plugged blocks look unplugged until the
     * device section is loaded, and RAM may already be in them.
     */
    if (state == RUN_STATE_INMIGRATE || state == RUN_STATE_RESTORE_VM ||
        migration_in_incoming_postcopy()) {
        error_setg(errp, "the VM's state is still arriving (run state '%s');"
                   " scrub '%s' once it runs", RunState_str(state),
                   qom_path);
        return false;
    }
    /*
     * A source during or after its migration: another QEMU may be
     * running (or about to run) the guest; on shared memory it would
     * lose what we discard.
     */
    if (state == RUN_STATE_FINISH_MIGRATE || state == RUN_STATE_POSTMIGRATE ||
        migration_is_running()) {
        error_setg(errp, "the VM is being or has been migrated (run state"
                   " '%s'); scrub '%s' only after a migration has finished"
                   " and the VM runs here again", RunState_str(state),
                   qom_path);
        return false;
    }
    /*
     * Memory that migration leaves in place (x-ignore-shared on a shared
     * file, cpr-transfer) is mapped by the other QEMU as well.
     */
    if (migrate_ram_is_ignored(vmem->memdev->mr.ram_block)) {
        error_setg(errp, "the memory of '%s' is not migrated but shared with"
                   " a migration destination (x-ignore-shared or"
                   " cpr-transfer); not scrubbing it", qom_path);
        return false;
    }
    return true;
}

VirtioMEMScrubResult *qmp_x_virtio_mem_scrub(const char *qom_path,
                                             Error **errp)
{
    VirtIOMEM *vmem = virtio_mem_find(qom_path, errp);
    VirtIOMEMScrub scrub = { .vmem = vmem };
    VirtioMEMScrubResult *res;

    if (!vmem || !virtio_mem_scrub_allowed(vmem, qom_path, errp)) {
        return NULL;
    }
    if (virtio_mem_for_each_run(vmem->bitmap, vmem->bitmap_size,
                                vmem->block_size, 0, virtio_mem_scrub_run,
                                &scrub, errp)) {
        return NULL;
    }
    res = g_new0(VirtioMEMScrubResult, 1);
    res->discarded = scrub.discarded;
    return res;
}

/* The most runs x-query-virtio-mem-state returns per list and call. */
#define VIRTIO_MEM_STATE_MAX_RUNS 1024

typedef struct VirtIOMEMStateWalk {
    VirtioMEMRangeList **tail;
    uint64_t start;
    unsigned n;
    uint64_t cut;       /* where the first run that did not fit starts */
} VirtIOMEMStateWalk;

/* Add [@offset, @offset + @size) cut at @w->start, or stop the walk. */
static int virtio_mem_state_add(VirtIOMEMStateWalk *w, uint64_t offset,
                                uint64_t size)
{
    VirtioMEMRange *r;

    if (offset + size <= w->start) {
        return 0;
    }
    if (offset < w->start) {
        size -= w->start - offset;
        offset = w->start;
    }
    if (w->n == VIRTIO_MEM_STATE_MAX_RUNS) {
        w->cut = offset;
        return 1;
    }
    r = g_new0(VirtioMEMRange, 1);
    r->offset = offset;
    r->length = size;
    QAPI_LIST_APPEND(w->tail, r);
    w->n++;
    return 0;
}

static int virtio_mem_state_run(void *opaque, uint64_t offset, uint64_t size,
                                bool plugged, Error **errp)
{
    return plugged ? virtio_mem_state_add(opaque, offset, size) : 0;
}

/* Drop what lies at or past @cut from @list; cut the run that crosses it. */
static void virtio_mem_state_cut(VirtioMEMRangeList **list, uint64_t cut)
{
    while (*list && (*list)->value->offset < cut) {
        VirtioMEMRange *r = (*list)->value;

        r->length = MIN(r->length, cut - r->offset);
        list = &(*list)->next;
    }
    qapi_free_VirtioMEMRangeList(*list);
    *list = NULL;
}

VirtioMEMState *qmp_x_query_virtio_mem_state(const char *qom_path,
                                             bool has_start, uint64_t start,
                                             Error **errp)
{
    VirtIOMEM *vmem = virtio_mem_find(qom_path, errp);
    VirtIOMEMStateWalk plugged, vmemmap;
    uint64_t offset, run_start, size;
    VirtioMEMState *st;

    if (!vmem) {
        return NULL;
    }
    if (!has_start) {
        start = 0;
    }
    st = g_new0(VirtioMEMState, 1);
    st->size = vmem->size;
    st->requested_size = vmem->requested_size;
    st->vmemmap_size = virtio_mem_vmemmap_size(&vmem->vmemmap);
    st->block_size = vmem->block_size;
    st->region_size = memory_region_size(&vmem->memdev->mr);
    st->usable_region_size = vmem->usable_region_size;
    if (start >= st->region_size) {
        return st;
    }

    plugged = (VirtIOMEMStateWalk) {
        .tail = &st->plugged, .start = start, .cut = UINT64_MAX,
    };
    virtio_mem_for_each_run(vmem->bitmap, vmem->bitmap_size,
                            vmem->block_size, start / vmem->block_size,
                            virtio_mem_state_run, &plugged, &error_abort);
    vmemmap = (VirtIOMEMStateWalk) {
        .tail = &st->vmemmap, .start = start, .cut = UINT64_MAX,
    };
    offset = start;
    while (virtio_mem_vmemmap_next_range(&vmem->vmemmap, offset, &run_start,
                                         &size) &&
           !virtio_mem_state_add(&vmemmap, run_start, size)) {
        offset = run_start + size;
    }
    /* Both lists end where the first of them had to stop. */
    if (MIN(plugged.cut, vmemmap.cut) != UINT64_MAX) {
        st->has_next = true;
        st->next = MIN(plugged.cut, vmemmap.cut);
        virtio_mem_state_cut(&st->plugged, st->next);
        virtio_mem_state_cut(&st->vmemmap, st->next);
    }
    return st;
}
