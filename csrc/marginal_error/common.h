// Shared by the CPU and CUDA kernels of symkernels::marginal_error.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/macros/Macros.h>

namespace symkernels::marginal_error_detail {

// |x - 1|, written out so the same code compiles for host and device and keeps NaN.
template <typename T>
C10_HOST_DEVICE inline T abs_minus_one(T x) {
  const T d = x - T(1);
  return d < T(0) ? -d : d;
}

// max that propagates NaN like torch.amax: a NaN marginal must not read as "converged".
template <typename T>
C10_HOST_DEVICE inline T nan_max(T acc, T x) {
  return (x != x || x > acc) ? x : acc;
}

inline void check_input(const at::Tensor& p, c10::DeviceType device) {
  TORCH_CHECK(p.device().type() == device, "marginal_error: expected a ", device, " tensor, got ", p.device());
  TORCH_CHECK(p.dim() >= 2, "marginal_error: p must have shape [..., n, n], got ", p.sizes());
  TORCH_CHECK(p.size(-1) == p.size(-2), "marginal_error: p must be square in its last two dimensions, got ",
              p.sizes());
  TORCH_CHECK(p.size(-1) >= 1, "marginal_error: p must have n >= 1, got ", p.sizes());
  TORCH_CHECK(p.scalar_type() == at::kFloat || p.scalar_type() == at::kDouble,
              "marginal_error: p must be float32 or float64, got ", p.scalar_type());
}

}  // namespace symkernels::marginal_error_detail
