// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * A VM reached through libvirt, which owns its QMP monitor.
 *
 * Sizes come from the live domain XML (<memory model='virtio-mem'>:
 * <requested> is set by libvirt as it asks for a resize, <current> from
 * QEMU's MEMORY_DEVICE_SIZE_CHANGE events), resizes go through
 * virDomainUpdateDeviceFlags as virsh update-memory-device does, and the
 * limit is the domain's hard_limit and soft_limit memory parameters.
 *
 * <current> lags behind QEMU by up to a second (QEMU holds the events
 * back to one a second per device), and only ever on the safe side: a
 * grow is covered by <requested> from the moment it is asked for, and a
 * shrink shows the old, larger size until the event arrives.  So the
 * limit is never lowered on a value that is too small.
 *
 * The one thing only QEMU can say, the host bytes resident in the devices
 * (query-virtio-mem-footprint, for measuring base), is asked through
 * libvirt's monitor passthrough; libvirt marks the domain "tainted" for
 * that.  Give --base to avoid it.
 */
#include <string.h>

#include <libvirt/libvirt.h>
#include <libvirt/libvirt-qemu.h>
#include <libvirt/virterror.h>
#include <json-glib/json-glib.h>

#include "vmem-limit.h"
#include "cgroup.h"

typedef struct {
    virConnectPtr conn;
    virDomainPtr dom;
    char *name;
    char *uri;
    int size_cb;
    int life_cb;
    gboolean changed;
    gboolean lost;
    char *lost_why;
    VmemTarget *t;
    Cgroup *cg;             /* QEMU's memory cgroup, for OOM kills */
} LvTarget;

/*
 * A domain found stopped: was it shut down on purpose?  Its state's
 * reason says, where the lifecycle event has not been seen yet.
 */
static void lv_note_stop(LvTarget *lt)
{
    int state, reason;

    if (lt->dom && lt->t &&
        virDomainGetState(lt->dom, &state, &reason, 0) == 0 &&
        state == VIR_DOMAIN_SHUTOFF) {
        lt->t->shut_down = reason == VIR_DOMAIN_SHUTOFF_SHUTDOWN ||
                           reason == VIR_DOMAIN_SHUTOFF_DESTROYED ||
                           reason == VIR_DOMAIN_SHUTOFF_SAVED ||
                           reason == VIR_DOMAIN_SHUTOFF_MIGRATED;
    }
}

static void lv_quiet(void *opaque, virErrorPtr e)
{
    (void)opaque;
    (void)e;
}

/*
 * Turns libvirt's last error into a GError.  Permission and lost
 * connections or domains get their own exit codes whatever the caller
 * expected; anything else gets code.
 */
static void lv_error(LvTarget *lt, GError **errp, int code, const char *doing)
{
    virErrorPtr e = virGetLastError();
    int ecode = e ? e->code : VIR_ERR_OK;
    g_autofree char *msg = g_strdup(e && e->message ? e->message :
                                    "unknown libvirt error");
    const char *hint = "";

    /* (virDomainIsActive below resets libvirt's last error) */
    switch (ecode) {
    case VIR_ERR_OPERATION_DENIED:
    case VIR_ERR_AUTH_FAILED:
    case VIR_ERR_AUTH_CANCELLED:
    case VIR_ERR_AUTH_UNAVAILABLE:
    case VIR_ERR_ACCESS_DENIED:
        code = VMEM_EXIT_PERMISSION;
        hint = "; run as root or with a read-write libvirt connection";
        break;
    case VIR_ERR_NO_DOMAIN:
    case VIR_ERR_NO_CONNECT:
    case VIR_ERR_RPC:
    case VIR_ERR_SYSTEM_ERROR:
        code = VMEM_EXIT_LOST;
        hint = "; is libvirtd running and the domain active?";
        break;
    case VIR_ERR_OPERATION_INVALID:
        if (lt && lt->dom && virDomainIsActive(lt->dom) != 1) {
            code = VMEM_EXIT_LOST;
            hint = "; start the domain first";
            lv_note_stop(lt);
        }
        break;
    default:
        break;
    }
    if (ecode == VIR_ERR_SYSTEM_ERROR && strstr(msg, "ermission")) {
        code = VMEM_EXIT_PERMISSION;
        hint = "; run as root or as a user allowed on this libvirt socket";
    }
    g_set_error(errp, VMEM_LIMIT_ERROR, code, "libvirt domain %s (%s): "
                "cannot %s: %s%s", lt && lt->name ? lt->name : "?",
                lt && lt->uri ? lt->uri : "?", doing, msg, hint);
    virResetLastError();
}

static gboolean lv_check(LvTarget *lt, GError **errp)
{
    if (lt->lost) {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_LOST,
                    "libvirt domain %s (%s): %s", lt->name, lt->uri,
                    lt->lost_why);
        return FALSE;
    }
    return TRUE;
}

