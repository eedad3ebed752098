// The launchers of the CUDA Sinkhorn kernels (the sinkhorn_cuda_*.cu files), called by sinkhorn_cuda.cpp. Each
// returns the launch's error (cudaSuccess when it was queued on the stream).
#pragma once

#include <cuda_runtime_api.h>

#include <cstdint>

#include "sinkhorn/sinkhorn_cuda.h"

namespace symkernels::sinkhorn_cuda {

cudaError_t launch_small_forward(int group_width, const ForwardArgs& args, const StackTable& table,
                                 cudaStream_t stream);
cudaError_t launch_small_backward(int group_width, const BackwardArgs& args, const StackTable& table,
                                  cudaStream_t stream);

// How to launch the block kernel of width block_width(max_n) for `matrices` matrices of sizes up to max_n on
// `device` (the current one): the cluster size (spreading few matrices over more multiprocessors, and their rows
// over more shared memory) and the shared memory per CTA, into *launch. Planned once per shape class and kept
// (sinkhorn_cuda_block_plan.h); the first plan of a class queries the device (no synchronisation).
cudaError_t plan_block_forward(int64_t max_n, int64_t matrices, const DeviceInfo& device, BlockLaunch* launch);
cudaError_t plan_block_backward(int64_t max_n, int64_t matrices, const DeviceInfo& device, BlockLaunch* launch);

cudaError_t launch_block_forward(int64_t max_n, const ForwardArgs& args, const StackTable& table,
                                 const BlockLaunch& launch, cudaStream_t stream);
cudaError_t launch_block_backward(int64_t max_n, const BackwardArgs& args, const StackTable& table,
                                  const BlockLaunch& launch, cudaStream_t stream);

}  // namespace symkernels::sinkhorn_cuda
