/*
 * libFuzzer harness: raw virtio-mem requests to the real device, via qtest
 *
 * What it fuzzes: the fork's virtio-mem-pci device (hw/virtio/virtio-mem.c
 * with the vmemmap accounting) in a real QEMU process, started once per
 * fuzzing process with qtest (FUZZ_QEMU: the fork, or its ASan/UBSan
 * build, build/qemu-system-x86_64-asan, which is what scripts/fuzz uses
 * when it exists).  The harness is the driver: it negotiates the features
 * (with or without VIRTIO_MEM_F_VMEMMAP), sets requested-size, and puts
 * requests on the virtqueue: PLUG, UNPLUG, UNPLUG_ALL, STATE and VMEMMAP
 * with plausible and hostile ranges, several in flight at once, and raw
 * ones (any type, any payload, short buffers) that break the device and
 * force a reset.
 *
 * Oracle: every answer (ACK, NACK, BUSY, ERROR, the STATE value) is
 * predicted from a model (tests/fuzz/vmemmap-model.h plus the plug rules
 * of virtio-mem), and after each step the device's whole state, from
 * x-query-virtio-mem-state, must equal the model: plugged runs, vmemmap
 * runs (sorted, disjoint, never adjacent, inside plugged memory), size and
 * vmemmap-size.  A QEMU that dies (a sanitizer report, an assertion) or
 * stops answering makes the harness abort: libFuzzer records the input.
 *
 * Honest limits: libFuzzer's coverage feedback is the harness's own
 * (which operations and answers an input reached), not QEMU's: QEMU runs
 * in another process without coverage instrumentation, so the fuzzer
 * steers by what the device answered, not by which of its branches ran.
 * Each step costs qtest round trips: tens to hundreds of inputs a second,
 * not thousands.  QEMU's own fuzzer (--enable-fuzzing, qemu-fuzz-x86_64,
 * generic-fuzz) would see the device's edges, at the price of a third
 * full QEMU build with clang; scripts/fuzz says why it is not used.
 *
 * Build and run: scripts/fuzz vmemmap-device (make fuzz); corpus in
 * tests/fuzz/corpus/vmemmap-device/.
 *
 * Copyright (c) 2026 The virtio-mem-vmemmap authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qemu/bswap.h"
#include "qemu/units.h"
#include "libqtest.h"
#include "libqos/libqos-malloc.h"
#include "libqos/malloc-pc.h"
#include "libqos/pci-pc.h"
#include "libqos/virtio.h"
#include "libqos/virtio-pci.h"
#include "qobject/qdict.h"
#include "qobject/qlist.h"
#include "standard-headers/linux/virtio_config.h"
#include "standard-headers/linux/virtio_mem.h"
#include "standard-headers/linux/virtio_ring.h"
#include "vmemmap-model.h"
#include "fuzz-input.h"

#define PAGE        MODEL_PAGE
#define REGION      (1 * GiB)
#define BLOCK       (2 * MiB)
#define NR_BLOCKS   (REGION / BLOCK)
#define MAX_BATCH   8
#define MAX_OPS     64
#define TIMEOUT_US  (10 * 1000 * 1000)
#define QOM_PATH    "/machine/peripheral/vm0"

int LLVMFuzzerInitialize(int *argc, char ***argv);
int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

/* A request as it goes on the ring, and what the device must answer. */
typedef struct Req {
    struct virtio_mem_req req;
    uint32_t out_len, in_len;   /* descriptor lengths */
    int want;                   /* expected response type; -1: any */
    int want_state;             /* for STATE; -1: not a STATE request */
} Req;

static struct {
    QTestState *qts;
    QGuestAllocator alloc;
    QPCIBus *bus;
    QVirtioPCIDevice *pdev;
    QVirtioDevice *vdev;
    QVirtQueue *vq;
    uint64_t addr, usable, requested, plugged_size;
    uint64_t req_buf, resp_buf;
    uint16_t avail_idx;         /* the driver's shadow of avail->idx */
    bool negotiated;            /* VIRTIO_MEM_F_VMEMMAP */
    bool broken;                /* NEEDS_RESET seen */
    Model m;
    uint64_t requests, acks, errors, nacks, resets;
} dev;


