/*
 * Thin N-API binding over shm_core.c. Checks every argument, turns core
 * failures into errors with a stable `code` ('ERR_SHM_ARG',
 * 'ERR_SHM_TOO_LARGE', or the errno name such as 'EEXIST'), and hands
 * mappings to JavaScript as external ArrayBuffers that munmap when collected
 * or when unmap() is called.
 */
#include <errno.h>
#include <limits.h>
#include <math.h>
#include <node_api.h>
#include <pthread.h>
#include <signal.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "fork_core.h"
#include "region_core.h"
#include "shm_core.h"

#define MAX_ARGS 4
#define MSG_SIZE (PATH_MAX + 512)

/* Node 20 on 64-bit: buffer.constants.MAX_LENGTH. shm/native.ts replaces it
 * with the running Node's value through setMaxByteLength(). */
static uint64_t max_byte_length = (uint64_t)1 << 32;

/* Live mappings, so unmap() can find the record behind an ArrayBuffer. The
 * lock matters when worker threads each load the addon. */
typedef struct record {
  qshm_mapping mapping;
  int unmapped;
  struct record *prev, *next;
} record;

static pthread_mutex_t registry_lock = PTHREAD_MUTEX_INITIALIZER;
static record *registry = NULL;

static void registry_add(record *r) {
  pthread_mutex_lock(&registry_lock);
  r->prev = NULL;
  r->next = registry;
  if (registry) registry->prev = r;
  registry = r;
  pthread_mutex_unlock(&registry_lock);
}

static void registry_remove(record *r) {
  pthread_mutex_lock(&registry_lock);
  if (r->prev) r->prev->next = r->next;
  else registry = r->next;
  if (r->next) r->next->prev = r->prev;
  pthread_mutex_unlock(&registry_lock);
}

/* Compares pointers only, so it is safe to ask about a freed record. */
static bool registry_contains(const record *r) {
  bool found = false;
  pthread_mutex_lock(&registry_lock);
  for (record *it = registry; it; it = it->next) {
    if (it == r) {
      found = true;
      break;
    }
  }
  pthread_mutex_unlock(&registry_lock);
  return found;
}

static record *registry_find_live(void *addr) {
  record *found = NULL;
  pthread_mutex_lock(&registry_lock);
  for (record *r = registry; r; r = r->next) {
    if (!r->unmapped && r->mapping.addr == addr) {
      found = r;
      break;
    }
  }
  pthread_mutex_unlock(&registry_lock);
  return found;
}

/* ---- errors ------------------------------------------------------------ */

static void throw_with(napi_env env, const char *code, const char *message, int err, const char *syscall,
                       const char *path) {
  napi_value code_v, msg_v, error;
  if (napi_create_string_utf8(env, code, NAPI_AUTO_LENGTH, &code_v) != napi_ok) return;
  if (napi_create_string_utf8(env, message, NAPI_AUTO_LENGTH, &msg_v) != napi_ok) return;
  if (napi_create_error(env, code_v, msg_v, &error) != napi_ok) return;
  if (err != 0) {
    napi_value v;
    napi_create_int32(env, err, &v);
    napi_set_named_property(env, error, "errno", v);
  }
  if (syscall) {
    napi_value v;
    napi_create_string_utf8(env, syscall, NAPI_AUTO_LENGTH, &v);
    napi_set_named_property(env, error, "syscall", v);
  }
  if (path) {
    napi_value v;
    napi_create_string_utf8(env, path, NAPI_AUTO_LENGTH, &v);
    napi_set_named_property(env, error, "path", v);
  }
  napi_throw(env, error);
}

