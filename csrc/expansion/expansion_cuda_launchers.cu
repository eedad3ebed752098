// Launches of the CUDA kernel-expansion kernels (expansion_cuda.cuh). One small translation unit without ATen: one
// instantiation per kernel, whatever the element type (read and written through cuda::load_element/store_element).
#include "expansion/expansion_cuda.cuh"
#include "expansion/expansion_cuda_launchers.h"

namespace symkernels::expansion_cuda {

cudaError_t launch_expand_forward(const ExpansionArgs& args, const ExpansionPlan& plan, cudaStream_t stream) {
  if (plan.forward_ctas == 0) return cudaSuccess;
  expand_forward_kernel<<<static_cast<unsigned>(plan.forward_ctas), kTileThreads, kSharedBytes, stream>>>(
      args, static_cast<int>(plan.row_tiles), static_cast<int>(plan.column_tiles));
  return cudaGetLastError();
}

cudaError_t launch_expand_backward(const ExpansionArgs& args, const ExpansionPlan& plan, cudaStream_t stream) {
  if (plan.weight_ctas > 0) {
    expand_grad_weight_kernel<<<static_cast<unsigned>(plan.weight_ctas), kTileThreads, kSharedBytes, stream>>>(
        args, static_cast<int>(plan.column_tiles));
    const cudaError_t error = cudaGetLastError();
    if (error != cudaSuccess) return error;
  }
  if (args.learned == 0 || plan.reps_ctas == 0) return cudaSuccess;
  expand_grad_reps_kernel<<<static_cast<unsigned>(plan.reps_ctas), kTileThreads, kSharedBytes, stream>>>(
      args, static_cast<int>(plan.column_tiles));
  const cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess || args.splits <= 1) return error;
  expand_sum_partials_kernel<<<static_cast<unsigned>(plan.sum_ctas), kSumThreads, 0, stream>>>(args);
  return cudaGetLastError();
}

}  // namespace symkernels::expansion_cuda
