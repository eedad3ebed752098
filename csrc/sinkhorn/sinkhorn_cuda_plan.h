// Which launches serve a call of the CUDA Sinkhorn kernels: the stacks grouped by kernel family and width, in tables
// of at most kMaxStacksPerLaunch stacks. Plain C++ (host only), a function of the Python ints alone.
#pragma once

#include <cstdint>
#include <stdexcept>
#include <string>
#include <vector>

#include "sinkhorn/sinkhorn_cuda.h"

namespace symkernels::sinkhorn_cuda {

struct LaunchGroup {
  bool small;      // small family (else block)
  int width;       // S (small) or CT (block)
  int64_t max_n;   // the largest n it serves
  StackTable table;
};

struct CallPlan {
  std::vector<LaunchGroup> launches;
  int64_t block_rows = 0;  // rows of the block-family matrices: the backward's row scratch
};

// `sizes` and `counts` as checked by the entry points (sizes >= 1, counts >= 0, sum of counts < 2^31).
inline CallPlan plan_call(const std::vector<int64_t>& sizes, const std::vector<int64_t>& counts) {
  CallPlan plan;
  int64_t element_offset = 0;
  int64_t first_matrix = 0;
  // The open launch of each (family, width), as an index into plan.launches (-1: none).
  std::vector<int> open_small(6, -1);
  std::vector<int> open_block(6, -1);
  auto width_index = [](int width) {
    int index = 0;
    while ((1 << (index + 1)) < width) ++index;
    return index;  // 2 -> 0, 4 -> 1, ..., 32 -> 4
  };
  for (size_t l = 0; l < sizes.size(); ++l) {
    const int64_t n = sizes[l];
    const int64_t count = counts[l];
    if (count > 0) {
      if (n > kMaxBlockN) {
        throw std::invalid_argument("the CUDA Sinkhorn kernels serve matrices of size n <= " +
                                    std::to_string(kMaxBlockN) + ", got sizes[" + std::to_string(l) + "] = " +
                                    std::to_string(n) + " (the triton backend serves any n)");
      }
      const bool small = n <= kSmallMaxN;
      const int width = small ? small_group_width(n) : block_width(n);
      int& open = (small ? open_small : open_block)[width_index(width)];
      if (open < 0 || plan.launches[open].table.num_stacks == kMaxStacksPerLaunch) {
        LaunchGroup group{};
        group.small = small;
        group.width = width;
        group.max_n = 0;
        group.table.num_stacks = 0;
        group.table.num_units = 0;
        plan.launches.push_back(group);
        open = static_cast<int>(plan.launches.size()) - 1;
      }
      LaunchGroup& group = plan.launches[open];
      StackSlot& slot = group.table.slot[group.table.num_stacks++];
      slot.element_offset = element_offset;
      slot.row_offset = small ? 0 : plan.block_rows;
      slot.n = static_cast<int32_t>(n);
      slot.count = static_cast<int32_t>(count);
      slot.first_matrix = static_cast<int32_t>(first_matrix);
      slot.first_unit = group.table.num_units;
      group.table.num_units += static_cast<int32_t>(count);
      group.max_n = n > group.max_n ? n : group.max_n;
      if (!small) plan.block_rows += count * n;
    }
    element_offset += count * n * n;
    first_matrix += count;
  }
  return plan;
}

}  // namespace symkernels::sinkhorn_cuda