/* --- the domain XML ----------------------------------------------------- */

static guint64 lv_unit_bytes(const char *unit)
{
    static const struct {
        const char *name;
        guint64 mult;
    } units[] = {
        { "b", 1 }, { "bytes", 1 },
        { "KB", 1000 }, { "k", 1024 }, { "KiB", 1024 },
        { "MB", 1000000 }, { "M", 1 << 20 }, { "MiB", 1 << 20 },
        { "GB", 1000000000 }, { "G", 1 << 30 }, { "GiB", 1 << 30 },
        { "T", 1ULL << 40 }, { "TiB", 1ULL << 40 },
    };
    guint i;

    if (!unit) {
        return 1024;    /* libvirt's default for memory sizes */
    }
    for (i = 0; i < G_N_ELEMENTS(units); i++) {
        gboolean letter = units[i].name[1] == 0;

        if (letter ? !g_ascii_strcasecmp(unit, units[i].name)
                   : !strcmp(unit, units[i].name)) {
            return units[i].mult;
        }
    }
    return 1024;
}

typedef struct {
    VmemDevice *d;
    GSList *stack;          /* element names, innermost first */
    const char *field;      /* "size", "requested", ... while inside one */
    guint64 mult;
    gboolean have_current;
    guint64 current;
} LvParse;

static void lv_start(GMarkupParseContext *ctx, const char *name,
                     const char **attr_names, const char **attr_values,
                     gpointer data, GError **errp)
{
    LvParse *p = data;
    const char *parent = p->stack ? p->stack->data : NULL;
    guint i;

    (void)ctx;
    (void)errp;
    p->stack = g_slist_prepend(p->stack, g_strdup(name));
    p->field = NULL;
    if (!g_strcmp0(name, "alias")) {
        for (i = 0; attr_names[i]; i++) {
            if (!strcmp(attr_names[i], "name")) {
                g_free(p->d->id);
                p->d->id = g_strdup(attr_values[i]);
            }
        }
        return;
    }
    if (g_strcmp0(parent, "target")) {
        return;
    }
    if (!strcmp(name, "size") || !strcmp(name, "requested") ||
        !strcmp(name, "current") || !strcmp(name, "block")) {
        p->field = g_intern_string(name);
        p->mult = 1024;
        for (i = 0; attr_names[i]; i++) {
            if (!strcmp(attr_names[i], "unit")) {
                p->mult = lv_unit_bytes(attr_values[i]);
            }
        }
    }
}

static void lv_end(GMarkupParseContext *ctx, const char *name, gpointer data,
                   GError **errp)
{
    LvParse *p = data;
    GSList *top = p->stack;

    (void)ctx;
    (void)name;
    (void)errp;
    p->stack = top->next;
    g_free(top->data);
    g_slist_free_1(top);
    p->field = NULL;
}

static void lv_text(GMarkupParseContext *ctx, const char *text, gsize len,
                    gpointer data, GError **errp)
{
    LvParse *p = data;
    g_autofree char *s = NULL;
    guint64 v;

    (void)ctx;
    (void)errp;
    if (!p->field) {
        return;
    }
    s = g_strstrip(g_strndup(text, len));
    v = g_ascii_strtoull(s, NULL, 10) * p->mult;
    if (p->field == g_intern_string("size")) {
        p->d->max_size = v;
    } else if (p->field == g_intern_string("requested")) {
        p->d->requested = v;
    } else if (p->field == g_intern_string("current")) {
        p->current = v;
        p->have_current = TRUE;
    } else if (p->field == g_intern_string("block")) {
        p->d->block_size = v;
    }
}

