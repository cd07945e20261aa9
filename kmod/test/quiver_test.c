// SPDX-License-Identifier: GPL-2.0
/*
 * Tests and benchmark of the quiver module, run inside the VM as root.
 *   quiver-test          every test below; prints "ok"/"not ok" lines and a summary
 *   quiver-test rmmod    unloading: refused while a region lives, works after
 *   quiver-test bench N  hand an N MiB output to a child: region vs one copy into /dev/shm
 * Built static so the initramfs needs no libc.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#include "../quiver_uapi.h"

#define PAGE 4096UL
#define SYSFS "/sys/class/misc/quiver/"
#define CAP_PARAM "/sys/module/quiver/parameters/max_pinned_bytes"

static int passed, failed;
static char failure[512];

/* Records the first failure of the current test; returns 0 so checks read as `return fail(...)`. */
static int fail(const char *fmt, ...)
{
	if (failure[0] == 0) {
		va_list ap;
		va_start(ap, fmt);
		vsnprintf(failure, sizeof failure, fmt, ap);
		va_end(ap);
	}
	return 0;
}

#define CHECK(cond, ...) do { if (!(cond)) return fail(__VA_ARGS__); } while (0)

static void run(const char *name, int (*test)(void))
{
	failure[0] = 0;
	int ok = test() && failure[0] == 0;
	if (ok) {
		passed++;
		printf("ok - %s\n", name);
	} else {
		failed++;
		printf("not ok - %s: %s\n", name, failure[0] ? failure : "failed");
	}
	fflush(stdout);
}

/* ---- helpers -------------------------------------------------------------- */

static int dev_fd = -1;

static int share(void *addr, uint64_t length, uint32_t flags, uint64_t *id)
{
	struct quiver_share req = { .addr = (uintptr_t)addr, .length = length, .flags = flags, .fd = -1 };
	if (ioctl(dev_fd, QUIVER_IOC_SHARE, &req) < 0) return -errno;
	if (id) *id = req.id;
	return req.fd;
}

static void *anon(size_t length)
{
	void *p = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	return p == MAP_FAILED ? NULL : p;
}

static uint64_t pattern_word(uint64_t seed, size_t i)
{
	uint64_t x = (i + 1) * 0x9E3779B97F4A7C15ULL ^ seed;
	x ^= x >> 29;
	return x * 0xBF58476D1CE4E5B9ULL;
}

static void fill(void *p, size_t length, uint64_t seed)
{
	uint64_t *w = p;
	for (size_t i = 0; i < length / 8; i++) w[i] = pattern_word(seed, i);
}

/* Index of the first differing byte, or -1. */
static long mismatch(const void *p, size_t length, uint64_t seed)
{
	const uint64_t *w = p;
	for (size_t i = 0; i < length / 8; i++) {
		if (w[i] != pattern_word(seed, i)) return (long)(i * 8);
	}
	return -1;
}

static long read_long(const char *path)
{
	char buf[64] = { 0 };
	int fd = open(path, O_RDONLY);
	if (fd < 0) return -1;
	ssize_t n = read(fd, buf, sizeof buf - 1);
	close(fd);
	return n > 0 ? strtol(buf, NULL, 10) : -1;
}

static int write_string(const char *path, const char *value)
{
	int fd = open(path, O_WRONLY);
	if (fd < 0) return -errno;
	ssize_t n = write(fd, value, strlen(value));
	int err = n < 0 ? -errno : 0;
	close(fd);
	return err;
}

static long pinned_bytes(void) { return read_long(SYSFS "pinned_bytes"); }
static long live_regions(void) { return read_long(SYSFS "regions"); }

