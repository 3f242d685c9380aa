// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * The patched virtio_mem driver of the kernel base this module is built
 * for (Kbuild picks linux-<version>.<patchlevel>/virtio_mem.c).
 */
#include VMM_DRIVER_SOURCE
