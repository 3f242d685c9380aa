// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * vmem-limit: keep a VM's memory cgroup limit equal to
 *
 *     base + sum over its virtio-mem devices of max(size, requested-size)
 *          + headroom + margin
 *
 * max(size, requested-size) is what a device may hold at any moment of a
 * resize: growing, the guest plugs up to requested-size; shrinking, it
 * holds size until it has unplugged.  So the limit is raised before a
 * grow is asked for and lowered only once a shrink has settled, and the
 * VMM is never OOM-killed by its own resize.
 *
 * base is the VM's boot RAM, all of it, plus QEMU's own memory: never
 * only the part the guest has touched so far.  headroom is the memmap a
 * grow by someone else makes the guest write before follow can react.
 */
#include <locale.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <json-glib/json-glib.h>

#include "vmem-limit.h"

#define DEFAULT_MARGIN  (64ULL << 20)
/*
 * Below this, QEMU's heap and page tables outgrow the margin without
 * notice, and a limit at the charge reclaims from the VM at once.
 */
#define MARGIN_FLOOR    (32ULL << 20)
/*
 * QEMU's own memory beside the guest's RAM: code, heap, page tables,
 * device state and, under TCG, the translated code: 96 MiB for a 512 MiB
 * guest under TCG (tests/tools/test_vmem_limit_oom.py logs it).
 */
#define DEFAULT_OVERHEAD (256ULL << 20)
/* The memmap of memory the guest adds: 64 bytes per 4 KiB page. */
#define MEMMAP_RATIO    64
#define DEFAULT_STATE_DIR "/run/vmem-limit"
#define DEFAULT_TIMEOUT 300
#define DEFAULT_URI     "qemu:///system"   /* or $LIBVIRT_DEFAULT_URI */
/* How often resize reports progress while it waits. */
#define PROGRESS_EVERY_US (2 * G_USEC_PER_SEC)

typedef struct {
    VmemTarget *t;
    VmemState *state;       /* NULL for show and --dry-run */
    guint64 base;
    guint64 margin;
    guint64 overhead;
    guint64 headroom;       /* of the last wanted_limit() */
    guint64 kept;           /* base an earlier run kept for this VM */
    guint64 oom_kills;      /* at the start, where have_oom */
    gboolean have_oom;
    guint64 limit;          /* last read or written, for messages */
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
static char *opt_overhead;
static char *opt_state_dir;
static gboolean opt_no_pid_check;
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
      "libvirt URI (default $LIBVIRT_DEFAULT_URI, else " DEFAULT_URI ")",
      "URI" },
    { "no-pid-check", 0, 0, G_OPTION_ARG_NONE, &opt_no_pid_check,
      "do not check that the QEMU behind --qmp is in --cgroup", NULL },
    { "base", 'b', 0, G_OPTION_ARG_STRING, &opt_base,
      "memory of the VM outside its devices (default: boot RAM + "
      "overhead, see above)", "SIZE" },
    { "overhead", 'o', 0, G_OPTION_ARG_STRING, &opt_overhead,
      "QEMU's own memory, counted in the default base (default 256M)",
      "SIZE" },
    { "margin", 'm', 0, G_OPTION_ARG_STRING, &opt_margin,
      "room above base, devices and headroom (default 64M, at least 32M)",
      "SIZE" },
    { "state-dir", 0, 0, G_OPTION_ARG_FILENAME, &opt_state_dir,
      "per-VM lock and base files (default $RUNTIME_DIRECTORY, else "
      DEFAULT_STATE_DIR ")", "DIR" },
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
"  base + sum over its virtio-mem devices of max(size, requested-size)\n"
"       + headroom + margin\n"
"\n"
"so that the VM may hold all that its devices plug or are asked to plug.\n"
"\n"
"base      what the VM holds outside its devices: its boot RAM, all of it\n"
"          (query-memory-size-summary; with libvirt the domain XML), plus\n"
"          --overhead for QEMU itself; or the charge less the bytes\n"
"          resident in the devices where that is more; or, if more again,\n"
"          the base an earlier run used for this run of the VM (kept in\n"
"          --state-dir), so that a restart never lowers it.  --base\n"
"          replaces all of this.\n"
"headroom  the memmap (1/64) of what each device may still grow by, up to\n"
"          its max-size: what the guest writes when someone else grows a\n"
"          device, before follow has raised the limit.\n"
"margin    room for what grows besides: QEMU's heap and page tables.\n"
"          Default 64 MiB, at least 32 MiB.\n"
"\n"
"Every command shows them.  SIZE is bytes or a number with K, M, G or T\n"
"(binary units), at most 4 PiB.  The limit is rounded up to a 4 KiB page.\n"
"--qmp and --cgroup must be one VM's: the process listening on the socket\n"
"must be in the cgroup or below it.  Instances working on one VM take\n"
"turns (a lock in --state-dir); one follow per VM.\n"
"\n"
"Commands:\n"
"  show                 print the devices, base, headroom, margin, charge,\n"
"                       the limit now and the limit wanted; changes nothing\n"
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
"                       below the charge.  One line per change, with limit,\n"
"                       charge and headroom; under systemd (NOTIFY_SOCKET)\n"
"                       READY=1 once the limit is first set.  follow alone\n"
"                       covers a grow by someone else only as far as the\n"
"                       headroom: whoever grows a device should raise the\n"
"                       limit first, i.e. grow with 'resize'";

