/* SPDX-License-Identifier: GPL-2.0-or-later */
/* The memory limit of one cgroup directory, v2 or v1. */
#ifndef VMEM_CGROUP_H
#define VMEM_CGROUP_H

#include <glib.h>

typedef struct {
    char *dir;
    int version;            /* 2: memory.max/high, 1: memory.limit_in_bytes */
    const char *charge_file;
    const char *limit_file;
    const char *soft_file;  /* written with the limit, or NULL */
} Cgroup;

Cgroup *cgroup_open(const char *dir, GError **errp);
void cgroup_free(Cgroup *cg);
gboolean cgroup_charge(Cgroup *cg, guint64 *bytes, GError **errp);
gboolean cgroup_get_limit(Cgroup *cg, guint64 *hard, guint64 *soft,
                          GError **errp);
gboolean cgroup_set_limit(Cgroup *cg, guint64 bytes, GError **errp);
gboolean cgroup_oom_kills(Cgroup *cg, guint64 *n, char **where);

#endif
