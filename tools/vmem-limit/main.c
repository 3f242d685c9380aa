// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * vmem-limit: keep a VM's memory cgroup limit equal to
 *
 *     base + sum over its virtio-mem devices of max(size, requested-size)
 *          + margin
 *
 * max(size, requested-size) is what a device may hold at any moment of a
 * resize: growing, the guest plugs up to requested-size; shrinking, it
 * holds size until it has unplugged.  So the limit is raised before a
 * grow is asked for and lowered only once a shrink has settled, and the
 * VMM is never OOM-killed by its own resize.
 */
#include <locale.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <json-glib/json-glib.h>

#include "vmem-limit.h"

#define DEFAULT_MARGIN  (64ULL << 20)
#define DEFAULT_TIMEOUT 300
#define DEFAULT_URI     "qemu:///system"
/* How often resize reports progress while it waits. */
#define PROGRESS_EVERY_US (2 * G_USEC_PER_SEC)

typedef struct {
    VmemTarget *t;
    guint64 base;
    guint64 margin;
    char *base_how;
    char *margin_how;
    gboolean dry_run;
} Ctx;

/* Command line. */
static char *opt_qmp;
static char *opt_cgroup;
static char *opt_domain;
static char *opt_connect;
static char *opt_base;
static char *opt_margin;
static gboolean opt_dry_run;
static gint opt_timeout = DEFAULT_TIMEOUT;
static gdouble opt_interval = 1.0;
static gboolean opt_once;
static gboolean opt_json;

static GOptionEntry entries[] = {
    { "qmp", 'q', 0, G_OPTION_ARG_FILENAME, &opt_qmp,
      "QMP unix socket of the VM's QEMU (needs --cgroup)", "PATH" },
    { "cgroup", 'c', 0, G_OPTION_ARG_FILENAME, &opt_cgroup,
      "the VM's memory cgroup directory: memory.max and memory.high "
      "(v2) or memory.limit_in_bytes (v1), told by the files in it", "DIR" },
    { "domain", 'd', 0, G_OPTION_ARG_STRING, &opt_domain,
      "libvirt domain (name or UUID) instead of --qmp/--cgroup; the limit "
      "is its hard_limit and soft_limit", "NAME" },
    { "connect", 0, 0, G_OPTION_ARG_STRING, &opt_connect,
      "libvirt URI (default " DEFAULT_URI ")", "URI" },
    { "base", 'b', 0, G_OPTION_ARG_STRING, &opt_base,
      "memory of the VM outside its devices (default: measured, see above)",
      "SIZE" },
    { "margin", 'm', 0, G_OPTION_ARG_STRING, &opt_margin,
      "room above base and devices (default 64M)", "SIZE" },
    { "dry-run", 'n', 0, G_OPTION_ARG_NONE, &opt_dry_run,
      "say what would be done, change nothing", NULL },
    { "timeout", 't', 0, G_OPTION_ARG_INT, &opt_timeout,
      "resize: seconds to wait for size == requested-size (default 300)",
      "SECONDS" },
    { "interval", 'i', 0, G_OPTION_ARG_DOUBLE, &opt_interval,
      "follow: re-read the devices this often even without an event, "
      "0 for events only (default 1)", "SECONDS" },
    { "once", 0, 0, G_OPTION_ARG_NONE, &opt_once,
      "follow: set the limit once and exit", NULL },
    { "json", 'j', 0, G_OPTION_ARG_NONE, &opt_json,
      "show: print one JSON object (bytes) instead of text", NULL },
    { NULL }
};

