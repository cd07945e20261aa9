/*
 * Plain C core of the Quiver shared-memory addon. No N-API in here: every
 * function reports failure as the errno of the syscall that failed, so the
 * binding (binding.c) can turn it into a JavaScript error with a stable code.
 */
#ifndef QUIVER_SHM_CORE_H
#define QUIVER_SHM_CORE_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* err == 0 on success; otherwise the errno set by `syscall`. */
typedef struct {
  int err;
  const char *syscall;
} qshm_status;

/* A mapping made by this core; addr == NULL when len == 0. */
typedef struct {
  void *addr;
  size_t len;
} qshm_mapping;

/*
 * Creates `path` (O_CREAT|O_EXCL, mode 0600), reserves `byte_size` bytes
 * (fallocate, so a full tmpfs fails here with ENOSPC instead of a SIGBUS on
 * first write) and maps it read-write, shared. The file is unlinked again if
 * any later step fails.
 */
qshm_status qshm_create(const char *path, uint64_t byte_size, bool populate, qshm_mapping *out);

/* Opens an existing `path` read-write, grows it to `byte_size` if smaller
 * (never shrinks it: a shrink under another process's mapping is a SIGBUS),
 * and maps its first `byte_size` bytes read-write, shared. */
qshm_status qshm_open_writable(const char *path, uint64_t byte_size, bool populate, qshm_mapping *out);

/* Opens `path` read-only and maps the whole file PROT_READ, shared. If the
 * file is larger than `max_size`, fails with EFBIG and sets out->len to the
 * file size. */
qshm_status qshm_open_readonly(const char *path, uint64_t max_size, qshm_mapping *out);

qshm_status qshm_unmap(qshm_mapping *mapping);

/* rename(2) that fails with EEXIST instead of replacing `to`, and with ENOENT
 * when `from` is gone (e.g. another process claimed it first). */
qshm_status qshm_rename_noreplace(const char *from, const char *to);

qshm_status qshm_set_parent_death_signal(int sig);
int qshm_parent_pid(void);

/* "EEXIST", "ENOENT", ... or NULL when unknown. */
const char *qshm_errno_name(int err);

#endif
