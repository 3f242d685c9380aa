// SPDX-License-Identifier: GPL-2.0
/*
 * zone_walk_skip: test kit only, never for a production guest.
 *
 * Simulates a proposed mm change on the running (Debian) kernel, so that
 * its effect on memory hotplug can be measured before anyone builds a
 * kernel with it: set_zone_contiguous() returns at once when the last
 * pageblock of the zone is not online.  Its walk would stop there, or
 * earlier, without setting zone->contiguous, so the outcome is the same
 * and only the walk is saved.  This is the case for every memory block
 * onlined at the top of a zone, and for the memmap pages that
 * memory_hotplug.memmap_on_memory moves to the zone first
 * (docs/devel/cost.rst).
 *
 * set_zone_contiguous() is redirected with an ftrace handler that may
 * modify the instruction pointer, the way livepatch redirects functions.
 * The counters are in /sys/module/zone_walk_skip/parameters/.
 */

#include <linux/ftrace.h>
#include <linux/memory_hotplug.h>
#include <linux/mmzone.h>
#include <linux/module.h>

static unsigned long skipped;
module_param(skipped, ulong, 0444);
MODULE_PARM_DESC(skipped, "set_zone_contiguous() calls that returned at once");

static unsigned long walked;
module_param(walked, ulong, 0444);
MODULE_PARM_DESC(walked, "set_zone_contiguous() calls left to walk the zone");

static noinline void zone_walk_skip_return(struct zone *zone)
{
}

static void notrace zone_walk_skip_handler(unsigned long ip,
					   unsigned long parent_ip,
					   struct ftrace_ops *ops,
					   struct ftrace_regs *fregs)
{
	struct zone *zone = (struct zone *)ftrace_regs_get_argument(fregs, 0);

	/* Callers hold the hotplug lock: the counters need no atomics. */
	if (zone_is_empty(zone) || pfn_to_online_page(zone_end_pfn(zone) - 1)) {
		walked++;
		return;
	}
	skipped++;
	ftrace_regs_set_instruction_pointer(fregs,
					    (unsigned long)zone_walk_skip_return);
}

static struct ftrace_ops zone_walk_skip_ops = {
	.func = zone_walk_skip_handler,
	.flags = FTRACE_OPS_FL_IPMODIFY,
};

static int __init zone_walk_skip_init(void)
{
	char name[] = "set_zone_contiguous";
	int rc;

	rc = ftrace_set_filter(&zone_walk_skip_ops, name, strlen(name), 0);
	if (rc) {
		pr_err("zone_walk_skip: cannot trace %s: %d\n", name, rc);
		return rc;
	}
	rc = register_ftrace_function(&zone_walk_skip_ops);
	if (rc) {
		pr_err("zone_walk_skip: cannot redirect %s: %d\n", name, rc);
		return rc;
	}
	pr_info("zone_walk_skip: %s returns at once for a zone whose last pageblock is offline (test kit only)\n",
		name);
	return 0;
}

static void __exit zone_walk_skip_exit(void)
{
	unregister_ftrace_function(&zone_walk_skip_ops);
}

module_init(zone_walk_skip_init);
module_exit(zone_walk_skip_exit);
MODULE_DESCRIPTION("Test kit: simulate an O(1) set_zone_contiguous() for a zone growing at its top");
MODULE_LICENSE("GPL");
