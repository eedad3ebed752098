// Quiets libgomp's idle workers (see omp_quiet.h).
#include "omp_quiet.h"

#include <algorithm>
#include <system_error>
#include <thread>

#ifdef _OPENMP
#include <omp.h>
#endif

namespace symkernels {

bool OmpQuiet::hold_until(Clock::time_point until, int torch_threads) {
#ifdef _OPENMP
  const int team_size = omp_get_num_procs() - torch_threads + 2;
  if (team_size > kMaxQuietTeam) return false;
  const std::lock_guard<std::mutex> guard(mutex_);
  until_ = std::max(until_, until);  // a parked thread reads it when its wait ends
  if (parked_) return true;
  try {
    // Detached: the object is never destroyed (cpu_pool.cpp keeps it for the process's life).
    std::thread([this, team_size] { park(team_size); }).detach();
  } catch (const std::system_error&) {
    return false;  // no more threads
  }
  parked_ = true;
  return true;
#else
  (void)until;
  (void)torch_threads;
  return false;
#endif
}

void OmpQuiet::release() {
  const std::lock_guard<std::mutex> guard(mutex_);
  until_ = Clock::time_point{};
  changed_.notify_all();
}

bool OmpQuiet::on() {
  const std::lock_guard<std::mutex> guard(mutex_);
  return parked_;
}

void OmpQuiet::park([[maybe_unused]] int team_size) {
  int got = 1;
#ifdef _OPENMP
  // The region's team stays with this thread, counted by libgomp, until the thread exits.
#pragma omp parallel num_threads(team_size)
  {
    if (omp_get_thread_num() == 0) got = omp_get_num_threads();
  }
#endif
  std::unique_lock<std::mutex> lock(mutex_);
  if (got == team_size) {
    starts_.fetch_add(1, std::memory_order_relaxed);
    while (Clock::now() < until_) changed_.wait_until(lock, until_);
  }
  parked_ = false;
}

int64_t OmpQuiet::starts() const {
  return starts_.load(std::memory_order_relaxed);
}

}  // namespace symkernels
