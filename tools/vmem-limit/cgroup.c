// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * The memory limit of a cgroup directory.
 *
 * cgroup v2: the hard limit is memory.max; memory.high is set to the same
 * value, so that a lower memory.high left from before cannot throttle the
 * VM into reclaim once it has grown.  cgroup v1: memory.limit_in_bytes
 * (v1's soft limit only matters under global pressure and is left alone).
 * The version is told by the files the directory has, not by the mount,
 * so a v1 hierarchy beside a v2 one works either way.
 */
#include <errno.h>
#include <fcntl.h>
#include <string.h>
#include <unistd.h>

#include "vmem-limit.h"
#include "cgroup.h"

/* v1 reports "no limit" as a page-rounded LONG_MAX: this big is none. */
#define CGROUP_V1_NO_LIMIT (G_GUINT64_CONSTANT(1) << 62)

static gboolean cgroup_errno(Cgroup *cg, const char *file, int err,
                             const char *doing, GError **errp)
{
    g_autofree char *path = g_build_filename(cg->dir, file, NULL);

    switch (err) {
    case ENOENT:
    case ENODEV:
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_CGROUP_GONE,
                    "cgroup %s is gone (%s: %s); the VM stopped or was moved: "
                    "point --cgroup at its current cgroup", cg->dir, path,
                    g_strerror(err));
        break;
    case EACCES:
    case EPERM:
    case EROFS:
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_PERMISSION,
                    "cannot %s %s: %s; run as root or as the user the cgroup "
                    "is delegated to", doing, path, g_strerror(err));
        break;
    case EBUSY:
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_BELOW_CHARGE,
                    "the kernel refused to lower %s: the cgroup's charge does "
                    "not fit under the new value; raise --margin or --base",
                    path);
        break;
    default:
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_PERMISSION,
                    "cannot %s %s: %s", doing, path, g_strerror(err));
        break;
    }
    return FALSE;
}

static gboolean cgroup_read(Cgroup *cg, const char *file, guint64 *val,
                            GError **errp)
{
    g_autofree char *path = g_build_filename(cg->dir, file, NULL);
    g_autofree char *text = NULL;
    char *end;
    int fd;
    ssize_t n;

    text = g_malloc0(64);
    fd = open(path, O_RDONLY | O_CLOEXEC);
    if (fd < 0) {
        return cgroup_errno(cg, file, errno, "read", errp);
    }
    n = read(fd, text, 63);
    if (n < 0) {
        int e = errno;

        close(fd);
        return cgroup_errno(cg, file, e, "read", errp);
    }
    close(fd);
    g_strstrip(text);
    if (!strcmp(text, "max")) {
        *val = VMEM_UNLIMITED;
        return TRUE;
    }
    errno = 0;
    *val = g_ascii_strtoull(text, &end, 10);
    if (errno || end == text || *end) {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_CGROUP_GONE,
                    "%s holds '%s', not a byte count", path, text);
        return FALSE;
    }
    if (cg->version == 1 && *val >= CGROUP_V1_NO_LIMIT) {
        *val = VMEM_UNLIMITED;
    }
    return TRUE;
}

static gboolean cgroup_write(Cgroup *cg, const char *file, guint64 val,
                             GError **errp)
{
    g_autofree char *path = g_build_filename(cg->dir, file, NULL);
    g_autofree char *text = NULL;
    ssize_t n;
    int fd;

    text = val == VMEM_UNLIMITED ? g_strdup(cg->version == 2 ? "max" : "-1")
                                 : g_strdup_printf("%" G_GUINT64_FORMAT, val);
    fd = open(path, O_WRONLY | O_TRUNC | O_CLOEXEC);
    if (fd < 0) {
        return cgroup_errno(cg, file, errno, "write", errp);
    }
    n = write(fd, text, strlen(text));
    if (n < 0) {
        int e = errno;

        close(fd);
        return cgroup_errno(cg, file, e, "write", errp);
    }
    if (close(fd) < 0) {
        return cgroup_errno(cg, file, errno, "write", errp);
    }
    return TRUE;
}

Cgroup *cgroup_open(const char *dir, GError **errp)
{
    g_autofree char *v2 = g_build_filename(dir, "memory.max", NULL);
    g_autofree char *v1 = g_build_filename(dir, "memory.limit_in_bytes", NULL);
    Cgroup *cg;

    if (!g_file_test(dir, G_FILE_TEST_IS_DIR)) {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_CGROUP_GONE,
                    "cgroup %s does not exist; give the directory of the "
                    "VM's cgroup (see /proc/QEMU-PID/cgroup)", dir);
        return NULL;
    }
    cg = g_new0(Cgroup, 1);
    cg->dir = g_strdup(dir);
    if (g_file_test(v2, G_FILE_TEST_EXISTS)) {
        cg->version = 2;
        cg->charge_file = "memory.current";
        cg->limit_file = "memory.max";
        cg->soft_file = "memory.high";
    } else if (g_file_test(v1, G_FILE_TEST_EXISTS)) {
        cg->version = 1;
        cg->charge_file = "memory.usage_in_bytes";
        cg->limit_file = "memory.limit_in_bytes";
    } else {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_CGROUP_GONE,
                    "%s is not a memory cgroup (neither memory.max nor "
                    "memory.limit_in_bytes in it); on cgroup v2 enable the "
                    "memory controller in the parent's cgroup.subtree_control",
                    dir);
        cgroup_free(cg);
        return NULL;
    }
    return cg;
}

