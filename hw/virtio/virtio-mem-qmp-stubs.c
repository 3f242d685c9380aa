/*
 * virtio-mem: the QMP commands where virtio-mem is not built
 *
 * The commands are in the QAPI schema of every target; a target without
 * virtio-mem has no device to report or act on.
 *
 * Copyright (c) 2026 The virtio-mem-vmemmap authors
 *
 * SPDX-License-Identifier: GPL-2.0-or-later
 */

#include "qemu/osdep.h"
#include "qapi/error.h"
#include "qapi/qapi-commands-machine.h"

VirtioMEMFootprintList *qmp_query_virtio_mem_footprint(Error **errp)
{
    /* No virtio-mem device can exist: an empty list. */
    return NULL;
}

VirtioMEMScrubResult *qmp_x_virtio_mem_scrub(const char *qom_path,
                                             Error **errp)
{
    error_setg(errp, "'%s' is not a virtio-mem device: this QEMU has no"
               " virtio-mem support", qom_path);
    return NULL;
}

VirtioMEMState *qmp_x_query_virtio_mem_state(const char *qom_path,
                                             bool has_start, uint64_t start,
                                             Error **errp)
{
    error_setg(errp, "'%s' is not a virtio-mem device: this QEMU has no"
               " virtio-mem support", qom_path);
    return NULL;
}
