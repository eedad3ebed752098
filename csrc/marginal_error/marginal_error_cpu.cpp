// CPU kernel of symkernels::marginal_error: matrices in parallel, one pass over each matrix.
#include <ATen/AccumulateType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "build_info.h"
#include "marginal_error/common.h"

namespace symkernels {

bool cpu_kernels_use_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

namespace {

using marginal_error_detail::abs_minus_one;
using marginal_error_detail::nan_max;

at::Tensor marginal_error_cpu(const at::Tensor& p) {
  marginal_error_detail::check_input(p, c10::DeviceType::CPU);
  const at::Tensor x = p.contiguous();
  const int64_t n = x.size(-1);
  at::Tensor out = at::empty(x.sizes().slice(0, x.dim() - 2), x.options());
  const int64_t batch = out.numel();
  if (batch == 0) {
    return out;
  }
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "marginal_error_cpu", [&] {
    using acc_t = at::acc_type<scalar_t, /*is_cuda=*/false>;  // double for both float and double
    const scalar_t* src = x.const_data_ptr<scalar_t>();
    scalar_t* dst = out.mutable_data_ptr<scalar_t>();
    // Give each task at least ~32k elements so a stack of tiny matrices does not pay one task per matrix.
    const int64_t grain = std::max<int64_t>(1, int64_t{32768} / (n * n));
    at::parallel_for(0, batch, grain, [&](int64_t begin, int64_t end) {
      std::vector<acc_t> col(static_cast<size_t>(n));
      for (int64_t b = begin; b < end; ++b) {
        const scalar_t* m = src + b * n * n;
        std::fill(col.begin(), col.end(), acc_t(0));
        acc_t err = 0;
        // Row-major walk: each row sum is finished in place, column sums accumulate alongside.
        for (int64_t i = 0; i < n; ++i) {
          const scalar_t* row = m + i * n;
          acc_t row_sum = 0;
          for (int64_t j = 0; j < n; ++j) {
            const acc_t v = static_cast<acc_t>(row[j]);
            row_sum += v;
            col[j] += v;
          }
          err = nan_max(err, abs_minus_one(row_sum));
        }
        for (int64_t j = 0; j < n; ++j) {
          err = nan_max(err, abs_minus_one(col[j]));
        }
        dst[b] = static_cast<scalar_t>(err);
      }
    });
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(symkernels, CPU, m) {
  m.impl("marginal_error", &marginal_error_cpu);
}

}  // namespace symkernels
