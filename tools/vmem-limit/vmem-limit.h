/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * vmem-limit: keep a VM's memory cgroup limit equal to what its
 * virtio-mem devices may hold.  Shared types of the tool.
 */
#ifndef VMEM_LIMIT_H
#define VMEM_LIMIT_H

#include <glib.h>

/*
 * Exit codes, and the codes of VMEM_LIMIT_ERROR.  A GError of this domain
 * carries the exit code the failure stands for, so main() never has to
 * guess which kind of failure a message describes.
 */
typedef enum {
    VMEM_EXIT_OK = 0,
    VMEM_EXIT_USAGE = 1,        /* bad command line, unknown device, bad size */
    VMEM_EXIT_PERMISSION = 2,   /* not allowed to read or write the limit */
    VMEM_EXIT_CGROUP_GONE = 3,  /* cgroup directory or its files missing */
    VMEM_EXIT_LOST = 4,         /* QMP socket or libvirt unreachable or lost */
    VMEM_EXIT_REFUSED = 5,      /* QEMU or libvirt refused a command */
    VMEM_EXIT_TIMEOUT = 6,      /* resize did not settle by the deadline */
    VMEM_EXIT_BELOW_CHARGE = 7, /* new limit would be below the charge */
    VMEM_EXIT_OOM = 8,          /* the VM was OOM-killed */
} VmemExit;

#define VMEM_LIMIT_ERROR (vmem_limit_error_quark())
GQuark vmem_limit_error_quark(void);

/* "no limit" as read from the cgroup or libvirt */
#define VMEM_UNLIMITED G_MAXUINT64

/*
 * No size the tool handles is larger: 4 PiB, what 52 physical address
 * bits reach.  Sums of a few such sizes cannot wrap a guint64.
 */
#define VMEM_SIZE_MAX (G_GUINT64_CONSTANT(1) << 52)

/* One virtio-mem device as the VMM reports it. */
typedef struct {
    char *id;               /* QEMU id / libvirt alias; NULL if none */
    char *memdev;           /* backend (QEMU) or "" */
    guint64 size;           /* plugged bytes */
    guint64 requested;      /* requested-size */
    guint64 max_size;
    guint64 block_size;
    gint64 vmemmap;         /* vmemmap-size, -1 where not reported */
} VmemDevice;

void vmem_device_free(VmemDevice *d);

/*
 * A way to reach one VM: its VMM (sizes, resize, events) and the place
 * its memory limit lives.  Every call returns fresh values: nothing is
 * cached between calls, so a decision is never taken on an old reading.
 */
typedef struct VmemTarget VmemTarget;
struct VmemTarget {
    char *what;             /* "QMP socket X" / "libvirt domain D" */
    char *limit_name;       /* "memory.max and memory.high of cgroup DIR" */
    char *soft_name;        /* the soft limit written with it, or NULL */
    char *key;              /* names the VM's lock and state files */
    char *instance;         /* this run of the VM (NULL: unknown) */
    int pid;                /* QEMU's pid, 0 where unknown */
    gboolean shut_down;     /* the VM was shut down on purpose */

    /* Every virtio-mem device, fresh from the VMM. */
    GPtrArray *(*query)(VmemTarget *t, GError **errp);
    /*
     * Host bytes resident inside the devices' memory (plugged and
     * unplugged blocks), measured by the VMM; FALSE with no error where
     * the VMM cannot tell (stock QEMU).
     */
    gboolean (*resident)(VmemTarget *t, guint64 *bytes, GError **errp);
    /* The VM's boot RAM (query-memory-size-summary's base-memory). */
    gboolean (*boot_ram)(VmemTarget *t, guint64 *bytes, GError **errp);
    /*
     * OOM kills counted in the VM's memory cgroup so far, and the file
     * that counts them; FALSE where that cannot be read.
     */
    gboolean (*oom_kills)(VmemTarget *t, guint64 *n, char **where);
    /* What the limit is compared with: the cgroup charge (or RSS). */
    gboolean (*charge)(VmemTarget *t, guint64 *bytes, const char **name,
                       GError **errp);
    gboolean (*get_limit)(VmemTarget *t, guint64 *hard, guint64 *soft,
                          GError **errp);
    /* Sets hard and soft limit together, or neither. */
    gboolean (*set_limit)(VmemTarget *t, guint64 bytes, GError **errp);
    /*
     * Asks the device for a new requested-size.  *sent tells, on failure,
     * whether the request may have reached the VMM.
     */
    gboolean (*set_requested)(VmemTarget *t, const VmemDevice *d,
                              guint64 bytes, gboolean *sent, GError **errp);
    /*
     * Waits up to timeout_ms (-1: forever) for a memory device size change
     * event; *changed says whether one came.  FALSE when the VM is lost.
     */
    gboolean (*wait_event)(VmemTarget *t, int timeout_ms, gboolean *changed,
                           GError **errp);
    void (*close)(VmemTarget *t);
    void *opaque;
};

char *vmem_target_qmp_key(const char *cgroup_dir);
VmemTarget *vmem_target_qmp_open(const char *socket_path,
                                 const char *cgroup_dir, gboolean pid_check,
                                 GError **errp);
#ifdef HAVE_LIBVIRT
VmemTarget *vmem_target_libvirt_open(const char *uri, const char *domain,
                                     GError **errp);
#endif
void vmem_target_close(VmemTarget *t);

/*
 * Sizes: "1073741824", "1G", "512MiB", "64m".  Binary units, at most
 * VMEM_SIZE_MAX.  what names the value in the error ("--base").
 */
gboolean vmem_parse_size(const char *what, const char *s, guint64 *bytes,
                         GError **errp);
/* *sum += more, FALSE (and *sum unchanged) beyond VMEM_SIZE_MAX. */
gboolean vmem_add_size(guint64 *sum, guint64 more);
/* "1024.0 MiB" (static buffer per call site is not enough: returns g_strdup) */
char *vmem_fmt_size(guint64 bytes);

/* sd_notify(3): a message to the service manager, if there is one. */
void vmem_notify(const char *fmt, ...) G_GNUC_PRINTF(1, 2);

/* proc.c: a QEMU process seen from the host. */
char *vmem_proc_instance(int pid);
int vmem_proc_find_uuid(const char *uuid);
char *vmem_proc_memory_cgroup(int pid);
gboolean vmem_cgroup_holds(const char *dir, int pid, gboolean *found,
                           GError **errp);
char *vmem_kmsg_oom_kill(int pid);

/* state.c: per-VM lock and base files. */
typedef struct VmemState VmemState;
VmemState *vmem_state_open(const char *dir, const char *key, const char *what,
                           GError **errp);
void vmem_state_close(VmemState *s);
gboolean vmem_state_lock(VmemState *s, GError **errp);
void vmem_state_unlock(VmemState *s);
gboolean vmem_state_claim_follow(VmemState *s, GError **errp);
guint64 vmem_state_get_base(VmemState *s, const char *instance);
gboolean vmem_state_put_base(VmemState *s, const char *instance, guint64 base,
                             GError **errp);

#endif
