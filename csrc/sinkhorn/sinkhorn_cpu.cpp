// CPU kernels of the Sinkhorn ops (sinkhorn.h): the matrices of a ragged stack in parallel, in tasks of
// consecutive matrices with their buffers allocated once per chunk of tasks.
//
// Each matrix is iterated in one of two domains, decided from its logits and, while iterating, from its scalings;
// the decision is saved (`domain`) and the backward follows it:
// * scaling domain (the normal case): K = exp(L0 - rowmax) is built once, then every iteration is
//   r = 1 / (K c), c = 1 / (K' r): one row-major pass over K (a dot product and an axpy per row), no exp;
// * log domain (fallback): max-shifted log-sum-exp iterations on the log-scalings, for matrices whose logits are
//   too spread out for K (see ScalingLimits), whose scalings leave the safe range, or with non-finite logits.
// The forward saves c_t (or g_t) exactly as computed; the backward rebuilds K (or L0) from the logits, recomputes
// r_t = 1 / (K c_{t-1}) (or f_t) with the forward's own code, and runs the exact vector-Jacobian product of the
// T_m-step map (see "Backward" below).
//
// Everything inside a matrix is computed in the compute type A of the input type S (ComputeType below): only the
// logits, grad_p and the outputs are in S. On x86-64 the per-matrix code is compiled twice, for the baseline ISA
// and for AVX2+FMA, and the second is used where the CPU has it.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "build_info.h"
#include "sinkhorn/common.h"
#include "sinkhorn/cpu_vector.h"
#include "sinkhorn/sinkhorn.h"

#ifndef SYMKERNELS_SINKHORN_AVX2  // defining it as 0 builds the baseline code only
#if defined(__x86_64__) && defined(__GNUC__)
#define SYMKERNELS_SINKHORN_AVX2 1
#else
#define SYMKERNELS_SINKHORN_AVX2 0
#endif
#endif

// The compute type of float32 inputs (float64 inputs always compute in double). It is double: float ran float32
// inputs ~1.5x faster, but its gradients of near-permutation and sharp logits came out up to 18x less accurate than
// those of the float32 eager reference (against a float64 truth, n = 100, tau = 0.5). Defining it as float builds
// that variant, with the float limits of ScalingLimits.
#ifndef SYMKERNELS_SINKHORN_FLOAT32_COMPUTE
#define SYMKERNELS_SINKHORN_FLOAT32_COMPUTE double
#endif