/* The text of each <memory model='virtio-mem'> element, in order. */
static GPtrArray *lv_memory_elements(const char *xml)
{
    GPtrArray *out = g_ptr_array_new_with_free_func(g_free);
    const char *p = xml;

    while ((p = strstr(p, "<memory model='virtio-mem'"))) {
        const char *end = strstr(p, "</memory>");

        if (!end) {
            break;
        }
        end += strlen("</memory>");
        g_ptr_array_add(out, g_strndup(p, end - p));
        p = end;
    }
    return out;
}

static VmemDevice *lv_parse_device(const char *elem)
{
    static const GMarkupParser parser = {
        .start_element = lv_start,
        .end_element = lv_end,
        .text = lv_text,
    };
    LvParse p = { .d = g_new0(VmemDevice, 1) };
    GMarkupParseContext *ctx;
    gboolean ok;

    p.d->memdev = g_strdup("");
    p.d->vmemmap = -1;
    ctx = g_markup_parse_context_new(&parser, 0, &p, NULL);
    ok = g_markup_parse_context_parse(ctx, elem, -1, NULL) &&
         g_markup_parse_context_end_parse(ctx, NULL);
    g_markup_parse_context_free(ctx);
    g_slist_free_full(p.stack, g_free);
    if (!ok) {
        vmem_device_free(p.d);
        return NULL;
    }
    /* Without <current> (not started yet) the device holds nothing. */
    p.d->size = p.have_current ? p.current : 0;
    return p.d;
}

static char *lv_xml(LvTarget *lt, GError **errp)
{
    char *xml;

    if (!lv_check(lt, errp)) {
        return NULL;
    }
    xml = virDomainGetXMLDesc(lt->dom, 0);
    if (!xml) {
        lv_error(lt, errp, VMEM_EXIT_LOST, "read the domain XML");
    }
    return xml;
}

static GPtrArray *lv_query(VmemTarget *t, GError **errp)
{
    LvTarget *lt = t->opaque;
    g_autofree char *xml = lv_xml(lt, errp);
    g_autoptr(GPtrArray) elems = NULL;
    GPtrArray *devs;
    guint i;

    if (!xml) {
        return NULL;
    }
    elems = lv_memory_elements(xml);
    devs = g_ptr_array_new_with_free_func((GDestroyNotify)vmem_device_free);
    for (i = 0; i < elems->len; i++) {
        VmemDevice *d = lv_parse_device(elems->pdata[i]);

        if (!d) {
            g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_LOST,
                        "libvirt domain %s: cannot parse its memory device "
                        "XML: %.200s", lt->name, (char *)elems->pdata[i]);
            g_ptr_array_unref(devs);
            return NULL;
        }
        g_ptr_array_add(devs, d);
    }
    return devs;
}

/*
 * Boot RAM from the domain XML: the sum of the NUMA cells where there are
 * any, else <memory> less the memory devices' <size> (libvirt counts
 * those in <memory>).  No monitor passthrough needed.
 */
typedef struct {
    GSList *stack;
    guint64 mult;
    guint64 *into;
    guint64 memory, cells, devices;
} LvBoot;

static guint64 lv_attr_bytes(const char **names, const char **values,
                             const char *attr, guint64 *mult)
{
    const char *unit = NULL, *val = NULL;
    guint i;

    for (i = 0; names[i]; i++) {
        if (!strcmp(names[i], "unit")) {
            unit = values[i];
        } else if (attr && !strcmp(names[i], attr)) {
            val = values[i];
        }
    }
    *mult = lv_unit_bytes(unit);
    return val ? g_ascii_strtoull(val, NULL, 10) * *mult : 0;
}

static void lv_boot_start(GMarkupParseContext *ctx, const char *name,
                          const char **names, const char **values,
                          gpointer data, GError **errp)
{
    LvBoot *b = data;
    guint depth = g_slist_length(b->stack);
    const char *parent = b->stack ? b->stack->data : "";
    const char *grand = depth > 1 ? b->stack->next->data : "";

    (void)ctx;
    (void)errp;
    b->into = NULL;
    if (depth == 1 && !strcmp(name, "memory")) {
        lv_attr_bytes(names, values, NULL, &b->mult);
        b->into = &b->memory;
    } else if (!strcmp(name, "cell") && !strcmp(parent, "numa")) {
        b->cells += lv_attr_bytes(names, values, "memory", &b->mult);
    } else if (!strcmp(name, "size") && !strcmp(parent, "target") &&
               !strcmp(grand, "memory") && depth == 4) {
        lv_attr_bytes(names, values, NULL, &b->mult);
        b->into = &b->devices;
    }
    b->stack = g_slist_prepend(b->stack, g_strdup(name));
}

