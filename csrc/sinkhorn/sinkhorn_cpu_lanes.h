// The small-matrix path of the CPU Sinkhorn kernels (n <= kMaxLaneSize, e.g. one 4x4 matrix per token of a
// hyper-connection layer): W matrices of one stack per group, one matrix per vector lane, so that every instruction
// works on W matrices instead of a few entries of one row. The lanes compute in the stack's own type S (float32
// stacks in float: W = 16 with AVX-512, 8 otherwise; float64 in double: W = 8 or 4), unlike the per-matrix path,
// which computes float32 in double (sinkhorn_cpu.h): at n <= 8 a float iterate carries no more rounding than the
// float32 reference's, and a vector holds twice the matrices. Measured against a float64 truth (n = 2..8,
// T = 1..20, tau = 0.3..3, logit scales 0.01..4): P within 4.0 float32 ulps, each gradient entry within 2.6 ulps
// of |grad_p| / tau (the float32 eager reference: 15.6 and 9.8); an entry far below |grad_p| / tau is resolved to
// float32 ulps of it, where the per-matrix path resolves it to float64 ulps (tests/ops/test_sinkhorn_small.py).
//
// A group's matrices are padded to N x N (N = 2, 4 or 8) with K = diag(K_real, I): the padding rows and columns
// keep r = c = 1 and never touch the real entries, so a lane computes its matrix's own iterates. Matrices move
// between memory and lanes through W x W transposes in registers. The group runs in the scaling domain only, within
// the limits of S (ScalingLimits); a lane whose logits or scalings leave them is left to the per-matrix code, which
// runs it in the log domain (sinkhorn_cpu_forward.cpp, sinkhorn_cpu_backward.cpp).
//
// The backward recomputes r_t and c_t from the logits with the forward's code (lanes_iterate), so a call whose
// every stack takes this path saves no `cols` at all (sinkhorn.h): for a matrix this small, the iterations cost
// less than writing and reading back T n doubles per matrix.
//
// Everything is inline and templated on N, B (the bytes of a vector, as in cpu_vector.h) and S; the per-ISA task
// functions of the forward and backward translation units instantiate it.
#pragma once

// The functions below (and those of common.h they call) that take or return vectors are always inlined into the
// per-ISA functions of the translation units: the ABI that GCC warns may differ between ISAs never applies. (The
// warning comes at the end of the translation unit, so it stays off from here on.)
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>

#include "sinkhorn/sinkhorn_cpu.h"

#if SYMKERNELS_VECTORS  // else every matrix takes the per-matrix path (takes_lanes)

