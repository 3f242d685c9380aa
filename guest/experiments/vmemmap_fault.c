// SPDX-License-Identifier: GPL-2.0
/*
 * vmemmap_fault: test kit only, never for a production guest.
 *
 * Injects the faults the patched virtio_mem driver must survive but that a
 * healthy kernel and device never produce on demand, through kprobes, so
 * the driver's tests can reach its error paths deterministically.  Load
 * it after virtio_mem (its probe on the driver's memory notifier needs the
 * driver's symbols); every knob is a writable module parameter.
 *
 * skew_pages     mm "places" this many pages more memmap on a memory block
 *                than it does: the virtio_mem memory notifier sees, in
 *                MEM_GOING_ONLINE, an onlined range that starts that much
 *                further into the block.  Only ranges that do not start
 *                at a memory block boundary (memory added with its memmap
 *                on it) are skewed; mm itself is not touched.
 * skew_only_mb   if not -1, skew only the memory block with this index
 *                (physical address / memory block size).
 * fail_remove    the next this many offline_and_remove_memory() calls
 *                fail with -EBUSY without doing anything (-1: all).
 * fail_contig    the same for alloc_contig_range (alloc_contig_range_noprof
 *                from 6.10 on, alloc_contig_range before, or what
 *                contig_fn names): memory looks unmovable.
 * delay_add_ms   the next add_memory_driver_managed() call spins this
 *                long (counted in jiffies) on entry, before it takes the
 *                hotplug locks, with delaying set meanwhile: user space
 *                can online another memory block while the driver is
 *                about to add one.
 *
 * The counters skewed, failed_removes and failed_contigs say how often
 * each fault was injected.
 */

#include <linux/delay.h>
#include <linux/jiffies.h>
#include <linux/kprobes.h>
#include <linux/memory.h>
#include <linux/module.h>
#include <linux/ptrace.h>

#ifndef CONFIG_X86_64
#error "vmemmap_fault rewrites x86-64 argument registers"
#endif

static int skew_pages;
module_param(skew_pages, int, 0644);
MODULE_PARM_DESC(skew_pages, "Pages of memmap added to what mm placed");

static long skew_only_mb = -1;
module_param(skew_only_mb, long, 0644);
MODULE_PARM_DESC(skew_only_mb, "Skew only this memory block (-1: all)");

static int fail_remove;
module_param(fail_remove, int, 0644);
MODULE_PARM_DESC(fail_remove, "offline_and_remove_memory() calls to fail");

static int fail_contig;
module_param(fail_contig, int, 0644);
MODULE_PARM_DESC(fail_contig, "alloc_contig_range() calls to fail");

static int delay_add_ms;
module_param(delay_add_ms, int, 0644);
MODULE_PARM_DESC(delay_add_ms, "Spin the next add_memory_driver_managed()");

static bool delaying;
module_param(delaying, bool, 0444);
MODULE_PARM_DESC(delaying, "add_memory_driver_managed() is spinning");

static char *contig_fn;
module_param(contig_fn, charp, 0444);
MODULE_PARM_DESC(contig_fn, "The kernel's alloc_contig_range function");

static unsigned long skewed;
module_param(skewed, ulong, 0444);
MODULE_PARM_DESC(skewed, "Onlined ranges skewed");

static unsigned long failed_removes;
module_param(failed_removes, ulong, 0444);
MODULE_PARM_DESC(failed_removes, "offline_and_remove_memory() calls failed");

static unsigned long failed_contigs;
module_param(failed_contigs, ulong, 0444);
MODULE_PARM_DESC(failed_contigs, "alloc_contig_range() calls failed");

/*
 * What the virtio_mem notifier sees instead of mm's memory_notify.
 * Memory notifiers run under mem_hotplug_lock: one at a time.
 */
static struct memory_notify skewed_arg;

static int vmemmap_fault_skew(struct kprobe *p, struct pt_regs *regs)
{
	const unsigned long action = regs_get_kernel_argument(regs, 1);
	struct memory_notify *arg = (void *)regs_get_kernel_argument(regs, 2);
	const unsigned long mb_pages = PHYS_PFN(memory_block_size_bytes());
	const int skew = READ_ONCE(skew_pages);
	const long only = READ_ONCE(skew_only_mb);

	if (action != MEM_GOING_ONLINE || !skew ||
	    !(arg->start_pfn % mb_pages) ||
	    (only >= 0 && arg->start_pfn / mb_pages != only))
		return 0;
	skewed_arg = *arg;
	skewed_arg.start_pfn += skew;
	skewed_arg.nr_pages -= skew;
	skewed++;
	/* The notifier's third argument. */
	regs->dx = (unsigned long)&skewed_arg;
	return 0;
}