static void throw_arg(napi_env env, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void throw_arg(napi_env env, const char *fmt, ...) {
  char msg[MSG_SIZE];
  va_list ap;
  va_start(ap, fmt);
  vsnprintf(msg, sizeof msg, fmt, ap);
  va_end(ap);
  throw_with(env, "ERR_SHM_ARG", msg, 0, NULL, NULL);
}

static const char *hint_for(int err, const char *syscall) {
  switch (err) {
    case EEXIST:
      return "a segment with this name already exists: choose another id, or release the existing segment first";
    case ENOENT:
      if (strcmp(syscall, "renameat2") == 0) return "the source file is gone (another process may have claimed it)";
      return "no such file: the segment was never written, was already released, or its cluster directory was "
             "removed (for create, make sure the directory exists)";
    case ENOSPC:
      return "the shared-memory filesystem is full: release segments, drain the segment pool, or enlarge it "
             "(e.g. mount -o remount,size=... /dev/shm)";
    case EACCES:
    case EPERM:
    case EROFS:
      return "check the owner and mode of the file and of its directory";
    case EMFILE:
    case ENFILE:
      return "too many open files: raise the file descriptor limit";
    case ENOMEM:
      return "the kernel could not map it: out of memory or address space (check ulimit -v and vm.max_map_count)";
    case ENAMETOOLONG:
      return "shorten the directory path or the segment id";
    case ELOOP:
      return "the path is a symbolic link, which segments never are: someone planted it; remove it and check who "
             "can write to the segment directory (it must be yours, mode 0700)";
    case EINVAL:
      if (strcmp(syscall, "fstat") == 0) return "the path is not a regular file";
      return "invalid argument for this file";
    default:
      return "see the errno for details";
  }
}

static void throw_status(napi_env env, const char *fn, qshm_status status, const char *path) {
  const char *name = qshm_errno_name(status.err);
  char code[32];
  if (name) snprintf(code, sizeof code, "%s", name);
  else snprintf(code, sizeof code, "ERRNO_%d", status.err);
  char msg[MSG_SIZE];
  snprintf(msg, sizeof msg, "quiver shm %s: %s(\"%s\") failed: %s (%s); %s", fn, status.syscall, path,
           strerror(status.err), code, hint_for(status.err, status.syscall));
  throw_with(env, code, msg, status.err, status.syscall, path);
}

static void throw_too_large(napi_env env, const char *fn, const char *what, uint64_t size, const char *path) {
  char msg[MSG_SIZE];
  snprintf(msg, sizeof msg,
           "quiver shm %s: %s of %llu bytes%s%s%s exceeds the largest ArrayBuffer this Node.js allows (%llu bytes, "
           "buffer.constants.MAX_LENGTH); split the data over several segments",
           fn, what, (unsigned long long)size, path ? " (\"" : "", path ? path : "", path ? "\")" : "",
           (unsigned long long)max_byte_length);
  throw_with(env, "ERR_SHM_TOO_LARGE", msg, 0, NULL, path);
}

/* ---- argument checks ----------------------------------------------------- */

static const char *type_name(napi_valuetype t) {
  switch (t) {
    case napi_undefined: return "undefined";
    case napi_null: return "null";
    case napi_boolean: return "boolean";
    case napi_number: return "number";
    case napi_string: return "string";
    case napi_symbol: return "symbol";
    case napi_object: return "object";
    case napi_function: return "function";
    case napi_external: return "external";
    case napi_bigint: return "bigint";
  }
  return "unknown";
}

static bool get_args(napi_env env, napi_callback_info info, const char *signature, size_t expected,
                     napi_value *argv) {
  size_t argc = MAX_ARGS;
  if (napi_get_cb_info(env, info, &argc, argv, NULL, NULL) != napi_ok) return false;
  if (argc != expected) {
    throw_arg(env, "quiver shm %s expects %zu argument(s), got %zu", signature, expected, argc);
    return false;
  }
  return true;
}

static bool get_path(napi_env env, napi_value v, const char *fn, char *buf) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok) return false;
  if (t != napi_string) {
    throw_arg(env, "quiver shm %s: path must be a string, got %s", fn, type_name(t));
    return false;
  }
  size_t len = 0;
  if (napi_get_value_string_utf8(env, v, NULL, 0, &len) != napi_ok) return false;
  if (len == 0) {
    throw_arg(env, "quiver shm %s: path must not be empty", fn);
    return false;
  }
  if (len >= PATH_MAX) {
    throw_arg(env, "quiver shm %s: path is %zu bytes, the limit is %d", fn, len, PATH_MAX - 1);
    return false;
  }
  size_t copied = 0;
  if (napi_get_value_string_utf8(env, v, buf, PATH_MAX, &copied) != napi_ok) return false;
  if (strlen(buf) != copied) {
    throw_arg(env, "quiver shm %s: path must not contain NUL characters", fn);
    return false;
  }
  return true;
}

