// How a block Sinkhorn kernel is launched for a call (cluster size and shared memory per CTA), planned once per
// device, kernel and shape class and kept. Plain C++ (host only, no CUDA headers): the questions planning asks
// the driver go through a BlockDriver, which sinkhorn_cuda_block_launch.cuh implements with the CUDA runtime and
// the CPU tests (tests/ops/cuda_emulation) with a fake that counts them.
//
// Planning is kept out of the launch path: a call looks its plan up (a map under a mutex), and the driver is asked
// only the first time a (device, kernel, max n, matrices class) is seen. That first time also raises the kernel's
// dynamic shared memory limit, once, to the device's maximum: a limit set to each launch's own bytes would be lowered
// by a smaller launch under a graph captured with a larger one.
#pragma once

#include <cstdint>
#include <map>
#include <mutex>
#include <set>
#include <tuple>

#include "sinkhorn/sinkhorn_cuda.h"

namespace symkernels::sinkhorn_cuda {

// What planning asks the driver about one kernel on the current device.
class BlockDriver {
 public:
  virtual ~BlockDriver() = default;
  // Allows the kernel launches with up to `bytes` of dynamic shared memory; false if the driver refuses.
  virtual bool allow_shared_bytes(int64_t bytes) = 0;
  // Whether the device can run clusters of `cluster` CTAs of the kernel with `bytes` of shared memory each.
  virtual bool cluster_fits(const BlockShape& shape, int cluster, int64_t bytes) = 0;
};

// The dynamic shared memory of a CTA for matrices of up to max_n over `cluster` CTAs: the fixed part, and the rows
// past the register rows as far as the device allows.
inline int64_t block_shared_bytes(const BlockShape& shape, int64_t max_n, int cluster, const DeviceInfo& device) {
  const BlockSharedLayout s = block_shared_layout(max_n, shape.warps, cluster, 0);
  const int64_t rows = s.rows - static_cast<int64_t>(shape.register_rows) * shape.warps;
  const int64_t wanted = s.kernel_rows + (rows > 0 ? rows : 0) * s.padded_n * 4;
  return wanted < device.max_shared_bytes ? wanted : device.max_shared_bytes;
}

// Clusters (Hopper and later) serve two ends: few matrices are spread over more multiprocessors (at least two rows
// per warp), and large ones over more shared memory (rows that do not fit on chip are read from L2 at every pass).
// Capped at the portable cluster size; the largest cluster the driver says fits.
inline BlockLaunch plan_block(BlockDriver& driver, const BlockShape& shape, int64_t max_n, int64_t matrices,
                              const DeviceInfo& device) {
  int cluster = 1;
  if (device.major >= 9) {
    auto rows_per_cta = [&](int c) { return (max_n + c - 1) / c; };
    while (cluster < kMaxCluster && matrices * cluster * 2 <= device.multiprocessors &&
           rows_per_cta(2 * cluster) >= 2 * shape.warps) {
      cluster *= 2;
    }
    auto overflows = [&](int c) {
      const BlockLaunch launch{c, static_cast<int32_t>(block_shared_bytes(shape, max_n, c, device))};
      return block_rows_overflow(max_n, shape, launch);
    };
    while (cluster < kMaxCluster && overflows(cluster)) cluster *= 2;
    while (cluster > 1 && !driver.cluster_fits(shape, cluster, block_shared_bytes(shape, max_n, cluster, device))) {
      cluster /= 2;
    }
  }
  return {cluster, static_cast<int32_t>(block_shared_bytes(shape, max_n, cluster, device))};
}

// The plans of one pass's block kernels, per (device, width CT, max n, matrices class). The matrices only count up
// to the multiprocessors (more never grow a cluster), so the classes are few.
class BlockPlanCache {
 public:
  explicit BlockPlanCache(BlockPass pass) : pass_(pass) {}

  // The launch for `matrices` matrices of sizes up to max_n on `device`; `driver` (for the kernel of width
  // block_width(max_n) on that device, current) is asked only when this is the first call of its class.
  BlockLaunch plan(BlockDriver& driver, int64_t max_n, int64_t matrices, const DeviceInfo& device) {
    const int width = block_width(max_n);
    const int64_t matrices_class = matrices < device.multiprocessors ? matrices : device.multiprocessors;
    const Key key{device.index, width, max_n, matrices_class};
    const std::lock_guard<std::mutex> lock(mutex_);
    const auto found = plans_.find(key);
    if (found != plans_.end()) return found->second;
    const auto kernel = std::make_pair(device.index, width);
    if (prepared_.count(kernel) == 0) {
      if (!driver.allow_shared_bytes(device.max_shared_bytes)) return {0, 0};  // not kept: the caller reports it
      prepared_.insert(kernel);
    }
    const BlockLaunch launch = plan_block(driver, block_shape_of_width(width, pass_), max_n, matrices_class, device);
    plans_.emplace(key, launch);
    return launch;
  }

 private:
  using Key = std::tuple<int, int, int64_t, int64_t>;
  BlockPass pass_;
  std::mutex mutex_;
  std::map<Key, BlockLaunch> plans_;
  std::set<std::pair<int, int>> prepared_;  // (device, CT) whose shared memory limit is raised
};

}  // namespace symkernels::sinkhorn_cuda