namespace symkernels {

bool cpu_kernels_use_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

namespace sinkhorn_detail {
namespace {

template <typename S>
struct ComputeType {
  using type = double;
};

template <>
struct ComputeType<float> {
  using type = SYMKERNELS_SINKHORN_FLOAT32_COMPUTE;
};

// ---------------------------------------------------------------------------------------------------------------
// Per-task buffers, sized once for matrices of up to n rows and up to T iterations.

template <typename A>
struct Workspace {
  Workspace(int64_t n, int64_t n_iter, bool backward)
      : mat(static_cast<size_t>(n * n)),
        row_max(static_cast<size_t>(n)),
        rows(static_cast<size_t>(n_iter * n)),
        cols(static_cast<size_t>((n_iter + 1) * n)),
        v1(static_cast<size_t>(n)),
        v2(static_cast<size_t>(n)),
        v3(static_cast<size_t>(n)) {
    if (backward) {
      const int64_t width = 2 * (n_iter - 1);
      left.resize(static_cast<size_t>((n + 4) * width));  // + 4 zero rows pad the last block of rows
      right.resize(static_cast<size_t>(width * n));
      block.resize(static_cast<size_t>(4 * n));
    }
  }
  std::vector<A> mat;      // [n, n]: K in the scaling domain, L0 in the log domain
  std::vector<A> row_max;  // [n]: max_j L0[i, j]
  std::vector<A> rows;     // [T, n]: r_t (scaling domain) or f_t (log domain), t = 1..T
  std::vector<A> cols;     // [T + 1, n]: c_t with c_0 = 1 (scaling domain) or g_t with g_0 = 0 (log domain)
  std::vector<A> v1, v2, v3;  // [n] each
  std::vector<A> left;     // backward, scaling domain: [n, 2T - 2] (+ padding), see scaling_backward
  std::vector<A> right;    // backward, scaling domain: [2T - 2, n]
  std::vector<A> block;    // backward, scaling domain: [4, n], a block of rows of the adjoint
  std::vector<A> adjoint;  // backward, log domain: [n, n], allocated on first use
};

// ---------------------------------------------------------------------------------------------------------------
// Forward pieces.

// L0 = x / tau (rounded to the input type, as the reference computes it) into l0, and the row maxima. True when
// every logit is finite and the largest within-row spread allows the scaling domain.
template <typename S, typename A>
SYMKERNELS_INLINE bool load_logits(const S* __restrict x, S tau, int64_t n, A* __restrict l0,
                                   A* __restrict row_max) {
  A spread = 0;
  A probe = 0;  // stays 0 unless some L0 is NaN or infinite (v * 0 is NaN for those)
  for (int64_t i = 0; i < n; ++i) {
    const S* xi = x + i * n;
    A* li = l0 + i * n;
    A hi = -std::numeric_limits<A>::infinity();
    A lo = std::numeric_limits<A>::infinity();
    SYMKERNELS_SIMD_WITH(reduction(max : hi) reduction(min : lo) reduction(+ : probe))
    for (int64_t j = 0; j < n; ++j) {
      const A v = static_cast<A>(static_cast<S>(xi[j] / tau));
      li[j] = v;
      hi = std::max(hi, v);
      lo = std::min(lo, v);
      probe += v * A(0);
    }
    row_max[i] = hi;
    spread = std::max(spread, hi - lo);
  }
  return scaling_domain_allowed(probe == A(0), spread);
}

// L0 -> K = exp(L0 - rowmax) in place.
template <typename A>
SYMKERNELS_INLINE void build_kernel(A* __restrict k, const A* __restrict row_max, int64_t n) {
  for (int64_t i = 0; i < n; ++i) {
    A* ki = k + i * n;
    const A m = row_max[i];
    SYMKERNELS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      ki[j] = fast_exp(ki[j] - m);
    }
  }
}

// Scaling-domain iterations: c_0 = 1; for t = 1, 2, ...: r_t = 1 / (K c_{t-1}), c_t = 1 / (K' r_t), one row-major
// pass over K per iteration (the row's dot product, then its contribution to the column sums). With the early
// exit, the row pass of iteration t also tests P_{t-1}: rowsum_i(P_{t-1}) = r_{t-1}[i] (K c_{t-1})_i; when every row
// passes, iteration t is discarded. rs: [T, n], cs: [T + 1, n]. Returns T, the iterations kept, or 0 as soon as a
// scaling leaves the safe range (or is NaN).
template <typename A>
SYMKERNELS_INLINE int64_t scaling_iterate(const A* __restrict k, int64_t n, int64_t limit, bool early_exit, A tol,
                                          A* __restrict rs, A* __restrict cs, A* __restrict col) {
  std::fill(cs, cs + n, A(1));
  for (int64_t t = 1; t <= limit; ++t) {
    const A* c_prev = cs + (t - 1) * n;
    const A* r_prev = t >= 2 ? rs + (t - 2) * n : nullptr;
    A* r = rs + (t - 1) * n;
    A* c = cs + t * n;
    const bool test = early_exit && t >= 2;
    bool passed = true;
    row_pass(k, c_prev, col, n, [&](int64_t i, A d) {
      if (test) {
        passed &= row_sum_within(r_prev[i] * d, tol);
      }
      const A ri = A(1) / d;
      r[i] = ri;
      return ri;
    });
    if (test && passed) {
      return t - 1;
    }
    SYMKERNELS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      c[j] = A(1) / col[j];
    }
    if (!all_scalings_in_range(r, n) || !all_scalings_in_range(c, n)) {
      return 0;
    }
  }
  return limit;
}

// The log-domain row step f = -lse_j(L0 + g_prev), each row's log-sum-exp shifted by its maximum.
template <typename A>
SYMKERNELS_INLINE void log_row_step(const A* __restrict l0, const A* __restrict g_prev, int64_t n, A* __restrict f) {
  for (int64_t i = 0; i < n; ++i) {
    const A* li = l0 + i * n;
    A mx = -std::numeric_limits<A>::infinity();
    SYMKERNELS_SIMD_WITH(reduction(max : mx))
    for (int64_t j = 0; j < n; ++j) {
      mx = std::max(mx, li[j] + g_prev[j]);
    }
    A s = 0;
    SYMKERNELS_SIMD_SUM(s)
    for (int64_t j = 0; j < n; ++j) {
      s += fast_exp(li[j] + g_prev[j] - mx);
    }
    f[i] = -(mx + std::log(s));
  }
}

// The log-domain column step g = -lse_i(L0 + f), walking the matrix row by row (maxima first, then sums).
template <typename A>
SYMKERNELS_INLINE void log_col_step(const A* __restrict l0, const A* __restrict f, int64_t n, A* __restrict g,
                                    A* __restrict col_max, A* __restrict col_sum) {
  std::fill(col_max, col_max + n, -std::numeric_limits<A>::infinity());
  for (int64_t i = 0; i < n; ++i) {
    const A* li = l0 + i * n;
    const A fi = f[i];
    SYMKERNELS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      const A e = li[j] + fi;
      col_max[j] = e > col_max[j] ? e : col_max[j];
    }
  }
  std::fill(col_sum, col_sum + n, A(0));
  for (int64_t i = 0; i < n; ++i) {
    const A* li = l0 + i * n;
    const A fi = f[i];
    SYMKERNELS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      col_sum[j] += fast_exp(li[j] + fi - col_max[j]);
    }
  }
  for (int64_t j = 0; j < n; ++j) {
    g[j] = -(col_max[j] + std::log(col_sum[j]));
  }
}