static const char summary[] =
"Keeps the memory limit of a VM's cgroup equal to\n"
"\n"
"  base + sum over its virtio-mem devices of max(size, requested-size) + margin\n"
"\n"
"so that the VM may hold all that its devices plug or are asked to plug.\n"
"\n"
"base    what the VM holds outside its virtio-mem devices: QEMU itself and\n"
"        the guest's boot RAM.  Measured when the tool starts, unless\n"
"        --base is given: the charge (the cgroup's memory.current or\n"
"        memory.usage_in_bytes; with libvirt, QEMU's RSS) minus the host\n"
"        bytes resident in the devices' memory as QEMU measures them\n"
"        (query-virtio-mem-footprint), or minus the devices' sizes with a\n"
"        QEMU that lacks that command.  Boot RAM counts only as far as the\n"
"        guest has touched it: give --base for a figure that holds from\n"
"        boot on.\n"
"margin  room for what grows besides: QEMU's heap and page tables, and the\n"
"        memmap a guest keeps in boot RAM when its driver does not place it\n"
"        on the hot-added memory (stock virtio_mem: 1/64 of all it ever\n"
"        plugged).  Default 64 MiB.\n"
"\n"
"Both are shown by every command.  SIZE is bytes or a number with K, M, G\n"
"or T (binary units).  The limit is rounded up to a 4 KiB page.\n"
"\n"
"Commands:\n"
"  show                 print the devices, base, margin, charge, the limit\n"
"                       now and the limit wanted; changes nothing\n"
"  resize DEVICE SIZE   set the requested-size of DEVICE (its id, or its\n"
"                       libvirt alias) to SIZE.  A grow raises the limit\n"
"                       first; a shrink lowers it only after the device has\n"
"                       settled (size == requested-size), waited for up to\n"
"                       --timeout seconds with progress shown\n"
"  follow               set the limit now, then keep it right while others\n"
"                       resize the devices: on each MEMORY_DEVICE_SIZE_CHANGE\n"
"                       event, and every --interval (requested-size changes\n"
"                       send no event), the devices are read again; the\n"
"                       limit is lowered only on a fresh reading and never\n"
"                       below the charge";

static const char description[] =
"Exit status:\n"
"  0  done\n"
"  1  bad command line, unknown device, or a size the device cannot take\n"
"  2  no permission to read or write the limit, or to reach the VM\n"
"  3  the cgroup directory or its memory files are gone\n"
"  4  QMP socket or libvirt unreachable, or lost on the way\n"
"  5  QEMU or libvirt refused the resize\n"
"  6  the resize did not settle within --timeout\n"
"  7  the wanted limit is below the charge; not lowered\n"
"On any failure the limit is left as it was before the command, except\n"
"after a grow that was sent: then it stays raised (the device may still\n"
"plug up to requested-size), and the message says so.\n"
"\n"
"Example (QEMU started with -chardev socket,id=m1,path=/run/vm1.qmp,\n"
"server=on,wait=off -mon chardev=m1,mode=control, in cgroup vm1):\n"
"  vmem-limit -q /run/vm1.qmp -c /sys/fs/cgroup/vm1 resize vm0 4G\n"
"  vmem-limit -q /run/vm1.qmp -c /sys/fs/cgroup/vm1 --margin 128M follow\n"
"  vmem-limit -d vm1 resize virtiomem0 2G\n"
"\n"
"See also docs/system/vmem-limit.rst.";

static guint64 page_up(guint64 bytes)
{
    return (bytes + 4095) & ~G_GUINT64_CONSTANT(4095);
}

static void say(const char *fmt, ...) G_GNUC_PRINTF(1, 2);
static void say(const char *fmt, ...)
{
    va_list ap;

    va_start(ap, fmt);
    vprintf(fmt, ap);
    va_end(ap);
    putchar('\n');
    fflush(stdout);
}

/* Adds a sentence to an error's message: what became of the limit. */
static void error_add(GError *err, const char *fmt, ...) G_GNUC_PRINTF(2, 3);
static void error_add(GError *err, const char *fmt, ...)
{
    g_autofree char *more = NULL;
    char *msg;
    va_list ap;

    va_start(ap, fmt);
    more = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    msg = g_strdup_printf("%s%s %s", err->message,
                          g_str_has_suffix(err->message, "?") ? "" : ".",
                          more);
    g_free(err->message);
    err->message = msg;
}

static const VmemDevice *find_device(GPtrArray *devs, const char *id)
{
    guint i;

    for (i = 0; i < devs->len; i++) {
        const VmemDevice *d = devs->pdata[i];

        if (!g_strcmp0(d->id, id)) {
            return d;
        }
    }
    return NULL;
}

/* sum of max(size, requested-size); dev_id's requested-size taken as req. */
static guint64 devices_sum(GPtrArray *devs, const char *dev_id, guint64 req)
{
    guint64 sum = 0;
    guint i;

    for (i = 0; i < devs->len; i++) {
        const VmemDevice *d = devs->pdata[i];
        guint64 r = dev_id && !g_strcmp0(d->id, dev_id) ? req : d->requested;

        sum += MAX(d->size, r);
    }
    return sum;
}