/* Where a failed call returns to its caller from, with -EBUSY. */
static noinline int vmemmap_fault_ebusy(void)
{
	return -EBUSY;
}

/* Take one from *left (-1: unlimited); false if none is left. */
static bool vmemmap_fault_take(int *left)
{
	int n = READ_ONCE(*left);

	if (!n)
		return false;
	if (n > 0)
		WRITE_ONCE(*left, n - 1);
	return true;
}

/*
 * Return -EBUSY to the caller without running the probed function, the way
 * BPF's override_return does: resume at a function that only returns.
 */
static int vmemmap_fault_override(struct pt_regs *regs)
{
	instruction_pointer_set(regs, (unsigned long)vmemmap_fault_ebusy);
	return 1;
}

static int vmemmap_fault_remove(struct kprobe *p, struct pt_regs *regs)
{
	if (!vmemmap_fault_take(&fail_remove))
		return 0;
	failed_removes++;
	return vmemmap_fault_override(regs);
}

static int vmemmap_fault_contig(struct kprobe *p, struct pt_regs *regs)
{
	if (!vmemmap_fault_take(&fail_contig))
		return 0;
	failed_contigs++;
	return vmemmap_fault_override(regs);
}

static int vmemmap_fault_delay(struct kprobe *p, struct pt_regs *regs)
{
	const int ms = xchg(&delay_add_ms, 0);
	unsigned long end;
	int spun;

	if (ms <= 0)
		return 0;
	/*
	 * Kprobe handlers cannot sleep: spin, the other CPUs run on.  Count
	 * the time in jiffies, the clock RCU's stall detector counts in: a
	 * TSC calibrated on a starved TCG host made mdelay(4000) last past
	 * its 21 s, and the stall report failed the test.  The ms-long
	 * steps only bound the spin should jiffies stand still.
	 */
	WRITE_ONCE(delaying, true);
	end = jiffies + msecs_to_jiffies(ms);
	for (spun = 0; time_before(jiffies, end) && spun < 4 * ms; spun++)
		mdelay(1);
	WRITE_ONCE(delaying, false);
	return 0;
}

/* A post handler makes the kprobe one that may change the IP. */
static void vmemmap_fault_post(struct kprobe *p, struct pt_regs *regs,
			       unsigned long flags)
{
}

/*
 * The probes, each with the names its function has had: the first one the
 * running kernel has is probed.
 */
static struct vmemmap_fault_probe {
	const char *names[3];
	struct kprobe kp;
} vmemmap_fault_probes[] = {
	{
		.names = { "virtio_mem_memory_notifier_cb" },
		.kp.pre_handler = vmemmap_fault_skew,
	},
	{
		.names = { "offline_and_remove_memory" },
		.kp.pre_handler = vmemmap_fault_remove,
		.kp.post_handler = vmemmap_fault_post,
	},
	{
		/* contig_fn first, if given. */
		.names = { NULL, "alloc_contig_range_noprof",
			   "alloc_contig_range" },
		.kp.pre_handler = vmemmap_fault_contig,
		.kp.post_handler = vmemmap_fault_post,
	},
	{
		.names = { "add_memory_driver_managed",
			   "__add_memory_driver_managed" },
		.kp.pre_handler = vmemmap_fault_delay,
	},
};

static void vmemmap_fault_unregister(int n)
{
	while (n--)
		unregister_kprobe(&vmemmap_fault_probes[n].kp);
}

static int __init vmemmap_fault_init(void)
{
	struct vmemmap_fault_probe *p;
	int i, j, rc;

	vmemmap_fault_probes[2].names[0] = contig_fn;
	for (i = 0; i < ARRAY_SIZE(vmemmap_fault_probes); i++) {
		p = &vmemmap_fault_probes[i];
		rc = -ENOENT;
		for (j = 0; j < ARRAY_SIZE(p->names) && rc; j++) {
			if (!p->names[j])
				continue;
			p->kp.symbol_name = p->names[j];
			p->kp.addr = NULL;
			rc = register_kprobe(&p->kp);
		}
		if (rc) {
			pr_err("vmemmap_fault: cannot probe %s (is virtio_mem loaded?): %d\n",
			       p->names[0] ? p->names[0] : p->names[1], rc);
			vmemmap_fault_unregister(i);
			return rc;
		}
	}
	return 0;
}

static void __exit vmemmap_fault_exit(void)
{
	vmemmap_fault_unregister(ARRAY_SIZE(vmemmap_fault_probes));
}

module_init(vmemmap_fault_init);
module_exit(vmemmap_fault_exit);
MODULE_DESCRIPTION("virtio_mem test kit: memmap and removal faults");
MODULE_LICENSE("GPL");
