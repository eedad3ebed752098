// The CPU kernels' threads (see cpu_pool.h).
#include "cpu_pool.h"

#include <ATen/Parallel.h>

#include <algorithm>
#include <atomic>
#include <condition_variable>
#include <exception>
#include <memory>
#include <mutex>
#include <system_error>
#include <thread>

#ifndef _WIN32
#include <pthread.h>
#endif

namespace symkernels {
namespace {

thread_local bool t_in_task = false;

// One call's tasks, shared by the caller and the workers that join it. `task` is only called for a claimed index
// below num_tasks, and the caller returns only once every task has finished, so it outlives every call; a worker
// that joins after the last task was claimed touches nothing but the counter.
struct Job {
  Job(int64_t num_tasks_in, const std::function<void(int64_t)>* task_in) : num_tasks(num_tasks_in), task(task_in) {}

  const int64_t num_tasks;
  const std::function<void(int64_t)>* const task;
  std::atomic<int64_t> next{0};
  std::atomic<int64_t> finished{0};
  std::mutex mutex;  // guards error and the caller's wait
  std::condition_variable all_finished;
  std::exception_ptr error;
};

// Takes tasks until none is left.
void work(Job& job) {
  for (;;) {
    const int64_t t = job.next.fetch_add(1, std::memory_order_relaxed);
    if (t >= job.num_tasks) return;
    t_in_task = true;
    try {
      (*job.task)(t);
    } catch (...) {
      const std::lock_guard<std::mutex> guard(job.mutex);
      if (!job.error) job.error = std::current_exception();
    }
    t_in_task = false;
    if (job.finished.fetch_add(1, std::memory_order_acq_rel) + 1 == job.num_tasks) {
      const std::lock_guard<std::mutex> guard(job.mutex);
      job.all_finished.notify_all();
    }
  }
}

class Pool {
 public:
  // Runs the job with up to `helpers` workers; false (nothing run) while another caller holds the workers.
  bool run(Job& job, const std::shared_ptr<Job>& shared, int helpers) {
    {
      const std::lock_guard<std::mutex> guard(mutex_);
      if (busy_) return false;
      busy_ = true;
      start_workers(helpers);
      offer_ = shared;
      wanted_ = std::min(helpers, workers_);
    }
    for (int i = 0; i < helpers; ++i) wake_.notify_one();
    work(job);
    {
      std::unique_lock<std::mutex> lock(job.mutex);
      job.all_finished.wait(lock, [&] { return job.finished.load(std::memory_order_acquire) == job.num_tasks; });
    }
    const std::lock_guard<std::mutex> guard(mutex_);
    offer_.reset();
    wanted_ = 0;
    busy_ = false;
    return true;
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
      std::shared_ptr<Job> job = offer_;
      lock.unlock();
      work(*job);
      job.reset();
      lock.lock();
    }
  }

  std::mutex mutex_;
  std::condition_variable wake_;
  std::shared_ptr<Job> offer_;  // the running call's job
  int wanted_ = 0;              // workers the running call still wants
  int workers_ = 0;
  bool busy_ = false;  // a call is running
};

std::atomic<Pool*> g_pool{nullptr};

// A forked child has none of the parent's workers, and the parent's pool may be locked forever there: the child
// starts a pool of its own and leaves the old one alone.
void new_pool_after_fork() {
  g_pool.store(new Pool(), std::memory_order_relaxed);
}

Pool& pool() {
  static const bool started = [] {
    g_pool.store(new Pool(), std::memory_order_relaxed);
#ifndef _WIN32
    pthread_atfork(nullptr, nullptr, &new_pool_after_fork);
#endif
    return true;
  }();
  (void)started;
  return *g_pool.load(std::memory_order_relaxed);
}

void run_here(int64_t num_tasks, const std::function<void(int64_t)>& task) {
  for (int64_t t = 0; t < num_tasks; ++t) task(t);
}

}  // namespace

void parallel_tasks(int64_t num_tasks, const std::function<void(int64_t)>& task) {
  const int64_t helpers = std::min<int64_t>(at::get_num_threads() - 1, num_tasks - 1);
  if (helpers <= 0 || t_in_task || at::in_parallel_region()) {
    run_here(num_tasks, task);
    return;
  }
  auto job = std::make_shared<Job>(num_tasks, &task);
  if (!pool().run(*job, job, static_cast<int>(helpers))) {
    run_here(num_tasks, task);
    return;
  }
  if (job->error) std::rethrow_exception(job->error);
}

}  // namespace symkernels
