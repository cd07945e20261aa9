// SPDX-License-Identifier: GPL-2.0
/*
 * quiver: de-anonymize memory (Zerrow-style zero-copy hand-off).
 *
 * A process asks /dev/quiver to turn a page-aligned range of its private
 * anonymous memory into a region: the physical pages behind the range are
 * pinned (FOLL_LONGTERM, so they cannot move or be reclaimed) and a new
 * anon-inode file names them. Whoever holds that file can map it, read-only
 * only, and sees exactly those pages: nothing is copied. The region lives as
 * long as its file, and a file lives while any fd or mapping refers to it,
 * so producer and consumers may exit in any order.
 *
 * Pinned pages are charged to the producer's locked memory (RLIMIT_MEMLOCK
 * unless CAP_IPC_LOCK) and to a module-wide cap, max_pinned_bytes.
 */
#include <linux/anon_inodes.h>
#include <linux/atomic.h>
#include <linux/device.h>
#include <linux/file.h>
#include <linux/fs.h>
#include <linux/miscdevice.h>
#include <linux/mm.h>
#include <linux/module.h>
#include <linux/pfn_t.h>
#include <linux/sched/mm.h>
#include <linux/slab.h>
#include <linux/uaccess.h>
#include <linux/version.h>

#include "quiver_uapi.h"

/* 0 at load time means half of RAM. Writable at runtime by root. */
static unsigned long max_pinned_bytes;
module_param(max_pinned_bytes, ulong, 0644);
MODULE_PARM_DESC(max_pinned_bytes, "Cap on the bytes all regions together may pin (0 at load: half of RAM)");

static atomic_long_t pinned_pages = ATOMIC_LONG_INIT(0);
static atomic_long_t live_regions = ATOMIC_LONG_INIT(0);
static atomic64_t regions_created = ATOMIC64_INIT(0);

/* Pages mapped per fault: neighbours are inserted too, since consumers read regions front to back. */
#define QUIVER_FAULT_AROUND 32

struct quiver_region {
	struct page **pages;
	unsigned long npages;
	struct mm_struct *charged_mm; /* mmgrab'd: the locked_vm to uncharge */
	u64 id;
};

static void quiver_vm_flags(struct vm_area_struct *vma, unsigned long set, unsigned long clear)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 3, 0)
	vm_flags_set(vma, set);
	vm_flags_clear(vma, clear);
#else
	vma->vm_flags |= set;
	vma->vm_flags &= ~clear;
#endif
}

static vm_fault_t quiver_insert(struct vm_area_struct *vma, unsigned long addr, struct page *page)
{
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 17, 0)
	return vmf_insert_mixed(vma, addr, page_to_pfn(page));
#else
	return vmf_insert_mixed(vma, addr, pfn_to_pfn_t(page_to_pfn(page)));
#endif
}

static long quiver_pin(unsigned long addr, unsigned long npages, struct page **pages)
{
	/* FOLL_WRITE breaks COW and populates untouched memory, so the region gets the
	 * producer's own exclusive pages, never the shared zero page. */
	unsigned int flags = FOLL_WRITE | FOLL_LONGTERM;
#if LINUX_VERSION_CODE >= KERNEL_VERSION(6, 5, 0)
	return pin_user_pages(addr, npages, flags, pages);
#else
	return pin_user_pages(addr, npages, flags, pages, NULL);
#endif
}

static void quiver_uncharge(struct quiver_region *region)
{
	/* A producer that already exited took its locked_vm with it. */
	if (mmget_not_zero(region->charged_mm)) {
		account_locked_vm(region->charged_mm, region->npages, false);
		mmput(region->charged_mm);
	}
	mmdrop(region->charged_mm);
}

/* ---- region files ------------------------------------------------------- */

static vm_fault_t quiver_fault(struct vm_fault *vmf)
{
	struct vm_area_struct *vma = vmf->vma;
	struct quiver_region *region = vma->vm_private_data;
	unsigned long first = vmf->pgoff;
	unsigned long addr = vmf->address & PAGE_MASK;
	vm_fault_t ret;
	int i;

	if (first >= region->npages)
		return VM_FAULT_SIGBUS;
	ret = quiver_insert(vma, addr, region->pages[first]);
	if (ret & VM_FAULT_ERROR)
		return ret;
	for (i = 1; i < QUIVER_FAULT_AROUND; i++) {
		unsigned long next = addr + (unsigned long)i * PAGE_SIZE;

		if (next >= vma->vm_end || first + i >= region->npages)
			break;
		/* Best effort: a page already mapped or an allocation failure just waits for its own fault. */
		if (quiver_insert(vma, next, region->pages[first + i]) & VM_FAULT_ERROR)
			break;
	}
	return ret;
}