// Log-domain iterations: g_0 = 0; f_t = -lse_j(L0 + g_{t-1}), g_t = -lse_i(L0 + f_t). With the early exit, the row
// step of iteration t also tests P_{t-1}: rowsum_i(P_{t-1}) = exp(f_{t-1}[i] - f_t[i]). fs: [T, n], gs: [T + 1, n].
// Returns T, the iterations kept.
template <typename A>
SYMKERNELS_INLINE int64_t log_iterate(const A* __restrict l0, int64_t n, int64_t limit, bool early_exit, A tol,
                                      A* __restrict fs, A* __restrict gs, A* __restrict col_max,
                                      A* __restrict col_sum) {
  std::fill(gs, gs + n, A(0));
  for (int64_t t = 1; t <= limit; ++t) {
    A* f = fs + (t - 1) * n;
    log_row_step(l0, gs + (t - 1) * n, n, f);
    if (early_exit && t >= 2) {
      const A* f_prev = fs + (t - 2) * n;
      bool passed = true;
      for (int64_t i = 0; i < n; ++i) {
        passed &= row_sum_within(std::exp(f_prev[i] - f[i]), tol);
      }
      if (passed) {
        return t - 1;
      }
    }
    log_col_step(l0, f, n, gs + t * n, col_max, col_sum);
  }
  return limit;
}

// c_1..c_T (or g_1..g_T), [T, n] in the compute type, into a matrix's slab of `cols` [n_iter, max_n]; every other
// entry of the slab is set to 0.
template <typename A>
SYMKERNELS_INLINE void save_cols(const A* __restrict cs, int64_t n, int64_t iterations, int64_t n_iter,
                                 int64_t max_n, double* __restrict slab) {
  for (int64_t t = 0; t < iterations; ++t) {
    double* row = slab + t * max_n;
    const A* c = cs + t * n;
    for (int64_t j = 0; j < n; ++j) {
      row[j] = static_cast<double>(c[j]);
    }
    std::fill(row + n, row + max_n, 0.0);
  }
  std::fill(slab + iterations * max_n, slab + n_iter * max_n, 0.0);
}

template <typename S, typename A>
struct ForwardArgs {
  const S* logits;
  S* p;
  double* cols;          // [M, n_iter, max_n]
  int32_t* domain;       // [M]
  int32_t* iterations;   // [M]
  const int32_t* caps;   // [M] or nullptr
  const int64_t* size;   // [M]
  const int64_t* offset; // [M]
  S tau;
  A tol;
  bool early_exit;
  int64_t n_iter;
  int64_t max_n;
};

