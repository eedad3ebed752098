// The CUDA kernels of the Sinkhorn ops (sinkhorn.h): what the host code that launches them and the device code
// share. Plain C++, so that the ATen side (sinkhorn_cuda.cpp) and the .cu files include it alike (the launchers are
// declared in sinkhorn_cuda_launchers.h).
//
// Matrices are served by one of two kernel families, chosen by their size n:
// * small (n <= 32): a group of S lanes per matrix (S = the power of two >= n), several matrices per warp, each lane
//   holding one row of K (or L0) in registers; column sums are butterflies across the group's lanes;
// * block (32 < n <= kMaxBlockN): one CTA per matrix, or on Hopper a thread-block cluster of up to 8 CTAs that split
//   its rows; warps take rows, lanes take columns (CT per lane); K lives in registers for the first rows of each
//   warp, in shared memory for the next ones and in a global scratch copy (L2) for rows that do not fit on chip;
//   column sums are exchanged through shared memory, and between the CTAs of a cluster through distributed shared
//   memory, summed in a fixed order (every CTA gets the same bits, and runs give the same bits).
// A launch serves the matrices of up to kMaxStacksPerLaunch stacks of one family and width (S or CT), described by a
// StackTable passed by value: no device-side table, so a call is a fixed sequence of launches without host-device
// copies (CUDA-graph capturable).
#pragma once

#include <cstdint>

#include "cuda_element.h"
#include "sinkhorn/common.h"