namespace symkernels::sinkhorn_detail {
namespace {

template <typename A, int B>
struct Lanes {
  using V = Vec<A, B>;                          // one entry of each of W matrices
  using Bits = typename ExpConstants<A>::Bits;  // the integer as wide as A
  using I = Vec<Bits, B>;                       // lane masks (all ones or zero) and per-lane counts
  static constexpr int W = B / static_cast<int>(sizeof(A));
};

template <typename A, int B>
SYMKERNELS_INLINE typename Lanes<A, B>::V broadcast(A v) {
  return typename Lanes<A, B>::V{} + v;
}

template <typename A, int B>
SYMKERNELS_INLINE typename Lanes<A, B>::I broadcast_int(int64_t v) {
  return typename Lanes<A, B>::I{} + static_cast<typename Lanes<A, B>::Bits>(v);
}

template <typename A, int B>
SYMKERNELS_INLINE bool any_lane(typename Lanes<A, B>::I mask) {
  typename Lanes<A, B>::Bits bits = 0;
  for (int l = 0; l < Lanes<A, B>::W; ++l) bits |= mask[l];
  return bits != 0;
}

// Bit l set where lane l of the mask is.
template <typename A, int B>
SYMKERNELS_INLINE unsigned lane_bits(typename Lanes<A, B>::I mask) {
  unsigned bits = 0;
  for (int l = 0; l < Lanes<A, B>::W; ++l) bits |= mask[l] != 0 ? 1u << l : 0u;
  return bits;
}

// The lanes l < count.
template <typename A, int B>
SYMKERNELS_INLINE typename Lanes<A, B>::I first_lanes(int count) {
  typename Lanes<A, B>::I mask{};
  for (int l = 0; l < count; ++l) mask[l] = -1;
  return mask;
}

template <typename A, int B>
SYMKERNELS_INLINE typename Lanes<A, B>::V load_vector(const A* p) {
  typename Lanes<A, B>::V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <typename A, int B>
SYMKERNELS_INLINE void store_vector(A* p, typename Lanes<A, B>::V v) {
  std::memcpy(p, &v, sizeof(v));
}

// fast_exp (cpu_vector.h) on every lane, for x in [ExpConstants::lo, ExpConstants::hi] (K's exponents lie in
// [-max_spread, 0] on every lane that uses them): the same reduction and polynomial, without the range handling.
template <typename A, int M, int D, typename V>
SYMKERNELS_INLINE V lanes_horner(V r) {
  constexpr A coef = InverseFactorials<A, D>::value[M];
  if constexpr (M == D) {
    return V{} + coef;
  } else {
    return lanes_horner<A, M + 1, D>(r) * r + coef;
  }
}

template <typename A, int B>
SYMKERNELS_INLINE typename Lanes<A, B>::V lanes_exp(typename Lanes<A, B>::V x) {
  using V = typename Lanes<A, B>::V;
  using I = typename Lanes<A, B>::I;
  using C = ExpConstants<A>;
  const V t = x * C::log2e + C::shifter;
  const V k = t - C::shifter;
  const V r = (x - k * C::ln2_hi) - k * C::ln2_lo;
  const V p = lanes_horner<A, 0, C::degree>(r);
  const I e = (I)t - broadcast_int<A, B>(bit_cast<typename C::Bits>(C::shifter) - C::bias);
  return p * (V)(e << C::mantissa_bits);
}

// 1 / d on every lane. With AVX-512 and N <= 4: vrcp14 (relative error < 2^-14) refined by Newton steps
// x' = x + x (1 - d x) to the precision of A (one step for float, two for double), within about an ulp of the
// quotient: the divider's throughput bounds the iterations of matrices this small, and the steps run on the
// multiply-add units, which have room. (The backward recomputes the iterates with this same function.) Larger
// matrices have multiply-adds enough to hide the divisions. Inline assembly: an intrinsic cannot be called from
// this code, which is compiled for no particular ISA before it is inlined.
template <int N, int B, typename V>
SYMKERNELS_INLINE V lanes_reciprocal(V d) {
  using A = std::remove_cv_t<std::remove_reference_t<decltype(d[0])>>;
  const V one = V{} + A(1);
#if defined(__x86_64__)
  if constexpr (B == 64 && N <= 4) {
    V x;
    if constexpr (sizeof(A) == 4) {
      asm("vrcp14ps %1, %0" : "=v"(x) : "v"(d));
    } else {
      asm("vrcp14pd %1, %0" : "=v"(x) : "v"(d));
      x += x * (one - d * x);
    }
    return x + x * (one - d * x);
  }
#endif
  return one / d;
}

// ---------------------------------------------------------------------------------------------------------------
// Between memory and lanes. A lane's matrix, padded to N x N (entry (i, j) at i * N + j), is a column of an array
// [rows][W] of vectors: rows = N^2 rounded up to a multiple of W, so that it is whole W x W blocks.

template <int N, typename A, int B>
constexpr int lane_rows() {
  constexpr int W = Lanes<A, B>::W;
  return (N * N + W - 1) / W * W;
}

// v[r] lane c <-> v[c] lane r, for the W vectors of one block: log2(W) rounds of two-vector shuffles, round h
// exchanging bit h of the row and the column index.
template <typename A, int B>
SYMKERNELS_INLINE void transpose_block(typename Lanes<A, B>::V* v) {
  using I = typename Lanes<A, B>::I;
  constexpr int W = Lanes<A, B>::W;
#pragma GCC unroll 4
  for (int h = W / 2; h >= 1; h /= 2) {
#pragma GCC unroll 16
    for (int i = 0; i < W; ++i) {
      if (i & h) continue;
      I lo, hi;
      for (int k = 0; k < W; ++k) {
        lo[k] = (k & h) == 0 ? k : W + k - h;
        hi[k] = (k & h) == 0 ? k + h : W + k;
      }
      const auto a = v[i], b = v[i + h];
      v[i] = __builtin_shuffle(a, b, lo);
      v[i + h] = __builtin_shuffle(a, b, hi);
    }
  }
}

// One group: up to W matrices of one stack (lanes past `count` are idle), each lane's source and destination.
// `consecutive`: the matrices are back to back in memory (logits[l] = logits[0] + l n^2, and so grad and out).
template <typename S, int B>
struct LaneGroup {
  static constexpr int W = Lanes<S, B>::W;
  int count = 0;
  bool consecutive = false;
  int64_t matrix[W] = {};  // global index (into domain, iterations, caps, cols)
  const S* logits[W] = {};
  const S* grad[W] = {};  // backward
  S* out[W] = {};         // P, or the gradient
};

// Whether W matrices move between memory and lanes as whole vectors: all W lanes hold consecutive n x n matrices
// of N x N entries (no padding), a multiple of W entries each (no vector reaches past the last matrix).
template <int N, typename S, int B>
SYMKERNELS_INLINE bool whole_vectors(const LaneGroup<S, B>& g, int64_t n) {
  return n == N && (N * N) % Lanes<S, B>::W == 0 && g.consecutive && g.count == Lanes<S, B>::W;
}

// Lane l of out [lane_rows] gets the n x n matrix src[l] (divided by tau first, as load_row in sinkhorn_cpu.h
// computes L0, when `divide`), padded with zeros; idle lanes (l >= count) get zeros.
template <int N, int B, typename S>
SYMKERNELS_INLINE void load_lanes(const LaneGroup<S, B>& g, const S* const* src, int64_t n, bool divide, S tau,
                                  typename Lanes<S, B>::V* out) {
  constexpr int W = Lanes<S, B>::W;
  constexpr int R = lane_rows<N, S, B>();
  if (whole_vectors<N>(g, n)) {
    for (int r0 = 0; r0 < R; r0 += W) {
      for (int l = 0; l < W; ++l) out[r0 + l] = load_vector<S, B>(src[0] + l * N * N + r0);
      transpose_block<S, B>(out + r0);
    }
    if (divide) {
      for (int e = 0; e < R; ++e) out[e] = out[e] / tau;
    }
    return;
  }
  alignas(64) S matrices[W][R];  // lane by lane
  for (int l = 0; l < W; ++l) {
    S* y = matrices[l];
    std::fill(y, y + R, S(0));
    if (l >= g.count) continue;
    const S* x = src[l];
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) y[i * N + j] = divide ? x[i * n + j] / tau : x[i * n + j];
    }
  }
  for (int r0 = 0; r0 < R; r0 += W) {
    for (int l = 0; l < W; ++l) out[r0 + l] = load_vector<S, B>(matrices[l] + r0);
    transpose_block<S, B>(out + r0);
  }
}

// The n x n entries of lane l of values [lane_rows] into dst[l], for the lanes set in `write`.
template <int N, int B, typename S>
SYMKERNELS_INLINE void store_lanes(const LaneGroup<S, B>& g, const typename Lanes<S, B>::V* values, unsigned write,
                                   int64_t n, S* const* dst) {
  constexpr int W = Lanes<S, B>::W;
  constexpr int R = lane_rows<N, S, B>();
  if (whole_vectors<N>(g, n) && write == (1u << W) - 1u) {
    for (int r0 = 0; r0 < R; r0 += W) {
      typename Lanes<S, B>::V block[W];
      for (int l = 0; l < W; ++l) block[l] = values[r0 + l];
      transpose_block<S, B>(block);
      for (int l = 0; l < W; ++l) store_vector<S, B>(dst[0] + l * N * N + r0, block[l]);
    }
    return;
  }
  alignas(64) S matrices[W][R];
  for (int r0 = 0; r0 < R; r0 += W) {
    typename Lanes<S, B>::V block[W];
    for (int l = 0; l < W; ++l) block[l] = values[r0 + l];
    transpose_block<S, B>(block);
    for (int l = 0; l < W; ++l) store_vector<S, B>(matrices[l] + r0, block[l]);
  }
  for (int l = 0; l < W; ++l) {
    if ((write >> l & 1u) == 0) continue;
    S* y = dst[l];
    const S* x = matrices[l];
    for (int64_t i = 0; i < n; ++i) {
      for (int64_t j = 0; j < n; ++j) y[i * n + j] = x[i * N + j];
    }
  }
}

// ---------------------------------------------------------------------------------------------------------------
// The iterations.

// sum_q a[q * Stride] * v[q] for q < N, in the order of q (one multiply and N - 1 multiply-adds: the iterations
// are bound by the throughput of these, so a tree of partial sums, shorter in latency, runs slower).
template <int N, int Stride, typename V>
SYMKERNELS_INLINE V lanes_dot(const V* a, const V* v) {
  V s = a[0] * v[0];
#pragma GCC unroll 8
  for (int q = 1; q < N; ++q) s += a[q * Stride] * v[q];
  return s;
}

// d = K c on every lane: the row step's sums.
template <int N, typename V>
SYMKERNELS_INLINE void lanes_row_dots(const V* k, const V* c, V* d) {
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) d[i] = lanes_dot<N, 1>(k + i * N, c);
}