static bool get_integer(napi_env env, napi_value v, const char *fn, const char *name, double *out) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok) return false;
  if (t != napi_number) {
    throw_arg(env, "quiver shm %s: %s must be a number, got %s", fn, name, type_name(t));
    return false;
  }
  double d;
  if (napi_get_value_double(env, v, &d) != napi_ok) return false;
  if (!isfinite(d) || d != floor(d)) {
    throw_arg(env, "quiver shm %s: %s must be an integer, got %g", fn, name, d);
    return false;
  }
  *out = d;
  return true;
}

static bool get_byte_size(napi_env env, napi_value v, const char *fn, uint64_t *out) {
  double d;
  if (!get_integer(env, v, fn, "byteSize", &d)) return false;
  if (d < 0) {
    throw_arg(env, "quiver shm %s: byteSize must be >= 0, got %g", fn, d);
    return false;
  }
  if (d > 9007199254740991.0 || (uint64_t)d > max_byte_length) {
    throw_too_large(env, fn, "byteSize", (uint64_t)d, NULL);
    return false;
  }
  *out = (uint64_t)d;
  return true;
}

static bool get_bool(napi_env env, napi_value v, const char *fn, const char *name, bool *out) {
  napi_valuetype t;
  if (napi_typeof(env, v, &t) != napi_ok) return false;
  if (t != napi_boolean) {
    throw_arg(env, "quiver shm %s: %s must be a boolean, got %s", fn, name, type_name(t));
    return false;
  }
  return napi_get_value_bool(env, v, out) == napi_ok;
}

/* ---- mappings as ArrayBuffers ------------------------------------------- */

static void finalize_mapping(napi_env env, void *data, void *hint) {
  record *r = hint;
  registry_remove(r);
  if (!r->unmapped) qshm_unmap(&r->mapping);
  free(r);
}

static napi_value wrap_mapping(napi_env env, const char *fn, qshm_mapping mapping, const char *path) {
  napi_value result;
  if (mapping.len == 0) {
    void *unused;
    if (napi_create_arraybuffer(env, 0, &unused, &result) != napi_ok) return NULL;
    return result;
  }
  record *r = calloc(1, sizeof *r);
  if (!r) {
    qshm_unmap(&mapping);
    napi_throw_error(env, "ENOMEM", "quiver shm: out of memory");
    return NULL;
  }
  r->mapping = mapping;
  registry_add(r);
  /* V8 counts the length as external memory; over 64 MB above its low-water
   * mark that starts incremental marking (a few ms, proportional to the JS
   * heap, not to the mapping). N-API offers no uncounted external buffer. */
  napi_status s = napi_create_external_arraybuffer(env, mapping.addr, mapping.len, finalize_mapping, r, &result);
  if (s != napi_ok) {
    /* Node runs the finalizer synchronously on some failures (e.g. a length
     * over buffer.constants.MAX_LENGTH); clean up only if it did not. */
    if (registry_contains(r)) {
      registry_remove(r);
      qshm_unmap(&r->mapping);
      free(r);
    }
    bool pending = false;
    napi_is_exception_pending(env, &pending);
    if (pending) {
      napi_value ignored;
      napi_get_and_clear_last_exception(env, &ignored);
    }
    if ((uint64_t)mapping.len > max_byte_length) {
      throw_too_large(env, fn, "a mapping", mapping.len, path);
    } else {
      char msg[MSG_SIZE];
      snprintf(msg, sizeof msg,
               "quiver shm %s: Node.js refused an external ArrayBuffer for \"%s\" (napi status %d); this Node.js "
               "build may not allow external buffers (V8 sandbox)",
               fn, path, (int)s);
      throw_with(env, "ERR_SHM_EXTERNAL", msg, 0, NULL, path);
    }
    return NULL;
  }
  return result;
}

