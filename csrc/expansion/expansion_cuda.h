// The CUDA kernels of the kernel-expansion ops (expansion.h): what the host code that launches them and the device
// code share. Plain C++, so that the ATen side (expansion_cuda.cpp), the .cu file and the CPU emulation of the
// kernels include it alike (the launchers are declared in expansion_cuda_launchers.h).
//
// All three products are one tiled SIMT GEMM (expansion_cuda.cuh): a CTA of kTileThreads threads computes a
// kTile x kTile tile of its output in float32 registers (kTileThreads / 16 x 16 threads, 4 x 4 outputs each),
// staging kChunk terms of the reduction of both operands in shared memory at a time:
// * forward:     kernel[o, g, i, :] = R_g weight[o, i, :]  (rows (o, i), columns n, reduction over m; one tile
//                grid per g, the identity's a copy);
// * grad_weight: grad_weight[o, i, :] = sum_g grad[o, g, i, :] R_g  (reduction over (g, n), in that order, plus
//                the identity's term grad[o, 0, i, :]);
// * grad_reps:   grad_reps[q] = sum_{(o, i)} grad[o, q + identity, i, :]^T weight[o, i, :]  (rows n, columns m),
//                the (o, i) reduction cut into `splits` runs of split_rows; with more than one, each run writes
//                float32 partials that a second kernel sums in the order of the runs.
// No float atomics: every sum runs in an order fixed by the shapes alone, so results are reproducible bit for bit.
// Launches are 1-D grids with no device-side tables or host synchronisation (CUDA-graph capturable).
#pragma once

#include <cstdint>

#include "cuda_element.h"

namespace symkernels::expansion_cuda {

using cuda::ElementType;

constexpr int kTile = 64;          // rows and columns of an output tile
constexpr int kChunk = 16;         // reduction terms staged in shared memory per step
constexpr int kTileThreads = 256;  // 16 x 16 threads, each 4 x 4 outputs of the tile
constexpr int kSumThreads = 256;   // threads per CTA of the partial-sum kernel
// Staged operands are [kChunk, kTile] with padded rows: threads that stage along the reduction hit distinct banks.
constexpr int kTileStride = kTile + 1;
constexpr int kSharedBytes = 2 * kChunk * kTileStride * 4;
// The forward's, which also transposes an output tile through shared memory for a channels_last kernel.
constexpr int kForwardSharedBytes = kTile * kTileStride * 4 > kSharedBytes ? kTile * kTileStride * 4 : kSharedBytes;
// The shortest run of the grad_reps reduction (below it the partials cost more than the split gains).
constexpr int64_t kMinSplitRows = 256;

// The operands of a call, with the shapes of expansion.h. reps, weight and the gradients of them are contiguous
// and of one element type; kernel (forward) and grad (backward) are the conv weight [O*G, I*G_in, k, k], contiguous
// or channels_last, each of its own element type (kernel_offset maps (o, g, i, n) into it).
struct ExpansionArgs {
  const void* reps;    // [learned, d, d]
  const void* weight;  // [out, in, d]
  const void* grad;    // conv weight layout (backward)
  void* kernel;        // conv weight layout (forward)
  void* grad_weight;   // [out, in, d] (backward)
  void* grad_reps;     // [learned, d, d] (backward)
  float* partials;     // [splits, learned, d, d] when splits > 1, else nullptr
  ElementType type;         // of reps, weight, grad_reps and grad_weight
  ElementType kernel_type;  // of kernel (forward) or grad (backward)
  int32_t channels_last;    // kernel or grad is channels_last (memory order [O*G, k, k, I*G_in]), else contiguous
  int32_t kernel_area;      // k^2
  int32_t in_group;         // G_in = d / k^2
  int32_t out;
  int32_t in;
  int32_t groups;      // G = learned + identity
  int32_t learned;     // G'
  int32_t identity;    // 1 with a leading identity, else 0
  int32_t d;
  int32_t split_rows;  // (o, i) rows per run of the grad_reps reduction
  int32_t splits;
};

inline int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// How a call is cut into CTAs; a function of the shapes only (the results depend on nothing else).
struct ExpansionPlan {
  int64_t row_tiles;     // tiles over the (o, i) rows
  int64_t column_tiles;  // tiles over d (columns of every output, rows of grad_reps)
  int64_t forward_ctas;  // groups x row_tiles x column_tiles
  int64_t weight_ctas;   // row_tiles x column_tiles
  int64_t split_rows;
  int64_t splits;
  int64_t reps_ctas;  // splits x learned x column_tiles^2
  int64_t sum_ctas;   // CTAs of the partial-sum kernel (used when splits > 1)
};

inline ExpansionPlan plan_expansion(int64_t out, int64_t in, int64_t groups, int64_t learned, int64_t d) {
  ExpansionPlan p{};
  const int64_t rows = out * in;
  p.row_tiles = ceil_div(rows, kTile);
  p.column_tiles = ceil_div(d, kTile);
  p.forward_ctas = groups * p.row_tiles * p.column_tiles;
  p.weight_ctas = p.row_tiles * p.column_tiles;
  // A grad_reps run reduces about as many terms as a grad_weight tile (learned x d), so that both kernels' CTAs
  // carry similar work and a long (o, i) reduction is spread over many CTAs.
  const int64_t target = learned * d > kMinSplitRows ? learned * d : kMinSplitRows;
  p.split_rows = ceil_div(target, kChunk) * kChunk;
  p.splits = rows > 0 ? ceil_div(rows, p.split_rows) : 1;
  p.reps_ctas = p.splits * learned * p.column_tiles * p.column_tiles;
  p.sum_ctas = ceil_div(learned * d * d, kSumThreads);
  return p;
}

}  // namespace symkernels::expansion_cuda