static guint64 wanted_limit(Ctx *c, GPtrArray *devs, const char *dev_id,
                            guint64 req)
{
    return page_up(c->base + devices_sum(devs, dev_id, req) + c->margin);
}

static gboolean measure_base(Ctx *c, GPtrArray *devs, GError **errp)
{
    g_autofree char *charge_s = NULL, *res_s = NULL;
    g_autoptr(GError) err = NULL;
    guint64 charge, resident = 0, sizes = 0;
    const char *charge_name;
    guint i;

    if (opt_base) {
        c->base_how = g_strdup("given");
        return TRUE;
    }
    if (!c->t->charge(c->t, &charge, &charge_name, errp)) {
        return FALSE;
    }
    charge_s = vmem_fmt_size(charge);
    if (c->t->resident(c->t, &resident, &err)) {
        res_s = vmem_fmt_size(resident);
        c->base = charge > resident ? charge - resident : 0;
        c->base_how = g_strdup_printf("measured: %s %s - %s resident in the "
                                      "devices (query-virtio-mem-footprint)",
                                      charge_name, charge_s, res_s);
        return TRUE;
    }
    if (err) {
        g_propagate_error(errp, g_steal_pointer(&err));
        return FALSE;
    }
    for (i = 0; i < devs->len; i++) {
        sizes += ((VmemDevice *)devs->pdata[i])->size;
    }
    res_s = vmem_fmt_size(sizes);
    c->base = charge > sizes ? charge - sizes : 0;
    c->base_how = g_strdup_printf("measured: %s %s - %s plugged (this QEMU "
                                  "cannot measure resident bytes; assumes "
                                  "all plugged memory is resident)",
                                  charge_name, charge_s, res_s);
    return TRUE;
}

static void print_budget(Ctx *c)
{
    g_autofree char *b = vmem_fmt_size(c->base);
    g_autofree char *m = vmem_fmt_size(c->margin);

    say("base   %s (%s)", b, c->base_how);
    say("margin %s (%s)", m, c->margin_how);
}

/*
 * Brings the limit to want.  Lowering (or leaving "unlimited") happens
 * only while the charge fits under the new value, so the tool never makes
 * the kernel reclaim from, or OOM-kill, the VM.  why: what the new value
 * is for, for the log line.
 */
static gboolean apply_limit(Ctx *c, guint64 want, const char *why,
                            GError **errp)
{
    g_autofree char *want_s = vmem_fmt_size(want);
    g_autofree char *hard_s = NULL;
    guint64 hard, soft, charge;
    const char *charge_name;
    const char *verb;

    if (!c->t->get_limit(c->t, &hard, &soft, errp)) {
        return FALSE;
    }
    hard_s = vmem_fmt_size(hard);
    if (hard == want && (!c->t->soft_name || soft == want)) {
        say("limit  %s of %s stays (%s)", want_s, c->t->limit_name, why);
        return TRUE;
    }
    if (want < hard) {
        if (!c->t->charge(c->t, &charge, &charge_name, errp)) {
            return FALSE;
        }
        if (charge > want) {
            g_autofree char *charge_s = vmem_fmt_size(charge);

            g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_BELOW_CHARGE,
                        "not lowering %s from %s to %s: the charge (%s) is "
                        "%s, above it; the limit stays at %s.  Raise --margin "
                        "or --base, or let the guest free memory first",
                        c->t->limit_name, hard_s, want_s, charge_name,
                        charge_s, hard_s);
            return FALSE;
        }
    }
    verb = want > hard ? "raise" : want < hard ? "lower" : "set";
    if (c->dry_run) {
        say("would %s %s from %s to %s (%s)", verb, c->t->limit_name,
            hard_s, want_s, why);
        return TRUE;
    }
    if (!c->t->set_limit(c->t, want, errp)) {
        return FALSE;
    }
    say("%s %s from %s to %s (%s)", want > hard ? "raised" :
        want < hard ? "lowered" : "set", c->t->limit_name, hard_s,
        want_s, why);
    return TRUE;
}

