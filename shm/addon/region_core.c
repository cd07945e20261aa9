/*
 * Plain C side of regions and the region fd broker; see region_core.h.
 */
#include "region_core.h"

#include <errno.h>
#include <fcntl.h>
#include <poll.h>
#include <pthread.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/un.h>
#include <unistd.h>

#include "../../kmod/quiver_uapi.h"

static const qshm_status OK = {0, NULL};

static qshm_status fail(const char *syscall) {
  qshm_status s = {errno, syscall};
  return s;
}

static qshm_status fail_with(int err, const char *syscall) {
  qshm_status s = {err, syscall};
  return s;
}

/* One fd to /dev/quiver per process, opened on first use. */
static pthread_mutex_t device_lock = PTHREAD_MUTEX_INITIALIZER;
static int device_fd = -1;

static int device(void) {
  pthread_mutex_lock(&device_lock);
  if (device_fd < 0) device_fd = open(QUIVER_DEVICE_PATH, O_RDONLY | O_CLOEXEC);
  int fd = device_fd;
  int err = errno;
  pthread_mutex_unlock(&device_lock);
  errno = err;
  return fd;
}

bool qregion_available(void) { return device() >= 0; }

static uint64_t page_round(uint64_t n) {
  uint64_t page = (uint64_t)sysconf(_SC_PAGESIZE);
  return (n + page - 1) / page * page;
}

qshm_status qregion_alloc(uint64_t byte_size, qshm_mapping *out) {
  out->addr = NULL;
  out->len = 0;
  uint64_t len = page_round(byte_size);
  if (len == 0) return OK;
  void *addr = mmap(NULL, (size_t)len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
  if (addr == MAP_FAILED) return fail("mmap");
  out->addr = addr;
  out->len = (size_t)len;
  return OK;
}

qshm_status qregion_share(void *addr, uint64_t len, int *fd, uint64_t *id) {
  int dev = device();
  if (dev < 0) return fail("open");
  struct quiver_share req = {.addr = (uintptr_t)addr, .length = len, .flags = 0, .fd = -1};
  if (ioctl(dev, QUIVER_IOC_SHARE, &req) < 0) return fail("ioctl");
  *fd = req.fd;
  *id = req.id;
  return OK;
}

qshm_status qregion_info(int fd, uint64_t *len, uint64_t *id) {
  struct quiver_region_info info;
  if (ioctl(fd, QUIVER_IOC_INFO, &info) < 0) return fail("ioctl");
  *len = info.length;
  *id = info.id;
  return OK;
}

qshm_status qregion_map(int fd, uint64_t max_size, qshm_mapping *out) {
  uint64_t len, id;
  out->addr = NULL;
  out->len = 0;
  qshm_status s = qregion_info(fd, &len, &id);
  if (s.err) return s;
  if (len > max_size) {
    out->len = (size_t)len;
    return fail_with(EFBIG, "mmap");
  }
  void *addr = mmap(NULL, (size_t)len, PROT_READ, MAP_SHARED, fd, 0);
  if (addr == MAP_FAILED) return fail("mmap");
  out->addr = addr;
  out->len = (size_t)len;
  return OK;
}

/* ---- broker ---------------------------------------------------------------- */

enum { OP_PUT = 1, OP_GET = 2, OP_DROP = 3 };

typedef struct {
  uint32_t op;
  char name[QREGION_NAME_MAX + 1];
} request;

typedef struct entry {
  char name[QREGION_NAME_MAX + 1];
  int fd;
  struct entry *next;
} entry;

struct qregion_broker {
  int listen_fd;
  int wake[2];
  pthread_t thread;
  pthread_mutex_t lock;
  entry *entries;
  char path[sizeof(((struct sockaddr_un *)0)->sun_path)];
};

static int send_msg(int sock, const void *data, size_t len, int fd) {
  char control[CMSG_SPACE(sizeof(int))];
  memset(control, 0, sizeof control);
  struct iovec iov = {.iov_base = (void *)data, .iov_len = len};
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1};
  if (fd >= 0) {
    msg.msg_control = control;
    msg.msg_controllen = sizeof control;
    struct cmsghdr *c = CMSG_FIRSTHDR(&msg);
    c->cmsg_level = SOL_SOCKET;
    c->cmsg_type = SCM_RIGHTS;
    c->cmsg_len = CMSG_LEN(sizeof(int));
    memcpy(CMSG_DATA(c), &fd, sizeof(int));
  }
  ssize_t n;
  do n = sendmsg(sock, &msg, MSG_NOSIGNAL);
  while (n < 0 && errno == EINTR);
  return n == (ssize_t)len ? 0 : -1;
}