static const char description[] =
"Exit status:\n"
"  0  done; follow: the VM was shut down\n"
"  1  bad command line, unknown device, a size the device cannot take,\n"
"     a socket that is not QMP, socket and cgroup of different VMs, or\n"
"     a second follow on one VM\n"
"  2  no permission to read or write the limit, or to reach the VM\n"
"  3  the cgroup directory or its memory files are gone\n"
"  4  QMP socket or libvirt unreachable, or lost on the way\n"
"  5  QEMU or libvirt refused the resize\n"
"  6  the resize did not settle within --timeout, or another instance\n"
"     held the VM's lock for 30 s\n"
"  7  the wanted limit is below the charge; not lowered\n"
"  8  the VM was OOM-killed (memory.events or memory.oom_control, or the\n"
"     kernel log, says so)\n"
"On any failure the limit is left as it was before the command, except\n"
"after a grow that was sent: then it stays raised (the device may still\n"
"plug up to requested-size), and the message says so.\n"
"\n"
"Example (QEMU started with -chardev socket,id=m1,path=/run/vm1.qmp,\n"
"server=on,wait=off -mon chardev=m1,mode=control, in cgroup vm1):\n"
"  vmem-limit -q /run/vm1.qmp -c /sys/fs/cgroup/vm1 resize vm0 4G\n"
"  vmem-limit -q /run/vm1.qmp -c /sys/fs/cgroup/vm1 --margin 128M follow\n"
"  vmem-limit -d vm1 resize virtiomem0 2G\n"
"  systemctl start vmem-limit@vm1     (follow libvirt domain vm1)\n"
"\n"
"See also vmem-limit(1), docs/system/vmem-limit.rst.";

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

        if (!vmem_add_size(&sum, MAX(d->size, r))) {
            return VMEM_UNLIMITED;
        }
    }
    return sum;
}

/*
 * The memmap the guest writes when a device grows from what it may hold
 * now to its max-size.  It is what a grow by someone else makes the
 * guest write before follow can raise the limit: adding memory, the
 * guest initialises its struct pages at once (on the new memory itself
 * with memmap_on_memory), before anything uses it.
 */
static guint64 devices_headroom(GPtrArray *devs, const char *dev_id,
                                guint64 req)
{
    guint64 sum = 0;
    guint i;

    for (i = 0; i < devs->len; i++) {
        const VmemDevice *d = devs->pdata[i];
        guint64 r = dev_id && !g_strcmp0(d->id, dev_id) ? req : d->requested;
        guint64 held = MAX(d->size, r);

        if (d->max_size > held &&
            !vmem_add_size(&sum, page_up((d->max_size - held) /
                                         MEMMAP_RATIO))) {
            return VMEM_UNLIMITED;
        }
    }
    return sum;
}

/* VMEM_UNLIMITED where the sum is beyond VMEM_SIZE_MAX. */
static guint64 wanted_limit(Ctx *c, GPtrArray *devs, const char *dev_id,
                            guint64 req)
{
    guint64 sum = c->base;

    c->headroom = devices_headroom(devs, dev_id, req);
    if (!vmem_add_size(&sum, devices_sum(devs, dev_id, req)) ||
        !vmem_add_size(&sum, c->headroom) ||
        !vmem_add_size(&sum, c->margin)) {
        return VMEM_UNLIMITED;
    }
    return page_up(sum);
}

