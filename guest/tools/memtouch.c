// SPDX-License-Identifier: GPL-2.0-or-later
/*
 * memtouch: make the guest's free memory resident on the host.
 *
 * Fills a file on a private tmpfs, 2 MiB per write, until the requested
 * amount is written, the guest's MemAvailable drops below a reserve,
 * ZONE_MOVABLE has no free 2 MiB block left, or the page allocator
 * started to take memory outside ZONE_MOVABLE (the free pages of the
 * other zones fell by 2 MiB), then deletes it and exits.  The pages the
 * guest wrote stay populated on the host, which is what the footprint
 * tests measure.  The last two rules matter with memory onlined movable:
 * near the zone's watermarks, or short of free 2 MiB blocks, the
 * allocator falls back to boot memory, and boot memory is what the tests
 * watch for a memmap.
 *
 * Why a file and not anonymous memory: shmem pages come from
 * ZONE_MOVABLE like anonymous ones, but written with write() they need
 * no page tables, and on a tmpfs mounted huge=always they are 2 MiB
 * folios, each one entry in the page cache.  Anonymous memory costs
 * 2 MiB of page tables per GiB (with huge pages too: x86 deposits a page
 * table for each), and those come from boot RAM, where they would blur
 * what the tests look for there.  (A tmpfs's huge= option holds whatever
 * /sys/kernel/mm/transparent_hugepage/enabled says.)
 *
 * Prints how much it wrote, and how much of it the kernel gave as huge
 * pages and how far page tables and slab grew, for the record.
 *
 * Usage: memtouch [MiB]      (default: all but the reserve)
 */
#include <errno.h>
#include <stdbool.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>
#include <sys/mount.h>

#define CHUNK		(2UL << 20)
#define RESERVE_KB	(24UL << 10)
#define HUGE_ORDER	9
#define SPILL_PAGES	512	/* 2 MiB of 4 KiB pages */

static long meminfo_kb(const char *key)
{
	size_t len = strlen(key);
	char line[256];
	long kb = -1;
	FILE *f = fopen("/proc/meminfo", "r");

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (!strncmp(line, key, len) &&
		    sscanf(line + len, ": %ld kB", &kb) == 1)
			break;
	fclose(f);
	return kb;
}

/*
 * From /proc/buddyinfo: the free pages of every zone but Movable, and
 * how many free 2 MiB blocks Movable has.  Returns -1 on error.
 */
static int read_buddyinfo(long *boot_free, long *movable_2m)
{
	char line[512], zone[32];
	FILE *f = fopen("/proc/buddyinfo", "r");
	int node, pos, n, ret = -1;

	if (!f)
		return -1;
	*boot_free = *movable_2m = 0;
	while (fgets(line, sizeof(line), f)) {
		bool movable;
		char *p = line;
		long count;
		int order;

		if (sscanf(p, "Node %d, zone %31s%n", &node, zone, &pos) != 2)
			continue;
		ret = 0;
		movable = !strcmp(zone, "Movable");
		p += pos;
		for (order = 0; sscanf(p, "%ld%n", &count, &n) == 1; order++) {
			if (!movable)
				*boot_free += count << order;
			else if (order >= HUGE_ORDER)
				*movable_2m += count << (order - HUGE_ORDER);
			p += n;
		}
	}
	fclose(f);
	return ret;
}

int main(int argc, char **argv)
{
	unsigned long want = argc > 1 ? strtoul(argv[1], NULL, 0) << 20 : ~0UL;
	long huge = meminfo_kb("ShmemHugePages");
	long pt = meminfo_kb("PageTables");
	long slab = meminfo_kb("Slab");
	long boot_free, boot_now, movable_2m;
	const char *stop = "done";
	char dir[] = "/tmp/memtouch.XXXXXX";
	char path[sizeof(dir) + 8];
	unsigned long done = 0;
	int fd, ret = 1;
	char *buf;

	buf = malloc(CHUNK);
	if (!buf || !mkdtemp(dir)) {
		perror("memtouch");
		return 1;
	}
	/* size=0: no limit (the default is half of the boot memory). */
	if (mount("memtouch", dir, "tmpfs", 0, "huge=always,size=0")) {
		perror("memtouch: mount tmpfs");
		goto out_rmdir;
	}
	snprintf(path, sizeof(path), "%s/fill", dir);
	fd = open(path, O_WRONLY | O_CREAT | O_EXCL, 0600);
	if (fd < 0) {
		perror("memtouch: open");
		goto out_umount;
	}
	memset(buf, 0x5a, CHUNK);
	if (read_buddyinfo(&boot_free, &movable_2m)) {
		fprintf(stderr, "memtouch: cannot read /proc/buddyinfo\n");
		goto out_close;
	}

	while (done < want) {
		long avail = meminfo_kb("MemAvailable");

		if (avail < 0 || (unsigned long)avail < RESERVE_KB + (CHUNK >> 10)) {
			stop = "MemAvailable at the reserve";
			break;
		}
		if (read_buddyinfo(&boot_now, &movable_2m)) {
			stop = "buddyinfo unreadable";
			break;
		}
		/*
		 * A 2 MiB folio comes from ZONE_MOVABLE only while it has a
		 * free 2 MiB block (one more is kept for the kernel's own
		 * movable allocations); the backstop catches what this
		 * misses.
		 */
		if (movable_2m < 2) {
			stop = "ZONE_MOVABLE has no free 2 MiB block";
			break;
		}
		if (boot_free - boot_now >= SPILL_PAGES) {
			stop = "boot memory in use";
			break;
		}
		if (write(fd, buf, CHUNK) != (ssize_t)CHUNK) {
			stop = "write failed";
			if (errno != ENOSPC && errno != ENOMEM)
				perror("memtouch: write");
			break;
		}
		done += CHUNK;
	}
	huge = meminfo_kb("ShmemHugePages") - huge;
	pt = meminfo_kb("PageTables") - pt;
	slab = meminfo_kb("Slab") - slab;
	boot_free = read_buddyinfo(&boot_now, &movable_2m) ? 0 :
		    boot_now - boot_free;
	printf("touched %lu MiB (%s), huge %ld MiB, ", done >> 20, stop,
	       huge >> 10);
	printf("page tables %+ld kB, slab %+ld kB, boot zones' free %+ld kB\n",
	       pt, slab, boot_free * 4);
	ret = 0;
out_close:
	close(fd);
	unlink(path);
out_umount:
	umount(dir);
out_rmdir:
	rmdir(dir);
	free(buf);
	return ret;
}
