// Device code of the CUDA kernel-expansion kernels (expansion_cuda.h): the tiled product and the four kernels built
// on it. Free of ATen; compiled by expansion_cuda_launchers.cu, and for the host by tests/ops/cuda_emulation.
#pragma once

#include <cstdint>

#include "cuda_device.cuh"
#include "expansion/expansion_cuda.h"

namespace symkernels::expansion_cuda {

using cuda::dynamic_shared_memory;
using cuda::load_element;
using cuda::store_element;

// The outputs of one thread in its CTA's tile: rows row_lane() + 16 a and columns column_lane() + 16 b (a, b < 4),
// so that the 16 threads of a row group write 16 consecutive columns.
constexpr int kLanes = 16;
constexpr int kPerThread = kTile / kLanes;

SK_DEVICE int column_lane() {
  return static_cast<int>(threadIdx.x) % kLanes;
}

SK_DEVICE int row_lane() {
  return static_cast<int>(threadIdx.x) / kLanes;
}

struct Accumulator {
  float v[kPerThread][kPerThread];
};

// Stages a [kChunk, kTile] slice of an operand in shared memory, tile[k * kTileStride + x] = value(x, k), with x the
// output row (or column) it feeds and k the reduction term; value returns 0 outside the operand. The threads walk
// along x when x is the operand's contiguous dimension, else along k, so that neighbours read neighbouring elements.
template <bool XContiguous, class Value>
SK_DEVICE void stage(float* tile, const Value& value) {
  for (int e = static_cast<int>(threadIdx.x); e < kChunk * kTile; e += kTileThreads) {
    const int x = XContiguous ? e % kTile : e / kChunk;
    const int k = XContiguous ? e / kTile : e % kChunk;
    tile[k * kTileStride + x] = value(x, k);
  }
}

// acc += the product of the staged [rows x kChunk] and [kChunk x columns] slices.
SK_DEVICE void multiply_staged(const float* a_tile, const float* b_tile, Accumulator& acc) {
  const int r = row_lane();
  const int c = column_lane();
#pragma unroll 4
  for (int k = 0; k < kChunk; ++k) {
    float a[kPerThread];
    float b[kPerThread];
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
      a[i] = a_tile[k * kTileStride + r + kLanes * i];
      b[i] = b_tile[k * kTileStride + c + kLanes * i];
    }
#pragma unroll
    for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
      for (int j = 0; j < kPerThread; ++j) acc.v[i][j] = fmaf(a[i], b[j], acc.v[i][j]);
    }
  }
}

// acc += sum_{k < length} A(row, k) B(k, column) over the CTA's tile, in the order k = 0, 1, ...; a_value(x, k) is
// A at tile row x, b_value(x, k) is B at tile column x (both 0 outside their operands, and for k >= length). Every
// thread of the CTA must call it (it synchronises them).
template <bool AContiguous, bool BContiguous, class AValue, class BValue>
SK_DEVICE void tile_product(int length, const AValue& a_value, const BValue& b_value, Accumulator& acc) {
  float* a_tile = reinterpret_cast<float*>(dynamic_shared_memory());
  float* b_tile = a_tile + kChunk * kTileStride;
  for (int k0 = 0; k0 < length; k0 += kChunk) {
    stage<AContiguous>(a_tile, [&](int x, int k) { return k0 + k < length ? a_value(x, k0 + k) : 0.f; });
    stage<BContiguous>(b_tile, [&](int x, int k) { return k0 + k < length ? b_value(x, k0 + k) : 0.f; });
    __syncthreads();
    multiply_staged(a_tile, b_tile, acc);
    __syncthreads();
  }
}

// fn(i, j, row, column) for each output acc.v[i][j] of the thread at (row, column) of its CTA's tile at
// (row0, column0), inside [0, rows) x [0, columns).
template <class Fn>
SK_DEVICE void for_each_output(int row0, int column0, int rows, int columns, const Fn& fn) {
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
    const int row = row0 + row_lane() + kLanes * i;
    if (row >= rows) continue;
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      const int column = column0 + column_lane() + kLanes * j;
      if (column < columns) fn(i, j, row, column);
    }
  }
}

SK_DEVICE void clear(Accumulator& acc) {
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) acc.v[i][j] = 0.f;
  }
}