/* Receives exactly `len` bytes in one message; *fd is the passed fd or -1. */
static int recv_msg(int sock, void *data, size_t len, int *fd) {
  char control[CMSG_SPACE(sizeof(int))];
  struct iovec iov = {.iov_base = data, .iov_len = len};
  struct msghdr msg = {.msg_iov = &iov, .msg_iovlen = 1, .msg_control = control, .msg_controllen = sizeof control};
  *fd = -1;
  ssize_t n;
  do n = recvmsg(sock, &msg, MSG_CMSG_CLOEXEC);
  while (n < 0 && errno == EINTR);
  for (struct cmsghdr *c = CMSG_FIRSTHDR(&msg); n >= 0 && c; c = CMSG_NXTHDR(&msg, c)) {
    if (c->cmsg_level == SOL_SOCKET && c->cmsg_type == SCM_RIGHTS) memcpy(fd, CMSG_DATA(c), sizeof(int));
  }
  if (n != (ssize_t)len) {
    if (*fd >= 0) close(*fd);
    *fd = -1;
    if (n >= 0) errno = EPROTO;
    return -1;
  }
  return 0;
}

static entry **find(qregion_broker *b, const char *name) {
  entry **it = &b->entries;
  while (*it && strcmp((*it)->name, name) != 0) it = &(*it)->next;
  return it;
}

/* Answers one request on `conn`: an int32 errno, and for GET the fd. */
static void serve(qregion_broker *b, int conn) {
  request req;
  int passed = -1;
  if (recv_msg(conn, &req, sizeof req, &passed) != 0) return;
  req.name[QREGION_NAME_MAX] = 0;
  int32_t err = 0;
  int reply_fd = -1;
  pthread_mutex_lock(&b->lock);
  entry **slot = find(b, req.name);
  switch (req.op) {
    case OP_PUT:
      if (passed < 0) {
        err = EINVAL;
      } else if (*slot) {
        err = EEXIST;
      } else {
        entry *e = calloc(1, sizeof *e);
        if (!e) {
          err = ENOMEM;
        } else {
          memcpy(e->name, req.name, sizeof e->name);
          e->fd = passed;
          passed = -1;
          e->next = b->entries;
          b->entries = e;
        }
      }
      break;
    case OP_GET:
      if (*slot) reply_fd = (*slot)->fd;
      else err = ENOENT;
      break;
    case OP_DROP:
      if (*slot) {
        entry *e = *slot;
        *slot = e->next;
        close(e->fd);
        free(e);
      }
      break;
    default:
      err = EINVAL;
  }
  /* sendmsg duplicates reply_fd into the peer while we still hold the lock, so a DROP cannot close it first. */
  send_msg(conn, &err, sizeof err, reply_fd);
  pthread_mutex_unlock(&b->lock);
  if (passed >= 0) close(passed);
}

