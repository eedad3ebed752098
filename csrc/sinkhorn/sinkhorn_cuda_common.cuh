// Device pieces shared by the small and block Sinkhorn kernels: which matrix a unit of a launch serves, and the
// saved column scalings.
#pragma once

#include "cuda_device.cuh"
#include "sinkhorn/common.h"
#include "sinkhorn/sinkhorn_cuda.h"

namespace symkernels::sinkhorn_cuda {

using cuda::ElementType;
using cuda::load_element;
using cuda::precise_expf;
using cuda::store_element;
using sinkhorn_detail::kLogDomain;
using sinkhorn_detail::kScalingDomain;

constexpr float kInfinity = __builtin_huge_valf();

// The matrix a unit of a launch serves (valid = false past the launch's units).
struct MatrixRef {
  bool valid;
  int n;
  int64_t index;       // in the outputs
  int64_t offset;      // of its first element
  int64_t row_offset;  // rows of the matrices before it in the call
};

SK_DEVICE MatrixRef locate_matrix(const StackTable& table, int64_t unit) {
  MatrixRef m{false, 1, 0, 0, 0};
  if (unit >= table.num_units) return m;
  int s = 0;
  while (s + 1 < table.num_stacks && unit >= table.slot[s + 1].first_unit) ++s;
  const StackSlot& slot = table.slot[s];
  const int64_t k = unit - slot.first_unit;
  const int64_t n = slot.n;
  m.valid = true;
  m.n = slot.n;
  m.index = slot.first_matrix + k;
  m.offset = slot.element_offset + k * n * n;
  m.row_offset = slot.row_offset + k * n;
  return m;
}

// L0 = logits / tau in float, correctly rounded (as the reference's float32 `logits / tau`).
SK_DEVICE float scaled_logit(const void* logits, int64_t index, ElementType type, float tau) {
  return load_element(logits, index, type) / tau;
}

// The saved scaling of column j < n after iteration t (c_t, or g_t in the log domain); t = 0 gives c_0 = 1, g_0 = 0.
template <bool LOG>
SK_DEVICE double saved_column(const double* slab, int max_n, int t, int j) {
  return t >= 1 ? slab[static_cast<int64_t>(t - 1) * max_n + j] : (LOG ? 0.0 : 1.0);
}

// The slab of `cols` [n_iter, max_n] of matrix m.
SK_DEVICE double* cols_slab(double* cols, int64_t m, int n_iter, int max_n) {
  return cols + m * n_iter * static_cast<int64_t>(max_n);
}

SK_DEVICE const double* cols_slab(const double* cols, int64_t m, int n_iter, int max_n) {
  return cols + m * n_iter * static_cast<int64_t>(max_n);
}

// An entry of an iterate: r_i K_ij c_j (scaling domain) or exp(L0_ij + f_i + g_j) (log domain, the float64 sum
// rounded to float once it is small for the entries that matter, as in the Triton kernels).
SK_DEVICE float scaling_entry(float r, float k, float c) {
  return r * k * c;
}

SK_DEVICE float log_entry(float l0, double f, double g) {
  return precise_expf(static_cast<float>(static_cast<double>(l0) + f + g));
}

}  // namespace symkernels::sinkhorn_cuda
