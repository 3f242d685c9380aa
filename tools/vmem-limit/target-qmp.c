// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * A VM reached through its QMP socket, its limit in a cgroup directory.
 */
#include <string.h>

#include "vmem-limit.h"
#include "cgroup.h"
#include "qmp.h"

typedef struct {
    Qmp *qmp;
    Cgroup *cg;
} QmpTarget;

static gint64 member_int(JsonObject *o, const char *name)
{
    return json_object_has_member(o, name) ?
           json_object_get_int_member(o, name) : -1;
}

static GPtrArray *qmp_target_query(VmemTarget *t, GError **errp)
{
    QmpTarget *qt = t->opaque;
    g_autoptr(JsonNode) ret = NULL;
    GPtrArray *devs;
    JsonArray *list;
    guint i;

    ret = qmp_call(qt->qmp, "query-memory-devices", NULL, NULL, NULL, errp);
    if (!ret) {
        return NULL;
    }
    devs = g_ptr_array_new_with_free_func((GDestroyNotify)vmem_device_free);
    list = JSON_NODE_HOLDS_ARRAY(ret) ? json_node_get_array(ret) : NULL;
    for (i = 0; list && i < json_array_get_length(list); i++) {
        JsonObject *o = json_array_get_object_element(list, i);
        JsonObject *data;
        VmemDevice *d;

        if (!o || g_strcmp0(json_object_get_string_member_with_default(
                                o, "type", ""), "virtio-mem")) {
            continue;
        }
        data = json_object_get_object_member(o, "data");
        if (!data) {
            continue;
        }
        d = g_new0(VmemDevice, 1);
        d->id = g_strdup(json_object_get_string_member_with_default(
                             data, "id", NULL));
        d->memdev = g_strdup(json_object_get_string_member_with_default(
                                 data, "memdev", ""));
        d->size = member_int(data, "size");
        d->requested = member_int(data, "requested-size");
        d->max_size = member_int(data, "max-size");
        d->block_size = member_int(data, "block-size");
        d->vmemmap = member_int(data, "vmemmap-size");
        g_ptr_array_add(devs, d);
    }
    return devs;
}

/* query-virtio-mem-footprint: the fork's host-measured resident bytes. */
static gboolean qmp_target_resident(VmemTarget *t, guint64 *bytes,
                                    GError **errp)
{
    QmpTarget *qt = t->opaque;
    g_autoptr(JsonNode) ret = NULL;
    g_autoptr(GError) err = NULL;
    g_autofree char *class = NULL;
    JsonArray *list;
    guint i;

    ret = qmp_call(qt->qmp, "query-virtio-mem-footprint", NULL, &class, NULL,
                   &err);
    if (!ret) {
        if (!g_strcmp0(class, "CommandNotFound")) {
            return FALSE;
        }
        g_propagate_error(errp, g_steal_pointer(&err));
        return FALSE;
    }
    *bytes = 0;
    list = JSON_NODE_HOLDS_ARRAY(ret) ? json_node_get_array(ret) : NULL;
    for (i = 0; list && i < json_array_get_length(list); i++) {
        JsonObject *o = json_array_get_object_element(list, i);

        *bytes += MAX(member_int(o, "plugged-resident"), 0) +
                  MAX(member_int(o, "unplugged-resident"), 0);
    }
    return TRUE;
}

static gboolean qmp_target_charge(VmemTarget *t, guint64 *bytes,
                                  const char **name, GError **errp)
{
    QmpTarget *qt = t->opaque;

    *name = qt->cg->charge_file;
    return cgroup_charge(qt->cg, bytes, errp);
}

static gboolean qmp_target_get_limit(VmemTarget *t, guint64 *hard,
                                     guint64 *soft, GError **errp)
{
    QmpTarget *qt = t->opaque;

    return cgroup_get_limit(qt->cg, hard, soft, errp);
}

static gboolean qmp_target_set_limit(VmemTarget *t, guint64 bytes,
                                     GError **errp)
{
    QmpTarget *qt = t->opaque;

    return cgroup_set_limit(qt->cg, bytes, errp);
}

static gboolean qmp_target_set_requested(VmemTarget *t, const VmemDevice *d,
                                         guint64 bytes, gboolean *sent,
                                         GError **errp)
{
    QmpTarget *qt = t->opaque;
    g_autoptr(JsonNode) ret = NULL;
    JsonObject *args = json_object_new();

    json_object_set_string_member(args, "path", d->id);
    json_object_set_string_member(args, "property", "requested-size");
    json_object_set_int_member(args, "value", (gint64)bytes);
    ret = qmp_call(qt->qmp, "qom-set", args, NULL, sent, errp);
    return ret != NULL;
}

static gboolean qmp_target_wait_event(VmemTarget *t, int timeout_ms,
                                      gboolean *changed, GError **errp)
{
    QmpTarget *qt = t->opaque;
    JsonObject *ev;

    *changed = FALSE;
    if (!qmp_wait_event(qt->qmp, timeout_ms, errp)) {
        return FALSE;
    }
    while ((ev = qmp_pop_event(qt->qmp))) {
        const char *name = json_object_get_string_member_with_default(
                               ev, "event", "");

        if (!strcmp(name, "MEMORY_DEVICE_SIZE_CHANGE")) {
            *changed = TRUE;
        }
        json_object_unref(ev);
    }
    return TRUE;
}

static void qmp_target_close(VmemTarget *t)
{
    QmpTarget *qt = t->opaque;

    qmp_close(qt->qmp);
    cgroup_free(qt->cg);
    g_free(qt);
}

VmemTarget *vmem_target_qmp_open(const char *socket_path,
                                 const char *cgroup_dir, GError **errp)
{
    QmpTarget *qt = g_new0(QmpTarget, 1);
    VmemTarget *t;

    /* The cgroup first: checking it needs no connection to QEMU. */
    qt->cg = cgroup_open(cgroup_dir, errp);
    if (!qt->cg) {
        g_free(qt);
        return NULL;
    }
    qt->qmp = qmp_connect(socket_path, errp);
    if (!qt->qmp) {
        cgroup_free(qt->cg);
        g_free(qt);
        return NULL;
    }
    t = g_new0(VmemTarget, 1);
    t->opaque = qt;
    t->what = g_strdup_printf("QMP socket %s", socket_path);
    t->limit_name = g_strdup_printf("%s%s%s of cgroup %s (v%d)",
                                    qt->cg->limit_file,
                                    qt->cg->soft_file ? " and " : "",
                                    qt->cg->soft_file ? qt->cg->soft_file : "",
                                    cgroup_dir, qt->cg->version);
    t->soft_name = g_strdup(qt->cg->soft_file);
    t->query = qmp_target_query;
    t->resident = qmp_target_resident;
    t->charge = qmp_target_charge;
    t->get_limit = qmp_target_get_limit;
    t->set_limit = qmp_target_set_limit;
    t->set_requested = qmp_target_set_requested;
    t->wait_event = qmp_target_wait_event;
    t->close = qmp_target_close;
    return t;
}
