// The CPU kernels' threads (see cpu_pool.h).
#include "cpu_pool.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <system_error>
#include <thread>

#ifndef _WIN32
#include <pthread.h>
#endif

namespace symkernels {
namespace {

using Clock = std::chrono::steady_clock;
using std::chrono::milliseconds;

// A team call stalled when it waited this long after its last task had finished for a member to reach the
// region's end. A member that was spinning arrives within microseconds and one that slept within tens; one whose
// core another process holds waits for the scheduler to run it, milliseconds.
constexpr Clock::duration kStall = std::chrono::microseconds(200);
// After a stall the pool runs the calls for kFirstBackoff; when the team stalls again within kStallMemory of
// getting them back, for twice as long as the last time, up to kMaxBackoff. A stall costs milliseconds and a team
// call gains tens of microseconds, so the team is tried again only rarely while stalls keep coming.
constexpr Clock::duration kFirstBackoff = milliseconds(200);
constexpr Clock::duration kMaxBackoff = milliseconds(2000);
constexpr Clock::duration kStallMemory = milliseconds(1000);

thread_local bool t_in_task = false;

// One call's tasks, shared by the caller and the helpers that join it. `task` is only called for a claimed index
// below num_tasks, and the caller returns only once every task has finished, so it outlives every call; a pool
// worker that joins after the last task was claimed touches nothing but the counter.
struct Tasks {
  Tasks(int64_t num_tasks_in, const std::function<void(int64_t)>* task_in) : num_tasks(num_tasks_in), task(task_in) {}

  // Takes tasks until none is left.
  void work() {
    for (;;) {
      const int64_t t = next.fetch_add(1, std::memory_order_relaxed);
      if (t >= num_tasks) return;
      const bool nested = t_in_task;
      t_in_task = true;
      try {
        (*task)(t);
      } catch (...) {
        const std::lock_guard<std::mutex> guard(mutex);
        if (!error) error = std::current_exception();
      }
      t_in_task = nested;
      if (finished.fetch_add(1, std::memory_order_acq_rel) + 1 == num_tasks) {
        const std::lock_guard<std::mutex> guard(mutex);
        finished_at = Clock::now();
        all_finished.notify_all();
      }
    }
  }

  // Blocks until every task has finished (the pool's caller; a team's region ends only then anyway).
  void wait() {
    std::unique_lock<std::mutex> lock(mutex);
    all_finished.wait(lock, [&] { return finished.load(std::memory_order_acquire) == num_tasks; });
  }

  const int64_t num_tasks;
  const std::function<void(int64_t)>* const task;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  std::mutex mutex;  // guards error, finished_at and the caller's wait
  std::condition_variable all_finished;
  std::exception_ptr error;
  Clock::time_point finished_at;
};

// Runs the tasks on torch's intra-op threads; returns how long the caller waited after the last task had finished.
Clock::duration run_on_team(Tasks& tasks, int64_t threads) {
  at::parallel_for(0, threads, 1, [&](int64_t, int64_t) { tasks.work(); });
  const Clock::time_point end = Clock::now();
  const std::lock_guard<std::mutex> guard(tasks.mutex);
  return end - tasks.finished_at;
}

class Pool {
 public:
  // Runs the tasks with up to `helpers` workers; the caller holds the helpers (one call at a time).
  void run(const std::shared_ptr<Tasks>& tasks, int helpers) {
    {
      const std::lock_guard<std::mutex> guard(mutex_);
      start_workers(helpers);
      offer_ = tasks;
      wanted_ = std::min(helpers, workers_);
    }
    for (int i = 0; i < helpers; ++i) wake_.notify_one();
    tasks->work();
    tasks->wait();
    const std::lock_guard<std::mutex> guard(mutex_);
    offer_.reset();
    wanted_ = 0;
  }

 private:
  // Called with mutex_ held. Workers live as long as the process (the pool is never destroyed).
  void start_workers(int count) {
    while (workers_ < count) {
      try {
        std::thread([this] { loop(); }).detach();
      } catch (const std::system_error&) {
        return;  // no more threads: run with the workers there are
      }
      ++workers_;
    }
  }

