// CPU kernels of symkernels::sinkhorn_forward / sinkhorn_backward: matrices in parallel, one task per chunk of
// matrices with its buffers allocated once.
//
// Each matrix is iterated in one of two domains, decided from its logits alone (so the backward decides alike):
// * scaling domain (the normal case): K = exp(L0 - rowmax) is built once, then every iteration is
//   r = 1 / (K c), c = 1 / (K' r): one row-major pass over K (a dot product and an axpy per row), no exp;
// * log domain (fallback): max-shifted log-sum-exp iterations on the log-scalings, for matrices whose logits are
//   too spread out for K (see ScalingLimits), whose scalings leave the safe range, or with non-finite logits.
// The backward is the exact vector-Jacobian product of the T-step map (see "Backward" below).
//
// Everything inside a matrix is computed in compute_t, double for both float32 and float64 inputs: only the
// logits, grad_p and the outputs are in the input type. (The code is generic in it; float would run float32
// inputs ~2x faster at the accuracy of the float32 eager reference, and with the float limits of ScalingLimits.)
// On x86-64 the per-matrix code is compiled twice, for the baseline ISA and for AVX2+FMA, and the second is used
// where the CPU has it.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <tuple>
#include <type_traits>
#include <vector>

#include "sinkhorn/common.h"

#if defined(__GNUC__)
#define SYMKERNELS_INLINE inline __attribute__((always_inline))
#else
#define SYMKERNELS_INLINE inline
#endif

// Inner loops are written for the vectoriser; `omp simd` lets it vectorise a loop whose independence it cannot
// prove (the build passes -fopenmp; without OpenMP the loops stay correct, only scalar).
#if defined(_OPENMP)
#define SYMKERNELS_PRAGMA(x) _Pragma(#x)
#define SYMKERNELS_SIMD_WITH(clauses) SYMKERNELS_PRAGMA(omp simd clauses)
#else
#define SYMKERNELS_SIMD_WITH(clauses)
#endif
#define SYMKERNELS_SIMD SYMKERNELS_SIMD_WITH()
#define SYMKERNELS_SIMD_SUM(var) SYMKERNELS_SIMD_WITH(reduction(+ : var))

#ifndef SYMKERNELS_SINKHORN_AVX2  // defining it as 0 builds the baseline code only
#if defined(__x86_64__) && defined(__GNUC__)
#define SYMKERNELS_SINKHORN_AVX2 1
#else
#define SYMKERNELS_SINKHORN_AVX2 0
#endif
#endif