static const struct vm_operations_struct quiver_vm_ops = {
	.fault = quiver_fault,
};

static int quiver_region_mmap(struct file *file, struct vm_area_struct *vma)
{
	struct quiver_region *region = file->private_data;
	unsigned long pages = vma_pages(vma);

	/* MAP_SHARED with PROT_WRITE already failed in the VFS (the file is O_RDONLY);
	 * this refuses MAP_PRIVATE with PROT_WRITE, whose writes would COW. */
	if (vma->vm_flags & VM_WRITE)
		return -EPERM;
	if (vma->vm_pgoff >= region->npages || pages > region->npages - vma->vm_pgoff)
		return -EINVAL;
	/* No VM_MAYWRITE: a later mprotect(PROT_WRITE) fails with EACCES. Special PTEs
	 * (VM_MIXEDMAP) keep the pages out of rmap, GUP and core dumps of consumers. */
	quiver_vm_flags(vma, VM_MIXEDMAP | VM_DONTEXPAND | VM_DONTDUMP, VM_MAYWRITE);
	vma->vm_ops = &quiver_vm_ops;
	vma->vm_private_data = region;
	return 0;
}

static long quiver_region_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	struct quiver_region *region = file->private_data;
	struct quiver_region_info info = { .length = (u64)region->npages << PAGE_SHIFT, .id = region->id };

	if (cmd != QUIVER_IOC_INFO)
		return -ENOTTY;
	if (copy_to_user((void __user *)arg, &info, sizeof(info)))
		return -EFAULT;
	return 0;
}

/* Runs when the last fd is closed and the last mapping is gone (each VMA holds a file reference). */
static int quiver_region_release(struct inode *inode, struct file *file)
{
	struct quiver_region *region = file->private_data;

	unpin_user_pages_dirty_lock(region->pages, region->npages, true);
	quiver_uncharge(region);
	atomic_long_sub(region->npages, &pinned_pages);
	atomic_long_dec(&live_regions);
	kvfree(region->pages);
	kfree(region);
	return 0;
}

static const struct file_operations quiver_region_fops = {
	.owner = THIS_MODULE,
	.mmap = quiver_region_mmap,
	.unlocked_ioctl = quiver_region_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.release = quiver_region_release,
	.llseek = noop_llseek,
};

/* ---- /dev/quiver -------------------------------------------------------- */

/*
 * Every VMA over [start, end) must exist (else EFAULT), be private anonymous
 * memory (else EOPNOTSUPP: file-backed, shmem, or another region), and be
 * readable and writable (else EACCES). Called with mmap_lock held.
 */
static int quiver_check_range(struct mm_struct *mm, unsigned long start, unsigned long end)
{
	unsigned long addr = start;

	while (addr < end) {
		struct vm_area_struct *vma = find_vma(mm, addr);

		if (!vma || vma->vm_start > addr)
			return -EFAULT;
		if (!vma_is_anonymous(vma) || vma->vm_file ||
		    (vma->vm_flags & (VM_SHARED | VM_IO | VM_PFNMAP | VM_MIXEDMAP | VM_HUGETLB)))
			return -EOPNOTSUPP;
		if ((vma->vm_flags & (VM_READ | VM_WRITE)) != (VM_READ | VM_WRITE))
			return -EACCES;
		addr = vma->vm_end;
	}
	return 0;
}

static bool quiver_reserve(unsigned long npages)
{
	unsigned long cap = READ_ONCE(max_pinned_bytes) >> PAGE_SHIFT;

	if (atomic_long_add_return(npages, &pinned_pages) > cap) {
		atomic_long_sub(npages, &pinned_pages);
		return false;
	}
	return true;
}

static int quiver_pin_range(struct quiver_region *region, unsigned long addr)
{
	struct mm_struct *mm = current->mm;
	long pinned;
	int err;

	mmap_read_lock(mm);
	err = quiver_check_range(mm, addr, addr + (region->npages << PAGE_SHIFT));
	if (err) {
		mmap_read_unlock(mm);
		return err;
	}
	pinned = quiver_pin(addr, region->npages, region->pages);
	mmap_read_unlock(mm);
	if (pinned < 0)
		return pinned;
	if ((unsigned long)pinned != region->npages) {
		unpin_user_pages(region->pages, pinned);
		return -EFAULT;
	}
	return 0;
}