static void print_device(const VmemDevice *d)
{
    g_autofree char *size = vmem_fmt_size(d->size);
    g_autofree char *req = vmem_fmt_size(d->requested);
    g_autofree char *max = vmem_fmt_size(d->max_size);
    g_autofree char *vm = d->vmemmap >= 0 ? vmem_fmt_size(d->vmemmap) : NULL;

    say("device %s: size %s, requested-size %s, max %s%s%s", d->id ? d->id :
        "(no id)", size, req, max, vm ? ", vmemmap-size " : "", vm ? vm : "");
}

static int cmd_show(Ctx *c, GError **errp)
{
    g_autoptr(GPtrArray) devs = c->t->query(c->t, errp);
    guint64 charge, hard, soft, want;
    const char *charge_name;
    guint i;

    if (!devs || !measure_base(c, devs, errp) ||
        !c->t->charge(c->t, &charge, &charge_name, errp) ||
        !c->t->get_limit(c->t, &hard, &soft, errp)) {
        return 1;
    }
    want = wanted_limit(c, devs, NULL, 0);
    if (opt_json) {
        g_autoptr(JsonBuilder) b = json_builder_new();
        g_autoptr(JsonNode) root = NULL;
        g_autofree char *text = NULL;

        json_builder_begin_object(b);
#define MEMBER_INT(k, v) (json_builder_set_member_name(b, k), \
                          json_builder_add_int_value(b, v))
#define MEMBER_STR(k, v) (json_builder_set_member_name(b, k), \
                          json_builder_add_string_value(b, v))
        MEMBER_STR("target", c->t->what);
        MEMBER_STR("limit-name", c->t->limit_name);
        MEMBER_INT("base", c->base);
        MEMBER_STR("base-source", c->base_how);
        MEMBER_INT("margin", c->margin);
        MEMBER_STR("margin-source", c->margin_how);
        MEMBER_INT("devices", devices_sum(devs, NULL, 0));
        MEMBER_INT("charge", charge);
        MEMBER_INT("limit", hard == VMEM_UNLIMITED ? -1 : (gint64)hard);
        MEMBER_INT("soft-limit", soft == VMEM_UNLIMITED ? -1 : (gint64)soft);
        MEMBER_INT("wanted", want);
        json_builder_set_member_name(b, "virtio-mem");
        json_builder_begin_array(b);
        for (i = 0; i < devs->len; i++) {
            const VmemDevice *d = devs->pdata[i];

            json_builder_begin_object(b);
            if (d->id) {
                MEMBER_STR("id", d->id);
            }
            MEMBER_INT("size", d->size);
            MEMBER_INT("requested-size", d->requested);
            MEMBER_INT("max-size", d->max_size);
            MEMBER_INT("block-size", d->block_size);
            if (d->vmemmap >= 0) {
                MEMBER_INT("vmemmap-size", d->vmemmap);
            }
            json_builder_end_object(b);
        }
        json_builder_end_array(b);
        json_builder_end_object(b);
#undef MEMBER_INT
#undef MEMBER_STR
        root = json_builder_get_root(b);
        text = json_to_string(root, TRUE);
        say("%s", text);
        return 0;
    } else {
        g_autofree char *charge_s = vmem_fmt_size(charge);
        g_autofree char *hard_s = vmem_fmt_size(hard);
        g_autofree char *soft_s = vmem_fmt_size(soft);
        g_autofree char *want_s = vmem_fmt_size(want);
        g_autofree char *sum_s = vmem_fmt_size(devices_sum(devs, NULL, 0));

        say("target %s; limit: %s", c->t->what, c->t->limit_name);
        for (i = 0; i < devs->len; i++) {
            print_device(devs->pdata[i]);
        }
        print_budget(c);
        say("charge %s (%s)", charge_s, charge_name);
        if (c->t->soft_name) {
            say("limit  %s now (%s %s); wanted %s = base + %s + margin",
                hard_s, c->t->soft_name, soft_s, want_s, sum_s);
        } else {
            say("limit  %s now; wanted %s = base + %s + margin", hard_s,
                want_s, sum_s);
        }
    }
    return 0;
}

