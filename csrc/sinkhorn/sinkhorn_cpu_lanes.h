// The small-matrix path of the CPU Sinkhorn kernels (n <= kMaxLaneSize, e.g. one 4x4 matrix per token of a
// hyper-connection layer): W matrices of one stack per group, one matrix per vector lane (W = 8 doubles with
// AVX-512, 4 otherwise), so that every instruction works on W matrices instead of a few entries of one row.
//
// A group's matrices are padded to N x N (N = 2, 4 or 8) with K = diag(K_real, I): the padding rows and columns
// keep r = c = 1 and never touch the real entries, so a lane computes its matrix's own iterates. Matrices move
// between memory and lanes through W x W transposes in registers. The group runs in the scaling domain only; a lane
// whose logits or scalings leave the scaling domain's range is left to the per-matrix code, which runs it in the
// log domain (sinkhorn_cpu_forward.cpp, sinkhorn_cpu_backward.cpp).
//
// The backward recomputes r_t and c_t from the logits with the forward's code (lanes_iterate) instead of reading
// the saved `cols`: for a matrix this small, 2n divisions per iteration cost less than reading T n doubles per
// matrix from memory and transposing them into lanes.
//
// Everything is inline and templated on N and B (the bytes of a vector, as in cpu_vector.h); the per-ISA task
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

template <int B>
struct Lanes {
  using V = Vec<double, B>;   // one double per matrix
  using I = Vec<int64_t, B>;  // lane masks (all ones or zero) and per-lane counts
  static constexpr int W = B / 8;
};

template <int B>
SYMKERNELS_INLINE typename Lanes<B>::V broadcast(double v) {
  return typename Lanes<B>::V{} + v;
}

template <int B>
SYMKERNELS_INLINE typename Lanes<B>::I broadcast_int(int64_t v) {
  return typename Lanes<B>::I{} + v;
}

template <int B>
SYMKERNELS_INLINE bool any_lane(typename Lanes<B>::I mask) {
  int64_t bits = 0;
  for (int l = 0; l < Lanes<B>::W; ++l) bits |= mask[l];
  return bits != 0;
}

// Bit l set where lane l of the mask is.
template <int B>
SYMKERNELS_INLINE unsigned lane_bits(typename Lanes<B>::I mask) {
  unsigned bits = 0;
  for (int l = 0; l < Lanes<B>::W; ++l) bits |= mask[l] != 0 ? 1u << l : 0u;
  return bits;
}

// The lanes l < count.
template <int B>
SYMKERNELS_INLINE typename Lanes<B>::I first_lanes(int count) {
  typename Lanes<B>::I mask{};
  for (int l = 0; l < count; ++l) mask[l] = -1;
  return mask;
}