// One matrix of the forward: P, its slab of cols, its domain and iterations.
template <typename S, typename A>
SYMKERNELS_INLINE void forward_matrix(const ForwardArgs<S, A>& a, int64_t m, Workspace<A>& ws) {
  const int64_t n = a.size[m];
  const S* x = a.logits + a.offset[m];
  S* p = a.p + a.offset[m];
  const int64_t limit = iteration_limit(a.caps, m, a.n_iter);
  A* k = ws.mat.data();
  A* row_max = ws.row_max.data();
  A* rs = ws.rows.data();
  A* cs = ws.cols.data();
  int64_t iterations = 0;  // stays 0 unless the scaling domain serves
  if (load_logits(x, a.tau, n, k, row_max)) {
    build_kernel(k, row_max, n);
    iterations = scaling_iterate(k, n, limit, a.early_exit, a.tol, rs, cs, ws.v1.data());
  }
  const bool scaling = iterations > 0;
  if (scaling) {
    const A* r = rs + (iterations - 1) * n;
    const A* c = cs + iterations * n;
    for (int64_t i = 0; i < n; ++i) {
      const A* ki = k + i * n;
      S* pi = p + i * n;
      const A ri = r[i];
      SYMKERNELS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        pi[j] = static_cast<S>(ri * ki[j] * c[j]);
      }
    }
  } else {
    load_logits(x, a.tau, n, k, row_max);  // K may have overwritten L0
    iterations = log_iterate(k, n, limit, a.early_exit, a.tol, rs, cs, ws.v1.data(), ws.v2.data());
    const A* f = rs + (iterations - 1) * n;
    const A* g = cs + iterations * n;
    for (int64_t i = 0; i < n; ++i) {
      const A* li = k + i * n;
      S* pi = p + i * n;
      const A fi = f[i];
      SYMKERNELS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        pi[j] = static_cast<S>(fast_exp(li[j] + fi + g[j]));
      }
    }
  }
  a.domain[m] = scaling ? kScalingDomain : kLogDomain;
  a.iterations[m] = static_cast<int32_t>(iterations);
  save_cols(cs + n, n, iterations, a.n_iter, a.max_n, a.cols + m * a.n_iter * a.max_n);
}

// ---------------------------------------------------------------------------------------------------------------
// Backward.
//
// It follows the adjoint M of the iterate L through the unrolled steps, as autograd of the log-domain loop does:
// M = Ḡ ⊙ P, then for t = T..1
//   column step: ḡ_t = colsum(M),  M -= B_t ⊙ (1 ḡ_t'),   B_t = exp(L0 + f_t 1' + 1 g_t')     (columns sum to 1)
//   row step:    f̄_t = rowsum(M),  M -= A_t ⊙ (f̄_t 1'),   A_t = exp(L0 + f_t 1' + 1 g_{t-1}') (rows sum to 1)
// and grad_logits = M / tau. Two steps are always done in matrix form, entry by entry, because they decide the
// accuracy of tiny gradients (saturated logits, P near a permutation): the first column step, as
// P ⊙ (Ḡ - 1 ḡ_T'), and the last row step, M - A_1 ⊙ (rowsum(M) 1'), which cancels the rounding error of the
// entry dominating its row of A_1 and leaves it equal to minus the sum of the others.
//
// In the scaling domain, with A_t = r_t K c_{t-1}' and B_t = r_t K c_t' (elementwise in K), the sums of M follow
// from matrix-vector products with K:
//   ḡ_T = colsum(Ḡ ⊙ P);  f̄_T = r_T ⊙ rowsum(K ⊙ (Ḡ - 1 ḡ_T') ⊙ 1 c_T');  f̄_t = -r_t ⊙ K (c_t ⊙ ḡ_t) for t < T;
//   ḡ_{t-1} = -c_{t-1} ⊙ K' (r_t ⊙ f̄_t),
// and M before the last row step is K ⊙ (r_T c_T' ⊙ (Ḡ - 1 ḡ_T') - X) with
//   X = sum_{t=1}^{T-1} r_t (c_t ⊙ ḡ_t)' + sum_{t=2}^{T} (r_t ⊙ f̄_t) c_{t-1}' = left @ right,
// left [n, 2T-2] and right [2T-2, n] formed along the way, multiplied once at the end in blocks of 4 rows.

