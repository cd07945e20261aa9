/*
 * Forking a step process from a booted one (executor/step-zygote.ts): the
 * child gets its own process group, dies with its parent, connects its
 * stdout, stderr and IPC channel to the executor, and re-arms the event loop.
 */
#ifndef QUIVER_FORK_CORE_H
#define QUIVER_FORK_CORE_H

#include <stdint.h>
#include <sys/types.h>
#include <uv.h>

/* Where each of the child's three streams goes: fd to replace and the line it says first. */
typedef struct {
  int fd;
  const char *hello;
} qfork_stream;

/*
 * fork(2). In the child: setpgid, PR_SET_PDEATHSIG SIGKILL, each stream's fd
 * replaced by a connection to `socket_path` that said its hello line (with the
 * fd's O_NONBLOCK kept), RLIMIT_AS set when address_space_bytes > 0, and
 * uv_loop_fork(loop) (the parent's undelivered signals dropped). A child that cannot do all of it exits at once with 72.
 * Returns the child's pid in the parent, 0 in the child, -errno on failure.
 */
pid_t qfork_child(uv_loop_t *loop, const char *socket_path, const qfork_stream *streams, int stream_count, uint64_t address_space_bytes);

/* fork_platform.cc: Node's V8 worker threads held in a task of ours across a fork, and let go. */
int qfork_hold_platform_workers(void);
void qfork_release_platform_workers(void);

/*
 * waitpid(pid, WNOHANG): 0 while it runs, 1 when it ended (its exit code or
 * signal set, the other -1), -errno on failure.
 */
int qfork_reap(pid_t pid, int *code, int *signal);

#endif