/* ---- exported functions --------------------------------------------------- */

static napi_value js_create(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS];
  char path[PATH_MAX];
  uint64_t size;
  bool populate;
  if (!get_args(env, info, "create(path, byteSize, populate)", 3, argv)) return NULL;
  if (!get_path(env, argv[0], "create", path)) return NULL;
  if (!get_byte_size(env, argv[1], "create", &size)) return NULL;
  if (!get_bool(env, argv[2], "create", "populate", &populate)) return NULL;
  qshm_mapping mapping;
  qshm_status s = qshm_create(path, size, populate, &mapping);
  if (s.err) {
    throw_status(env, "create", s, path);
    return NULL;
  }
  napi_value result = wrap_mapping(env, "create", mapping, path);
  if (!result) unlink(path);
  return result;
}

static napi_value js_open_writable(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS];
  char path[PATH_MAX];
  uint64_t size;
  bool populate;
  if (!get_args(env, info, "openWritable(path, byteSize, populate)", 3, argv)) return NULL;
  if (!get_path(env, argv[0], "openWritable", path)) return NULL;
  if (!get_byte_size(env, argv[1], "openWritable", &size)) return NULL;
  if (!get_bool(env, argv[2], "openWritable", "populate", &populate)) return NULL;
  qshm_mapping mapping;
  qshm_status s = qshm_open_writable(path, size, populate, &mapping);
  if (s.err) {
    throw_status(env, "openWritable", s, path);
    return NULL;
  }
  return wrap_mapping(env, "openWritable", mapping, path);
}

static napi_value js_open_read_only(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS];
  char path[PATH_MAX];
  if (!get_args(env, info, "openReadOnly(path)", 1, argv)) return NULL;
  if (!get_path(env, argv[0], "openReadOnly", path)) return NULL;
  qshm_mapping mapping;
  qshm_status s = qshm_open_readonly(path, max_byte_length, &mapping);
  if (s.err == EFBIG) {
    throw_too_large(env, "openReadOnly", "a file", mapping.len, path);
    return NULL;
  }
  if (s.err) {
    throw_status(env, "openReadOnly", s, path);
    return NULL;
  }
  return wrap_mapping(env, "openReadOnly", mapping, path);
}

static napi_value js_unmap(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS];
  napi_value result;
  if (!get_args(env, info, "unmap(mapping)", 1, argv)) return NULL;
  bool is_ab = false;
  if (napi_is_arraybuffer(env, argv[0], &is_ab) != napi_ok) return NULL;
  if (!is_ab) {
    throw_arg(env, "quiver shm unmap: mapping must be an ArrayBuffer returned by create, openWritable or openReadOnly");
    return NULL;
  }
  void *data = NULL;
  size_t len = 0;
  if (napi_get_arraybuffer_info(env, argv[0], &data, &len) != napi_ok) return NULL;
  /* Empty (or already detached) buffers own no mapping. */
  record *r = len == 0 ? NULL : registry_find_live(data);
  if (len == 0) {
    napi_get_boolean(env, false, &result);
    return result;
  }
  if (!r || r->mapping.len != len) {
    throw_arg(env, "quiver shm unmap: this ArrayBuffer is not a mapping made by quiver shm");
    return NULL;
  }
  /* Detach first: afterwards JavaScript sees a zero-length buffer instead of
   * faulting on unmapped memory. */
  if (napi_detach_arraybuffer(env, argv[0]) != napi_ok) {
    throw_with(env, "ERR_SHM_DETACH", "quiver shm unmap: the ArrayBuffer could not be detached; it stays mapped", 0,
               NULL, NULL);
    return NULL;
  }
  pthread_mutex_lock(&registry_lock);
  r->unmapped = 1;
  pthread_mutex_unlock(&registry_lock);
  qshm_status s = qshm_unmap(&r->mapping);
  if (s.err) {
    throw_status(env, "unmap", s, "(mapping)");
    return NULL;
  }
  napi_get_boolean(env, true, &result);
  return result;
}

