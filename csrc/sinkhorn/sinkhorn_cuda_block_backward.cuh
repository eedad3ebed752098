// The block Sinkhorn backward (sinkhorn_cuda_block.cuh).
//
// Scaling domain: the recurrences of the CPU kernel (sinkhorn_cpu_backward.cpp) in three phases:
// A: ḡ_T = colsum(Ḡ ⊙ P) and r_T; B: for t = T..2 a pass that recomputes r_t from the saved c_{t-1}, forms f̄_t
// and the row weight w_t, and sums ḡ_{t-1} over the columns; the row factors (r_t, w_t) go to a per-row scratch
// and the column factors (u_{t-1} = c_{t-1} ⊙ ḡ_{t-1}, c_{t-1}) to a per-matrix scratch; C: per row,
// X = left @ right, M = K ⊙ (r_T c_T' ⊙ (Ḡ - 1 ḡ_T') - X) and Θ̄ = (M - r_1 K rowsum(M)) / tau. The log domain
// follows the Triton kernels: the same passes with entries exp(L0 + f + g), the potentials f_t kept per row, the
// column adjoints ḡ_t per matrix, and a last pass per row over t = T..1.
#pragma once

#include "sinkhorn/sinkhorn_cuda_block.cuh"

namespace symkernels::sinkhorn_cuda {

// ---------------------------------------------------------------------------------------------------------------
// Backward.

template <int CT, int W, int RREG>
SK_DEVICE void block_scaling_backward(BlockMatrix<CT, W, RREG>& bm, const BackwardArgs& a, int last,
                                      const double* slab, double* slots, float* vectors) {
  const int64_t slot_count = row_slots(a.n_iter);
  const int n = bm.n;
  auto saved = [&](int t, int b) {
    return bm.column_ok(b) ? static_cast<float>(saved_column<false>(slab, a.max_n, t, bm.column(b))) : 0.f;
  };
  float c_last[CT];
  float c_prev[CT];
#pragma unroll
  for (int b = 0; b < CT; ++b) {
    c_last[b] = saved(last, b);
    c_prev[b] = saved(last - 1, b);
  }
  // A: r_T and ḡ_T = colsum(Ḡ ⊙ P).
  float partial[CT];
#pragma unroll
  for (int b = 0; b < CT; ++b) partial[b] = 0.f;
  bm.for_each_row([&](int local_row, const float(&k)[CT]) {
    float d = 0.f;
#pragma unroll
    for (int b = 0; b < CT; ++b) d += k[b] * c_prev[b];
    const float r = 1.f / warp_sum(d);
    if (lane_id() == 0) slots[local_row * slot_count + slot_count - 1] = r;
    float grad[CT];
    bm.load_row(a.grad, a.type, local_row, grad);
#pragma unroll
    for (int b = 0; b < CT; ++b) partial[b] += grad[b] * scaling_entry(r, k[b], c_last[b]);
  });
  float g_last[CT];
  bm.template exchange<SumOp>(partial, g_last, 0);

  // B: t = T..2. f̄_T[i] = r_T[i] sum_j K_ij c_T[j] (Ḡ_ij - ḡ_T[j]), f̄_t[i] = -r_t[i] K_i · u_t for t < T; the row
  // weight w_t = r_t f̄_t; ḡ_{t-1} = -c_{t-1} ⊙ K' w_t. Left factors: r_t at slot t - 1 (t < T; r_1 is formed in
  // C), w_t at T + t - 3; right factors: u_{t-1} at vector t - 2, c_{t-1} at T + t - 3.
  float u[CT];
#pragma unroll
  for (int b = 0; b < CT; ++b) u[b] = 0.f;
  for (int t = last; t >= 2; --t) {
    if (t < last) {
#pragma unroll
      for (int b = 0; b < CT; ++b) c_prev[b] = saved(t - 1, b);
    }
#pragma unroll
    for (int b = 0; b < CT; ++b) partial[b] = 0.f;
    bm.for_each_row([&](int local_row, const float(&k)[CT]) {
      float d = 0.f;
#pragma unroll
      for (int b = 0; b < CT; ++b) d += k[b] * c_prev[b];
      const float r = 1.f / warp_sum(d);
      float dot = 0.f;
      if (t == last) {
        float grad[CT];
        bm.load_row(a.grad, a.type, local_row, grad);
#pragma unroll
        for (int b = 0; b < CT; ++b) dot += k[b] * c_last[b] * (grad[b] - g_last[b]);
      } else {
#pragma unroll
        for (int b = 0; b < CT; ++b) dot -= k[b] * u[b];
      }
      const float w = backward_row_weight(r, warp_sum(dot));
      if (lane_id() == 0) {
        double* row = slots + local_row * slot_count;
        if (t < last) row[t - 1] = r;
        row[last + t - 3] = w;
      }
#pragma unroll
      for (int b = 0; b < CT; ++b) partial[b] += k[b] * w;
    });
    float column_sum[CT];
    bm.template exchange<SumOp>(partial, column_sum, 0);
#pragma unroll
    for (int b = 0; b < CT; ++b) u[b] = bm.column_ok(b) ? backward_column_term(c_prev[b], column_sum[b]) : 0.f;
    if (bm.rank == 0 && warp_id() == 0) {
#pragma unroll
      for (int b = 0; b < CT; ++b) {
        if (bm.column_ok(b)) {
          vectors[static_cast<int64_t>(t - 2) * n + bm.column(b)] = u[b];
          vectors[static_cast<int64_t>(last + t - 3) * n + bm.column(b)] = c_prev[b];
        }
      }
    }
  }
  cluster_sync(bm.cluster);  // the right factors, written by one warp, are read by every CTA

  // C: per row, X = left @ right, M and Θ̄.
  const int width = 2 * (last - 1);
  const float inv_tau = 1.f / a.tau;
  bm.for_each_row([&](int local_row, const float(&k)[CT]) {
    float d = 0.f;
#pragma unroll
    for (int b = 0; b < CT; ++b) d += k[b];  // K c_0, c_0 = 1
    const float r_first = 1.f / warp_sum(d);
    const double* row = slots + local_row * slot_count;
    float x[CT];
#pragma unroll
    for (int b = 0; b < CT; ++b) x[b] = 0.f;
    for (int q = 0; q < width; ++q) {
      const float left = q == 0 ? r_first : static_cast<float>(row[q]);
      const float* right = vectors + static_cast<int64_t>(q) * n;
#pragma unroll
      for (int b = 0; b < CT; ++b) {
        if (bm.column_ok(b)) x[b] += left * right[bm.column(b)];
      }
    }
    const float r_last = static_cast<float>(row[slot_count - 1]);
    float grad[CT];
    bm.load_row(a.grad, a.type, local_row, grad);
    float adjoint[CT];
    float s = 0.f;
#pragma unroll
    for (int b = 0; b < CT; ++b) {
      adjoint[b] = bm.column_ok(b) ? adjoint_entry(k[b], r_last, c_last[b], grad[b], g_last[b], x[b]) : 0.f;
      s += adjoint[b];
    }
    const float row_term = r_first * warp_sum(s);
    const int64_t start = bm.row_start(local_row);
#pragma unroll
    for (int b = 0; b < CT; ++b) {
      if (bm.column_ok(b)) {
        store_element(a.out, start + bm.column(b), gradient_entry(adjoint[b], row_term, k[b], inv_tau), a.type);
      }
    }
  });
}

// f_t[i] = -lse_j(L0_ij + g_{t-1}[j]) for the lane's row (in every lane).
template <int CT, int W, int RREG>
SK_DEVICE double block_log_row(const BlockMatrix<CT, W, RREG>& bm, const float (&l0)[CT], const double* slab,
                               int max_n, int previous) {
  double z[CT];
  double z_max = -kInfinity;
#pragma unroll
  for (int b = 0; b < CT; ++b) {
    z[b] = bm.column_ok(b) ? static_cast<double>(l0[b]) + saved_column<true>(slab, max_n, previous, bm.column(b))
                           : -kInfinity;
    z_max = z[b] > z_max ? z[b] : z_max;
  }
  z_max = warp_max(z_max);
  float s = 0.f;
#pragma unroll
  for (int b = 0; b < CT; ++b) {
    if (bm.column_ok(b)) s += precise_expf(static_cast<float>(z[b] - z_max));
  }
  return log_potential<double>(z_max, warp_sum(s));
}

template <int CT, int W, int RREG>
SK_DEVICE void block_log_backward(BlockMatrix<CT, W, RREG>& bm, const BackwardArgs& a, int last, const double* slab,
                                  double* slots, float* vectors) {
  const int64_t slot_count = row_slots(a.n_iter);
  const int n = bm.n;
  auto g_at = [&](int t, int b) { return saved_column<true>(slab, a.max_n, t, bm.column(b)); };
  // A: f_T (slot T - 1) and ḡ_T = colsum(Ḡ ⊙ P).
  float partial[CT];
#pragma unroll
  for (int b = 0; b < CT; ++b) partial[b] = 0.f;
  bm.for_each_row([&](int local_row, const float(&l0)[CT]) {
    const double f = block_log_row(bm, l0, slab, a.max_n, last - 1);
    if (lane_id() == 0) slots[local_row * slot_count + last - 1] = f;
    float grad[CT];
    bm.load_row(a.grad, a.type, local_row, grad);
#pragma unroll
    for (int b = 0; b < CT; ++b) {
      if (bm.column_ok(b)) partial[b] += grad[b] * log_entry(l0[b], f, g_at(last, b));
    }
  });
  float g_last[CT];
  bm.template exchange<SumOp>(partial, g_last, 0);

  // B: t = T..2: f_t (slot t - 1), f̄_t = rowsum(B_t ⊙ ([t = T] Ḡ - 1 ḡ_t')), ḡ_{t-1} = -colsum(A_t ⊙ f̄_t 1'),
  // kept at vector t - 2.
  float g_bar[CT];
#pragma unroll
  for (int b = 0; b < CT; ++b) g_bar[b] = g_last[b];
  for (int t = last; t >= 2; --t) {
#pragma unroll
    for (int b = 0; b < CT; ++b) partial[b] = 0.f;
    bm.for_each_row([&](int local_row, const float(&l0)[CT]) {
      double* row = slots + local_row * slot_count;
      const double f = t == last ? row[t - 1] : block_log_row(bm, l0, slab, a.max_n, t - 1);
      if (t < last && lane_id() == 0) row[t - 1] = f;
      float grad[CT];
      if (t == last) {
        bm.load_row(a.grad, a.type, local_row, grad);
      } else {
#pragma unroll
        for (int b = 0; b < CT; ++b) grad[b] = 0.f;
      }
      float s = 0.f;
#pragma unroll
      for (int b = 0; b < CT; ++b) {
        if (bm.column_ok(b)) s += log_entry(l0[b], f, g_at(t, b)) * (grad[b] - g_bar[b]);
      }
      const float f_bar = warp_sum(s);
#pragma unroll
      for (int b = 0; b < CT; ++b) {
        if (bm.column_ok(b)) partial[b] += log_entry(l0[b], f, g_at(t - 1, b)) * f_bar;
      }
    });
    float column_sum[CT];
    bm.template exchange<SumOp>(partial, column_sum, 0);
#pragma unroll
    for (int b = 0; b < CT; ++b) g_bar[b] = -column_sum[b];
    if (bm.rank == 0 && warp_id() == 0) {
#pragma unroll
      for (int b = 0; b < CT; ++b) {
        if (bm.column_ok(b)) vectors[static_cast<int64_t>(t - 2) * n + bm.column(b)] = g_bar[b];
      }
    }
  }
  cluster_sync(bm.cluster);  // the column adjoints, written by one warp, are read by every CTA

  // C: per row, M = B_T ⊙ (Ḡ - 1 ḡ_T') - sum_{t<T} B_t ⊙ 1 ḡ_t' - sum_{t>=2} A_t ⊙ f̄_t 1', then
  // Θ̄ = (M - A_1 ⊙ rowsum(M) 1') / tau.
  bm.for_each_row([&](int local_row, const float(&l0)[CT]) {
    const double* row = slots + local_row * slot_count;
    const double f_first = block_log_row(bm, l0, slab, a.max_n, 0);
    float grad[CT];
    bm.load_row(a.grad, a.type, local_row, grad);
    float adjoint[CT];
#pragma unroll
    for (int b = 0; b < CT; ++b) adjoint[b] = 0.f;
    for (int t = last; t >= 1; --t) {
      const double f = t == 1 ? f_first : row[t - 1];
      float s = 0.f;
#pragma unroll
      for (int b = 0; b < CT; ++b) {
        if (bm.column_ok(b)) {
          const float g_bar_t = t == last ? g_last[b] : vectors[static_cast<int64_t>(t - 1) * n + bm.column(b)];
          const float step = log_entry(l0[b], f, g_at(t, b)) * ((t == last ? grad[b] : 0.f) - g_bar_t);
          adjoint[b] += step;
          s += step;
        }
      }
      const float f_bar = warp_sum(s);
      if (t >= 2) {
#pragma unroll
        for (int b = 0; b < CT; ++b) {
          if (bm.column_ok(b)) adjoint[b] -= log_entry(l0[b], f, g_at(t - 1, b)) * f_bar;
        }
      }
    }
    float total = 0.f;
#pragma unroll
    for (int b = 0; b < CT; ++b) total += adjoint[b];
    total = warp_sum(total);
    const int64_t start = bm.row_start(local_row);
#pragma unroll
    for (int b = 0; b < CT; ++b) {
      if (bm.column_ok(b)) {
        const float first = log_entry(l0[b], f_first, 0.0);  // A_1 = exp(L0 + f_1 + g_0)
        store_element(a.out, start + bm.column(b), (adjoint[b] - first * total) / a.tau, a.type);
      }
    }
  });
}

template <int CT, int W, int RREG>
__global__ void __launch_bounds__(32 * W, 1)
    block_backward_kernel(const BackwardArgs a, const StackTable table, const BlockLaunch launch) {
  BlockMatrix<CT, W, RREG> bm;
  if (!bm.init(table, launch, a.kernel_rows)) return;
  const int64_t m = bm.matrix.index;
  const int last = static_cast<int>(saved_iterations(a.iterations, m, a.n_iter));
  const bool log = a.domain[m] != kScalingDomain;
  const double* slab = cols_slab(a.cols, m, a.n_iter, a.max_n);
  const int64_t slot_count = row_slots(a.n_iter);
  double* slots = a.row_scratch + (bm.matrix.row_offset + bm.row_begin) * slot_count;
  float* vectors = a.vector_scratch + bm.matrix.row_offset * slot_count;
  block_load_rows(bm, a.logits, a.type, a.tau, log);
  if (log) {
    block_log_backward(bm, a, last, slab, slots, vectors);
  } else {
    block_scaling_backward(bm, a, last, slab, slots, vectors);
  }
  if (bm.cluster > 1) cluster_sync(bm.cluster);
}

}  // namespace symkernels::sinkhorn_cuda