static long quiver_share(struct quiver_share __user *uarg)
{
	struct quiver_share req;
	struct quiver_region *region;
	struct file *file;
	unsigned long npages;
	int fd, err;

	if (copy_from_user(&req, uarg, sizeof(req)))
		return -EFAULT;
	if (req.flags || !req.length || !PAGE_ALIGNED(req.addr) || !PAGE_ALIGNED(req.length) ||
	    req.addr + req.length < req.addr || req.addr + req.length > TASK_SIZE)
		return -EINVAL;
	npages = req.length >> PAGE_SHIFT;
	if (!quiver_reserve(npages))
		return -ENOSPC;

	err = -ENOMEM;
	region = kzalloc(sizeof(*region), GFP_KERNEL);
	if (!region)
		goto unreserve;
	region->npages = npages;
	/* NOWARN: a huge request under a huge cap is a plain ENOMEM, not a kvmalloc WARN. */
	region->pages = kvmalloc_array(npages, sizeof(*region->pages), GFP_KERNEL_ACCOUNT | __GFP_NOWARN);
	if (!region->pages)
		goto free_region;

	/* Charged before pinning, like mlock: over RLIMIT_MEMLOCK is ENOMEM and pins nothing. */
	err = account_locked_vm(current->mm, npages, true);
	if (err)
		goto free_pages;
	mmgrab(current->mm);
	region->charged_mm = current->mm;

	err = quiver_pin_range(region, req.addr);
	if (err)
		goto uncharge;

	fd = get_unused_fd_flags(O_CLOEXEC);
	if (fd < 0) {
		err = fd;
		goto unpin;
	}
	file = anon_inode_getfile("[quiver-region]", &quiver_region_fops, region, O_RDONLY | O_CLOEXEC);
	if (IS_ERR(file)) {
		err = PTR_ERR(file);
		put_unused_fd(fd);
		goto unpin;
	}
	region->id = atomic64_inc_return(&regions_created);
	atomic_long_inc(&live_regions);

	req.fd = fd;
	req.id = region->id;
	if (copy_to_user(uarg, &req, sizeof(req))) {
		put_unused_fd(fd);
		fput(file); /* release() undoes everything above */
		return -EFAULT;
	}
	fd_install(fd, file);
	return 0;

unpin:
	unpin_user_pages(region->pages, npages);
uncharge:
	quiver_uncharge(region);
free_pages:
	kvfree(region->pages);
free_region:
	kfree(region);
unreserve:
	atomic_long_sub(npages, &pinned_pages);
	return err;
}

static long quiver_dev_ioctl(struct file *file, unsigned int cmd, unsigned long arg)
{
	if (cmd != QUIVER_IOC_SHARE)
		return -ENOTTY;
	return quiver_share((struct quiver_share __user *)arg);
}

/* ---- sysfs: /sys/class/misc/quiver/ ------------------------------------- */

static ssize_t pinned_bytes_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%lu\n", (unsigned long)atomic_long_read(&pinned_pages) << PAGE_SHIFT);
}
static DEVICE_ATTR_RO(pinned_bytes);

static ssize_t regions_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%ld\n", atomic_long_read(&live_regions));
}
static DEVICE_ATTR_RO(regions);

static ssize_t regions_created_show(struct device *dev, struct device_attribute *attr, char *buf)
{
	return sysfs_emit(buf, "%lld\n", (long long)atomic64_read(&regions_created));
}
static DEVICE_ATTR_RO(regions_created);

static struct attribute *quiver_attrs[] = {
	&dev_attr_pinned_bytes.attr,
	&dev_attr_regions.attr,
	&dev_attr_regions_created.attr,
	NULL,
};
ATTRIBUTE_GROUPS(quiver);

static const struct file_operations quiver_dev_fops = {
	.owner = THIS_MODULE,
	.unlocked_ioctl = quiver_dev_ioctl,
	.compat_ioctl = compat_ptr_ioctl,
	.llseek = noop_llseek,
};

static struct miscdevice quiver_dev = {
	.minor = MISC_DYNAMIC_MINOR,
	.name = "quiver",
	.fops = &quiver_dev_fops,
	.groups = quiver_groups,
	/* Anyone may share their own memory: it is charged to their RLIMIT_MEMLOCK. */
	.mode = 0666,
};

static int __init quiver_init(void)
{
	if (!max_pinned_bytes)
		max_pinned_bytes = (totalram_pages() / 2) << PAGE_SHIFT;
	return misc_register(&quiver_dev);
}

static void __exit quiver_exit(void)
{
	/* Every region file holds a module reference, so none is left here. */
	misc_deregister(&quiver_dev);
}

module_init(quiver_init);
module_exit(quiver_exit);
MODULE_LICENSE("GPL");
MODULE_AUTHOR("Quiver");
MODULE_DESCRIPTION("De-anonymize private memory into read-only regions shared by fd, without copying");
