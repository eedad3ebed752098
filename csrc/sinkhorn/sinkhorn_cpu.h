// The CPU kernels of the Sinkhorn ops (sinkhorn.h), shared by their translation units: sinkhorn_cpu_forward.cpp,
// sinkhorn_cpu_backward.cpp and sinkhorn_cpu.cpp (the ISA choice). The matrices of a ragged stack run in parallel,
// in tasks of consecutive matrices of one stack with their buffers allocated once per task. Two paths:
// * stacks of n <= kMaxLaneSize take the small-matrix path (sinkhorn_cpu_lanes.h): a vector holds one entry of
//   each of several matrices, so that every instruction works on that many matrices;
// * larger matrices take the per-matrix path described here, a vector holding entries of one row.
//
// Each matrix is iterated in one of two domains, decided from its logits and, while iterating, from its scalings;
// the decision is saved (`domain`) and the backward follows it:
// * scaling domain (the normal case): K = exp(L0 - rowmax) is built once, then every iteration is
//   r = 1 / (K c), c = 1 / (K' r): one row-major pass over K (a dot product and an axpy per row), no exp;
// * log domain (fallback): max-shifted log-sum-exp iterations on the log-scalings, for matrices whose logits are
//   too spread out for K (see ScalingLimits), whose scalings leave the safe range, or with non-finite logits.
// The forward saves c_t (or g_t) exactly as computed, unless the call saves no cols (every stack at n <=
// kRecomputedMaxSize, sinkhorn.h); the per-matrix backward rebuilds K (or L0) from the logits, recomputes
// r_t = 1 / (K c_{t-1}) (or f_t) with the forward's own code (and c_t, or g_t, when nothing was saved), and runs
// the exact vector-Jacobian product of the T_m-step map (the small-matrix backward always recomputes c_t).
//
// Everything inside a matrix of the per-matrix path is computed in the compute type A of the input type S
// (ComputeType below): only the logits, grad_p and the outputs are in S (the small-matrix path computes in S). On
// x86-64 the per-matrix code is compiled three times, for the baseline ISA, for AVX2+FMA and for AVX-512 (64-byte
// vectors: twice the doubles per instruction), and the widest the CPU has is used. Everything here is in an
// anonymous namespace: each translation unit (and each ISA inside it) gets its own copies, so no out-of-line
// function compiled for one ISA is ever shared with code for another.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <vector>

#include "cpu_pool.h"
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

#if SYMKERNELS_SINKHORN_AVX2
#define SYMKERNELS_TARGET_AVX2 __attribute__((target("avx2,fma")))
// prefer-vector-width: the `omp simd` loops use 64-byte vectors too (some tunings default to 32).
#define SYMKERNELS_TARGET_AVX512 \
  __attribute__((target("avx512f,avx512dq,avx512vl,avx512bw,avx2,fma,prefer-vector-width=512")))
#endif

// The compute type of float32 inputs on the per-matrix path (float64 inputs always compute in double). It is
// double: float ran float32 inputs ~1.5x faster, but its gradients of near-permutation and sharp logits came out
// up to 18x less accurate than those of the float32 eager reference (against a float64 truth, n = 100,
// tau = 0.5). Defining it as float builds that variant, with the float limits of ScalingLimits. (The small-matrix
// path computes float32 in float: its errors measured within those of the float32 reference, sinkhorn_cpu_lanes.h.)
#ifndef SYMKERNELS_SINKHORN_FLOAT32_COMPUTE
#define SYMKERNELS_SINKHORN_FLOAT32_COMPUTE double
#endif

namespace symkernels::sinkhorn_detail {

// The instruction sets the per-matrix code is compiled for, and the widest this CPU runs (sinkhorn_cpu.cpp).
enum class CpuIsa { kBaseline, kAvx2, kAvx512 };
CpuIsa cpu_isa();

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

// A buffer whose entries start uninitialised (every reader of it writes first): no memset of n^2 entries per task.
template <typename A>
class Scratch {
 public:
  explicit Scratch(size_t size) : values_(new A[size]) {}
  A* data() { return values_.get(); }

