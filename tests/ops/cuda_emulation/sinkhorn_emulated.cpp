// The CUDA Sinkhorn kernels compiled for the host and run under cuda_emulation.h, with the launches the CUDA driver
// (csrc/sinkhorn/sinkhorn_cuda.cpp) makes, except that the cluster size and the rows of K kept in shared memory are
// chosen by the caller, to reach every path: clusters, shared-memory rows and rows in the global copy.
#define SYMKERNELS_CUDA_EMULATION
#include "cuda_emulation.h"
// (The emulation first: it stands in for the CUDA headers.)
#include "sinkhorn/sinkhorn_cuda_block_backward.cuh"
#include "sinkhorn/sinkhorn_cuda_block_forward.cuh"
#include "sinkhorn/sinkhorn_cuda_plan.h"
#include "sinkhorn/sinkhorn_cuda_small.cuh"
#include "sinkhorn_emulated.h"

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

}  // namespace

void emulated_forward(const ForwardArgs& a, const std::vector<int64_t>& sizes, const std::vector<int64_t>& counts,
                      const EmulatedLaunch& how) {
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

}  // namespace symkernels::sinkhorn_cuda
