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
};

void emulated_forward(const ForwardArgs& args, const std::vector<int64_t>& sizes, const std::vector<int64_t>& counts,
                      const EmulatedLaunch& how);
void emulated_backward(const BackwardArgs& args, const std::vector<int64_t>& sizes,
                       const std::vector<int64_t>& counts, const EmulatedLaunch& how);
int64_t emulated_block_rows(const std::vector<int64_t>& sizes, const std::vector<int64_t>& counts);

}  // namespace symkernels::sinkhorn_cuda