// Where K[o, g, i, n] lies in the conv weight [O*G, I*G_in, k, k] (kernel or grad), for the row r = o * I + i of
// the (o, i) rows, n = h * k^2 + s: element [o * G + g, i * G_in + h, s] of a contiguous weight, which is [O, G, I, d]
// in memory; channels_last puts the input channels innermost, [O * G, s, I * G_in], so that there the neighbours
// of an element are the next rows (i), not the next columns (n).
template <bool ChannelsLast>
SK_DEVICE int64_t kernel_offset(const ExpansionArgs& a, int r, int g, int n) {
  const int o = r / a.in;
  const int i = r - o * a.in;
  const int64_t output_channel = static_cast<int64_t>(o) * a.groups + g;
  if (!ChannelsLast) return (output_channel * a.in + i) * a.d + n;
  const int h = n / a.kernel_area;
  const int s = n - h * a.kernel_area;
  return (output_channel * a.kernel_area + s) * (static_cast<int64_t>(a.in) * a.in_group) +
         static_cast<int64_t>(i) * a.in_group + h;
}

// Writes the CTA's output tile of K for group g. A contiguous kernel is written from the registers (the 16 threads
// of a row group write 16 consecutive columns); a channels_last one through shared memory, transposed, so that
// consecutive threads write consecutive rows. Every thread of the CTA must call it.
template <bool ChannelsLast>
SK_DEVICE void store_kernel_tile(const ExpansionArgs& a, const Accumulator& acc, int row0, int column0, int g) {
  const int rows = a.out * a.in;
  if (!ChannelsLast) {
    for_each_output(row0, column0, rows, a.d, [&](int i, int j, int r, int n) {
      store_element(a.kernel, kernel_offset<false>(a, r, g, n), acc.v[i][j], a.kernel_type);
    });
    return;
  }
  // tile[column * kTileStride + row]: the padded stride keeps both the writes and the reads free of bank conflicts
  // beyond two-way.
  // (tile_product ends with a barrier: no thread still reads the staged operands this overwrites.)
  float* tile = reinterpret_cast<float*>(dynamic_shared_memory());
#pragma unroll
  for (int i = 0; i < kPerThread; ++i) {
#pragma unroll
    for (int j = 0; j < kPerThread; ++j) {
      tile[(column_lane() + kLanes * j) * kTileStride + row_lane() + kLanes * i] = acc.v[i][j];
    }
  }
  __syncthreads();
  for (int e = static_cast<int>(threadIdx.x); e < kTile * kTile; e += kTileThreads) {
    const int x = e % kTile;
    const int c = e / kTile;
    const int r = row0 + x;
    const int n = column0 + c;
    if (r < rows && n < a.d) {
      store_element(a.kernel, kernel_offset<true>(a, r, g, n), tile[c * kTileStride + x], a.kernel_type);
    }
  }
}

// One CTA per (g, row tile, column tile): kernel[o, g, i, n] = sum_m R_g[n, m] weight[o, i, m], or weight[o, i, n]
// itself for the identity (g < identity).
template <bool ChannelsLast>
__global__ void __launch_bounds__(kTileThreads) expand_forward_kernel(ExpansionArgs a, int row_tiles,
                                                                       int column_tiles) {
  const int tile = static_cast<int>(blockIdx.x);
  const int column0 = (tile % column_tiles) * kTile;
  const int row0 = (tile / column_tiles % row_tiles) * kTile;
  const int g = tile / column_tiles / row_tiles;
  const int rows = a.out * a.in;
  const int d = a.d;
  Accumulator acc;
  clear(acc);
  if (g < a.identity) {
    for_each_output(row0, column0, rows, d, [&](int i, int j, int r, int n) {
      acc.v[i][j] = load_element(a.weight, static_cast<int64_t>(r) * d + n, a.type);
    });
  } else {
    const int64_t rep = static_cast<int64_t>(g - a.identity) * d * d;
    tile_product<false, false>(
        d,
        [&](int x, int m) {
          const int r = row0 + x;
          return r < rows ? load_element(a.weight, static_cast<int64_t>(r) * d + m, a.type) : 0.f;
        },
        [&](int x, int m) {
          const int n = column0 + x;
          return n < d ? load_element(a.reps, rep + static_cast<int64_t>(n) * d + m, a.type) : 0.f;
        },
        acc);
  }
  store_kernel_tile<ChannelsLast>(a, acc, row0, column0, g);
}