template <int B>
SYMKERNELS_INLINE typename Lanes<B>::V load_vector(const double* p) {
  typename Lanes<B>::V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int B>
SYMKERNELS_INLINE void store_vector(double* p, typename Lanes<B>::V v) {
  std::memcpy(p, &v, sizeof(v));
}

// A store that bypasses the caches where the address allows it (x86: aligned to the vector), for `cols`, which
// the forward writes and only a backward reads, later. Inline assembly: an intrinsic cannot be called from this
// code, which is compiled for no particular ISA before it is inlined. Every task that streams ends with
// stream_fence, so that the stores are visible once the task is.
template <int B>
SYMKERNELS_INLINE void stream_vector(double* p, typename Lanes<B>::V v) {
#if defined(__x86_64__)
  if (reinterpret_cast<uintptr_t>(p) % B == 0) {
    if constexpr (B == 64) {
      asm volatile("vmovntpd %1, %0" : "=m"(*reinterpret_cast<typename Lanes<B>::V*>(p)) : "v"(v));
      return;
    } else if constexpr (B == 32) {
      using Half = Vec<double, 16>;
      __builtin_ia32_movntpd(p, Half{v[0], v[1]});
      __builtin_ia32_movntpd(p + 2, Half{v[2], v[3]});
      return;
    }
  }
#endif
  store_vector<B>(p, v);
}

SYMKERNELS_INLINE void stream_fence() {
#if defined(__x86_64__)
  __builtin_ia32_sfence();
#endif
}

// fast_exp (cpu_vector.h) on every lane, for x in [ExpConstants::lo, ExpConstants::hi] (K's exponents lie in
// [-max_spread, 0] on every lane that uses them): the same reduction and polynomial, without the range handling.
template <int M, int D, typename V>
SYMKERNELS_INLINE V lanes_horner(V r) {
  constexpr double coef = InverseFactorials<double, D>::value[M];
  if constexpr (M == D) {
    return V{} + coef;
  } else {
    return lanes_horner<M + 1, D>(r) * r + coef;
  }
}

template <int B>
SYMKERNELS_INLINE typename Lanes<B>::V lanes_exp(typename Lanes<B>::V x) {
  using V = typename Lanes<B>::V;
  using I = typename Lanes<B>::I;
  using C = ExpConstants<double>;
  const V t = x * C::log2e + C::shifter;
  const V k = t - C::shifter;
  const V r = (x - k * C::ln2_hi) - k * C::ln2_lo;
  const V p = lanes_horner<0, C::degree>(r);
  const I e = (I)t - broadcast_int<B>(bit_cast<int64_t>(C::shifter) - C::bias);
  return p * (V)(e << C::mantissa_bits);
}

// ---------------------------------------------------------------------------------------------------------------
// Between memory and lanes. A lane's matrix, padded to N x N (entry (i, j) at i * N + j), is a column of an array
// [rows][W] of vectors: rows = N^2 rounded up to a multiple of W, so that it is whole W x W blocks.

template <int N, int B>
constexpr int lane_rows() {
  constexpr int W = Lanes<B>::W;
  return (N * N + W - 1) / W * W;
}

// v[r] lane c <-> v[c] lane r, for the W vectors of one block: log2(W) rounds of two-vector shuffles, round h
// exchanging bit h of the row and the column index.
template <int B>
SYMKERNELS_INLINE void transpose_block(typename Lanes<B>::V* v) {
  using I = typename Lanes<B>::I;
  constexpr int W = Lanes<B>::W;
#pragma GCC unroll 4
  for (int h = W / 2; h >= 1; h /= 2) {
#pragma GCC unroll 8
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

// Lane l of out [lane_rows] gets the n x n matrix src[l] as doubles (divided by tau and rounded to S first, as
// load_row in sinkhorn_cpu.h computes L0, when `divide`), padded with zeros; idle lanes (l >= count) get zeros.
template <int N, int B, typename S>
SYMKERNELS_INLINE void load_lanes(const S* const* src, int count, int64_t n, bool divide, S tau,
                                  typename Lanes<B>::V* out) {
  constexpr int W = Lanes<B>::W;
  constexpr int R = lane_rows<N, B>();
  alignas(64) double matrices[W][R];  // lane by lane
  for (int l = 0; l < W; ++l) {
    double* y = matrices[l];
    const S* x = src[l];
    if (l >= count) {
      std::fill(y, y + R, 0.0);
    } else if (n == N) {
      if (divide) {
        for (int e = 0; e < N * N; ++e) y[e] = static_cast<double>(static_cast<S>(x[e] / tau));
      } else {
        for (int e = 0; e < N * N; ++e) y[e] = static_cast<double>(x[e]);
      }
      std::fill(y + N * N, y + R, 0.0);
    } else {
      std::fill(y, y + R, 0.0);
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < n; ++j) {
          const S v = x[i * n + j];
          y[i * N + j] = divide ? static_cast<double>(static_cast<S>(v / tau)) : static_cast<double>(v);
        }
      }
    }
  }
  for (int r0 = 0; r0 < R; r0 += W) {
    for (int l = 0; l < W; ++l) out[r0 + l] = load_vector<B>(matrices[l] + r0);
    transpose_block<B>(out + r0);
  }
}

// The n x n entries of lane l of values [lane_rows] into dst[l], for the lanes set in `write`.
template <int N, int B, typename S>
SYMKERNELS_INLINE void store_lanes(const typename Lanes<B>::V* values, unsigned write, int64_t n, S* const* dst) {
  constexpr int W = Lanes<B>::W;
  constexpr int R = lane_rows<N, B>();
  alignas(64) double matrices[W][R];
  for (int r0 = 0; r0 < R; r0 += W) {
    typename Lanes<B>::V block[W];
    for (int l = 0; l < W; ++l) block[l] = values[r0 + l];
    transpose_block<B>(block);
    for (int l = 0; l < W; ++l) store_vector<B>(matrices[l] + r0, block[l]);
  }
  for (int l = 0; l < W; ++l) {
    if ((write >> l & 1u) == 0) continue;
    S* y = dst[l];
    const double* x = matrices[l];
    if (n == N) {
      for (int e = 0; e < N * N; ++e) y[e] = static_cast<S>(x[e]);
    } else {
      for (int64_t i = 0; i < n; ++i) {
        for (int64_t j = 0; j < n; ++j) y[i * n + j] = static_cast<S>(x[i * N + j]);
      }
    }
  }
}

// One group: up to W matrices of one stack (lanes past `count` are idle), each lane's source and destination.
template <int B, typename S>
struct LaneGroup {
  static constexpr int W = Lanes<B>::W;
  int count = 0;
  int64_t matrix[W] = {};  // global index (into domain, iterations, caps, cols)
  const S* logits[W] = {};
  const S* grad[W] = {};  // backward
  S* out[W] = {};         // P, or the gradient
};

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
// whose logits allow the scaling domain (finite, within-row spread <= max_spread, as load_logits decides); every
// other lane gets K = I, harmless to iterate.
template <int N, int B>
SYMKERNELS_INLINE typename Lanes<B>::I build_lane_kernel(typename Lanes<B>::V* k, int64_t n,
                                                         typename Lanes<B>::I use) {
  using V = typename Lanes<B>::V;
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
      probe += ki[j] * 0.0;
    }
    const V row_spread = hi - lo;
    spread = row_spread > spread ? row_spread : spread;
    // (On a lane whose spread exceeds max_spread, or with a non-finite logit, this is garbage, replaced below.)
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) ki[j] = lanes_exp<B>(ki[j] - hi);
  }
  // The spread, or infinity for a lane that may not use the scaling domain. (Conditions written as comparisons
  // of doubles: GCC 12 fails to compile some selects on combined lane masks.)
  V gate = probe == V{} ? spread : broadcast<B>(std::numeric_limits<double>::infinity());
  for (int l = 0; l < Lanes<B>::W; ++l) {
    if (!use[l]) gate[l] = std::numeric_limits<double>::infinity();
  }
  const V max_spread = broadcast<B>(ScalingLimits<double>::max_spread);