/* /proc/vmstat pin counters, folded in from the per-cpu deltas first. */
static int pin_counters(long *acquired, long *released)
{
	write_string("/proc/sys/vm/stat_refresh", "1");
	FILE *f = fopen("/proc/vmstat", "r");
	if (!f) return -1;
	char key[64];
	long value;
	*acquired = *released = -1;
	while (fscanf(f, "%63s %ld", key, &value) == 2) {
		if (strcmp(key, "nr_foll_pin_acquired") == 0) *acquired = value;
		if (strcmp(key, "nr_foll_pin_released") == 0) *released = value;
	}
	fclose(f);
	return *acquired < 0 || *released < 0 ? -1 : 0;
}

static long outstanding_pins(void)
{
	long a, r;
	return pin_counters(&a, &r) < 0 ? -1 : a - r;
}

/* Kibibytes of `field` (e.g. "VmLck:") in /proc/<pid>/status. */
static long status_kb(pid_t pid, const char *field)
{
	char path[64], line[256];
	snprintf(path, sizeof path, "/proc/%d/status", (int)pid);
	FILE *f = fopen(path, "r");
	if (!f) return -1;
	long kb = -1;
	while (fgets(line, sizeof line, f)) {
		if (strncmp(line, field, strlen(field)) == 0) kb = strtol(line + strlen(field), NULL, 10);
	}
	fclose(f);
	return kb;
}

static uint64_t pfn_of(const void *addr)
{
	uint64_t entry = 0;
	int fd = open("/proc/self/pagemap", O_RDONLY);
	if (fd < 0) return 0;
	if (pread(fd, &entry, 8, (off_t)((uintptr_t)addr / PAGE) * 8) != 8) entry = 0;
	close(fd);
	return (entry >> 63) ? (entry & ((1ULL << 55) - 1)) : 0;
}

static int send_fd(int sock, int fd, const void *data, size_t length)
{
	char control[CMSG_SPACE(sizeof(int))] = { 0 };
	struct iovec iov = { .iov_base = (void *)data, .iov_len = length };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1 };
	if (fd >= 0) {
		msg.msg_control = control;
		msg.msg_controllen = sizeof control;
		struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
		c->cmsg_level = SOL_SOCKET;
		c->cmsg_type = SCM_RIGHTS;
		c->cmsg_len = CMSG_LEN(sizeof(int));
		memcpy(CMSG_DATA(c), &fd, sizeof(int));
	}
	return sendmsg(sock, &msg, 0) == (ssize_t)length ? 0 : -1;
}

/* Returns the received fd (or -1 when none came) and fills `data`. */
static int recv_fd(int sock, void *data, size_t length)
{
	char control[CMSG_SPACE(sizeof(int))] = { 0 };
	struct iovec iov = { .iov_base = data, .iov_len = length };
	struct msghdr msg = { .msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control };
	if (recvmsg(sock, &msg, MSG_CMSG_CLOEXEC) != (ssize_t)length) return -2;
	struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
	if (!c || c->cmsg_type != SCM_RIGHTS) return -1;
	int fd;
	memcpy(&fd, CMSG_DATA(c), sizeof(int));
	return fd;
}

static uint64_t region_length(int fd)
{
	struct quiver_region_info info;
	return ioctl(fd, QUIVER_IOC_INFO, &info) < 0 ? 0 : info.length;
}

/* Exit code of a child: 0 when it passed; 100 + signal when killed. */
static int wait_child(pid_t pid)
{
	int status;
	if (waitpid(pid, &status, 0) < 0) return -1;
	if (WIFSIGNALED(status)) return 100 + WTERMSIG(status);
	return WEXITSTATUS(status);
}

static int nothing_left(const char *when)
{
	CHECK(live_regions() == 0, "%s: %ld regions still live", when, live_regions());
	CHECK(pinned_bytes() == 0, "%s: %ld bytes still pinned", when, pinned_bytes());
	return 1;
}

/* ---- tests ---------------------------------------------------------------- */

struct handoff {
	uint64_t seed;
	uint64_t length;
	uint64_t first_pfn, last_pfn;
};