static napi_value js_rename_no_replace(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS];
  char from[PATH_MAX], to[PATH_MAX];
  if (!get_args(env, info, "renameNoReplace(from, to)", 2, argv)) return NULL;
  if (!get_path(env, argv[0], "renameNoReplace", from)) return NULL;
  if (!get_path(env, argv[1], "renameNoReplace", to)) return NULL;
  qshm_status s = qshm_rename_noreplace(from, to);
  if (s.err) {
    /* Name the path the errno is about. */
    throw_status(env, "renameNoReplace", s, s.err == EEXIST ? to : from);
    return NULL;
  }
  return NULL;
}

static napi_value js_set_parent_death_signal(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS];
  double d;
  if (!get_args(env, info, "setParentDeathSignal(signal)", 1, argv)) return NULL;
  if (!get_integer(env, argv[0], "setParentDeathSignal", "signal", &d)) return NULL;
  if (d < 0 || d > SIGRTMAX) {
    throw_arg(env, "quiver shm setParentDeathSignal: signal must be between 0 and %d, got %g", SIGRTMAX, d);
    return NULL;
  }
  qshm_status s = qshm_set_parent_death_signal((int)d);
  if (s.err) {
    throw_status(env, "setParentDeathSignal", s, "(process)");
    return NULL;
  }
  return NULL;
}

static napi_value js_parent_pid(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS];
  napi_value result;
  if (!get_args(env, info, "parentPid()", 0, argv)) return NULL;
  napi_create_int32(env, qshm_parent_pid(), &result);
  return result;
}

static napi_value js_set_max_byte_length(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS];
  double d;
  if (!get_args(env, info, "setMaxByteLength(byteLength)", 1, argv)) return NULL;
  if (!get_integer(env, argv[0], "setMaxByteLength", "byteLength", &d)) return NULL;
  if (d < 0 || d > 9007199254740991.0) {
    throw_arg(env, "quiver shm setMaxByteLength: byteLength must be between 0 and 2^53-1, got %g", d);
    return NULL;
  }
  max_byte_length = (uint64_t)d;
  return NULL;
}

/* ---- forking step processes (executor/step-zygote.ts) ------------------- */

#define HELLO_SIZE 256

static napi_value js_fork_child(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS];
  char socket_path[PATH_MAX];
  char hellos[3][HELLO_SIZE];
  qfork_stream streams[3];
  double ipc_fd, address_space;
  uv_loop_t *loop;
  if (!get_args(env, info, "forkChild(socketPath, hellos, ipcFd, addressSpaceBytes)", 4, argv)) return NULL;
  if (!get_path(env, argv[0], "forkChild", socket_path)) return NULL;
  if (!get_integer(env, argv[2], "forkChild", "ipcFd", &ipc_fd)) return NULL;
  if (!get_integer(env, argv[3], "forkChild", "addressSpaceBytes", &address_space)) return NULL;
  if (ipc_fd < 3 || ipc_fd > INT_MAX || address_space < 0 || address_space > 9007199254740991.0) {
    throw_arg(env, "quiver shm forkChild: ipcFd must be an fd above 2 and addressSpaceBytes at least 0, got %g and %g", ipc_fd, address_space);
    return NULL;
  }
  const int fds[3] = {1, 2, (int)ipc_fd};
  for (uint32_t i = 0; i < 3; i++) {
    napi_value hello;
    size_t length = 0;
    if (napi_get_element(env, argv[1], i, &hello) != napi_ok ||
        napi_get_value_string_utf8(env, hello, hellos[i], HELLO_SIZE, &length) != napi_ok || length >= HELLO_SIZE - 1) {
      throw_arg(env, "quiver shm forkChild: hellos must be three strings shorter than %d bytes", HELLO_SIZE - 1);
      return NULL;
    }
    streams[i].fd = fds[i];
    streams[i].hello = hellos[i];
  }
  if (napi_get_uv_event_loop(env, &loop) != napi_ok) return NULL;
  pid_t pid = qfork_child(loop, socket_path, streams, 3, (uint64_t)address_space);
  if (pid < 0) {
    qshm_status s = {-pid, "fork"};
    throw_status(env, "forkChild", s, "(process)");
    return NULL;
  }
  napi_value result;
  napi_create_int32(env, pid, &result);
  return result;
}