#pragma GCC unroll 8
  for (int i = 0; i < N; ++i) {
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) {
      const V identity = broadcast<B>(i == j ? 1.0 : 0.0);
      V& kij = k[i * N + j];
      kij = (i < n && j < n) ? (gate <= max_spread ? kij : identity) : identity;
    }
  }
  return gate <= max_spread;
}

// Per-task buffers of the iterates, for up to n_iter iterations: rows [T][N] holds r_1..r_T, cols [T + 1][N]
// holds c_0 = 1, c_1..c_T, and W more vectors that a last partial block of write_cols may read. (Raw storage
// aligned by hand: a std::vector of vectors is not, since the vector type's alignment is lost when it is a template
// argument.)
template <int N, int B>
class LaneHistory {
 public:
  using V = typename Lanes<B>::V;

  explicit LaneHistory(int64_t n_iter)
      : bytes_(new unsigned char[static_cast<size_t>((2 * n_iter + 1) * N + Lanes<B>::W + 1) * B]),
        rows_(aligned(bytes_.get())),
        cols_(rows_ + n_iter * N) {}
  V* rows() { return rows_; }
  V* cols() { return cols_; }

 private:
  static V* aligned(unsigned char* p) {
    return reinterpret_cast<V*>(p + (B - reinterpret_cast<uintptr_t>(p) % B) % B);
  }
  std::unique_ptr<unsigned char[]> bytes_;
  V* rows_;
  V* cols_;
};

