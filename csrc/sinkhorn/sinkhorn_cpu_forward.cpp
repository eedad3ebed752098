// The forward kernel of the Sinkhorn ops on the CPU (the design is described in sinkhorn_cpu.h): per matrix, the
// iterations in the scaling domain or, where that domain cannot serve, in the log domain; P, the saved column
// scalings (or potentials), the domain and the iterations run.
#include <ATen/Dispatch.h>
#include <ATen/core/Tensor.h>

#include "sinkhorn/sinkhorn_cpu_lanes.h"

namespace symkernels::sinkhorn_detail {
namespace {

// c_1..c_T (or g_1..g_T), [T, n] in the compute type, into a matrix's slab of `cols` [n_iter, width]; every other
// entry of the slab is set to 0.
template <typename A>
SYMKERNELS_INLINE void save_cols(const A* __restrict cs, int64_t n, int64_t iterations, int64_t n_iter,
                                 int64_t width, double* __restrict slab) {
  for (int64_t t = 0; t < iterations; ++t) {
    double* row = slab + t * width;
    const A* c = cs + t * n;
    for (int64_t j = 0; j < n; ++j) {
      row[j] = static_cast<double>(c[j]);
    }
    std::fill(row + n, row + width, 0.0);
  }
  std::fill(slab + iterations * width, slab + n_iter * width, 0.0);
}

// One matrix of the forward: P, its slab of cols (when the call saves them), its domain and iterations. In the
// scaling domain where it serves (unless `log_only`: the small-matrix path found that it does not), else in the
// log domain.
template <int B, typename S, typename A>
SYMKERNELS_INLINE void forward_matrix(const ForwardArgs<S, A>& a, const StackView<S>& stack, int64_t m,
                                      Workspace<A>& ws, bool log_only) {
  const int64_t n = stack.n;
  const S* x = stack.logits_of(m);
  S* p = stack.out_of(m);
  const int64_t limit = iteration_limit(a.caps, m, a.n_iter);
  A* k = ws.mat.data();
  A* row_max = ws.row_max.data();
  A* rs = ws.rows.data();
  A* cs = ws.cols.data();
  int64_t iterations = 0;  // stays 0 unless the scaling domain serves
  if (!log_only && load_logits(x, a.tau, n, k, row_max)) {
    build_kernel(k, row_max, n);
    iterations = scaling_iterate<B>(k, n, limit, a.early_exit, a.tol, rs, cs, ws.v1.data());
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
  if (a.cols_width > 0) {
    save_cols(cs + n, n, iterations, a.n_iter, a.cols_width, a.cols + m * a.n_iter * a.cols_width);
  }
}

#if SYMKERNELS_VECTORS
// The matrices of a lane task, W per group; the matrices a group does not serve go to the log domain. The
// iterates are kept (for cols) only when the call saves them.
template <int N, int B, typename S, typename A>
SYMKERNELS_INLINE void forward_lanes_task(const ForwardArgs<S, A>& a, const Task& task) {
  constexpr int W = Lanes<S, B>::W;
  const StackView<S>& stack = a.stacks[task.stack];
  std::unique_ptr<LaneHistory<N, S, B>> history;
  if (a.cols_width > 0) history = std::make_unique<LaneHistory<N, S, B>>(a.n_iter);
  std::unique_ptr<Workspace<A>> ws;  // for the log domain, allocated on first use
  const bool masked = a.early_exit || a.caps != nullptr;
  for (int64_t q = task.begin; q < task.end; q += W) {
    LaneGroup<S, B> g;
    g.count = static_cast<int>(std::min<int64_t>(W, task.end - q));
    g.consecutive = task.index == nullptr;
    for (int l = 0; l < g.count; ++l) {
      g.matrix[l] = task.matrix(q + l);
      g.logits[l] = stack.logits_of(g.matrix[l]);
      g.out[l] = stack.out_of(g.matrix[l]);
    }
    const auto rest = masked ? forward_lanes<N, B, true>(a, g, stack.n, history.get())
                             : forward_lanes<N, B, false>(a, g, stack.n, history.get());
    for (int l = 0; l < g.count; ++l) {
      if ((rest >> l & 1u) == 0) continue;
      if (!ws) ws = std::make_unique<Workspace<A>>(stack.n, a.n_iter, /*backward=*/false);
      forward_matrix<B, S, A>(a, stack, g.matrix[l], *ws, /*log_only=*/true);
    }
  }
}
#endif

template <int B, typename S, typename A>
SYMKERNELS_INLINE void forward_task_impl(const ForwardArgs<S, A>& a, const Task& task) {
  const StackView<S>& stack = a.stacks[task.stack];
#if SYMKERNELS_VECTORS
  if (task.lanes) {
    switch (lane_size(stack.n)) {
      case 2:
        return forward_lanes_task<2, B, S, A>(a, task);
      case 4:
        return forward_lanes_task<4, B, S, A>(a, task);
      default:
        return forward_lanes_task<8, B, S, A>(a, task);
    }
  }
#endif
  Workspace<A> ws(stack.n, a.n_iter, /*backward=*/false);
  for (int64_t q = task.begin; q < task.end; ++q) {
    forward_matrix<B, S, A>(a, stack, task.matrix(q), ws, /*log_only=*/false);
  }
}

template <typename S, typename A>
void forward_task(const ForwardArgs<S, A>& a, const Task& task) {
  forward_task_impl<32, S, A>(a, task);
}

#if SYMKERNELS_SINKHORN_AVX2
template <typename S, typename A>
SYMKERNELS_TARGET_AVX2 void forward_task_avx2(const ForwardArgs<S, A>& a, const Task& task) {
  forward_task_impl<32, S, A>(a, task);
}

template <typename S, typename A>
SYMKERNELS_TARGET_AVX512 void forward_task_avx512(const ForwardArgs<S, A>& a, const Task& task) {
  forward_task_impl<64, S, A>(a, task);
}
#endif

// The matrices that stopped before the slowest matrix of their stack, and every matrix's new cap: the most
// iterations its stack ran, within its own limit.
std::vector<int64_t> lagging_matrices(const RaggedLayout& layout, const int32_t* iterations, const int32_t* caps,
                                      int64_t n_iter, std::vector<int32_t>& stack_caps) {
  std::vector<int64_t> lagging;
  stack_caps.resize(static_cast<size_t>(layout.num_matrices()));
  int64_t begin = 0;
  for (const int64_t end : layout.stack_end) {
    const int32_t most = begin < end ? *std::max_element(iterations + begin, iterations + end) : 0;
    for (int64_t m = begin; m < end; ++m) {
      stack_caps[m] = static_cast<int32_t>(std::min<int64_t>(most, iteration_limit(caps, m, n_iter)));
      if (iterations[m] < stack_caps[m]) {
        lagging.push_back(m);
      }
    }
    begin = end;
  }
  return lagging;
}

}  // namespace

void sinkhorn_forward_cpu(const std::vector<at::Tensor>& stacks, const RaggedLayout& layout, int64_t n_iter,
                          double tau, double tol, bool stop_by_stack, const int32_t* caps,
                          const std::vector<at::Tensor>& p, const at::Tensor& cols, const at::Tensor& domain,
                          const at::Tensor& iterations) {
  AT_DISPATCH_FLOATING_TYPES(stacks[0].scalar_type(), "sinkhorn_forward_cpu", [&] {
    using A = typename ComputeType<scalar_t>::type;
    const std::vector<StackView<scalar_t>> views = stack_views<scalar_t>(stacks, p, nullptr);
    const ForwardArgs<scalar_t, A> args{views.data(),
                                        cols.mutable_data_ptr<double>(),
                                        domain.mutable_data_ptr<int32_t>(),
                                        iterations.mutable_data_ptr<int32_t>(),
                                        caps,
                                        static_cast<scalar_t>(tau),
                                        static_cast<A>(tol),
                                        early_exit_enabled(tol),
                                        n_iter,
                                        cols.size(2)};
#if SYMKERNELS_SINKHORN_AVX2
    const auto task_fn = pick_for_isa(&forward_task<scalar_t, A>, &forward_task_avx2<scalar_t, A>,
                                      &forward_task_avx512<scalar_t, A>);
#else
    const auto task_fn = &forward_task<scalar_t, A>;
#endif
    run_tasks(plan_tasks(views, nullptr, layout.num_matrices(), caps, n_iter),
              [&](const Task& task) { task_fn(args, task); });
    if (!stop_by_stack || !args.early_exit) {
      return;
    }
    // Matrices that stopped early run again, capped at their stack's count: stopping by tol after t iterations
    // computes what t capped iterations compute, so the others keep their first pass.
    std::vector<int32_t> stack_caps;
    const std::vector<int64_t> lagging = lagging_matrices(layout, args.iterations, caps, n_iter, stack_caps);
    ForwardArgs<scalar_t, A> rerun = args;
    rerun.caps = stack_caps.data();
    rerun.early_exit = false;
    run_tasks(plan_tasks(views, lagging.data(), static_cast<int64_t>(lagging.size()), rerun.caps, n_iter),
              [&](const Task& task) { task_fn(rerun, task); });
  });
}

}  // namespace symkernels::sinkhorn_detail