 private:
  std::unique_ptr<A[]> values_;
};

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
  Scratch<A> mat;         // [n, n]: K in the scaling domain, L0 in the log domain
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
// Per-matrix pieces that the forward and the backward share (the backward recomputes with the forward's code).

// One row of L0 = x / tau (rounded to the input type, as the reference computes it; tau = 1 needs no division),
// with its maximum and minimum, and probe += v * 0 (NaN for a non-finite v).
template <bool Divide, typename S, typename A>
SYMKERNELS_INLINE void load_row(const S* __restrict xi, S tau, int64_t n, A* __restrict li, A& hi, A& lo, A& probe) {
  A row_hi = -std::numeric_limits<A>::infinity();
  A row_lo = std::numeric_limits<A>::infinity();
  A row_probe = 0;
  SYMKERNELS_SIMD_WITH(reduction(max : row_hi) reduction(min : row_lo) reduction(+ : row_probe))
  for (int64_t j = 0; j < n; ++j) {
    const A v = Divide ? static_cast<A>(static_cast<S>(xi[j] / tau)) : static_cast<A>(xi[j]);
    li[j] = v;
    row_hi = std::max(row_hi, v);
    row_lo = std::min(row_lo, v);
    row_probe += v * A(0);
  }
  hi = row_hi;
  lo = row_lo;
  probe += row_probe;
}

// L0 = x / tau into l0, and the row maxima. True when every logit is finite and the largest within-row spread
// allows the scaling domain.
template <typename S, typename A>
SYMKERNELS_INLINE bool load_logits(const S* __restrict x, S tau, int64_t n, A* __restrict l0,
                                   A* __restrict row_max) {
  A spread = 0;
  A probe = 0;  // stays 0 unless some L0 is NaN or infinite
  for (int64_t i = 0; i < n; ++i) {
    A hi, lo;
    if (tau == S(1)) {
      load_row<false>(x + i * n, tau, n, l0 + i * n, hi, lo, probe);
    } else {
      load_row<true>(x + i * n, tau, n, l0 + i * n, hi, lo, probe);
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
    f[i] = log_potential(mx, s);
  }
}

// Scaling-domain iterations: c_0 = 1; for t = 1, 2, ...: r_t = 1 / (K c_{t-1}), c_t = 1 / (K' r_t), one row-major
// pass over K per iteration (the row's dot product, then its contribution to the column sums). With the early
// exit, the row pass of iteration t also tests P_{t-1}: rowsum_i(P_{t-1}) = r_{t-1}[i] (K c_{t-1})_i; when every row
// passes, iteration t is discarded. rs: [T, n], cs: [T + 1, n]. Returns T, the iterations kept, or 0 as soon as a
// scaling leaves the safe range (or is NaN).
template <int B, typename A>
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
    row_pass<B>(k, c_prev, col, n, [&](int64_t i, A d) {
      if (test) {
        passed &= row_sum_within(scaling_row_sum(r_prev[i], d), tol);
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
    g[j] = log_potential(col_max[j], col_sum[j]);
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
        passed &= row_sum_within(static_cast<A>(log_row_sum(f_prev[i], f[i])), tol);
      }
      if (passed) {
        return t - 1;
      }
    }
    log_col_step(l0, f, n, gs + t * n, col_max, col_sum);
  }
  return limit;
}

// One stack of a call: where its matrices are, their size, and the global index of its first matrix (matrices are
// numbered stack by stack: domain, iterations, caps and cols are indexed by it).
template <typename S>
struct StackView {
  const S* logits;  // [G, n, n]
  const S* grad;    // backward: grad_p [G, n, n]; forward: nullptr
  S* out;           // forward: P; backward: grad_logits
  int64_t n;
  int64_t first;
  int64_t count;

  const S* logits_of(int64_t m) const { return logits + (m - first) * n * n; }
  const S* grad_of(int64_t m) const { return grad + (m - first) * n * n; }
  S* out_of(int64_t m) const { return out + (m - first) * n * n; }
};

// The stacks of a call (contiguous [G_l, n_l, n_l] tensors of type S, with their outputs and, for the backward,
// the incoming gradients), numbered from matrix 0.
template <typename S>
std::vector<StackView<S>> stack_views(const std::vector<at::Tensor>& stacks, const std::vector<at::Tensor>& out,
                                      const std::vector<at::Tensor>* grad) {
  std::vector<StackView<S>> views;
  int64_t first = 0;
  for (size_t l = 0; l < stacks.size(); ++l) {
    const at::Tensor& stack = stacks[l];
    views.push_back(StackView<S>{static_cast<const S*>(stack.data_ptr()),
                                 grad != nullptr ? static_cast<const S*>((*grad)[l].data_ptr()) : nullptr,
                                 static_cast<S*>(out[l].data_ptr()), stack.size(1), first, stack.size(0)});
    first += stack.size(0);
  }
  return views;
}

template <typename S, typename A>
struct ForwardArgs {
  const StackView<S>* stacks;
  double* cols;          // [M, n_iter, cols_width]
  int32_t* domain;       // [M]
  int32_t* iterations;   // [M]
  const int32_t* caps;   // [M] or nullptr
  S tau;
  A tol;
  bool early_exit;
  int64_t n_iter;
  int64_t cols_width;  // max_n, or 0: nothing saved (the backward recomputes c_t)
};

template <typename S>
struct BackwardArgs {
  const StackView<S>* stacks;
  const double* cols;         // [M, n_iter, cols_width]
  const int32_t* domain;      // [M]
  const int32_t* iterations;  // [M]
  S tau;
  int64_t n_iter;
  int64_t cols_width;  // max_n, or 0: nothing saved, c_t recomputed
};

// Picks the function compiled for the widest ISA this CPU has.
template <typename F>
F pick_for_isa(F baseline, [[maybe_unused]] F avx2, [[maybe_unused]] F avx512) {
#if SYMKERNELS_SINKHORN_AVX2
  switch (cpu_isa()) {
    case CpuIsa::kAvx512:
      return avx512;
    case CpuIsa::kAvx2:
      return avx2;
    default:
      break;
  }
#endif
  return baseline;
}

// Multiply-adds (n^2 per iteration and matrix) a task should carry at least, so that a stack of small matrices is
// not spread over threads one matrix at a time.
constexpr int64_t kMinTaskWork = int64_t{1} << 17;

// A task: the matrices [begin, end) of one stack (global indices), or, with `index`, the matrices index[begin..end),
// all of one stack; `lanes`: run by the small-matrix path (sinkhorn_cpu_lanes.h).
struct Task {
  int64_t stack;
  int64_t begin;
  int64_t end;
  const int64_t* index;
  bool lanes;