/* ---- the device ---- */

/* (qpci_device_foreach hands each device it finds to its callback) */
static void find_dev(QPCIDevice *pci, int devfn, void *opaque)
{
    *(int *)opaque = devfn;
    g_free(pci);
}

static uint64_t config_usable(void)
{
    return qvirtio_config_readq(dev.vdev, offsetof(struct virtio_mem_config,
                                                   usable_region_size));
}

/* Reset the device and bring it up as a (new) driver would. */
static void negotiate(bool vmemmap)
{
    uint64_t features;

    if (dev.vq) {
        qvirtqueue_cleanup(dev.vdev->bus, dev.vq, &dev.alloc);
        dev.vq = NULL;
    }
    qvirtio_start_device(dev.vdev);
    features = qvirtio_get_features(dev.vdev);
    g_assert(features & (1ull << VIRTIO_MEM_F_VMEMMAP));
    features = (features & ((1ull << VIRTIO_TRANSPORT_F_START) - 1)) |
               (1ull << VIRTIO_F_VERSION_1);
    if (!vmemmap) {
        features &= ~(1ull << VIRTIO_MEM_F_VMEMMAP);
    }
    qvirtio_set_features(dev.vdev, features);
    dev.vq = qvirtqueue_setup(dev.vdev, &dev.alloc, 0);
    dev.avail_idx = 0;
    qvirtio_set_driver_ok(dev.vdev);
    dev.negotiated = vmemmap;
    dev.broken = false;
    dev.resets++;
    /* A driver without the feature makes the device drop the marks. */
    if (!vmemmap) {
        model_set(&dev.m, 0, dev.m.nr_pages, 0);
    }
}

/*
 * The usable region virtio-mem offers for a requested size: the request
 * plus an extent (256 MiB on x86-64), whole blocks, none for 0.  It grows
 * with requested-size and shrinks only at UNPLUG_ALL.
 */
static uint64_t usable_for(uint64_t requested)
{
    return requested ? QEMU_ALIGN_UP(MIN(REGION, requested + 256 * MiB),
                                     BLOCK) : 0;
}

static void set_requested(uint64_t size)
{
    qtest_qmp_assert_success(dev.qts, "{ 'execute': 'qom-set', 'arguments':"
                             " { 'path': %s, 'property': 'requested-size',"
                             " 'value': %" PRIu64 " } }", QOM_PATH, size);
    dev.requested = size;
    dev.usable = MAX(dev.usable, usable_for(size));
    g_assert(config_usable() == dev.usable);
}

/* At exit: stop QEMU and free what libqos holds (LeakSanitizer looks). */
static void teardown(void)
{
    fprintf(stderr, "fuzz-vmemmap-device: %" PRIu64 " requests: %" PRIu64
            " ACK, %" PRIu64 " NACK, %" PRIu64 " ERROR; %" PRIu64
            " device resets\n", dev.requests, dev.acks, dev.nacks,
            dev.errors, dev.resets);
    guest_free(&dev.alloc, dev.req_buf);
    guest_free(&dev.alloc, dev.resp_buf);
    qvirtqueue_cleanup(dev.vdev->bus, dev.vq, &dev.alloc);
    qos_object_destroy(&dev.pdev->obj);
    qpci_free_pc(dev.bus);
    alloc_destroy(&dev.alloc);
    qtest_quit(dev.qts);
}