/* Consumer side: receives the fd, maps it, checks bytes and physical frames. */
static int consume(int sock, int expect_rewrite)
{
	struct handoff h;
	int fd = recv_fd(sock, &h, sizeof h);
	if (fd < 0) return 2;
	if (region_length(fd) != h.length) return 3;
	const uint8_t *p = mmap(NULL, h.length, PROT_READ, MAP_SHARED, fd, 0);
	if (p == MAP_FAILED) return 4;
	close(fd);
	if (mismatch(p, h.length, h.seed) >= 0) return 5;
	if (pfn_of(p) != h.first_pfn || pfn_of(p + h.length - PAGE) != h.last_pfn) return 6;
	if (expect_rewrite) {
		char ready = 'r';
		if (write(sock, &ready, 1) != 1) return 7;
		uint64_t seed;
		if (read(sock, &seed, sizeof seed) != sizeof seed) return 8;
		if (mismatch(p, h.length, seed) >= 0) return 9;
	}
	return 0;
}

static int cross_process(int rewrite)
{
	const size_t length = 257 * PAGE;
	int sv[2];
	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0, "socketpair: %s", strerror(errno));
	/* Fork first, so the consumer can only reach the pages through the fd it is sent. */
	pid_t pid = fork();
	if (pid == 0) {
		close(sv[0]);
		_exit(consume(sv[1], rewrite));
	}
	close(sv[1]);
	uint8_t *buf = anon(length);
	CHECK(buf, "mmap: %s", strerror(errno));
	struct handoff h = { .seed = 0x51, .length = length };
	fill(buf, length, h.seed);
	int fd = share(buf, length, 0, NULL);
	CHECK(fd >= 0, "share: %s", strerror(-fd));
	CHECK(pinned_bytes() == (long)length, "pinned_bytes %ld, expected %zu", pinned_bytes(), length);
	CHECK(status_kb(getpid(), "VmLck:") >= (long)(length / 1024), "VmLck %ld kB is not charged", status_kb(getpid(), "VmLck:"));
	h.first_pfn = pfn_of(buf);
	h.last_pfn = pfn_of(buf + length - PAGE);
	CHECK(h.first_pfn != 0, "no pfn in /proc/self/pagemap");
	CHECK(send_fd(sv[0], fd, &h, sizeof h) == 0, "sendmsg: %s", strerror(errno));
	close(fd);
	if (rewrite) {
		char ready;
		CHECK(read(sv[0], &ready, 1) == 1, "consumer did not map");
		uint64_t seed = 0x77;
		fill(buf, length, seed);
		CHECK(write(sv[0], &seed, sizeof seed) == sizeof seed, "write");
	}
	int code = wait_child(pid);
	close(sv[0]);
	munmap(buf, length);
	CHECK(code == 0, "consumer failed with code %d (5/9: bytes differ, 6: other frames)", code);
	CHECK(status_kb(getpid(), "VmLck:") == 0, "VmLck %ld kB after release", status_kb(getpid(), "VmLck:"));
	return nothing_left("after release");
}

static int test_pattern(void) { return cross_process(0); }
static int test_producer_writes(void) { return cross_process(1); }

static int expect_share_error(const char *what, void *addr, uint64_t length, uint32_t flags, int expected)
{
	long pins = outstanding_pins();
	int fd = share(addr, length, flags, NULL);
	if (fd >= 0) close(fd);
	CHECK(fd == -expected, "%s: got %s, expected %s", what, fd >= 0 ? "a region" : strerror(-fd), strerror(expected));
	CHECK(outstanding_pins() == pins, "%s: pins changed from %ld to %ld", what, pins, outstanding_pins());
	return nothing_left(what);
}

