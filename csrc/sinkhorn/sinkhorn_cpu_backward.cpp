// The backward kernel of the Sinkhorn ops on the CPU (the design is described in sinkhorn_cpu.h): per matrix, the
// exact vector-Jacobian product of the iterations its forward ran, in the domain it ran them in.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "sinkhorn/sinkhorn_cpu_lanes.h"

namespace symkernels::sinkhorn_detail {
namespace {

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

template <int B, typename S, typename A>
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
      const A w = backward_row_weight(r[i], d);
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
      row_pass<B>(k, right + (t - 1) * n, col, n, [&](int64_t i, A dot_i) { return record(i, -dot_i); });
    }
    // ḡ_{t-1} = -c_{t-1} ⊙ col
    A* u_prev = right + (t - 2) * n;
    A* c_row = right + (half + (t - 2)) * n;
    SYMKERNELS_SIMD
    for (int64_t j = 0; j < n; ++j) {
      u_prev[j] = backward_column_term(c_prev[j], col[j]);
      c_row[j] = c_prev[j];
    }
  }

  // Row i: M_i = K_i ⊙ (r_T[i] c_T ⊙ (Ḡ_i - ḡ_T) - X_i), then grad_i = (M_i - A_1[i] rowsum(M_i)) / tau with
  // A_1[i] = r_1[i] K_i.
  std::fill(left + n * width, left + (n + 4) * width, A(0));
  A* block = ws.block.data();
  for (int64_t i0 = 0; i0 < n; i0 += 4) {
    if (width > 0) {
      left_times_right<B>(left, right, width, n, i0, block);
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
        const A mij = adjoint_entry(ki[j], ri, c_last[j], static_cast<A>(gi[j]), g_last_bar[j], x[j]);
        x[j] = mij;
        s += mij;
      }
      const A a = rs[i] * s;
      S* oi = out + i * n;
      SYMKERNELS_SIMD
      for (int64_t j = 0; j < n; ++j) {
        oi[j] = static_cast<S>(gradient_entry(x[j], a, ki[j], inv_tau));
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


// One matrix of the backward in the domain its forward ran in. K (or L0) is rebuilt from the logits with the
// forward's code, c_t (or g_t) are read back exactly (cols holds the compute-type values, widened) or, where the
// call saved none, recomputed, and r_t (or f_t) are recomputed, all with the forward's code, so the backward
// differentiates the very iterates the forward produced.
template <int B, typename S, typename A>
SYMKERNELS_INLINE void backward_matrix(const BackwardArgs<S>& a, const StackView<S>& stack, int64_t m,
                                       Workspace<A>& ws) {
  const int64_t n = stack.n;
  const int64_t iterations = saved_iterations(a.iterations, m, a.n_iter);
  const S* grad = stack.grad_of(m);
  const S* x = stack.logits_of(m);
  S* out = stack.out_of(m);
  A* k = ws.mat.data();
  A* rs = ws.rows.data();
  A* cs = ws.cols.data();
  const A inv_tau = A(1) / static_cast<A>(a.tau);
  const bool scaling = a.domain[m] == kScalingDomain;
  load_logits(x, a.tau, n, k, ws.row_max.data());
  if (scaling) build_kernel(k, ws.row_max.data(), n);
  if (a.cols_width == 0) {
    // (The iterations' count is the forward's, so neither stops early; a state that no forward produced gives
    // a meaningless gradient, never a read out of bounds.)
    if (scaling) {
      scaling_iterate<B>(k, n, iterations, false, A(0), rs, cs, ws.v1.data());
    } else {
      log_iterate(k, n, iterations, false, A(0), rs, cs, ws.v1.data(), ws.v2.data());
    }
  } else {
    const double* slab = a.cols + m * a.n_iter * a.cols_width;
    for (int64_t t = 1; t <= iterations; ++t) {
      const double* saved = slab + (t - 1) * a.cols_width;
      A* c = cs + t * n;
      for (int64_t j = 0; j < n; ++j) {
        c[j] = static_cast<A>(saved[j]);
      }
    }
    if (scaling) {
      std::fill(cs, cs + n, A(1));
      for (int64_t t = 1; t <= iterations; ++t) {
        A* r = rs + (t - 1) * n;
        row_dots<B>(k, cs + (t - 1) * n, n, [r](int64_t i, A d) { r[i] = A(1) / d; });
      }
    } else {
      std::fill(cs, cs + n, A(0));
      for (int64_t t = 1; t <= iterations; ++t) {
        log_row_step(k, cs + (t - 1) * n, n, rs + (t - 1) * n);
      }
    }
  }
  if (scaling) {
    scaling_backward<B>(k, grad, n, iterations, rs, cs, inv_tau, ws, out);
  } else {
    log_backward(k, grad, n, iterations, rs, cs, inv_tau, ws, out);
  }
}

// The most iterations a matrix of the task ran.
template <typename S>
int64_t most_iterations(const BackwardArgs<S>& a, const Task& task) {
  int64_t most = 1;
  for (int64_t q = task.begin; q < task.end; ++q) {
    most = std::max(most, saved_iterations(a.iterations, task.matrix(q), a.n_iter));
  }
  return most;
}

#if SYMKERNELS_VECTORS
// The matrices of a lane task, W per group; those whose forward ran in the log domain go to backward_matrix.
template <int N, int B, typename S, typename A>
SYMKERNELS_INLINE void backward_lanes_task(const BackwardArgs<S>& a, const Task& task) {
  constexpr int W = Lanes<S, B>::W;
  const StackView<S>& stack = a.stacks[task.stack];
  LaneHistory<N, S, B> history(most_iterations(a, task));
  std::unique_ptr<Workspace<A>> ws;  // for the log domain, allocated on first use
  for (int64_t q = task.begin; q < task.end; q += W) {
    LaneGroup<S, B> g;
    g.count = static_cast<int>(std::min<int64_t>(W, task.end - q));
    g.consecutive = task.index == nullptr;
    for (int l = 0; l < g.count; ++l) {
      g.matrix[l] = task.matrix(q + l);
      g.logits[l] = stack.logits_of(g.matrix[l]);
      g.grad[l] = stack.grad_of(g.matrix[l]);
      g.out[l] = stack.out_of(g.matrix[l]);
    }
    const auto rest = backward_lanes<N, B>(a, g, stack.n, history);
    for (int l = 0; l < g.count; ++l) {
      if ((rest >> l & 1u) == 0) continue;
      if (!ws) ws = std::make_unique<Workspace<A>>(stack.n, a.n_iter, /*backward=*/true);
      backward_matrix<B, S, A>(a, stack, g.matrix[l], *ws);
    }
  }
}
#endif

template <int B, typename S, typename A>
SYMKERNELS_INLINE void backward_task_impl(const BackwardArgs<S>& a, const Task& task) {
  const StackView<S>& stack = a.stacks[task.stack];
#if SYMKERNELS_VECTORS
  if (task.lanes) {
    switch (lane_size(stack.n)) {
      case 2:
        return backward_lanes_task<2, B, S, A>(a, task);
      case 4:
        return backward_lanes_task<4, B, S, A>(a, task);
      default:
        return backward_lanes_task<8, B, S, A>(a, task);
    }
  }
#endif
  Workspace<A> ws(stack.n, most_iterations(a, task), /*backward=*/true);
  for (int64_t q = task.begin; q < task.end; ++q) {
    backward_matrix<B, S, A>(a, stack, task.matrix(q), ws);
  }
}

template <typename S, typename A>
void backward_task(const BackwardArgs<S>& a, const Task& task) {
  backward_task_impl<32, S, A>(a, task);
}

#if SYMKERNELS_SINKHORN_AVX2
template <typename S, typename A>
SYMKERNELS_TARGET_AVX2 void backward_task_avx2(const BackwardArgs<S>& a, const Task& task) {
  backward_task_impl<32, S, A>(a, task);
}

template <typename S, typename A>
SYMKERNELS_TARGET_AVX512 void backward_task_avx512(const BackwardArgs<S>& a, const Task& task) {
  backward_task_impl<64, S, A>(a, task);
}
#endif

}  // namespace

void sinkhorn_backward_cpu(const std::vector<at::Tensor>& grad_p, const std::vector<at::Tensor>& stacks,
                           const RaggedLayout& layout, const at::Tensor& cols, const at::Tensor& domain,
                           const at::Tensor& iterations, double tau, const std::vector<at::Tensor>& grad_logits) {
  const int32_t* ran = iterations.const_data_ptr<int32_t>();
  AT_DISPATCH_FLOATING_TYPES(stacks[0].scalar_type(), "sinkhorn_backward_cpu", [&] {
    using A = typename ComputeType<scalar_t>::type;
    const std::vector<StackView<scalar_t>> views = stack_views<scalar_t>(stacks, grad_logits, &grad_p);
    const BackwardArgs<scalar_t> args{views.data(),
                                      cols.const_data_ptr<double>(),
                                      domain.const_data_ptr<int32_t>(),
                                      ran,
                                      static_cast<scalar_t>(tau),
                                      cols.size(1),
                                      cols.size(2)};
#if SYMKERNELS_SINKHORN_AVX2
    const auto task_fn = pick_for_isa(&backward_task<scalar_t, A>, &backward_task_avx2<scalar_t, A>,
                                      &backward_task_avx512<scalar_t, A>);
#else
    const auto task_fn = &backward_task<scalar_t, A>;
#endif
    run_tasks(plan_tasks(views, nullptr, layout.num_matrices(), ran, cols.size(1)),
              [&](const Task& task) { task_fn(args, task); });
  });
}

}  // namespace symkernels::sinkhorn_detail