/*
 * The charge less what lies inside the devices: what QEMU and the guest
 * hold outside them now.  A lower bound of what they may hold later.
 */
static gboolean measure_outside(Ctx *c, GPtrArray *devs, guint64 *outside,
                                char **how, GError **errp)
{
    g_autofree char *charge_s = NULL, *res_s = NULL;
    g_autoptr(GError) err = NULL;
    guint64 charge, resident = 0, sizes = 0;
    const char *charge_name;
    guint i;

    if (!c->t->charge(c->t, &charge, &charge_name, errp)) {
        return FALSE;
    }
    charge_s = vmem_fmt_size(charge);
    if (c->t->resident(c->t, &resident, &err)) {
        res_s = vmem_fmt_size(resident);
        *outside = charge > resident ? charge - resident : 0;
        *how = g_strdup_printf("%s %s - %s resident in the devices "
                               "(query-virtio-mem-footprint)",
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
    *outside = charge > sizes ? charge - sizes : 0;
    *how = g_strdup_printf("%s %s - %s plugged", charge_name, charge_s,
                           res_s);
    return TRUE;
}

/*
 * base: the largest of boot RAM + overhead, what is measured outside the
 * devices now, and what an earlier run kept for this run of the VM.
 * Never only the boot RAM the guest has touched so far: the guest may
 * touch the rest at any moment, and that is no misbehaviour.
 */
static gboolean compute_base(Ctx *c, GPtrArray *devs, GError **errp)
{
    g_autofree char *boot_s = NULL, *over_s = NULL, *meas_how = NULL;
    guint64 boot, outside;

    g_clear_pointer(&c->base_how, g_free);
    if (opt_base) {
        c->base_how = g_strdup("given");
        if (c->t->boot_ram(c->t, &boot, NULL) && c->base < boot) {
            g_autofree char *b = vmem_fmt_size(c->base);

            boot_s = vmem_fmt_size(boot);
            g_printerr("vmem-limit: warning: --base %s is below the VM's "
                       "boot RAM (%s): the guest can be OOM-killed for "
                       "touching its own RAM\n", b, boot_s);
        }
        return TRUE;
    }
    if (!c->t->boot_ram(c->t, &boot, errp) ||
        !measure_outside(c, devs, &outside, &meas_how, errp)) {
        return FALSE;
    }
    boot_s = vmem_fmt_size(boot);
    over_s = vmem_fmt_size(c->overhead);
    c->base = boot + c->overhead;
    c->base_how = g_strdup_printf("boot RAM %s + overhead %s", boot_s,
                                  over_s);
    if (outside > c->base) {
        g_free(c->base_how);
        c->base_how = g_strdup_printf("measured: %s, more than boot RAM %s "
                                      "+ overhead %s", meas_how, boot_s,
                                      over_s);
        c->base = outside;
    }
    c->kept = vmem_state_get_base(c->state, c->t->instance);
    if (c->kept > c->base) {
        g_free(c->base_how);
        c->base_how = g_strdup_printf("kept from an earlier run for this "
                                      "VM; boot RAM %s + overhead %s, %s",
                                      boot_s, over_s, meas_how);
        c->base = c->kept;
    }
    return TRUE;
}

/*
 * Keeps base for the next run on this VM, before a limit is set with it:
 * a failure to keep it then changes nothing, and a base kept but not
 * used is no lower than one that is.
 */
static gboolean keep_base(Ctx *c, GError **errp)
{
    if (opt_base || c->dry_run || c->base <= c->kept) {
        return TRUE;
    }
    if (!vmem_state_put_base(c->state, c->t->instance, c->base, errp)) {
        return FALSE;
    }
    c->kept = c->base;
    return TRUE;
}

static void print_budget(Ctx *c)
{
    g_autofree char *b = vmem_fmt_size(c->base);
    g_autofree char *h = vmem_fmt_size(c->headroom);
    g_autofree char *m = vmem_fmt_size(c->margin);

    say("base     %s (%s)", b, c->base_how);
    say("headroom %s (memmap of growing each device to its max-size)", h);
    say("margin   %s (%s)", m, c->margin_how);
}

/*
 * Brings the limit to want.  Lowering (or leaving "unlimited") happens
 * only while the charge fits under the new value, so the tool never makes
 * the kernel reclaim from, or OOM-kill, the VM.  why: what the new value
 * is for, for the log line, which also has the charge and the headroom
 * (one line per change: the journal of the systemd unit).
 */
static gboolean apply_limit(Ctx *c, guint64 want, const char *why,
                            GError **errp)
{
    g_autofree char *want_s = vmem_fmt_size(want);
    g_autofree char *hard_s = NULL, *charge_s = NULL, *head_s = NULL;
    guint64 hard, soft, charge;
    const char *charge_name;
    const char *verb;

    if (want > VMEM_SIZE_MAX) {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_USAGE,
                    "the limit would be more than 4 PiB (base + devices + "
                    "headroom + margin); check --base and --margin");
        return FALSE;
    }
    if (!c->t->get_limit(c->t, &hard, &soft, errp) ||
        !c->t->charge(c->t, &charge, &charge_name, errp)) {
        return FALSE;
    }
    c->limit = hard;
    hard_s = vmem_fmt_size(hard);
    charge_s = vmem_fmt_size(charge);
    head_s = vmem_fmt_size(c->headroom);
    if (hard == want && (!c->t->soft_name || soft == want)) {
        say("limit  %s of %s stays (%s); charge %s, headroom %s", want_s,
            c->t->limit_name, why, charge_s, head_s);
        return TRUE;
    }
    if (want < hard && charge > want) {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_BELOW_CHARGE,
                    "not lowering %s from %s to %s: the charge (%s) is "
                    "%s, above it; the limit stays at %s.  Raise --margin "
                    "or --base, or let the guest free memory first",
                    c->t->limit_name, hard_s, want_s, charge_name,
                    charge_s, hard_s);
        return FALSE;
    }
    verb = want > hard ? "raise" : want < hard ? "lower" : "set";
    if (c->dry_run) {
        say("would %s %s from %s to %s (%s); charge %s, headroom %s", verb,
            c->t->limit_name, hard_s, want_s, why, charge_s, head_s);
        return TRUE;
    }
    if (!c->t->set_limit(c->t, want, errp)) {
        return FALSE;
    }
    c->limit = want;
    /* The hard limit was right, the soft one (v2's memory.high) not. */
    if (c->t->soft_name && soft != hard) {
        g_autofree char *soft_s = vmem_fmt_size(soft);
        char *both = g_strdup_printf("%s (%s %s)", hard_s, c->t->soft_name,
                                     soft_s);

        g_free(hard_s);
        hard_s = both;
    }
    say("%s %s from %s to %s (%s); charge %s, headroom %s",
        want > hard ? "raised" : want < hard ? "lowered" : "set",
        c->t->limit_name, hard_s, want_s, why, charge_s, head_s);
    vmem_notify("STATUS=limit %s, charge %s, headroom %s", want_s, charge_s,
                head_s);
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

    if (!devs || !compute_base(c, devs, errp) ||
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
        MEMBER_INT("headroom", c->headroom);
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
            say("limit  %s now (%s %s); wanted %s = base + %s + headroom + "
                "margin", hard_s, c->t->soft_name, soft_s, want_s, sum_s);
        } else {
            say("limit  %s now; wanted %s = base + %s + headroom + margin",
                hard_s, want_s, sum_s);
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

    if (!vmem_parse_size("SIZE", size_arg, &req, errp)) {
        return 1;
    }
    req_s = vmem_fmt_size(req);
    /* Steps 1 and 2 under the lock: no follow lowers between them. */
    if (!c->dry_run && !vmem_state_lock(c->state, errp)) {
        return 1;
    }
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
    if (!compute_base(c, devs, errp) || !keep_base(c, errp)) {
        return 1;
    }
    /* 1. Room for max(size, req) before the device is asked for it. */
    during = wanted_limit(c, devs, id, req);
    print_budget(c);
    print_device(d);
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
    vmem_state_unlock(c->state);

    /* 3. Settled: size == requested-size. */
    if (!wait_settled(c, id, req, errp)) {
        return 1;
    }

    /* 4. The limit for what the devices hold now, on a fresh reading. */
    if (!vmem_state_lock(c->state, errp)) {
        return 1;
    }
    g_clear_pointer(&devs, g_ptr_array_unref);
    devs = c->t->query(c->t, errp);
    if (!devs) {
        return 1;
    }
    g_free(why);
    why = g_strdup_printf("%s settled at %s", id, req_s);
    if (!apply_limit(c, wanted_limit(c, devs, NULL, 0), why, errp)) {
        return 1;
    }
    vmem_state_unlock(c->state);
    return 0;
}

static int cmd_follow(Ctx *c, GError **errp)
{
    g_autoptr(GPtrArray) devs = NULL;
    int interval_ms = opt_interval > 0 ? (int)(opt_interval * 1000) : -1;
    gboolean staying = !opt_once && !c->dry_run;
    guint64 want, hard, soft, refused = 0;
    guint i;

    if (!c->dry_run && !vmem_state_lock(c->state, errp)) {
        return 1;
    }
    devs = c->t->query(c->t, errp);
    if (!devs || !compute_base(c, devs, errp)) {
        return 1;
    }
    want = wanted_limit(c, devs, NULL, 0);
    print_budget(c);
    for (i = 0; i < devs->len; i++) {
        print_device(devs->pdata[i]);
    }
    if (!keep_base(c, errp) ||
        !apply_limit(c, want, "follow: devices now", errp) ||
        !c->t->get_limit(c->t, &hard, &soft, errp)) {
        return 1;
    }
    vmem_state_unlock(c->state);
    if (!staying) {
        return 0;
    }
    /* The service has started: the limit is set, as --once sets it. */
    vmem_notify("READY=1");
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
         * and act on that, under the lock, so that no resize raises
         * between the reading and the write.
         */
        if (!vmem_state_lock(c->state, errp)) {
            return 1;
        }
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
            c->limit = hard;
            vmem_state_unlock(c->state);
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
            vmem_state_unlock(c->state);
            continue;
        }
        vmem_state_unlock(c->state);
        refused = 0;
        hard = want;
    }
}