// The slabs of cols [n_iter, N] of the lanes set in `lanes`, written W entries at a time from the history as the
// iterations produce it (a slab is c_1, c_2, ... back to back: a lane's column of the history), so that the
// stores overlap the arithmetic. `written`: the entries of every slab written so far.
template <int B>
struct ColsStream {
  static constexpr int W = Lanes<B>::W;
  double* slab[W] = {};
  unsigned lanes = 0;
  int64_t written = 0;

  // Entries [written, available) of c_1, c_2, ... (`saved`), in whole blocks of W.
  SYMKERNELS_INLINE void advance(const typename Lanes<B>::V* saved, int64_t available) {
    for (; written + W <= available; written += W) {
      typename Lanes<B>::V block[W];
      for (int l = 0; l < W; ++l) block[l] = saved[written + l];
      transpose_block<B>(block);
      for (int l = 0; l < W; ++l) {
        if (lanes >> l & 1u) stream_vector<B>(slab[l] + written, block[l]);
      }
    }
  }
};

// The scaling-domain iterations of every lane: c_0 = 1; r_t = 1 / (K c_{t-1}) (lanes_row_dots), c_t = 1 / (K' r_t),
// recorded in `history`. Unmasked, every lane runs max_limit iterations. Masked, lane l
// runs while `active`: it stops after limit[l] iterations or, with the early exit, at the first t >= 2 whose
// P_{t-1} passes the row-sum test (iteration t discarded), and keeps its last r and c from then on (so rows
// t > ran of the history repeat row ran; row max_limit holds every lane's last). `ran` gets each lane's
// iterations; `stream` (unmasked only, may be null) gets c_1, c_2, ... as they come. The result is the lanes
// whose kept scalings all stayed within the safe range, tested on the sums
// K c and K' r before their reciprocals (the range is symmetric: [1 / max_scaling, max_scaling]; a NaN cannot
// appear before a sum leaves it, since the sums stay finite and positive while the scalings are within it).
template <int N, int B, bool Masked>
SYMKERNELS_INLINE typename Lanes<B>::I lanes_iterate(const typename Lanes<B>::V* k, typename Lanes<B>::I active,
                                                     typename Lanes<B>::I limit, int64_t max_limit, bool early_exit,
                                                     double tol, LaneHistory<N, B>& history,
                                                     typename Lanes<B>::I& ran, ColsStream<B>* stream) {
  using V = typename Lanes<B>::V;
  using I = typename Lanes<B>::I;
  V* rows = history.rows();
  V* cols = history.cols();
  V r[N], c[N];
  for (int j = 0; j < N; ++j) {
    c[j] = broadcast<B>(1.0);
    r[j] = broadcast<B>(1.0);
    cols[j] = c[j];
  }
  const V tolerance = broadcast<B>(tol);
  const V one = broadcast<B>(1.0);
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
        const V deviation = r[i] * d[i] - 1.0;
        passed &= (deviation < V{} ? -deviation : deviation) <= tolerance;
      }
      active &= ~passed;
      if (!any_lane<B>(active)) break;
    }
    V r_new[N], c_new[N];
#pragma GCC unroll 8
    for (int i = 0; i < N; ++i) {
      const V kept = Masked ? (active ? d[i] : one) : d[i];
      smallest = kept < smallest ? kept : smallest;
      largest = kept > largest ? kept : largest;
      r_new[i] = 1.0 / d[i];
    }
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) {
      const V s = lanes_dot<N, N>(k + j, r_new);
      const V kept = Masked ? (active ? s : one) : s;
      smallest = kept < smallest ? kept : smallest;
      largest = kept > largest ? kept : largest;
      c_new[j] = 1.0 / s;
    }
