// The emulated CUDA kernel-expansion kernels (expansion_emulated.cpp), callable without the emulation header.
#pragma once

#include "expansion/expansion_cuda.h"

namespace symkernels::expansion_cuda {

// The launches of launch_expand_forward / launch_expand_backward (expansion_cuda_launchers.cu), run under the emulation.
void emulated_expand_forward(const ExpansionArgs& args, const ExpansionPlan& plan);
void emulated_expand_backward(const ExpansionArgs& args, const ExpansionPlan& plan);

}  // namespace symkernels::expansion_cuda