namespace symkernels {
namespace {

using sinkhorn_detail::ScalingLimits;

// ---------------------------------------------------------------------------------------------------------------
// exp for the vectoriser: Cody-Waite reduction x = k ln2 + r, |r| <= ln2 / 2, a Taylor polynomial for e^r and
// 2^k assembled in the exponent bits. ~1 ulp; exp(x) = 0 below `lo`, +inf above `hi`, NaN stays NaN.

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

// 1/m! for m = 0..D, computed at compile time.
template <typename A, int D>
struct InverseFactorials {
  static constexpr std::array<A, D + 1> value = [] {
    std::array<A, D + 1> c{};
    double f = 1.0;
    for (int m = 0; m <= D; ++m) {
      f *= m > 1 ? m : 1;
      c[m] = static_cast<A>(1.0 / f);
    }
    return c;
  }();
};

// sum_{m=M..D} r^(m-M) / m!, written out (no loop for the vectoriser to see).
template <typename A, int M, int D>
SYMKERNELS_INLINE A horner(A r) {
  constexpr A coef = InverseFactorials<A, D>::value[M];
  if constexpr (M == D) {
    return coef;
  } else {
    return horner<A, M + 1, D>(r) * r + coef;
  }
}

// std::bit_cast is C++20, and torch 2.11 builds extensions as C++17. memcpy of a register-sized value compiles to
// a move, so the vectoriser sees the same code.
template <typename To, typename From>
SYMKERNELS_INLINE To bit_cast(const From& from) {
  static_assert(sizeof(To) == sizeof(From), "bit_cast between types of different sizes");
  To to;
  std::memcpy(&to, &from, sizeof(To));
  return to;
}

template <typename A>
SYMKERNELS_INLINE A fast_exp(A x) {
  using C = ExpConstants<A>;
  using Bits = typename C::Bits;
  // Out-of-range x produces garbage bits below, replaced at the end with bit masks: selects (or a clamp of x) let
  // the compiler branch on the range, which keeps the loop from being vectorised.
  const A t = x * C::log2e + C::shifter;
  const A k = t - C::shifter;
  const A r = (x - k * C::ln2_hi) - k * C::ln2_lo;
  const A p = horner<A, 0, C::degree>(r);
  const Bits e = bit_cast<Bits>(t) - bit_cast<Bits>(C::shifter) + C::bias;
  const A scale = bit_cast<A>(static_cast<Bits>(e << C::mantissa_bits));
  const Bits keep = -static_cast<Bits>(!(x < C::lo));  // all ones unless exp(x) underflows (NaN: kept, stays NaN)
  const Bits over = -static_cast<Bits>(x > C::hi);     // all ones where exp(x) overflows
  const Bits inf = bit_cast<Bits>(std::numeric_limits<A>::infinity());
  const Bits y = (bit_cast<Bits>(p * scale) & keep & ~over) | (inf & over);
  return bit_cast<A>(y);
}

// ---------------------------------------------------------------------------------------------------------------
// Vector kernels.

#if defined(__GNUC__)
// 32-byte vectors of GNU C: one AVX2 register in the AVX2+FMA build, two SSE2 registers in the baseline one.
// They only ever live in local variables (loaded and stored with memcpy), so no vector crosses a call.
#define SYMKERNELS_VECTORS 1
template <typename A>
struct VectorOf {
  typedef A type __attribute__((vector_size(32)));
};
template <typename A>
using Vec = typename VectorOf<A>::type;
#else
#define SYMKERNELS_VECTORS 0
#endif

// sum_j a[j] * b[j], with four independent vector partial sums so the adds do not wait on each other.
template <typename A>
SYMKERNELS_INLINE A dot(const A* __restrict a, const A* __restrict b, int64_t n) {
  int64_t j = 0;
  A s = 0;
#if SYMKERNELS_VECTORS
  using V = Vec<A>;
  constexpr int64_t w = sizeof(V) / sizeof(A);
  V s0{}, s1{}, s2{}, s3{}, x, y;
  for (; j + 4 * w <= n; j += 4 * w) {
    __builtin_memcpy(&x, a + j, sizeof(V));
    __builtin_memcpy(&y, b + j, sizeof(V));
    s0 += x * y;
    __builtin_memcpy(&x, a + j + w, sizeof(V));
    __builtin_memcpy(&y, b + j + w, sizeof(V));
    s1 += x * y;
    __builtin_memcpy(&x, a + j + 2 * w, sizeof(V));
    __builtin_memcpy(&y, b + j + 2 * w, sizeof(V));
    s2 += x * y;
    __builtin_memcpy(&x, a + j + 3 * w, sizeof(V));
    __builtin_memcpy(&y, b + j + 3 * w, sizeof(V));
    s3 += x * y;
  }
  for (; j + w <= n; j += w) {
    __builtin_memcpy(&x, a + j, sizeof(V));
    __builtin_memcpy(&y, b + j, sizeof(V));
    s0 += x * y;
  }
  const V v = (s0 + s1) + (s2 + s3);
  for (int64_t l = 0; l < w; ++l) {
    s += v[l];
  }
#endif
  for (; j < n; ++j) {
    s += a[j] * b[j];
  }
  return s;
}

// y += alpha * x
template <typename A>
SYMKERNELS_INLINE void axpy(A* __restrict y, A alpha, const A* __restrict x, int64_t n) {
  SYMKERNELS_SIMD
  for (int64_t j = 0; j < n; ++j) {
    y[j] += alpha * x[j];
  }
}

// out[b] = k_b · v for four rows k_0..k_3, sharing the loads of v (two vector partial sums per row).
template <typename A>
SYMKERNELS_INLINE void dot4(const A* __restrict k0, const A* __restrict k1, const A* __restrict k2,
                            const A* __restrict k3, const A* __restrict v, int64_t n, A* __restrict out) {
  int64_t j = 0;
  A d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#if SYMKERNELS_VECTORS
  using V = Vec<A>;
  constexpr int64_t w = sizeof(V) / sizeof(A);
  V s0{}, s1{}, s2{}, s3{}, t0{}, t1{}, t2{}, t3{}, x, y, z;
  for (; j + 2 * w <= n; j += 2 * w) {
    __builtin_memcpy(&x, v + j, sizeof(V));
    __builtin_memcpy(&y, v + j + w, sizeof(V));
    __builtin_memcpy(&z, k0 + j, sizeof(V));
    s0 += z * x;
    __builtin_memcpy(&z, k0 + j + w, sizeof(V));
    t0 += z * y;
    __builtin_memcpy(&z, k1 + j, sizeof(V));
    s1 += z * x;
    __builtin_memcpy(&z, k1 + j + w, sizeof(V));
    t1 += z * y;
    __builtin_memcpy(&z, k2 + j, sizeof(V));
    s2 += z * x;
    __builtin_memcpy(&z, k2 + j + w, sizeof(V));
    t2 += z * y;
    __builtin_memcpy(&z, k3 + j, sizeof(V));
    s3 += z * x;
    __builtin_memcpy(&z, k3 + j + w, sizeof(V));
    t3 += z * y;
  }
  for (; j + w <= n; j += w) {
    __builtin_memcpy(&x, v + j, sizeof(V));
    __builtin_memcpy(&z, k0 + j, sizeof(V));
    s0 += z * x;
    __builtin_memcpy(&z, k1 + j, sizeof(V));
    s1 += z * x;
    __builtin_memcpy(&z, k2 + j, sizeof(V));
    s2 += z * x;
    __builtin_memcpy(&z, k3 + j, sizeof(V));
    s3 += z * x;
  }
  s0 += t0;
  s1 += t1;
  s2 += t2;
  s3 += t3;
  for (int64_t l = 0; l < w; ++l) {
    d0 += s0[l];
    d1 += s1[l];
    d2 += s2[l];
    d3 += s3[l];
  }
#endif
  for (; j < n; ++j) {
    d0 += k0[j] * v[j];
    d1 += k1[j] * v[j];
    d2 += k2[j] * v[j];
    d3 += k3[j] * v[j];
  }
  out[0] = d0;
  out[1] = d1;
  out[2] = d2;
  out[3] = d3;
}

// col = sum_i alpha_i K_i, rows in blocks of 4 (col loaded and stored once per block).
template <typename A>
SYMKERNELS_INLINE void weighted_row_sum(const A* __restrict k, const A* __restrict alpha, A* __restrict col,
                                        int64_t n) {
  std::fill(col, col + n, A(0));
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const A* k0 = k + i * n;
    const A* k1 = k0 + n;
    const A* k2 = k1 + n;
    const A* k3 = k2 + n;
    const A a0 = alpha[i], a1 = alpha[i + 1], a2 = alpha[i + 2], a3 = alpha[i + 3];
    SYMKERNELS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      col[j] += a0 * k0[j] + a1 * k1[j] + a2 * k2[j] + a3 * k3[j];
    }
  }
  for (; i < n; ++i) {
    axpy(col, alpha[i], k + i * n, n);
  }
}