template <typename S, typename A>
SYMKERNELS_INLINE void scaling_backward(const A* __restrict k, const S* __restrict grad, int64_t n, int64_t iterations,
                                        const A* __restrict rs, const A* __restrict cs, A inv_tau,
                                        Workspace<A>& ws, S* __restrict out) {
  const int64_t width = 2 * (iterations - 1);
  const int64_t half = iterations - 1;
  const A* r_last = rs + (iterations - 1) * n;
  const A* c_last = cs + iterations * n;
  A* g_last_bar = ws.v1.data();  // ḡ_T
  A* col = ws.v2.data();
  // left columns: r_1..r_{T-1}, then r_2 ⊙ f̄_2..r_T ⊙ f̄_T; right rows: c_1 ⊙ ḡ_1..c_{T-1} ⊙ ḡ_{T-1}, then
  // c_1..c_{T-1}.
  A* left = ws.left.data();
  A* right = ws.right.data();

  // ḡ_T = colsum(Ḡ ⊙ P), Ḡ ⊙ P = r_T[i] (Ḡ ⊙ K)[i, j] c_T[j].
  std::fill(g_last_bar, g_last_bar + n, A(0));
  for (int64_t i = 0; i < n; ++i) {
    const A* ki = k + i * n;
    const S* gi = grad + i * n;
    const A ri = r_last[i];
    SYMKERNELS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      g_last_bar[j] += ri * (static_cast<A>(gi[j]) * ki[j] * c_last[j]);
    }
  }

  for (int64_t t = iterations; t >= 2; --t) {
    const A* r = rs + (t - 1) * n;
    const A* r_prev = rs + (t - 2) * n;
    const A* c_prev = cs + (t - 1) * n;
    // f̄_t[i] = r_t[i] d_i, w_i = r_t[i] f̄_t[i]; record r_{t-1} and w in left.
    auto record = [=](int64_t i, A d) {
      const A w = r[i] * (r[i] * d);
      left[i * width + half + (t - 2)] = w;
      left[i * width + (t - 2)] = r_prev[i];
      return w;
    };
    if (t == iterations) {
      // d_i = sum_j K_ij c_T[j] (Ḡ_ij - ḡ_T[j]), then col = sum_i w_i K_i.
      A* w = ws.v3.data();
      for (int64_t i = 0; i < n; ++i) {
        const A* ki = k + i * n;
        const S* gi = grad + i * n;
        A s = 0;
        SYMKERNELS_SIMD_SUM(s)
        for (int64_t j = 0; j < n; ++j) {
          s += ki[j] * c_last[j] * (static_cast<A>(gi[j]) - g_last_bar[j]);
        }
        w[i] = record(i, s);
      }
      weighted_row_sum(k, w, col, n);
    } else {
      // d_i = -K_i · (c_t ⊙ ḡ_t)
      row_pass(k, right + (t - 1) * n, col, n, [&](int64_t i, A dot_i) { return record(i, -dot_i); });
    }
    // ḡ_{t-1} = -c_{t-1} ⊙ col
    A* u_prev = right + (t - 2) * n;
    A* c_row = right + (half + (t - 2)) * n;
    SYMKERNELS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      u_prev[j] = -c_prev[j] * c_prev[j] * col[j];
      c_row[j] = c_prev[j];
    }
  }

  // Row i: M_i = K_i ⊙ (r_T[i] c_T ⊙ (Ḡ_i - ḡ_T) - X_i), then grad_i = (M_i - A_1[i] rowsum(M_i)) / tau with
  // A_1[i] = r_1[i] K_i.
  std::fill(left + n * width, left + (n + 4) * width, A(0));
  A* block = ws.block.data();
  for (int64_t i0 = 0; i0 < n; i0 += 4) {
    if (width > 0) {
      left_times_right(left, right, width, n, i0, block);
    } else {
      std::fill(block, block + 4 * n, A(0));
    }
    const int64_t rows = std::min<int64_t>(4, n - i0);
    for (int64_t b = 0; b < rows; ++b) {
      const int64_t i = i0 + b;
      A* x = block + b * n;
      const A* ki = k + i * n;
      const S* gi = grad + i * n;
      const A ri = r_last[i];
      A s = 0;
      SYMKERNELS_SIMD_SUM(s)
      for (int64_t j = 0; j < n; ++j) {
        const A mij = ki[j] * (ri * c_last[j] * (static_cast<A>(gi[j]) - g_last_bar[j]) - x[j]);
        x[j] = mij;
        s += mij;
      }
      const A a = rs[i] * s;
      S* oi = out + i * n;
      SYMKERNELS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        oi[j] = static_cast<S>((x[j] - a * ki[j]) * inv_tau);
      }
    }
  }
}

