// The CPU kernels' threads. The calling thread and up to at::get_num_threads() - 1 pool workers take tasks one at
// a time from a shared counter, so a worker that the OS does not run (another process holds its core) delays only
// the task it holds, and a worker that wakes after the tasks are gone is not waited for; idle workers sleep on a
// condition variable instead of spinning (OpenMP's workers spin after each parallel region, which takes the core
// from the calling thread when the machine is busy).
#pragma once

#include <cstdint>
#include <functional>

namespace symkernels {

// Runs task(t) for every t in [0, num_tasks) and returns when all have finished; rethrows the first exception a
// task threw. Runs every task on the calling thread when there is one task or one thread, inside a task, inside
// an at::parallel_for, or while another thread's call holds the workers.
void parallel_tasks(int64_t num_tasks, const std::function<void(int64_t)>& task);

}  // namespace symkernels
