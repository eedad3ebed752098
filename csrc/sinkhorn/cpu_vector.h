// Vector building blocks of the CPU Sinkhorn kernels, written for the vectoriser: a vectorisable exp, dot
// products, row passes over a row-major matrix and a small register-tiled matrix product. Everything is inline and
// templated on the compute type and on B, the bytes of the explicit vectors (32: AVX2 or two SSE2 registers, 64:
// AVX-512); the kernels instantiate it once per ISA (see sinkhorn_cpu.h).
#pragma once

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>

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

namespace symkernels::sinkhorn_detail {

// ---------------------------------------------------------------------------------------------------------------
// exp for the vectoriser: Cody-Waite reduction x = k ln2 + r, |r| <= ln2 / 2, a Taylor polynomial for e^r and
// 2^k assembled in the exponent bits (constants in common.h). ~1 ulp; exp(x) = 0 below `lo`, +inf above `hi`, NaN
// stays NaN.

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
// B-byte vectors of GNU C: one register where the ISA has B-byte registers, several narrower ones otherwise
// (32 bytes in the baseline build: two SSE2 registers). They only ever live in local variables (loaded and stored
// with memcpy), so no vector crosses a call.
#define SYMKERNELS_VECTORS 1
template <typename A, int B>
struct VectorOf {
  typedef A type __attribute__((vector_size(B)));
};
template <typename A, int B>
using Vec = typename VectorOf<A, B>::type;
#else
#define SYMKERNELS_VECTORS 0
#endif

// sum_j a[j] * b[j], with four independent vector partial sums so the adds do not wait on each other.
template <int B, typename A>
SYMKERNELS_INLINE A dot(const A* __restrict a, const A* __restrict b, int64_t n) {
  int64_t j = 0;
  A s = 0;
#if SYMKERNELS_VECTORS
  using V = Vec<A, B>;
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
template <int B, typename A>
SYMKERNELS_INLINE void dot4(const A* __restrict k0, const A* __restrict k1, const A* __restrict k2,
                            const A* __restrict k3, const A* __restrict v, int64_t n, A* __restrict out) {
  int64_t j = 0;
  A d0 = 0, d1 = 0, d2 = 0, d3 = 0;
#if SYMKERNELS_VECTORS
  using V = Vec<A, B>;
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
template <int B, typename A, typename Fn>
SYMKERNELS_INLINE void row_pass(const A* __restrict k, const A* __restrict v, A* __restrict col, int64_t n, Fn&& fn) {
  std::fill(col, col + n, A(0));
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const A* k0 = k + i * n;
    const A* k1 = k0 + n;
    const A* k2 = k1 + n;
    const A* k3 = k2 + n;
    A d[4];
    dot4<B>(k0, k1, k2, k3, v, n, d);
    const A a0 = fn(i, d[0]), a1 = fn(i + 1, d[1]), a2 = fn(i + 2, d[2]), a3 = fn(i + 3, d[3]);
    SYMKERNELS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      col[j] += a0 * k0[j] + a1 * k1[j] + a2 * k2[j] + a3 * k3[j];
    }
  }
  for (; i < n; ++i) {
    const A* ki = k + i * n;
    axpy(col, fn(i, dot<B>(ki, v, n)), ki, n);
  }
}

// fn(i, K_i · v) for every row i, the products computed exactly as row_pass computes them (the same blocks of 4
// rows, the same summation order), so that a backward recomputes the forward's scalings bit for bit.
template <int B, typename A, typename Fn>
SYMKERNELS_INLINE void row_dots(const A* __restrict k, const A* __restrict v, int64_t n, Fn&& fn) {
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    const A* k0 = k + i * n;
    A d[4];
    dot4<B>(k0, k0 + n, k0 + 2 * n, k0 + 3 * n, v, n, d);
    fn(i, d[0]);
    fn(i + 1, d[1]);
    fn(i + 2, d[2]);
    fn(i + 3, d[3]);
  }
  for (; i < n; ++i) {
    fn(i, dot<B>(k + i * n, v, n));
  }
}

// Whether every scaling v[j] may stay in the scaling domain (false for NaN).
template <typename A>
SYMKERNELS_INLINE bool all_scalings_in_range(const A* v, int64_t n) {
  int bad = 0;
  for (int64_t j = 0; j < n; ++j) {
    bad |= !scaling_in_range(v[j]);
  }
  return bad == 0;
}

// X for rows i0..i0+3 into out [4, n]: out[b] = left[i0 + b] @ right; rows past n read zero padding. Register
// tiles of 4 rows x 2 vectors, accumulated over the 2T-2 inner products.
template <int B, typename A>
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
  using V = Vec<A, B>;
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

}  // namespace symkernels::sinkhorn_detail