// K = exp(L0 - rowmax), padded with the identity past n, from L0 in `k` (in place). Returns the lanes of `use`
// whose logits allow the scaling domain in A (finite, within-row spread <= ScalingLimits<A>::max_spread); every
// other lane gets K = I, harmless to iterate.
template <int N, int B, typename A>
SYMKERNELS_INLINE typename Lanes<A, B>::I build_lane_kernel(typename Lanes<A, B>::V* k, int64_t n,
                                                            typename Lanes<A, B>::I use) {
  using V = typename Lanes<A, B>::V;
  V spread{};
  V probe{};  // stays 0 unless some L0 is NaN or infinite
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) {
    if (i >= n) break;
    V* ki = k + i * N;
    V hi = ki[0], lo = ki[0];
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) {
      if (j >= n) break;
      hi = ki[j] > hi ? ki[j] : hi;
      lo = ki[j] < lo ? ki[j] : lo;
      probe += ki[j] * A(0);
    }
    const V row_spread = hi - lo;
    spread = row_spread > spread ? row_spread : spread;
    // (On a lane whose spread exceeds max_spread, or with a non-finite logit, this is garbage, replaced below.)
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) ki[j] = lanes_exp<A, B>(ki[j] - hi);
  }
  // The spread, or infinity for a lane that may not use the scaling domain. (Conditions written as comparisons
  // of floating-point vectors: GCC 12 fails to compile some selects on combined lane masks.)
  V gate = probe == V{} ? spread : broadcast<A, B>(std::numeric_limits<A>::infinity());
  for (int l = 0; l < Lanes<A, B>::W; ++l) {
    if (!use[l]) gate[l] = std::numeric_limits<A>::infinity();
  }
  const V max_spread = broadcast<A, B>(ScalingLimits<A>::max_spread);
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) {
      const V identity = broadcast<A, B>(i == j ? A(1) : A(0));
      V& kij = k[i * N + j];
      kij = (i < n && j < n) ? (gate <= max_spread ? kij : identity) : identity;
    }
  }
  return gate <= max_spread;
}

