// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * A VM reached through its QMP socket, its limit in a cgroup directory.
 */
#include <stdlib.h>
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

/* query-memory-size-summary: boot RAM, in stock QEMU too. */
static gboolean qmp_target_boot_ram(VmemTarget *t, guint64 *bytes,
                                    GError **errp)
{
    QmpTarget *qt = t->opaque;
    g_autoptr(JsonNode) ret = NULL;
    gint64 v;

    ret = qmp_call(qt->qmp, "query-memory-size-summary", NULL, NULL, NULL,
                   errp);
    if (!ret) {
        return FALSE;
    }
    v = JSON_NODE_HOLDS_OBJECT(ret) ?
        member_int(json_node_get_object(ret), "base-memory") : -1;
    if (v < 0 || (guint64)v > VMEM_SIZE_MAX) {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_REFUSED,
                    "%s: query-memory-size-summary gave no base-memory; "
                    "give --base", t->what);
        return FALSE;
    }
    *bytes = v;
    return TRUE;
}

static gboolean qmp_target_oom_kills(VmemTarget *t, guint64 *n, char **where)
{
    QmpTarget *qt = t->opaque;

    return cgroup_oom_kills(qt->cg, n, where);
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
    gboolean ok;
    JsonObject *ev;

    *changed = FALSE;
    ok = qmp_wait_event(qt->qmp, timeout_ms, errp);
    /* Also when the connection is gone: a SHUTDOWN may precede its end. */
    while ((ev = qmp_pop_event(qt->qmp))) {
        const char *name = json_object_get_string_member_with_default(
                               ev, "event", "");

        if (!strcmp(name, "MEMORY_DEVICE_SIZE_CHANGE")) {
            *changed = TRUE;
        } else if (!strcmp(name, "SHUTDOWN")) {
            t->shut_down = TRUE;    /* and QEMU exits, unless -no-shutdown */
        }
        json_object_unref(ev);
    }
    return ok;
}

static void qmp_target_close(VmemTarget *t)
{
    QmpTarget *qt = t->opaque;

    qmp_close(qt->qmp);
    cgroup_free(qt->cg);
    g_free(qt);
}

/*
 * The socket and the cgroup must be one VM's: the process listening on
 * the socket (SO_PEERCRED) is in the cgroup or below it.  Otherwise a
 * typo in either would have the tool limit one VM by another's sizes.
 */
static gboolean qmp_target_same_vm(VmemTarget *t, const char *socket_path,
                                   const char *cgroup_dir, GError **errp)
{
    g_autofree char *in = NULL;
    gboolean found;

    if (t->pid <= 0) {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_USAGE,
                    "cannot tell which process listens on QMP socket %s, "
                    "so not whether it is in cgroup %s; --no-pid-check "
                    "skips this check", socket_path, cgroup_dir);
        return FALSE;
    }
    if (!vmem_cgroup_holds(cgroup_dir, t->pid, &found, errp)) {
        g_autofree char *msg = NULL;

        g_prefix_error(errp, "cannot check that QEMU (pid %d) of %s is in "
                       "the cgroup: ", t->pid, socket_path);
        msg = g_strdup_printf("%s (--no-pid-check skips this check)",
                              (*errp)->message);
        g_free((*errp)->message);
        (*errp)->message = g_steal_pointer(&msg);
        return FALSE;
    }
    if (found) {
        return TRUE;
    }
    in = vmem_proc_memory_cgroup(t->pid);
    g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_USAGE,
                "QMP socket %s belongs to QEMU pid %d, which is not in "
                "cgroup %s (nor below it) but in %s: the socket and the "
                "cgroup are not the same VM.  Fix --qmp or --cgroup "
                "(--no-pid-check skips this check)", socket_path, t->pid,
                cgroup_dir, in ? in : "another cgroup");
    return FALSE;
}

/*
 * The lock and state files are the cgroup's, what two instances would
 * both write; known before QEMU is reached, so that a second follow is
 * told so at once and not left waiting for a monitor the first one holds.
 */
char *vmem_target_qmp_key(const char *cgroup_dir)
{
    g_autofree char *real = realpath(cgroup_dir, NULL);
    g_autofree char *hash = g_compute_checksum_for_string(
        G_CHECKSUM_SHA256, real ? real : cgroup_dir, -1);

    return g_strdup_printf("cgroup-%.16s", hash);
}

VmemTarget *vmem_target_qmp_open(const char *socket_path,
                                 const char *cgroup_dir, gboolean pid_check,
                                 GError **errp)
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
    t->close = qmp_target_close;
    t->what = g_strdup_printf("QMP socket %s", socket_path);
    t->pid = qmp_peer_pid(qt->qmp);
    if (pid_check && !qmp_target_same_vm(t, socket_path, cgroup_dir, errp)) {
        vmem_target_close(t);
        return NULL;
    }
    t->instance = vmem_proc_instance(t->pid);
    t->key = vmem_target_qmp_key(cgroup_dir);
    t->limit_name = g_strdup_printf("%s%s%s of cgroup %s (v%d)",
                                    qt->cg->limit_file,
                                    qt->cg->soft_file ? " and " : "",
                                    qt->cg->soft_file ? qt->cg->soft_file : "",
                                    cgroup_dir, qt->cg->version);
    t->soft_name = g_strdup(qt->cg->soft_file);
    t->query = qmp_target_query;
    t->resident = qmp_target_resident;
    t->boot_ram = qmp_target_boot_ram;
    t->oom_kills = qmp_target_oom_kills;
    t->charge = qmp_target_charge;
    t->get_limit = qmp_target_get_limit;
    t->set_limit = qmp_target_set_limit;
    t->set_requested = qmp_target_set_requested;
    t->wait_event = qmp_target_wait_event;
    return t;
}
