// SPDX-License-Identifier: GPL-2.0-or-later
/* Sizes, devices, the error domain, targets: small helpers of vmem-limit. */
#include <string.h>

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
    g_free(t);
}

gboolean vmem_parse_size(const char *s, guint64 *bytes)
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
        return FALSE;
    }
    n = g_ascii_strtoull(s, &end, 10);
    for (i = 0; i < G_N_ELEMENTS(units); i++) {
        if (!g_ascii_strcasecmp(end, units[i].suffix)) {
            if (units[i].shift && n > (G_MAXUINT64 >> units[i].shift)) {
                return FALSE;
            }
            *bytes = n << units[i].shift;
            return TRUE;
        }
    }
    return FALSE;
}

char *vmem_fmt_size(guint64 bytes)
{
    if (bytes == VMEM_UNLIMITED) {
        return g_strdup("unlimited");
    }
    return g_strdup_printf("%.1f MiB", bytes / 1048576.0);
}