#pragma GCC unroll 8
    for (int i = 0; i < N; ++i) {
      r[i] = Masked ? (active ? r_new[i] : r[i]) : r_new[i];
      c[i] = Masked ? (active ? c_new[i] : c[i]) : c_new[i];
      rows[(t - 1) * N + i] = r[i];
      cols[t * N + i] = c[i];
    }
    last = t;
    if (Masked) {
      ran = active ? broadcast_int<B>(t) : ran;
      active &= broadcast_int<B>(t) < limit;
      if (!any_lane<B>(active)) break;
    } else {
      ran = broadcast_int<B>(t);
      if (stream != nullptr) stream->advance(cols + N, t * N);
    }
  }
  for (int64_t t = last + 1; t <= max_limit; ++t) {
    for (int i = 0; i < N; ++i) {
      rows[(t - 1) * N + i] = r[i];
      cols[t * N + i] = c[i];
    }
  }
  // (The range is symmetric: smallest >= min_scaling is 1 / smallest <= max_scaling.)
  const V extreme = 1.0 / smallest > largest ? 1.0 / smallest : largest;
  return extreme <= broadcast<B>(ScalingLimits<double>::max_scaling);
}

// Whether a group's slabs of cols are c_1, c_2, ... back to back, as the history holds them (then ColsStream can
// write them).
template <int N, typename S, typename A>
SYMKERNELS_INLINE bool cols_are_contiguous(const ForwardArgs<S, A>& a, int64_t n) {
  return n == N && a.max_n == N;
}

// c_1..c_{ran[l]} of each lane set in `write` into its matrix's slab of cols [n_iter, max_n], zero elsewhere; the
// first `written` entries of each slab are there already (ColsStream).
template <int N, int B, typename S, typename A>
SYMKERNELS_INLINE void write_cols(const ForwardArgs<S, A>& a, const LaneGroup<B, S>& g, int64_t n, unsigned write,
                                  typename Lanes<B>::I ran, int64_t max_ran, int64_t written,
                                  LaneHistory<N, B>& history) {
  using V = typename Lanes<B>::V;
  constexpr int W = Lanes<B>::W;
  const V* saved = history.cols() + N;  // c_1 onwards
  if (cols_are_contiguous<N>(a, n)) {
    // A lane's column of the history, transposed W rows at a time.
    const int64_t length = max_ran * N;
    for (int64_t e0 = written; e0 < length; e0 += W) {
      V block[W];
      for (int l = 0; l < W; ++l) block[l] = saved[e0 + l];
      transpose_block<B>(block);
      for (int l = 0; l < W; ++l) {
        if ((write >> l & 1u) == 0) continue;
        double* slab = a.cols + g.matrix[l] * a.n_iter * N;
        const int64_t kept = ran[l] * N - e0;
        if (kept >= W) {
          stream_vector<B>(slab + e0, block[l]);
        } else if (kept > 0) {
          alignas(64) double lane[W];
          store_vector<B>(lane, block[l]);
          std::copy(lane, lane + kept, slab + e0);
        }
      }
    }
    for (int l = 0; l < W; ++l) {
      if ((write >> l & 1u) == 0) continue;
      double* slab = a.cols + g.matrix[l] * a.n_iter * N;
      std::fill(slab + ran[l] * N, slab + a.n_iter * N, 0.0);
    }
    return;
  }
  for (int l = 0; l < W; ++l) {
    if ((write >> l & 1u) == 0) continue;
    double* slab = a.cols + g.matrix[l] * a.n_iter * a.max_n;
    const int64_t kept = ran[l];
    for (int64_t t = 0; t < kept; ++t) {
      double* row = slab + t * a.max_n;
      for (int64_t j = 0; j < n; ++j) row[j] = saved[t * N + j][l];
      std::fill(row + n, row + a.max_n, 0.0);
    }
    std::fill(slab + kept * a.max_n, slab + a.n_iter * a.max_n, 0.0);
  }
}