// Per-task buffers of the iterates, for up to n_iter iterations: rows [T][N] holds r_1..r_T, cols [T + 1][N]
// holds c_0 = 1, c_1..c_T; the backward's adjoints [T][2N] hold w_t and u_{t-1} of step t at row t - 1. (Raw
// storage aligned by hand: a std::vector of vectors is not, since the vector type's alignment is lost when it is
// a template argument.)
template <int N, typename A, int B>
class LaneHistory {
 public:
  using V = typename Lanes<A, B>::V;

  explicit LaneHistory(int64_t n_iter)
      : bytes_(new unsigned char[static_cast<size_t>((4 * n_iter + 1) * N + 1) * B]),
        rows_(aligned(bytes_.get())),
        cols_(rows_ + n_iter * N),
        adjoints_(cols_ + (n_iter + 1) * N) {}
  V* rows() { return rows_; }
  V* cols() { return cols_; }
  V* adjoints() { return adjoints_; }

 private:
  static V* aligned(unsigned char* p) {
    return reinterpret_cast<V*>(p + (B - reinterpret_cast<uintptr_t>(p) % B) % B);
  }
  std::unique_ptr<unsigned char[]> bytes_;
  V* rows_;
  V* cols_;
  V* adjoints_;
};

// The scaling-domain iterations of every lane: c_0 = 1; r_t = 1 / (K c_{t-1}) (lanes_row_dots), c_t = 1 / (K' r_t)
// (lanes_reciprocal), leaving the last in r_out and c_out, and recorded in `history` unless it is null. Unmasked, every
// lane runs max_limit iterations. Masked, lane l runs while `active`: it stops after limit[l] iterations or, with
// the early exit, at the first t >= 2 whose P_{t-1} passes the row-sum test (iteration t discarded), and keeps its
// last r and c from then on (so rows t > ran of the history repeat row ran; row max_limit holds every lane's
// last). `ran` gets each lane's iterations. The result is the lanes whose kept scalings all stayed within the safe
// range of A, tested on the sums K c and K' r before their reciprocals (the range is symmetric:
// [1 / max_scaling, max_scaling]; a NaN cannot appear before a sum leaves it, since the sums stay finite and
// positive while the scalings are within it).
template <int N, int B, bool Masked, typename A>
SYMKERNELS_INLINE typename Lanes<A, B>::I lanes_iterate(const typename Lanes<A, B>::V* k,
                                                        typename Lanes<A, B>::I active,
                                                        typename Lanes<A, B>::I limit, int64_t max_limit,
                                                        bool early_exit, A tol, LaneHistory<N, A, B>* history,
                                                        typename Lanes<A, B>::I& ran, typename Lanes<A, B>::V* r_out,
                                                        typename Lanes<A, B>::V* c_out) {
  using V = typename Lanes<A, B>::V;
  using I = typename Lanes<A, B>::I;
  const V one = broadcast<A, B>(1);
  // The iterates live in these locals, copied out at the end: through the output pointers, which may alias the
  // history's, every iteration would store them and load them back.
  V r[N], c[N];
  for (int j = 0; j < N; ++j) {
    c[j] = one;
    r[j] = one;
  }
  V* const saved_rows = history != nullptr ? history->rows() : nullptr;
  V* const saved_cols = history != nullptr ? history->cols() : nullptr;
  if (history != nullptr) {
    for (int j = 0; j < N; ++j) saved_cols[j] = one;
  }
  const V tolerance = broadcast<A, B>(tol);
  V smallest = one, largest = one;
  ran = I{};
  int64_t last = 0;  // the last iteration run
  for (int64_t t = 1; t <= max_limit; ++t) {
    V d[N];
    lanes_row_dots<N>(k, c, d);
    if (Masked && early_exit && t >= 2) {
      I passed = ~I{};
#pragma GCC unroll 8
      for (int i = 0; i < N; ++i) {
        const V deviation = r[i] * d[i] - A(1);
        passed &= (deviation < V{} ? -deviation : deviation) <= tolerance;
      }
      active &= ~passed;
      if (!any_lane<A, B>(active)) break;
    }
    V r_new[N], c_new[N];
#pragma GCC unroll 8
    for (int i = 0; i < N; ++i) {
      const V kept = Masked ? (active ? d[i] : one) : d[i];
      smallest = kept < smallest ? kept : smallest;
      largest = kept > largest ? kept : largest;
      r_new[i] = lanes_reciprocal<N, B>(d[i]);
    }
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) {
      const V s = lanes_dot<N, N>(k + j, r_new);
      const V kept = Masked ? (active ? s : one) : s;
      smallest = kept < smallest ? kept : smallest;
      largest = kept > largest ? kept : largest;
      c_new[j] = lanes_reciprocal<N, B>(s);
    }
#pragma GCC unroll 8
    for (int i = 0; i < N; ++i) {
      r[i] = Masked ? (active ? r_new[i] : r[i]) : r_new[i];
      c[i] = Masked ? (active ? c_new[i] : c[i]) : c_new[i];
    }
    if (history != nullptr) {
      for (int i = 0; i < N; ++i) {
        saved_rows[(t - 1) * N + i] = r[i];
        saved_cols[t * N + i] = c[i];
      }
    }
    last = t;
    if (Masked) {
      ran = active ? broadcast_int<A, B>(t) : ran;
      active &= broadcast_int<A, B>(t) < limit;
      if (!any_lane<A, B>(active)) break;
    }
  }
  if (!Masked) ran = broadcast_int<A, B>(last);
  if (history != nullptr) {
    for (int64_t t = last + 1; t <= max_limit; ++t) {
      for (int i = 0; i < N; ++i) {
        saved_rows[(t - 1) * N + i] = r[i];
        saved_cols[t * N + i] = c[i];
      }
    }
  }
  for (int i = 0; i < N; ++i) {
    r_out[i] = r[i];
    c_out[i] = c[i];
  }
  // (The range is symmetric: smallest >= min_scaling is 1 / smallest <= max_scaling.)
  const V inverse = one / smallest;
  const V extreme = inverse > largest ? inverse : largest;
  return extreme <= broadcast<A, B>(ScalingLimits<A>::max_scaling);
}