static napi_value js_reap_child(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS];
  double pid;
  int code = -1, signal = -1;
  if (!get_args(env, info, "reapChild(pid)", 1, argv)) return NULL;
  if (!get_integer(env, argv[0], "reapChild", "pid", &pid)) return NULL;
  if (pid < 1 || pid > INT_MAX) {
    throw_arg(env, "quiver shm reapChild: pid must be a positive pid, got %g", pid);
    return NULL;
  }
  int r = qfork_reap((pid_t)pid, &code, &signal);
  if (r < 0) {
    qshm_status s = {-r, "waitpid"};
    throw_status(env, "reapChild", s, "(process)");
    return NULL;
  }
  napi_value result, v;
  if (r == 0) {
    napi_get_null(env, &result);
    return result;
  }
  napi_create_object(env, &result);
  if (code >= 0) napi_create_int32(env, code, &v);
  else napi_get_null(env, &v);
  napi_set_named_property(env, result, "code", v);
  if (signal >= 0) napi_create_int32(env, signal, &v);
  else napi_get_null(env, &v);
  napi_set_named_property(env, result, "signal", v);
  return result;
}

/* _exit(2): a forked child must not run Node's exit, which joins threads only its parent has. */
static napi_value js_exit_now(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS];
  double code;
  if (!get_args(env, info, "exitNow(code)", 1, argv)) return NULL;
  if (!get_integer(env, argv[0], "exitNow", "code", &code)) return NULL;
  _exit((int)code & 0xff);
}

/* ---- regions (kmod/) ------------------------------------------------------ */

static bool get_fd(napi_env env, napi_value v, const char *fn, int *out) {
  double d;
  if (!get_integer(env, v, fn, "fd", &d)) return false;
  if (d < 0 || d > INT_MAX) {
    throw_arg(env, "quiver shm %s: fd must be a file descriptor (>= 0), got %g", fn, d);
    return false;
  }
  *out = (int)d;
  return true;
}

static bool get_name(napi_env env, napi_value v, const char *fn, char *buf) {
  if (!get_path(env, v, fn, buf)) return false;
  if (strlen(buf) > QREGION_NAME_MAX) {
    throw_arg(env, "quiver shm %s: name is longer than %d bytes", fn, QREGION_NAME_MAX);
    return false;
  }
  return true;
}

static napi_value js_region_available(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS], result;
  if (!get_args(env, info, "regionAvailable()", 0, argv)) return NULL;
  napi_get_boolean(env, qregion_available(), &result);
  return result;
}

static napi_value js_alloc_anonymous(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS];
  uint64_t size;
  if (!get_args(env, info, "allocAnonymous(byteSize)", 1, argv)) return NULL;
  if (!get_byte_size(env, argv[0], "allocAnonymous", &size)) return NULL;
  qshm_mapping mapping;
  qshm_status s = qregion_alloc(size, &mapping);
  if (s.err) {
    throw_status(env, "allocAnonymous", s, "(anonymous memory)");
    return NULL;
  }
  return wrap_mapping(env, "allocAnonymous", mapping, "(anonymous memory)");
}

static napi_value js_share_region(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS];
  if (!get_args(env, info, "shareRegion(mapping)", 1, argv)) return NULL;
  bool is_ab = false;
  void *data = NULL;
  size_t len = 0;
  if (napi_is_arraybuffer(env, argv[0], &is_ab) != napi_ok) return NULL;
  if (is_ab && napi_get_arraybuffer_info(env, argv[0], &data, &len) != napi_ok) return NULL;
  record *r = is_ab && len > 0 ? registry_find_live(data) : NULL;
  if (!r || r->mapping.len != len) {
    throw_arg(env, "quiver shm shareRegion: mapping must be a live ArrayBuffer returned by allocAnonymous");
    return NULL;
  }
  int fd;
  uint64_t id;
  qshm_status s = qregion_share(data, len, &fd, &id);
  if (s.err) {
    throw_status(env, "shareRegion", s, "/dev/quiver");
    return NULL;
  }
  napi_value result, fd_v, id_v;
  napi_create_object(env, &result);
  napi_create_int32(env, fd, &fd_v);
  napi_create_double(env, (double)id, &id_v);
  napi_set_named_property(env, result, "fd", fd_v);
  napi_set_named_property(env, result, "id", id_v);
  return result;
}