/* Waits for dev to settle at size == req, reporting progress. */
static gboolean wait_settled(Ctx *c, const char *id, guint64 req,
                             GError **errp)
{
    gint64 start = g_get_monotonic_time();
    gint64 deadline = start + (gint64)opt_timeout * G_USEC_PER_SEC;
    gint64 last_report = start;
    guint64 last_size = G_MAXUINT64;
    g_autofree char *req_s = vmem_fmt_size(req);

    for (;;) {
        g_autoptr(GPtrArray) devs = c->t->query(c->t, errp);
        const VmemDevice *d;
        gboolean changed;
        gint64 now, left;

        if (!devs) {
            return FALSE;
        }
        d = find_device(devs, id);
        if (!d) {
            g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_LOST,
                        "device %s disappeared from %s during the resize",
                        id, c->t->what);
            return FALSE;
        }
        now = g_get_monotonic_time();
        if (d->size == req) {
            g_autofree char *size_s = vmem_fmt_size(d->size);

            say("settled %s: size %s == requested-size after %.1f s", id,
                size_s, (now - start) / (double)G_USEC_PER_SEC);
            return TRUE;
        }
        if (d->size != last_size || now - last_report >= PROGRESS_EVERY_US) {
            g_autofree char *size_s = vmem_fmt_size(d->size);

            say("waiting %s: size %s, requested-size %s (%.1f s)", id, size_s,
                req_s, (now - start) / (double)G_USEC_PER_SEC);
            last_size = d->size;
            last_report = now;
        }
        left = (deadline - now) / 1000;
        if (left <= 0) {
            g_autofree char *size_s = vmem_fmt_size(d->size);

            g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_TIMEOUT,
                        "%s did not settle within %d s: size %s, "
                        "requested-size %s; the limit still covers both. "
                        "Check the guest's virtio_mem driver (dmesg), then "
                        "run 'follow --once' or resize again",
                        id, opt_timeout, size_s, req_s);
            return FALSE;
        }
        /* An event wakes us early; 250 ms bounds a missed one. */
        if (!c->t->wait_event(c->t, (int)MIN(left, 250), &changed, errp)) {
            return FALSE;
        }
    }
}

static int cmd_resize(Ctx *c, const char *id, const char *size_arg,
                      GError **errp)
{
    g_autoptr(GPtrArray) devs = NULL;
    g_autofree char *req_s = NULL, *why = NULL;
    const VmemDevice *d;
    guint64 req, during, hard, soft;
    gboolean raised = FALSE, sent = FALSE;
    GError *err = NULL;

    if (!vmem_parse_size(size_arg, &req)) {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_USAGE,
                    "'%s' is not a size; write e.g. 4G, 512M or bytes",
                    size_arg);
        return 1;
    }
    req_s = vmem_fmt_size(req);
    devs = c->t->query(c->t, errp);
    if (!devs) {
        return 1;
    }
    d = find_device(devs, id);
    if (!d) {
        GString *ids = g_string_new(NULL);
        guint i;

        for (i = 0; i < devs->len; i++) {
            const VmemDevice *o = devs->pdata[i];

            g_string_append_printf(ids, "%s%s", i ? ", " : "",
                                   o->id ? o->id : "(one without id)");
        }
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_USAGE,
                    "%s has no virtio-mem device '%s'; it has: %s", c->t->what,
                    id, ids->len ? ids->str : "none");
        g_string_free(ids, TRUE);
        return 1;
    }
    if (req > d->max_size || (d->block_size && req % d->block_size)) {
        g_autofree char *max_s = vmem_fmt_size(d->max_size);
        g_autofree char *blk_s = vmem_fmt_size(d->block_size);

        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_USAGE,
                    "%s cannot take requested-size %s: it must be a "
                    "multiple of its block size %s and at most %s",
                    id, req_s, blk_s, max_s);
        return 1;
    }
    if (!measure_base(c, devs, errp)) {
        return 1;
    }
    print_budget(c);
    print_device(d);

    /* 1. Room for max(size, req) before the device is asked for it. */
    during = wanted_limit(c, devs, id, req);
    if (!c->t->get_limit(c->t, &hard, &soft, errp)) {
        return 1;
    }
    if (hard == VMEM_UNLIMITED || hard < during) {
        why = g_strdup_printf("before %s %s to %s", req > d->size ?
                              "growing" : "resizing", id, req_s);
        if (!apply_limit(c, during, why, errp)) {
            return 1;
        }
        raised = !c->dry_run;
    }

    /* 2. The resize. */
    if (c->dry_run) {
        say("would set requested-size of %s to %s and wait up to %d s for "
            "size == requested-size", id, req_s, opt_timeout);
        g_free(why);
        why = vmem_fmt_size(wanted_limit(c, devs, id, req));
        say("would then set the limit to %s", why);
        return 0;
    }
    if (!c->t->set_requested(c->t, d, req, &sent, &err)) {
        /* Undo the raise unless the VMM may have taken the request. */
        if (raised && (!sent || g_error_matches(err, VMEM_LIMIT_ERROR,
                                                VMEM_EXIT_REFUSED))) {
            g_autoptr(GError) undo = NULL;
            g_autofree char *hard_s = vmem_fmt_size(hard);

            if (c->t->set_limit(c->t, hard, &undo)) {
                error_add(err, "The limit is back at %s", hard_s);
            } else {
                error_add(err, "Could not put the limit back at %s: %s",
                          hard_s, undo->message);
            }
        } else if (raised) {
            error_add(err, "The limit stays raised: the request may have "
                      "reached the device");
        }
        g_propagate_error(errp, err);
        return 1;
    }
    say("set requested-size of %s to %s", id, req_s);

    /* 3. Settled: size == requested-size. */
    if (!wait_settled(c, id, req, errp)) {
        return 1;
    }

    /* 4. The limit for what the devices hold now, on a fresh reading. */
    g_clear_pointer(&devs, g_ptr_array_unref);
    devs = c->t->query(c->t, errp);
    if (!devs) {
        return 1;
    }
    g_free(why);
    why = g_strdup_printf("%s settled at %s", id, req_s);
    return apply_limit(c, wanted_limit(c, devs, NULL, 0), why, errp) ? 0 : 1;
}