// Backward in the log domain: the matrix form, step by step, with A_t and B_t formed entrywise (both are
// normalised iterates: exponents <= ~0). One row-major pass per iteration: a row's column step, its row sum, its
// row step, and its contribution to the next column sums.
template <typename S, typename A>
SYMKERNELS_INLINE void log_backward(const A* __restrict l0, const S* __restrict grad, int64_t n, int64_t iterations,
                                    const A* __restrict fs, const A* __restrict gs, A inv_tau, Workspace<A>& ws,
                                    S* __restrict out) {
  if (ws.adjoint.size() < static_cast<size_t>(n * n)) {
    ws.adjoint.resize(static_cast<size_t>(n * n));
  }
  A* mat = ws.adjoint.data();
  A* g_bar = ws.v1.data();
  A* col = ws.v2.data();
  const A* f_last = fs + (iterations - 1) * n;
  const A* g_last = gs + iterations * n;

  std::fill(g_bar, g_bar + n, A(0));
  for (int64_t i = 0; i < n; ++i) {
    const A* li = l0 + i * n;
    const S* gi = grad + i * n;
    A* mi = mat + i * n;
    const A fi = f_last[i];
    SYMKERNELS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      const A e = static_cast<A>(gi[j]) * fast_exp(li[j] + fi + g_last[j]);
      mi[j] = e;
      g_bar[j] += e;
    }
  }

  for (int64_t t = iterations; t >= 1; --t) {
    const A* f = fs + (t - 1) * n;
    const A* g = gs + t * n;
    const A* g_prev = gs + (t - 1) * n;
    std::fill(col, col + n, A(0));
    for (int64_t i = 0; i < n; ++i) {
      const A* li = l0 + i * n;
      A* mi = mat + i * n;
      const A fi = f[i];
      A s = 0;
      SYMKERNELS_SIMD_SUM(s)
      for (int64_t j = 0; j < n; ++j) {
        const A m = mi[j] - fast_exp(li[j] + fi + g[j]) * g_bar[j];
        mi[j] = m;
        s += m;
      }
      SYMKERNELS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        const A m = mi[j] - fast_exp(li[j] + fi + g_prev[j]) * s;
        mi[j] = m;
        col[j] += m;
      }
    }
    std::swap(g_bar, col);
  }
  SYMKERNELS_SIMD
  for (int64_t e = 0; e < n * n; ++e) {
    out[e] = static_cast<S>(mat[e] * inv_tau);
  }
}

template <typename S>
struct BackwardArgs {
  const S* grad;
  const S* logits;
  const double* cols;         // [M, n_iter, max_n]
  const int32_t* domain;      // [M]
  const int32_t* iterations;  // [M]
  S* out;
  const int64_t* size;        // [M]
  const int64_t* offset;      // [M]
  S tau;
  int64_t n_iter;
  int64_t max_n;
};

