// Small Sinkhorn kernels (n <= 32): a group of S lanes per matrix (S = the power of two >= n), 32 / S matrices per
// warp. Lane i of a group holds row i of K (or of L0 in the log domain) in registers and the whole column scaling
// vector; a row step is a lane-local dot product, a column step a butterfly sum across the group (S log2 S
// shuffles). The matrices of a warp may stop at different iterations or need different domains, so the warp runs
// until all of them are done, each lane's updates masked by its own matrix's state (a shuffle needs every lane).
#pragma once

#include <type_traits>

#include "sinkhorn/sinkhorn_cuda_common.cuh"

namespace symkernels::sinkhorn_cuda {

using cuda::group_all;
using cuda::group_any;
using cuda::group_max;
using cuda::group_sum;
using cuda::kFullMask;
using sinkhorn_detail::backward_row_weight;
using sinkhorn_detail::iteration_limit;
using sinkhorn_detail::log_potential;
using sinkhorn_detail::log_row_sum;
using sinkhorn_detail::row_sum_within;
using sinkhorn_detail::saved_iterations;
using sinkhorn_detail::scaling_domain_allowed;
using sinkhorn_detail::scaling_in_range;
using sinkhorn_detail::scaling_row_sum;

// A lane's place: its group's matrix and its row.
struct SmallLane {
  MatrixRef matrix;
  int row;
  bool row_ok;  // the matrix is valid and row < n
};

template <int S>
SK_DEVICE SmallLane small_lane(const StackTable& table) {
  const int64_t thread = static_cast<int64_t>(blockIdx.x) * kSmallThreads + threadIdx.x;
  SmallLane lane;
  lane.matrix = locate_matrix(table, thread / S);
  lane.row = static_cast<int>(thread % S);
  lane.row_ok = lane.matrix.valid && lane.row < lane.matrix.n;
  return lane;
}

// The lane's row of L0 into v (-inf past the matrix), its maximum into row_max; returns whether the row allows the
// scaling domain (finite, spread within ScalingLimits<float>).
template <int S>
SK_DEVICE bool small_load_l0(const void* logits, ElementType type, float tau, const SmallLane& lane, float (&v)[S],
                             float& row_max) {
  const int n = lane.matrix.n;
  const int64_t start = lane.matrix.offset + static_cast<int64_t>(lane.row) * n;
  float hi = -kInfinity;
  float lo = kInfinity;
  bool finite = true;
#pragma unroll
  for (int b = 0; b < S; ++b) {
    v[b] = -kInfinity;
    if (lane.row_ok && b < n) {
      const float x = scaled_logit(logits, start + b, type, tau);
      v[b] = x;
      hi = x > hi ? x : hi;
      lo = x < lo ? x : lo;
      finite = finite && isfinite(x);
    }
  }
  row_max = hi;
  return !lane.row_ok || scaling_domain_allowed(finite, hi - lo);
}

// Scaling-domain iterations of the group's matrix while `active` (K in k): c_0 = 1, r_t = 1 / (K c_{t-1}),
// c_t = 1 / (K' r_t), each c_t stored to the slab; stops after `limit` iterations, at the first P_t whose rows all
// pass the test (found by the row step of t + 1, then discarded), or when a scaling leaves the safe range
// (`escaped`). Returns T; r and c are r_T (the lane's row) and c_T.
template <int S>
SK_DEVICE int small_scaling_iterate(const float (&k)[S], const SmallLane& lane, bool active, int limit,
                                    const ForwardArgs& a, double* slab, float& r, float (&c)[S], bool& escaped) {
  const int n = lane.matrix.n;
#pragma unroll
  for (int b = 0; b < S; ++b) c[b] = b < n ? 1.f : 0.f;
  r = 0.f;
  escaped = false;
  int t = 0;
  bool running = active;
  while (__any_sync(kFullMask, running)) {
    float d = 0.f;
#pragma unroll
    for (int b = 0; b < S; ++b) d += k[b] * c[b];
    const float r_new = lane.row_ok ? 1.f / d : 0.f;
    const bool row_passes = !lane.row_ok || row_sum_within(scaling_row_sum(r, d), a.tol);
    const bool passed = group_all<S>(row_passes) && a.test != 0 && t >= 1;
    const bool go = running && !passed;
    bool outside = lane.row_ok && !scaling_in_range(r_new);
    float own_column = 0.f;
#pragma unroll
    for (int b = 0; b < S; ++b) {
      const float column_sum = group_sum<S>(k[b] * r_new);
      const float c_new = b < n ? 1.f / column_sum : 0.f;
      outside = outside || (b < n && !scaling_in_range(c_new));
      if (go) c[b] = c_new;
      if (b == lane.row) own_column = c_new;
    }
    outside = group_any<S>(outside);
    if (go) {
      r = r_new;
      ++t;
      if (lane.row_ok) slab[static_cast<int64_t>(t - 1) * a.max_n + lane.row] = own_column;
    }
    escaped = escaped || (go && outside);
    running = go && !outside && t < limit;
  }
  return t;
}

// Log-domain iterations of the group's matrix while `active` (L0 in l0): g_0 = 0, f_t = -lse_j(L0 + g_{t-1}),
// g_t = -lse_i(L0 + f_t), potentials in double; the same stopping rules without the range test. Returns T; f and g
// are f_T (the lane's row) and g_T.
template <int S>
SK_DEVICE int small_log_iterate(const float (&l0)[S], const SmallLane& lane, bool active, int limit,
                                const ForwardArgs& a, double* slab, double& f, double (&g)[S]) {
  const int n = lane.matrix.n;
#pragma unroll
  for (int b = 0; b < S; ++b) g[b] = 0.0;
  f = 0.0;
  int t = 0;
  bool running = active;
  while (__any_sync(kFullMask, running)) {
    double z_max = -kInfinity;
#pragma unroll
    for (int b = 0; b < S; ++b) {
      const double z = static_cast<double>(l0[b]) + g[b];
      if (b < n) z_max = z > z_max ? z : z_max;
    }
    float sum = 0.f;
#pragma unroll
    for (int b = 0; b < S; ++b) {
      if (b < n) sum += precise_expf(static_cast<float>(static_cast<double>(l0[b]) + g[b] - z_max));
    }
    const double f_new = lane.row_ok ? log_potential<double>(z_max, sum) : 0.0;
    const bool row_passes = !lane.row_ok || row_sum_within(log_row_sum(f, f_new), static_cast<double>(a.tol));
    const bool passed = group_all<S>(row_passes) && a.test != 0 && t >= 1;
    const bool go = running && !passed;
    double own_column = 0.0;
#pragma unroll
    for (int b = 0; b < S; ++b) {
      const bool inside = lane.row_ok && b < n;
      const double y = inside ? static_cast<double>(l0[b]) + f_new : -kInfinity;
      const double y_max = group_max<S>(y);
      const float e = inside ? precise_expf(static_cast<float>(y - y_max)) : 0.f;
      const float column_sum = group_sum<S>(e);
      const double g_new = b < n ? log_potential<double>(y_max, column_sum) : 0.0;
      if (go) g[b] = g_new;
      if (b == lane.row) own_column = g_new;
    }
    if (go) {
      f = f_new;
      ++t;
      if (lane.row_ok) slab[static_cast<int64_t>(t - 1) * a.max_n + lane.row] = own_column;
    }
    running = go && t < limit;
  }
  return t;
}

template <int S>
__global__ void __launch_bounds__(kSmallThreads) small_forward_kernel(const ForwardArgs a, const StackTable table) {
  const SmallLane lane = small_lane<S>(table);
  const int n = lane.matrix.n;
  const bool valid = lane.matrix.valid;
  const int limit = valid ? static_cast<int>(iteration_limit(a.caps, lane.matrix.index, a.n_iter)) : 0;
  double* slab = cols_slab(a.cols, valid ? lane.matrix.index : 0, a.n_iter, a.max_n);

  float v[S];
  float row_max;
  const bool allowed = small_load_l0<S>(a.logits, a.type, a.tau, lane, v, row_max);
  bool use_log = !group_all<S>(allowed);
#pragma unroll
  for (int b = 0; b < S; ++b) v[b] = lane.row_ok && b < n ? precise_expf(v[b] - row_max) : 0.f;

  const int64_t start = lane.matrix.offset + static_cast<int64_t>(lane.row) * n;
  int iterations;
  {
    float r;
    float c[S];
    bool escaped;
    iterations = small_scaling_iterate<S>(v, lane, valid && !use_log, limit, a, slab, r, c, escaped);
    use_log = use_log || escaped;
    if (lane.row_ok && !use_log) {
#pragma unroll
      for (int b = 0; b < S; ++b) {
        if (b < n) store_element(a.p, start + b, scaling_entry(r, v[b], c[b]), a.type);
      }
    }
  }
  if (__any_sync(kFullMask, valid && use_log)) {
    if (use_log) small_load_l0<S>(a.logits, a.type, a.tau, lane, v, row_max);
    double f;
    double g[S];
    const int log_iterations = small_log_iterate<S>(v, lane, valid && use_log, limit, a, slab, f, g);
    if (use_log) {
      iterations = log_iterations;
      if (lane.row_ok) {
#pragma unroll
        for (int b = 0; b < S; ++b) {
          if (b < n) store_element(a.p, start + b, log_entry(v[b], f, g[b]), a.type);
        }
      }
    }
  }
  if (valid) {
    if (lane.row == 0) {
      a.domain[lane.matrix.index] = use_log ? kLogDomain : kScalingDomain;
      a.iterations[lane.matrix.index] = iterations;
    }
    // Every other entry of the slab is 0: rows past T, columns past n.
    for (int t = 0; t < a.n_iter; ++t) {
      for (int j = lane.row; j < a.max_n; j += S) {
        if (t >= iterations || j >= n) slab[static_cast<int64_t>(t) * a.max_n + j] = 0.0;
      }
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Backward: the adjoint M of the iterate (docs/design.md §13, written as in the Triton kernels), the lane's
// row in registers: M = P ⊙ (Ḡ - 1ḡ_Tᵀ), f̄_T = rowsum(M); for t = T..2: M -= A_t ⊙ f̄_t 1ᵀ,
// ḡ_{t-1} = -colsum(A_t ⊙ f̄_t 1ᵀ), M -= B_{t-1} ⊙ 1ḡ_{t-1}ᵀ, f̄_{t-1} = -rowsum(B_{t-1} ⊙ 1ḡ_{t-1}ᵀ);
// finally Θ̄ = (M - A_1 ⊙ rowsum(M) 1ᵀ) / tau, with A_t = entries(r_t, c_{t-1}), B_t = entries(r_t, c_t) and
// r_t recomputed from the saved c_{t-1}.

template <bool LOG>
using SmallScaling = std::conditional_t<LOG, double, float>;

template <bool LOG>
SK_DEVICE float small_entry(float v, SmallScaling<LOG> r, SmallScaling<LOG> c) {
  if constexpr (LOG) {
    return log_entry(v, r, c);
  } else {
    return scaling_entry(r, v, c);
  }
}

// The lane's row scaling r_t (or f_t) from the saved c_{t-1} (t - 1 = 0: c_0); 0 on rows past n.
template <int S, bool LOG>
SK_DEVICE SmallScaling<LOG> small_row_scaling(const float (&v)[S], const SmallLane& lane, bool active,
                                              const double* slab, int max_n, int previous) {
  const int n = lane.matrix.n;
  if constexpr (LOG) {
    double z[S];
    double z_max = -kInfinity;
#pragma unroll
    for (int b = 0; b < S; ++b) {
      z[b] = active && b < n ? static_cast<double>(v[b]) + saved_column<true>(slab, max_n, previous, b) : 0.0;
      if (b < n) z_max = z[b] > z_max ? z[b] : z_max;
    }
    float sum = 0.f;
#pragma unroll
    for (int b = 0; b < S; ++b) {
      if (b < n) sum += precise_expf(static_cast<float>(z[b] - z_max));
    }
    return lane.row_ok && active ? log_potential<double>(z_max, sum) : 0.0;
  } else {
    float d = 0.f;
#pragma unroll
    for (int b = 0; b < S; ++b) {
      if (active && b < n) d += v[b] * static_cast<float>(saved_column<false>(slab, max_n, previous, b));
    }
    return lane.row_ok && active ? 1.f / d : 0.f;
  }
}

// Writes the lane's row of Θ̄ (active lanes); Ḡ is read where it lies, so that no other register array than the
// adjoint and the column scalings lives through the loop (with Ḡ and Θ̄ held in registers as well, ptxas spilled
// 608 bytes per thread at S = 32).
template <int S, bool LOG>
SK_DEVICE void small_backward_tile(const float (&v)[S], const BackwardArgs& a, const SmallLane& lane, bool active,
                                   int last, const double* slab, int64_t start) {
  using V = SmallScaling<LOG>;
  const int n = lane.matrix.n;
  const int max_n = a.max_n;
  auto column = [&](int t, int b) -> V {
    return active && b < n ? static_cast<V>(saved_column<LOG>(slab, max_n, t, b)) : V(0);
  };
  V r = small_row_scaling<S, LOG>(v, lane, active, slab, max_n, last - 1);  // r_T
  float adj[S];
  float f_bar = 0.f;
#pragma unroll
  for (int b = 0; b < S; ++b) {
    const float grad = active && lane.row_ok && b < n ? load_element(a.grad, start + b, a.type) : 0.f;
    const float p = small_entry<LOG>(v[b], r, column(last, b));
    const float g_bar = group_sum<S>(grad * p);  // ḡ_T
    adj[b] = p * (grad - g_bar);
    f_bar += adj[b];
  }
  V c_prev[S];
#pragma unroll
  for (int b = 0; b < S; ++b) c_prev[b] = column(last - 1, b);
  for (int s = 0; __any_sync(kFullMask, active && last - s >= 2); ++s) {
    const int t = last - s;  // row step t, then column step t - 1
    const bool act = active && t >= 2;
    const V r_before = act ? small_row_scaling<S, LOG>(v, lane, act, slab, max_n, t - 2) : r;  // r_{t-1}
    float row_sum = 0.f;
#pragma unroll
    for (int b = 0; b < S; ++b) {
      const float step = act ? small_entry<LOG>(v[b], r, c_prev[b]) * f_bar : 0.f;  // A_t ⊙ f̄_t 1ᵀ
      adj[b] -= step;
      const float g_bar = -group_sum<S>(step);  // ḡ_{t-1}
      const float next = act ? small_entry<LOG>(v[b], r_before, c_prev[b]) * g_bar : 0.f;  // B_{t-1} ⊙ 1ḡ_{t-1}ᵀ
      adj[b] -= next;
      row_sum += next;
    }
    r = r_before;
    f_bar = -row_sum;
    if (act) {
#pragma unroll
      for (int b = 0; b < S; ++b) c_prev[b] = column(t - 2, b);
    }
  }
  // The last row step, entry by entry with the actual row sum of M: Θ̄ = (M - A_1 rowsum(M)) / tau.
  float total = 0.f;
#pragma unroll
  for (int b = 0; b < S; ++b) total += adj[b];
  if (!active || !lane.row_ok) return;
#pragma unroll
  for (int b = 0; b < S; ++b) {
    const float first = small_entry<LOG>(v[b], r, c_prev[b]);  // A_1
    if (b < n) store_element(a.out, start + b, (adj[b] - first * total) / a.tau, a.type);
  }
}

template <int S>
__global__ void __launch_bounds__(kSmallThreads) small_backward_kernel(const BackwardArgs a, const StackTable table) {
  const SmallLane lane = small_lane<S>(table);
  const int n = lane.matrix.n;
  const bool valid = lane.matrix.valid;
  const int last = valid ? static_cast<int>(saved_iterations(a.iterations, lane.matrix.index, a.n_iter)) : 1;
  const bool log = valid && a.domain[lane.matrix.index] != kScalingDomain;
  const double* slab = cols_slab(a.cols, valid ? lane.matrix.index : 0, a.n_iter, a.max_n);
  const int64_t start = lane.matrix.offset + static_cast<int64_t>(lane.row) * n;

  float v[S];
  float row_max;
  small_load_l0<S>(a.logits, a.type, a.tau, lane, v, row_max);
  if (!log) {
#pragma unroll
    for (int b = 0; b < S; ++b) v[b] = lane.row_ok && b < n ? precise_expf(v[b] - row_max) : 0.f;
  }
  if (__any_sync(kFullMask, valid && !log)) {
    small_backward_tile<S, false>(v, a, lane, valid && !log, last, slab, start);
  }
  if (__any_sync(kFullMask, log)) {
    small_backward_tile<S, true>(v, a, lane, log, last, slab, start);
  }
}

}  // namespace symkernels::sinkhorn_cuda