static int cmd_follow(Ctx *c, GError **errp)
{
    g_autoptr(GPtrArray) devs = c->t->query(c->t, errp);
    int interval_ms = opt_interval > 0 ? (int)(opt_interval * 1000) : -1;
    guint64 want, hard, soft, refused = 0;
    guint i;

    if (!devs || !measure_base(c, devs, errp)) {
        return 1;
    }
    print_budget(c);
    for (i = 0; i < devs->len; i++) {
        print_device(devs->pdata[i]);
    }
    want = wanted_limit(c, devs, NULL, 0);
    if (!apply_limit(c, want, "follow: devices now", errp) ||
        !c->t->get_limit(c->t, &hard, &soft, errp)) {
        return 1;
    }
    if (opt_once || c->dry_run) {
        return 0;
    }
    if (interval_ms < 0) {
        say("following %s (events only)", c->t->what);
    } else {
        say("following %s (events, and a re-read every %.1f s)", c->t->what,
            opt_interval);
    }

    for (;;) {
        g_autoptr(GError) err = NULL;
        g_autofree char *why = NULL;
        gboolean changed;

        /* A lowering the charge did not allow is retried within 1 s. */
        if (!c->t->wait_event(c->t, refused && interval_ms < 0 ? 1000 :
                              interval_ms, &changed, errp)) {
            g_autofree char *hard_s = vmem_fmt_size(hard);

            error_add(*errp, "The limit stays at %s", hard_s);
            return 1;
        }
        /*
         * An event's size is already old when it arrives (QEMU holds
         * them back to one a second per device): read the devices again
         * and act on that.
         */
        g_clear_pointer(&devs, g_ptr_array_unref);
        devs = c->t->query(c->t, errp);
        if (!devs) {
            return 1;
        }
        want = wanted_limit(c, devs, NULL, 0);
        /* Compared with the limit itself: a change made by hand is undone. */
        if (!c->t->get_limit(c->t, &hard, &soft, errp)) {
            return 1;
        }
        if (hard == want && (!c->t->soft_name || soft == want)) {
            refused = 0;
            continue;
        }
        for (i = 0; refused != want && i < devs->len; i++) {
            print_device(devs->pdata[i]);
        }
        why = g_strdup_printf("follow: %s", changed ? "size change event" :
                              "re-read");
        if (!apply_limit(c, want, why, &err)) {
            if (!g_error_matches(err, VMEM_LIMIT_ERROR,
                                 VMEM_EXIT_BELOW_CHARGE)) {
                g_propagate_error(errp, g_steal_pointer(&err));
                return 1;
            }
            /* The guest still holds the memory: try again next round. */
            if (refused != want) {
                fprintf(stderr, "vmem-limit: %s\n", err->message);
            }
            refused = want;
            continue;
        }
        refused = 0;
        hard = want;
    }
}