// Forward of one group in the scaling domain: P, the slabs of cols, domain and iterations of every lane that it
// serves. Returns the lanes (bit l: lane l) it does not serve, logits or scalings outside the scaling domain's
// range: nothing of theirs is written, their matrices go to the log domain.
template <int N, int B, bool Masked, typename S, typename A>
SYMKERNELS_INLINE unsigned forward_lanes(const ForwardArgs<S, A>& a, const LaneGroup<B, S>& g, int64_t n,
                                         LaneHistory<N, B>& history) {
  using V = typename Lanes<B>::V;
  using I = typename Lanes<B>::I;
  V k[lane_rows<N, B>()];
  load_lanes<N, B>(g.logits, g.count, n, a.tau != S(1), a.tau, k);
  const I real = first_lanes<B>(g.count);
  const I active = build_lane_kernel<N, B>(k, n, real);
  I limit = broadcast_int<B>(a.n_iter);
  int64_t max_limit = a.n_iter;
  if (a.caps != nullptr) {
    max_limit = 1;
    for (int l = 0; l < g.count; ++l) {
      limit[l] = iteration_limit(a.caps, g.matrix[l], a.n_iter);
      max_limit = std::max<int64_t>(max_limit, limit[l]);
    }
  }
  ColsStream<B> stream;
  const bool streaming = !Masked && cols_are_contiguous<N>(a, n);
  if (streaming) {
    stream.lanes = lane_bits<B>(active);
    for (int l = 0; l < g.count; ++l) stream.slab[l] = a.cols + g.matrix[l] * a.n_iter * N;
  }
  I ran;
  const I in_range = lanes_iterate<N, B, Masked>(k, active, limit, max_limit, a.early_exit,
                                                 static_cast<double>(a.tol), history, ran,
                                                 streaming ? &stream : nullptr);
  const unsigned served = lane_bits<B>(active & in_range);

  const V* r = history.rows() + (max_limit - 1) * N;
  const V* c = history.cols() + max_limit * N;
  V p[lane_rows<N, B>()];
  for (int i = 0; i < N; ++i) {
    for (int j = 0; j < N; ++j) p[i * N + j] = r[i] * k[i * N + j] * c[j];
  }
  for (int e = N * N; e < lane_rows<N, B>(); ++e) p[e] = V{};
  store_lanes<N, B>(p, served, n, g.out);
  int64_t max_ran = 0;
  for (int l = 0; l < g.count; ++l) {
    if ((served >> l & 1u) == 0) continue;
    a.domain[g.matrix[l]] = kScalingDomain;
    a.iterations[g.matrix[l]] = static_cast<int32_t>(ran[l]);
    max_ran = std::max<int64_t>(max_ran, ran[l]);
  }
  write_cols(a, g, n, served, ran, max_ran, stream.written, history);
  const unsigned rest = lane_bits<B>(real) & ~served;
  // The log domain rewrites the slabs of its matrices, which the stream may have begun: its stores come first.
  if (rest != 0 && stream.written > 0) stream_fence();
  return rest;
}

