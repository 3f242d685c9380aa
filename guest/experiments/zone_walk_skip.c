// SPDX-License-Identifier: GPL-2.0
/*
 * zone_walk_skip: test kit only, never for a production guest.
 *
 * Simulates a proposed mm change on the running (Debian) kernel, so that
 * its effect on memory hotplug can be measured before anyone builds a
 * kernel with it (docs/devel/cost.rst).  set_zone_contiguous() walks the
 * whole zone, one pageblock at a time, after every move of a pfn range
 * into or out of a zone; with memory_hotplug.memmap_on_memory there are
 * two moves per memory block.  Two of its outcomes are known without a
 * walk:
 *
 * - After move_pfn_range_to_zone(): the sections of the range just moved
 *   are not online yet (online_pages() and mhp_init_memmap_on_memory()
 *   mark them online afterwards), so the walk fails at the latest there:
 *   zone->contiguous stays false.
 * - After remove_pfn_range_from_zone(): a zone that was contiguous and
 *   lost a range at one of its ends (or outside its span) is still
 *   contiguous.
 *
 * In those two cases set_zone_contiguous() returns at once (with
 * zone->contiguous set accordingly), through ftrace handlers; the one on
 * set_zone_contiguous() modifies the instruction pointer, the way
 * livepatch redirects functions.  With verify=1 the module walks the
 * zone itself as well and counts the cases where the walk disagrees; it
 * then calls cond_resched(), so do not combine it with a tracer on
 * set_zone_contiguous() at large sizes.  The counters are module
 * parameters.
 */

#include <linux/ftrace.h>
#include <linux/memory_hotplug.h>
#include <linux/mmzone.h>
#include <linux/module.h>

static bool verify;
module_param(verify, bool, 0444);
MODULE_PARM_DESC(verify, "Also walk the zone and count disagreements");

static unsigned long skipped;
module_param(skipped, ulong, 0444);
MODULE_PARM_DESC(skipped, "Walks skipped: after a move into the zone");

static unsigned long kept;
module_param(kept, ulong, 0444);
MODULE_PARM_DESC(kept, "Walks skipped: contiguous zone shrunk at an end");

static unsigned long walked;
module_param(walked, ulong, 0444);
MODULE_PARM_DESC(walked, "Walks left to set_zone_contiguous()");

static unsigned long disagreed;
module_param(disagreed, ulong, 0444);
MODULE_PARM_DESC(disagreed, "verify=1: skipped walks whose outcome differed");

/*
 * Set by move_pfn_range_to_zone() and remove_pfn_range_from_zone() for
 * the set_zone_contiguous() at their end.  All three run under
 * mem_hotplug_lock held for writing: no locking.
 */
static struct zone *zone_walk_skip_moved;
static struct zone *zone_walk_skip_keep;

/* What set_zone_contiguous() decides, for verify=1. */
static bool zone_walk_skip_walk(struct zone *zone)
{
	unsigned long end = zone_end_pfn(zone);
	unsigned long pfn, last;
	struct page *first;

	for (pfn = zone->zone_start_pfn; pfn < end; pfn = last + 1) {
		last = min(pageblock_end_pfn(pfn), end) - 1;
		if (!pfn_valid(last))
			return false;
		first = pfn_to_online_page(pfn);
		if (!first || page_zone(first) != zone ||
		    page_zone_id(first) != page_zone_id(pfn_to_page(last)))
			return false;
		cond_resched();
	}
	return true;
}

static noinline void zone_walk_skip_return(struct zone *zone)
{
}

static void notrace zone_walk_skip_move(unsigned long ip,
					unsigned long parent_ip,
					struct ftrace_ops *ops,
					struct ftrace_regs *fregs)
{
	zone_walk_skip_moved = (struct zone *)ftrace_regs_get_argument(fregs, 0);
	zone_walk_skip_keep = NULL;
}