static int exit_code(GError *err)
{
    if (err && err->domain == VMEM_LIMIT_ERROR && err->code > 0) {
        return err->code;
    }
    return VMEM_EXIT_USAGE;
}

static VmemTarget *open_target(GError **errp)
{
    if (opt_domain) {
        if (opt_qmp || opt_cgroup) {
            g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_USAGE,
                        "--domain reaches the VM through libvirt; do not "
                        "also give --qmp or --cgroup");
            return NULL;
        }
#ifdef HAVE_LIBVIRT
        return vmem_target_libvirt_open(opt_connect ? opt_connect :
                                        DEFAULT_URI, opt_domain, errp);
#else
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_USAGE,
                    "this vmem-limit was built without libvirt");
        return NULL;
#endif
    }
    if (!opt_qmp || !opt_cgroup) {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_USAGE,
                    "give --qmp and --cgroup, or --domain; see --help");
        return NULL;
    }
    return vmem_target_qmp_open(opt_qmp, opt_cgroup, errp);
}

int main(int argc, char **argv)
{
    g_autoptr(GOptionContext) ctx = NULL;
    g_autoptr(GError) err = NULL;
    Ctx c = { 0 };
    const char *cmd;
    int ret = 1;

    setlocale(LC_ALL, "");
    ctx = g_option_context_new("show | resize DEVICE SIZE | follow");
    g_option_context_set_summary(ctx, summary);
    g_option_context_set_description(ctx, description);
    g_option_context_add_main_entries(ctx, entries, NULL);
    if (!g_option_context_parse(ctx, &argc, &argv, &err)) {
        fprintf(stderr, "vmem-limit: %s; see --help\n", err->message);
        return VMEM_EXIT_USAGE;
    }
    cmd = argc > 1 ? argv[1] : NULL;
    if (!cmd || (!strcmp(cmd, "resize") ? argc != 4 : argc != 2) ||
        (strcmp(cmd, "show") && strcmp(cmd, "resize") &&
         strcmp(cmd, "follow"))) {
        fprintf(stderr, "vmem-limit: give one command: show, "
                "resize DEVICE SIZE, or follow; see --help\n");
        return VMEM_EXIT_USAGE;
    }
    c.dry_run = opt_dry_run;
    c.margin = DEFAULT_MARGIN;
    c.margin_how = g_strdup("default");
    if (opt_margin) {
        if (!vmem_parse_size(opt_margin, &c.margin)) {
            fprintf(stderr, "vmem-limit: --margin '%s' is not a size\n",
                    opt_margin);
            return VMEM_EXIT_USAGE;
        }
        g_free(c.margin_how);
        c.margin_how = g_strdup("given");
    }
    if (opt_base && !vmem_parse_size(opt_base, &c.base)) {
        fprintf(stderr, "vmem-limit: --base '%s' is not a size\n", opt_base);
        return VMEM_EXIT_USAGE;
    }
    if (opt_timeout <= 0) {
        fprintf(stderr, "vmem-limit: --timeout must be at least 1 s\n");
        return VMEM_EXIT_USAGE;
    }

    c.t = open_target(&err);
    if (c.t) {
        if (!strcmp(cmd, "show")) {
            ret = cmd_show(&c, &err);
        } else if (!strcmp(cmd, "resize")) {
            ret = cmd_resize(&c, argv[2], argv[3], &err);
        } else {
            ret = cmd_follow(&c, &err);
        }
    }
    if (err || ret) {
        fprintf(stderr, "vmem-limit: %s\n",
                err ? err->message : "failed (no details)");
        ret = exit_code(err);
    }
    vmem_target_close(c.t);
    g_free(c.base_how);
    g_free(c.margin_how);
    return ret;
}