// Backward of one group, for the lanes whose forward ran in the scaling domain: r_t and c_t recomputed from the
// logits with the forward's code (lanes_iterate; reading the saved cols instead costs more than the divisions it
// saves), then the recurrences of scaling_backward (sinkhorn_cpu_backward.cpp) on every lane, each from its own T:
//   ḡ_T = colsum(Ḡ ⊙ P); step t = T..2: d = rowsum(K ⊙ (Ḡ - 1 ḡ_T') ⊙ 1 c_T') at t = T, else -K u_t;
//   w_t = r_t ⊙ r_t ⊙ d; u_{t-1} = -c_{t-1} ⊙ c_{t-1} ⊙ K' w_t; X += w_t c_{t-1}' + r_{t-1} u_{t-1}';
// then M = K ⊙ (r_T c_T' ⊙ (Ḡ - 1 ḡ_T') - X) and grad = (M - (r_1 ⊙ rowsum(M)) 1' ⊙ K) / tau. A lane with fewer
// iterations than the group's most starts later (u = 0 until its T: every term it adds is 0). Returns the lanes
// it leaves to the per-matrix code (nothing of theirs written): those whose forward ran in the log domain.
template <int N, int B, typename S>
SYMKERNELS_INLINE unsigned backward_lanes(const BackwardArgs<S>& a, const LaneGroup<B, S>& g, int64_t n,
                                          LaneHistory<N, B>& history) {
  using V = typename Lanes<B>::V;
  using I = typename Lanes<B>::I;
  constexpr int R = lane_rows<N, B>();
  const unsigned real = lane_bits<B>(first_lanes<B>(g.count));
  I scaling{};
  I limit = broadcast_int<B>(1);
  int64_t max_limit = 1;
  for (int l = 0; l < g.count; ++l) {
    const int64_t m = g.matrix[l];
    if (a.domain[m] != kScalingDomain) continue;
    scaling[l] = -1;
    limit[l] = saved_iterations(a.iterations, m, a.n_iter);
    max_limit = std::max<int64_t>(max_limit, limit[l]);
  }
  if (!any_lane<B>(scaling)) return real;
  const bool uniform = !any_lane<B>(scaling & (limit != broadcast_int<B>(max_limit)));

  V k[R];
  load_lanes<N, B>(g.logits, g.count, n, a.tau != S(1), a.tau, k);
  // (A lane saved as scaling-domain whose logits do not allow it cannot come from the forward: the per-matrix
  // code takes it as it is.)
  scaling = build_lane_kernel<N, B>(k, n, scaling);
  I ran;
  if (uniform) {
    lanes_iterate<N, B, false>(k, scaling, limit, max_limit, false, 0.0, history, ran, nullptr);
  } else {
    lanes_iterate<N, B, true>(k, scaling, limit, max_limit, false, 0.0, history, ran, nullptr);
  }
  const V* rows = history.rows();
  const V* cols = history.cols();
  const V* r_last = rows + (max_limit - 1) * N;
  const V* c_last = cols + max_limit * N;

  V grad[R];
  load_lanes<N, B>(g.grad, g.count, n, false, S(1), grad);
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

  V x[N * N];
  V u[N];
  for (int e = 0; e < N * N; ++e) x[e] = V{};
  for (int j = 0; j < N; ++j) u[j] = V{};
  for (int64_t t = max_limit; t >= 2; --t) {
    const V* r = rows + (t - 1) * N;
    const V* r_prev = rows + (t - 2) * N;
    const V* c_prev = cols + (t - 1) * N;
    const I start = uniform ? (t == max_limit ? ~I{} : I{}) : limit == broadcast_int<B>(t);
    V w[N];
#pragma GCC unroll 8
    for (int i = 0; i < N; ++i) {
      const V dot = lanes_dot<N, 1>(k + i * N, u);
      w[i] = backward_row_weight(r[i], start ? start_dot[i] : -dot);
    }
#pragma GCC unroll 8
    for (int j = 0; j < N; ++j) {
      u[j] = backward_column_term(c_prev[j], lanes_dot<N, N>(k + j, w));
    }
#pragma GCC unroll 8
    for (int i = 0; i < N; ++i) {
#pragma GCC unroll 8
      for (int j = 0; j < N; ++j) x[i * N + j] += w[i] * c_prev[j] + r_prev[i] * u[j];
    }
  }

  const V inv_tau = broadcast<B>(1.0 / static_cast<double>(a.tau));
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
  const unsigned served = lane_bits<B>(scaling);
  store_lanes<N, B>(out, served, n, g.out);
  return real & ~served;
}

}  // namespace
}  // namespace symkernels::sinkhorn_detail

#endif  // SYMKERNELS_VECTORS
