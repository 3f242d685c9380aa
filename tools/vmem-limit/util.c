// SPDX-License-Identifier: GPL-2.0-or-later
/* Sizes, devices, the error domain, targets: small helpers of vmem-limit. */
#include <errno.h>
#include <stddef.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <unistd.h>

#include "vmem-limit.h"

GQuark vmem_limit_error_quark(void)
{
    return g_quark_from_static_string("vmem-limit-error-quark");
}

void vmem_device_free(VmemDevice *d)
{
    if (d) {
        g_free(d->id);
        g_free(d->memdev);
        g_free(d);
    }
}

void vmem_target_close(VmemTarget *t)
{
    if (!t) {
        return;
    }
    t->close(t);
    g_free(t->what);
    g_free(t->limit_name);
    g_free(t->soft_name);
    g_free(t->key);
    g_free(t->instance);
    g_free(t);
}

gboolean vmem_parse_size(const char *what, const char *s, guint64 *bytes,
                         GError **errp)
{
    static const struct {
        const char *suffix;
        int shift;
    } units[] = {
        { "", 0 }, { "b", 0 },
        { "k", 10 }, { "kib", 10 }, { "m", 20 }, { "mib", 20 },
        { "g", 30 }, { "gib", 30 }, { "t", 40 }, { "tib", 40 },
    };
    char *end;
    guint64 n;
    guint i;

    if (!s || !g_ascii_isdigit(*s)) {
        goto bad;
    }
    errno = 0;
    n = g_ascii_strtoull(s, &end, 10);
    if (errno == ERANGE) {
        goto big;
    }
    for (i = 0; i < G_N_ELEMENTS(units); i++) {
        if (!g_ascii_strcasecmp(end, units[i].suffix)) {
            if (n > (VMEM_SIZE_MAX >> units[i].shift)) {
                goto big;
            }
            *bytes = n << units[i].shift;
            return TRUE;
        }
    }
bad:
    g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_USAGE,
                "%s '%s' is not a size; write e.g. 4G, 512M or bytes",
                what, s ? s : "");
    return FALSE;
big:
    g_set_error(errp, VMEM_LIMIT_ERROR, VMEM_EXIT_USAGE,
                "%s '%s' is more than 4 PiB, more memory than an x86-64 "
                "machine can address; check the number", what, s);
    return FALSE;
}

gboolean vmem_add_size(guint64 *sum, guint64 more)
{
    if (more > VMEM_SIZE_MAX || *sum > VMEM_SIZE_MAX - more) {
        return FALSE;
    }
    *sum += more;
    return TRUE;
}

char *vmem_fmt_size(guint64 bytes)
{
    if (bytes == VMEM_UNLIMITED) {
        return g_strdup("unlimited");
    }
    return g_strdup_printf("%.1f MiB", bytes / 1048576.0);
}

/*
 * sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET, if
 * the service manager gave one.  Failures are ignored, as sd_notify's
 * callers mostly do: the service manager notices a missing READY=1.
 */
void vmem_notify(const char *fmt, ...)
{
    const char *path = g_getenv("NOTIFY_SOCKET");
    struct sockaddr_un sa = { .sun_family = AF_UNIX };
    g_autofree char *msg = NULL;
    socklen_t len;
    va_list ap;
    int fd;

    if (!path || !*path || strlen(path) >= sizeof(sa.sun_path) ||
        (path[0] != '/' && path[0] != '@')) {
        return;
    }
    va_start(ap, fmt);
    msg = g_strdup_vprintf(fmt, ap);
    va_end(ap);
    strcpy(sa.sun_path, path);
    len = offsetof(struct sockaddr_un, sun_path) + strlen(path);
    if (path[0] == '@') {
        sa.sun_path[0] = 0;     /* an abstract socket */
    }
    fd = socket(AF_UNIX, SOCK_DGRAM | SOCK_CLOEXEC, 0);
    if (fd < 0) {
        return;
    }
    (void)!sendto(fd, msg, strlen(msg), MSG_NOSIGNAL,
                  (struct sockaddr *)&sa, len);
    close(fd);
}