// One matrix of the backward in the domain its forward ran in. K (or L0) is rebuilt from the logits with the
// forward's code, c_t (or g_t) are read back exactly (cols holds the compute-type values, widened), and r_t (or f_t)
// are recomputed with the forward's code, so the backward differentiates the very iterates the forward produced.
template <typename S, typename A>
SYMKERNELS_INLINE void backward_matrix(const BackwardArgs<S>& a, int64_t m, Workspace<A>& ws) {
  const int64_t n = a.size[m];
  const int64_t iterations = a.iterations[m];
  const S* grad = a.grad + a.offset[m];
  const S* x = a.logits + a.offset[m];
  S* out = a.out + a.offset[m];
  const double* slab = a.cols + m * a.n_iter * a.max_n;
  A* k = ws.mat.data();
  A* rs = ws.rows.data();
  A* cs = ws.cols.data();
  const A inv_tau = A(1) / static_cast<A>(a.tau);
  load_logits(x, a.tau, n, k, ws.row_max.data());
  for (int64_t t = 1; t <= iterations; ++t) {
    const double* saved = slab + (t - 1) * a.max_n;
    A* c = cs + t * n;
    for (int64_t j = 0; j < n; ++j) {
      c[j] = static_cast<A>(saved[j]);
    }
  }
  if (a.domain[m] == kScalingDomain) {
    build_kernel(k, ws.row_max.data(), n);
    std::fill(cs, cs + n, A(1));
    for (int64_t t = 1; t <= iterations; ++t) {
      A* r = rs + (t - 1) * n;
      row_dots(k, cs + (t - 1) * n, n, [r](int64_t i, A d) { r[i] = A(1) / d; });
    }
    scaling_backward(k, grad, n, iterations, rs, cs, inv_tau, ws, out);
  } else {
    std::fill(cs, cs + n, A(0));
    for (int64_t t = 1; t <= iterations; ++t) {
      log_row_step(k, cs + (t - 1) * n, n, rs + (t - 1) * n);
    }
    log_backward(k, grad, n, iterations, rs, cs, inv_tau, ws, out);
  }
}

// ---------------------------------------------------------------------------------------------------------------
// Drivers over a range of matrices, one per ISA.

template <typename S, typename A>
SYMKERNELS_INLINE void forward_range_impl(const ForwardArgs<S, A>& a, int64_t begin, int64_t end) {
  const int64_t n = *std::max_element(a.size + begin, a.size + end);
  Workspace<A> ws(n, a.n_iter, /*backward=*/false);
  for (int64_t m = begin; m < end; ++m) {
    forward_matrix<S, A>(a, m, ws);
  }
}

template <typename S, typename A>
SYMKERNELS_INLINE void backward_range_impl(const BackwardArgs<S>& a, int64_t begin, int64_t end) {
  const int64_t n = *std::max_element(a.size + begin, a.size + end);
  const int64_t iterations = *std::max_element(a.iterations + begin, a.iterations + end);
  Workspace<A> ws(n, iterations, /*backward=*/true);
  for (int64_t m = begin; m < end; ++m) {
    backward_matrix<S, A>(a, m, ws);
  }
}

template <typename S, typename A>
void forward_range(const ForwardArgs<S, A>& a, int64_t begin, int64_t end) {
  forward_range_impl<S, A>(a, begin, end);
}

template <typename S, typename A>
void backward_range(const BackwardArgs<S>& a, int64_t begin, int64_t end) {
  backward_range_impl<S, A>(a, begin, end);
}

#if SYMKERNELS_SINKHORN_AVX2
template <typename S, typename A>
__attribute__((target("avx2,fma"))) void forward_range_avx2(const ForwardArgs<S, A>& a, int64_t begin,
                                                            int64_t end) {
  forward_range_impl<S, A>(a, begin, end);
}

template <typename S, typename A>
__attribute__((target("avx2,fma"))) void backward_range_avx2(const BackwardArgs<S>& a, int64_t begin,
                                                             int64_t end) {
  backward_range_impl<S, A>(a, begin, end);
}

bool cpu_has_avx2_fma() {
  static const bool supported = [] {
    __builtin_cpu_init();
    return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  }();
  return supported;
}
#endif

// Multiply-adds (n^2 per iteration and matrix) a task should carry at least, so that a stack of small matrices is
// not spread over threads one matrix at a time.
constexpr int64_t kMinTaskWork = int64_t{1} << 17;

