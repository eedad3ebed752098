// The CPU kernels' threads. A call's tasks are taken one at a time from a shared counter by the calling thread and
// up to at::get_num_threads() - 1 helpers, which come from one of two places:
// - the team: torch's intra-op threads (at::parallel_for; OpenMP in torch's builds). Right after torch's own
//   parallel work its idle OpenMP workers spin for milliseconds, so they join at once, where a sleeping thread of
//   ours would wait for a spinning one to leave the core. But a parallel region ends only when every member has
//   reached its end, so a member that the OS does not run (another process holds its core) keeps the caller
//   waiting although the tasks are done.
// - the pool: workers of our own that sleep on a condition variable when idle and are never waited for (one that
//   wakes after the tasks are gone has nothing to do), so a busy core delays only the task its worker holds.
// By default (adaptive) the team runs the calls until one waits at the region's end for a late member (a stall);
// the pool then runs them for a while (cpu_task_choice.h). When stalls keep coming back, another process holds a
// core, and torch's idle OpenMP workers, which spin after each of torch's own parallel regions, take the cores
// from the threads that work: they are quieted for a while (omp_quiet.h). SYMKERNELS_CPU_THREADS=team or pool
// (or set_task_threads) runs every call on one route and never quiets. A forked child uses the pool only: the
// OpenMP threads of the parent are gone there and its next parallel region may never end.
#pragma once

#include <chrono>
#include <cstdint>
#include <functional>
#include <string>
#include <utility>
#include <vector>

namespace symkernels {

// Runs task(t) for every t in [0, num_tasks) and returns when all have finished; rethrows the first exception a
// task threw. Runs every task on the calling thread when there is one task or one thread, inside a task, inside
// an at::parallel_for, or while another thread's call holds the helpers.
void parallel_tasks(int64_t num_tasks, const std::function<void(int64_t)>& task);

// Where parallel_tasks takes its helpers: kAdaptive (the default, above) or always the team or the pool.
enum class TaskThreads { kAdaptive, kTeam, kPool };
void set_task_threads(TaskThreads choice);
TaskThreads task_threads();

// parallel_tasks calls since the process started (a forked child starts at zero), by where their tasks ran, the
// team calls that stalled, and how many times libgomp's idle workers were quieted.
struct TaskCounts {
  int64_t inline_calls = 0;
  int64_t team_calls = 0;
  int64_t pool_calls = 0;
  int64_t team_stalls = 0;
  int64_t quiet_starts = 0;
};
TaskCounts task_counts();

// Test hooks (tests/ops/test_cpu_pool.py).
// The outcome of one parallel_tasks call over num_tasks tasks that each spin for task_us microseconds and then run
// parallel_tasks over nested_tasks inner tasks; task fail_task (none when out of range) throws after that.
struct TaskTrace {
  std::vector<int64_t> task_thread;    // a number naming the thread that ran each task (0: not run)
  std::vector<int64_t> nested_thread;  // the same for the inner tasks, task-major
  std::string error;                   // what parallel_tasks threw (empty: nothing)
};
TaskTrace trace_parallel_tasks(int64_t num_tasks, int64_t task_us, int64_t nested_tasks, int64_t fail_task);
// The adaptive choice for a sequence of calls (time in ms, and the wait in microseconds that the call would see
// at the team region's end): for each call, whether it ran on the team (its wait is recorded only then), and
// whether libgomp's idle workers are to be quiet after it.
std::vector<std::pair<bool, bool>> replay_choices(const std::vector<std::pair<double, double>>& calls);
// Quiets libgomp's idle workers for `duration`, as the adaptive choice does; false when that cannot work here.
bool hold_quiet_for_test(std::chrono::steady_clock::duration duration);

}  // namespace symkernels