namespace symkernels::sinkhorn_cuda {

using cuda::ElementType;

// The matrices of one stack that a launch serves; a unit is one matrix (a lane group or a cluster of CTAs).
struct StackSlot {
  int64_t element_offset;  // first element of the stack's first matrix in logits
  int64_t row_offset;      // rows (sum of n) of the matrices before it, in the call: indexes the row scratch
  int32_t n;
  int32_t count;
  int32_t first_matrix;  // index of its first matrix in the outputs
  int32_t first_unit;    // its first unit in the launch
};

constexpr int kMaxStacksPerLaunch = 48;

struct StackTable {
  int32_t num_stacks;
  int32_t num_units;
  StackSlot slot[kMaxStacksPerLaunch];
};

struct ForwardArgs {
  const void* logits;
  void* p;
  double* cols;              // [M, n_iter, max_n]
  int32_t* domain;           // [M]
  int32_t* iterations;       // [M]
  const int32_t* caps;       // [M] or nullptr
  float* kernel_rows;        // block kernels: K rows that do not fit on chip, laid out as logits (or nullptr)
  ElementType type;
  int32_t n_iter;
  int32_t max_n;
  float tau;
  float tol;
  int32_t test;  // early_exit_enabled(tol)
};

struct BackwardArgs {
  const void* grad;
  const void* logits;
  void* out;
  const double* cols;          // [M, n_iter, max_n]
  const int32_t* domain;       // [M]
  const int32_t* iterations;   // [M]
  float* kernel_rows;          // block kernels: as in ForwardArgs
  double* row_scratch;         // block kernels: [rows of the call, row_slots(n_iter)]
  float* vector_scratch;       // block kernels: per matrix row_slots(n_iter) vectors of n
  ElementType type;
  int32_t n_iter;
  int32_t max_n;
  float tau;
};

// Per row (and per matrix, vectors of n) the backward of a block kernel keeps 2 n_iter - 1 values: the left and
// right factors of X (see sinkhorn_cuda_block.cuh) and r_T, or the log-domain potentials.
SYMKERNELS_HOST_DEVICE inline int64_t row_slots(int64_t n_iter) {
  return 2 * n_iter - 1;
}

// ---------------------------------------------------------------------------------------------------------------
// Small kernels.

constexpr int kSmallMaxN = 32;
constexpr int kSmallThreads = 128;

// The lanes per matrix: the power of two >= n, at least 2.
inline int small_group_width(int64_t n) {
  int width = 2;
  while (width < n) width *= 2;
  return width;
}

// ---------------------------------------------------------------------------------------------------------------
// Block kernels.

constexpr int kMaxBlockN = 1024;
constexpr int kMaxCluster = 8;

// A block kernel's shape for matrices of up to 32 * columns_per_lane columns.
struct BlockShape {
  int columns_per_lane;  // CT
  int warps;             // W
  int register_rows;     // rows per warp kept in registers
};

// The two block kernels: the backward keeps fewer rows of K in registers than the forward.
enum class BlockPass { kForward, kBackward };

// One instantiation per CT and pass. The forward's keep K's registers near 32 per thread. The backward also carries
// up to six vectors of CT floats per thread through its phases: with the forward's register rows ptxas spilled
// 350-3,800 bytes per thread, with these none up to CT = 8 and 56 (CT = 16) and 1,160 (CT = 32) bytes on sm_90
// (bench/results/cuda-resources.md). Both tables list the same CT and W.
constexpr int kBlockWidths = 5;
constexpr BlockShape kBlockShapes[kBlockWidths] = {{2, 4, 16}, {4, 8, 8}, {8, 8, 4}, {16, 8, 2}, {32, 8, 1}};
constexpr BlockShape kBackwardBlockShapes[kBlockWidths] = {{2, 4, 8}, {4, 8, 4}, {8, 8, 1}, {16, 8, 0}, {32, 8, 0}};

// The shape of the kernel of width CT (a width of the tables) for a pass.
constexpr BlockShape block_shape_of_width(int columns_per_lane, BlockPass pass) {
  const BlockShape* shapes = pass == BlockPass::kForward ? kBlockShapes : kBackwardBlockShapes;
  for (int i = 0; i < kBlockWidths; ++i) {
    if (shapes[i].columns_per_lane == columns_per_lane) return shapes[i];
  }
  return shapes[0];
}

// The width CT that serves matrices of size n: 32 CT >= n (the widest for larger n).
inline int block_width(int64_t n) {
  for (const BlockShape& shape : kBlockShapes) {
    if (n <= 32 * shape.columns_per_lane) return shape.columns_per_lane;
  }
  return kBlockShapes[kBlockWidths - 1].columns_per_lane;
}

inline BlockShape block_shape(int64_t n, BlockPass pass) {
  return block_shape_of_width(block_width(n), pass);
}

SYMKERNELS_HOST_DEVICE inline int64_t round_up(int64_t value, int64_t multiple) {
  return (value + multiple - 1) / multiple * multiple;
}

// The dynamic shared memory of a block kernel's CTA for a matrix of size n split over `cluster` CTAs (byte offsets,
// int32: they stay below the device's shared memory), and how many of its rows fit in `total_bytes`.
struct BlockSharedLayout {
  int32_t padded_n;          // n rounded up to 32: the stride of every row and vector
  int32_t rows;              // rows per CTA: ceil(n / cluster)
  int32_t cluster_partials;  // float [2, padded_n] (cluster > 1), after the warps' float [warps, padded_n] at 0
  int32_t totals;            // float [padded_n]
  int32_t flags;             // int32 [warps + 3]
  int32_t column_state;      // double [padded_n]: the log-domain column potentials
  int32_t column_shift;      // float [padded_n]: the log-domain column maxima
  int32_t row_state;         // double [2, rows]
  int32_t kernel_rows;       // float [kernel_row_capacity, padded_n]
  int32_t kernel_row_capacity;
};

SYMKERNELS_HOST_DEVICE inline BlockSharedLayout block_shared_layout(int64_t n, int64_t warps, int64_t cluster,
                                                                    int64_t total_bytes) {
  const int64_t padded_n = round_up(n, 32);
  const int64_t rows = (n + cluster - 1) / cluster;
  const int64_t vector_bytes = padded_n * 4;
  const int64_t cluster_partials = warps * vector_bytes;
  const int64_t totals = cluster_partials + (cluster > 1 ? 2 * vector_bytes : 0);
  const int64_t flags = totals + vector_bytes;
  const int64_t column_state = flags + round_up(4 * (warps + 3), 16);
  const int64_t column_shift = column_state + 8 * padded_n;
  const int64_t row_state = column_shift + vector_bytes;
  const int64_t kernel_rows = row_state + round_up(2 * 8 * rows, 16);
  const int64_t capacity = total_bytes > kernel_rows ? (total_bytes - kernel_rows) / vector_bytes : 0;
  BlockSharedLayout s;
  s.padded_n = static_cast<int32_t>(padded_n);
  s.rows = static_cast<int32_t>(rows);
  s.cluster_partials = static_cast<int32_t>(cluster_partials);
  s.totals = static_cast<int32_t>(totals);
  s.flags = static_cast<int32_t>(flags);
  s.column_state = static_cast<int32_t>(column_state);
  s.column_shift = static_cast<int32_t>(column_shift);
  s.row_state = static_cast<int32_t>(row_state);
  s.kernel_rows = static_cast<int32_t>(kernel_rows);
  s.kernel_row_capacity = static_cast<int32_t>(capacity < rows ? capacity : rows);
  return s;
}

// What the host knows about the device when it plans block launches.
struct DeviceInfo {
  int index;
  int major;
  int multiprocessors;
  int max_shared_bytes;  // per block, opt-in
};

// How a block launch runs: CTAs per cluster (1: no cluster) and dynamic shared memory per CTA.
struct BlockLaunch {
  int32_t cluster;
  int32_t shared_bytes;
};

// Whether some rows of a matrix of size n under `launch` of a kernel of `shape` live in the global scratch copy of K.
inline bool block_rows_overflow(int64_t n, const BlockShape& shape, const BlockLaunch& launch) {
  const BlockSharedLayout s = block_shared_layout(n, shape.warps, launch.cluster, launch.shared_bytes);
  return s.rows > shape.register_rows * shape.warps + s.kernel_row_capacity;
}

}  // namespace symkernels::sinkhorn_cuda
