/* SPDX-License-Identifier: GPL-2.0 WITH Linux-syscall-note */
/*
 * Userspace interface of the quiver module (/dev/quiver). Included by the
 * module, the C tests and the shm addon, so the numbers cannot drift apart.
 */
#ifndef QUIVER_UAPI_H
#define QUIVER_UAPI_H

#include <linux/ioctl.h>
#include <linux/types.h>

#define QUIVER_DEVICE_PATH "/dev/quiver"

/*
 * QUIVER_IOC_SHARE on /dev/quiver: pins the physical pages behind
 * [addr, addr + length) of the caller's private anonymous memory and returns,
 * in `fd`, a read-only file naming exactly those pages (a "region").
 * addr and length must be page aligned, length > 0, flags 0.
 */
struct quiver_share {
	__u64 addr;
	__u64 length;
	__u32 flags;
	__s32 fd;     /* out: O_RDONLY | O_CLOEXEC region fd */
	__u64 id;     /* out: region id, unique while the module is loaded */
};

/* QUIVER_IOC_INFO on a region fd: its length and id, for consumers that only got the fd. */
struct quiver_region_info {
	__u64 length;
	__u64 id;
};

#define QUIVER_IOC_MAGIC 'Q'
#define QUIVER_IOC_SHARE _IOWR(QUIVER_IOC_MAGIC, 1, struct quiver_share)
#define QUIVER_IOC_INFO _IOR(QUIVER_IOC_MAGIC, 2, struct quiver_region_info)

#endif
