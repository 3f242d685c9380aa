// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * An LD_PRELOAD fault for tests/tools/test_vmem_limit_cgroup2.py: the
 * charge of the caller's memory cgroup rises at the moment a program
 * opens a given file for writing.
 *
 *   CHARGE_ON_OPEN=memory.high CHARGE_BYTES=100663296 \
 *       LD_PRELOAD=./charge_on_open.so vmem-limit ...
 *
 * The first open() or openat() for writing of a path ending in
 * /$CHARGE_ON_OPEN first touches CHARGE_BYTES of fresh anonymous memory,
 * kept until exit, then opens.  Run in the VM's cgroup, it is the guest
 * growing between the tool's reading of the charge and its lowering of
 * the limit, at a moment chosen instead of by chance.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

static int done;

static void charge_if(const char *path, int flags)
{
    const char *name = getenv("CHARGE_ON_OPEN");
    const char *bytes = getenv("CHARGE_BYTES");
    size_t n, len, i;
    char *p;

    if (done || !name || !bytes || !(flags & (O_WRONLY | O_RDWR))) {
        return;
    }
    len = strlen(path);
    n = strlen(name);
    if (len <= n || path[len - n - 1] != '/' || strcmp(path + len - n, name)) {
        return;
    }
    done = 1;
    n = strtoull(bytes, NULL, 0);
    p = mmap(NULL, n, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
             -1, 0);
    if (p == MAP_FAILED) {
        abort();
    }
    for (i = 0; i < n; i += 4096) {
        p[i] = 1;
    }
}

#define MODE_ARG(flags, mode) do { \
    if ((flags) & (O_CREAT | O_TMPFILE)) { \
        va_list ap; \
        va_start(ap, flags); \
        mode = va_arg(ap, mode_t); \
        va_end(ap); \
    } \
} while (0)

int open(const char *path, int flags, ...)
{
    static int (*real)(const char *, int, ...);
    mode_t mode = 0;

    MODE_ARG(flags, mode);
    if (!real) {
        real = dlsym(RTLD_NEXT, "open");
    }
    charge_if(path, flags);
    return real(path, flags, mode);
}

int open64(const char *path, int flags, ...)
{
    static int (*real)(const char *, int, ...);
    mode_t mode = 0;

    MODE_ARG(flags, mode);
    if (!real) {
        real = dlsym(RTLD_NEXT, "open64");
    }
    charge_if(path, flags);
    return real(path, flags, mode);
}

int openat(int dirfd, const char *path, int flags, ...)
{
    static int (*real)(int, const char *, int, ...);
    mode_t mode = 0;

    MODE_ARG(flags, mode);
    if (!real) {
        real = dlsym(RTLD_NEXT, "openat");
    }
    charge_if(path, flags);
    return real(dirfd, path, flags, mode);
}