/*
 * A VM lost on the way: say so precisely.  An OOM kill counted in its
 * cgroup (or found in the kernel log) is exit 8, with the limit it met;
 * a VM shut down on purpose ends follow with exit 0.
 */
static void explain_loss(Ctx *c, const char *cmd, GError **errp)
{
    g_autofree char *where = NULL, *kmsg = NULL, *limit_s = NULL;
    g_autofree char *how = NULL;
    GError *e = *errp;
    guint64 n;

    if (!e || !c->t || !g_error_matches(e, VMEM_LIMIT_ERROR, VMEM_EXIT_LOST)) {
        return;
    }
    if (!c->limit) {
        guint64 soft;

        /* Not set yet: the cgroup may still tell (libvirt removes its). */
        if (!c->t->get_limit(c->t, &c->limit, &soft, NULL)) {
            c->limit = 0;
        }
    }
    limit_s = c->limit ? vmem_fmt_size(c->limit) : g_strdup("unknown");
    if (c->have_oom && c->t->oom_kills(c->t, &n, &where) &&
        n > c->oom_kills) {
        how = g_strdup_printf("oom_kill in %s rose from %" G_GUINT64_FORMAT
                              " to %" G_GUINT64_FORMAT, where, c->oom_kills,
                              n);
    } else {
        kmsg = vmem_kmsg_oom_kill(c->t->pid);
        how = kmsg ? g_strdup_printf("the kernel log says \"%s\"", kmsg)
                   : NULL;
    }
    if (how) {
        GError *oom = g_error_new(VMEM_LIMIT_ERROR, VMEM_EXIT_OOM,
            "the VM of %s was OOM-killed (QEMU pid %d): %s.  The limit was "
            "%s.  "
            "Unless the VM was grown without raising the limit first, %s.  "
            "(%s)", c->t->what, c->t->pid, how, limit_s,
            opt_base ? "--base was too low: it must hold the boot RAM and "
                       "QEMU's own memory" :
                       "QEMU's own memory outgrew the base: raise "
                       "--overhead or --margin", e->message);

        g_clear_error(errp);
        g_propagate_error(errp, oom);
        return;
    }
    if (c->t->shut_down && !strcmp(cmd, "follow")) {
        say("%s: the VM was shut down; the limit stays at %s", c->t->what,
            limit_s);
        g_clear_error(errp);
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
        const char *uri = opt_connect ? opt_connect :
                          g_getenv("LIBVIRT_DEFAULT_URI");

        return vmem_target_libvirt_open(uri && *uri ? uri : DEFAULT_URI,
                                        opt_domain, errp);
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
    return vmem_target_qmp_open(opt_qmp, opt_cgroup, !opt_no_pid_check,
                                errp);
}

/*
 * The per-VM lock and base files.  show and --dry-run change nothing:
 * they read a base kept there, but create no directory and take no lock.
 */
static gboolean open_state(Ctx *c, const char *key, const char *what,
                           gboolean changes, GError **errp)
{
    const char *env = g_getenv("RUNTIME_DIRECTORY");
    g_autofree char *dir = NULL;

    if (opt_state_dir) {
        dir = g_strdup(opt_state_dir);
    } else if (env && *env) {
        /* systemd gives one path per RuntimeDirectory=, ':'-separated */
        dir = g_strndup(env, strcspn(env, ":"));
    } else {
        dir = g_strdup(DEFAULT_STATE_DIR);
    }
    if (!changes && !g_file_test(dir, G_FILE_TEST_IS_DIR)) {
        return TRUE;
    }
    c->state = vmem_state_open(dir, key, what, errp);
    return c->state != NULL;
}

int main(int argc, char **argv)
{
    g_autoptr(GOptionContext) ctx = NULL;
    g_autoptr(GError) err = NULL;
    Ctx c = { 0 };
    gboolean changes, following;
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
    c.overhead = DEFAULT_OVERHEAD;
    c.margin_how = g_strdup("default");
    if (opt_margin) {
        if (!vmem_parse_size("--margin", opt_margin, &c.margin, &err)) {
            goto out;
        }
        if (c.margin < MARGIN_FLOOR) {
            g_set_error(&err, VMEM_LIMIT_ERROR, VMEM_EXIT_USAGE,
                        "--margin %s is below the floor of 32 MiB: QEMU's "
                        "heap and page tables grow by that much unannounced, "
                        "and a limit at the charge makes the kernel reclaim "
                        "from the VM; give at least 32M", opt_margin);
            goto out;
        }
        g_free(c.margin_how);
        c.margin_how = g_strdup("given");
    }
    if ((opt_base && !vmem_parse_size("--base", opt_base, &c.base, &err)) ||
        (opt_overhead &&
         !vmem_parse_size("--overhead", opt_overhead, &c.overhead, &err))) {
        goto out;
    }
    if (opt_base && c.base + c.margin > VMEM_SIZE_MAX) {
        g_set_error(&err, VMEM_LIMIT_ERROR, VMEM_EXIT_USAGE,
                    "--base %s and margin add up to more than 4 PiB; check "
                    "the numbers", opt_base);
        goto out;
    }
    if (opt_timeout <= 0) {
        g_set_error(&err, VMEM_LIMIT_ERROR, VMEM_EXIT_USAGE,
                    "--timeout must be at least 1 s");
        goto out;
    }

    changes = !c.dry_run && strcmp(cmd, "show");
    following = !strcmp(cmd, "follow") && changes && !opt_once;
    /* With QMP, before QEMU is reached: its monitor serves one client. */
    if (!opt_domain && opt_qmp && opt_cgroup) {
        g_autofree char *key = vmem_target_qmp_key(opt_cgroup);
        g_autofree char *what = g_strdup_printf("cgroup %s", opt_cgroup);

        if (!open_state(&c, key, what, changes, &err) ||
            (following && !vmem_state_claim_follow(c.state, &err))) {
            goto out;
        }
    }
    c.t = open_target(&err);
    if (c.t && opt_domain &&
        (!open_state(&c, c.t->key, c.t->what, changes, &err) ||
         (following && !vmem_state_claim_follow(c.state, &err)))) {
        goto out;
    }
    if (c.t) {
        c.have_oom = c.t->oom_kills(c.t, &c.oom_kills, NULL);
        if (!strcmp(cmd, "show")) {
            ret = cmd_show(&c, &err);
        } else if (!strcmp(cmd, "resize")) {
            ret = cmd_resize(&c, argv[2], argv[3], &err);
        } else {
            ret = cmd_follow(&c, &err);
        }
        explain_loss(&c, cmd, &err);
        if (!err && ret) {
            ret = 0;    /* follow: the VM was shut down */
        }
    }
out:
    if (err || ret) {
        fprintf(stderr, "vmem-limit: %s\n",
                err ? err->message : "failed (no details)");
        ret = exit_code(err);
    }
    vmem_state_close(c.state);
    vmem_target_close(c.t);
    g_free(c.base_how);
    g_free(c.margin_how);
    return ret;
}
