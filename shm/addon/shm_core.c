#include "shm_core.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/types.h>
#include <unistd.h>

#ifndef RENAME_NOREPLACE
#define RENAME_NOREPLACE (1 << 0)
#endif

static const qshm_status QSHM_OK = {0, NULL};

static qshm_status fail(const char *syscall) {
  qshm_status status = {errno, syscall};
  return status;
}

static int close_keep_errno(int fd) {
  int saved = errno;
  int rc = close(fd);
  errno = saved;
  return rc;
}

/* Sizes [offset, offset + len) of fd and allocates its pages. fallocate on
 * tmpfs reports ENOSPC now; a sparse ftruncate would defer that to a SIGBUS on
 * the first write. Filesystems without fallocate fall back to ftruncate. */
static qshm_status reserve(int fd, uint64_t offset, uint64_t len) {
  if (len == 0) return QSHM_OK;
  for (;;) {
    if (fallocate(fd, 0, (off_t)offset, (off_t)len) == 0) return QSHM_OK;
    if (errno == EINTR) continue;
    if (errno == EOPNOTSUPP || errno == ENOSYS) break;
    return fail("fallocate");
  }
  if (ftruncate(fd, (off_t)(offset + len)) != 0) return fail("ftruncate");
  return QSHM_OK;
}

static qshm_status map_fd(int fd, uint64_t len, int prot, bool populate, qshm_mapping *out) {
  out->addr = NULL;
  out->len = 0;
  if (len == 0) return QSHM_OK;
  int flags = MAP_SHARED | (populate ? MAP_POPULATE : 0);
  void *addr = mmap(NULL, (size_t)len, prot, flags, fd, 0);
  if (addr == MAP_FAILED) return fail("mmap");
  out->addr = addr;
  out->len = (size_t)len;
  return QSHM_OK;
}

static bool fits_off_t(uint64_t n) {
  return n <= (uint64_t)INT64_MAX && n <= (uint64_t)SIZE_MAX;
}

qshm_status qshm_create(const char *path, uint64_t byte_size, bool populate, qshm_mapping *out) {
  if (!fits_off_t(byte_size)) {
    errno = EFBIG;
    return fail("open");
  }
  /* O_EXCL already refuses an existing symlink; O_NOFOLLOW says so for any kernel. */
  int fd = open(path, O_CREAT | O_EXCL | O_RDWR | O_CLOEXEC | O_NOFOLLOW, 0600);
  if (fd < 0) return fail("open");
  qshm_status status = reserve(fd, 0, byte_size);
  if (status.err == 0) status = map_fd(fd, byte_size, PROT_READ | PROT_WRITE, populate, out);
  close_keep_errno(fd);
  if (status.err != 0) {
    int saved = errno;
    unlink(path);
    errno = saved;
  }
  return status;
}

/*
 * Opens `path`, which must be a regular file and not a symlink (ELOOP): a link planted in a
 * segment directory must not make us map, or grow, a file elsewhere. On failure nothing is left open.
 */
static qshm_status open_regular(const char *path, int flags, int *fd_out, struct stat *st) {
  int fd = open(path, flags | O_CLOEXEC | O_NOFOLLOW);
  if (fd < 0) return fail("open");
  qshm_status status = QSHM_OK;
  if (fstat(fd, st) != 0) {
    status = fail("fstat");
  } else if (!S_ISREG(st->st_mode)) {
    errno = EINVAL;
    status = fail("fstat");
  }
  if (status.err != 0) {
    close_keep_errno(fd);
    return status;
  }
  *fd_out = fd;
  return status;
}

qshm_status qshm_open_writable(const char *path, uint64_t byte_size, bool populate, qshm_mapping *out) {
  if (!fits_off_t(byte_size)) {
    errno = EFBIG;
    return fail("open");
  }
  int fd = -1;
  struct stat st;
  qshm_status status = open_regular(path, O_RDWR, &fd, &st);
  if (status.err != 0) return status;
  if ((uint64_t)st.st_size < byte_size) {
    status = reserve(fd, (uint64_t)st.st_size, byte_size - (uint64_t)st.st_size);
  }
  if (status.err == 0) status = map_fd(fd, byte_size, PROT_READ | PROT_WRITE, populate, out);
  close_keep_errno(fd);
  return status;
}

qshm_status qshm_open_readonly(const char *path, uint64_t max_size, qshm_mapping *out) {
  out->addr = NULL;
  out->len = 0;
  int fd = -1;
  struct stat st;
  qshm_status status = open_regular(path, O_RDONLY, &fd, &st);
  if (status.err != 0) return status;
  if ((uint64_t)st.st_size > max_size) {
    out->len = (size_t)st.st_size;
    errno = EFBIG;
    status = fail("fstat");
  } else {
    status = map_fd(fd, (uint64_t)st.st_size, PROT_READ, false, out);
  }
  close_keep_errno(fd);
  return status;
}

qshm_status qshm_unmap(qshm_mapping *mapping) {
  if (mapping->addr != NULL && munmap(mapping->addr, mapping->len) != 0) return fail("munmap");
  mapping->addr = NULL;
  mapping->len = 0;
  return QSHM_OK;
}

qshm_status qshm_rename_noreplace(const char *from, const char *to) {
  if (syscall(SYS_renameat2, AT_FDCWD, from, AT_FDCWD, to, RENAME_NOREPLACE) != 0) return fail("renameat2");
  return QSHM_OK;
}

qshm_status qshm_set_parent_death_signal(int sig) {
  if (prctl(PR_SET_PDEATHSIG, (unsigned long)sig, 0, 0, 0) != 0) return fail("prctl");
  return QSHM_OK;
}

int qshm_parent_pid(void) { return (int)getppid(); }

const char *qshm_errno_name(int err) {
  switch (err) {
#define NAME(e) \
  case e:       \
    return #e;
    NAME(EPERM) NAME(ENOENT) NAME(EINTR) NAME(EIO) NAME(EBADF) NAME(EAGAIN) NAME(ENOMEM) NAME(EACCES)
    NAME(EFAULT) NAME(EBUSY) NAME(EEXIST) NAME(EXDEV) NAME(ENODEV) NAME(ENOTDIR) NAME(EISDIR) NAME(EINVAL)
    NAME(ENFILE) NAME(EMFILE) NAME(ETXTBSY) NAME(EFBIG) NAME(ENOSPC) NAME(EROFS) NAME(EMLINK)
    NAME(ENAMETOOLONG) NAME(ENOSYS) NAME(ENOTEMPTY) NAME(ELOOP) NAME(EOVERFLOW) NAME(EOPNOTSUPP)
    NAME(EDQUOT) NAME(ESRCH) NAME(ENOTTY) NAME(EPROTO) NAME(ECONNREFUSED) NAME(EADDRINUSE)
#undef NAME
    default:
      return NULL;
  }
}
