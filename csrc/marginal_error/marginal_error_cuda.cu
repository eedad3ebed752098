// CUDA kernel of symkernels::marginal_error: one block per matrix, warp-per-row and thread-per-column sums,
// then a block max. Registers itself for the CUDA dispatch key, so CPU-only builds never reference it.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/cuda/CUDAContext.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include <algorithm>
#include <limits>

#include "marginal_error/common.h"

namespace symkernels {
namespace {

using marginal_error_detail::abs_minus_one;
using marginal_error_detail::nan_max;

constexpr int kWarpSize = 32;
constexpr int kMaxThreads = 256;
constexpr unsigned kFullMask = 0xffffffffu;

template <typename T>
__device__ inline T warp_sum(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_down_sync(kFullMask, v, offset);
  }
  return v;  // complete in lane 0
}

template <typename T>
__device__ inline T warp_nan_max(T v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v = nan_max(v, __shfl_down_sync(kFullMask, v, offset));
  }
  return v;  // complete in lane 0
}

// blockDim.x is a multiple of 32 and at most kMaxThreads.
template <typename scalar_t, typename acc_t>
__global__ void marginal_error_kernel(const scalar_t* __restrict__ p, scalar_t* __restrict__ out, int64_t n) {
  const scalar_t* m = p + static_cast<int64_t>(blockIdx.x) * n * n;
  const int lane = threadIdx.x % kWarpSize;
  const int warp = threadIdx.x / kWarpSize;
  const int num_warps = blockDim.x / kWarpSize;
  acc_t err = 0;

  // Row sums: a warp per row, lanes stride along the row so loads coalesce.
  for (int64_t i = warp; i < n; i += num_warps) {
    acc_t s = 0;
    for (int64_t j = lane; j < n; j += kWarpSize) {
      s += static_cast<acc_t>(m[i * n + j]);
    }
    s = warp_sum(s);
    if (lane == 0) {
      err = nan_max(err, abs_minus_one(s));
    }
  }
  // Column sums: a thread per column; neighbouring threads read neighbouring addresses.
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) {
    acc_t s = 0;
    for (int64_t i = 0; i < n; ++i) {
      s += static_cast<acc_t>(m[i * n + j]);
    }
    err = nan_max(err, abs_minus_one(s));
  }

  __shared__ acc_t partial[kMaxThreads / kWarpSize];
  err = warp_nan_max(err);
  if (lane == 0) {
    partial[warp] = err;
  }
  __syncthreads();
  if (warp == 0) {
    err = lane < num_warps ? partial[lane] : acc_t(0);
    err = warp_nan_max(err);
    if (lane == 0) {
      out[blockIdx.x] = static_cast<scalar_t>(err);
    }
  }
}

at::Tensor marginal_error_cuda(const at::Tensor& p) {
  marginal_error_detail::check_input(p, c10::DeviceType::CUDA);
  const c10::cuda::CUDAGuard device_guard(p.device());
  const at::Tensor x = p.contiguous();
  const int64_t n = x.size(-1);
  at::Tensor out = at::empty(x.sizes().slice(0, x.dim() - 2), x.options());
  const int64_t batch = out.numel();
  if (batch == 0) {
    return out;
  }
  TORCH_CHECK(batch <= std::numeric_limits<int32_t>::max(), "marginal_error: at most 2^31-1 matrices, got ",
              batch);
  // Enough warps to cover the columns (one thread each), at most kMaxThreads.
  const int64_t rounded = (n + kWarpSize - 1) / kWarpSize * kWarpSize;
  const int threads = static_cast<int>(std::min<int64_t>(kMaxThreads, rounded));
  const cudaStream_t stream = at::cuda::getCurrentCUDAStream();
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "marginal_error_cuda", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/true>;  // float for float, double for double
    marginal_error_kernel<scalar_t, acc_t><<<static_cast<unsigned>(batch), threads, 0, stream>>>(
        x.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(symkernels, CUDA, m) {
  m.impl("marginal_error", &marginal_error_cuda);
}

}  // namespace symkernels
