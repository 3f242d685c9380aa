// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * Per-VM files in the state directory (default $RUNTIME_DIRECTORY, else
 * /run/vmem-limit: gone at reboot, with the VMs they describe):
 *
 *   KEY.lock    flock'ed by each instance while it reads and writes the
 *               limit, so that two instances on one VM never interleave
 *               (a follow lowering between a resize's raise and its grow)
 *   KEY.follow  flock'ed by a follow for as long as it runs: one per VM
 *   KEY.base    the base last used for this run of the VM, so that a
 *               restarted instance never takes a lower one
 *
 * KEY names the place the limit lives (the cgroup, the libvirt domain).
 */
#include <errno.h>
#include <fcntl.h>
#include <stdlib.h>
#include <string.h>
#include <sys/file.h>
#include <sys/stat.h>
#include <unistd.h>

#include "vmem-limit.h"

/* How long an instance waits for another one's lock. */
#define LOCK_WAIT_US (30 * G_USEC_PER_SEC)

struct VmemState {
    char *dir;
    char *key;
    char *what;         /* the VM, for messages */
    int lock_fd;
    int follow_fd;
};

static char *state_path(VmemState *s, const char *ext)
{
    g_autofree char *name = g_strdup_printf("%s.%s", s->key, ext);

    return g_build_filename(s->dir, name, NULL);
}

static gboolean state_errno(VmemState *s, const char *path, int err,
                            GError **errp)
{
    g_set_error(errp, VMEM_LIMIT_ERROR,
                err == EACCES || err == EPERM || err == EROFS ?
                VMEM_EXIT_PERMISSION : VMEM_EXIT_USAGE,
                "state file %s of %s: %s; run as root or give --state-dir "
                "a directory you may write", path, s->what, g_strerror(err));
    return FALSE;
}

VmemState *vmem_state_open(const char *dir, const char *key, const char *what,
                           GError **errp)
{
    VmemState *s = g_new0(VmemState, 1);

    s->dir = g_strdup(dir);
    s->key = g_strdup(key);
    s->what = g_strdup(what);
    s->lock_fd = s->follow_fd = -1;
    if (g_mkdir_with_parents(dir, 0755) < 0) {
        state_errno(s, dir, errno, errp);
        vmem_state_close(s);
        return NULL;
    }
    return s;
}

void vmem_state_close(VmemState *s)
{
    if (!s) {
        return;
    }
    if (s->lock_fd >= 0) {
        close(s->lock_fd);
    }
    if (s->follow_fd >= 0) {
        close(s->follow_fd);
    }
    g_free(s->dir);
    g_free(s->key);
    g_free(s->what);
    g_free(s);
}

static int state_open_file(VmemState *s, const char *ext, GError **errp)
{
    g_autofree char *path = state_path(s, ext);
    int fd = open(path, O_RDWR | O_CREAT | O_CLOEXEC, 0644);

    if (fd < 0) {
        state_errno(s, path, errno, errp);
    }
    return fd;
}

/* The pid another instance wrote into a lock file it holds, or 0. */
static int state_holder(int fd)
{
    char buf[32] = "";

    if (pread(fd, buf, sizeof(buf) - 1, 0) <= 0) {
        return 0;
    }
    return atoi(buf);
}

static void state_mark(int fd)
{
    g_autofree char *pid = g_strdup_printf("%d\n", (int)getpid());

    if (ftruncate(fd, 0) == 0) {
        (void)!pwrite(fd, pid, strlen(pid), 0);
    }
}

gboolean vmem_state_lock(VmemState *s, GError **errp)
{
    gint64 deadline = g_get_monotonic_time() + LOCK_WAIT_US;
    gboolean told = FALSE;

    if (!s || s->lock_fd >= 0) {
        return TRUE;
    }
    s->lock_fd = state_open_file(s, "lock", errp);
    if (s->lock_fd < 0) {
        return FALSE;
    }
    while (flock(s->lock_fd, LOCK_EX | LOCK_NB) < 0) {
        if (errno != EWOULDBLOCK && errno != EINTR) {
            g_autofree char *path = state_path(s, "lock");

            state_errno(s, path, errno, errp);
            close(s->lock_fd);
            s->lock_fd = -1;
            return FALSE;
        }
        if (g_get_monotonic_time() > deadline) {
            g_autofree char *path = state_path(s, "lock");

            g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_TIMEOUT,
                        "another vmem-limit (pid %d) has held %s of %s for "
                        "30 s; is it stuck?", state_holder(s->lock_fd), path,
                        s->what);
            close(s->lock_fd);
            s->lock_fd = -1;
            return FALSE;
        }
        if (!told) {
            g_printerr("vmem-limit: waiting for another vmem-limit (pid %d) "
                       "working on %s\n", state_holder(s->lock_fd), s->what);
            told = TRUE;
        }
        g_usleep(20000);
    }
    state_mark(s->lock_fd);
    return TRUE;
}

void vmem_state_unlock(VmemState *s)
{
    if (s && s->lock_fd >= 0) {
        /* closing drops the flock */
        close(s->lock_fd);
        s->lock_fd = -1;
    }
}

gboolean vmem_state_claim_follow(VmemState *s, GError **errp)
{
    if (!s) {
        return TRUE;
    }
    s->follow_fd = state_open_file(s, "follow", errp);
    if (s->follow_fd < 0) {
        return FALSE;
    }
    if (flock(s->follow_fd, LOCK_EX | LOCK_NB) < 0) {
        g_autofree char *path = state_path(s, "follow");
        int e = errno;

        if (e == EWOULDBLOCK) {
            g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_USAGE,
                        "another vmem-limit follow (pid %d, %s) already "
                        "follows %s; stop it first (one per VM)",
                        state_holder(s->follow_fd), path, s->what);
        } else {
            state_errno(s, path, e, errp);
        }
        close(s->follow_fd);
        s->follow_fd = -1;
        return FALSE;
    }
    state_mark(s->follow_fd);
    return TRUE;
}

/* The base an earlier instance used for this run of the VM, or 0. */
guint64 vmem_state_get_base(VmemState *s, const char *instance)
{
    g_autofree char *path = NULL, *text = NULL;
    g_auto(GStrv) lines = NULL;
    gboolean same = FALSE;
    guint64 base = 0;
    guint i;

    if (!s || !instance) {
        return 0;
    }
    path = state_path(s, "base");
    if (!g_file_get_contents(path, &text, NULL, NULL)) {
        return 0;
    }
    lines = g_strsplit(text, "\n", 0);
    for (i = 0; lines[i]; i++) {
        if (g_str_has_prefix(lines[i], "instance ")) {
            same = !strcmp(lines[i] + 9, instance);
        } else if (g_str_has_prefix(lines[i], "base ")) {
            base = g_ascii_strtoull(lines[i] + 5, NULL, 10);
        }
    }
    return same && base <= VMEM_SIZE_MAX ? base : 0;
}

gboolean vmem_state_put_base(VmemState *s, const char *instance, guint64 base,
                             GError **errp)
{
    g_autofree char *path = NULL, *text = NULL;
    g_autoptr(GError) err = NULL;

    if (!s || !instance) {
        return TRUE;
    }
    path = state_path(s, "base");
    text = g_strdup_printf("# vmem-limit: the base of %s\ninstance %s\n"
                           "base %" G_GUINT64_FORMAT "\n", s->what, instance,
                           base);
    if (!g_file_set_contents(path, text, -1, &err)) {
        g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_PERMISSION,
                    "cannot write %s: %s; give --state-dir a directory you "
                    "may write", path, err->message);
        return FALSE;
    }
    return TRUE;
}