static void lv_boot_end(GMarkupParseContext *ctx, const char *name,
                        gpointer data, GError **errp)
{
    LvBoot *b = data;
    GSList *top = b->stack;

    (void)ctx;
    (void)name;
    (void)errp;
    b->stack = top->next;
    g_free(top->data);
    g_slist_free_1(top);
    b->into = NULL;
}

static void lv_boot_text(GMarkupParseContext *ctx, const char *text,
                         gsize len, gpointer data, GError **errp)
{
    LvBoot *b = data;
    g_autofree char *s = NULL;

    (void)ctx;
    (void)errp;
    if (b->into) {
        s = g_strstrip(g_strndup(text, len));
        *b->into += g_ascii_strtoull(s, NULL, 10) * b->mult;
    }
}

static gboolean lv_boot_ram(VmemTarget *t, guint64 *bytes, GError **errp)
{
    static const GMarkupParser parser = {
        .start_element = lv_boot_start,
        .end_element = lv_boot_end,
        .text = lv_boot_text,
    };
    LvTarget *lt = t->opaque;
    g_autofree char *xml = lv_xml(lt, errp);
    LvBoot b = { 0 };
    GMarkupParseContext *ctx;
    gboolean ok;

    if (!xml) {
        return FALSE;
    }
    ctx = g_markup_parse_context_new(&parser, 0, &b, NULL);
    ok = g_markup_parse_context_parse(ctx, xml, -1, NULL) &&
         g_markup_parse_context_end_parse(ctx, NULL);
    g_markup_parse_context_free(ctx);
    g_slist_free_full(b.stack, g_free);
    *bytes = b.cells ? b.cells :
             b.memory > b.devices ? b.memory - b.devices : 0;
    if (!ok || !*bytes || *bytes > VMEM_SIZE_MAX) {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_LOST,
                    "libvirt domain %s: cannot read its boot RAM from the "
                    "domain XML (<memory>, <numa> cells); give --base",
                    lt->name);
        return FALSE;
    }
    return TRUE;
}

static gboolean lv_oom_kills(VmemTarget *t, guint64 *n, char **where)
{
    LvTarget *lt = t->opaque;

    return lt->cg && cgroup_oom_kills(lt->cg, n, where);
}

/* --- through libvirt's monitor passthrough ------------------------------ */

static gboolean lv_resident(VmemTarget *t, guint64 *bytes, GError **errp)
{
    LvTarget *lt = t->opaque;
    g_autofree char *reply = NULL;
    g_autoptr(JsonNode) node = NULL;
    JsonArray *list;
    guint i;

    if (!lv_check(lt, errp)) {
        return FALSE;
    }
    if (virDomainQemuMonitorCommand(lt->dom,
            "{\"execute\":\"query-virtio-mem-footprint\"}", &reply, 0) < 0) {
        virResetLastError();
        return FALSE;   /* not allowed, or not QEMU: base from sizes */
    }
    node = json_from_string(reply, NULL);
    if (!node || !JSON_NODE_HOLDS_OBJECT(node) ||
        !json_object_has_member(json_node_get_object(node), "return")) {
        return FALSE;   /* CommandNotFound: a QEMU without the command */
    }
    list = json_object_get_array_member(json_node_get_object(node), "return");
    *bytes = 0;
    for (i = 0; list && i < json_array_get_length(list); i++) {
        JsonObject *o = json_array_get_object_element(list, i);

        *bytes += json_object_get_int_member_with_default(
                      o, "plugged-resident", 0) +
                  json_object_get_int_member_with_default(
                      o, "unplugged-resident", 0);
    }
    return TRUE;
}

/* --- memory parameters ---------------------------------------------------- */

