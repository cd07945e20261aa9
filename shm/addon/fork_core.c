#include "fork_core.h"

#include <errno.h>
#include <fcntl.h>
#include <signal.h>
#include <string.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/un.h>
#include <sys/wait.h>
#include <unistd.h>

/* In the child: glibc's fork leaves malloc usable, and the parent's other threads (idle under
 * --single-threaded) are simply absent. */
static int write_all(int fd, const char *data, size_t length) {
  while (length > 0) {
    ssize_t n = write(fd, data, length);
    if (n < 0) {
      if (errno == EINTR) continue;
      return -1;
    }
    data += n;
    length -= (size_t)n;
  }
  return 0;
}

static int connect_stream(const char *socket_path, const qfork_stream *stream) {
  struct sockaddr_un address;
  memset(&address, 0, sizeof address);
  address.sun_family = AF_UNIX;
  if (strlen(socket_path) >= sizeof address.sun_path) return -1;
  strcpy(address.sun_path, socket_path);
  int s = socket(AF_UNIX, SOCK_STREAM, 0);
  if (s < 0) return -1;
  if (connect(s, (struct sockaddr *)&address, sizeof address) != 0 || write_all(s, stream->hello, strlen(stream->hello)) != 0) {
    close(s);
    return -1;
  }
  /* The event loop has the old fd in its own mode (stdio blocking, the IPC channel not): keep it. */
  int old_flags = fcntl(stream->fd, F_GETFL);
  int flags = fcntl(s, F_GETFL);
  if (old_flags < 0 || flags < 0 || fcntl(s, F_SETFL, (flags & ~O_NONBLOCK) | (old_flags & O_NONBLOCK)) != 0) {
    close(s);
    return -1;
  }
  if (dup2(s, stream->fd) < 0) {
    close(s);
    return -1;
  }
  close(s);
  return 0;
}

/*
 * V8 marks its heap pages MADV_DONTFORK (spawning is cheaper when a fork copies less), so a
 * child would find its heap unmapped: every anonymous mapping is made inheritable again first.
 */
static void make_anonymous_memory_inheritable(void) {
  FILE *maps = fopen("/proc/self/maps", "r");
  if (!maps) return;
  char line[512];
  while (fgets(line, sizeof line, maps)) {
    unsigned long start, end, inode;
    int path_at = 0;
    if (sscanf(line, "%lx-%lx %*s %*s %*s %lu %n", &start, &end, &inode, &path_at) < 3) continue;
    /* A line longer than the buffer comes in pieces: only whole lines start with an address range. */
    if (inode != 0 || (path_at > 0 && line[path_at] != '\0' && line[path_at] != '\n')) continue;
    madvise((void *)start, end - start, MADV_DOFORK);
  }
  fclose(maps);
}

/*
 * A signal caught just before the fork waits in the parent's signal pipe, which the child no
 * longer reads (uv_loop_fork gives it a pipe of its own): its handle would count it as caught and
 * never dispatched. libuv does not finish closing such a handle until the two counts meet, and
 * keeps the loop polling without a timeout meanwhile: a child that closed it (the zygote's SIGCHLD
 * listener) spun at 100% of a core while it waited for a step. Those signals were the parent's.
 */
static void forget_parents_signals(uv_handle_t *handle, void *unused) {
  (void)unused;
  if (handle->type != UV_SIGNAL) return;
  uv_signal_t *signal = (uv_signal_t *)handle;
  signal->dispatched_signals = signal->caught_signals;
}

pid_t qfork_child(uv_loop_t *loop, const char *socket_path, const qfork_stream *streams, int stream_count, uint64_t address_space_bytes) {
  pid_t parent = getpid();
  make_anonymous_memory_inheritable();
  int held_workers = qfork_hold_platform_workers();
  if (held_workers == -1) return -ENOSYS;
  if (held_workers < 0) return -EAGAIN;
  pid_t pid = fork();
  int fork_errno = errno;
  if (pid != 0) qfork_release_platform_workers();
  if (pid < 0) return -fork_errno;
  if (pid > 0) return pid;
  if (setpgid(0, 0) != 0) _exit(72);
  if (prctl(PR_SET_PDEATHSIG, SIGKILL) != 0 || getppid() != parent) _exit(72);
  for (int i = 0; i < stream_count; i++) {
    if (connect_stream(socket_path, &streams[i]) != 0) _exit(72);
  }
  if (address_space_bytes > 0) {
    struct rlimit limit = {(rlim_t)address_space_bytes, (rlim_t)address_space_bytes};
    if (setrlimit(RLIMIT_AS, &limit) != 0) _exit(72);
  }
  if (uv_loop_fork(loop) != 0) _exit(72);
  uv_walk(loop, forget_parents_signals, NULL);
  forget_parents_signals((uv_handle_t *)&loop->child_watcher, NULL);
  return 0;
}

int qfork_reap(pid_t pid, int *code, int *signal) {
  int status = 0;
  pid_t r;
  do {
    r = waitpid(pid, &status, WNOHANG);
  } while (r < 0 && errno == EINTR);
  if (r < 0) return -errno;
  if (r == 0) return 0;
  *code = WIFEXITED(status) ? WEXITSTATUS(status) : -1;
  *signal = WIFSIGNALED(status) ? WTERMSIG(status) : -1;
  return 1;
}
