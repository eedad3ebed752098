// The emulated CUDA Sinkhorn kernels (sinkhorn_emulated.cpp), callable without the emulation header.
#pragma once

#include <cstdint>
#include <vector>

#include "sinkhorn/sinkhorn_cuda.h"

namespace symkernels::sinkhorn_cuda {

// How block launches run: CTAs per cluster, rows of K per CTA in shared memory (the rest past the register rows
// go to the global copy).
struct EmulatedLaunch {
  int cluster;
  int shared_rows;
  std::vector<int64_t> blocks;  // the blocks (clusters, by their first block) to run; empty: all
};

void emulated_forward(const ForwardArgs& args, const std::vector<int64_t>& sizes, const std::vector<int64_t>& counts,
                      const EmulatedLaunch& how);
void emulated_backward(const BackwardArgs& args, const std::vector<int64_t>& sizes,
                       const std::vector<int64_t>& counts, const EmulatedLaunch& how);
int64_t emulated_block_rows(const std::vector<int64_t>& sizes, const std::vector<int64_t>& counts);

// One planned call of plan_block_calls: the launch, and what the driver was asked so far (over every call).
struct PlannedCall {
  BlockLaunch launch;
  int limit_raises;         // allow_shared_bytes calls
  int64_t limit_bytes;      // the last limit set (0: none)
  int fit_queries;          // cluster_fits calls
};

// Plans the block launches of `calls` ((device index, max n, matrices) each) through one BlockPlanCache of `pass`,
// as the CUDA entry points do (a driver per call), with a driver that counts its questions and lets clusters of up
// to `max_cluster` CTAs fit; every device has `device`'s limits.
std::vector<PlannedCall> plan_block_calls(const std::vector<std::vector<int64_t>>& calls, BlockPass pass,
                                          const DeviceInfo& device, int max_cluster);

}  // namespace symkernels::sinkhorn_cuda