static gboolean lv_charge(VmemTarget *t, guint64 *bytes, const char **name,
                          GError **errp)
{
    LvTarget *lt = t->opaque;
    virDomainMemoryStatStruct stats[VIR_DOMAIN_MEMORY_STAT_NR];
    int n, i;

    *name = "QEMU's RSS (libvirt memory stats)";
    if (!lv_check(lt, errp)) {
        return FALSE;
    }
    n = virDomainMemoryStats(lt->dom, stats, VIR_DOMAIN_MEMORY_STAT_NR, 0);
    if (n < 0) {
        lv_error(lt, errp, VMEM_EXIT_LOST, "read memory stats");
        return FALSE;
    }
    for (i = 0; i < n; i++) {
        if (stats[i].tag == VIR_DOMAIN_MEMORY_STAT_RSS) {
            *bytes = stats[i].val << 10;
            return TRUE;
        }
    }
    g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_LOST,
                "libvirt domain %s reports no RSS; give --base", lt->name);
    return FALSE;
}

static gboolean lv_get_limit(VmemTarget *t, guint64 *hard, guint64 *soft,
                             GError **errp)
{
    LvTarget *lt = t->opaque;
    g_autofree virTypedParameterPtr params = NULL;
    int n = 0, i;

    *hard = *soft = VMEM_UNLIMITED;
    if (!lv_check(lt, errp)) {
        return FALSE;
    }
    if (virDomainGetMemoryParameters(lt->dom, NULL, &n, 0) < 0) {
        lv_error(lt, errp, VMEM_EXIT_CGROUP_GONE, "read memory parameters");
        return FALSE;
    }
    params = g_new0(virTypedParameter, n);
    if (virDomainGetMemoryParameters(lt->dom, params, &n, 0) < 0) {
        lv_error(lt, errp, VMEM_EXIT_CGROUP_GONE, "read memory parameters");
        return FALSE;
    }
    for (i = 0; i < n; i++) {
        guint64 v = params[i].value.ul;
        guint64 bytes = v >= VIR_DOMAIN_MEMORY_PARAM_UNLIMITED ?
                        VMEM_UNLIMITED : v << 10;

        if (!strcmp(params[i].field, VIR_DOMAIN_MEMORY_HARD_LIMIT)) {
            *hard = bytes;
        } else if (!strcmp(params[i].field, VIR_DOMAIN_MEMORY_SOFT_LIMIT)) {
            *soft = bytes;
        }
    }
    return TRUE;
}

static gboolean lv_set_limit(VmemTarget *t, guint64 bytes, GError **errp)
{
    LvTarget *lt = t->opaque;
    virTypedParameter params[2] = { 0 };
    unsigned long long kib = bytes == VMEM_UNLIMITED ?
                             VIR_DOMAIN_MEMORY_PARAM_UNLIMITED :
                             (bytes + 1023) >> 10;

    if (!lv_check(lt, errp)) {
        return FALSE;
    }
    g_strlcpy(params[0].field, VIR_DOMAIN_MEMORY_HARD_LIMIT,
              VIR_TYPED_PARAM_FIELD_LENGTH);
    params[0].type = VIR_TYPED_PARAM_ULLONG;
    params[0].value.ul = kib;
    g_strlcpy(params[1].field, VIR_DOMAIN_MEMORY_SOFT_LIMIT,
              VIR_TYPED_PARAM_FIELD_LENGTH);
    params[1].type = VIR_TYPED_PARAM_ULLONG;
    params[1].value.ul = kib;
    if (virDomainSetMemoryParameters(lt->dom, params, 2,
                                     VIR_DOMAIN_AFFECT_LIVE) < 0) {
        lv_error(lt, errp, VMEM_EXIT_CGROUP_GONE, "set hard_limit/soft_limit");
        return FALSE;
    }
    return TRUE;
}

/* --- resize --------------------------------------------------------------- */