static int test_bad_requests(void)
{
	const size_t length = 8 * PAGE;
	uint8_t *buf = anon(length);
	CHECK(buf, "mmap");
	memset(buf, 1, length);
	if (!expect_share_error("unaligned address", buf + 1, PAGE, 0, EINVAL)) return 0;
	if (!expect_share_error("unaligned length", buf, PAGE + 1, 0, EINVAL)) return 0;
	if (!expect_share_error("zero length", buf, 0, 0, EINVAL)) return 0;
	if (!expect_share_error("unknown flags", buf, PAGE, 1, EINVAL)) return 0;
	if (!expect_share_error("wrapping range", buf, (uint64_t)0 - PAGE, 0, EINVAL)) return 0;
	if (!expect_share_error("kernel address", (void *)0xffff880000000000UL, PAGE, 0, EINVAL)) return 0;

	munmap(buf + 3 * PAGE, PAGE);
	if (!expect_share_error("hole in range", buf, length, 0, EFAULT)) return 0;
	if (!expect_share_error("not mapped", buf + 3 * PAGE, PAGE, 0, EFAULT)) return 0;
	munmap(buf, length);

	uint8_t *ro = mmap(NULL, PAGE, PROT_READ, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
	if (!expect_share_error("read-only memory", ro, PAGE, 0, EACCES)) return 0;
	munmap(ro, PAGE);

	uint8_t *shared = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	shared[0] = 1;
	if (!expect_share_error("shared anonymous memory", shared, PAGE, 0, EOPNOTSUPP)) return 0;
	munmap(shared, PAGE);

	int file = open("/tmp/quiver-file", O_RDWR | O_CREAT | O_TRUNC, 0600);
	CHECK(file >= 0 && ftruncate(file, PAGE) == 0, "temp file: %s", strerror(errno));
	uint8_t *mapped = mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, file, 0);
	close(file);
	unlink("/tmp/quiver-file");
	mapped[0] = 1;
	if (!expect_share_error("file-backed memory", mapped, PAGE, 0, EOPNOTSUPP)) return 0;
	munmap(mapped, PAGE);

	/* A region's own mapping cannot be shared again: it is not the caller's anonymous memory. */
	buf = anon(PAGE);
	int fd = share(buf, PAGE, 0, NULL);
	CHECK(fd >= 0, "share: %s", strerror(-fd));
	void *view = mmap(NULL, PAGE, PROT_READ, MAP_SHARED, fd, 0);
	CHECK(view != MAP_FAILED, "map region: %s", strerror(errno));
	int again = share(view, PAGE, 0, NULL);
	CHECK(again == -EOPNOTSUPP, "sharing a region mapping: got %d, expected EOPNOTSUPP", again);
	struct quiver_share req = { 0 };
	CHECK(ioctl(fd, QUIVER_IOC_SHARE, &req) < 0 && errno == ENOTTY, "SHARE on a region fd: %s", strerror(errno));
	CHECK(mmap(NULL, 2 * PAGE, PROT_READ, MAP_SHARED, fd, 0) == MAP_FAILED && errno == EINVAL, "mapping past the end: %s", strerror(errno));
	CHECK(mmap(NULL, PAGE, PROT_READ, MAP_SHARED, fd, PAGE) == MAP_FAILED && errno == EINVAL, "mapping at an offset past the end: %s", strerror(errno));
	munmap(view, PAGE);
	close(fd);
	munmap(buf, PAGE);
	if (!nothing_left("after the region tests")) return 0;

	CHECK(ioctl(dev_fd, QUIVER_IOC_SHARE, (void *)8) < 0 && errno == EFAULT, "bad request pointer: %s", strerror(errno));
	CHECK(ioctl(dev_fd, QUIVER_IOC_INFO, &req) < 0 && errno == ENOTTY, "INFO on /dev/quiver: %s", strerror(errno));
	CHECK(ioctl(dev_fd, _IO('Q', 99)) < 0 && errno == ENOTTY, "unknown ioctl: %s", strerror(errno));
	return nothing_left("after the ioctl tests");
}

