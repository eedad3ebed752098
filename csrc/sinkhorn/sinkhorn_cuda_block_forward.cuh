// The block Sinkhorn forward (sinkhorn_cuda_block.cuh): scaling-domain iterations with the per-matrix fallback
// to the log domain, the tolerance exit decided from the exchanged row flags, and the saved column scalings.
#pragma once

#include "sinkhorn/sinkhorn_cuda_block.cuh"

namespace symkernels::sinkhorn_cuda {

// ---------------------------------------------------------------------------------------------------------------
// Forward.

// Scaling-domain iterations (K in the rows); the rules of small_scaling_iterate. Returns T, with r_T in
// row_state(T) and c_T in c; `escaped` when a scaling left the safe range.
template <int CT, int W, int RREG>
SK_DEVICE int block_scaling_iterate(BlockMatrix<CT, W, RREG>& bm, const ForwardArgs& a, int limit, double* slab,
                                    float (&c)[CT], bool& escaped) {
#pragma unroll
  for (int b = 0; b < CT; ++b) c[b] = bm.column_ok(b) ? 1.f : 0.f;
  escaped = false;
  const bool test = a.test != 0;
  int t = 0;
  while (true) {
    float partial[CT];
#pragma unroll
    for (int b = 0; b < CT; ++b) partial[b] = 0.f;
    bool passed = true;
    bool outside = false;
    const double* previous = bm.row_state(t);
    double* current = bm.row_state(t + 1);
    bm.for_each_row([&](int local_row, const float(&k)[CT]) {
      float d = 0.f;
#pragma unroll
      for (int b = 0; b < CT; ++b) d += k[b] * c[b];
      d = warp_sum(d);
      const float r = 1.f / d;
      if (test && t >= 1) {
        passed = passed && row_sum_within(scaling_row_sum(static_cast<float>(previous[local_row]), d), a.tol);
      }
      outside = outside || !scaling_in_range(r);
      if (lane_id() == 0) current[local_row] = r;
#pragma unroll
      for (int b = 0; b < CT; ++b) partial[b] += k[b] * r;
    });
    float column_sum[CT];
    const int flags = bm.template exchange<SumOp>(partial, column_sum,
                                                  (passed ? 0 : kRowFailed) | (outside ? kOutOfRange : 0));
    if (test && t >= 1 && (flags & kRowFailed) == 0) break;  // P_t passed: iteration t + 1 is discarded
    bool column_outside = false;
#pragma unroll
    for (int b = 0; b < CT; ++b) {
      c[b] = bm.column_ok(b) ? 1.f / column_sum[b] : 0.f;
      column_outside = column_outside || (bm.column_ok(b) && !scaling_in_range(c[b]));
    }
    column_outside = __any_sync(kFullMask, column_outside);  // a warp holds every column
    ++t;
    if (bm.rank == 0 && warp_id() == 0) {
#pragma unroll
      for (int b = 0; b < CT; ++b) {
        if (bm.column_ok(b)) slab[static_cast<int64_t>(t - 1) * a.max_n + bm.column(b)] = c[b];
      }
    }
    if ((flags & kOutOfRange) != 0 || column_outside) {
      escaped = true;
      break;
    }
    if (t >= limit) break;
  }
  return t;
}

// Log-domain iterations (L0 in the rows), potentials in double; the column step takes two exchanges: the columns'
// maxima (float: any shift near the maximum will do, and this one every CTA shares), then their sums shifted by
// them, which the exchange turns into the potentials g_j in column_state(). Returns T, with f_T in row_state(T) and
// g_T in column_state().
template <int CT, int W, int RREG>
SK_DEVICE int block_log_iterate(BlockMatrix<CT, W, RREG>& bm, const ForwardArgs& a, int limit, double* slab) {
  double* g = bm.column_state();
  for (int j = threadIdx.x; j < bm.layout.padded_n; j += blockDim.x) g[j] = 0.0;
  __syncthreads();
  const bool test = a.test != 0;
  int t = 0;
  while (true) {
    float shift[CT];
    float sum[CT];
#pragma unroll
    for (int b = 0; b < CT; ++b) {
      shift[b] = -kInfinity;
      sum[b] = 0.f;
    }
    bool passed = true;
    const double* previous = bm.row_state(t);
    double* current = bm.row_state(t + 1);
    bm.for_each_row([&](int local_row, const float(&l0)[CT]) {
      double z_max = -kInfinity;
#pragma unroll
      for (int b = 0; b < CT; ++b) {
        if (bm.column_ok(b)) {
          const double z = static_cast<double>(l0[b]) + g[bm.column(b)];
          z_max = z > z_max ? z : z_max;
        }
      }
      z_max = warp_max(z_max);
      float s = 0.f;
#pragma unroll
      for (int b = 0; b < CT; ++b) {
        if (bm.column_ok(b)) s += precise_expf(static_cast<float>(static_cast<double>(l0[b]) + g[bm.column(b)] - z_max));
      }
      s = warp_sum(s);
      const double f = log_potential<double>(z_max, s);
      if (test && t >= 1) {
        passed = passed && row_sum_within(log_row_sum(previous[local_row], f), static_cast<double>(a.tol));
      }
      if (lane_id() == 0) current[local_row] = f;
#pragma unroll
      for (int b = 0; b < CT; ++b) {
        if (bm.column_ok(b)) push_log_sum(shift[b], sum[b], static_cast<double>(l0[b]) + f);
      }
    });
    float* column_shift = bm.template region<float>(bm.layout.column_shift);
    float column_max[CT];
    const int flags = bm.template exchange<MaxOp>(shift, column_max, passed ? 0 : kRowFailed,
                                                  [&](int j, float value) { column_shift[j] = value; });
    if (test && t >= 1 && (flags & kRowFailed) == 0) break;
    float partial[CT];
#pragma unroll
    for (int b = 0; b < CT; ++b) partial[b] = sum[b] == 0.f ? 0.f : sum[b] * precise_expf(shift[b] - column_max[b]);
    // (The thread that forms column j's sum formed its maximum too.)
    bm.template exchange<SumOp>(partial, sum, 0, [&](int j, float column_sum) {
      g[j] = j < bm.n ? log_potential<double>(column_shift[j], column_sum) : 0.0;
    });
    ++t;
    if (bm.rank == 0 && warp_id() == 0) {
#pragma unroll
      for (int b = 0; b < CT; ++b) {
        if (bm.column_ok(b)) slab[static_cast<int64_t>(t - 1) * a.max_n + bm.column(b)] = g[bm.column(b)];
      }
    }
    if (t >= limit) break;
  }
  return t;
}

template <int CT, int W, int RREG>
__global__ void __launch_bounds__(32 * W, 1)
    block_forward_kernel(const ForwardArgs a, const StackTable table, const BlockLaunch launch) {
  BlockMatrix<CT, W, RREG> bm;
  if (!bm.init(table, launch, a.kernel_rows)) return;
  const int64_t m = bm.matrix.index;
  const int limit = static_cast<int>(iteration_limit(a.caps, m, a.n_iter));
  double* slab = cols_slab(a.cols, m, a.n_iter, a.max_n);

  const bool ruled_out = block_load_rows(bm, a.logits, a.type, a.tau, false);
  bool use_log = bm.exchange_flags(ruled_out ? 1 : 0) != 0;
  int iterations = 0;
  if (!use_log) {
    float c[CT];
    bool escaped;
    iterations = block_scaling_iterate(bm, a, limit, slab, c, escaped);
    use_log = escaped;
    if (!escaped) {
      const double* r = bm.row_state(iterations);
      bm.for_each_row([&](int local_row, const float(&k)[CT]) {
        const float ri = static_cast<float>(r[local_row]);
        const int64_t start = bm.row_start(local_row);
#pragma unroll
        for (int b = 0; b < CT; ++b) {
          if (bm.column_ok(b)) store_element(a.p, start + bm.column(b), scaling_entry(ri, k[b], c[b]), a.type);
        }
      });
    }
  }
  if (use_log) {
    block_load_rows(bm, a.logits, a.type, a.tau, true);
    iterations = block_log_iterate(bm, a, limit, slab);
    const double* f = bm.row_state(iterations);
    const double* g = bm.column_state();
    bm.for_each_row([&](int local_row, const float(&l0)[CT]) {
      const double fi = f[local_row];
      const int64_t start = bm.row_start(local_row);
#pragma unroll
      for (int b = 0; b < CT; ++b) {
        if (bm.column_ok(b)) {
          store_element(a.p, start + bm.column(b), log_entry(l0[b], fi, g[bm.column(b)]), a.type);
        }
      }
    });
  }
  if (bm.rank == 0) {
    if (threadIdx.x == 0) {
      a.domain[m] = use_log ? kLogDomain : kScalingDomain;
      a.iterations[m] = iterations;
    }
    // Every other entry of the slab is 0: rows past T, columns past n. (Written after barriers that order it
    // behind the stores of an abandoned scaling attempt.)
    const int64_t entries = static_cast<int64_t>(a.n_iter) * a.max_n;
    for (int64_t e = threadIdx.x; e < entries; e += blockDim.x) {
      if (e / a.max_n >= iterations || e % a.max_n >= bm.n) slab[e] = 0.0;
    }
  }
  if (bm.cluster > 1) cluster_sync(bm.cluster);  // no CTA leaves while others may read its shared memory
}

}  // namespace symkernels::sinkhorn_cuda
