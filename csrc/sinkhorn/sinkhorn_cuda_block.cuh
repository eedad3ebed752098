// Block Sinkhorn kernels (32 < n <= kMaxBlockN): one matrix per CTA, or per thread-block cluster on Hopper, whose
// CTAs take consecutive slabs of its rows. Warp w of a CTA takes the slab's rows w, w + W, w + 2W, ...; lane l takes
// the columns j = l + 32 b, b < CT. A row's K (or L0) lives in registers for the warp's first RREG rows, then in
// shared memory, then (rows that do not fit on chip) in a global scratch copy that stays in L2; each lane only ever
// reads back the entries it wrote itself. A row step is a lane-local dot product and a warp sum; a column step
// sums the warps' partial columns in shared memory and the CTAs' in distributed shared memory, in a fixed order,
// so every thread of the cluster gets the same bits and decisions (stop, domain) are uniform.
//
// This header holds what the forward (sinkhorn_cuda_block_forward.cuh) and the backward
// (sinkhorn_cuda_block_backward.cuh) share: a CTA's share of its matrix and the exchange of column sums.
#pragma once

#include "sinkhorn/sinkhorn_cuda_common.cuh"

namespace symkernels::sinkhorn_cuda {

using cuda::cluster_peer;
using cuda::cluster_rank;
using cuda::cluster_sync;
using cuda::dynamic_shared_memory;
using cuda::kFullMask;
using cuda::lane_id;
using cuda::warp_id;
using cuda::warp_max;
using cuda::warp_sum;
using sinkhorn_detail::adjoint_entry;
using sinkhorn_detail::backward_column_term;
using sinkhorn_detail::backward_row_weight;
using sinkhorn_detail::gradient_entry;
using sinkhorn_detail::iteration_limit;
using sinkhorn_detail::log_potential;
using sinkhorn_detail::log_row_sum;
using sinkhorn_detail::row_sum_within;
using sinkhorn_detail::saved_iterations;
using sinkhorn_detail::scaling_domain_allowed;
using sinkhorn_detail::scaling_in_range;
using sinkhorn_detail::scaling_row_sum;

// Flags exchanged with the column sums (OR-ed over every row of the matrix).
constexpr int kRowFailed = 1;   // some row of the tested iterate is not within tol
constexpr int kOutOfRange = 2;  // some row scaling left the safe range

struct SumOp {
  static constexpr float kIdentity = 0.f;
  SK_DEVICE static float combine(float a, float b) { return a + b; }
};

struct MaxOp {
  static constexpr float kIdentity = -kInfinity;
  SK_DEVICE static float combine(float a, float b) { return b > a ? b : a; }
};

struct NoFinish {
  SK_DEVICE void operator()(int, float) const {}
};

// One online log-sum-exp over a column's entries y: sum of exp(y - shift), the shift any float near the running
// maximum (the differences are taken in double); -inf entries add nothing.
SK_DEVICE void push_log_sum(float& shift, float& sum, double y) {
  if (y == -static_cast<double>(kInfinity)) return;
  const float candidate = static_cast<float>(y);
  if (candidate > shift) {
    sum *= precise_expf(static_cast<float>(static_cast<double>(shift) - static_cast<double>(candidate)));
    shift = candidate;
  }
  sum += precise_expf(static_cast<float>(y - static_cast<double>(shift)));
}

// A CTA's share of its matrix: its rows, where they live, and the exchange of column sums.
template <int CT, int W, int RREG>
struct BlockMatrix {
  static constexpr int kRegisterRows = RREG > 0 ? RREG : 1;

  MatrixRef matrix;
  int n;
  int cluster;
  int rank;
  int64_t row_begin;  // first row of this CTA's slab
  int row_count;      // rows of the slab
  BlockSharedLayout layout;
  unsigned char* shared;
  float* global_rows;  // the matrix's first element in the global scratch copy of K
  int exchanges;       // exchanges so far (their parity picks the cluster buffer)
  float kreg[kRegisterRows][CT];