static int test_cap(void)
{
	char old[64];
	snprintf(old, sizeof old, "%ld", read_long(CAP_PARAM));
	CHECK(write_string(CAP_PARAM, "65536") == 0, "cannot set the cap");
	uint8_t *buf = anon(32 * PAGE);
	memset(buf, 2, 32 * PAGE);
	int ok = expect_share_error("over the cap", buf, 17 * PAGE, 0, ENOSPC);
	int fd = share(buf, 16 * PAGE, 0, NULL);
	if (ok && fd < 0) ok = fail("up to the cap: %s", strerror(-fd));
	int more = share(buf + 16 * PAGE, PAGE, 0, NULL);
	if (ok && more != -ENOSPC) ok = fail("one page over a full cap: got %d, expected ENOSPC", more);
	if (fd >= 0) close(fd);
	if (more >= 0) close(more);
	/* Under a cap that allows anything, a request for 32 TiB fails cleanly (no WARN from the page array). */
	if (ok && write_string(CAP_PARAM, "4611686018427387904") != 0) ok = fail("cannot raise the cap");
	if (ok) ok = expect_share_error("32 TiB request", (void *)(1UL << 40), 1ULL << 45, 0, ENOMEM);
	write_string(CAP_PARAM, old);
	munmap(buf, 32 * PAGE);
	return ok && nothing_left("after the cap test");
}

/* Without CAP_IPC_LOCK, regions count against RLIMIT_MEMLOCK like mlock. */
static int test_memlock_limit(void)
{
	pid_t pid = fork();
	if (pid == 0) {
		struct rlimit limit = { 64 * 1024, 64 * 1024 };
		if (setrlimit(RLIMIT_MEMLOCK, &limit) != 0 || setgid(65534) != 0 || setuid(65534) != 0) _exit(2);
		uint8_t *buf = anon(32 * PAGE);
		memset(buf, 3, 32 * PAGE);
		if (share(buf, 32 * PAGE, 0, NULL) != -ENOMEM) _exit(3);
		int fd = share(buf, 8 * PAGE, 0, NULL);
		if (fd < 0) _exit(4);
		if (status_kb(getpid(), "VmLck:") != 32) _exit(5);
		if (share(buf + 8 * PAGE, 16 * PAGE, 0, NULL) != -ENOMEM) _exit(6);
		close(fd);
		_exit(0);
	}
	int code = wait_child(pid);
	CHECK(code == 0, "unprivileged child failed with code %d (3/6: not ENOMEM over the limit, 5: VmLck wrong)", code);
	return nothing_left("after the unprivileged child");
}

static int test_writable_refused(void)
{
	uint8_t *buf = anon(2 * PAGE);
	fill(buf, 2 * PAGE, 9);
	int fd = share(buf, 2 * PAGE, 0, NULL);
	CHECK(fd >= 0, "share: %s", strerror(-fd));
	CHECK(mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0) == MAP_FAILED && errno == EACCES,
	      "shared writable mapping: %s", strerror(errno));
	CHECK(mmap(NULL, PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE, fd, 0) == MAP_FAILED && errno == EPERM,
	      "private writable mapping: %s", strerror(errno));
	uint8_t *view = mmap(NULL, 2 * PAGE, PROT_READ, MAP_SHARED, fd, 0);
	CHECK(view != MAP_FAILED, "read-only mapping: %s", strerror(errno));
	CHECK(mprotect(view, 2 * PAGE, PROT_READ | PROT_WRITE) != 0 && errno == EACCES, "mprotect to writable: %s", strerror(errno));
	uint8_t *private_view = mmap(NULL, PAGE, PROT_READ, MAP_PRIVATE, fd, 0);
	CHECK(private_view != MAP_FAILED, "read-only private mapping: %s", strerror(errno));
	CHECK(mprotect(private_view, PAGE, PROT_READ | PROT_WRITE) != 0 && errno == EACCES, "mprotect of a private mapping: %s", strerror(errno));
	CHECK(write(fd, "x", 1) < 0 && errno == EBADF, "write(2) on the region: %s", strerror(errno));
	pid_t pid = fork();
	if (pid == 0) {
		view[0] = 1;
		_exit(0);
	}
	int code = wait_child(pid);
	CHECK(code == 100 + SIGSEGV, "a write through the mapping ended with %d, expected SIGSEGV", code);
	CHECK(mismatch(view, 2 * PAGE, 9) < 0, "the region changed");
	munmap(view, 2 * PAGE);
	munmap(private_view, PAGE);
	close(fd);
	munmap(buf, 2 * PAGE);
	return nothing_left("after the writable tests");
}

