// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * The patched virtio_mem driver of the kernel base this module is built
 * for (Kbuild picks linux-<version>.<patchlevel>/virtio_mem.c).
 */
#include VMM_DRIVER_SOURCE

/*
 * The package's version: shown in /sys/module/virtio_mem/version, and
 * what DKMS compares with the kernel's own module, which has none (with
 * neither module versioned, dkms 3.0 takes them for the same module and
 * keeps the kernel's).
 */
MODULE_VERSION("@PACKAGE_VERSION@-vmemmap");
