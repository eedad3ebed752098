// Launches of the CUDA kernel-expansion kernels (expansion_cuda.cuh). One small translation unit without ATen: one
// instantiation per kernel and layout of the conv weight, whatever the element types (read and written through
// cuda::load_element/store_element).
#include "expansion/expansion_cuda.cuh"
#include "expansion/expansion_cuda_launchers.h"

namespace symkernels::expansion_cuda {
namespace {

template <bool ChannelsLast>
cudaError_t launch_forward(const ExpansionArgs& args, const ExpansionPlan& plan, cudaStream_t stream) {
  if (plan.forward_ctas == 0) return cudaSuccess;
  expand_forward_kernel<ChannelsLast>
      <<<static_cast<unsigned>(plan.forward_ctas), kTileThreads, kForwardSharedBytes, stream>>>(
          args, static_cast<int>(plan.row_tiles), static_cast<int>(plan.column_tiles));
  return cudaGetLastError();
}

template <bool ChannelsLast>
cudaError_t launch_backward(const ExpansionArgs& args, const ExpansionPlan& plan, cudaStream_t stream) {
  if (plan.weight_ctas > 0) {
    expand_grad_weight_kernel<ChannelsLast>
        <<<static_cast<unsigned>(plan.weight_ctas), kTileThreads, kSharedBytes, stream>>>(
            args, static_cast<int>(plan.column_tiles));
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  if (args.learned == 0 || plan.reps_ctas == 0) return cudaSuccess;
  expand_grad_reps_kernel<ChannelsLast>
      <<<static_cast<unsigned>(plan.reps_ctas), kTileThreads, kSharedBytes, stream>>>(
          args, static_cast<int>(plan.column_tiles));
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess || args.splits <= 1) return error;
  expand_sum_partials_kernel<<<static_cast<unsigned>(plan.sum_ctas), kSumThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_expand_forward(const ExpansionArgs& args, const ExpansionPlan& plan, cudaStream_t stream) {
  return args.channels_last ? launch_forward<true>(args, plan, stream) : launch_forward<false>(args, plan, stream);
}

cudaError_t launch_expand_backward(const ExpansionArgs& args, const ExpansionPlan& plan, cudaStream_t stream) {
  return args.channels_last ? launch_backward<true>(args, plan, stream) : launch_backward<false>(args, plan, stream);
}

}  // namespace symkernels::expansion_cuda