/* The producer shares, hands the fd over, and exits: the consumer keeps the bytes. */
static int test_producer_exits(void)
{
	const size_t length = 64 * PAGE;
	for (int map_before_exit = 0; map_before_exit <= 1; map_before_exit++) {
		int sv[2];
		CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0, "socketpair");
		pid_t pid = fork();
		if (pid == 0) {
			close(sv[0]);
			uint8_t *buf = anon(length);
			struct handoff h = { .seed = 0x1234 + map_before_exit, .length = length };
			fill(buf, length, h.seed);
			int fd = share(buf, length, 0, NULL);
			if (fd < 0) _exit(2);
			if (send_fd(sv[1], fd, &h, sizeof h) != 0) _exit(3);
			char go;
			if (read(sv[1], &go, 1) != 1) _exit(4);
			munmap(buf, length); /* pages stay: the region pins them */
			_exit(0);
		}
		close(sv[1]);
		struct handoff h;
		int fd = recv_fd(sv[0], &h, sizeof h);
		CHECK(fd >= 0, "no fd received");
		const uint8_t *view = NULL;
		if (map_before_exit) {
			view = mmap(NULL, length, PROT_READ, MAP_SHARED, fd, 0);
			CHECK(view != MAP_FAILED, "map: %s", strerror(errno));
			close(fd); /* only the mapping keeps the region now */
			fd = -1;
		}
		CHECK(write(sv[0], "g", 1) == 1, "write");
		int code = wait_child(pid);
		close(sv[0]);
		CHECK(code == 0, "producer failed with code %d", code);
		CHECK(live_regions() == 1 && pinned_bytes() == (long)length, "region gone with its producer (%ld regions)", live_regions());
		if (!map_before_exit) {
			view = mmap(NULL, length, PROT_READ, MAP_SHARED, fd, 0);
			CHECK(view != MAP_FAILED, "map after exit: %s", strerror(errno));
			close(fd);
		}
		long at = mismatch(view, length, h.seed);
		CHECK(at < 0, "byte %ld differs after the producer exited", at);
		munmap((void *)view, length);
		if (!nothing_left(map_before_exit ? "after unmapping" : "after closing and unmapping")) return 0;
	}
	return 1;
}

static int test_cycles(void)
{
	const int cycles = 10000;
	const size_t length = 4 * PAGE;
	uint8_t *buf = anon(length);
	memset(buf, 5, length);
	long acquired0, released0, acquired1, released1;
	CHECK(pin_counters(&acquired0, &released0) == 0, "no nr_foll_pin_* in /proc/vmstat");
	long created0 = read_long(SYSFS "regions_created");
	for (int i = 0; i < cycles; i++) {
		int fd = share(buf, length, 0, NULL);
		CHECK(fd >= 0, "cycle %d: %s", i, strerror(-fd));
		if (i % 3 == 0) {
			close(fd);
			continue;
		}
		volatile const uint8_t *view = mmap(NULL, length, PROT_READ, MAP_SHARED, fd, 0);
		CHECK(view != MAP_FAILED, "cycle %d: map: %s", i, strerror(errno));
		CHECK(view[length - 1] == 5, "cycle %d: wrong byte", i);
		if (i % 3 == 1) {
			close(fd);
			munmap((void *)view, length);
		} else {
			munmap((void *)view, length);
			close(fd);
		}
	}
	munmap(buf, length);
	CHECK(pin_counters(&acquired1, &released1) == 0, "vmstat");
	CHECK(acquired1 - acquired0 >= (long)cycles * 4, "only %ld pins acquired in %d cycles", acquired1 - acquired0, cycles);
	CHECK(acquired1 - acquired0 == released1 - released0, "leaked pins: %ld acquired, %ld released",
	      acquired1 - acquired0, released1 - released0);
	CHECK(read_long(SYSFS "regions_created") - created0 == cycles, "regions_created moved by %ld",
	      read_long(SYSFS "regions_created") - created0);
	printf("# %d cycles: %ld pins acquired, %ld released\n", cycles, acquired1 - acquired0, released1 - released0);
	return nothing_left("after the cycles");
}

