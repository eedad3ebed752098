// The CUDA Sinkhorn kernels compiled for the host and run under cuda_emulation.h, with the launches the CUDA driver
// (csrc/sinkhorn/sinkhorn_cuda.cpp) makes, except that the cluster size and the rows of K kept in shared memory are
// chosen by the caller, to reach every path: clusters, shared-memory rows and rows in the global copy.
#define SYMKERNELS_CUDA_EMULATION
#include "cuda_emulation.h"
// (The emulation first: it stands in for the CUDA headers.)
#include "sinkhorn/sinkhorn_cuda_block_backward.cuh"
#include "sinkhorn/sinkhorn_cuda_block_forward.cuh"
#include "sinkhorn/sinkhorn_cuda_block_plan.h"
#include "sinkhorn/sinkhorn_cuda_plan.h"
#include "sinkhorn/sinkhorn_cuda_small.cuh"
#include "sinkhorn_emulated.h"

#include <algorithm>

namespace symkernels::sinkhorn_cuda {
namespace {

template <int S>
void small_forward(const ForwardArgs& a, const StackTable& t) {
  const unsigned blocks = static_cast<unsigned>((int64_t{t.num_units} * S + kSmallThreads - 1) / kSmallThreads);
  emulation::launch(dim3(blocks), dim3(kSmallThreads), 0, 1, small_forward_kernel<S>, a, t);
}

template <int S>
void small_backward(const BackwardArgs& a, const StackTable& t) {
  const unsigned blocks = static_cast<unsigned>((int64_t{t.num_units} * S + kSmallThreads - 1) / kSmallThreads);
  emulation::launch(dim3(blocks), dim3(kSmallThreads), 0, 1, small_backward_kernel<S>, a, t);
}

template <int CT, BlockPass Pass, class Args, class Kernel>
void block(Kernel kernel, const Args& a, const StackTable& t, int64_t max_n, const EmulatedLaunch& how) {
  constexpr BlockShape shape = block_shape_of_width(CT, Pass);
  const BlockSharedLayout fixed = block_shared_layout(max_n, shape.warps, how.cluster, 0);
  const int64_t bytes = fixed.kernel_rows + int64_t{how.shared_rows} * fixed.padded_n * 4;
  const BlockLaunch launch{how.cluster, static_cast<int32_t>(bytes)};
  emulation::launch(dim3(static_cast<unsigned>(t.num_units * how.cluster)), dim3(32 * shape.warps),
                    static_cast<size_t>(bytes), how.cluster, kernel, a, t, launch);
}

template <int CT>
void block_forward(const ForwardArgs& a, const StackTable& t, int64_t max_n, const EmulatedLaunch& how) {
  constexpr BlockShape shape = block_shape_of_width(CT, BlockPass::kForward);
  block<CT, BlockPass::kForward>(block_forward_kernel<CT, shape.warps, shape.register_rows>, a, t, max_n, how);
}

template <int CT>
void block_backward(const BackwardArgs& a, const StackTable& t, int64_t max_n, const EmulatedLaunch& how) {
  constexpr BlockShape shape = block_shape_of_width(CT, BlockPass::kBackward);
  block<CT, BlockPass::kBackward>(block_backward_kernel<CT, shape.warps, shape.register_rows>, a, t, max_n, how);
}

// Runs only how.blocks of every launch while it lives (all of them when empty).
class BlockSelection {
 public:
  explicit BlockSelection(const std::vector<int64_t>& blocks) {
    if (blocks.empty()) return;
    emulation::cluster_filter() = [blocks](unsigned first) {
      return std::find(blocks.begin(), blocks.end(), static_cast<int64_t>(first)) != blocks.end();
    };
  }
  ~BlockSelection() { emulation::cluster_filter() = nullptr; }
};

}  // namespace

void emulated_forward(const ForwardArgs& a, const std::vector<int64_t>& sizes, const std::vector<int64_t>& counts,
                      const EmulatedLaunch& how) {
  const BlockSelection selection(how.blocks);
  const CallPlan plan = plan_call(sizes, counts);
  for (const LaunchGroup& g : plan.launches) {
    if (g.small) {
      switch (g.width) {
        case 2: small_forward<2>(a, g.table); break;
        case 4: small_forward<4>(a, g.table); break;
        case 8: small_forward<8>(a, g.table); break;
        case 16: small_forward<16>(a, g.table); break;
        default: small_forward<32>(a, g.table); break;
      }
    } else {
      switch (g.width) {
        case 2: block_forward<2>(a, g.table, g.max_n, how); break;
        case 4: block_forward<4>(a, g.table, g.max_n, how); break;
        case 8: block_forward<8>(a, g.table, g.max_n, how); break;
        case 16: block_forward<16>(a, g.table, g.max_n, how); break;
        default: block_forward<32>(a, g.table, g.max_n, how); break;
      }
    }
  }
}

void emulated_backward(const BackwardArgs& a, const std::vector<int64_t>& sizes, const std::vector<int64_t>& counts,
                       const EmulatedLaunch& how) {
  const BlockSelection selection(how.blocks);
  const CallPlan plan = plan_call(sizes, counts);
  for (const LaunchGroup& g : plan.launches) {
    if (g.small) {
      switch (g.width) {
        case 2: small_backward<2>(a, g.table); break;
        case 4: small_backward<4>(a, g.table); break;
        case 8: small_backward<8>(a, g.table); break;
        case 16: small_backward<16>(a, g.table); break;
        default: small_backward<32>(a, g.table); break;
      }
    } else {
      switch (g.width) {
        case 2: block_backward<2>(a, g.table, g.max_n, how); break;
        case 4: block_backward<4>(a, g.table, g.max_n, how); break;
        case 8: block_backward<8>(a, g.table, g.max_n, how); break;
        case 16: block_backward<16>(a, g.table, g.max_n, how); break;
        default: block_backward<32>(a, g.table, g.max_n, how); break;
      }
    }
  }
}

int64_t emulated_block_rows(const std::vector<int64_t>& sizes, const std::vector<int64_t>& counts) {
  return plan_call(sizes, counts).block_rows;
}

namespace {

struct CountingDriver final : BlockDriver {
  PlannedCall* counts;
  const DeviceInfo* device;
  int max_cluster;

  bool allow_shared_bytes(int64_t bytes) override {
    ++counts->limit_raises;
    counts->limit_bytes = bytes;
    return bytes <= device->max_shared_bytes;
  }
  bool cluster_fits(const BlockShape&, int cluster, int64_t bytes) override {
    ++counts->fit_queries;
    return cluster <= max_cluster && bytes <= counts->limit_bytes;  // a launch past the kernel's limit fails
  }
};

}  // namespace

std::vector<PlannedCall> plan_block_calls(const std::vector<std::vector<int64_t>>& calls, BlockPass pass,
                                          const DeviceInfo& device, int max_cluster) {
  BlockPlanCache cache(pass);
  PlannedCall counts{{0, 0}, 0, 0, 0};
  std::vector<PlannedCall> planned;
  for (const std::vector<int64_t>& call : calls) {
    DeviceInfo on = device;
    on.index = static_cast<int>(call.at(0));
    CountingDriver driver;
    driver.counts = &counts;
    driver.device = &on;
    driver.max_cluster = max_cluster;
    counts.launch = cache.plan(driver, call.at(1), call.at(2), on);
    planned.push_back(counts);
  }
  return planned;
}

}  // namespace symkernels::sinkhorn_cuda