// One pass over K [n, n]: alpha_i = fn(i, K_i · v) for every row i, and col = sum_i alpha_i K_i. Rows go in blocks
// of 4, so v and col are loaded (and col stored) once per block.
template <typename A, typename Fn>
SYMKERNELS_INLINE void row_pass(const A* __restrict k, const A* __restrict v, A* __restrict col, int64_t n, Fn&& fn) {
  std::fill(col, col + n, A(0));
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const A* k0 = k + i * n;
    const A* k1 = k0 + n;
    const A* k2 = k1 + n;
    const A* k3 = k2 + n;
    A d[4];
    dot4(k0, k1, k2, k3, v, n, d);
    const A a0 = fn(i, d[0]), a1 = fn(i + 1, d[1]), a2 = fn(i + 2, d[2]), a3 = fn(i + 3, d[3]);
    SYMKERNELS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      col[j] += a0 * k0[j] + a1 * k1[j] + a2 * k2[j] + a3 * k3[j];
    }
  }
  for (; i < n; ++i) {
    const A* ki = k + i * n;
    axpy(col, fn(i, dot(ki, v, n)), ki, n);
  }
}

// Whether every v[j] lies in [lo, hi] (false for NaN).
template <typename A>
SYMKERNELS_INLINE bool all_in_range(const A* v, int64_t n, A lo, A hi) {
  int bad = 0;
  for (int64_t j = 0; j < n; ++j) {
    bad |= !((v[j] >= lo) & (v[j] <= hi));
  }
  return bad == 0;
}

