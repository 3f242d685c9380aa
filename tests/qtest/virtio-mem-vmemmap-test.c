/*
 * QTest for virtio-mem vmemmap accounting (VIRTIO_MEM_F_VMEMMAP)
 *
 * Drives a virtio-mem-pci device through its request virtqueue with raw
 * requests, the way a guest driver would, and checks what the device
 * answers and what it reports through QOM, QMP, HMP and events.
 *
 * Copyright (c) 2026 The virtio-mem-vmemmap authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qemu/bswap.h"
#include "qemu/timer.h"
#include "qemu/units.h"
#include "libqtest.h"
#include "libqos/libqos-malloc.h"
#include "libqos/malloc-pc.h"
#include "libqos/pci-pc.h"
#include "libqos/virtio.h"
#include "libqos/virtio-pci.h"
#include "qobject/qdict.h"
#include "qobject/qjson.h"
#include "qobject/qlist.h"
#include "standard-headers/linux/virtio_config.h"
#include "standard-headers/linux/virtio_mem.h"
#include "standard-headers/linux/virtio_pci.h"

#define PCI_VENDOR_ID_REDHAT_QUMRANET 0x1af4
#define PCI_DEVICE_ID_VIRTIO_MEM      (0x1040 + VIRTIO_ID_MEM)
#define TIMEOUT_US                    (30 * 1000 * 1000)
#define REGION_SIZE                   (1 * GiB)

typedef struct Dev {
    QTestState *qts;
    QGuestAllocator alloc;
    QPCIBus *bus;
    QVirtioPCIDevice *pdev;
    QVirtioDevice *vdev;
    QVirtQueue *vq;
    uint64_t addr;
    uint64_t block_size;
    uint64_t offered;
} Dev;

static uint64_t qom_get_u64(QTestState *qts, const char *prop)
{
    QDict *rsp = qtest_qmp(qts, "{ 'execute': 'qom-get', 'arguments': "
                           "{ 'path': 'vm0', 'property': %s } }", prop);
    uint64_t value = qdict_get_int(rsp, "return");

    qobject_unref(rsp);
    return value;
}

static void find_dev(QPCIDevice *pci, int devfn, void *opaque)
{
    int *found = opaque;

    *found = devfn;
    /* qpci_device_foreach() hands each device over to the callback. */
    g_free(pci);
}

/*
 * Start QEMU with one virtio-mem-pci device "vm0" (@dev_opts added): the
 * binary named by the environment variable @bin_var, or the default one
 * if @bin_var is NULL.
 */
/* The memory backend of vm0 and its options; the bench changes it. */
static const char *mem_backend = "memory-backend-ram";

static QTestState *qemu_start_sized(const char *bin_var, uint64_t region,
                                    const char *dev_opts, const char *extra)
{
    g_autofree char *args =
        g_strdup_printf("-machine pc -m 128M,maxmem=%" PRIu64 " %s"
                        " -object %s,id=mem0,size=%" PRIu64
                        " -device virtio-mem-pci,id=vm0,memdev=mem0,%s %s",
                        128 * MiB + region,
                        region > 512 * GiB ? "-cpu qemu64,phys-bits=42" : "",
                        mem_backend, region, dev_opts, extra);

    return qtest_init_with_env(bin_var, args, true);
}

static QTestState *qemu_start(const char *bin_var, const char *dev_opts,
                              const char *extra)
{
    return qemu_start_sized(bin_var, REGION_SIZE, dev_opts, extra);
}

/*
 * Reset the device and bring it up like a (new) driver would;
 * @negotiate_vmemmap says whether to accept VIRTIO_MEM_F_VMEMMAP.
 */
static void dev_negotiate(Dev *d, bool negotiate_vmemmap)
{
    uint64_t features;

    if (d->vq) {
        qvirtqueue_cleanup(d->vdev->bus, d->vq, &d->alloc);
        d->vq = NULL;
    }
    qvirtio_start_device(d->vdev);
    d->offered = qvirtio_get_features(d->vdev);
    /* Device features and VERSION_1; no ring features (event idx). */
    features = (d->offered & ((1ull << VIRTIO_TRANSPORT_F_START) - 1)) |
               (1ull << VIRTIO_F_VERSION_1);
    if (!negotiate_vmemmap) {
        features &= ~(1ull << VIRTIO_MEM_F_VMEMMAP);
    }
    qvirtio_set_features(d->vdev, features);
    d->vq = qvirtqueue_setup(d->vdev, &d->alloc, 0);
    qvirtio_set_driver_ok(d->vdev);
}

/*
 * Start QEMU and bring the device up like a driver; @negotiate_vmemmap
 * says whether to accept VIRTIO_MEM_F_VMEMMAP.
 */
static Dev *dev_start_sized(const char *bin_var, uint64_t region,
                            const char *dev_opts, bool negotiate_vmemmap)
{
    Dev *d = g_new0(Dev, 1);
    QPCIAddress pci_addr = { 0 };
    int devfn = -1;

    d->qts = qemu_start_sized(bin_var, region, dev_opts, "");
    pc_alloc_init(&d->alloc, d->qts, ALLOC_NO_FLAGS);
    d->bus = qpci_new_pc(d->qts, &d->alloc);
    qpci_device_foreach(d->bus, PCI_VENDOR_ID_REDHAT_QUMRANET,
                        PCI_DEVICE_ID_VIRTIO_MEM, find_dev, &devfn);
    g_assert_cmpint(devfn, >=, 0);
    pci_addr.devfn = devfn;
    d->pdev = virtio_pci_new(d->bus, &pci_addr);
    g_assert_nonnull(d->pdev);
    d->vdev = &d->pdev->vdev;
    qvirtio_pci_device_enable(d->pdev);
    dev_negotiate(d, negotiate_vmemmap);

    d->addr = qom_get_u64(d->qts, "memaddr");
    d->block_size = qom_get_u64(d->qts, "block-size");
    return d;
}

static Dev *dev_start_on(const char *bin_var, const char *dev_opts,
                         bool negotiate_vmemmap)
{
    return dev_start_sized(bin_var, REGION_SIZE, dev_opts, negotiate_vmemmap);
}

static Dev *dev_start(const char *dev_opts, bool negotiate_vmemmap)
{
    return dev_start_on(NULL, dev_opts, negotiate_vmemmap);
}

static void dev_stop(Dev *d)
{
    qvirtqueue_cleanup(d->vdev->bus, d->vq, &d->alloc);
    qos_object_destroy(&d->pdev->obj);
    qpci_free_pc(d->bus);
    alloc_destroy(&d->alloc);
    qtest_quit(d->qts);
    g_free(d);
}

static void set_requested(Dev *d, uint64_t size)
{
    qtest_qmp_assert_success(d->qts, "{ 'execute': 'qom-set', 'arguments': "
                             "{ 'path': 'vm0', 'property': 'requested-size',"
                             " 'value': %" PRIu64 " } }", size);
}

/*
 * Queue one request and return the device's response type, or -1 if the
 * device took the request as a protocol violation (NEEDS_RESET, no
 * response).  The whole response lands in @resp if it is not NULL.
 */
static int request_resp(Dev *d, uint16_t type, uint64_t addr, uint64_t arg,
                        struct virtio_mem_resp *resp)
{
    struct virtio_mem_req req = { .type = cpu_to_le16(type) };
    struct virtio_mem_resp local;
    uint64_t req_addr, resp_addr;
    uint32_t head;

    resp = resp ? resp : &local;
    if (type == VIRTIO_MEM_REQ_VMEMMAP) {
        req.u.vmemmap_range.addr = cpu_to_le64(addr);
        req.u.vmemmap_range.size = cpu_to_le64(arg);
    } else {
        req.u.plug.addr = cpu_to_le64(addr);
        req.u.plug.nb_blocks = cpu_to_le16(arg);
    }
    req_addr = guest_alloc(&d->alloc, sizeof(req));
    resp_addr = guest_alloc(&d->alloc, sizeof(*resp));
    qtest_memwrite(d->qts, req_addr, &req, sizeof(req));
    qtest_memset(d->qts, resp_addr, 0xff, sizeof(*resp));

    head = qvirtqueue_add(d->qts, d->vq, req_addr, sizeof(req), false, true);
    qvirtqueue_add(d->qts, d->vq, resp_addr, sizeof(*resp), true, false);
    qvirtqueue_kick(d->qts, d->vdev, d->vq, head);

    /* The device handles the request while the kick is processed. */
    if (d->vdev->bus->get_status(d->vdev) & VIRTIO_CONFIG_S_NEEDS_RESET) {
        return -1;
    }
    qvirtio_wait_used_elem(d->qts, d->vdev, d->vq, head, NULL, TIMEOUT_US);
    qtest_memread(d->qts, resp_addr, resp, sizeof(*resp));
    guest_free(&d->alloc, req_addr);
    guest_free(&d->alloc, resp_addr);
    return le16_to_cpu(resp->type);
}

static int request(Dev *d, uint16_t type, uint64_t addr, uint64_t arg)
{
    return request_resp(d, type, addr, arg, NULL);
}

static int plug(Dev *d, uint64_t offset, uint64_t size)
{
    return request(d, VIRTIO_MEM_REQ_PLUG, d->addr + offset,
                   size / d->block_size);
}

static int unplug(Dev *d, uint64_t offset, uint64_t size)
{
    return request(d, VIRTIO_MEM_REQ_UNPLUG, d->addr + offset,
                   size / d->block_size);
}

static int vmemmap(Dev *d, uint64_t offset, uint64_t size)
{
    return request(d, VIRTIO_MEM_REQ_VMEMMAP, d->addr + offset, size);
}

/*
 * Queue @n requests at once, the way a driver that fills its queue would,
 * and wait until the device has answered all of them; the response types
 * land in @types.  Writes the ring directly, one batch at a time, so that
 * a test can send hundreds of thousands of requests: do not mix with
 * request() on the same device.  Returns the time the device took, from
 * the kick to the last used element, in nanoseconds.
 */
