// Launches of the small Sinkhorn backward kernels (sinkhorn_cuda_small.cuh), one instantiation per group width.
#include "sinkhorn/sinkhorn_cuda_launchers.h"
#include "sinkhorn/sinkhorn_cuda_small.cuh"

namespace symkernels::sinkhorn_cuda {
namespace {

template <int S>
cudaError_t launch(const BackwardArgs& args, const StackTable& table, cudaStream_t stream) {
  if (table.num_units == 0) return cudaSuccess;
  const int64_t blocks = (static_cast<int64_t>(table.num_units) * S + kSmallThreads - 1) / kSmallThreads;
  small_backward_kernel<S><<<static_cast<unsigned>(blocks), kSmallThreads, 0, stream>>>(args, table);
  return cudaGetLastError();
}

}  // namespace

cudaError_t launch_small_backward(int group_width, const BackwardArgs& args, const StackTable& table,
                                 cudaStream_t stream) {
  switch (group_width) {
    case 2:
      return launch<2>(args, table, stream);
    case 4:
      return launch<4>(args, table, stream);
    case 8:
      return launch<8>(args, table, stream);
    case 16:
      return launch<16>(args, table, stream);
    case 32:
      return launch<32>(args, table, stream);
    default:
      return cudaErrorInvalidValue;
  }
}

}  // namespace symkernels::sinkhorn_cuda
