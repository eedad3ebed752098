// Planning and launching the block Sinkhorn kernels (host code of the .cu files): the CUDA runtime's answers to the
// planner's questions (sinkhorn_cuda_block_plan.h), and the launch itself.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "sinkhorn/sinkhorn_cuda.h"
#include "sinkhorn/sinkhorn_cuda_block_plan.h"

namespace symkernels::sinkhorn_cuda {

template <class Args>
using BlockKernel = void (*)(Args, StackTable, BlockLaunch);

// The CUDA runtime's answers for one kernel on the current device. The first call of a shape class may come
// during CUDA-graph capture: the queries then run in the relaxed capture mode, in which a capture in progress
// neither refuses them nor is invalidated by them (they queue no work).
template <class Args>
class CudaBlockDriver final : public BlockDriver {
 public:
  explicit CudaBlockDriver(BlockKernel<Args> kernel) : kernel_(kernel) {}
  ~CudaBlockDriver() override {
    if (relaxed_) cudaThreadExchangeStreamCaptureMode(&previous_mode_);
  }
  CudaBlockDriver(const CudaBlockDriver&) = delete;
  CudaBlockDriver& operator=(const CudaBlockDriver&) = delete;

  bool allow_shared_bytes(int64_t bytes) override {
    relax();
    error_ = cudaFuncSetAttribute(kernel_, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(bytes));
    return error_ == cudaSuccess;
  }

  bool cluster_fits(const BlockShape& shape, int cluster, int64_t bytes) override {
    relax();
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
    // A refused configuration is an answer (no), not an error for a later call to report: cleared here.
    if (cudaOccupancyMaxActiveClusters(&clusters, kernel_, &config) != cudaSuccess) {
      cudaGetLastError();
      return false;
    }
    return clusters > 0;
  }

  // The error of the last refused allow_shared_bytes.
  cudaError_t error() const { return error_; }

 private:
  void relax() {
    if (relaxed_) return;
    previous_mode_ = cudaStreamCaptureModeRelaxed;
    cudaThreadExchangeStreamCaptureMode(&previous_mode_);
    relaxed_ = true;
  }

  BlockKernel<Args> kernel_;
  bool relaxed_ = false;
  cudaStreamCaptureMode previous_mode_ = cudaStreamCaptureModeGlobal;
  cudaError_t error_ = cudaSuccess;
};

// The launch of `kernel` for `matrices` matrices of sizes up to max_n on the current device, from `cache`; the
// driver is asked only on the first call of the shape class. Returns the runtime's error if it refused the
// kernel's shared memory limit.
template <class Args>
cudaError_t plan_block_launch(BlockPlanCache& cache, BlockKernel<Args> kernel, int64_t max_n, int64_t matrices,
                              const DeviceInfo& device, BlockLaunch* launch) {
  CudaBlockDriver<Args> driver(kernel);
  *launch = cache.plan(driver, max_n, matrices, device);
  return launch->cluster == 0 ? (driver.error() != cudaSuccess ? driver.error() : cudaErrorInvalidValue)
                              : cudaSuccess;
}

// A launch planned by plan_block_launch (which raised the kernel's shared memory limit on this device).
template <class Args>
cudaError_t launch_block(BlockKernel<Args> kernel, const BlockShape& shape, const Args& args, const StackTable& table,
                         const BlockLaunch& launch, cudaStream_t stream) {
  if (table.num_units == 0) return cudaSuccess;
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
  const cudaError_t error = cudaLaunchKernelEx(&config, kernel, args, table, launch);
  return error != cudaSuccess ? error : cudaGetLastError();
}

}  // namespace symkernels::sinkhorn_cuda