static void *broker_main(void *arg) {
  qregion_broker *b = arg;
  struct pollfd fds[2] = {{.fd = b->listen_fd, .events = POLLIN}, {.fd = b->wake[0], .events = POLLIN}};
  for (;;) {
    if (poll(fds, 2, -1) < 0) {
      if (errno == EINTR) continue;
      break;
    }
    if (fds[1].revents) break;
    if (fds[0].revents & POLLIN) {
      int conn = accept4(b->listen_fd, NULL, NULL, SOCK_CLOEXEC);
      if (conn < 0) continue;
      /* A client that connects and says nothing must not stall the broker. */
      struct timeval tv = {.tv_sec = 2, .tv_usec = 0};
      setsockopt(conn, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof tv);
      setsockopt(conn, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
      serve(b, conn);
      close(conn);
    }
  }
  return NULL;
}

static qshm_status socket_address(const char *path, struct sockaddr_un *addr) {
  memset(addr, 0, sizeof *addr);
  addr->sun_family = AF_UNIX;
  if (strlen(path) >= sizeof addr->sun_path) return fail_with(ENAMETOOLONG, "bind");
  strcpy(addr->sun_path, path);
  return OK;
}

qshm_status qregion_broker_start(const char *path, qregion_broker **out) {
  struct sockaddr_un addr;
  qshm_status s = socket_address(path, &addr);
  if (s.err) return s;
  qregion_broker *b = calloc(1, sizeof *b);
  if (!b) return fail_with(ENOMEM, "calloc");
  b->wake[0] = b->wake[1] = -1;
  pthread_mutex_init(&b->lock, NULL);
  strcpy(b->path, path);
  b->listen_fd = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (b->listen_fd < 0) {
    s = fail("socket");
    goto free_broker;
  }
  mode_t old = umask(0177);
  int bound = bind(b->listen_fd, (struct sockaddr *)&addr, sizeof addr);
  umask(old);
  if (bound < 0) {
    s = fail("bind");
    goto close_socket;
  }
  if (listen(b->listen_fd, 64) < 0 || pipe2(b->wake, O_CLOEXEC) < 0) {
    s = fail("listen");
    goto unlink_socket;
  }
  int err = pthread_create(&b->thread, NULL, broker_main, b);
  if (err) {
    s = fail_with(err, "pthread_create");
    goto unlink_socket;
  }
  *out = b;
  return OK;

unlink_socket:
  unlink(path);
  if (b->wake[0] >= 0) close(b->wake[0]);
  if (b->wake[1] >= 0) close(b->wake[1]);
close_socket:
  close(b->listen_fd);
free_broker:
  pthread_mutex_destroy(&b->lock);
  free(b);
  return s;
}

void qregion_broker_stop(qregion_broker *b) {
  if (write(b->wake[1], "x", 1) < 0) { /* the thread then ends at its next poll */ }
  pthread_join(b->thread, NULL);
  unlink(b->path);
  close(b->listen_fd);
  close(b->wake[0]);
  close(b->wake[1]);
  while (b->entries) {
    entry *e = b->entries;
    b->entries = e->next;
    close(e->fd);
    free(e);
  }
  pthread_mutex_destroy(&b->lock);
  free(b);
}

int qregion_broker_count(qregion_broker *b) {
  int n = 0;
  pthread_mutex_lock(&b->lock);
  for (entry *e = b->entries; e; e = e->next) n++;
  pthread_mutex_unlock(&b->lock);
  return n;
}

char *qregion_broker_names(qregion_broker *b, int *count) {
  *count = 0;
  pthread_mutex_lock(&b->lock);
  size_t size = 0;
  for (entry *e = b->entries; e; e = e->next) size += strlen(e->name) + 1;
  char *names = size ? malloc(size) : NULL;
  char *at = names;
  for (entry *e = names ? b->entries : NULL; e; e = e->next) {
    size_t len = strlen(e->name) + 1;
    memcpy(at, e->name, len);
    at += len;
    (*count)++;
  }
  pthread_mutex_unlock(&b->lock);
  return names;
}

/* One request, one reply; *fd_out receives GET's fd. */
static qshm_status call(const char *path, uint32_t op, const char *name, int fd, int *fd_out) {
  struct sockaddr_un addr;
  qshm_status s = socket_address(path, &addr);
  if (s.err) return s;
  if (strlen(name) > QREGION_NAME_MAX) return fail_with(ENAMETOOLONG, "sendmsg");
  request req;
  memset(&req, 0, sizeof req);
  req.op = op;
  strcpy(req.name, name);
  int sock = socket(AF_UNIX, SOCK_SEQPACKET | SOCK_CLOEXEC, 0);
  if (sock < 0) return fail("socket");
  int32_t err = 0;
  int got = -1;
  if (connect(sock, (struct sockaddr *)&addr, sizeof addr) < 0) {
    s = fail("connect");
  } else if (send_msg(sock, &req, sizeof req, fd) < 0) {
    s = fail("sendmsg");
  } else if (recv_msg(sock, &err, sizeof err, &got) < 0) {
    s = fail("recvmsg");
  } else if (err) {
    s = fail_with(err, op == OP_PUT ? "put" : op == OP_GET ? "get" : "drop");
  }
  close(sock);
  if (s.err == 0 && fd_out) *fd_out = got;
  else if (got >= 0) close(got);
  return s;
}

qshm_status qregion_put(const char *path, const char *name, int fd) { return call(path, OP_PUT, name, fd, NULL); }

qshm_status qregion_get(const char *path, const char *name, int *fd) {
  *fd = -1;
  qshm_status s = call(path, OP_GET, name, -1, fd);
  if (s.err == 0 && *fd < 0) s = fail_with(EPROTO, "recvmsg");
  return s;
}

qshm_status qregion_drop(const char *path, const char *name) { return call(path, OP_DROP, name, -1, NULL); }
