// The per-matrix arithmetic of the Sinkhorn kernels that does not depend on the device or the thread mapping: the
// limits of the scaling domain, the domain decision, the early-exit test, the iteration limits, the log-domain
// potentials and the scalar recurrences of the backward, and the constants of exp. Free of ATen, so that the CPU
// and the CUDA kernels share it (the CPU tests exercise it through the CPU kernels).
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define SYMKERNELS_HOST_DEVICE __host__ __device__
#else
#define SYMKERNELS_HOST_DEVICE
#endif

namespace symkernels::sinkhorn_detail {

// The `domain` output: how a matrix was iterated (and how its backward runs).
enum Domain : int32_t { kScalingDomain = 0, kLogDomain = 1 };

// When a matrix is iterated in the scaling domain (K = exp(L0 - rowmax), vectors r, c) rather than in the log
// domain, by the type K, r and c are computed in:
//   max_spread: the largest within-row spread max_j L0 - min_j L0 allowed; K's entries then lie in
//     [exp(-max_spread), 1], far from underflow, and every r_i c_j (<= 1 / K_ij) stays far from overflow.
//   max_log_scaling: |log r_i| and |log c_j| allowed at every iteration; sums of n such terms times a gradient
//     must still fit the type (float: e^64 ~ 6e27, double: e^600 ~ 4e260). min_scaling / max_scaling are
//     exp(-max_log_scaling) / exp(max_log_scaling), written out (exp is not constexpr).
// A matrix outside these bounds, or with a non-finite logit, is iterated in the log domain instead.
template <typename T>
struct ScalingLimits;

template <>
struct ScalingLimits<float> {
  static constexpr float max_spread = 40.0f;
  static constexpr float max_log_scaling = 64.0f;
  static constexpr float min_scaling = 1.6038108905486378e-28f;
  static constexpr float max_scaling = 6.2351490808116168e27f;
};

template <>
struct ScalingLimits<double> {
  static constexpr double max_spread = 300.0;
  static constexpr double max_log_scaling = 600.0;
  static constexpr double min_scaling = 2.6503965530043108e-261;
  static constexpr double max_scaling = 3.7730203009299397e260;
};

// Whether logits whose L0 = logits / tau has every entry finite and the given largest within-row spread may be
// iterated in the scaling domain.
template <typename A>
SYMKERNELS_HOST_DEVICE inline bool scaling_domain_allowed(bool all_finite, A max_row_spread) {
  return all_finite && max_row_spread <= ScalingLimits<A>::max_spread;
}

// Whether a scaling r_i or c_j may stay in the scaling domain (false for NaN).
template <typename A>
SYMKERNELS_HOST_DEVICE inline bool scaling_in_range(A v) {
  return v >= ScalingLimits<A>::min_scaling && v <= ScalingLimits<A>::max_scaling;
}

// 1..n_iter.
SYMKERNELS_HOST_DEVICE inline int64_t clamp_iterations(int64_t value, int64_t n_iter) {
  return value < 1 ? 1 : (value > n_iter ? n_iter : value);
}

// The early exit: tol == 0 disables it; otherwise an iterate passes when every row sum is within tol of 1.
SYMKERNELS_HOST_DEVICE inline bool early_exit_enabled(double tol) {
  return tol > 0.0;
}

// Whether one row sum of an iterate passes the test (false for NaN: a NaN row never reads as converged).
template <typename A>
SYMKERNELS_HOST_DEVICE inline bool row_sum_within(A row_sum, A tol) {
  const A d = row_sum - A(1);
  return (d < A(0) ? -d : d) <= tol;
}

// The iterations matrix m may run: caps[m] when caps are given, else n_iter. Clamped to 1..n_iter: the CPU entry
// points reject caps outside that range, but the CUDA ones cannot read them without a host synchronisation.
SYMKERNELS_HOST_DEVICE inline int64_t iteration_limit(const int32_t* caps, int64_t m, int64_t n_iter) {
  return caps != nullptr ? clamp_iterations(caps[m], n_iter) : n_iter;
}

// The iterations a matrix ran, as the backward reads them from the saved state (clamped like iteration_limit, so
// that a corrupted value never reads past the saved scalings).
SYMKERNELS_HOST_DEVICE inline int64_t saved_iterations(const int32_t* iterations, int64_t m, int64_t n_iter) {
  return clamp_iterations(iterations[m], n_iter);
}

// The row sum of the iterate P_t from the next row step (the early-exit test): r_t[i] (K c_t)_i in the scaling
// domain, where (K c_t)_i is the dot product of the row step t + 1; exp(f_t[i] - f_{t+1}[i]) in the log domain.
template <typename A>
SYMKERNELS_HOST_DEVICE inline A scaling_row_sum(A previous_row_scaling, A row_dot) {
  return previous_row_scaling * row_dot;
}

SYMKERNELS_HOST_DEVICE inline double log_row_sum(double previous_potential, double potential) {
#ifdef __CUDA_ARCH__
  return ::exp(previous_potential - potential);
#else
  return std::exp(previous_potential - potential);
#endif
}

// A log-domain potential from a max-shifted sum of exponentials: -lse = -(shift + log(sum)).
template <typename A>
SYMKERNELS_HOST_DEVICE inline A log_potential(A shift, A sum) {
#ifdef __CUDA_ARCH__
  return -(shift + ::log(sum));
#else
  return -(shift + std::log(sum));
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Scalar pieces of the scaling-domain backward (the recurrences are derived in sinkhorn_cpu_backward.cpp):
//   the row weight  w_t[i] = r_t[i] f̄_t[i] = r_t[i] (r_t[i] d_i)  from the row's dot product d_i;
//   the column term u_{t-1}[j] = c_{t-1}[j] ḡ_{t-1}[j] = -c_{t-1}[j]^2 col_j  from the column sum col_j;
//   the adjoint before the last row step  M_ij = K_ij (r_T[i] c_T[j] (Ḡ_ij - ḡ_T[j]) - X_ij);
//   the gradient  (M_ij - a_i K_ij) / tau  with a_i = r_1[i] rowsum(M_i).

template <typename A>
SYMKERNELS_HOST_DEVICE inline A backward_row_weight(A row_scaling, A row_dot) {
  return row_scaling * (row_scaling * row_dot);
}

template <typename A>
SYMKERNELS_HOST_DEVICE inline A backward_column_term(A column_scaling, A column_sum) {
  return -column_scaling * column_scaling * column_sum;
}

template <typename A>
SYMKERNELS_HOST_DEVICE inline A adjoint_entry(A k, A last_row_scaling, A last_column_scaling, A grad, A last_column_bar,
                                              A x) {
  return k * (last_row_scaling * last_column_scaling * (grad - last_column_bar) - x);
}

template <typename A>
SYMKERNELS_HOST_DEVICE inline A gradient_entry(A adjoint, A row_term, A k, A inv_tau) {
  return (adjoint - row_term * k) * inv_tau;
}

// Constants of exp(x) = 2^k e^r with x = k ln2 + r, |r| <= ln2 / 2 (Cody-Waite reduction, a Taylor polynomial of
// the given degree for e^r, 2^k assembled in the exponent bits). exp(x) is 0 below `lo` and +inf above `hi`.
template <typename A>
struct ExpConstants;

template <>
struct ExpConstants<double> {
  using Bits = int64_t;
  static constexpr double log2e = 1.4426950408889634;
  static constexpr double ln2_hi = 6.93147180369123816490e-01;  // trailing zero bits: k * ln2_hi is exact
  static constexpr double ln2_lo = 1.90821492927058770002e-10;
  static constexpr double shifter = 6755399441055744.0;  // 1.5 * 2^52: adding it rounds to an integer
  static constexpr double lo = -708.0;
  static constexpr double hi = 709.0;
  static constexpr int mantissa_bits = 52;
  static constexpr Bits bias = 1023;
  static constexpr int degree = 13;  // |r|^14 / 14! < 5e-18
};

template <>
struct ExpConstants<float> {
  using Bits = int32_t;
  static constexpr float log2e = 1.44269504f;
  static constexpr float ln2_hi = 0.693359375f;
  static constexpr float ln2_lo = -2.12194440e-4f;
  static constexpr float shifter = 12582912.0f;  // 1.5 * 2^23
  static constexpr float lo = -87.0f;
  static constexpr float hi = 88.0f;
  static constexpr int mantissa_bits = 23;
  static constexpr Bits bias = 127;
  static constexpr int degree = 7;  // |r|^8 / 8! < 6e-9
};

}  // namespace symkernels::sinkhorn_detail