/* ---- rmmod ---------------------------------------------------------------- */

static int test_rmmod(void)
{
	int sv[2];
	CHECK(socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) == 0, "socketpair");
	pid_t pid = fork();
	if (pid == 0) {
		uint8_t *buf = anon(PAGE);
		buf[0] = 1;
		int fd = share(buf, PAGE, 0, NULL);
		close(dev_fd);
		char c = fd >= 0 ? 'y' : 'n';
		if (write(sv[1], &c, 1) != 1 || read(sv[1], &c, 1) != 1) _exit(2);
		_exit(0);
	}
	close(dev_fd);
	char c;
	CHECK(read(sv[0], &c, 1) == 1 && c == 'y', "holder could not share");
	int busy = syscall(SYS_delete_module, "quiver", O_NONBLOCK);
	int busy_errno = errno;
	CHECK(write(sv[0], "x", 1) == 1, "write");
	CHECK(wait_child(pid) == 0, "holder failed");
	CHECK(busy != 0 && (busy_errno == EWOULDBLOCK || busy_errno == EBUSY),
	      "rmmod with a live region: got %s", busy == 0 ? "success" : strerror(busy_errno));
	CHECK(syscall(SYS_delete_module, "quiver", O_NONBLOCK) == 0, "rmmod after the last region: %s", strerror(errno));
	CHECK(access("/dev/quiver", F_OK) != 0 && access("/sys/module/quiver", F_OK) != 0, "module still present");
	return 1;
}

/* ---- benchmark -------------------------------------------------------------- */

static double now_ms(void)
{
	struct timespec t;
	clock_gettime(CLOCK_MONOTONIC, &t);
	return t.tv_sec * 1e3 + t.tv_nsec / 1e6;
}

static long meminfo_kb(const char *field)
{
	FILE *f = fopen("/proc/meminfo", "r");
	char line[256];
	long kb = -1;
	while (f && fgets(line, sizeof line, f)) {
		if (strncmp(line, field, strlen(field)) == 0) kb = strtol(line + strlen(field), NULL, 10);
	}
	if (f) fclose(f);
	return kb;
}

/* Child: gets an fd, maps it, reads one word per page plus a checksum of the first and last words, acks. */
static void bench_child(int sock)
{
	for (;;) {
		uint64_t length;
		int fd = recv_fd(sock, &length, sizeof length);
		if (fd == -2) _exit(0);
		const uint64_t *p = mmap(NULL, length, PROT_READ, MAP_SHARED | MAP_POPULATE, fd, 0);
		close(fd);
		uint64_t sum = 0;
		for (size_t i = 0; i < length / 8; i += PAGE / 8) sum += p[i];
		munmap((void *)p, length);
		if (write(sock, &sum, sizeof sum) != sizeof sum) _exit(1);
	}
}

