// Planning and launches of the block Sinkhorn backward kernels (sinkhorn_cuda_block.cuh), one instantiation per
// width.
#include "sinkhorn/sinkhorn_cuda_block_backward.cuh"
#include "sinkhorn/sinkhorn_cuda_block_launch.cuh"
#include "sinkhorn/sinkhorn_cuda_launchers.h"

namespace symkernels::sinkhorn_cuda {
namespace {

template <int CT>
BlockKernel<BackwardArgs> kernel_of_width() {
  constexpr BlockShape shape = block_shape_of_width(CT, BlockPass::kBackward);
  return block_backward_kernel<CT, shape.warps, shape.register_rows>;
}

BlockKernel<BackwardArgs> kernel_for(int64_t max_n) {
  switch (block_width(max_n)) {
    case 2:
      return kernel_of_width<2>();
    case 4:
      return kernel_of_width<4>();
    case 8:
      return kernel_of_width<8>();
    case 16:
      return kernel_of_width<16>();
    default:
      return kernel_of_width<32>();
  }
}

}  // namespace

cudaError_t plan_block_backward(int64_t max_n, int64_t matrices, const DeviceInfo& device, BlockLaunch* launch) {
  static BlockPlanCache cache(BlockPass::kBackward);
  return plan_block_launch(cache, kernel_for(max_n), max_n, matrices, device, launch);
}

cudaError_t launch_block_backward(int64_t max_n, const BackwardArgs& args, const StackTable& table,
                                 const BlockLaunch& launch, cudaStream_t stream) {
  return launch_block(kernel_for(max_n), block_shape(max_n, BlockPass::kBackward), args, table, launch, stream);
}

}  // namespace symkernels::sinkhorn_cuda