  int64_t matrix(int64_t q) const { return index != nullptr ? index[q] : q; }
};

// The small-matrix path (sinkhorn_cpu_lanes.h) takes the stacks of n <= kMaxLaneSize, padded to lane_size(n);
// larger matrices fill a vector with a row of one matrix (the per-matrix path). Its backward recomputes the
// iterates, which is why a call whose every stack it takes saves no cols (kRecomputedMaxSize, sinkhorn.h).
constexpr int64_t kMaxLaneSize = kRecomputedMaxSize;

constexpr bool takes_lanes(int64_t n) {
  return SYMKERNELS_VECTORS && n <= kMaxLaneSize;
}

constexpr int64_t lane_size(int64_t n) {
  return n <= 2 ? 2 : (n <= 4 ? 4 : 8);
}

// The matrices of a lane task: a multiple of 16 (whole groups for every vector width and type) carrying
// kMinTaskWork.
inline int64_t lane_task_matrices(int64_t padded_n, int64_t n_iter) {
  const int64_t work = std::max<int64_t>(1, padded_n * padded_n * n_iter);
  return (kMinTaskWork / work + 16) / 16 * 16;
}

// Tasks over the matrices index[0..count) (or 0..count without index), in order, none spanning two stacks: lane
// tasks of lane_task_matrices each for the stacks the small-matrix path takes, per-matrix tasks of at
// least kMinTaskWork multiply-adds each (estimated as n_m^2 times the iterations: per_matrix[m], or n_iter when
// per_matrix is null) for the others.
template <typename S>
std::vector<Task> plan_tasks(const std::vector<StackView<S>>& stacks, const int64_t* index, int64_t count,
                             const int32_t* per_matrix, int64_t n_iter) {
  std::vector<Task> tasks;
  size_t l = 0;
  int64_t q = 0;
  while (q < count) {
    const int64_t m = index != nullptr ? index[q] : q;
    while (m >= stacks[l].first + stacks[l].count) ++l;
    const StackView<S>& stack = stacks[l];
    const int64_t stack_end = stack.first + stack.count;
    // The run of positions q.. whose matrices belong to this stack.
    int64_t run_end = q;
    if (index == nullptr) {
      run_end = stack_end;
    } else {
      while (run_end < count && index[run_end] < stack_end) ++run_end;
    }
    if (takes_lanes(stack.n)) {
      const int64_t chunk = lane_task_matrices(lane_size(stack.n), n_iter);
      for (int64_t b = q; b < run_end; b += chunk) {
        tasks.push_back(Task{static_cast<int64_t>(l), b, std::min(b + chunk, run_end), index, true});
      }
    } else {
      int64_t begin = q;
      int64_t work = 0;
      for (int64_t p = q; p < run_end; ++p) {
        // (n^2 capped: a matrix that big is a task of its own anyway, and the product stays far from overflow.)
        work += std::min(stack.n * stack.n, kMinTaskWork) *
                iteration_limit(per_matrix, index != nullptr ? index[p] : p, n_iter);
        if (work >= kMinTaskWork || p + 1 == run_end) {
          tasks.push_back(Task{static_cast<int64_t>(l), begin, p + 1, index, false});
          begin = p + 1;
          work = 0;
        }
      }
    }
    q = run_end;
  }
  return tasks;
}

// Runs every task, handed out one at a time to the calling thread and the pool's workers.
template <typename Run>
void run_tasks(const std::vector<Task>& tasks, const Run& run) {
  parallel_tasks(static_cast<int64_t>(tasks.size()), [&](int64_t t) { run(tasks[static_cast<size_t>(t)]); });
}

}  // namespace
}  // namespace symkernels::sinkhorn_detail