// c_1..c_{ran[l]} of each lane set in `write` into its matrix's slab of cols [n_iter, cols_width] (as doubles),
// zero elsewhere.
template <int N, int B, typename S, typename A>
SYMKERNELS_INLINE void write_cols(const ForwardArgs<S, A>& a, const LaneGroup<S, B>& g, int64_t n, unsigned write,
                                  typename Lanes<S, B>::I ran, LaneHistory<N, S, B>& history) {
  const typename Lanes<S, B>::V* saved = history.cols() + N;  // c_1 onwards
  for (int l = 0; l < Lanes<S, B>::W; ++l) {
    if ((write >> l & 1u) == 0) continue;
    double* slab = a.cols + g.matrix[l] * a.n_iter * a.cols_width;
    const int64_t kept = ran[l];
    for (int64_t t = 0; t < kept; ++t) {
      double* row = slab + t * a.cols_width;
      for (int64_t j = 0; j < n; ++j) row[j] = static_cast<double>(saved[t * N + j][l]);
      std::fill(row + n, row + a.cols_width, 0.0);
    }
    std::fill(slab + kept * a.cols_width, slab + a.n_iter * a.cols_width, 0.0);
  }
}

// Forward of one group in the scaling domain: P, domain and iterations of every lane that it serves, and their
// slabs of cols when the call saves them (then `history` is not null). Returns the lanes (bit l: lane l) it does
// not serve, logits or scalings outside the scaling domain's range: nothing of theirs is written, their matrices
// go to the log domain.
template <int N, int B, bool Masked, typename S, typename A>
SYMKERNELS_INLINE unsigned forward_lanes(const ForwardArgs<S, A>& a, const LaneGroup<S, B>& g, int64_t n,
                                         LaneHistory<N, S, B>* history) {
  using V = typename Lanes<S, B>::V;
  using I = typename Lanes<S, B>::I;
  constexpr int R = lane_rows<N, S, B>();
  V k[R];
  load_lanes<N, B>(g, g.logits, n, a.tau != S(1), a.tau, k);
  const I real = first_lanes<S, B>(g.count);
  const I active = build_lane_kernel<N, B, S>(k, n, real);
  I limit = broadcast_int<S, B>(a.n_iter);
  int64_t max_limit = a.n_iter;
  if (a.caps != nullptr) {
    max_limit = 1;
    for (int l = 0; l < g.count; ++l) {
      limit[l] = static_cast<typename Lanes<S, B>::Bits>(iteration_limit(a.caps, g.matrix[l], a.n_iter));
      max_limit = std::max<int64_t>(max_limit, limit[l]);
    }
  }
  V r[N], c[N];
  I ran;
  const I in_range = lanes_iterate<N, B, Masked>(k, active, limit, max_limit, a.early_exit, static_cast<S>(a.tol),
                                                 history, ran, r, c);
  const unsigned served = lane_bits<S, B>(active & in_range);

  V p[R];
  for (int i = 0; i < N; ++i) {
    for (int j = 0; j < N; ++j) p[i * N + j] = r[i] * k[i * N + j] * c[j];
  }
  for (int e = N * N; e < R; ++e) p[e] = V{};
  store_lanes<N, B>(g, p, served, n, g.out);
  for (int l = 0; l < g.count; ++l) {
    if ((served >> l & 1u) == 0) continue;
    a.domain[g.matrix[l]] = kScalingDomain;
    a.iterations[g.matrix[l]] = static_cast<int32_t>(ran[l]);
  }
  if (history != nullptr) write_cols(a, g, n, served, ran, *history);
  return lane_bits<S, B>(real) & ~served;
}

