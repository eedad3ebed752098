// The launchers of the CUDA kernel-expansion kernels (expansion_cuda_launchers.cu), called by expansion_cuda.cpp. Each
// returns the error of its last launch (cudaSuccess when everything was queued on the stream).
#pragma once

#include <cuda_runtime_api.h>

#include "expansion/expansion_cuda.h"

namespace symkernels::expansion_cuda {

// Writes args.kernel.
cudaError_t launch_expand_forward(const ExpansionArgs& args, const ExpansionPlan& plan, cudaStream_t stream);

// Writes args.grad_weight and args.grad_reps (through args.partials when plan.splits > 1).
cudaError_t launch_expand_backward(const ExpansionArgs& args, const ExpansionPlan& plan, cudaStream_t stream);

}  // namespace symkernels::expansion_cuda
