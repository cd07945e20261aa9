/*
 * Regions from the quiver kernel module (kmod/): private anonymous memory
 * de-anonymized into a read-only file that other processes map, with no
 * copy. Plus a small fd broker, because a region is only reachable through
 * its file descriptor: a long-lived process keeps the fds and hands them out
 * over a unix socket (SCM_RIGHTS). Same conventions as shm_core.h.
 */
#ifndef QUIVER_REGION_CORE_H
#define QUIVER_REGION_CORE_H

#include "shm_core.h"

/* True when /dev/quiver can be opened. */
bool qregion_available(void);

/* Page-aligned private anonymous memory, read-write, populated. `byte_size` is rounded up to pages. */
qshm_status qregion_alloc(uint64_t byte_size, qshm_mapping *out);

/* QUIVER_IOC_SHARE over [addr, addr + len): a new region fd (O_CLOEXEC) and its id. */
qshm_status qregion_share(void *addr, uint64_t len, int *fd, uint64_t *id);

/* Maps a region fd read-only; fails with EFBIG (and sets out->len) over `max_size`. */
qshm_status qregion_map(int fd, uint64_t max_size, qshm_mapping *out);

/* Length and id of a region fd (QUIVER_IOC_INFO). */
qshm_status qregion_info(int fd, uint64_t *len, uint64_t *id);

/* ---- broker ---------------------------------------------------------------- */

#define QREGION_NAME_MAX 255

typedef struct qregion_broker qregion_broker;

/* Listens on `path` (mode 0600, must not exist) and serves PUT/GET/DROP on a thread of its own. */
qshm_status qregion_broker_start(const char *path, qregion_broker **out);
/* Stops the thread, closes every fd it holds and unlinks the socket. */
void qregion_broker_stop(qregion_broker *broker);
/* Number of fds held. */
int qregion_broker_count(qregion_broker *broker);
/* Names held, as `*count` NUL-terminated strings one after another in a malloc'd buffer
 * (free it); NULL with *count 0 when there are none or memory ran out. */
char *qregion_broker_names(qregion_broker *broker, int *count);

/* Clients: each call is one connection. PUT duplicates `fd` into the broker
 * (EEXIST if the name is taken); GET returns a new fd (ENOENT if unknown);
 * DROP closes the broker's fd (missing is fine). */
qshm_status qregion_put(const char *path, const char *name, int fd);
qshm_status qregion_get(const char *path, const char *name, int *fd);
qshm_status qregion_drop(const char *path, const char *name);

#endif