  void loop() {
    std::unique_lock<std::mutex> lock(mutex_);
    for (;;) {
      wake_.wait(lock, [this] { return wanted_ > 0; });
      --wanted_;
      std::shared_ptr<Tasks> tasks = offer_;
      lock.unlock();
      tasks->work();
      tasks.reset();
      lock.lock();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::shared_ptr<Tasks> offer_;  // the running call's tasks
  int wanted_ = 0;                // workers the running call still wants
  int workers_ = 0;
};

// Picks the team or the pool for each call (see cpu_pool.h). Used only by the call that holds the helpers.
class Chooser {
 public:
  bool team_now(Clock::time_point now) const { return now >= pool_until_; }

  void record_team_call(Clock::duration waited, Clock::time_point now) {
    if (waited < kStall) return;
    const bool again = stalled_before_ && now - pool_until_ < kStallMemory;
    backoff_ = again ? std::min(2 * backoff_, kMaxBackoff) : kFirstBackoff;
    pool_until_ = now + backoff_;
    stalled_before_ = true;
  }

 private:
  Clock::time_point pool_until_{};
  Clock::duration backoff_ = kFirstBackoff;
  bool stalled_before_ = false;
};

// Everything a process has; a forked child replaces it with a fresh one (see new_state_after_fork).
struct State {
  Pool pool;
  Chooser chooser;
  std::atomic<bool> held{false};  // a call holds the helpers
  bool team_usable = true;
  std::atomic<int64_t> inline_calls{0};
  std::atomic<int64_t> team_calls{0};
  std::atomic<int64_t> pool_calls{0};
  std::atomic<int64_t> team_stalls{0};
};

std::atomic<TaskThreads> g_choice{TaskThreads::kAdaptive};
std::atomic<State*> g_state{nullptr};

// A forked child has none of the parent's workers, and the parent's pool may be locked forever there: the child
// starts a state of its own, without the team, and leaves the old one alone.
void new_state_after_fork() {
  auto* state = new State();
  state->team_usable = false;
  g_state.store(state, std::memory_order_relaxed);
}

State& state() {
  static const bool started = [] {
    g_state.store(new State(), std::memory_order_relaxed);
#ifndef _WIN32
    pthread_atfork(nullptr, nullptr, &new_state_after_fork);
#endif
    return true;
  }();
  (void)started;
  return *g_state.load(std::memory_order_relaxed);
}

void run_here(int64_t num_tasks, const std::function<void(int64_t)>& task) {
  for (int64_t t = 0; t < num_tasks; ++t) task(t);
}

}  // namespace

void parallel_tasks(int64_t num_tasks, const std::function<void(int64_t)>& task) {
  const int64_t threads = std::min<int64_t>(at::get_num_threads(), num_tasks);
  State& s = state();
  bool expected = false;
  if (threads <= 1 || t_in_task || at::in_parallel_region() ||
      !s.held.compare_exchange_strong(expected, true, std::memory_order_acquire)) {
    s.inline_calls.fetch_add(1, std::memory_order_relaxed);
    run_here(num_tasks, task);
    return;
  }
  struct Release {
    std::atomic<bool>& held;
    ~Release() { held.store(false, std::memory_order_release); }
  } release{s.held};

  auto tasks = std::make_shared<Tasks>(num_tasks, &task);
  const TaskThreads choice = g_choice.load(std::memory_order_relaxed);
  const bool team = s.team_usable && (choice == TaskThreads::kTeam ||
                                      (choice == TaskThreads::kAdaptive && s.chooser.team_now(Clock::now())));
  if (team) {
    s.team_calls.fetch_add(1, std::memory_order_relaxed);
    const Clock::duration waited = run_on_team(*tasks, threads);
    if (waited >= kStall) s.team_stalls.fetch_add(1, std::memory_order_relaxed);
    s.chooser.record_team_call(waited, Clock::now());
  } else {
    s.pool_calls.fetch_add(1, std::memory_order_relaxed);
    s.pool.run(tasks, static_cast<int>(threads - 1));
  }
  if (tasks->error) std::rethrow_exception(tasks->error);
}

void set_task_threads(TaskThreads choice) {
  g_choice.store(choice, std::memory_order_relaxed);
}

TaskThreads task_threads() {
  return g_choice.load(std::memory_order_relaxed);
}

TaskCounts task_counts() {
  const State& s = state();
  TaskCounts counts;
  counts.inline_calls = s.inline_calls.load(std::memory_order_relaxed);
  counts.team_calls = s.team_calls.load(std::memory_order_relaxed);
  counts.pool_calls = s.pool_calls.load(std::memory_order_relaxed);
  counts.team_stalls = s.team_stalls.load(std::memory_order_relaxed);
  return counts;
}

namespace {

int64_t thread_number() {
  // Never 0, which the trace keeps for "not run".
  return static_cast<int64_t>(std::hash<std::thread::id>{}(std::this_thread::get_id()) | 1);
}

}  // namespace

TaskTrace trace_parallel_tasks(int64_t num_tasks, int64_t task_us, int64_t nested_tasks, int64_t fail_task) {
  TaskTrace trace;
  trace.task_thread.assign(static_cast<size_t>(num_tasks), 0);
  trace.nested_thread.assign(static_cast<size_t>(num_tasks * nested_tasks), 0);
  try {
    parallel_tasks(num_tasks, [&](int64_t t) {
      const Clock::time_point until = Clock::now() + std::chrono::microseconds(task_us);
      while (Clock::now() < until) {
      }
      trace.task_thread[t] = thread_number();
      parallel_tasks(nested_tasks, [&](int64_t i) { trace.nested_thread[t * nested_tasks + i] = thread_number(); });
      if (t == fail_task) throw std::runtime_error("task " + std::to_string(t) + " failed");
    });
  } catch (const std::exception& error) {
    trace.error = error.what();
  }
  return trace;
}

std::vector<bool> replay_choices(const std::vector<std::pair<double, double>>& calls) {
  Chooser chooser;
  std::vector<bool> team;
  for (const auto& [time_ms, waited_us] : calls) {
    const Clock::time_point now{
        std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double, std::milli>(time_ms))};
    team.push_back(chooser.team_now(now));
    if (team.back()) {
      chooser.record_team_call(
          std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double, std::micro>(waited_us)), now);
    }
  }
  return team;
}

}  // namespace symkernels
