// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * What the host says about a QEMU process: which run of it this is, where
 * libvirt started it, which cgroup holds it, and whether the kernel
 * OOM-killed it.  All of it read from /proc, /sys/fs/cgroup and
 * /dev/kmsg, so it works for a QEMU we only know by its pid.
 */
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "vmem-limit.h"

/*
 * "PID:STARTTIME": a pid is reused, a pid with its start time (field 22
 * of /proc/PID/stat, in clock ticks since boot) is not.
 */
char *vmem_proc_instance(int pid)
{
    g_autofree char *path = g_strdup_printf("/proc/%d/stat", pid);
    g_autofree char *text = NULL;
    g_auto(GStrv) f = NULL;
    char *p;

    if (pid <= 0 || !g_file_get_contents(path, &text, NULL, NULL)) {
        return NULL;
    }
    /* The command name may hold spaces and parentheses: skip past it. */
    p = strrchr(text, ')');
    if (!p) {
        return NULL;
    }
    f = g_strsplit(p + 2, " ", 0);
    /* f[0] is field 3 (state): field 22 is f[19]. */
    if (g_strv_length(f) < 20) {
        return NULL;
    }
    return g_strdup_printf("%d:%s", pid, f[19]);
}

/* The pid of the process started with "-uuid UUID" (libvirt's QEMU), or 0. */
int vmem_proc_find_uuid(const char *uuid)
{
    g_autoptr(GDir) dir = g_dir_open("/proc", 0, NULL);
    const char *name;

    while (dir && (name = g_dir_read_name(dir))) {
        g_autofree char *path = NULL, *args = NULL;
        gsize len, i;

        if (!g_ascii_isdigit(name[0])) {
            continue;
        }
        path = g_strdup_printf("/proc/%s/cmdline", name);
        if (!g_file_get_contents(path, &args, &len, NULL)) {
            continue;
        }
        for (i = 0; i < len; i += strlen(args + i) + 1) {
            if (!strcmp(args + i, "-uuid") && i + 6 < len &&
                !g_ascii_strcasecmp(args + i + 6, uuid)) {
                return atoi(name);
            }
        }
    }
    return 0;
}

/*
 * The directory of pid's memory cgroup: the "memory" line of
 * /proc/PID/cgroup under /sys/fs/cgroup/memory (v1), else the unified
 * line under /sys/fs/cgroup (v2).  NULL if neither.
 */
char *vmem_proc_memory_cgroup(int pid)
{
    g_autofree char *path = g_strdup_printf("/proc/%d/cgroup", pid);
    g_autofree char *text = NULL;
    g_auto(GStrv) lines = NULL;
    char *v2 = NULL;
    guint i;

    if (!g_file_get_contents(path, &text, NULL, NULL)) {
        return NULL;
    }
    lines = g_strsplit(text, "\n", 0);
    for (i = 0; lines[i]; i++) {
        g_auto(GStrv) f = g_strsplit(lines[i], ":", 3);
        g_auto(GStrv) ctl = NULL;

        if (g_strv_length(f) != 3) {
            continue;
        }
        if (!*f[1] && !v2) {
            v2 = g_build_filename("/sys/fs/cgroup", f[2], NULL);
            continue;
        }
        ctl = g_strsplit(f[1], ",", 0);
        if (g_strv_contains((const char * const *)ctl, "memory")) {
            g_free(v2);
            return g_build_filename("/sys/fs/cgroup/memory", f[2], NULL);
        }
    }
    return v2;
}

/*
 * Whether pid is in cgroup dir or one of its descendants, by their
 * cgroup.procs.  FALSE with an error where dir has no cgroup.procs.
 */
gboolean vmem_cgroup_holds(const char *dir, int pid, gboolean *found,
                           GError **errp)
{
    g_autofree char *procs = g_build_filename(dir, "cgroup.procs", NULL);
    g_autofree char *text = NULL;
    g_autoptr(GError) err = NULL;
    g_autoptr(GDir) d = NULL;
    g_auto(GStrv) pids = NULL;
    const char *name;
    guint i;

    *found = FALSE;
    if (!g_file_get_contents(procs, &text, NULL, &err)) {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_CGROUP_GONE,
                    "cannot read %s (%s): %s is not a cgroup directory",
                    procs, err->message, dir);
        return FALSE;
    }
    pids = g_strsplit(text, "\n", 0);
    for (i = 0; pids[i]; i++) {
        if (*pids[i] && atoi(pids[i]) == pid) {
            *found = TRUE;
            return TRUE;
        }
    }
    d = g_dir_open(dir, 0, NULL);
    while (d && (name = g_dir_read_name(d))) {
        g_autofree char *sub = g_build_filename(dir, name, NULL);

        if (g_file_test(sub, G_FILE_TEST_IS_DIR) &&
            !g_file_test(sub, G_FILE_TEST_IS_SYMLINK) &&
            vmem_cgroup_holds(sub, pid, found, NULL) && *found) {
            return TRUE;
        }
    }
    return TRUE;
}

/*
 * The kernel's own record of an OOM kill of pid, from /dev/kmsg
 * ("Memory cgroup out of memory: Killed process PID (qemu-system-x86)"),
 * for when the cgroup that counted it is gone (libvirt removes a
 * domain's cgroup as soon as QEMU has died).  NULL if none is found or
 * the log cannot be read (it needs root, or CAP_SYSLOG).
 */
char *vmem_kmsg_oom_kill(int pid)
{
    g_autofree char *needle = g_strdup_printf("Killed process %d (", pid);
    char *found = NULL;
    char rec[8192];
    int fd;

    fd = open("/dev/kmsg", O_RDONLY | O_NONBLOCK | O_CLOEXEC);
    if (fd < 0 || pid <= 0) {
        if (fd >= 0) {
            close(fd);
        }
        return NULL;
    }
    for (;;) {
        ssize_t n = read(fd, rec, sizeof(rec) - 1);
        char *text;

        if (n < 0 && errno == EPIPE) {
            continue;   /* overwritten while we read: go on */
        }
        if (n <= 0) {
            break;
        }
        rec[n] = 0;
        text = strchr(rec, ';');
        if (text && strstr(text, needle)) {
            g_free(found);
            found = g_strstrip(g_strdup(text + 1));
        }
    }
    close(fd);
    return found;
}
