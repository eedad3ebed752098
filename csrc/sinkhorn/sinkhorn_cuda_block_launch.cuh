// Planning and launching the block Sinkhorn kernels (host code of the .cu files): the shared memory of a CTA, the
// cluster size, and the launch itself.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "sinkhorn/sinkhorn_cuda.h"

namespace symkernels::sinkhorn_cuda {

template <class Args>
using BlockKernel = void (*)(Args, StackTable, BlockLaunch);

// The dynamic shared memory of a CTA for matrices of up to max_n over `cluster` CTAs: the fixed part, and the rows
// past the register rows as far as the device allows.
inline int64_t block_shared_bytes(const BlockShape& shape, int64_t max_n, int cluster, const DeviceInfo& device) {
  const BlockSharedLayout s = block_shared_layout(max_n, shape.warps, cluster, 0);
  const int64_t rows = s.rows - static_cast<int64_t>(shape.register_rows) * shape.warps;
  const int64_t wanted = s.kernel_rows + (rows > 0 ? rows : 0) * s.padded_n * 4;
  return wanted < device.max_shared_bytes ? wanted : device.max_shared_bytes;
}

template <class Args>
cudaError_t allow_shared_bytes(BlockKernel<Args> kernel, int64_t bytes) {
  return cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
}

// Whether the device can run clusters of `cluster` CTAs of this kernel with `bytes` of shared memory each.
template <class Args>
bool cluster_fits(BlockKernel<Args> kernel, const BlockShape& shape, int cluster, int64_t bytes) {
  if (allow_shared_bytes(kernel, bytes) != cudaSuccess) {
    cudaGetLastError();  // a refused setting is an answer here, not an error to report later
    return false;
  }
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(cluster, 1, 1);
  config.blockDim = dim3(32 * shape.warps, 1, 1);
  config.dynamicSmemBytes = static_cast<size_t>(bytes);
  cudaLaunchAttribute attribute;
  attribute.id = cudaLaunchAttributeClusterDimension;
  attribute.val.clusterDim.x = cluster;
  attribute.val.clusterDim.y = 1;
  attribute.val.clusterDim.z = 1;
  config.attrs = &attribute;
  config.numAttrs = 1;
  int clusters = 0;
  const cudaError_t error = cudaOccupancyMaxActiveClusters(&clusters, kernel, &config);
  if (error != cudaSuccess) cudaGetLastError();
  return error == cudaSuccess && clusters > 0;
}

// Clusters (Hopper and later) serve two ends: few matrices are spread over more multiprocessors (at least two
// rows per warp), and large ones over more shared memory (rows that do not fit on chip are read from L2 at every
// pass). Capped at the portable cluster size.
template <class Args>
BlockLaunch plan_block(BlockKernel<Args> kernel, const BlockShape& shape, int64_t max_n, int64_t matrices,
                       const DeviceInfo& device) {
  int cluster = 1;
  if (device.major >= 9) {
    auto rows_per_cta = [&](int c) { return (max_n + c - 1) / c; };
    while (cluster < kMaxCluster && matrices * cluster * 2 <= device.multiprocessors &&
           rows_per_cta(2 * cluster) >= 2 * shape.warps) {
      cluster *= 2;
    }
    auto overflows = [&](int c) {
      const BlockLaunch launch{c, static_cast<int32_t>(block_shared_bytes(shape, max_n, c, device))};
      return block_rows_overflow(max_n, shape, launch);
    };
    while (cluster < kMaxCluster && overflows(cluster)) cluster *= 2;
    while (cluster > 1 && !cluster_fits(kernel, shape, cluster, block_shared_bytes(shape, max_n, cluster, device))) {
      cluster /= 2;
    }
  }
  return {cluster, static_cast<int32_t>(block_shared_bytes(shape, max_n, cluster, device))};
}

template <class Args>
cudaError_t launch_block(BlockKernel<Args> kernel, const BlockShape& shape, const Args& args, const StackTable& table,
                         const BlockLaunch& launch, cudaStream_t stream) {
  if (table.num_units == 0) return cudaSuccess;
  cudaError_t error = allow_shared_bytes(kernel, launch.shared_bytes);
  if (error != cudaSuccess) return error;
  cudaLaunchConfig_t config = {};
  config.gridDim = dim3(static_cast<unsigned>(table.num_units) * static_cast<unsigned>(launch.cluster), 1, 1);
  config.blockDim = dim3(32 * shape.warps, 1, 1);
  config.dynamicSmemBytes = static_cast<size_t>(launch.shared_bytes);
  config.stream = stream;
  cudaLaunchAttribute attribute;
  if (launch.cluster > 1) {
    attribute.id = cudaLaunchAttributeClusterDimension;
    attribute.val.clusterDim.x = launch.cluster;
    attribute.val.clusterDim.y = 1;
    attribute.val.clusterDim.z = 1;
    config.attrs = &attribute;
    config.numAttrs = 1;
  }
  error = cudaLaunchKernelEx(&config, kernel, args, table, launch);
  return error != cudaSuccess ? error : cudaGetLastError();
}

}  // namespace symkernels::sinkhorn_cuda