  // False (and nothing to do) for a cluster past the launch's matrices.
  SK_DEVICE bool init(const StackTable& table, const BlockLaunch& launch, float* kernel_rows) {
    cluster = launch.cluster;
    rank = cluster > 1 ? cluster_rank() : 0;
    matrix = locate_matrix(table, static_cast<int64_t>(blockIdx.x) / cluster);
    if (!matrix.valid) return false;
    n = matrix.n;
    layout = block_shared_layout(n, W, cluster, launch.shared_bytes);
    row_begin = static_cast<int64_t>(rank) * layout.rows;
    const int64_t left = n - row_begin;
    row_count = static_cast<int>(left < 0 ? 0 : (left < layout.rows ? left : layout.rows));
    shared = dynamic_shared_memory();
    global_rows = kernel_rows != nullptr ? kernel_rows + matrix.offset : nullptr;
    exchanges = 0;
    return true;
  }

  SK_DEVICE int column(int b) const { return lane_id() + 32 * b; }
  SK_DEVICE bool column_ok(int b) const { return column(b) < n; }
  SK_DEVICE int64_t row_start(int local_row) const { return matrix.offset + (row_begin + local_row) * n; }

  template <typename T>
  SK_DEVICE T* region(int64_t offset) const {
    return reinterpret_cast<T*>(shared + offset);
  }
  // The log-domain column potentials g (double [padded_n]), shared by the CTA's threads.
  SK_DEVICE double* column_state() const { return region<double>(layout.column_state); }

  // Row scalings (r or f) of the slab's rows, two generations.
  SK_DEVICE double* row_state(int generation) const {
    return region<double>(layout.row_state) + (generation & 1) * layout.rows;
  }

  // Where the slab's row `local_row` of K is kept, past the register rows: shared memory or the global copy.
  SK_DEVICE float* stored_row(int local_row) const {
    const int64_t slot = local_row - static_cast<int64_t>(W) * RREG;
    if (slot < layout.kernel_row_capacity) return region<float>(layout.kernel_rows) + slot * layout.padded_n;
    return global_rows + (row_begin + local_row) * n;
  }

  // fn(local_row, row) for every row of the warp, row being the CT entries of the lane (0 past n).
  template <class Fn>
  SK_DEVICE void for_each_row(Fn&& fn) {
    const int w = warp_id();
#pragma unroll
    for (int a = 0; a < RREG; ++a) {
      const int local_row = w + W * a;
      if (local_row < row_count) fn(local_row, kreg[a]);
    }
#pragma unroll 1
    for (int local_row = w + W * RREG; local_row < row_count; local_row += W) {
      const float* stored = stored_row(local_row);
      float k[CT];
#pragma unroll
      for (int b = 0; b < CT; ++b) k[b] = column_ok(b) ? stored[column(b)] : 0.f;
      fn(local_row, k);
    }
  }

  // fill(local_row, row) for every row of the warp, then keeps the row.
  template <class Fn>
  SK_DEVICE void fill_rows(Fn&& fill) {
    const int w = warp_id();
#pragma unroll
    for (int a = 0; a < RREG; ++a) {
      const int local_row = w + W * a;
      if (local_row < row_count) fill(local_row, kreg[a]);
    }
    for (int local_row = w + W * RREG; local_row < row_count; local_row += W) {
      float k[CT];
      fill(local_row, k);
      float* stored = stored_row(local_row);
#pragma unroll
      for (int b = 0; b < CT; ++b) {
        if (column_ok(b)) stored[column(b)] = k[b];
      }
    }
  }

  // L0 = logits / tau for the lane's columns of a row (-inf past n); its maximum and minimum over the row, and
  // whether it is finite, in every lane.
  SK_DEVICE void load_l0(const void* logits, ElementType type, float tau, int local_row, float (&v)[CT], float& hi,
                         float& lo, bool& finite) const {
    const int64_t start = row_start(local_row);
    hi = -kInfinity;
    lo = kInfinity;
    finite = true;
#pragma unroll
    for (int b = 0; b < CT; ++b) {
      v[b] = -kInfinity;
      if (column_ok(b)) {
        const float x = scaled_logit(logits, start + column(b), type, tau);
        v[b] = x;
        hi = x > hi ? x : hi;
        lo = x < lo ? x : lo;
        finite = finite && isfinite(x);
      }
    }
    hi = warp_max(hi);
    lo = -warp_max(-lo);
    finite = __all_sync(kFullMask, finite);
  }