static napi_value js_map_region(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS];
  int fd;
  if (!get_args(env, info, "mapRegion(fd)", 1, argv)) return NULL;
  if (!get_fd(env, argv[0], "mapRegion", &fd)) return NULL;
  qshm_mapping mapping;
  qshm_status s = qregion_map(fd, max_byte_length, &mapping);
  if (s.err == EFBIG) {
    throw_too_large(env, "mapRegion", "a region", mapping.len, NULL);
    return NULL;
  }
  if (s.err) {
    throw_status(env, "mapRegion", s, "(region fd)");
    return NULL;
  }
  return wrap_mapping(env, "mapRegion", mapping, "(region fd)");
}

static void finalize_broker(napi_env env, void *data, void *hint) {
  qregion_broker **slot = data;
  if (*slot) qregion_broker_stop(*slot);
  free(slot);
}

static qregion_broker **get_broker(napi_env env, napi_value v, const char *fn) {
  napi_valuetype t;
  void *data = NULL;
  if (napi_typeof(env, v, &t) != napi_ok) return NULL;
  if (t != napi_external || napi_get_value_external(env, v, &data) != napi_ok || !data) {
    throw_arg(env, "quiver shm %s: broker must be the handle returned by regionBrokerStart", fn);
    return NULL;
  }
  return data;
}

static napi_value js_region_broker_start(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS], result;
  char path[PATH_MAX];
  if (!get_args(env, info, "regionBrokerStart(socketPath)", 1, argv)) return NULL;
  if (!get_path(env, argv[0], "regionBrokerStart", path)) return NULL;
  qregion_broker **slot = calloc(1, sizeof *slot);
  if (!slot) {
    napi_throw_error(env, "ENOMEM", "quiver shm: out of memory");
    return NULL;
  }
  qshm_status s = qregion_broker_start(path, slot);
  if (s.err) {
    free(slot);
    throw_status(env, "regionBrokerStart", s, path);
    return NULL;
  }
  if (napi_create_external(env, slot, finalize_broker, NULL, &result) != napi_ok) {
    qregion_broker_stop(*slot);
    free(slot);
    return NULL;
  }
  return result;
}

static napi_value js_region_broker_stop(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS];
  if (!get_args(env, info, "regionBrokerStop(broker)", 1, argv)) return NULL;
  qregion_broker **slot = get_broker(env, argv[0], "regionBrokerStop");
  if (slot && *slot) {
    qregion_broker_stop(*slot);
    *slot = NULL;
  }
  return NULL;
}

static napi_value js_region_broker_count(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS], result;
  if (!get_args(env, info, "regionBrokerCount(broker)", 1, argv)) return NULL;
  qregion_broker **slot = get_broker(env, argv[0], "regionBrokerCount");
  if (!slot) return NULL;
  napi_create_int32(env, *slot ? qregion_broker_count(*slot) : 0, &result);
  return result;
}

static napi_value js_region_broker_names(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS], result;
  if (!get_args(env, info, "regionBrokerNames(broker)", 1, argv)) return NULL;
  qregion_broker **slot = get_broker(env, argv[0], "regionBrokerNames");
  if (!slot) return NULL;
  int count = 0;
  char *names = *slot ? qregion_broker_names(*slot, &count) : NULL;
  if (napi_create_array_with_length(env, (size_t)count, &result) != napi_ok) {
    free(names);
    return NULL;
  }
  const char *at = names;
  for (int i = 0; i < count; i++) {
    napi_value name;
    napi_create_string_utf8(env, at, NAPI_AUTO_LENGTH, &name);
    napi_set_element(env, result, (uint32_t)i, name);
    at += strlen(at) + 1;
  }
  free(names);
  return result;
}