int LLVMFuzzerInitialize(int *argc, char ***argv)
{
    const char *qemu = getenv("FUZZ_QEMU");
    g_autofree char *args = NULL;
    QPCIAddress pci_addr = { 0 };
    int devfn = -1;

    if (!qemu) {
        fprintf(stderr, "fuzz-vmemmap-device: set FUZZ_QEMU to the fork's"
                " qemu-system-x86_64 (scripts/fuzz does)\n");
        exit(1);
    }
    g_setenv("QTEST_QEMU_BINARY", qemu, true);
    args = g_strdup_printf("-machine pc -m 128M,maxmem=%" PRIu64
                           " -object memory-backend-ram,id=mem0,size=%"
                           PRIu64 " -device virtio-mem-pci,id=vm0,"
                           "memdev=mem0,block-size=%" PRIu64
                           ",requested-size=0,x-vmemmap-accounting=on",
                           128 * MiB + REGION, REGION, BLOCK);
    dev.qts = qtest_init(args);
    pc_alloc_init(&dev.alloc, dev.qts, ALLOC_NO_FLAGS);
    dev.bus = qpci_new_pc(dev.qts, &dev.alloc);
    qpci_device_foreach(dev.bus, 0x1af4, 0x1040 + VIRTIO_ID_MEM, find_dev,
                        &devfn);
    g_assert(devfn >= 0);
    pci_addr.devfn = devfn;
    dev.pdev = virtio_pci_new(dev.bus, &pci_addr);
    dev.vdev = &dev.pdev->vdev;
    qvirtio_pci_device_enable(dev.pdev);
    model_init(&dev.m, REGION, BLOCK, true);
    negotiate(true);
    dev.addr = qvirtio_config_readq(dev.vdev,
                                    offsetof(struct virtio_mem_config, addr));
    dev.req_buf = guest_alloc(&dev.alloc, MAX_BATCH * sizeof(Req));
    dev.resp_buf = guest_alloc(&dev.alloc, MAX_BATCH *
                               sizeof(struct virtio_mem_resp));
    set_requested(0);
    atexit(teardown);
    return 0;
}

/*
 * Put @n requests on the ring at once, kick, and wait for all answers.
 * Returns false if the device broke (NEEDS_RESET) instead of answering.
 */
static bool submit(Req *r, int n, struct virtio_mem_resp *resp)
{
    QVirtQueue *vq = dev.vq;
    const size_t rsz = sizeof(struct virtio_mem_resp);
    struct vring_desc desc[2 * MAX_BATCH];
    struct virtio_mem_req req[MAX_BATCH];
    uint16_t ring[MAX_BATCH];
    const uint16_t avail = dev.avail_idx;
    const gint64 deadline = g_get_monotonic_time() + TIMEOUT_US;
    int i;

    /* As few qtest round trips as can be: they are what an input costs. */
    for (i = 0; i < n; i++) {
        req[i] = r[i].req;
        desc[2 * i].addr = cpu_to_le64(dev.req_buf + i * sizeof(req[0]));
        desc[2 * i].len = cpu_to_le32(r[i].out_len);
        desc[2 * i].flags = cpu_to_le16(r[i].in_len ? VRING_DESC_F_NEXT : 0);
        desc[2 * i].next = cpu_to_le16(2 * i + 1);
        desc[2 * i + 1].addr = cpu_to_le64(dev.resp_buf + i * rsz);
        desc[2 * i + 1].len = cpu_to_le32(r[i].in_len);
        desc[2 * i + 1].flags = cpu_to_le16(VRING_DESC_F_WRITE);
        desc[2 * i + 1].next = 0;
        ring[i] = cpu_to_le16(2 * i);
    }
    qtest_memwrite(dev.qts, dev.req_buf, req, n * sizeof(req[0]));
    qtest_memset(dev.qts, dev.resp_buf, 0xff, n * rsz);
    qtest_memwrite(dev.qts, vq->desc, desc, 2 * n * sizeof(desc[0]));
    if (avail % vq->size + n <= vq->size) {
        qtest_memwrite(dev.qts, vq->avail + 4 + 2 * (avail % vq->size), ring,
                       n * sizeof(ring[0]));
    } else {
        for (i = 0; i < n; i++) {
            qtest_writew(dev.qts, vq->avail + 4 +
                         2 * ((uint16_t)(avail + i) % vq->size), 2 * i);
        }
    }
    dev.avail_idx = avail + n;
    qtest_writew(dev.qts, vq->avail + 2, dev.avail_idx);
    dev.vdev->bus->virtqueue_kick(dev.vdev, vq);

    /* The device answers while it handles the kick, or breaks. */
    while (qtest_readw(dev.qts, vq->used + 2) != dev.avail_idx) {
        if (dev.vdev->bus->get_status(dev.vdev) &
            VIRTIO_CONFIG_S_NEEDS_RESET) {
            dev.broken = true;
            return false;
        }
        if (g_get_monotonic_time() > deadline) {
            fprintf(stderr, "device did not answer %d requests\n", n);
            abort();
        }
    }
    vq->last_used_idx = dev.avail_idx;
    qtest_memread(dev.qts, dev.resp_buf, resp, n * rsz);
    return true;
}