static int bench(size_t mib)
{
	const size_t length = mib << 20;
	const int reps = 3;
	int sv[2];
	if (socketpair(AF_UNIX, SOCK_STREAM | SOCK_CLOEXEC, 0, sv) != 0) return 1;
	pid_t pid = fork();
	if (pid == 0) {
		close(sv[0]);
		bench_child(sv[1]);
	}
	close(sv[1]);
	uint64_t *out = anon(length);
	fill(out, length, 42); /* the step's output, already built in private memory */
	uint64_t expected = 0;
	for (size_t i = 0; i < length / 8; i += PAGE / 8) expected += out[i];
	double best[2] = { 1e18, 1e18 };
	long shmem_kb[2] = { 0, 0 };
	for (int rep = 0; rep < reps; rep++) {
		for (int mode = 0; mode < 2; mode++) {
			long shmem0 = meminfo_kb("Shmem:");
			double t0 = now_ms();
			int fd;
			if (mode == 0) {
				fd = share(out, length, 0, NULL);
			} else {
				fd = memfd_create("quiver-bench", MFD_CLOEXEC);
				if (fd < 0 || ftruncate(fd, (off_t)length) != 0) return 1;
				void *dst = mmap(NULL, length, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, 0);
				memcpy(dst, out, length);
				munmap(dst, length);
			}
			if (fd < 0) { fprintf(stderr, "bench: share: %s\n", strerror(-fd)); return 1; }
			uint64_t sum = 0;
			if (send_fd(sv[0], fd, &length, sizeof length) != 0 || read(sv[0], &sum, sizeof sum) != sizeof sum) return 1;
			double ms = now_ms() - t0;
			long grown = meminfo_kb("Shmem:") - shmem0;
			close(fd);
			if (sum != expected) { fprintf(stderr, "bench: the child read other bytes\n"); return 1; }
			if (ms < best[mode]) best[mode] = ms;
			shmem_kb[mode] = grown;
		}
	}
	close(sv[0]);
	wait_child(pid);
	munmap(out, length);
	printf("\nbench: hand a %zu MiB output to a child (best of %d; the child maps it and reads every page)\n", mib, reps);
	printf("  %-34s %10s %16s %18s\n", "path", "ms", "bytes copied", "shmem grown (KiB)");
	printf("  %-34s %10.1f %16d %18ld\n", "quiver region (de-anonymized)", best[0], 0, shmem_kb[0]);
	printf("  %-34s %10.1f %16zu %18ld\n", "one copy into shared memory", best[1], length, shmem_kb[1]);
	printf("  speed-up %.1fx\n", best[1] / best[0]);
	return 0;
}

int main(int argc, char **argv)
{
	setvbuf(stdout, NULL, _IOLBF, 0);
	dev_fd = open(QUIVER_DEVICE_PATH, O_RDONLY | O_CLOEXEC);
	if (dev_fd < 0) {
		printf("not ok - open %s: %s\n0 passed, 1 failed\n", QUIVER_DEVICE_PATH, strerror(errno));
		return 1;
	}
	if (argc > 2 && strcmp(argv[1], "bench") == 0) return bench((size_t)atol(argv[2]));
	if (argc > 1 && strcmp(argv[1], "rmmod") == 0) {
		run("rmmod refused while a region lives, works after", test_rmmod);
	} else {
		run("pattern matches across processes (fd over a unix socket, same frames)", test_pattern);
		run("producer writes are seen by the consumer", test_producer_writes);
		run("bad requests return the right errno and leave nothing", test_bad_requests);
		run("module cap: ENOSPC over max_pinned_bytes; a huge request is ENOMEM", test_cap);
		run("RLIMIT_MEMLOCK: ENOMEM without CAP_IPC_LOCK, charged to VmLck", test_memlock_limit);
		run("writable mappings and mprotect to writable are refused", test_writable_refused);
		run("consumers keep the data after the producer exits", test_producer_exits);
		run("no leaked pins after 10000 create/release cycles", test_cycles);
	}
	printf("%d passed, %d failed\n", passed, failed);
	return failed ? 1 : 0;
}