static napi_value js_region_put(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS];
  char path[PATH_MAX], name[PATH_MAX];
  int fd;
  if (!get_args(env, info, "regionPut(socketPath, name, fd)", 3, argv)) return NULL;
  if (!get_path(env, argv[0], "regionPut", path) || !get_name(env, argv[1], "regionPut", name) ||
      !get_fd(env, argv[2], "regionPut", &fd))
    return NULL;
  qshm_status s = qregion_put(path, name, fd);
  if (s.err) throw_status(env, "regionPut", s, name);
  return NULL;
}

static napi_value js_region_get(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS], result;
  char path[PATH_MAX], name[PATH_MAX];
  if (!get_args(env, info, "regionGet(socketPath, name)", 2, argv)) return NULL;
  if (!get_path(env, argv[0], "regionGet", path) || !get_name(env, argv[1], "regionGet", name)) return NULL;
  int fd;
  qshm_status s = qregion_get(path, name, &fd);
  if (s.err) {
    throw_status(env, "regionGet", s, name);
    return NULL;
  }
  napi_create_int32(env, fd, &result);
  return result;
}

static napi_value js_region_drop(napi_env env, napi_callback_info info) {
  napi_value argv[MAX_ARGS];
  char path[PATH_MAX], name[PATH_MAX];
  if (!get_args(env, info, "regionDrop(socketPath, name)", 2, argv)) return NULL;
  if (!get_path(env, argv[0], "regionDrop", path) || !get_name(env, argv[1], "regionDrop", name)) return NULL;
  qshm_status s = qregion_drop(path, name);
  if (s.err) throw_status(env, "regionDrop", s, name);
  return NULL;
}

static napi_value init(napi_env env, napi_value exports) {
  napi_property_descriptor props[] = {
      {"create", NULL, js_create, NULL, NULL, NULL, napi_enumerable, NULL},
      {"openWritable", NULL, js_open_writable, NULL, NULL, NULL, napi_enumerable, NULL},
      {"openReadOnly", NULL, js_open_read_only, NULL, NULL, NULL, napi_enumerable, NULL},
      {"unmap", NULL, js_unmap, NULL, NULL, NULL, napi_enumerable, NULL},
      {"renameNoReplace", NULL, js_rename_no_replace, NULL, NULL, NULL, napi_enumerable, NULL},
      {"setParentDeathSignal", NULL, js_set_parent_death_signal, NULL, NULL, NULL, napi_enumerable, NULL},
      {"parentPid", NULL, js_parent_pid, NULL, NULL, NULL, napi_enumerable, NULL},
      {"forkChild", NULL, js_fork_child, NULL, NULL, NULL, napi_enumerable, NULL},
      {"reapChild", NULL, js_reap_child, NULL, NULL, NULL, napi_enumerable, NULL},
      {"exitNow", NULL, js_exit_now, NULL, NULL, NULL, napi_enumerable, NULL},
      {"setMaxByteLength", NULL, js_set_max_byte_length, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionAvailable", NULL, js_region_available, NULL, NULL, NULL, napi_enumerable, NULL},
      {"allocAnonymous", NULL, js_alloc_anonymous, NULL, NULL, NULL, napi_enumerable, NULL},
      {"shareRegion", NULL, js_share_region, NULL, NULL, NULL, napi_enumerable, NULL},
      {"mapRegion", NULL, js_map_region, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionBrokerStart", NULL, js_region_broker_start, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionBrokerStop", NULL, js_region_broker_stop, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionBrokerCount", NULL, js_region_broker_count, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionBrokerNames", NULL, js_region_broker_names, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionPut", NULL, js_region_put, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionGet", NULL, js_region_get, NULL, NULL, NULL, napi_enumerable, NULL},
      {"regionDrop", NULL, js_region_drop, NULL, NULL, NULL, napi_enumerable, NULL},
  };
  if (napi_define_properties(env, exports, sizeof props / sizeof props[0], props) != napi_ok) return NULL;
  return exports;
}

NAPI_MODULE(NODE_GYP_MODULE_NAME, init)