// Runs range(begin, end) over all M matrices, cut into tasks of consecutive matrices of at least kMinTaskWork
// multiply-adds each (estimated as n_m^2 times the iterations: per_matrix[m], or n_iter when per_matrix is null),
// the tasks spread over the threads.
template <typename Range>
void run_tasks(int64_t num_matrices, const int64_t* size, const int32_t* per_matrix, int64_t n_iter,
               const Range& range) {
  std::vector<int64_t> bounds{0};
  int64_t task_work = 0;
  for (int64_t m = 0; m < num_matrices; ++m) {
    // (n^2 capped: a matrix that big is a task of its own anyway, and the product stays far from overflow.)
    task_work += std::min(size[m] * size[m], kMinTaskWork) * iteration_limit(per_matrix, m, n_iter);
    if (task_work >= kMinTaskWork) {
      bounds.push_back(m + 1);
      task_work = 0;
    }
  }
  if (bounds.back() != num_matrices) {
    bounds.push_back(num_matrices);
  }
  const auto num_tasks = static_cast<int64_t>(bounds.size()) - 1;
  at::parallel_for(0, num_tasks, 1, [&](int64_t begin, int64_t end) { range(bounds[begin], bounds[end]); });
}

}  // namespace

void sinkhorn_forward_cpu(const at::Tensor& logits, const RaggedLayout& layout, int64_t n_iter, double tau,
                          double tol, const int32_t* caps, const at::Tensor& p, const at::Tensor& cols,
                          const at::Tensor& domain, const at::Tensor& iterations) {
  const int64_t* size = layout.size.data();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "sinkhorn_forward_cpu", [&] {
    using A = typename ComputeType<scalar_t>::type;
    const ForwardArgs<scalar_t, A> args{logits.const_data_ptr<scalar_t>(),
                                        p.mutable_data_ptr<scalar_t>(),
                                        cols.mutable_data_ptr<double>(),
                                        domain.mutable_data_ptr<int32_t>(),
                                        iterations.mutable_data_ptr<int32_t>(),
                                        caps,
                                        size,
                                        layout.offset.data(),
                                        static_cast<scalar_t>(tau),
                                        static_cast<A>(tol),
                                        early_exit_enabled(tol),
                                        n_iter,
                                        layout.max_n};
    auto range = &forward_range<scalar_t, A>;
#if SYMKERNELS_SINKHORN_AVX2
    if (cpu_has_avx2_fma()) {
      range = &forward_range_avx2<scalar_t, A>;
    }
#endif
    run_tasks(layout.num_matrices(), size, caps, n_iter, [&](int64_t begin, int64_t end) { range(args, begin, end); });
  });
}

void sinkhorn_backward_cpu(const at::Tensor& grad_p, const at::Tensor& logits, const RaggedLayout& layout,
                           const at::Tensor& cols, const at::Tensor& domain, const at::Tensor& iterations, double tau,
                           const at::Tensor& grad_logits) {
  const int64_t* size = layout.size.data();
  const int32_t* ran = iterations.const_data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "sinkhorn_backward_cpu", [&] {
    using A = typename ComputeType<scalar_t>::type;
    const BackwardArgs<scalar_t> args{grad_p.const_data_ptr<scalar_t>(),
                                      logits.const_data_ptr<scalar_t>(),
                                      cols.const_data_ptr<double>(),
                                      domain.const_data_ptr<int32_t>(),
                                      ran,
                                      grad_logits.mutable_data_ptr<scalar_t>(),
                                      size,
                                      layout.offset.data(),
                                      static_cast<scalar_t>(tau),
                                      cols.size(1),
                                      layout.max_n};
    auto range = &backward_range<scalar_t, A>;
#if SYMKERNELS_SINKHORN_AVX2
    if (cpu_has_avx2_fma()) {
      range = &backward_range_avx2<scalar_t, A>;
    }
#endif
    run_tasks(layout.num_matrices(), size, ran, cols.size(1),
              [&](int64_t begin, int64_t end) { range(args, begin, end); });
  });
}

}  // namespace sinkhorn_detail
}  // namespace symkernels
