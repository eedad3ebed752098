// The CUDA kernel-expansion kernels compiled for the host and run under cuda_emulation.h, with the launches of
// csrc/expansion/expansion_cuda_launchers.cu.
#define SYMKERNELS_CUDA_EMULATION
#include "cuda_emulation.h"
// (The emulation first: it stands in for the CUDA headers.)
#include "expansion/expansion_cuda.cuh"
#include "expansion_emulated.h"

namespace symkernels::expansion_cuda {
namespace {

template <bool ChannelsLast>
void forward(const ExpansionArgs& a, const ExpansionPlan& plan) {
  if (plan.forward_ctas == 0) return;
  emulation::launch(dim3(static_cast<unsigned>(plan.forward_ctas)), dim3(kTileThreads), kForwardSharedBytes, 1,
                    expand_forward_kernel<ChannelsLast>, a, static_cast<int>(plan.row_tiles),
                    static_cast<int>(plan.column_tiles));
}

template <bool ChannelsLast>
void backward(const ExpansionArgs& a, const ExpansionPlan& plan) {
  if (plan.weight_ctas > 0) {
    emulation::launch(dim3(static_cast<unsigned>(plan.weight_ctas)), dim3(kTileThreads), kSharedBytes, 1,
                      expand_grad_weight_kernel<ChannelsLast>, a, static_cast<int>(plan.column_tiles));
  }
  if (a.learned == 0 || plan.reps_ctas == 0) return;
  emulation::launch(dim3(static_cast<unsigned>(plan.reps_ctas)), dim3(kTileThreads), kSharedBytes, 1,
                    expand_grad_reps_kernel<ChannelsLast>, a, static_cast<int>(plan.column_tiles));
  if (a.splits > 1) {
    emulation::launch(dim3(static_cast<unsigned>(plan.sum_ctas)), dim3(kSumThreads), 0, 1,
                      expand_sum_partials_kernel, a);
  }
}

}  // namespace

void emulated_expand_forward(const ExpansionArgs& a, const ExpansionPlan& plan) {
  if (a.channels_last) {
    forward<true>(a, plan);
  } else {
    forward<false>(a, plan);
  }
}

void emulated_expand_backward(const ExpansionArgs& a, const ExpansionPlan& plan) {
  if (a.channels_last) {
    backward<true>(a, plan);
  } else {
    backward<false>(a, plan);
  }
}

}  // namespace symkernels::expansion_cuda
