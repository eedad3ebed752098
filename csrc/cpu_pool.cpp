// The CPU kernels' threads (see cpu_pool.h).
#include "cpu_pool.h"

#include "cpu_task_choice.h"
#include "omp_quiet.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <stdexcept>
#include <string>
#include <system_error>
#include <thread>

#ifndef _WIN32
#include <pthread.h>
#endif

namespace symkernels {
namespace {

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

// Everything a process has; a forked child replaces it with a fresh one (see new_state_after_fork).
struct State {
  Pool pool;
  TaskChoice choice;  // used only by the call that holds the helpers
  OmpQuiet quiet;
  std::atomic<bool> held{false};  // a call holds the helpers
  bool team_usable = true;
  std::atomic<int64_t> inline_calls{0};
  std::atomic<int64_t> team_calls{0};
  std::atomic<int64_t> pool_calls{0};
  std::atomic<int64_t> team_stalls{0};
};

// SYMKERNELS_CPU_THREADS, read once: adaptive (or unset), team or pool; anything else is reported by every
// parallel call until set_task_threads chooses.
struct FromEnvironment {
  TaskThreads choice = TaskThreads::kAdaptive;
  std::string error;
};

FromEnvironment read_environment() {
  FromEnvironment out;
  const char* value = std::getenv("SYMKERNELS_CPU_THREADS");
  if (value == nullptr || std::string(value) == "adaptive" || std::string(value).empty()) return out;
  if (std::string(value) == "team") {
    out.choice = TaskThreads::kTeam;
  } else if (std::string(value) == "pool") {
    out.choice = TaskThreads::kPool;
  } else {
    out.error = std::string("SYMKERNELS_CPU_THREADS must be 'adaptive', 'team' or 'pool', got '") + value + "'";
  }
  return out;
}

const FromEnvironment g_environment = read_environment();
std::atomic<TaskThreads> g_choice{g_environment.choice};
std::atomic<bool> g_choice_set{false};  // set_task_threads was called: the environment's error no longer counts
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

  if (!g_environment.error.empty() && !g_choice_set.load(std::memory_order_relaxed)) {
    throw std::invalid_argument(g_environment.error);
  }
  auto tasks = std::make_shared<Tasks>(num_tasks, &task);
  const TaskThreads choice = g_choice.load(std::memory_order_relaxed);
  const bool adaptive = choice == TaskThreads::kAdaptive;
  const bool team = s.team_usable && (choice == TaskThreads::kTeam || (adaptive && s.choice.team_now(Clock::now())));
  if (team) {
    s.team_calls.fetch_add(1, std::memory_order_relaxed);
    const Clock::duration waited = run_on_team(*tasks, threads);
    if (waited >= kStall) s.team_stalls.fetch_add(1, std::memory_order_relaxed);
    const bool quiet = s.choice.record_team_call(waited, Clock::now());
    if (adaptive && quiet) s.quiet.hold_until(s.choice.quiet_until(), at::get_num_threads());
  } else {
    s.pool_calls.fetch_add(1, std::memory_order_relaxed);
    s.pool.run(tasks, static_cast<int>(threads - 1));
  }
  if (tasks->error) std::rethrow_exception(tasks->error);
}

void set_task_threads(TaskThreads choice) {
  g_choice.store(choice, std::memory_order_relaxed);
  g_choice_set.store(true, std::memory_order_relaxed);
  if (choice != TaskThreads::kAdaptive) state().quiet.release();  // only the adaptive choice quiets
}

TaskThreads task_threads() {
  return g_choice.load(std::memory_order_relaxed);
}

TaskCounts task_counts() {
  State& s = state();
  TaskCounts counts;
  counts.inline_calls = s.inline_calls.load(std::memory_order_relaxed);
  counts.team_calls = s.team_calls.load(std::memory_order_relaxed);
  counts.pool_calls = s.pool_calls.load(std::memory_order_relaxed);
  counts.team_stalls = s.team_stalls.load(std::memory_order_relaxed);
  counts.quiet_starts = s.quiet.starts();
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

bool hold_quiet_for_test(Clock::duration duration) {
  return state().quiet.hold_until(Clock::now() + duration, at::get_num_threads());
}

std::vector<std::pair<bool, bool>> replay_choices(const std::vector<std::pair<double, double>>& calls) {
  TaskChoice choice;
  std::vector<std::pair<bool, bool>> out;
  for (const auto& [time_ms, waited_us] : calls) {
    const Clock::time_point now{
        std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double, std::milli>(time_ms))};
    const bool team = choice.team_now(now);
    if (team) {
      choice.record_team_call(
          std::chrono::duration_cast<Clock::duration>(std::chrono::duration<double, std::micro>(waited_us)), now);
    }
    out.emplace_back(team, choice.quiet_now(now));
  }
  return out;
}

}  // namespace symkernels
