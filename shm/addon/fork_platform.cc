// Holds Node's V8 platform worker threads while a step zygote forks (fork_core.c). A thread idle
// in the platform's task queue waits on its condition variable; a child forked then inherits that
// condition variable with waiters it does not have, and glibc's pthread_cond_signal waits for them
// for ever: the first job V8 posts in the child (a mark-compact's weak-reference clearing) hangs.
// Holding every worker inside a task of ours leaves the queue's condition variable without waiters.
#include <node.h>
#include <v8-platform.h>

#include <chrono>
#include <condition_variable>
#include <memory>
#include <mutex>

namespace {

std::mutex hold_mutex;
std::condition_variable hold_changed;
int held = 0;
bool released = true;
int known_workers = -1;

class HoldTask : public v8::Task {
 public:
  void Run() override {
    std::unique_lock<std::mutex> lock(hold_mutex);
    held++;
    hold_changed.notify_all();
    hold_changed.wait(lock, [] { return released; });
    held--;
    hold_changed.notify_all();
  }
};

}  // namespace

extern "C" int qfork_hold_platform_workers(void) {
  // Called from JavaScript on the main thread (forkChild), so there is a current context.
  v8::Isolate* isolate = v8::Isolate::GetCurrent();
  if (isolate == nullptr) return -1;
  v8::HandleScope scope(isolate);
  node::Environment* env = node::GetCurrentEnvironment(isolate->GetCurrentContext());
  node::MultiIsolatePlatform* platform = env == nullptr ? nullptr : node::GetMultiIsolatePlatform(env);
  if (platform == nullptr) return -1;
  // Node 20 counts its delayed-task thread among its worker threads, and that one never takes a
  // task: how many do is learnt at the first hold (waiting a moment for the last) and kept.
  int threads = platform->NumberOfWorkerThreads();
  int workers = known_workers > 0 ? known_workers : threads - 1;
  {
    std::lock_guard<std::mutex> lock(hold_mutex);
    released = false;
  }
  // Once the count is known, no task is left queued for a thread that never comes.
  int tasks = known_workers > 0 ? known_workers : threads;
  for (int i = 0; i < tasks; i++) platform->CallOnWorkerThread(std::make_unique<HoldTask>());
  std::unique_lock<std::mutex> lock(hold_mutex);
  if (!hold_changed.wait_for(lock, std::chrono::seconds(5), [workers] { return held >= workers; })) {
    released = true;
    hold_changed.notify_all();
    return -2;
  }
  if (known_workers < 0) {
    hold_changed.wait_for(lock, std::chrono::milliseconds(50), [threads] { return held == threads; });
    known_workers = held;
  }
  return held;
}

extern "C" void qfork_release_platform_workers(void) {
  std::unique_lock<std::mutex> lock(hold_mutex);
  released = true;
  hold_changed.notify_all();
  hold_changed.wait(lock, [] { return held == 0; });
}