// ---------------------------------------------------------------------------------------------------------------
// Per-task buffers, sized once for matrices of n rows and T iterations.

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
  return probe == A(0) && spread <= ScalingLimits<A>::max_spread;
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

// Scaling-domain iterations: c_0 = 1; for t = 1..T: r_t = 1 / (K c_{t-1}), c_t = 1 / (K' r_t), one row-major
// pass over K per iteration (the row's dot product, then its contribution to the column sums).
// rs: [T, n], cs: [T + 1, n]. False as soon as a scaling leaves the safe range (or is NaN).
template <typename A>
SYMKERNELS_INLINE bool scaling_iterate(const A* __restrict k, int64_t n, int64_t n_iter, A* __restrict rs,
                                       A* __restrict cs, A* __restrict col) {
  const A lo = std::exp(-ScalingLimits<A>::max_log_scaling);
  const A hi = std::exp(ScalingLimits<A>::max_log_scaling);
  std::fill(cs, cs + n, A(1));
  for (int64_t t = 0; t < n_iter; ++t) {
    const A* c_prev = cs + t * n;
    A* r = rs + t * n;
    A* c = cs + (t + 1) * n;
    row_pass(k, c_prev, col, n, [r](int64_t i, A d) {
      const A ri = A(1) / d;
      r[i] = ri;
      return ri;
    });
    SYMKERNELS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      c[j] = A(1) / col[j];
    }
    if (!all_in_range(r, n, lo, hi) || !all_in_range(c, n, lo, hi)) {
      return false;
    }
  }
  return true;
}

// Log-domain iterations: g_0 = 0; f_t = -lse_j(L0 + g_{t-1}), g_t = -lse_i(L0 + f_t), every log-sum-exp
// shifted by its maximum; the column ones walk the matrix row by row (maxima first, then sums).
// fs: [T, n], gs: [T + 1, n].
template <typename A>
SYMKERNELS_INLINE void log_iterate(const A* __restrict l0, int64_t n, int64_t n_iter, A* __restrict fs,
                                   A* __restrict gs, A* __restrict col_max, A* __restrict col_sum) {
  std::fill(gs, gs + n, A(0));
  for (int64_t t = 0; t < n_iter; ++t) {
    const A* g_prev = gs + t * n;
    A* f = fs + t * n;
    A* g = gs + (t + 1) * n;
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
}

// One matrix of the forward: P [n, n], f [T, n], g [T, n].
template <typename S, typename A>
SYMKERNELS_INLINE void forward_matrix(const S* x, S tau, int64_t n, int64_t n_iter, Workspace<A>& ws, S* p, S* f,
                                      S* g) {
  A* k = ws.mat.data();
  A* m = ws.row_max.data();
  A* rs = ws.rows.data();
  A* cs = ws.cols.data();
  bool scaling = load_logits(x, tau, n, k, m);
  if (scaling) {
    build_kernel(k, m, n);
    scaling = scaling_iterate(k, n, n_iter, rs, cs, ws.v1.data());
  }
  if (scaling) {
    for (int64_t t = 0; t < n_iter; ++t) {
      const A* r = rs + t * n;
      const A* c = cs + (t + 1) * n;
      S* ft = f + t * n;
      S* gt = g + t * n;
      for (int64_t i = 0; i < n; ++i) {
        ft[i] = static_cast<S>(std::log(r[i]) - m[i]);
        gt[i] = static_cast<S>(std::log(c[i]));
      }
    }
    const A* r = rs + (n_iter - 1) * n;
    const A* c = cs + n_iter * n;
    for (int64_t i = 0; i < n; ++i) {
      const A* ki = k + i * n;
      S* pi = p + i * n;
      const A ri = r[i];
      SYMKERNELS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        pi[j] = static_cast<S>(ri * ki[j] * c[j]);
      }
    }
    return;
  }
  load_logits(x, tau, n, k, m);  // K may have overwritten L0
  log_iterate(k, n, n_iter, rs, cs, ws.v1.data(), ws.v2.data());
  for (int64_t t = 0; t < n_iter; ++t) {
    for (int64_t i = 0; i < n; ++i) {
      f[t * n + i] = static_cast<S>(rs[t * n + i]);
      g[t * n + i] = static_cast<S>(cs[(t + 1) * n + i]);
    }
  }
  const A* f_last = rs + (n_iter - 1) * n;
  const A* g_last = cs + n_iter * n;
  for (int64_t i = 0; i < n; ++i) {
    const A* li = k + i * n;
    S* pi = p + i * n;
    const A fi = f_last[i];
    SYMKERNELS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      pi[j] = static_cast<S>(fast_exp(li[j] + fi + g_last[j]));
    }
  }
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