  SK_DEVICE void load_row(const void* data, ElementType type, int local_row, float (&v)[CT]) const {
    const int64_t start = row_start(local_row);
#pragma unroll
    for (int b = 0; b < CT; ++b) v[b] = column_ok(b) ? load_element(data, start + column(b), type) : 0.f;
  }

  // Combines every thread's partial column vector (entries j = l + 32 b) over the whole matrix with Op, in a fixed
  // order (warps of a CTA, then CTAs of the cluster), into `total` in every thread; flags are OR-ed the same way
  // (each warp's flags from its lane 0). finish(j, total_j) runs once per column j < padded_n, in the thread that
  // formed it, before the last barrier. Three barriers (two without a cluster).
  template <class Op, bool VECTOR = true, class Finish = NoFinish>
  SK_DEVICE int exchange(const float (&partial)[CT], float (&total)[CT], int flags, Finish finish = Finish()) {
    const int w = warp_id();
    const int64_t padded = layout.padded_n;
    float* warp_partials = region<float>(0);
    int* flag_slots = region<int>(layout.flags);  // [W] warps, [2] cluster generations, [1] total
    const int generation = exchanges & 1;
    ++exchanges;
    if (VECTOR) {
#pragma unroll
      for (int b = 0; b < CT; ++b) {
        if (column(b) < padded) warp_partials[w * padded + column(b)] = partial[b];
      }
    }
    if (lane_id() == 0) flag_slots[w] = flags;
    __syncthreads();
    float* own = cluster > 1 ? region<float>(layout.cluster_partials) + generation * padded : region<float>(layout.totals);
    int* own_flag = cluster > 1 ? flag_slots + W + generation : flag_slots + W + 2;
    if (VECTOR) {
      for (int64_t j = threadIdx.x; j < padded; j += blockDim.x) {
        float v = warp_partials[j];
        for (int other = 1; other < W; ++other) v = Op::combine(v, warp_partials[other * padded + j]);
        own[j] = v;
        if (cluster == 1) finish(static_cast<int>(j), v);
      }
    }
    if (threadIdx.x == 0) {
      int combined = 0;
      for (int other = 0; other < W; ++other) combined |= flag_slots[other];
      *own_flag = combined;
    }
    if (cluster > 1) {
      cluster_sync(cluster);
      float* totals = region<float>(layout.totals);
      if (VECTOR) {
        for (int64_t j = threadIdx.x; j < padded; j += blockDim.x) {
          float v = cluster_peer(own, 0)[j];
          for (int other = 1; other < cluster; ++other) v = Op::combine(v, cluster_peer(own, other)[j]);
          totals[j] = v;
          finish(static_cast<int>(j), v);
        }
      }
      if (threadIdx.x == 0) {
        int combined = 0;
        for (int other = 0; other < cluster; ++other) combined |= *cluster_peer(own_flag, other);
        flag_slots[W + 2] = combined;
      }
    }
    __syncthreads();
    if (VECTOR) {
      const float* totals = region<float>(layout.totals);
#pragma unroll
      for (int b = 0; b < CT; ++b) total[b] = column(b) < padded ? totals[column(b)] : Op::kIdentity;
    }
    return flag_slots[W + 2];
  }

  SK_DEVICE int exchange_flags(int flags) {
    float none[CT];
    return exchange<SumOp, false>(none, none, flags);
  }
};

// The slab's rows of L0 (log domain) or K into the row storage; returns whether some row rules out the scaling
// domain (this CTA's rows only).
template <int CT, int W, int RREG>
SK_DEVICE bool block_load_rows(BlockMatrix<CT, W, RREG>& bm, const void* logits, ElementType type, float tau,
                               bool log) {
  bool ruled_out = false;
  bm.fill_rows([&](int local_row, float(&v)[CT]) {
    float hi;
    float lo;
    bool finite;
    bm.load_l0(logits, type, tau, local_row, v, hi, lo, finite);
    ruled_out = ruled_out || !scaling_domain_allowed(finite, hi - lo);
    if (!log) {
#pragma unroll
      for (int b = 0; b < CT; ++b) v[b] = bm.column_ok(b) ? precise_expf(v[b] - hi) : 0.f;
    }
  });
  return ruled_out;
}

}  // namespace symkernels::sinkhorn_cuda