/* ---- the model of the plug state (virtio_mem_state_change_request) ---- */


static bool valid_range(uint64_t gpa, uint64_t size)
{
    return !(gpa % BLOCK) && size && gpa + size > gpa && gpa >= dev.addr &&
           gpa + size <= dev.addr + dev.usable;
}

static int model_state(uint64_t first, uint64_t n)
{
    uint64_t i, plugged = 0;

    for (i = first; i < first + n; i++) {
        plugged += dev.m.blk[i];
    }
    return plugged == n ? VIRTIO_MEM_STATE_PLUGGED :
           !plugged ? VIRTIO_MEM_STATE_UNPLUGGED : VIRTIO_MEM_STATE_MIXED;
}

/* A PLUG or UNPLUG: the answer it must get, and the model after an ACK. */
static void plan_change(Req *r, Input *in, bool plug)
{
    const unsigned mode = U8(in) % 8;
    uint64_t gpa, nb;

    if (mode < 6) {         /* whole blocks, in or just past the region */
        gpa = dev.addr + (uint64_t)(U16(in) % (NR_BLOCKS + 4)) * BLOCK;
        nb = mode < 5 ? 1 + U8(in) % 8 : U16(in);
    } else if (mode == 6) { /* misaligned */
        gpa = dev.addr + (uint64_t)(U16(in) % NR_BLOCKS) * BLOCK +
              (1 + U8(in)) * PAGE;
        nb = 1 + U8(in) % 4;
    } else {                /* anything */
        gpa = U64(in);
        nb = U16(in);
    }
    r->req.type = cpu_to_le16(plug ? VIRTIO_MEM_REQ_PLUG :
                              VIRTIO_MEM_REQ_UNPLUG);
    r->req.u.plug.addr = cpu_to_le64(gpa);
    r->req.u.plug.nb_blocks = cpu_to_le16(nb);
    if (!valid_range(gpa, nb * BLOCK)) {
        r->want = VIRTIO_MEM_RESP_ERROR;
    } else if (plug && dev.plugged_size + nb * BLOCK > dev.requested) {
        r->want = VIRTIO_MEM_RESP_NACK;
    } else if (model_state((gpa - dev.addr) / BLOCK, nb) !=
               (plug ? VIRTIO_MEM_STATE_UNPLUGGED :
                VIRTIO_MEM_STATE_PLUGGED)) {
        r->want = VIRTIO_MEM_RESP_ERROR;
    } else {
        const uint64_t first = (gpa - dev.addr) / BLOCK;

        r->want = VIRTIO_MEM_RESP_ACK;
        memset(dev.m.blk + first, plug, nb);
        dev.plugged_size += plug ? nb * BLOCK : -nb * BLOCK;
        if (!plug) {
            model_set(&dev.m, first * BLOCK / PAGE, nb * BLOCK / PAGE, 0);
        }
    }
}