// Backward of one group, for the lanes whose forward ran in the scaling domain: r_t and c_t recomputed from the
// logits with the forward's code (lanes_iterate), then the recurrences of scaling_backward
// (sinkhorn_cpu_backward.cpp) on every lane, each from its own T:
//   ḡ_T = colsum(Ḡ ⊙ P); step t = T..2: d = rowsum(K ⊙ (Ḡ - 1 ḡ_T') ⊙ 1 c_T') at t = T, else -K u_t;
//   w_t = r_t ⊙ r_t ⊙ d; u_{t-1} = -c_{t-1} ⊙ c_{t-1} ⊙ K' w_t; X += w_t c_{t-1}' + r_{t-1} u_{t-1}';
// then M = K ⊙ (r_T c_T' ⊙ (Ḡ - 1 ḡ_T') - X) and grad = (M - (r_1 ⊙ rowsum(M)) 1' ⊙ K) / tau. A lane with fewer
// iterations than the group's most starts later (u = 0 until its T: every term it adds is 0). Returns the lanes
// it leaves to the per-matrix code (nothing of theirs written): those whose forward ran in the log domain.
template <int N, int B, typename S>
SYMKERNELS_INLINE unsigned backward_lanes(const BackwardArgs<S>& a, const LaneGroup<S, B>& g, int64_t n,
                                          LaneHistory<N, S, B>& history) {
  using V = typename Lanes<S, B>::V;
  using I = typename Lanes<S, B>::I;
  constexpr int R = lane_rows<N, S, B>();
  const unsigned real = lane_bits<S, B>(first_lanes<S, B>(g.count));
  I scaling{};
  I limit = broadcast_int<S, B>(1);
  int64_t max_limit = 1;
  for (int l = 0; l < g.count; ++l) {
    const int64_t m = g.matrix[l];
    if (a.domain[m] != kScalingDomain) continue;
    scaling[l] = -1;
    limit[l] = static_cast<typename Lanes<S, B>::Bits>(saved_iterations(a.iterations, m, a.n_iter));
    max_limit = std::max<int64_t>(max_limit, limit[l]);
  }
  if (!any_lane<S, B>(scaling)) return real;
  const bool uniform = !any_lane<S, B>(scaling & (limit != broadcast_int<S, B>(max_limit)));

  V k[R];
  load_lanes<N, B>(g, g.logits, n, a.tau != S(1), a.tau, k);
  // (A lane saved as scaling-domain whose logits do not allow it cannot come from the forward: the per-matrix
  // code takes it as it is.)
  scaling = build_lane_kernel<N, B, S>(k, n, scaling);
  I ran;
  V r_last[N], c_last[N];
  if (uniform) {
    lanes_iterate<N, B, false>(k, scaling, limit, max_limit, false, S(0), &history, ran, r_last, c_last);
  } else {
    lanes_iterate<N, B, true>(k, scaling, limit, max_limit, false, S(0), &history, ran, r_last, c_last);
  }
  const V* rows = history.rows();
  const V* cols = history.cols();

  V grad[R];
  load_lanes<N, B>(g, g.grad, n, false, S(1), grad);
  // ḡ_T, then the row sums of K ⊙ (Ḡ - 1 ḡ_T') ⊙ 1 c_T' (d at t = T).
  V g_last_bar[N];
  for (int j = 0; j < N; ++j) g_last_bar[j] = V{};
  for (int i = 0; i < N; ++i) {
    for (int j = 0; j < N; ++j) g_last_bar[j] += r_last[i] * (grad[i * N + j] * k[i * N + j] * c_last[j]);
  }
  V start_dot[N];
  for (int i = 0; i < N; ++i) {
    V s{};
    for (int j = 0; j < N; ++j) s += k[i * N + j] * c_last[j] * (grad[i * N + j] - g_last_bar[j]);
    start_dot[i] = s;
  }

  // The recurrence first, keeping w_t and u_{t-1}, then X from them: K and X do not both fit the registers.
  V* adjoints = history.adjoints();
  V u[N];
  for (int j = 0; j < N; ++j) u[j] = V{};
  for (int64_t t = max_limit; t >= 2; --t) {
    const V* r = rows + (t - 1) * N;
    const V* c_prev = cols + (t - 1) * N;
    V* w = adjoints + (t - 1) * 2 * N;
    const I start = uniform ? (t == max_limit ? ~I{} : I{}) : limit == broadcast_int<S, B>(t);
#pragma GCC unroll 8
    for (int i = 0; i < N; ++i) {
      const V dot = lanes_dot<N, 1>(k + i * N, u);
      w[i] = backward_row_weight(r[i], start ? start_dot[i] : -dot);
    }
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) {
      u[j] = backward_column_term(c_prev[j], lanes_dot<N, N>(k + j, w));
      w[N + j] = u[j];
    }
  }
  V x[N * N];
  for (int e = 0; e < N * N; ++e) x[e] = V{};
  for (int64_t t = max_limit; t >= 2; --t) {
    const V* r_prev = rows + (t - 2) * N;
    const V* c_prev = cols + (t - 1) * N;
    const V* w = adjoints + (t - 1) * 2 * N;
    const V* u_prev = w + N;
#pragma GCC unroll 8
    for (int i = 0; i < N; ++i) {
#pragma GCC unroll 8
      for (int j = 0; j < N; ++j) x[i * N + j] += w[i] * c_prev[j] + r_prev[i] * u_prev[j];
    }
  }

  const V inv_tau = broadcast<S, B>(S(1) / a.tau);
  V out[R];
  for (int i = 0; i < N; ++i) {
    V s{};
    for (int j = 0; j < N; ++j) {
      const int e = i * N + j;
      out[e] = adjoint_entry(k[e], r_last[i], c_last[j], grad[e], g_last_bar[j], x[e]);
      s += out[e];
    }
    const V row_term = rows[i] * s;
    for (int j = 0; j < N; ++j) {
      const int e = i * N + j;
      out[e] = gradient_entry(out[e], row_term, k[e], inv_tau);
    }
  }
  for (int e = N * N; e < R; ++e) out[e] = V{};
  const unsigned served = lane_bits<S, B>(scaling);
  store_lanes<N, B>(g, out, served, n, g.out);
  return real & ~served;
}

}  // namespace
}  // namespace symkernels::sinkhorn_detail

#endif  // SYMKERNELS_VECTORS