void cgroup_free(Cgroup *cg)
{
    if (cg) {
        g_free(cg->dir);
        g_free(cg);
    }
}

gboolean cgroup_charge(Cgroup *cg, guint64 *bytes, GError **errp)
{
    return cgroup_read(cg, cg->charge_file, bytes, errp);
}

gboolean cgroup_get_limit(Cgroup *cg, guint64 *hard, guint64 *soft,
                          GError **errp)
{
    *soft = VMEM_UNLIMITED;
    if (!cgroup_read(cg, cg->limit_file, hard, errp)) {
        return FALSE;
    }
    return !cg->soft_file || cgroup_read(cg, cg->soft_file, soft, errp);
}

/*
 * Raising writes the hard limit first, lowering the soft one first, so
 * that at no moment is memory.high above memory.max; if the second write
 * fails, the first is undone.
 *
 * Lowering on v2 also reads the charge again between the two writes.
 * v1 refuses a limit below the charge (EBUSY); v2 takes any memory.max,
 * reclaims, and OOM-kills in the cgroup what does not fit.  The caller
 * checked the charge, but the VM may have grown since: memory.high, once
 * written, throttles growth above it and never kills, so the charge read
 * after it is the one memory.max must hold.  Where it does not fit, the
 * lowering is refused as v1 would, memory.high put back.
 */
gboolean cgroup_set_limit(Cgroup *cg, guint64 bytes, GError **errp)
{
    guint64 hard, soft, charge = 0;

    if (!cgroup_get_limit(cg, &hard, &soft, errp)) {
        return FALSE;
    }
    if (!cg->soft_file) {
        return cgroup_write(cg, cg->limit_file, bytes, errp);
    }
    if (bytes >= hard) {
        if (!cgroup_write(cg, cg->limit_file, bytes, errp)) {
            return FALSE;
        }
        if (!cgroup_write(cg, cg->soft_file, bytes, errp)) {
            cgroup_write(cg, cg->limit_file, hard, NULL);
            return FALSE;
        }
        return TRUE;
    }
    if (!cgroup_write(cg, cg->soft_file, bytes, errp)) {
        return FALSE;
    }
    if (!cgroup_read(cg, cg->charge_file, &charge, errp)) {
        cgroup_write(cg, cg->soft_file, soft, NULL);
        return FALSE;
    }
    if (charge > bytes) {
        g_autofree char *path = g_build_filename(cg->dir, cg->limit_file,
                                                 NULL);
        g_autofree char *bytes_s = vmem_fmt_size(bytes);
        g_autofree char *charge_s = vmem_fmt_size(charge);

        cgroup_write(cg, cg->soft_file, soft, NULL);
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_BELOW_CHARGE,
                    "not lowering %s to %s: the charge (%s) grew to %s "
                    "meanwhile, above it, and cgroup v2 would OOM-kill the "
                    "VM for it; raise --margin or --base, or let the guest "
                    "free memory first", path, bytes_s, cg->charge_file,
                    charge_s);
        return FALSE;
    }
    if (!cgroup_write(cg, cg->limit_file, bytes, errp)) {
        cgroup_write(cg, cg->soft_file, soft, NULL);
        return FALSE;
    }
    return TRUE;
}

/*
 * The OOM kills the kernel counted in this cgroup: "oom_kill N" in
 * memory.events (v2) or memory.oom_control (v1).
 */
gboolean cgroup_oom_kills(Cgroup *cg, guint64 *n, char **where)
{
    const char *file = cg->version == 2 ? "memory.events"
                                        : "memory.oom_control";
    g_autofree char *path = g_build_filename(cg->dir, file, NULL);
    g_autofree char *text = NULL;
    g_auto(GStrv) lines = NULL;
    guint i;

    if (!g_file_get_contents(path, &text, NULL, NULL)) {
        return FALSE;
    }
    lines = g_strsplit(text, "\n", 0);
    for (i = 0; lines[i]; i++) {
        if (g_str_has_prefix(lines[i], "oom_kill ")) {
            *n = g_ascii_strtoull(lines[i] + 9, NULL, 10);
            if (where) {
                *where = g_steal_pointer(&path);
            }
            return TRUE;
        }
    }
    return FALSE;
}