static void plan_state(Req *r, Input *in)
{
    const uint64_t gpa = dev.addr + (uint64_t)(U16(in) % (NR_BLOCKS + 2)) *
                         BLOCK;
    const uint64_t nb = 1 + U8(in) % 16;

    r->req.type = cpu_to_le16(VIRTIO_MEM_REQ_STATE);
    r->req.u.state.addr = cpu_to_le64(gpa);
    r->req.u.state.nb_blocks = cpu_to_le16(nb);
    if (valid_range(gpa, nb * BLOCK)) {
        r->want = VIRTIO_MEM_RESP_ACK;
        r->want_state = model_state((gpa - dev.addr) / BLOCK, nb);
    } else {
        r->want = VIRTIO_MEM_RESP_ERROR;
    }
}

static void plan_vmemmap(Req *r, Input *in)
{
    const unsigned mode = U8(in) % 8;
    uint64_t addr, size;

    switch (mode) {
    case 0 ... 1:   /* pages from a 2 MiB start, as a driver marks */
        addr = dev.addr + (uint64_t)(U16(in) % (REGION / (2 * MiB) + 2)) *
               2 * MiB;
        size = (uint64_t)(1 + U16(in) % 1024) * PAGE;
        break;
    case 2 ... 3:   /* a few pages in or just past the region */
        addr = dev.addr + (uint64_t)(U24(in) % (REGION / PAGE + 16)) * PAGE;
        size = (uint64_t)(1 + U8(in) % 64) * PAGE;
        break;
    case 4:         /* a whole block, like an SBM memmap */
        addr = dev.addr + (uint64_t)(U16(in) % NR_BLOCKS) * BLOCK;
        size = (1 + U8(in) % 2) * BLOCK;
        break;
    case 5:         /* at the end of the usable region */
        size = (uint64_t)(1 + U16(in) % 1024) * PAGE;
        addr = dev.addr + dev.usable - (U8(in) % 3) * 2 * MiB;
        break;
    case 6:         /* below the device, or unaligned */
        addr = dev.addr - (uint64_t)(U8(in) % 4) * PAGE + U8(in) % 2 * 512;
        size = (uint64_t)(U8(in) % 8) * PAGE;
        break;
    default:        /* anything */
        addr = U64(in);
        size = U64(in);
        break;
    }
    r->req.type = cpu_to_le16(VIRTIO_MEM_REQ_VMEMMAP);
    r->req.u.vmemmap_range.addr = cpu_to_le64(addr);
    r->req.u.vmemmap_range.size = cpu_to_le64(size);
    if (!dev.negotiated) {
        r->want = -1;   /* an unknown request type: the device breaks */
    } else if (model_check(&dev.m, dev.addr, dev.usable, addr, size) ==
               VIRTIO_MEM_VMEMMAP_OK) {
        r->want = VIRTIO_MEM_RESP_ACK;
        model_set(&dev.m, (addr - dev.addr) / PAGE, size / PAGE, 1);
    } else {
        r->want = VIRTIO_MEM_RESP_ERROR;
    }
}

/* ---- the device's state against the model ---- */

/* Compares one list of {offset, length} runs with the model's runs. */
static uint64_t check_runs(QList *list, bool marks)
{
    const QListEntry *e;
    uint64_t next = 0, sum = 0, rs = 0, re = 0, b;

    QLIST_FOREACH_ENTRY(list, e) {
        QDict *run = qobject_to(QDict, qlist_entry_obj(e));
        const uint64_t off = qdict_get_int(run, "offset");
        const uint64_t len = qdict_get_int(run, "length");

        /* sorted, disjoint, never adjacent, inside the region */
        g_assert(len && off >= next && off + len <= REGION);
        if (marks) {
            g_assert(!(off % PAGE) && !(len % PAGE));
            g_assert(model_next_run(&dev.m, next / PAGE, REGION / PAGE,
                                    &rs, &re));
            g_assert(rs * PAGE == off && re * PAGE == off + len);
            /* inside plugged memory */
            for (b = off / BLOCK; b <= (off + len - 1) / BLOCK; b++) {
                g_assert(dev.m.blk[b]);
            }
        } else {
            g_assert(!(off % BLOCK) && !(len % BLOCK));
            for (b = next / BLOCK; b < off / BLOCK; b++) {
                g_assert(!dev.m.blk[b]);
            }
            for (b = off / BLOCK; b < (off + len) / BLOCK; b++) {
                g_assert(dev.m.blk[b]);
            }
        }
        next = off + len + (marks ? PAGE : BLOCK);
        sum += len;
    }
    if (marks) {
        g_assert(!model_next_run(&dev.m, next / PAGE, REGION / PAGE, &rs,
                                 &re));
    } else {
        for (b = MIN(next, REGION) / BLOCK; b < NR_BLOCKS; b++) {
            g_assert(!dev.m.blk[b]);
        }
    }
    return sum;
}