static int64_t request_batch(Dev *d, const struct virtio_mem_req *reqs,
                             int n, uint16_t *types)
{
    QVirtQueue *vq = d->vq;
    const size_t rsz = sizeof(struct virtio_mem_resp);
    g_autofree struct vring_desc *desc = g_new0(struct vring_desc, 2 * n);
    g_autofree struct virtio_mem_resp *resp = g_new0(struct virtio_mem_resp,
                                                     n);
    const uint64_t req_addr = guest_alloc(&d->alloc, n * sizeof(*reqs));
    const uint64_t resp_addr = guest_alloc(&d->alloc, n * rsz);
    const uint16_t avail = qtest_readw(d->qts, vq->avail + 2);
    const uint16_t used = qtest_readw(d->qts, vq->used + 2);
    gint64 start, deadline;
    int i;

    g_assert_cmpint(n, <=, vq->size / 2);
    for (i = 0; i < n; i++) {
        desc[2 * i].addr = cpu_to_le64(req_addr + i * sizeof(*reqs));
        desc[2 * i].len = cpu_to_le32(sizeof(*reqs));
        desc[2 * i].flags = cpu_to_le16(VRING_DESC_F_NEXT);
        desc[2 * i].next = cpu_to_le16(2 * i + 1);
        desc[2 * i + 1].addr = cpu_to_le64(resp_addr + i * rsz);
        desc[2 * i + 1].len = cpu_to_le32(rsz);
        desc[2 * i + 1].flags = cpu_to_le16(VRING_DESC_F_WRITE);
        qtest_writew(d->qts, vq->avail + 4 + 2 * ((avail + i) % vq->size),
                     2 * i);
    }
    qtest_memwrite(d->qts, req_addr, reqs, n * sizeof(*reqs));
    qtest_memwrite(d->qts, vq->desc, desc, 2 * n * sizeof(*desc));
    qtest_writew(d->qts, vq->avail + 2, avail + n);

    start = g_get_monotonic_time();
    deadline = start + TIMEOUT_US;
    d->vdev->bus->virtqueue_kick(d->vdev, vq);
    while (qtest_readw(d->qts, vq->used + 2) != (uint16_t)(used + n)) {
        g_assert_cmpint(g_get_monotonic_time(), <, deadline);
    }
    start = (g_get_monotonic_time() - start) * 1000;

    qtest_memread(d->qts, resp_addr, resp, n * rsz);
    for (i = 0; i < n; i++) {
        types[i] = le16_to_cpu(resp[i].type);
    }
    vq->last_used_idx = used + n;
    guest_free(&d->alloc, req_addr);
    guest_free(&d->alloc, resp_addr);
    return start;
}

/* Resident memory of the QEMU process behind @qts, in bytes. */
static uint64_t qemu_rss(QTestState *qts)
{
    g_autofree char *path = g_strdup_printf("/proc/%d/status",
                                            (int)qtest_pid(qts));
    g_autofree char *status = NULL;
    const char *line;

    g_assert_true(g_file_get_contents(path, &status, NULL, NULL));
    line = strstr(status, "VmRSS:");
    g_assert_nonnull(line);
    return g_ascii_strtoull(line + strlen("VmRSS:"), NULL, 10) * KiB;
}

/* The virtio-mem entry of query-memory-devices; caller unrefs. */
static QDict *query_vm0(QTestState *qts)
{
    QDict *rsp = qtest_qmp(qts, "{ 'execute': 'query-memory-devices' }");
    QList *list = qdict_get_qlist(rsp, "return");
    QDict *data;

    g_assert_cmpint(qlist_size(list), ==, 1);
    data = qdict_get_qdict(qobject_to(QDict, qlist_peek(list)), "data");
    qobject_ref(data);
    qobject_unref(rsp);
    return data;
}

static void test_feature_offer(void)
{
    Dev *d = dev_start("x-vmemmap-accounting=off", true);
    QDict *info = query_vm0(d->qts);
    g_autofree char *hmp = qtest_hmp(d->qts, "info memory-devices");

    g_assert_false(d->offered & (1ull << VIRTIO_MEM_F_VMEMMAP));
    g_assert_false(qdict_haskey(info, "vmemmap-size"));
    g_assert_null(strstr(hmp, "vmemmap-size"));
    g_assert_cmpuint(qom_get_u64(d->qts, "x-vmemmap-size"), ==, 0);
    qobject_unref(info);
    dev_stop(d);

    d = dev_start("x-vmemmap-accounting=on", true);
    info = query_vm0(d->qts);
    g_assert_true(d->offered & (1ull << VIRTIO_MEM_F_VMEMMAP));
    g_assert_true(qdict_haskey(info, "vmemmap-size"));
    g_assert_cmpuint(qdict_get_int(info, "vmemmap-size"), ==, 0);
    qobject_unref(info);
    dev_stop(d);
}

/*
 * vmemmap-size rests on a feature bit no spec has reserved: the QAPI
 * members carry the 'unstable' feature, so a client that asks QEMU to
 * hide unstable output does not see them.
 */
static void test_unstable(void)
{
    QTestState *qts = qemu_start(NULL, "x-vmemmap-accounting=on",
                                 "-compat unstable-output=hide");
    QDict *info = query_vm0(qts);
    QDict *rsp = qtest_qmp(qts, "{ 'execute': 'query-virtio-mem-footprint' }");
    QDict *fp = qobject_to(QDict, qlist_peek(qdict_get_qlist(rsp, "return")));

    g_assert_true(qdict_haskey(info, "size"));
    g_assert_false(qdict_haskey(info, "vmemmap-size"));
    g_assert_nonnull(fp);
    g_assert_true(qdict_haskey(fp, "plugged-resident"));
    g_assert_false(qdict_haskey(fp, "vmemmap-size"));
    qobject_unref(rsp);
    qobject_unref(info);
    qtest_quit(qts);
}

/*
 * Without the feature negotiated, the request is an unknown request:
 * exactly what the device does with any other unknown type.
 */
static void test_not_negotiated(void)
{
    static const char *const opts[] = {
        "x-vmemmap-accounting=off", "x-vmemmap-accounting=on",
    };
    int i;

    for (i = 0; i < ARRAY_SIZE(opts); i++) {
        Dev *d = dev_start(opts[i], false);

        set_requested(d, 64 * MiB);
        g_assert_cmpint(plug(d, 0, 2 * MiB), ==, VIRTIO_MEM_RESP_ACK);
        g_assert_cmpint(vmemmap(d, 0, 4 * KiB), ==, -1);
        g_assert_cmpuint(qom_get_u64(d->qts, "x-vmemmap-size"), ==, 0);
        dev_stop(d);

        /* Stock behaviour for an unknown type, for comparison. */
        d = dev_start(opts[i], false);
        g_assert_cmpint(request(d, VIRTIO_MEM_REQ_VMEMMAP + 1, d->addr, 0),
                        ==, -1);
        dev_stop(d);
    }
}

/*
 * Collect the MEMORY_DEVICE_SIZE_CHANGE events that go out within
 * @periods rate-limit periods, stepping the virtual clock (the rate limit
 * runs on it under qtest).  Returns the size of the last one, or -1 if
 * there was none.  The event never carries vmemmap-size: it reports
 * changes of 'size' only.
 */
static int64_t collect_size_events(QTestState *qts, int periods, bool stop_at,
                                   uint64_t size)
{
    int64_t last = -1;

    for (;;) {
        QDict *ev = qtest_qmp_event_ref(qts, "MEMORY_DEVICE_SIZE_CHANGE");
        QDict *data;

        if (!ev) {
            if (periods-- == 0) {
                return last;
            }
            qtest_clock_step(qts, NANOSECONDS_PER_SECOND);
            /* Any QMP round trip collects events that went out. */
            qobject_unref(qtest_qmp(qts, "{ 'execute': 'query-status' }"));
            continue;
        }
        data = qdict_get_qdict(ev, "data");
        g_assert_cmpstr(qdict_get_str(data, "id"), ==, "vm0");
        g_assert_false(qdict_haskey(data, "vmemmap-size"));
        last = qdict_get_int(data, "size");
        qobject_unref(ev);
        if (stop_at && last == size) {
            return last;
        }
    }
}

/* Wait, for at most ten rate-limit periods, for an event with @size. */
static void wait_size_event(QTestState *qts, uint64_t size)
{
    g_assert_cmpint(collect_size_events(qts, 10, true, size), ==, size);
}

/* No event goes out for at least two rate-limit periods. */
static void assert_no_size_event(QTestState *qts)
{
    g_assert_cmpint(collect_size_events(qts, 2, false, 0), ==, -1);
}

static void assert_reported(Dev *d, uint64_t size, uint64_t vmemmap_size)
{
    g_autofree char *hmp = qtest_hmp(d->qts, "info memory-devices");
    g_autofree char *line = g_strdup_printf("  vmemmap-size: %" PRIu64 "\r\n",
                                            vmemmap_size);
    QDict *info = query_vm0(d->qts);

    g_assert_cmpuint(qom_get_u64(d->qts, "size"), ==, size);
    g_assert_cmpuint(qom_get_u64(d->qts, "x-vmemmap-size"), ==, vmemmap_size);
    g_assert_cmpuint(qdict_get_int(info, "size"), ==, size);
    g_assert_cmpuint(qdict_get_int(info, "vmemmap-size"), ==, vmemmap_size);
    g_assert_nonnull(strstr(hmp, line));
    qobject_unref(info);
}