// X for rows i0..i0+3 into out [4, n]: out[b] = left[i0 + b] @ right; rows past n read zero padding. Register
// tiles of 4 rows x 2 vectors, accumulated over the 2T-2 inner products.
template <typename A>
SYMKERNELS_INLINE void left_times_right(const A* __restrict left, const A* __restrict right, int64_t width,
                                        int64_t n, int64_t i0, A* __restrict out) {
  const A* l0 = left + i0 * width;
  const A* l1 = l0 + width;
  const A* l2 = l1 + width;
  const A* l3 = l2 + width;
  A* o0 = out;
  A* o1 = o0 + n;
  A* o2 = o1 + n;
  A* o3 = o2 + n;
  int64_t j0 = 0;
#if SYMKERNELS_VECTORS
  using V = Vec<A>;
  constexpr int64_t w = sizeof(V) / sizeof(A);
  for (; j0 + 2 * w <= n; j0 += 2 * w) {
    V c00{}, c01{}, c10{}, c11{}, c20{}, c21{}, c30{}, c31{}, b0, b1;
    for (int64_t q = 0; q < width; ++q) {
      const A* rq = right + q * n + j0;
      __builtin_memcpy(&b0, rq, sizeof(V));
      __builtin_memcpy(&b1, rq + w, sizeof(V));
      const A a0 = l0[q], a1 = l1[q], a2 = l2[q], a3 = l3[q];
      c00 += a0 * b0;
      c01 += a0 * b1;
      c10 += a1 * b0;
      c11 += a1 * b1;
      c20 += a2 * b0;
      c21 += a2 * b1;
      c30 += a3 * b0;
      c31 += a3 * b1;
    }
    __builtin_memcpy(o0 + j0, &c00, sizeof(V));
    __builtin_memcpy(o0 + j0 + w, &c01, sizeof(V));
    __builtin_memcpy(o1 + j0, &c10, sizeof(V));
    __builtin_memcpy(o1 + j0 + w, &c11, sizeof(V));
    __builtin_memcpy(o2 + j0, &c20, sizeof(V));
    __builtin_memcpy(o2 + j0 + w, &c21, sizeof(V));
    __builtin_memcpy(o3 + j0, &c30, sizeof(V));
    __builtin_memcpy(o3 + j0 + w, &c31, sizeof(V));
  }
#endif
  if (j0 < n) {
    for (int64_t j = j0; j < n; ++j) {
      o0[j] = o1[j] = o2[j] = o3[j] = A(0);
    }
    for (int64_t q = 0; q < width; ++q) {
      const A* rq = right + q * n;
      const A a0 = l0[q], a1 = l1[q], a2 = l2[q], a3 = l3[q];
      SYMKERNELS_SIMD
      for (int64_t j = j0; j < n; ++j) {
        o0[j] += a0 * rq[j];
        o1[j] += a1 * rq[j];
        o2[j] += a2 * rq[j];
        o3[j] += a3 * rq[j];
      }
    }
  }
}