static void check_state(void)
{
    QDict *rsp = qtest_qmp(dev.qts, "{ 'execute': 'x-query-virtio-mem-state',"
                           " 'arguments': { 'qom-path': %s } }", QOM_PATH);
    QDict *st = qdict_get_qdict(rsp, "return");
    uint64_t plugged, marked;

    g_assert(st);
    plugged = check_runs(qdict_get_qlist(st, "plugged"), false);
    marked = check_runs(qdict_get_qlist(st, "vmemmap"), true);
    g_assert(plugged == dev.plugged_size);
    g_assert(qdict_get_int(st, "size") == plugged);
    g_assert(marked == dev.m.nr_marked * PAGE);
    g_assert(qdict_get_int(st, "vmemmap-size") == marked);
    g_assert(qdict_get_int(st, "requested-size") == dev.requested);
    g_assert(qdict_get_int(st, "region-size") == REGION);
    g_assert(qdict_get_int(st, "block-size") == BLOCK);
    g_assert(config_usable() == dev.usable);
    qobject_unref(rsp);
}

/* After a step the model cannot predict: take the device's word for it. */
static void resync(void)
{
    QDict *rsp;
    QDict *st;
    const QListEntry *e;

    if (dev.broken) {
        negotiate(dev.negotiated);
    }
    rsp = qtest_qmp(dev.qts, "{ 'execute': 'x-query-virtio-mem-state',"
                    " 'arguments': { 'qom-path': %s } }", QOM_PATH);
    st = qdict_get_qdict(rsp, "return");
    g_assert(st);
    memset(dev.m.blk, 0, NR_BLOCKS);
    model_set(&dev.m, 0, dev.m.nr_pages, 0);
    QLIST_FOREACH_ENTRY(qdict_get_qlist(st, "plugged"), e) {
        QDict *run = qobject_to(QDict, qlist_entry_obj(e));

        memset(dev.m.blk + qdict_get_int(run, "offset") / BLOCK, 1,
               qdict_get_int(run, "length") / BLOCK);
    }
    QLIST_FOREACH_ENTRY(qdict_get_qlist(st, "vmemmap"), e) {
        QDict *run = qobject_to(QDict, qlist_entry_obj(e));

        model_set(&dev.m, qdict_get_int(run, "offset") / PAGE,
                  qdict_get_int(run, "length") / PAGE, 1);
    }
    dev.plugged_size = qdict_get_int(st, "size");
    qobject_unref(rsp);
    dev.usable = config_usable();
    check_state();
}

/* ---- operations ---- */