static void notrace zone_walk_skip_remove(unsigned long ip,
					  unsigned long parent_ip,
					  struct ftrace_ops *ops,
					  struct ftrace_regs *fregs)
{
	struct zone *zone = (struct zone *)ftrace_regs_get_argument(fregs, 0);
	unsigned long start = ftrace_regs_get_argument(fregs, 1);
	unsigned long end = start + ftrace_regs_get_argument(fregs, 2);

	zone_walk_skip_moved = NULL;
	zone_walk_skip_keep = NULL;
	if (!zone_is_zone_device(zone) && zone->contiguous &&
	    (start <= zone->zone_start_pfn || end >= zone_end_pfn(zone)))
		zone_walk_skip_keep = zone;
}

static void notrace zone_walk_skip_set(unsigned long ip,
				       unsigned long parent_ip,
				       struct ftrace_ops *ops,
				       struct ftrace_regs *fregs)
{
	struct zone *zone = (struct zone *)ftrace_regs_get_argument(fregs, 0);
	bool contiguous;

	if (zone_walk_skip_keep == zone) {
		contiguous = true;
		kept++;
	} else if (zone_walk_skip_moved == zone) {
		contiguous = false;
		skipped++;
	} else {
		zone_walk_skip_moved = NULL;
		zone_walk_skip_keep = NULL;
		walked++;
		return;
	}
	zone_walk_skip_moved = NULL;
	zone_walk_skip_keep = NULL;
	if (verify && zone_walk_skip_walk(zone) != contiguous)
		disagreed++;
	zone->contiguous = contiguous;
	ftrace_regs_set_instruction_pointer(fregs,
					    (unsigned long)zone_walk_skip_return);
}

static struct ftrace_ops zone_walk_skip_move_ops = {
	.func = zone_walk_skip_move,
};

static struct ftrace_ops zone_walk_skip_remove_ops = {
	.func = zone_walk_skip_remove,
};

static struct ftrace_ops zone_walk_skip_set_ops = {
	.func = zone_walk_skip_set,
	.flags = FTRACE_OPS_FL_IPMODIFY,
};

static int zone_walk_skip_hook(struct ftrace_ops *ops, const char *func)
{
	char name[KSYM_NAME_LEN];
	int rc;

	strscpy(name, func, sizeof(name));
	rc = ftrace_set_filter(ops, name, strlen(name), 0);
	if (!rc)
		rc = register_ftrace_function(ops);
	if (rc)
		pr_err("zone_walk_skip: cannot hook %s: %d\n", func, rc);
	return rc;
}

static int __init zone_walk_skip_init(void)
{
	int rc;

	rc = zone_walk_skip_hook(&zone_walk_skip_move_ops,
				 "move_pfn_range_to_zone");
	if (rc)
		return rc;
	rc = zone_walk_skip_hook(&zone_walk_skip_remove_ops,
				 "remove_pfn_range_from_zone");
	if (rc)
		goto err_move;
	rc = zone_walk_skip_hook(&zone_walk_skip_set_ops, "set_zone_contiguous");
	if (rc)
		goto err_remove;
	pr_info("zone_walk_skip: set_zone_contiguous() skips walks whose outcome is known (test kit only)%s\n",
		verify ? ", verifying" : "");
	return 0;

err_remove:
	unregister_ftrace_function(&zone_walk_skip_remove_ops);
err_move:
	unregister_ftrace_function(&zone_walk_skip_move_ops);
	return rc;
}

static void __exit zone_walk_skip_exit(void)
{
	unregister_ftrace_function(&zone_walk_skip_set_ops);
	unregister_ftrace_function(&zone_walk_skip_remove_ops);
	unregister_ftrace_function(&zone_walk_skip_move_ops);
}

module_init(zone_walk_skip_init);
module_exit(zone_walk_skip_exit);
MODULE_DESCRIPTION("Test kit: simulate set_zone_contiguous() without needless walks");
MODULE_LICENSE("GPL");