template <typename S, typename A>
SYMKERNELS_INLINE void scaling_backward(const A* __restrict k, const S* __restrict grad, int64_t n, int64_t n_iter,
                                        const A* __restrict rs, const A* __restrict cs, A inv_tau,
                                        Workspace<A>& ws, S* __restrict out) {
  const int64_t width = 2 * (n_iter - 1);
  const int64_t half = n_iter - 1;
  const A* r_last = rs + (n_iter - 1) * n;
  const A* c_last = cs + n_iter * n;
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

  for (int64_t t = n_iter; t >= 2; --t) {
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
    if (t == n_iter) {
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
SYMKERNELS_INLINE void log_backward(const A* __restrict l0, const S* __restrict grad, int64_t n, int64_t n_iter,
                                    const A* __restrict fs, const A* __restrict gs, A inv_tau, Workspace<A>& ws,
                                    S* __restrict out) {
  if (ws.adjoint.empty()) {
    ws.adjoint.resize(static_cast<size_t>(n * n));
  }
  A* mat = ws.adjoint.data();
  A* g_bar = ws.v1.data();
  A* col = ws.v2.data();
  const A* f_last = fs + (n_iter - 1) * n;
  const A* g_last = gs + n_iter * n;

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

  for (int64_t t = n_iter; t >= 1; --t) {
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

// One matrix of the backward, with the domain decision of the forward (from the logits, then from the scalings).
// In the scaling domain the forward's iterations are replayed, bit for bit, rather than recovered from the saved
// log-scalings: f_t = log r_t - rowmax is stored with an absolute rounding error of ~eps |f_t|, which exp(f_t +
// rowmax) turns into a relative error of ~eps |rowmax| in r_t (1e-13 in float64, 1e-5 in float32 for logits / tau
// ~ 100), enough to spoil the small gradients of saturated matrices. The replay costs one pass over K per
// iteration. In the log domain the saved log-scalings are used when they are exactly the computed ones (float64).
template <typename S, typename A>
SYMKERNELS_INLINE void backward_matrix(const S* grad, const S* x, const S* f, const S* g, S tau, int64_t n,
                                       int64_t n_iter, Workspace<A>& ws, S* out) {
  A* k = ws.mat.data();
  A* m = ws.row_max.data();
  A* rs = ws.rows.data();
  A* cs = ws.cols.data();
  const A inv_tau = A(1) / static_cast<A>(tau);
  bool scaling = load_logits(x, tau, n, k, m);
  if (scaling) {
    build_kernel(k, m, n);
    scaling = scaling_iterate(k, n, n_iter, rs, cs, ws.v1.data());
  }
  if (scaling) {
    scaling_backward(k, grad, n, n_iter, rs, cs, inv_tau, ws, out);
    return;
  }
  load_logits(x, tau, n, k, m);  // K may have overwritten L0
  if constexpr (std::is_same_v<S, A>) {
    std::fill(cs, cs + n, A(0));
    std::copy(f, f + n_iter * n, rs);
    std::copy(g, g + n_iter * n, cs + n);
  } else {
    log_iterate(k, n, n_iter, rs, cs, ws.v1.data(), ws.v2.data());
  }
  log_backward(k, grad, n, n_iter, rs, cs, inv_tau, ws, out);
}

// ---------------------------------------------------------------------------------------------------------------
// Drivers over a range of matrices, one per ISA.

template <typename S>
struct ForwardArgs {
  const S* logits;
  S* p;
  S* f;
  S* g;
  S tau;
  int64_t n;
  int64_t n_iter;
};

template <typename S>
struct BackwardArgs {
  const S* grad;
  const S* logits;
  const S* f;
  const S* g;
  S* out;
  S tau;
  int64_t n;
  int64_t n_iter;
};

template <typename S, typename A>
SYMKERNELS_INLINE void forward_range_impl(const ForwardArgs<S>& a, int64_t begin, int64_t end) {
  const int64_t nn = a.n * a.n;
  const int64_t tn = a.n_iter * a.n;
  Workspace<A> ws(a.n, a.n_iter, /*backward=*/false);
  for (int64_t b = begin; b < end; ++b) {
    forward_matrix<S, A>(a.logits + b * nn, a.tau, a.n, a.n_iter, ws, a.p + b * nn, a.f + b * tn, a.g + b * tn);
  }
}

template <typename S, typename A>
SYMKERNELS_INLINE void backward_range_impl(const BackwardArgs<S>& a, int64_t begin, int64_t end) {
  const int64_t nn = a.n * a.n;
  const int64_t tn = a.n_iter * a.n;
  Workspace<A> ws(a.n, a.n_iter, /*backward=*/true);
  for (int64_t b = begin; b < end; ++b) {
    backward_matrix<S, A>(a.grad + b * nn, a.logits + b * nn, a.f + b * tn, a.g + b * tn, a.tau, a.n, a.n_iter, ws,
                          a.out + b * nn);
  }
}

template <typename S, typename A>
void forward_range(const ForwardArgs<S>& a, int64_t begin, int64_t end) {
  forward_range_impl<S, A>(a, begin, end);
}

template <typename S, typename A>
void backward_range(const BackwardArgs<S>& a, int64_t begin, int64_t end) {
  backward_range_impl<S, A>(a, begin, end);
}

#if SYMKERNELS_SINKHORN_AVX2
template <typename S, typename A>
__attribute__((target("avx2,fma"))) void forward_range_avx2(const ForwardArgs<S>& a, int64_t begin, int64_t end) {
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

// Matrices per task: enough that a stack of tiny matrices is not one task each (cost ~ n^2 T per matrix).
int64_t grain_size(int64_t n, int64_t n_iter) {
  return std::max<int64_t>(1, (int64_t{1} << 17) / std::max<int64_t>(1, n * n * n_iter));
}

using compute_t = double;

std::tuple<at::Tensor, at::Tensor, at::Tensor> sinkhorn_forward_cpu(const at::Tensor& logits_in, int64_t n_iter,
                                                                   double tau) {
  sinkhorn_detail::check_forward(logits_in, n_iter, tau, c10::DeviceType::CPU);
  const at::Tensor logits = logits_in.contiguous();
  const int64_t batch = logits.size(0);
  const int64_t n = logits.size(1);
  at::Tensor p = at::empty({batch, n, n}, logits.options());
  at::Tensor f = at::empty({batch, n_iter, n}, logits.options());
  at::Tensor g = at::empty({batch, n_iter, n}, logits.options());
  if (batch == 0) {
    return {p, f, g};
  }
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "sinkhorn_forward_cpu", [&] {
    const ForwardArgs<scalar_t> args{logits.const_data_ptr<scalar_t>(),
                                     p.mutable_data_ptr<scalar_t>(),
                                     f.mutable_data_ptr<scalar_t>(),
                                     g.mutable_data_ptr<scalar_t>(),
                                     static_cast<scalar_t>(tau),
                                     n,
                                     n_iter};
    auto range = &forward_range<scalar_t, compute_t>;
#if SYMKERNELS_SINKHORN_AVX2
    if (cpu_has_avx2_fma()) {
      range = &forward_range_avx2<scalar_t, compute_t>;
    }
#endif
    at::parallel_for(0, batch, grain_size(n, n_iter), [&](int64_t begin, int64_t end) { range(args, begin, end); });
  });
  return {p, f, g};
}

at::Tensor sinkhorn_backward_cpu(const at::Tensor& grad_p_in, const at::Tensor& logits_in,
                                 const at::Tensor& row_log_scalings_in, const at::Tensor& col_log_scalings_in,
                                 double tau) {
  sinkhorn_detail::check_backward(grad_p_in, logits_in, row_log_scalings_in, col_log_scalings_in, tau,
                                  c10::DeviceType::CPU);
  const at::Tensor grad_p = grad_p_in.contiguous();
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor row_log_scalings = row_log_scalings_in.contiguous();
  const at::Tensor col_log_scalings = col_log_scalings_in.contiguous();
  const int64_t batch = logits.size(0);
  const int64_t n = logits.size(1);
  const int64_t n_iter = row_log_scalings.size(1);
  at::Tensor out = at::empty({batch, n, n}, logits.options());
  if (batch == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(logits.scalar_type(), "sinkhorn_backward_cpu", [&] {
    const BackwardArgs<scalar_t> args{grad_p.const_data_ptr<scalar_t>(),
                                      logits.const_data_ptr<scalar_t>(),
                                      row_log_scalings.const_data_ptr<scalar_t>(),
                                      col_log_scalings.const_data_ptr<scalar_t>(),
                                      out.mutable_data_ptr<scalar_t>(),
                                      static_cast<scalar_t>(tau),
                                      n,
                                      n_iter};
    auto range = &backward_range<scalar_t, compute_t>;
#if SYMKERNELS_SINKHORN_AVX2
    if (cpu_has_avx2_fma()) {
      range = &backward_range_avx2<scalar_t, compute_t>;
    }
#endif
    at::parallel_for(0, batch, grain_size(n, n_iter), [&](int64_t begin, int64_t end) { range(args, begin, end); });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(symkernels, CPU, m) {
  m.impl("sinkhorn_forward", &sinkhorn_forward_cpu);
  m.impl("sinkhorn_backward", &sinkhorn_backward_cpu);
}

}  // namespace symkernels