/* Plan up to MAX_BATCH requests, send them in one kick, check answers. */
static void op_requests(Input *in)
{
    int n = 1 + U8(in) % MAX_BATCH;
    struct virtio_mem_resp resp[MAX_BATCH];
    Req r[MAX_BATCH];
    bool raw = false;
    int i;

    memset(r, 0, sizeof(r));
    for (i = 0; i < n; i++) {
        r[i].out_len = sizeof(r[i].req);
        r[i].in_len = sizeof(resp[i]);
        r[i].want_state = -1;
        switch (U8(in) % 12) {
        case 0 ... 1:
            plan_change(&r[i], in, true);
            break;
        case 2 ... 3:
            plan_change(&r[i], in, false);
            break;
        case 4:
            r[i].req.type = cpu_to_le16(VIRTIO_MEM_REQ_UNPLUG_ALL);
            r[i].want = VIRTIO_MEM_RESP_ACK;
            dev.usable = usable_for(dev.requested);
            memset(dev.m.blk, 0, NR_BLOCKS);
            model_set(&dev.m, 0, dev.m.nr_pages, 0);
            dev.plugged_size = 0;
            break;
        case 5:
            plan_state(&r[i], in);
            break;
        case 6 ... 10:
            plan_vmemmap(&r[i], in);
            raw |= r[i].want < 0;
            break;
        default:        /* raw: any type and payload, any lengths */
            r[i].req.type = cpu_to_le16(U16(in));
            r[i].req.u.vmemmap_range.addr = cpu_to_le64(U64(in));
            r[i].req.u.vmemmap_range.size = cpu_to_le64(U64(in));
            if (U8(in) & 1) {
                r[i].out_len = U8(in) % (sizeof(r[i].req) + 1);
                r[i].in_len = U8(in) % (sizeof(resp[i]) + 1);
            }
            r[i].want = -1;
            raw = true;
            break;
        }
        /* what follows a request the model cannot follow is not predictable */
        if (r[i].want < 0) {
            n = i + 1;
        }
    }
    dev.requests += n;
    if (!submit(r, n, resp)) {
        /* only an unknown type or a short buffer may break the device */
        g_assert(raw);
        resync();
        return;
    }
    for (i = 0; i < n; i++) {
        const int got = le16_to_cpu(resp[i].type);

        if (r[i].want < 0) {
            continue;
        }
        if (got != r[i].want) {
            fprintf(stderr, "request %d/%d type %u: answer %d, model %d\n",
                    i + 1, n, le16_to_cpu(r[i].req.type), got, r[i].want);
            abort();
        }
        dev.acks += got == VIRTIO_MEM_RESP_ACK;
        dev.errors += got == VIRTIO_MEM_RESP_ERROR;
        dev.nacks += got == VIRTIO_MEM_RESP_NACK;
        if (r[i].want_state >= 0) {
            g_assert(le16_to_cpu(resp[i].u.state.state) == r[i].want_state);
        }
    }
    if (raw) {
        resync();
    } else {
        check_state();
    }
}

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    static const uint64_t requested[] = {
        0, 16 * MiB, 64 * MiB, 128 * MiB, 200 * MiB, 512 * MiB, 768 * MiB,
        REGION,
    };
    Input in = { data, data + size };
    int ops = 0;
    unsigned flags = U8(&in);

    /* Each input starts from a device with nothing plugged. */
    if (dev.broken || flags & 1) {
        negotiate(!(flags & 2));
    }
    {
        Req r = { .out_len = sizeof(r.req),
                  .in_len = sizeof(struct virtio_mem_resp) };
        struct virtio_mem_resp resp;

        r.req.type = cpu_to_le16(VIRTIO_MEM_REQ_UNPLUG_ALL);
        g_assert(submit(&r, 1, &resp));
        g_assert(le16_to_cpu(resp.type) == VIRTIO_MEM_RESP_ACK);
    }
    memset(dev.m.blk, 0, NR_BLOCKS);
    model_set(&dev.m, 0, dev.m.nr_pages, 0);
    dev.plugged_size = 0;
    dev.usable = usable_for(dev.requested);
    set_requested(requested[(flags >> 2) % 8]);
    check_state();

    while (in.p < in.end && ops++ < MAX_OPS) {
        switch (U8(&in) % 8) {
        case 0:     /* requested-size moves: the usable region follows */
            set_requested(requested[U8(&in) % 8]);
            check_state();
            break;
        case 1:     /* a new driver, with or without the feature */
            negotiate(U8(&in) & 1);
            check_state();
            break;
        default:
            op_requests(&in);
            break;
        }
    }
    return 0;
}