/* Sub Block Mode: 2 MiB device blocks, the memmap is whole blocks. */
static void test_sbm(void)
{
    Dev *d = dev_start("x-vmemmap-accounting=on,block-size=2M", true);

    set_requested(d, 256 * MiB);
    g_assert_cmpint(plug(d, 0, 64 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    g_assert_cmpint(plug(d, 128 * MiB, 64 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    wait_size_event(d->qts, 128 * MiB);
    assert_no_size_event(d->qts);

    /* Marking changes vmemmap-size, not size: no size event. */
    g_assert_cmpint(vmemmap(d, 0, 2 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    g_assert_cmpint(vmemmap(d, 128 * MiB, 2 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    assert_reported(d, 128 * MiB, 4 * MiB);
    assert_no_size_event(d->qts);

    /* Unplugging a block that holds vmemmap drops that part only. */
    g_assert_cmpint(unplug(d, 128 * MiB, 2 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    assert_reported(d, 126 * MiB, 2 * MiB);
    /* ... unplugging one without leaves it alone. */
    g_assert_cmpint(unplug(d, 130 * MiB, 2 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    assert_reported(d, 124 * MiB, 2 * MiB);
    wait_size_event(d->qts, 124 * MiB);

    g_assert_cmpint(request(d, VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0), ==,
                    VIRTIO_MEM_RESP_ACK);
    assert_reported(d, 0, 0);
    dev_stop(d);
}

/* Big Block Mode: one device block spans two Linux memory blocks. */
static void test_bbm(void)
{
    Dev *d = dev_start("x-vmemmap-accounting=on,block-size=256M", true);

    set_requested(d, 512 * MiB);
    g_assert_cmpint(plug(d, 0, 256 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    g_assert_cmpint(vmemmap(d, 0, 2 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    g_assert_cmpint(vmemmap(d, 128 * MiB, 2 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    /* A partial page run inside the block is fine too. */
    g_assert_cmpint(vmemmap(d, 64 * MiB, 36 * KiB), ==, VIRTIO_MEM_RESP_ACK);
    assert_reported(d, 256 * MiB, 4 * MiB + 36 * KiB);

    g_assert_cmpint(unplug(d, 0, 256 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    assert_reported(d, 0, 0);
    dev_stop(d);
}

/* Every malformed request gets ERROR, changes nothing, breaks nothing. */
static void test_bad_requests(void)
{
    Dev *d = dev_start("x-vmemmap-accounting=on,block-size=2M", true);
    uint64_t usable_region;

    g_assert_cmpuint(qom_get_u64(d->qts, "requested-size"), ==, 0);
    set_requested(d, 64 * MiB);
    g_assert_cmpint(plug(d, 0, 8 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    g_assert_cmpint(vmemmap(d, 0, 2 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    usable_region = qvirtio_config_readq(d->vdev,
        offsetof(struct virtio_mem_config, usable_region_size));

    /* zero length */
    g_assert_cmpint(vmemmap(d, 4 * MiB, 0), ==, VIRTIO_MEM_RESP_ERROR);
    /* unaligned address, unaligned size, a start not at 2 MiB */
    g_assert_cmpint(vmemmap(d, 4 * MiB + 512, 4 * KiB), ==,
                    VIRTIO_MEM_RESP_ERROR);
    g_assert_cmpint(vmemmap(d, 4 * MiB, 4 * KiB + 1), ==,
                    VIRTIO_MEM_RESP_ERROR);
    g_assert_cmpint(vmemmap(d, 4 * MiB + 4 * KiB, 4 * KiB), ==,
                    VIRTIO_MEM_RESP_ERROR);
    g_assert_cmpint(vmemmap(d, 1 * MiB, 2 * MiB), ==, VIRTIO_MEM_RESP_ERROR);
    /* overflowing */
    g_assert_cmpint(request(d, VIRTIO_MEM_REQ_VMEMMAP, UINT64_MAX - 2 * MiB + 1,
                            4 * MiB), ==, VIRTIO_MEM_RESP_ERROR);
    /* below the device, beyond the usable region, straddling its end */
    g_assert_cmpint(request(d, VIRTIO_MEM_REQ_VMEMMAP, d->addr - 2 * MiB,
                            4 * MiB), ==, VIRTIO_MEM_RESP_ERROR);
    g_assert_cmpint(vmemmap(d, usable_region, 4 * KiB), ==,
                    VIRTIO_MEM_RESP_ERROR);
    g_assert_cmpint(vmemmap(d, usable_region - 2 * MiB, 4 * MiB), ==,
                    VIRTIO_MEM_RESP_ERROR);
    /* unplugged memory, and a range half plugged */
    g_assert_cmpint(vmemmap(d, 16 * MiB, 4 * KiB), ==, VIRTIO_MEM_RESP_ERROR);
    g_assert_cmpint(vmemmap(d, 6 * MiB, 4 * MiB), ==, VIRTIO_MEM_RESP_ERROR);
    /* overlapping what is marked, exactly or partly */
    g_assert_cmpint(vmemmap(d, 0, 2 * MiB), ==, VIRTIO_MEM_RESP_ERROR);
    g_assert_cmpint(vmemmap(d, 0, 4 * MiB), ==, VIRTIO_MEM_RESP_ERROR);

    /* No partial update, and the device still works. */
    assert_reported(d, 8 * MiB, 2 * MiB);
    g_assert_false(d->vdev->bus->get_status(d->vdev) &
                   VIRTIO_CONFIG_S_NEEDS_RESET);
    g_assert_cmpint(vmemmap(d, 2 * MiB, 2 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    g_assert_cmpint(plug(d, 8 * MiB, 2 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    assert_reported(d, 10 * MiB, 4 * MiB);
    dev_stop(d);
}

static void test_reset(void)
{
    Dev *d = dev_start("x-vmemmap-accounting=on,block-size=2M", true);

    set_requested(d, 64 * MiB);
    g_assert_cmpint(plug(d, 0, 16 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    g_assert_cmpint(vmemmap(d, 0, 2 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    assert_reported(d, 16 * MiB, 2 * MiB);
    /* A device reset keeps the plugged state, and so the marks ... */
    qvirtio_reset(d->vdev);
    assert_reported(d, 16 * MiB, 2 * MiB);
    /* ... for a driver that negotiates the feature again, */
    dev_negotiate(d, true);
    assert_reported(d, 16 * MiB, 2 * MiB);
    /*
     * but a driver that does not (kexec or kdump into a stock kernel)
     * does not use memory as memmap: the marks go, the plugged state
     * stays.  Nothing is sent to a migration destination any more.
     */
    dev_negotiate(d, false);
    assert_reported(d, 16 * MiB, 0);
    g_assert_cmpint(request(d, VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0), ==,
                    VIRTIO_MEM_RESP_ACK);
    dev_negotiate(d, true);
    g_assert_cmpint(plug(d, 0, 16 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    g_assert_cmpint(vmemmap(d, 0, 2 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    assert_reported(d, 16 * MiB, 2 * MiB);
    /* A system reset unplugs everything. */
    qtest_qmp_assert_success(d->qts, "{ 'execute': 'system_reset' }");
    qtest_qmp_eventwait(d->qts, "RESET");
    assert_reported(d, 0, 0);
    dev_stop(d);
}

/*
 * Migrate @src to a new QEMU whose device has @dst_opts.  Returns the
 * destination, running, if @succeed; otherwise checks that the destination
 * failed the load and exited, and returns NULL.
 */
static QTestState *migrate_to(Dev *src, const char *bin_var,
                              const char *dst_opts, bool succeed)
{
    g_autofree char *sock = g_strdup_printf("%s/vmemmap-mig-%d.sock",
                                            g_get_tmp_dir(), getpid());
    g_autofree char *uri = g_strdup_printf("unix:%s", sock);
    g_autofree char *incoming = g_strdup_printf("-incoming %s", uri);
    QTestState *dst = qemu_start(bin_var, dst_opts, incoming);
    QDict *rsp;

    if (!succeed) {
        qtest_set_expected_status(dst, EXIT_FAILURE);
    }
    rsp = qtest_qmp(src->qts, "{ 'execute': 'migrate', 'arguments': "
                    "{ 'uri': %s } }", uri);
    g_assert_true(qdict_haskey(rsp, "return"));
    qobject_unref(rsp);
    if (succeed) {
        qtest_qmp_eventwait(dst, "RESUME");
    } else {
        qtest_wait_qemu(dst);
        qtest_quit(dst);
        dst = NULL;
    }
    unlink(sock);
    return dst;
}

/* Migrate a device with marked ranges to a second QEMU and compare. */
static void migrate_one(const char *opts)
{
    Dev *src = dev_start(opts, true);
    QTestState *dst;

    set_requested(src, 512 * MiB);
    g_assert_cmpint(plug(src, 0, 256 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    g_assert_cmpint(vmemmap(src, 0, 2 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    g_assert_cmpint(vmemmap(src, 128 * MiB, 2 * MiB), ==,
                    VIRTIO_MEM_RESP_ACK);

    dst = migrate_to(src, NULL, opts, true);
    g_assert_cmpuint(qom_get_u64(dst, "size"), ==, 256 * MiB);
    g_assert_cmpuint(qom_get_u64(dst, "x-vmemmap-size"), ==, 4 * MiB);
    qtest_quit(dst);
    dev_stop(src);
}

static void test_migration(void)
{
    migrate_one("x-vmemmap-accounting=on,block-size=2M,x-early-migration=on");
    migrate_one("x-vmemmap-accounting=on,block-size=2M,x-early-migration=off");
    migrate_one("x-vmemmap-accounting=on,block-size=256M");
}

/*
 * The feature next to the device's other options: plug, mark, unplug a
 * marked block, mark again, and migrate, for each option turned on.
 */
static void test_upstream_options(void)
{
    static const char *const extra[] = {
        "prealloc=on", "dynamic-memslots=on", "unplugged-inaccessible=on",
        "x-early-migration=off",
    };
    size_t i;

    for (i = 0; i < ARRAY_SIZE(extra); i++) {
        g_autofree char *opts =
            g_strdup_printf("x-vmemmap-accounting=on,block-size=2M,%s",
                            extra[i]);
        Dev *src = dev_start(opts, true);
        QTestState *dst;

        g_test_message("with %s", extra[i]);
        set_requested(src, 64 * MiB);
        g_assert_cmpint(plug(src, 0, 16 * MiB), ==, VIRTIO_MEM_RESP_ACK);
        g_assert_cmpint(vmemmap(src, 0, 2 * MiB), ==, VIRTIO_MEM_RESP_ACK);
        g_assert_cmpint(unplug(src, 0, 2 * MiB), ==, VIRTIO_MEM_RESP_ACK);
        assert_reported(src, 14 * MiB, 0);
        g_assert_cmpint(vmemmap(src, 2 * MiB, 2 * MiB), ==,
                        VIRTIO_MEM_RESP_ACK);
        assert_reported(src, 14 * MiB, 2 * MiB);

        dst = migrate_to(src, NULL, opts, true);
        g_assert_cmpuint(qom_get_u64(dst, "size"), ==, 14 * MiB);
        g_assert_cmpuint(qom_get_u64(dst, "x-vmemmap-size"), ==, 2 * MiB);
        qtest_quit(dst);
        dev_stop(src);
    }
}

/* Poll the source's migration status until it is @status. */
static void wait_migration_status(QTestState *qts, const char *status)
{
    gint64 deadline = g_get_monotonic_time() + TIMEOUT_US;

    for (;;) {
        QDict *rsp = qtest_qmp(qts, "{ 'execute': 'query-migrate' }");
        QDict *ret = qdict_get_qdict(rsp, "return");
        bool done = qdict_haskey(ret, "status") &&
                    !strcmp(qdict_get_str(ret, "status"), status);

        qobject_unref(rsp);
        if (done) {
            return;
        }
        g_assert_cmpint(g_get_monotonic_time(), <, deadline);
        g_usleep(10 * 1000);
    }
}

/*
 * Start a migration of @src that cannot finish within the test: at 4 KiB/s
 * its RAM would take days.  A destination that fails therefore failed on
 * what the source sends before RAM (the early virtio-mem section).
 */
static void migrate_throttled(Dev *src, const char *uri)
{
    qtest_qmp_assert_success(src->qts, "{ 'execute': 'migrate-set-parameters',"
                             " 'arguments': { 'max-bandwidth': 4096 } }");
    qtest_qmp_assert_success(src->qts, "{ 'execute': 'migrate', 'arguments':"
                             " { 'uri': %s } }", uri);
}

/*
 * Migrate @src to a QEMU (@bin_var, as for qemu_start()) whose device has
 * @dst_opts, and check that the destination refuses the stream before any
 * RAM arrives, and that the source keeps its state and keeps running.
 */
static void migrate_refused(Dev *src, const char *bin_var,
                            const char *dst_opts)
{
    g_autofree char *sock = g_strdup_printf("%s/vmemmap-mig-%d.sock",
                                            g_get_tmp_dir(), getpid());
    g_autofree char *uri = g_strdup_printf("unix:%s", sock);
    g_autofree char *incoming = g_strdup_printf("-incoming %s", uri);
    QTestState *dst = qemu_start(bin_var, dst_opts, incoming);
    const uint64_t size = qom_get_u64(src->qts, "size");
    const uint64_t vmemmap_size = qom_get_u64(src->qts, "x-vmemmap-size");

    qtest_set_expected_status(dst, EXIT_FAILURE);
    migrate_throttled(src, uri);
    qtest_wait_qemu(dst);
    qtest_quit(dst);
    wait_migration_status(src->qts, "failed");
    unlink(sock);

    g_assert_cmpuint(qom_get_u64(src->qts, "size"), ==, size);
    g_assert_cmpuint(qom_get_u64(src->qts, "x-vmemmap-size"), ==, vmemmap_size);
    /* Migration is over: the device takes requests again. */
    g_assert_cmpint(plug(src, size, src->block_size), ==, VIRTIO_MEM_RESP_ACK);
}

/*
 * A destination without vmemmap accounting refuses a guest that uses it,
 * before RAM is sent: with marks, and with the feature negotiated but
 * nothing marked yet.
 */
static void test_migration_to_off(void)
{
    Dev *src = dev_start("x-vmemmap-accounting=on,block-size=2M", true);

    set_requested(src, 64 * MiB);
    g_assert_cmpint(plug(src, 0, 4 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    migrate_refused(src, NULL, "x-vmemmap-accounting=off,block-size=2M");
    g_assert_cmpint(vmemmap(src, 0, 2 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    migrate_refused(src, NULL, "x-vmemmap-accounting=off,block-size=2M");
    dev_stop(src);

    /* Without the early section the device state is all there is. */
    src = dev_start("x-vmemmap-accounting=on,block-size=2M,"
                    "x-early-migration=off", true);
    set_requested(src, 64 * MiB);
    g_assert_cmpint(plug(src, 0, 4 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    g_assert_cmpint(vmemmap(src, 0, 2 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    g_assert_null(migrate_to(src, NULL, "x-vmemmap-accounting=off,"
                             "block-size=2M,x-early-migration=off", false));
    dev_stop(src);
}

/*
 * A driver without the feature takes over while a migration runs, after
 * the early section carried the marks (and, with @again, one with the
 * feature after it: two kexecs): both sides end without marks.
 */
static void migrate_renegotiate(bool again)
{
    g_autofree char *sock = g_strdup_printf("%s/vmemmap-mig-%d.sock",
                                            g_get_tmp_dir(), getpid());
    g_autofree char *uri = g_strdup_printf("unix:%s", sock);
    g_autofree char *incoming = g_strdup_printf("-incoming %s", uri);
    const char *opts = "x-vmemmap-accounting=on,block-size=2M";
    Dev *src = dev_start(opts, true);
    QTestState *dst = qemu_start(NULL, opts, incoming);

    set_requested(src, 64 * MiB);
    g_assert_cmpint(plug(src, 0, 4 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    g_assert_cmpint(vmemmap(src, 0, 2 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    migrate_throttled(src, uri);
    wait_migration_status(src->qts, "active");

    dev_negotiate(src, false);
    assert_reported(src, 4 * MiB, 0);
    if (again) {
        dev_negotiate(src, true);
        assert_reported(src, 4 * MiB, 0);
    }
    qtest_qmp_assert_success(src->qts, "{ 'execute': 'migrate-set-parameters',"
                             " 'arguments': { 'max-bandwidth': %" PRIu64
                             " } }", (uint64_t)10 * GiB);
    qtest_qmp_eventwait(dst, "RESUME");
    g_assert_cmpuint(qom_get_u64(dst, "size"), ==, 4 * MiB);
    g_assert_cmpuint(qom_get_u64(dst, "x-vmemmap-size"), ==, 0);
    qtest_quit(dst);
    unlink(sock);
    dev_stop(src);
}

static void test_migration_renegotiate(void)
{
    migrate_renegotiate(false);
    migrate_renegotiate(true);
}

/*
 * An invalid request is an ERROR while migration runs too; a valid one
 * is BUSY then, and is accepted once migration has ended.
 */
static void test_busy(void)
{
    Dev *d = dev_start("x-vmemmap-accounting=on,block-size=2M", true);

    set_requested(d, 64 * MiB);
    g_assert_cmpint(plug(d, 0, 4 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    migrate_throttled(d, "exec:cat > /dev/null");
    wait_migration_status(d->qts, "active");

    g_assert_cmpint(vmemmap(d, 8 * MiB, 4 * KiB), ==, VIRTIO_MEM_RESP_ERROR);
    g_assert_cmpint(vmemmap(d, 0, 4 * KiB + 1), ==, VIRTIO_MEM_RESP_ERROR);
    g_assert_cmpint(vmemmap(d, 0, 2 * MiB), ==, VIRTIO_MEM_RESP_BUSY);
    g_assert_cmpint(plug(d, 4 * MiB, 2 * MiB), ==, VIRTIO_MEM_RESP_BUSY);
    assert_reported(d, 4 * MiB, 0);

    qtest_qmp_assert_success(d->qts, "{ 'execute': 'migrate_cancel' }");
    wait_migration_status(d->qts, "cancelled");
    g_assert_cmpint(vmemmap(d, 0, 2 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    assert_reported(d, 4 * MiB, 2 * MiB);
    dev_stop(d);
}

/* Save the state of @qts to the file @path; wait until it is complete. */
static void save_to_file(QTestState *qts, const char *path);
static GByteArray *device_sections(const char *path, GString *names);
static void wait_running(QTestState *qts);

/* Plug all of @d's @region with one request. */
static void plug_all(Dev *d, uint64_t region)
{
    struct virtio_mem_req req = { .type = cpu_to_le16(VIRTIO_MEM_REQ_PLUG) };
    uint16_t type;

    set_requested(d, region);
    req.u.plug.addr = cpu_to_le64(d->addr);
    req.u.plug.nb_blocks = cpu_to_le16(region / d->block_size);
    request_batch(d, &req, 1, &type);
    g_assert_cmpint(type, ==, VIRTIO_MEM_RESP_ACK);
}

/* Bytes of @path's virtio-mem sections (their names go to @names). */
static uint64_t device_bytes(const char *path, GString *names)
{
    g_autoptr(GByteArray) sections = device_sections(path, names);

    return sections->len;
}

/*
 * The hostile pattern: a guest marks every other 4 KiB page of a 4 GiB
 * region (all of it plugged), in descending order (each mark lands
 * before all others).  Only the marks that start at 2 MiB are taken,
 * the rest are ERROR (docs/specs/virtio-mem-vmemmap.rst).  The device
 * state the migration stream carries must stay within 8 MiB per TiB of
 * region (32 KiB here) whatever the guest does: measured as the growth
 * of the device's sections of a stream saved to a file over a device
 * that negotiated the feature and marked nothing, and loaded back.
 * QEMU's RSS and the time per request are logged for the benchmark, not
 * asserted.
 */
#define WORST_REGION    (4 * GiB)
#define WORST_BOUND     (8 * MiB / (1024 * GiB / WORST_REGION))

static void test_worst_pattern(void)
{
    const char *opts = "x-vmemmap-accounting=on,block-size=2M";
    g_autofree char *dir = g_dir_make_tmp("vmemmap-worst-XXXXXX", NULL);
    g_autofree char *base_path = g_build_filename(dir, "unmarked", NULL);
    g_autofree char *path = g_build_filename(dir, "marked", NULL);
    g_autofree char *incoming = g_strdup_printf("-incoming file:%s", path);
    g_autoptr(GString) names = g_string_new(NULL);
    Dev *d = dev_start_sized(NULL, WORST_REGION, opts, true);
    const int batch = d->vq->size / 2;
    const uint64_t marks = WORST_REGION / (8 * KiB);
    g_autofree struct virtio_mem_req *reqs =
        g_new0(struct virtio_mem_req, batch);
    g_autofree uint16_t *types = g_new0(uint16_t, batch);
    uint64_t rss_before, done = 0, acked = 0, base_bytes, bytes, file_bytes;
    int64_t ns = 0;
    struct stat st;
    QTestState *dst;
    int i;

    g_assert_nonnull(dir);
    /* The same device with nothing marked: what the state adds to. */
    plug_all(d, WORST_REGION);
    save_to_file(d->qts, base_path);
    base_bytes = device_bytes(base_path, names);
    dev_stop(d);

    d = dev_start_sized(NULL, WORST_REGION, opts, true);
    plug_all(d, WORST_REGION);
    rss_before = qemu_rss(d->qts);
    while (done < marks) {
        const int n = MIN(batch, marks - done);

        for (i = 0; i < n; i++) {
            const uint64_t off = WORST_REGION - (done + i + 1) * 8 * KiB;

            reqs[i].type = cpu_to_le16(VIRTIO_MEM_REQ_VMEMMAP);
            reqs[i].u.vmemmap_range.addr = cpu_to_le64(d->addr + off);
            reqs[i].u.vmemmap_range.size = cpu_to_le64(4 * KiB);
        }
        ns += request_batch(d, reqs, n, types);
        for (i = 0; i < n; i++) {
            const uint64_t off = WORST_REGION - (done + i + 1) * 8 * KiB;

            g_assert_cmpint(types[i], ==, QEMU_IS_ALIGNED(off, 2 * MiB) ?
                            VIRTIO_MEM_RESP_ACK : VIRTIO_MEM_RESP_ERROR);
            acked += types[i] == VIRTIO_MEM_RESP_ACK;
        }
        done += n;
    }
    g_assert_cmpuint(acked, ==, WORST_REGION / (2 * MiB));
    g_assert_cmpuint(qom_get_u64(d->qts, "x-vmemmap-size"), ==, acked * 4 * KiB);
    g_test_message("hostile pattern: %" PRIu64 " marks, %" PRIu64 " taken;"
                   " QEMU RSS %+" PRId64 " KiB; %.1f us per request",
                   marks, acked,
                   ((int64_t)qemu_rss(d->qts) - (int64_t)rss_before) /
                   (int64_t)KiB, ns / 1000.0 / marks);

    save_to_file(d->qts, path);
    g_string_truncate(names, 0);
    bytes = device_bytes(path, names);
    g_assert_cmpint(stat(path, &st), ==, 0);
    file_bytes = st.st_size;
    g_test_message("hostile pattern: device sections%s: %" PRIu64 " bytes,"
                   " %" PRIu64 " without marks: the state adds %" PRIu64
                   " bytes (%" PRIu64 " KiB per TiB of region; bound %"
                   PRIu64 " bytes); whole stream %" PRIu64 " bytes",
                   names->str, bytes, base_bytes, bytes - base_bytes,
                   (bytes - base_bytes) * (TiB / WORST_REGION) / KiB,
                   (uint64_t)WORST_BOUND, file_bytes);
    g_assert_cmpuint(bytes, >, base_bytes);
    g_assert_cmpuint(bytes - base_bytes, <=, WORST_BOUND);

    /*
     * The vmdesc describes the state: scripts/analyze-migration.py (run
     * from the build directory, as migration-test does; meson sets
     * PYTHON) reads the stream and shows the state's length.
     */
    if (g_getenv("PYTHON")) {
        const char *argv[] = {
            g_getenv("PYTHON"), "scripts/analyze-migration.py", "-f", path,
            NULL
        };
        g_autofree char *out = NULL, *err = NULL;
        int status;

        g_assert_true(g_spawn_sync(NULL, (char **)argv, NULL, 0, NULL, NULL,
                                   &out, &err, &status, NULL));
        if (!WIFEXITED(status) || WEXITSTATUS(status)) {
            g_test_message("analyze-migration.py: %s", err);
        }
        g_assert_true(WIFEXITED(status) && !WEXITSTATUS(status));
        g_assert_nonnull(strstr(out, "\"mig_len\": \"0x00001000\""));
    }

    /* ... and it is the whole state: a destination gets every mark. */
    dst = qemu_start_sized(NULL, WORST_REGION, opts, incoming);
    wait_running(dst);
    g_assert_cmpuint(qom_get_u64(dst, "size"), ==, WORST_REGION);
    g_assert_cmpuint(qom_get_u64(dst, "x-vmemmap-size"), ==, acked * 4 * KiB);
    qtest_quit(dst);
    dev_stop(d);
    unlink(base_path);
    unlink(path);
    rmdir(dir);
}

/* The footprint entry of vm0; caller unrefs. */
static QDict *query_footprint(QTestState *qts)
{
    QDict *rsp = qtest_qmp(qts, "{ 'execute': 'query-virtio-mem-footprint' }");
    QList *list = qdict_get_qlist(rsp, "return");
    QDict *fp;

    g_assert_cmpint(qlist_size(list), ==, 1);
    fp = qobject_to(QDict, qlist_peek(list));
    g_assert_cmpstr(qdict_get_str(fp, "id"), ==, "vm0");
    qobject_ref(fp);
    qobject_unref(rsp);
    return fp;
}

static void assert_footprint(Dev *d, uint64_t plugged_resident,
                             uint64_t unplugged_resident)
{
    QDict *fp = query_footprint(d->qts);

    g_assert_cmpuint(qdict_get_int(fp, "size"), ==,
                     qom_get_u64(d->qts, "size"));
    g_assert_cmpuint(qdict_get_int(fp, "plugged-resident"), ==,
                     plugged_resident);
    g_assert_cmpuint(qdict_get_int(fp, "unplugged-resident"), ==,
                     unplugged_resident);
    qobject_unref(fp);
}

/* Touch @size bytes at @offset of the device's memory, as a guest would. */
static void touch(Dev *d, uint64_t offset, uint64_t size)
{
    qtest_memset(d->qts, d->addr + offset, 0x5a, size);
}

/*
 * The host measures what is resident: in plugged blocks what the guest
 * wrote, in unplugged blocks nothing, unless a guest writes to memory it
 * does not have; that is counted, and a scrub discards it again.
 */
static void test_footprint(void)
{
    Dev *d = dev_start("x-vmemmap-accounting=on,block-size=2M", true);
    g_autofree char *hmp = qtest_hmp(d->qts, "info virtio-mem-footprint");
    QDict *rsp;

    /*
     * QMP only: an HMP command waits for its end with the BQL held, so
     * it could not scan off the BQL as the QMP command does.
     */
    g_assert_nonnull(strstr(hmp, "unknown command"));
    set_requested(d, 64 * MiB);
    assert_footprint(d, 0, 0);
    g_assert_cmpint(plug(d, 0, 8 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    touch(d, 0, 6 * MiB);
    assert_footprint(d, 6 * MiB, 0);

    /* Unplug discards: nothing stays resident. */
    g_assert_cmpint(unplug(d, 4 * MiB, 4 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    assert_footprint(d, 4 * MiB, 0);

    /*
     * A misbehaving guest writes to unplugged memory (whole blocks: the
     * host may back them with huge pages, which a smaller write would
     * make resident whole).
     */
    touch(d, 4 * MiB, 2 * MiB);
    touch(d, 32 * MiB, 2 * MiB);
    assert_footprint(d, 4 * MiB, 4 * MiB);
    rsp = qtest_qmp(d->qts, "{ 'execute': 'x-virtio-mem-scrub', 'arguments':"
                    " { 'qom-path': '/machine/peripheral/vm0' } }");
    g_assert_cmpuint(qdict_get_int(qdict_get_qdict(rsp, "return"),
                                   "discarded"), ==, 4 * MiB);
    qobject_unref(rsp);
    assert_footprint(d, 4 * MiB, 0);

    /* Errors name what is wrong. */
    rsp = qtest_qmp(d->qts, "{ 'execute': 'x-virtio-mem-scrub', 'arguments':"
                    " { 'qom-path': '/machine/nothing' } }");
    g_assert_cmpstr(qdict_get_str(qdict_get_qdict(rsp, "error"), "desc"), ==,
                    "no object at '/machine/nothing'");
    qobject_unref(rsp);
    rsp = qtest_qmp(d->qts, "{ 'execute': 'x-virtio-mem-scrub', 'arguments':"
                    " { 'qom-path': '/machine' } }");
    g_assert_cmpstr(qdict_get_str(qdict_get_qdict(rsp, "error"), "desc"), ==,
                    "'/machine' is not a virtio-mem device");
    qobject_unref(rsp);
    dev_stop(d);
}

/*
 * The same on memory that is a shared mapping of a shmem file, where the
 * scan skips the file's holes (SEEK_DATA) before it asks mincore().  (On
 * a disk file system, read-ahead around each write fault leaves more of
 * the file in the page cache than was written: resident, but not a
 * figure a test can predict.)
 */
static void test_footprint_memfd(void)
{
    mem_backend = "memory-backend-memfd";
    test_footprint();
    mem_backend = "memory-backend-ram";
}

static void test_footprint_file(void)
{
    g_autofree char *dir = g_strdup("/dev/shm/vmemmap-fp-XXXXXX");
    g_autofree char *path = NULL;
    g_autofree char *opts = NULL;

    g_assert_nonnull(g_mkdtemp(dir));
    path = g_strdup_printf("%s/mem", dir);
    opts = g_strdup_printf("memory-backend-file,share=on,mem-path=%s", path);
    mem_backend = opts;
    test_footprint();
    mem_backend = "memory-backend-ram";
    unlink(path);
    rmdir(dir);
}

/* Scrub vm0 and expect an error whose text contains @what. */
static void assert_scrub_refused(QTestState *qts, const char *what)
{
    QDict *rsp = qtest_qmp(qts, "{ 'execute': 'x-virtio-mem-scrub',"
                           " 'arguments': { 'qom-path': 'vm0' } }");
    const char *desc;

    g_assert_true(qdict_haskey(rsp, "error"));
    desc = qdict_get_str(qdict_get_qdict(rsp, "error"), "desc");
    g_test_message("scrub refused: %s", desc);
    g_assert_nonnull(strstr(desc, what));
    qobject_unref(rsp);
}

static const char *run_state(QTestState *qts)
{
    static char state[32];
    QDict *rsp = qtest_qmp(qts, "{ 'execute': 'query-status' }");

    g_strlcpy(state, qdict_get_str(qdict_get_qdict(rsp, "return"), "status"),
              sizeof(state));
    qobject_unref(rsp);
    return state;
}

/*
 * Scrub discards what this QEMU believes unplugged: it must refuse while
 * that belief may be wrong or another QEMU may use the memory.  Each
 * case writes to unplugged memory first, so a scrub that went ahead
 * would have something to discard.
 */
static void test_scrub_refused(void)
{
    const char *opts = "x-vmemmap-accounting=on,block-size=2M";
    g_autofree char *dir = g_dir_make_tmp("vmemmap-scrub-XXXXXX", NULL);
    g_autofree char *path = g_build_filename(dir, "state", NULL);
    g_autofree char *mem = g_build_filename(dir, "mem", NULL);
    g_autofree char *args = NULL;
    QTestState *qts;
    QDict *fp;
    Dev *d;

    /* inmigrate: a destination waiting for its stream (-incoming defer) */
    qts = qemu_start(NULL, opts, "-incoming defer");
    g_assert_cmpstr(run_state(qts), ==, "inmigrate");
    assert_scrub_refused(qts, "'inmigrate'");
    qtest_quit(qts);

    /* finish-migrate: a source stopped for switchover */
    d = dev_start(opts, true);
    set_requested(d, 64 * MiB);
    g_assert_cmpint(plug(d, 0, 4 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    touch(d, 32 * MiB, 2 * MiB);
    qtest_qmp_assert_success(d->qts, "{ 'execute': 'migrate-set-capabilities',"
                             " 'arguments': { 'capabilities': [ {"
                             " 'capability': 'pause-before-switchover',"
                             " 'state': true } ] } }");
    qtest_qmp_assert_success(d->qts, "{ 'execute': 'migrate', 'arguments':"
                             " { 'uri': 'exec:cat > /dev/null' } }");
    wait_migration_status(d->qts, "pre-switchover");
    g_assert_cmpstr(run_state(d->qts), ==, "finish-migrate");
    assert_scrub_refused(d->qts, "'finish-migrate'");
    qtest_qmp_assert_success(d->qts, "{ 'execute': 'migrate-continue',"
                             " 'arguments': { 'state': 'pre-switchover' } }");
    wait_migration_status(d->qts, "completed");

    /* postmigrate: the source after its migration completed */
    g_assert_cmpstr(run_state(d->qts), ==, "postmigrate");
    assert_scrub_refused(d->qts, "'postmigrate'");
    fp = query_footprint(d->qts);
    g_assert_cmpuint(qdict_get_int(fp, "unplugged-resident"), ==, 2 * MiB);
    qobject_unref(fp);
    dev_stop(d);

    /*
     * Memory that migration does not send because the destination maps
     * it too: a shared file with x-ignore-shared, any RAM with
     * cpr-transfer.  Refused before any migration starts.
     */
    args = g_strdup_printf("-machine pc -m 128M,maxmem=%" PRIu64
                           " -object memory-backend-file,id=mem0,size=%"
                           PRIu64 ",mem-path=%s,share=on"
                           " -device virtio-mem-pci,id=vm0,memdev=mem0,%s",
                           128 * MiB + REGION_SIZE, REGION_SIZE, mem, opts);
    qts = qtest_init(args);
    qtest_qmp_assert_success(qts, "{ 'execute': 'migrate-set-capabilities',"
                             " 'arguments': { 'capabilities': [ {"
                             " 'capability': 'x-ignore-shared',"
                             " 'state': true } ] } }");
    assert_scrub_refused(qts, "x-ignore-shared or cpr-transfer");
    qtest_quit(qts);
    unlink(mem);

    d = dev_start(opts, true);
    qtest_qmp_assert_success(d->qts, "{ 'execute': 'migrate-set-parameters',"
                             " 'arguments': { 'mode': 'cpr-transfer' } }");
    assert_scrub_refused(d->qts, "x-ignore-shared or cpr-transfer");
    /* Back to a normal migration mode, scrub works. */
    qtest_qmp_assert_success(d->qts, "{ 'execute': 'migrate-set-parameters',"
                             " 'arguments': { 'mode': 'normal' } }");
    qtest_qmp_assert_success(d->qts, "{ 'execute': 'x-virtio-mem-scrub',"
                             " 'arguments': { 'qom-path': 'vm0' } }");
    dev_stop(d);
    rmdir(dir);
}

/*
 * x-query-virtio-mem-state pages: 2048 plugged runs and 2048 marked runs
 * in an 8 GiB region come back in pages of at most 1024 runs per list,
 * nothing lost, nothing twice, each run whole or cut only at a page end.
 */
static void test_state_paging(void)
{
    const uint64_t region = 8 * GiB;
    Dev *d = dev_start_sized(NULL, region,
                             "x-vmemmap-accounting=on,block-size=2M", true);
    const int batch = d->vq->size / 2;
    const uint64_t runs = region / (4 * MiB);
    g_autofree struct virtio_mem_req *reqs =
        g_new0(struct virtio_mem_req, batch);
    g_autofree uint16_t *types = g_new0(uint16_t, batch);
    uint64_t done, start = 0, plugged = 0, marked = 0, pages = 0;
    int i;

    set_requested(d, region);
    /* Every other block plugged, and the first page of each marked. */
    for (done = 0; done < runs; done += batch / 2) {
        for (i = 0; i < batch; i += 2) {
            const uint64_t off = (done + i / 2) * 4 * MiB;

            reqs[i].type = cpu_to_le16(VIRTIO_MEM_REQ_PLUG);
            reqs[i].u.plug.addr = cpu_to_le64(d->addr + off);
            reqs[i].u.plug.nb_blocks = cpu_to_le16(1);
            reqs[i + 1].type = cpu_to_le16(VIRTIO_MEM_REQ_VMEMMAP);
            reqs[i + 1].u.vmemmap_range.addr = cpu_to_le64(d->addr + off);
            reqs[i + 1].u.vmemmap_range.size = cpu_to_le64(4 * KiB);
        }
        request_batch(d, reqs, batch, types);
        for (i = 0; i < batch; i++) {
            g_assert_cmpint(types[i], ==, VIRTIO_MEM_RESP_ACK);
        }
    }
    g_assert_cmpuint(qom_get_u64(d->qts, "x-vmemmap-size"), ==, runs * 4 * KiB);

    for (;;) {
        QDict *rsp = qtest_qmp(d->qts, "{ 'execute':"
                               " 'x-query-virtio-mem-state',"
                               " 'arguments': { 'qom-path': 'vm0',"
                               " 'start': %" PRIu64 " } }", start);
        QDict *st = qdict_get_qdict(rsp, "return");
        QList *pl = qdict_get_qlist(st, "plugged");
        QList *vl = qdict_get_qlist(st, "vmemmap");
        QListEntry *e;

        g_assert_cmpint(qlist_size(pl), <=, 1024);
        g_assert_cmpint(qlist_size(vl), <=, 1024);
        QLIST_FOREACH_ENTRY(pl, e) {
            QDict *r = qobject_to(QDict, qlist_entry_obj(e));

            g_assert_cmpuint(qdict_get_int(r, "offset"), ==, plugged * 4 * MiB);
            g_assert_cmpuint(qdict_get_int(r, "length"), ==, 2 * MiB);
            plugged++;
        }
        QLIST_FOREACH_ENTRY(vl, e) {
            QDict *r = qobject_to(QDict, qlist_entry_obj(e));

            g_assert_cmpuint(qdict_get_int(r, "offset"), ==, marked * 4 * MiB);
            g_assert_cmpuint(qdict_get_int(r, "length"), ==, 4 * KiB);
            marked++;
        }
        pages++;
        if (!qdict_haskey(st, "next")) {
            qobject_unref(rsp);
            break;
        }
        g_assert_cmpuint(qdict_get_int(st, "next"), >, start);
        start = qdict_get_int(st, "next");
        qobject_unref(rsp);
    }
    g_assert_cmpuint(plugged, ==, runs);
    g_assert_cmpuint(marked, ==, runs);
    g_assert_cmpuint(pages, >=, 2);
    dev_stop(d);
}

/*
 * A scan of a 1 TiB device: time and memory are bounded by the region
 * size, not by what the guest did.  Logged for the documentation.
 */
static void test_footprint_large(void)
{
    g_autofree char *args =
        g_strdup_printf("-machine pc -cpu qemu64,phys-bits=42"
                        " -m 128M,maxmem=%" PRIu64
                        " -object memory-backend-ram,id=mem0,size=%" PRIu64
                        ",reserve=off -device virtio-mem-pci,id=vm0,"
                        "memdev=mem0,x-vmemmap-accounting=on",
                        128 * MiB + 1024 * GiB, 1024 * GiB);
    QTestState *qts = qtest_init(args);
    uint64_t rss = qemu_rss(qts);
    gint64 t = g_get_monotonic_time();
    QDict *fp = query_footprint(qts);

    t = g_get_monotonic_time() - t;
    g_test_message("footprint of a 1 TiB device: %.1f ms, QEMU RSS %+"
                   PRId64 " KiB", t / 1000.0,
                   ((int64_t)qemu_rss(qts) - (int64_t)rss) / (int64_t)KiB);
    g_assert_cmpuint(qdict_get_int(fp, "region-size"), ==, 1024 * GiB);
    g_assert_cmpuint(qdict_get_int(fp, "unplugged-resident"), ==, 0);
    qobject_unref(fp);
    qtest_quit(qts);
}

/*
 * Measurement, not a test (registered only with VIRTIO_MEM_VMEMMAP_BENCH
 * set; scripts/bench-qemu-stall runs it): how long the main loop cannot
 * answer while a footprint query or a migration's setup runs, on a 1 TiB
 * device with 64 GiB plugged and VIRTIO_MEM_VMEMMAP_BENCH_POPULATE GiB of
 * it written (default 8), memfd- and file-backed.  A qtest readb is
 * answered by the main loop under the BQL, so the longest round trip of
 * back-to-back reads is the longest time the BQL was held; QMP requests
 * are answered one after the other, so another QMP command's latency is
 * logged too.
 */
#define BENCH_REGION    (1024 * GiB)
#define BENCH_PLUGGED   (64 * GiB)

/* Longest readb round trip over @us microseconds, in microseconds. */
static int64_t bench_max_stall(Dev *d, int64_t us)
{
    const int64_t end = g_get_monotonic_time() + us;
    int64_t max = 0, t, now;

    do {
        t = g_get_monotonic_time();
        qtest_readb(d->qts, d->addr);
        now = g_get_monotonic_time();
        max = MAX(max, now - t);
    } while (now < end);
    return max;
}

typedef struct BenchSampler {
    Dev *d;
    int64_t max;
    int stop;
} BenchSampler;

/* Back-to-back reads until told to stop: the longest round trip. */
static gpointer bench_sampler(gpointer opaque)
{
    BenchSampler *b = opaque;
    int64_t t, dt;

    while (!qatomic_read(&b->stop)) {
        t = g_get_monotonic_time();
        qtest_readb(b->d->qts, b->d->addr);
        dt = g_get_monotonic_time() - t;
        b->max = MAX(b->max, dt);
    }
    return NULL;
}

/*
 * Run the footprint query with query-status queued behind it, while a
 * thread samples the stall on the qtest socket (QMP and qtest are
 * separate sockets); return the query's latency (us).
 */
static int64_t bench_during(Dev *d, int64_t *stall_us, int64_t *other_us)
{
    BenchSampler b = { .d = d };
    int64_t t = g_get_monotonic_time(), done;
    GThread *thread;
    QDict *rsp;

    thread = g_thread_new("sampler", bench_sampler, &b);
    qtest_qmp_send(d->qts, "{ 'execute': 'query-virtio-mem-footprint' }");
    qtest_qmp_send(d->qts, "{ 'execute': 'query-status' }");
    rsp = qtest_qmp_receive(d->qts);
    done = g_get_monotonic_time() - t;
    g_assert_true(qdict_haskey(rsp, "return"));
    qobject_unref(rsp);
    rsp = qtest_qmp_receive(d->qts);
    *other_us = g_get_monotonic_time() - t;
    qobject_unref(rsp);
    qatomic_set(&b.stop, 1);
    g_thread_join(thread);
    *stall_us = b.max;
    return done;
}

/* Start a migration, sample for 2 s, cancel it; the longest stall. */
static int64_t bench_migration_start(Dev *d)
{
    int64_t stall;
    QDict *rsp;

    qtest_qmp_assert_success(d->qts, "{ 'execute': 'migrate-set-parameters',"
                             " 'arguments': { 'max-bandwidth': 4096 } }");
    qtest_qmp_send(d->qts, "{ 'execute': 'migrate', 'arguments':"
                   " { 'uri': 'exec:cat > /dev/null' } }");
    stall = bench_max_stall(d, 2 * 1000 * 1000);
    rsp = qtest_qmp_receive(d->qts);
    qobject_unref(rsp);
    qtest_qmp_assert_success(d->qts, "{ 'execute': 'migrate_cancel' }");
    wait_migration_status(d->qts, "cancelled");
    return stall;
}

static void bench_stall_one(const char *backend, uint64_t populate)
{
    g_autofree char *opts = g_strdup_printf("%s", backend);
    Dev *d;
    int64_t idle, t, stall, other;
    uint64_t off, i;
    const int batch = 64;
    g_autofree struct virtio_mem_req *reqs =
        g_new0(struct virtio_mem_req, batch);
    uint16_t types[64];

    mem_backend = opts;
    d = dev_start_sized(NULL, BENCH_REGION,
                        "x-vmemmap-accounting=on,block-size=2M", true);
    mem_backend = "memory-backend-ram";
    set_requested(d, BENCH_PLUGGED);
    g_assert_cmpint(plug(d, 0, BENCH_PLUGGED), ==, VIRTIO_MEM_RESP_ACK);
    for (off = 0; off < populate; off += 256 * MiB) {
        touch(d, off, 256 * MiB);
    }
    idle = bench_max_stall(d, 1000 * 1000);

    t = bench_during(d, &stall, &other);
    g_test_message("%s, %" PRIu64 " GiB written: idle stall %.1f ms;"
                   " QMP footprint %.1f ms, longest stall %.1f ms,"
                   " query-status behind it %.1f ms", backend,
                   populate / GiB, idle / 1e3, t / 1e3, stall / 1e3,
                   other / 1e3);

    g_test_message("%s: migration start, nothing marked: longest stall in"
                   " its first 2 s %.1f ms", backend,
                   bench_migration_start(d) / 1e3);
    /* One page marked in every 2 MiB plugged: the largest state. */
    for (off = 0; off < BENCH_PLUGGED; off += batch * 2 * MiB) {
        for (i = 0; i < batch; i++) {
            reqs[i].type = cpu_to_le16(VIRTIO_MEM_REQ_VMEMMAP);
            reqs[i].u.vmemmap_range.addr =
                cpu_to_le64(d->addr + off + i * 2 * MiB);
            reqs[i].u.vmemmap_range.size = cpu_to_le64(4 * KiB);
        }
        request_batch(d, reqs, batch, types);
    }
    g_assert_cmpuint(qom_get_u64(d->qts, "x-vmemmap-size"), ==,
                     BENCH_PLUGGED / (2 * MiB) * 4 * KiB);
    g_test_message("%s: migration start, every plugged unit marked:"
                   " longest stall in its first 2 s %.1f ms", backend,
                   bench_migration_start(d) / 1e3);
    dev_stop(d);
}

static void bench_stall(void)
{
    const char *pop = getenv("VIRTIO_MEM_VMEMMAP_BENCH_POPULATE");
    const uint64_t populate = (pop ? g_ascii_strtoull(pop, NULL, 10) : 8) *
                              GiB;
    g_autofree char *path = g_strdup_printf("%s/vmemmap-bench-%d",
                                            g_get_tmp_dir(), getpid());
    g_autofree char *file = g_strdup_printf("memory-backend-file,"
                                            "mem-path=%s,share=on", path);

    bench_stall_one("memory-backend-memfd", populate);
    bench_stall_one(file, populate);
    unlink(path);
}

/*
 * Compatibility with stock QEMU: STOCK_BINARY names a qemu-system-x86_64
 * built from the same base without this series.  With the property off
 * (or not given), the fork must be indistinguishable from it, to a driver
 * and in the migration stream.
 */
#define STOCK_BINARY "QTEST_QEMU_BINARY_STOCK"

static bool have_stock(void)
{
    if (!getenv(STOCK_BINARY)) {
        g_test_skip(STOCK_BINARY " is not set: it must name an unpatched "
                    "qemu-system-x86_64 of the same base");
        return false;
    }
    return true;
}

/*
 * With the property on but a driver that does not use the feature, the
 * fork migrates to stock QEMU; a guest that uses it is refused by stock
 * QEMU before RAM is sent (the subsection is unknown there).
 */
static void test_migration_to_stock(void)
{
    Dev *src;
    QTestState *dst;

    if (!have_stock()) {
        return;
    }
    src = dev_start("x-vmemmap-accounting=on,block-size=2M", false);
    set_requested(src, 64 * MiB);
    g_assert_cmpint(plug(src, 0, 4 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    dst = migrate_to(src, STOCK_BINARY, "block-size=2M", true);
    g_assert_cmpuint(qom_get_u64(dst, "size"), ==, 4 * MiB);
    qtest_quit(dst);
    dev_stop(src);

    src = dev_start("x-vmemmap-accounting=on,block-size=2M", true);
    set_requested(src, 64 * MiB);
    g_assert_cmpint(plug(src, 0, 4 * MiB), ==, VIRTIO_MEM_RESP_ACK);
    migrate_refused(src, STOCK_BINARY, "block-size=2M");
    dev_stop(src);
}

/* What a driver can observe, one line per observation. */
static void dump_config(Dev *d, GString *s)
{
    size_t i;

    g_string_append(s, "config");
    for (i = 0; i < sizeof(struct virtio_mem_config); i++) {
        g_string_append_printf(s, " %02x", qvirtio_config_readb(d->vdev, i));
    }
    g_string_append_c(s, '\n');
}

/*
 * Plugs, unplugs and state queries, good and bad, in device blocks, with
 * requested-size at COMPAT_REQUESTED blocks; the answers must be the same.
 */
#define COMPAT_REQUESTED 4
#define AT_REGION_END    UINT64_MAX

static const struct {
    uint16_t type;
    uint64_t first;
    uint16_t nb_blocks;
    bool unaligned;
} compat_script[] = {
    { VIRTIO_MEM_REQ_PLUG, 0, 2 },                 /* ACK */
    { VIRTIO_MEM_REQ_PLUG, 2, 4 },                 /* over requested: NACK */
    { VIRTIO_MEM_REQ_PLUG, 1, 1, true },           /* unaligned: ERROR */
    { VIRTIO_MEM_REQ_PLUG, AT_REGION_END, 1 },     /* outside: ERROR */
    { VIRTIO_MEM_REQ_PLUG, 0, 1 },                 /* plugged: ERROR */
    { VIRTIO_MEM_REQ_UNPLUG, 1, 1 },               /* ACK */
    { VIRTIO_MEM_REQ_UNPLUG, 1, 1 },               /* unplugged: ERROR */
    { VIRTIO_MEM_REQ_STATE, 0, 2 },                /* MIXED */
    { VIRTIO_MEM_REQ_STATE, 0, 1 },                /* PLUGGED */
    { VIRTIO_MEM_REQ_STATE, 1, 1 },                /* UNPLUGGED */
    { VIRTIO_MEM_REQ_UNPLUG_ALL, 0, 0 },           /* ACK */
    { VIRTIO_MEM_REQ_STATE, 0, 2 },                /* UNPLUGGED */
    { VIRTIO_MEM_REQ_PLUG, 2, 1 },                 /* ACK */
};

static void run_script(Dev *d, GString *s)
{
    size_t i;

    set_requested(d, COMPAT_REQUESTED * d->block_size);
    for (i = 0; i < ARRAY_SIZE(compat_script); i++) {
        struct virtio_mem_resp resp;
        uint64_t offset = compat_script[i].first == AT_REGION_END ?
                          REGION_SIZE : compat_script[i].first * d->block_size;
        uint16_t nb = compat_script[i].nb_blocks;
        int type;

        if (compat_script[i].unaligned) {
            offset += d->block_size / 2;
        }
        type = request_resp(d, compat_script[i].type, d->addr + offset, nb,
                            &resp);
        g_string_append_printf(s, "request %u at %" PRIu64 " x%u: %d",
                               compat_script[i].type, offset, nb, type);
        if (compat_script[i].type == VIRTIO_MEM_REQ_STATE) {
            g_string_append_printf(s, " state %u",
                                   le16_to_cpu(resp.u.state.state));
        }
        g_string_append_c(s, '\n');
    }
}

/*
 * Everything the binary named by @bin_var shows a driver (and management)
 * through a device with @opts: features, config space, the answers to
 * compat_script, query-memory-devices, HMP, and what an unknown request
 * (the vmemmap request type, not negotiated) does.
 */
static char *guest_view(const char *bin_var, const char *opts)
{
    Dev *d = dev_start_on(bin_var, opts, false);
    GString *s = g_string_new(NULL);
    g_autoptr(GString) json = NULL;
    g_autofree char *hmp = NULL;
    QDict *info;

    g_string_append_printf(s, "features %016" PRIx64 "\n", d->offered);
    dump_config(d, s);
    run_script(d, s);
    dump_config(d, s);
    info = query_vm0(d->qts);
    json = qobject_to_json(QOBJECT(info));
    g_string_append_printf(s, "query %s\n", json->str);
    qobject_unref(info);
    hmp = qtest_hmp(d->qts, "info memory-devices");
    g_string_append_printf(s, "hmp %s", hmp);
    g_string_append_printf(s, "vmemmap request: %d\n",
                           request(d, VIRTIO_MEM_REQ_VMEMMAP, d->addr,
                                   4 * KiB));
    g_string_append_printf(s, "status %02x\n",
                           d->vdev->bus->get_status(d->vdev));
    dev_stop(d);
    return g_string_free(s, false);
}

static void test_compat_guest_view(void)
{
    static const char *const geometries[] = {
        "block-size=2M", "block-size=128M,x-early-migration=off",
    };
    size_t i;

    if (!have_stock()) {
        return;
    }
    for (i = 0; i < ARRAY_SIZE(geometries); i++) {
        g_autofree char *off = g_strdup_printf("%s,x-vmemmap-accounting=off",
                                               geometries[i]);
        g_autofree char *stock = guest_view(STOCK_BINARY, geometries[i]);
        g_autofree char *fork_default = guest_view(NULL, geometries[i]);
        g_autofree char *fork_off = guest_view(NULL, off);

        g_autofree char *on = g_strdup_printf("%s,x-vmemmap-accounting=on",
                                              geometries[i]);
        g_autofree char *fork_on = guest_view(NULL, on);

        g_test_message("what stock QEMU shows, %s:", geometries[i]);
        g_test_message("%s", stock);
        g_assert_cmpstr(fork_default, ==, stock);
        g_assert_cmpstr(fork_off, ==, stock);
        /* The comparison sees the feature when it is there. */
        g_assert_cmpstr(fork_on, !=, stock);
    }
}

/* Save the state of @qts to the file @path; wait until it is complete. */
static void save_to_file(QTestState *qts, const char *path)
{
    g_autofree char *uri = g_strdup_printf("file:%s", path);
    gint64 deadline = g_get_monotonic_time() + TIMEOUT_US;
    bool done = false;

    qtest_qmp_assert_success(qts, "{ 'execute': 'migrate', 'arguments': "
                             "{ 'uri': %s } }", uri);
    while (!done) {
        QDict *rsp = qtest_qmp(qts, "{ 'execute': 'query-migrate' }");
        const char *st = qdict_get_try_str(qdict_get_qdict(rsp, "return"),
                                           "status");

        g_assert_cmpstr(st, !=, "failed");
        done = !g_strcmp0(st, "completed");
        qobject_unref(rsp);
        if (!done) {
            g_assert_cmpint(g_get_monotonic_time(), <, deadline);
            g_usleep(10 * 1000);
        }
    }
}

#define QEMU_VM_SECTION_FULL   0x04
#define QEMU_VM_SECTION_FOOTER 0x7e

/* Could @c start what follows a section's footer? */
static bool section_follows(uint8_t c)
{
    /* START, PART, END, FULL, VMDESCRIPTION, CONFIGURATION, COMMAND, EOF */
    return (c >= 0x01 && c <= 0x04) || (c >= 0x06 && c <= 0x08) || c == 0x10;
}

/*
 * The sections of the migration stream in @path that belong to the
 * virtio-mem device, header to footer, concatenated; their names are
 * appended to @names.  A full section is
 *   FULL, be32 section id, u8 len, idstr[len], be32 instance, be32 version,
 *   data, FOOTER, be32 section id
 * The data is compared, not parsed: it ends at the first footer carrying
 * the section's id that is followed by the start of something else.
 */
static GByteArray *device_sections(const char *path, GString *names)
{
    g_autofree char *raw = NULL;
    GByteArray *out = g_byte_array_new();
    const uint8_t *buf;
    gsize len, h;

    g_assert_true(g_file_get_contents(path, &raw, &len, NULL));
    buf = (const uint8_t *)raw;
    for (h = 0; h + 14 < len; h++) {
        size_t idlen = buf[h + 5];
        const char *idstr = (const char *)&buf[h + 6];
        gsize data, f;
        size_t i;

        if (buf[h] != QEMU_VM_SECTION_FULL || h + 6 + idlen + 8 > len ||
            !g_strstr_len(idstr, idlen, "virtio-mem")) {
            continue;
        }
        for (i = 0; i < idlen && g_ascii_isprint(idstr[i]); i++) {
            ;
        }
        if (i < idlen) {
            continue;
        }
        data = h + 6 + idlen + 8;
        for (f = data; f + 5 <= len; f++) {
            if (buf[f] == QEMU_VM_SECTION_FOOTER &&
                !memcmp(&buf[f + 1], &buf[h + 1], 4) &&
                (f + 5 == len || section_follows(buf[f + 5]))) {
                break;
            }
        }
        g_assert_cmpuint(f + 5, <=, len);
        g_string_append_printf(names, " %.*s", (int)idlen, idstr);
        g_byte_array_append(out, &buf[h], f + 5 - h);
        h = f + 4;
    }
    return out;
}

/* A device with @opts on @bin_var, driven through a few plugs, saved. */
static void save_driven(const char *bin_var, const char *opts,
                        const char *path)
{
    Dev *d = dev_start_on(bin_var, opts, false);
    g_autoptr(GString) transcript = g_string_new(NULL);

    run_script(d, transcript);
    g_assert_cmpint(plug(d, 0, d->block_size), ==, VIRTIO_MEM_RESP_ACK);
    save_to_file(d->qts, path);
    dev_stop(d);
}

/* Poll until the VM runs. */
static void wait_running(QTestState *qts)
{
    gint64 deadline = g_get_monotonic_time() + TIMEOUT_US;

    for (;;) {
        QDict *rsp = qtest_qmp(qts, "{ 'execute': 'query-status' }");
        bool running = qdict_get_bool(qdict_get_qdict(rsp, "return"),
                                      "running");

        qobject_unref(rsp);
        if (running) {
            return;
        }
        g_assert_cmpint(g_get_monotonic_time(), <, deadline);
        g_usleep(10 * 1000);
    }
}

/* Load the stream @in on @bin_var, check what arrived, save it to @out. */
static void load_and_save(const char *bin_var, const char *opts,
                          const char *in, const char *out)
{
    g_autofree char *incoming = g_strdup_printf("-incoming file:%s", in);
    QTestState *qts = qemu_start(bin_var, opts, incoming);
    uint64_t bs;

    /*
     * Poll rather than wait for RESUME: a small stream can be loaded
     * before the QMP connection is up, and the event is then gone.
     */
    wait_running(qts);
    bs = qom_get_u64(qts, "block-size");
    /* Blocks 0 and 2 are plugged: see compat_script and save_driven(). */
    g_assert_cmpuint(qom_get_u64(qts, "size"), ==, 2 * bs);
    g_assert_cmpuint(qom_get_u64(qts, "requested-size"), ==,
                     COMPAT_REQUESTED * bs);
    save_to_file(qts, out);
    qtest_quit(qts);
}

static bool same_sections(const char *a, const char *b)
{
    g_autoptr(GString) names_a = g_string_new(NULL);
    g_autoptr(GString) names_b = g_string_new(NULL);
    g_autoptr(GByteArray) sa = device_sections(a, names_a);
    g_autoptr(GByteArray) sb = device_sections(b, names_b);

    return g_str_equal(names_a->str, names_b->str) && sa->len == sb->len &&
           !memcmp(sa->data, sb->data, sa->len);
}

/* The same driving with the feature negotiated and memmap marked. */
static void save_marked(const char *opts, const char *path)
{
    g_autofree char *on = g_strdup_printf("%s,x-vmemmap-accounting=on", opts);
    g_autoptr(GString) transcript = g_string_new(NULL);
    Dev *d = dev_start(on, true);

    run_script(d, transcript);
    g_assert_cmpint(plug(d, 0, d->block_size), ==, VIRTIO_MEM_RESP_ACK);
    g_assert_cmpint(vmemmap(d, 0, 4 * KiB), ==, VIRTIO_MEM_RESP_ACK);
    save_to_file(d->qts, path);
    dev_stop(d);
}

/*
 * The device's sections of the migration stream are byte for byte those
 * of stock QEMU, and each binary loads the other's stream and saves it
 * back unchanged: migration works both ways with nothing lost.
 */
static void test_compat_stream(void)
{
    static const char *const geometries[] = {
        "block-size=2M", "block-size=2M,x-early-migration=off",
        "block-size=128M",
    };
    g_autofree char *dir = NULL;
    size_t i;

    if (!have_stock()) {
        return;
    }
    dir = g_dir_make_tmp("vmemmap-compat-XXXXXX", NULL);
    g_assert_nonnull(dir);
    for (i = 0; i < ARRAY_SIZE(geometries); i++) {
        g_autofree char *off = g_strdup_printf("%s,x-vmemmap-accounting=off",
                                               geometries[i]);
        g_autofree char *stock = g_build_filename(dir, "stock", NULL);
        g_autofree char *fork_default = g_build_filename(dir, "fork", NULL);
        g_autofree char *fork_off = g_build_filename(dir, "fork-off", NULL);
        g_autofree char *to_fork = g_build_filename(dir, "stock-fork", NULL);
        g_autofree char *to_stock = g_build_filename(dir, "fork-stock", NULL);
        g_autofree char *marked = g_build_filename(dir, "marked", NULL);
        g_autoptr(GString) names = g_string_new(NULL);
        g_autoptr(GByteArray) sections = NULL;

        save_driven(STOCK_BINARY, geometries[i], stock);
        save_driven(NULL, geometries[i], fork_default);
        save_driven(NULL, off, fork_off);

        sections = device_sections(stock, names);
        g_test_message("%s: %u bytes in sections%s", geometries[i],
                       sections->len, names->str);
        g_assert_nonnull(strstr(names->str, "/virtio-mem"));
        g_assert_true(same_sections(fork_default, stock));
        g_assert_true(same_sections(fork_off, stock));
        /* The comparison sees vmemmap state when there is some. */
        save_marked(geometries[i], marked);
        g_assert_false(same_sections(marked, stock));

        load_and_save(NULL, off, stock, to_fork);
        g_assert_true(same_sections(to_fork, stock));
        load_and_save(STOCK_BINARY, geometries[i], fork_off, to_stock);
        g_assert_true(same_sections(to_stock, stock));

        unlink(stock);
        unlink(fork_default);
        unlink(fork_off);
        unlink(to_fork);
        unlink(to_stock);
        unlink(marked);
    }
    rmdir(dir);
}

int main(int argc, char **argv)
{
    g_test_init(&argc, &argv, NULL);

    qtest_add_func("/virtio-mem-vmemmap/feature-offer", test_feature_offer);
    qtest_add_func("/virtio-mem-vmemmap/unstable", test_unstable);
    qtest_add_func("/virtio-mem-vmemmap/not-negotiated", test_not_negotiated);
    qtest_add_func("/virtio-mem-vmemmap/sbm", test_sbm);
    qtest_add_func("/virtio-mem-vmemmap/bbm", test_bbm);
    qtest_add_func("/virtio-mem-vmemmap/bad-requests", test_bad_requests);
    qtest_add_func("/virtio-mem-vmemmap/reset", test_reset);
    qtest_add_func("/virtio-mem-vmemmap/migration", test_migration);
    qtest_add_func("/virtio-mem-vmemmap/migration-to-off",
                   test_migration_to_off);
    qtest_add_func("/virtio-mem-vmemmap/migration-renegotiate",
                   test_migration_renegotiate);
    qtest_add_func("/virtio-mem-vmemmap/busy", test_busy);
    qtest_add_func("/virtio-mem-vmemmap/worst-pattern", test_worst_pattern);
    qtest_add_func("/virtio-mem-vmemmap/footprint", test_footprint);
    qtest_add_func("/virtio-mem-vmemmap/footprint-memfd",
                   test_footprint_memfd);
    qtest_add_func("/virtio-mem-vmemmap/footprint-file", test_footprint_file);
    qtest_add_func("/virtio-mem-vmemmap/state-paging", test_state_paging);
    qtest_add_func("/virtio-mem-vmemmap/scrub-refused", test_scrub_refused);
    qtest_add_func("/virtio-mem-vmemmap/footprint-large",
                   test_footprint_large);
    qtest_add_func("/virtio-mem-vmemmap/compat/migration-to-stock",
                   test_migration_to_stock);
    qtest_add_func("/virtio-mem-vmemmap/upstream-options",
                   test_upstream_options);
    qtest_add_func("/virtio-mem-vmemmap/compat/guest-view",
                   test_compat_guest_view);
    qtest_add_func("/virtio-mem-vmemmap/compat/stream", test_compat_stream);
    if (getenv("VIRTIO_MEM_VMEMMAP_BENCH")) {
        qtest_add_func("/virtio-mem-vmemmap/bench/stall", bench_stall);
    }
    return g_test_run();
}