static gboolean lv_set_requested(VmemTarget *t, const VmemDevice *d,
                                 guint64 bytes, gboolean *sent, GError **errp)
{
    LvTarget *lt = t->opaque;
    g_autofree char *xml = NULL, *want = NULL, *elem = NULL;
    g_autoptr(GPtrArray) elems = NULL;
    g_autoptr(GRegex) re = NULL;
    guint i;

    *sent = FALSE;
    xml = lv_xml(lt, errp);
    if (!xml) {
        return FALSE;
    }
    elems = lv_memory_elements(xml);
    for (i = 0; i < elems->len && !elem; i++) {
        VmemDevice *o = lv_parse_device(elems->pdata[i]);

        if (o && !g_strcmp0(o->id, d->id)) {
            elem = g_strdup(elems->pdata[i]);
        }
        vmem_device_free(o);
    }
    if (!elem) {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_LOST,
                    "libvirt domain %s no longer has memory device %s",
                    lt->name, d->id);
        return FALSE;
    }
    want = g_strdup_printf("<requested unit='KiB'>%" G_GUINT64_FORMAT
                           "</requested>", bytes >> 10);
    re = g_regex_new("<requested[^>]*>[^<]*</requested>", 0, 0, NULL);
    g_free(xml);
    xml = g_regex_replace_literal(re, elem, -1, 0, want, 0, NULL);
    *sent = TRUE;
    if (virDomainUpdateDeviceFlags(lt->dom, xml, VIR_DOMAIN_AFFECT_LIVE) < 0) {
        lv_error(lt, errp, VMEM_EXIT_REFUSED, "update the memory device");
        return FALSE;
    }
    return TRUE;
}

/* --- events --------------------------------------------------------------- */

static void lv_size_changed(virConnectPtr conn, virDomainPtr dom,
                            const char *alias, unsigned long long size,
                            void *opaque)
{
    LvTarget *lt = opaque;

    (void)conn;
    (void)dom;
    (void)alias;
    (void)size;     /* old by the time it arrives: the XML is re-read */
    lt->changed = TRUE;
}

static void lv_lifecycle(virConnectPtr conn, virDomainPtr dom, int event,
                         int detail, void *opaque)
{
    LvTarget *lt = opaque;

    (void)conn;
    (void)dom;
    if (event == VIR_DOMAIN_EVENT_STOPPED ||
        event == VIR_DOMAIN_EVENT_CRASHED) {
        lt->lost = TRUE;
        g_free(lt->lost_why);
        lt->lost_why = g_strdup("the domain stopped");
        /* shut down or destroyed on purpose, not crashed or killed */
        lt->t->shut_down = event == VIR_DOMAIN_EVENT_STOPPED &&
            (detail == VIR_DOMAIN_EVENT_STOPPED_SHUTDOWN ||
             detail == VIR_DOMAIN_EVENT_STOPPED_DESTROYED ||
             detail == VIR_DOMAIN_EVENT_STOPPED_SAVED ||
             detail == VIR_DOMAIN_EVENT_STOPPED_MIGRATED);
    }
}

static void lv_closed(virConnectPtr conn, int reason, void *opaque)
{
    LvTarget *lt = opaque;

    (void)conn;
    lt->lost = TRUE;
    g_free(lt->lost_why);
    lt->lost_why = g_strdup_printf("the connection to libvirt closed "
                                   "(reason %d); is libvirtd running?",
                                   reason);
}

static void lv_timer(int timer, void *opaque)
{
    (void)timer;
    *(gboolean *)opaque = TRUE;
}

static gboolean lv_wait_event(VmemTarget *t, int timeout_ms,
                              gboolean *changed, GError **errp)
{
    LvTarget *lt = t->opaque;
    gboolean fired = FALSE, ok = TRUE;
    int timer = -1;

    lt->changed = FALSE;
    if (timeout_ms >= 0) {
        timer = virEventAddTimeout(timeout_ms, lv_timer, &fired, NULL);
    }
    while (!lt->changed && !fired && !lt->lost) {
        if (virEventRunDefaultImpl() < 0) {
            lv_error(lt, errp, VMEM_EXIT_LOST, "wait for events");
            ok = FALSE;
            break;
        }
    }
    if (timer >= 0) {
        virEventRemoveTimeout(timer);
    }
    *changed = lt->changed;
    return ok && lv_check(lt, errp);
}

static void lv_close(VmemTarget *t)
{
    LvTarget *lt = t->opaque;

    if (lt->conn) {
        if (lt->size_cb >= 0) {
            virConnectDomainEventDeregisterAny(lt->conn, lt->size_cb);
        }
        if (lt->life_cb >= 0) {
            virConnectDomainEventDeregisterAny(lt->conn, lt->life_cb);
        }
        virConnectUnregisterCloseCallback(lt->conn, lv_closed);
    }
    if (lt->dom) {
        virDomainFree(lt->dom);
    }
    if (lt->conn) {
        virConnectClose(lt->conn);
    }
    cgroup_free(lt->cg);
    g_free(lt->name);
    g_free(lt->uri);
    g_free(lt->lost_why);
    g_free(lt);
}

