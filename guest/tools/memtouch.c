/* SPDX-License-Identifier: GPL-2.0-or-later */
/*
 * memtouch: make the guest's free memory resident on the host.
 *
 * Allocates anonymous memory in 2 MiB chunks and writes one byte per
 * 4 KiB page until the requested amount is touched or the guest's
 * MemAvailable drops below a reserve, then frees it all and exits.  The
 * pages the guest touched stay populated on the host, which is what the
 * footprint tests measure.
 *
 * Usage: memtouch [MiB]      (default: all but the reserve)
 */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

#define CHUNK		(2UL << 20)
#define PAGE		4096UL
#define RESERVE_KB	(24UL << 10)

static long mem_available_kb(void)
{
	char line[256];
	long kb = -1;
	FILE *f = fopen("/proc/meminfo", "r");

	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f))
		if (sscanf(line, "MemAvailable: %ld kB", &kb) == 1)
			break;
	fclose(f);
	return kb;
}

int main(int argc, char **argv)
{
	unsigned long want = argc > 1 ? strtoul(argv[1], NULL, 0) << 20 : ~0UL;
	unsigned long done = 0, chunks = 0, i, off;
	void **list = NULL;

	while (done < want) {
		long avail = mem_available_kb();
		void *p;

		if (avail < 0 || (unsigned long)avail < RESERVE_KB + (CHUNK >> 10))
			break;
		p = mmap(NULL, CHUNK, PROT_READ | PROT_WRITE,
			 MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
		if (p == MAP_FAILED)
			break;
		for (off = 0; off < CHUNK; off += PAGE)
			((volatile char *)p)[off] = 1;
		list = realloc(list, (chunks + 1) * sizeof(*list));
		if (!list)
			return 1;
		list[chunks++] = p;
		done += CHUNK;
	}
	for (i = 0; i < chunks; i++)
		munmap(list[i], CHUNK);
	free(list);
	printf("touched %lu MiB\n", done >> 20);
	return 0;
}