// One CTA per (row tile, column tile): grad_weight[o, i, m] = grad[o, 0, i, m] (identity) + sum over (q, n), in that
// order, of grad[o, q + identity, i, n] R_q[n, m]. grad is staged walking along its contiguous dimension: the
// columns n, or the rows (o, i) when it is channels_last.
template <bool ChannelsLast>
__global__ void __launch_bounds__(kTileThreads) expand_grad_weight_kernel(ExpansionArgs a, int column_tiles) {
  const int tile = static_cast<int>(blockIdx.x);
  const int column0 = (tile % column_tiles) * kTile;
  const int row0 = (tile / column_tiles) * kTile;
  const int rows = a.out * a.in;
  const int d = a.d;
  Accumulator acc;
  clear(acc);
  tile_product<ChannelsLast, true>(
      a.learned * d,
      [&](int x, int k) {
        const int r = row0 + x;
        const int q = k / d;
        if (r >= rows) return 0.f;
        return load_element(a.grad, kernel_offset<ChannelsLast>(a, r, q + a.identity, k - q * d), a.kernel_type);
      },
      [&](int x, int k) {
        const int m = column0 + x;
        return m < d ? load_element(a.reps, static_cast<int64_t>(k) * d + m, a.type) : 0.f;  // R_q[n, m], k = q d + n
      },
      acc);
  for_each_output(row0, column0, rows, d, [&](int i, int j, int r, int m) {
    float value = acc.v[i][j];
    if (a.identity != 0) value += load_element(a.grad, kernel_offset<ChannelsLast>(a, r, 0, m), a.kernel_type);
    store_element(a.grad_weight, static_cast<int64_t>(r) * d + m, value, a.type);
  });
}

// One CTA per (run s, learned matrix q, row tile n, column tile m): the sum over the (o, i) rows of run s of
// grad[o, q + identity, i, n] weight[o, i, m], into grad_reps[q] (one run) or partials[s, q] (float32). grad is
// staged walking along its contiguous dimension, as in expand_grad_weight_kernel.
template <bool ChannelsLast>
__global__ void __launch_bounds__(kTileThreads) expand_grad_reps_kernel(ExpansionArgs a, int column_tiles) {
  const int tile = static_cast<int>(blockIdx.x);
  const int column0 = (tile % column_tiles) * kTile;
  const int n0 = (tile / column_tiles % column_tiles) * kTile;
  const int q = tile / column_tiles / column_tiles % a.learned;
  const int split = tile / column_tiles / column_tiles / a.learned;
  const int rows = a.out * a.in;
  const int d = a.d;
  const int first = split * a.split_rows;
  const int length = rows - first < a.split_rows ? rows - first : a.split_rows;
  const int g = q + a.identity;
  Accumulator acc;
  clear(acc);
  tile_product<!ChannelsLast, true>(
      length,
      [&](int x, int k) {
        const int n = n0 + x;
        return n < d ? load_element(a.grad, kernel_offset<ChannelsLast>(a, first + k, g, n), a.kernel_type) : 0.f;
      },
      [&](int x, int k) {
        const int m = column0 + x;
        return m < d ? load_element(a.weight, static_cast<int64_t>(first + k) * d + m, a.type) : 0.f;
      },
      acc);
  const int64_t matrix = (static_cast<int64_t>(split) * a.learned + q) * d * d;
  for_each_output(n0, column0, d, d, [&](int i, int j, int n, int m) {
    const int64_t offset = matrix + static_cast<int64_t>(n) * d + m;
    if (a.splits > 1) {
      a.partials[offset] = acc.v[i][j];
    } else {
      store_element(a.grad_reps, offset, acc.v[i][j], a.type);
    }
  });
}

// grad_reps = sum_s partials[s], in the order s = 0, 1, ...
__global__ void __launch_bounds__(kSumThreads) expand_sum_partials_kernel(ExpansionArgs a) {
  const int64_t numel = static_cast<int64_t>(a.learned) * a.d * a.d;
  const int64_t e = static_cast<int64_t>(blockIdx.x) * kSumThreads + threadIdx.x;
  if (e >= numel) return;
  float sum = 0.f;
  for (int s = 0; s < a.splits; ++s) sum += a.partials[s * numel + e];
  store_element(a.grad_reps, e, sum, a.type);
}

}  // namespace symkernels::expansion_cuda