VmemTarget *vmem_target_libvirt_open(const char *uri, const char *domain,
                                     GError **errp)
{
    LvTarget *lt = g_new0(LvTarget, 1);
    VmemTarget *t = g_new0(VmemTarget, 1);
    char uuid[VIR_UUID_STRING_BUFLEN];

    t->opaque = lt;
    t->close = lv_close;
    lt->t = t;
    lt->name = g_strdup(domain);
    lt->uri = g_strdup(uri);
    lt->size_cb = lt->life_cb = -1;
    virSetErrorFunc(NULL, lv_quiet);
    if (virEventRegisterDefaultImpl() < 0) {
        lv_error(lt, errp, VMEM_EXIT_LOST, "start libvirt's event loop");
        goto fail;
    }
    lt->conn = virConnectOpen(uri);
    if (!lt->conn) {
        lv_error(lt, errp, VMEM_EXIT_LOST, "connect");
        goto fail;
    }
    lt->dom = virDomainLookupByName(lt->conn, domain);
    if (!lt->dom) {
        virResetLastError();
        lt->dom = virDomainLookupByUUIDString(lt->conn, domain);
    }
    if (!lt->dom) {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_LOST,
                    "libvirt (%s) has no domain '%s'; see 'virsh -c %s list "
                    "--all'", uri, domain, uri);
        virResetLastError();
        goto fail;
    }
    if (virDomainIsActive(lt->dom) != 1) {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_LOST,
                    "libvirt domain %s (%s) is not running; start it first",
                    domain, uri);
        goto fail;
    }
    /* Notice a dead daemon within seconds, not at the next call. */
    virConnectSetKeepAlive(lt->conn, 5, 3);
    virConnectRegisterCloseCallback(lt->conn, lv_closed, lt, NULL);
    lt->size_cb = virConnectDomainEventRegisterAny(lt->conn, lt->dom,
        VIR_DOMAIN_EVENT_ID_MEMORY_DEVICE_SIZE_CHANGE,
        VIR_DOMAIN_EVENT_CALLBACK(lv_size_changed), lt, NULL);
    lt->life_cb = virConnectDomainEventRegisterAny(lt->conn, lt->dom,
        VIR_DOMAIN_EVENT_ID_LIFECYCLE,
        VIR_DOMAIN_EVENT_CALLBACK(lv_lifecycle), lt, NULL);
    if (lt->size_cb < 0 || lt->life_cb < 0) {
        lv_error(lt, errp, VMEM_EXIT_LOST, "register for events");
        goto fail;
    }
    if (virDomainGetUUIDString(lt->dom, uuid) < 0) {
        lv_error(lt, errp, VMEM_EXIT_LOST, "read the domain's UUID");
        goto fail;
    }
    t->key = g_strdup_printf("domain-%s", uuid);
    /*
     * QEMU's pid, where libvirt runs it on this host: for the instance
     * and for the cgroup that counts OOM kills (libvirt's API has
     * neither).
     */
    t->pid = vmem_proc_find_uuid(uuid);
    t->instance = t->pid ? vmem_proc_instance(t->pid) :
                  g_strdup_printf("%s:%d", uuid, (int)virDomainGetID(lt->dom));
    if (t->pid) {
        g_autofree char *cg = vmem_proc_memory_cgroup(t->pid);

        lt->cg = cg ? cgroup_open(cg, NULL) : NULL;
    }
    t->what = g_strdup_printf("libvirt domain %s (%s)", domain, uri);
    t->limit_name = g_strdup_printf("hard_limit and soft_limit of domain %s",
                                    domain);
    t->soft_name = g_strdup("soft_limit");
    t->query = lv_query;
    t->resident = lv_resident;
    t->boot_ram = lv_boot_ram;
    t->oom_kills = lv_oom_kills;
    t->charge = lv_charge;
    t->get_limit = lv_get_limit;
    t->set_limit = lv_set_limit;
    t->set_requested = lv_set_requested;
    t->wait_event = lv_wait_event;
    return t;

fail:
    vmem_target_close(t);
    return NULL;
}
