// Quiets libgomp's idle workers for a while: they sleep after a hundred spins instead of spinning for milliseconds
// after every parallel region. libgomp spins that briefly whenever it manages more threads than there are CPUs,
// so a thread of ours that has run a parallel region, and so keeps a libgomp team of its own, tips it over while
// it lives. The effect is that of OMP_WAIT_POLICY=PASSIVE on the whole process (torch's threads included), but
// only while asked. It needs a team of omp_get_num_procs() - torch's threads + 2 threads: refused (hold_until
// returns false) when that is more than kMaxQuietTeam, when torch leaves CPUs free; it does nothing with another
// OpenMP runtime (the parked team just sleeps) and is refused without OpenMP.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <mutex>

#include "cpu_task_choice.h"

namespace symkernels {

constexpr int kMaxQuietTeam = 4;

class OmpQuiet {
 public:
  // Quiets until `until` (extending a quiet that runs) for a process whose torch uses `torch_threads` threads.
  bool hold_until(Clock::time_point until, int torch_threads);
  // Ends the quiet now.
  void release();
  bool on();
  // Quiets that began (the parked team got all its threads).
  int64_t starts() const;

 private:
  void park(int team_size);

  std::mutex mutex_;
  std::condition_variable changed_;
  Clock::time_point until_{};
  bool parked_ = false;  // the thread that holds the team runs
  std::atomic<int64_t> starts_{0};
};

}  // namespace symkernels
