// Shared by the Sinkhorn kernels: input checks and the limits of the scaling domain.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>

namespace symkernels::sinkhorn_detail {

// When a matrix is iterated in the scaling domain (K = exp(L0 - rowmax), vectors r, c) rather than in the log
// domain, by the type K, r and c are computed in:
//   max_spread: the largest within-row spread max_j L0 - min_j L0 allowed; K's entries then lie in
//     [exp(-max_spread), 1], far from underflow, and every r_i c_j (<= 1 / K_ij) stays far from overflow.
//   max_log_scaling: |log r_i| and |log c_j| allowed at every iteration; sums of n such terms times a gradient
//     must still fit the type (float: e^64 ~ 6e27, double: e^600 ~ 4e260).
// A matrix outside these bounds, or with a non-finite logit, is iterated in the log domain instead.
template <typename T>
struct ScalingLimits;

template <>
struct ScalingLimits<float> {
  static constexpr float max_spread = 40.0f;
  static constexpr float max_log_scaling = 64.0f;
};

template <>
struct ScalingLimits<double> {
  static constexpr double max_spread = 300.0;
  static constexpr double max_log_scaling = 600.0;
};

inline void check_logits(const char* op, const at::Tensor& logits, c10::DeviceType device) {
  TORCH_CHECK(logits.device().type() == device, op, ": expected a ", device, " tensor, got ", logits.device());
  TORCH_CHECK(logits.dim() == 3, op, ": logits must have shape [B, n, n], got ", logits.sizes());
  TORCH_CHECK(logits.size(1) == logits.size(2), op, ": logits must be square matrices, got ", logits.sizes());
  TORCH_CHECK(logits.size(1) >= 1, op, ": logits must have n >= 1, got ", logits.sizes());
  TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble, op,
              ": logits must be float32 or float64, got ", logits.scalar_type());
}

inline void check_tau(const char* op, double tau) {
  TORCH_CHECK(tau > 0.0, op, ": tau must be > 0, got ", tau);
}

inline void check_forward(const at::Tensor& logits, int64_t n_iter, double tau, c10::DeviceType device) {
  check_logits("sinkhorn_forward", logits, device);
  TORCH_CHECK(n_iter >= 1, "sinkhorn_forward: n_iter must be >= 1, got ", n_iter);
  check_tau("sinkhorn_forward", tau);
}

inline void check_backward(const at::Tensor& grad_p, const at::Tensor& logits, const at::Tensor& row_log_scalings,
                           const at::Tensor& col_log_scalings, double tau, c10::DeviceType device) {
  const char* op = "sinkhorn_backward";
  check_logits(op, logits, device);
  check_tau(op, tau);
  TORCH_CHECK(grad_p.sizes() == logits.sizes(), op, ": grad_p must have the shape of logits ", logits.sizes(),
              ", got ", grad_p.sizes());
  TORCH_CHECK(row_log_scalings.dim() == 3 && row_log_scalings.size(0) == logits.size(0) &&
                  row_log_scalings.size(1) >= 1 && row_log_scalings.size(2) == logits.size(1),
              op, ": row_log_scalings must have shape [B, T, n] with T >= 1 for logits ", logits.sizes(), ", got ",
              row_log_scalings.sizes());
  TORCH_CHECK(col_log_scalings.sizes() == row_log_scalings.sizes(), op,
              ": col_log_scalings must have the shape of row_log_scalings ", row_log_scalings.sizes(), ", got ",
              col_log_scalings.sizes());
  for (const at::Tensor* t : {&grad_p, &row_log_scalings, &col_log_scalings}) {
    TORCH_CHECK(t->device() == logits.device(), op, ": all tensors must be on ", logits.device(), ", got ",
                t->device());
    TORCH_CHECK(t->scalar_type() == logits.scalar_type(), op, ": all tensors must be ", logits.scalar_type(),
                ", got ", t->scalar_type());
  }
}

}  // namespace symkernels::sinkhorn_detail
