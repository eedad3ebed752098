// The CUDA built-ins the symkernels kernels use, emulated on the host so that their logic runs in CPU tests: every
// CUDA thread is a fiber (ucontext), the fibers of a thread-block cluster run interleaved on one OS thread, and they
// switch only at synchronisation points (__syncthreads, cluster barriers, warp collectives). Shared memory starts as
// NaN bytes; the CTAs of a cluster see each other's shared memory as distributed shared memory does.
//
// Stricter than the hardware where that finds bugs: every lane of a warp must reach a collective from the same call
// site, every thread of a block the same __syncthreads; a launch in which every fiber waits at a barrier that cannot
// complete fails with the barrier's description instead of hanging; expf is off by its worst error. It cannot find data races (fibers switch only
// at barriers), nor anything about performance.
//
// Define SYMKERNELS_CUDA_EMULATION and include this header before the kernels' headers; launch kernels with
// emulation::launch.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <sys/mman.h>
#include <ucontext.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <functional>
#include <stdexcept>
#include <string>
#include <vector>

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline __attribute__((always_inline))
#define __launch_bounds__(...)
#define __align__(n) alignas(n)

struct dim3 {
  unsigned x, y, z;
  dim3(unsigned x_ = 1, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

using __half = c10::Half;
using __nv_bfloat16 = c10::BFloat16;
inline float __half2float(__half h) { return static_cast<float>(h); }
inline __half __float2half_rn(float f) { return __half(f); }
inline float __bfloat162float(__nv_bfloat16 h) { return static_cast<float>(h); }
inline __nv_bfloat16 __float2bfloat16_rn(float f) { return __nv_bfloat16(f); }
using std::isfinite;

// CUDA's expf (without --use_fast_math) at its documented worst error, 2 ulps (CUDA C Programming Guide),
// moved up or down by a hash of x, where the kernels' unqualified calls find it: they must meet the accuracy
// bound with it, or not call it.
namespace symkernels {
inline float expf(float x) {
  float value = static_cast<float>(std::exp(static_cast<double>(x)));
  if (!std::isfinite(value) || value == 0.f) return value;
  uint32_t hash;
  std::memcpy(&hash, &x, sizeof(hash));
  hash *= 2654435761u;
  hash ^= hash >> 15;
  const float toward = (hash >> 7) & 1 ? INFINITY : -INFINITY;
  return std::nextafter(std::nextafter(value, toward), toward);
}
}  // namespace symkernels

namespace emulation {

struct Barrier {
  int expected = 0;
  int arrived = 0;
  uint64_t generation = 0;
  const void* site = nullptr;
  const char* what = "";
};

struct Thread {
  ucontext_t context;
  char* stack = nullptr;
  bool done = false;
  dim3 thread_idx;
  dim3 block_idx;
  int block_in_cluster = 0;  // also the cluster rank
  int warp = 0;              // in the cluster
  int lane = 0;
};

struct Launch {
  dim3 grid_dim;
  dim3 block_dim;
  int cluster = 1;
  std::vector<Thread> threads;
  std::vector<std::vector<unsigned char>> shared;  // per block of the cluster
  std::vector<Barrier> block_barriers;
  std::vector<Barrier> warp_barriers;
  std::vector<uint64_t> warp_slots;  // [warps, 32]
  Barrier cluster_barrier;
  ucontext_t scheduler;
  int current = 0;
  uint64_t progress = 0;
  std::string error;
  std::function<void()> body;
};

inline Launch*& active() {
  static Launch* launch = nullptr;
  return launch;
}

inline Thread& current() { return active()->threads[active()->current]; }
inline Launch& launch_state() { return *active(); }

[[noreturn]] inline void fail(const std::string& message) {
  Launch& l = launch_state();
  if (l.error.empty()) l.error = message;
  current().done = true;
  setcontext(&l.scheduler);
  std::abort();  // unreachable
}

inline void yield() {
  Launch& l = launch_state();
  swapcontext(&current().context, &l.scheduler);
  if (!l.error.empty()) fail(l.error);
}

inline void arrive_and_wait(Barrier& b, const void* site) {
  Launch& l = launch_state();
  if (b.arrived == 0) {
    b.site = site;
  } else if (b.site != site) {
    char where[160];
    std::snprintf(where, sizeof(where), " (block %u thread %u at %p, others at %p)", current().block_idx.x,
                  current().thread_idx.x, site, b.site);
    fail(std::string("threads reached different call sites of one ") + b.what + where);
  }
  ++l.progress;
  const uint64_t generation = b.generation;
  if (++b.arrived == b.expected) {
    b.arrived = 0;
    ++b.generation;
    return;
  }
  while (b.generation == generation) yield();
}

inline unsigned char* dynamic_shared_memory() { return launch_state().shared[current().block_in_cluster].data(); }

inline int cluster_rank() { return current().block_in_cluster; }

__attribute__((noinline)) inline void cluster_sync() {
  arrive_and_wait(launch_state().cluster_barrier, __builtin_return_address(0));
}

template <typename T>
T* cluster_peer(T* local, int rank) {
  Launch& l = launch_state();
  if (rank < 0 || rank >= l.cluster) fail("cluster_peer: rank " + std::to_string(rank) + " outside the cluster");
  const unsigned char* own = l.shared[current().block_in_cluster].data();
  const auto offset = reinterpret_cast<const unsigned char*>(local) - own;
  if (offset < 0 || offset >= static_cast<std::ptrdiff_t>(l.shared[rank].size())) {
    fail("cluster_peer: the address is not in the CTA's shared memory");
  }
  return reinterpret_cast<T*>(l.shared[rank].data() + offset);
}

// Every lane of the warp contributes `value` and gets the values of all lanes.
template <typename T>
void warp_exchange(unsigned mask, T value, T (&all)[32], const void* site) {
  static_assert(sizeof(T) <= 8, "warp collectives of at most 8 bytes");
  if (mask != 0xffffffffu) fail("warp collectives are emulated for the full mask only");
  Launch& l = launch_state();
  Thread& t = current();
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  uint64_t* slots = &l.warp_slots[static_cast<size_t>(t.warp) * 32];
  slots[t.lane] = bits;
  arrive_and_wait(l.warp_barriers[t.warp], site);
  for (int lane = 0; lane < 32; ++lane) std::memcpy(&all[lane], &slots[lane], sizeof(T));
  arrive_and_wait(l.warp_barriers[t.warp], site);
}

inline void trampoline() {
  Launch& l = launch_state();
  l.body();
  current().done = true;
  ++l.progress;
  swapcontext(&current().context, &l.scheduler);
}

constexpr size_t kStackBytes = 1 << 18;

// Which clusters of a launch run, by their first block (all when empty): a test of a grid too large to emulate
// whole runs a few of its blocks, the first and last among them.
inline std::function<bool(unsigned)>& cluster_filter() {
  static std::function<bool(unsigned)> filter;
  return filter;
}

// Runs kernel(args...) on a grid of `grid` blocks of `block` threads, `cluster` consecutive blocks per cluster, with
// `shared_bytes` of dynamic shared memory per block. Throws std::runtime_error on a failure inside the kernel.
template <class Kernel, class... Args>
void launch(dim3 grid, dim3 block, size_t shared_bytes, int cluster, Kernel kernel, const Args&... args) {
  if (block.y != 1 || block.z != 1 || grid.y != 1 || grid.z != 1) throw std::runtime_error("1-D launches only");
  if (block.x % 32 != 0) throw std::runtime_error("blocks of whole warps only");
  if (cluster < 1 || grid.x % cluster != 0) throw std::runtime_error("the grid must be whole clusters");
  Launch l;
  l.grid_dim = grid;
  l.block_dim = block;
  l.cluster = cluster;
  const int threads = static_cast<int>(block.x) * cluster;
  l.threads.resize(threads);
  for (Thread& t : l.threads) {
    t.stack = static_cast<char*>(
        mmap(nullptr, kStackBytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0));
    if (t.stack == MAP_FAILED) throw std::runtime_error("cannot map a fiber stack");
  }
  l.body = [&] { kernel(args...); };
  Launch* previous = active();
  active() = &l;
  std::string error;
  for (unsigned first = 0; first < grid.x && error.empty(); first += cluster) {
    if (cluster_filter() && !cluster_filter()(first)) continue;
    l.shared.assign(cluster, std::vector<unsigned char>(shared_bytes, 0xff));
    l.block_barriers.assign(cluster, Barrier{static_cast<int>(block.x), 0, 0, nullptr, "__syncthreads"});
    l.warp_barriers.assign(threads / 32, Barrier{32, 0, 0, nullptr, "warp collective"});
    l.warp_slots.assign(static_cast<size_t>(threads), 0);
    l.cluster_barrier = Barrier{threads, 0, 0, nullptr, "cluster barrier"};
    for (int i = 0; i < threads; ++i) {
      Thread& t = l.threads[i];
      t.done = false;
      t.block_in_cluster = i / static_cast<int>(block.x);
      t.thread_idx = dim3(static_cast<unsigned>(i % static_cast<int>(block.x)));
      t.block_idx = dim3(first + static_cast<unsigned>(t.block_in_cluster));
      t.warp = i / 32;
      t.lane = i % 32;
      getcontext(&t.context);
      t.context.uc_stack.ss_sp = t.stack;
      t.context.uc_stack.ss_size = kStackBytes;
      t.context.uc_link = nullptr;
      makecontext(&t.context, trampoline, 0);
    }
    int alive = threads;
    while (alive > 0 && l.error.empty()) {
      const uint64_t before = l.progress;
      for (int i = 0; i < threads && l.error.empty(); ++i) {
        if (l.threads[i].done) continue;
        l.current = i;
        swapcontext(&l.scheduler, &l.threads[i].context);
        if (l.threads[i].done) --alive;
      }
      if (alive > 0 && l.progress == before && l.error.empty()) {
        std::string waiting;
        for (const Barrier& b : l.block_barriers) waiting += b.arrived ? " __syncthreads" : "";
        for (const Barrier& b : l.warp_barriers) waiting += b.arrived ? " warp-collective" : "";
        waiting += l.cluster_barrier.arrived ? " cluster-barrier" : "";
        l.error = "deadlock: every thread waits at a barrier that cannot complete (" + waiting + " )";
      }
    }
    error = l.error;
  }
  active() = previous;
  for (Thread& t : l.threads) munmap(t.stack, kStackBytes);
  if (!error.empty()) throw std::runtime_error("emulated kernel: " + error);
}

}  // namespace emulation

#define threadIdx (::emulation::current().thread_idx)
#define blockIdx (::emulation::current().block_idx)
#define blockDim (::emulation::launch_state().block_dim)
#define gridDim (::emulation::launch_state().grid_dim)

__attribute__((noinline)) inline void __syncthreads() {
  emulation::arrive_and_wait(emulation::launch_state().block_barriers[emulation::current().block_in_cluster],
                             __builtin_return_address(0));
}

template <typename T>
__attribute__((noinline)) T __shfl_xor_sync(unsigned mask, T value, int lane_mask, int width = 32) {
  T all[32];
  emulation::warp_exchange(mask, value, all, __builtin_return_address(0));
  if (width != 32) emulation::fail("__shfl_xor_sync is emulated for width 32 only");
  return all[emulation::current().lane ^ lane_mask];
}

__attribute__((noinline)) inline int __any_sync(unsigned mask, int predicate) {
  int all[32];
  emulation::warp_exchange(mask, predicate ? 1 : 0, all, __builtin_return_address(0));
  int any = 0;
  for (int v : all) any |= v;
  return any;
}

__attribute__((noinline)) inline int __all_sync(unsigned mask, int predicate) {
  int all[32];
  emulation::warp_exchange(mask, predicate ? 1 : 0, all, __builtin_return_address(0));
  int every = 1;
  for (int v : all) every &= v;
  return every;
}
