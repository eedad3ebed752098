// The adaptive choice of the CPU kernels' helper threads (cpu_pool.h): torch's intra-op threads (the team) or the
// library's pool for each call, and when to quiet libgomp's idle workers (omp_quiet.h), from the stalls of the team
// calls. Pure logic: the caller passes the time, so that tests can replay it.
#pragma once

#include <algorithm>
#include <chrono>

namespace symkernels {

using Clock = std::chrono::steady_clock;

// A team call stalled when it waited this long after its last task had finished for a member to reach the
// region's end. A member that was spinning arrives within microseconds and one that slept within tens; one whose
// core another process holds waits for the scheduler to run it, milliseconds.
constexpr Clock::duration kStall = std::chrono::microseconds(200);
// After a stall the pool runs the calls for kFirstBackoff; when the team stalls again within kStallMemory of
// getting them back, for twice as long as the last time, up to kMaxBackoff. A stall costs milliseconds and a team
// call gains tens of microseconds, so the team is tried again only rarely while stalls keep coming.
constexpr Clock::duration kFirstBackoff = std::chrono::milliseconds(200);
constexpr Clock::duration kMaxBackoff = std::chrono::milliseconds(2000);
constexpr Clock::duration kStallMemory = std::chrono::milliseconds(1000);
// A stall that comes back (within kStallMemory) means another process holds a core, and then torch's own idle
// OpenMP workers, spinning after every parallel region, take the cores from the threads that do the work: they
// are quieted for kFirstQuiet, twice as long as the last time when that ended less than kQuietMemory ago, up to
// kMaxQuiet. Each end of a quiet tries the default again, at the price of a few stalls.
constexpr Clock::duration kFirstQuiet = std::chrono::seconds(10);
constexpr Clock::duration kMaxQuiet = std::chrono::seconds(320);
constexpr Clock::duration kQuietMemory = std::chrono::seconds(60);

class TaskChoice {
 public:
  bool team_now(Clock::time_point now) const { return now >= pool_until_; }

  bool quiet_now(Clock::time_point now) const { return quieted_before_ && now < quiet_until_; }

  // Records a team call that waited `waited` at the region's end. Returns true when the quiet starts or is
  // extended: it then lasts until quiet_until().
  bool record_team_call(Clock::duration waited, Clock::time_point now) {
    if (waited < kStall) return false;
    const bool again = stalled_before_ && now - pool_until_ < kStallMemory;
    backoff_ = again ? std::min(2 * backoff_, kMaxBackoff) : kFirstBackoff;
    pool_until_ = now + backoff_;
    stalled_before_ = true;
    if (!again) return false;
    const bool quiet_again = quieted_before_ && now - quiet_until_ < kQuietMemory;
    quiet_backoff_ = quiet_again ? std::min(2 * quiet_backoff_, kMaxQuiet) : kFirstQuiet;
    quiet_until_ = now + quiet_backoff_;
    quieted_before_ = true;
    return true;
  }

  Clock::time_point quiet_until() const { return quiet_until_; }

 private:
  Clock::time_point pool_until_{};
  Clock::duration backoff_ = kFirstBackoff;
  bool stalled_before_ = false;
  Clock::time_point quiet_until_{};
  Clock::duration quiet_backoff_ = kFirstQuiet;
  bool quieted_before_ = false;
};

}  // namespace symkernels
