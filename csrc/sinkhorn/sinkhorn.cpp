// Entry points of the Sinkhorn ops: input checks, output allocation, and the kernel of the inputs' device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "sinkhorn/sinkhorn.h"

namespace symkernels {
namespace {

using sinkhorn_detail::RaggedLayout;

// The largest n whose n * n fits int64.
constexpr int64_t kMaxSize = 3037000499;

#ifdef SYMKERNELS_WITH_CUDA
constexpr bool kCudaKernels = true;
#else
constexpr bool kCudaKernels = false;
#endif

void check_logits(const char* op, const at::Tensor& logits) {
  TORCH_CHECK(logits.defined(), op, ": logits is an undefined tensor");
  if (kCudaKernels) {
    TORCH_CHECK(logits.is_cpu() || logits.is_cuda(), op, ": logits must be a CPU tensor or a CUDA tensor, got ",
                logits.device());
  } else {
    TORCH_CHECK(!logits.is_cuda(), op, ": logits is on ", logits.device(),
                ", but this build of symkernels has no CUDA kernels; pass CPU tensors");
    TORCH_CHECK(logits.is_cpu(), op, ": logits must be a CPU tensor, got ", logits.device());
  }
  TORCH_CHECK(logits.dim() == 1, op, ": logits must be 1-D (the matrices back to back), got shape ",
              logits.sizes());
  if (logits.is_cuda()) {
    TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
                    logits.scalar_type() == at::kBFloat16,
                op, ": CUDA logits must be float16, bfloat16 or float32, got ", logits.scalar_type());
  } else {
    TORCH_CHECK(logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kDouble, op,
                ": logits must be float32 or float64, got ", logits.scalar_type());
  }
}

// A tensor that must sit on logits' device.
void check_same_device(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.device() == logits.device(), op, ": ", name, " must be on logits' device ", logits.device(),
              ", got ", t.device());
}

void check_tau(const char* op, double tau) {
  TORCH_CHECK(tau > 0.0, op, ": tau must be > 0, got ", tau);
}

// The number of matrices and the largest size of (sizes, counts), checked against the number of logits.
struct RaggedShape {
  int64_t num_matrices = 0;
  int64_t max_n = 0;  // 0 when there is no matrix
};

RaggedShape check_ragged(const char* op, const std::vector<int64_t>& sizes, const std::vector<int64_t>& counts,
                         int64_t numel) {
  TORCH_CHECK(sizes.size() == counts.size(), op, ": sizes and counts must have the same length, got ", sizes.size(),
              " and ", counts.size());
  RaggedShape shape;
  int64_t elements = 0;
  for (size_t l = 0; l < sizes.size(); ++l) {
    TORCH_CHECK(sizes[l] >= 1 && sizes[l] <= kMaxSize, op, ": sizes must be >= 1, got sizes[", l, "] = ", sizes[l]);
    TORCH_CHECK(counts[l] >= 0, op, ": counts must be >= 0, got counts[", l, "] = ", counts[l]);
    const int64_t per_matrix = sizes[l] * sizes[l];
    // counts[l] * per_matrix elements must fit in what is left of logits (checked without overflow).
    TORCH_CHECK(counts[l] <= (numel - elements) / per_matrix, op, ": sizes and counts describe more than the ",
                numel, " elements of logits (stacks up to ", l, ")");
    elements += counts[l] * per_matrix;
    shape.num_matrices += counts[l];
    if (counts[l] > 0) shape.max_n = std::max(shape.max_n, sizes[l]);
  }
  TORCH_CHECK(elements == numel, op, ": sizes and counts describe ", elements, " elements, but logits has ", numel);
  return shape;
}

// Where each matrix lies in logits (the CPU kernels' view).
RaggedLayout ragged_layout(const std::vector<int64_t>& sizes, const std::vector<int64_t>& counts,
                           const RaggedShape& shape) {
  RaggedLayout layout;
  layout.size.reserve(static_cast<size_t>(shape.num_matrices));
  layout.offset.reserve(static_cast<size_t>(shape.num_matrices));
  int64_t offset = 0;
  for (size_t l = 0; l < sizes.size(); ++l) {
    for (int64_t c = 0; c < counts[l]; ++c) {
      layout.size.push_back(sizes[l]);
      layout.offset.push_back(offset);
      offset += sizes[l] * sizes[l];
    }
  }
  layout.max_n = shape.max_n;
  return layout;
}

// CUDA kernels index matrices with int32.
void check_cuda_count(const char* op, const at::Tensor& logits, const RaggedShape& shape) {
  TORCH_CHECK(!logits.is_cuda() || shape.num_matrices <= std::numeric_limits<int32_t>::max() / 8, op,
              ": at most ", std::numeric_limits<int32_t>::max() / 8, " matrices per CUDA call, got ",
              shape.num_matrices);
}

// An int32 tensor [M] on logits' device with every value in [lo, hi]; returns its contiguous form. The values of a
// CUDA tensor are not read here (that would synchronise with the device): the kernels clamp them into [lo, hi].
at::Tensor check_counts_tensor(const char* op, const char* name, const at::Tensor& t, const at::Tensor& logits,
                               int64_t num_matrices, int64_t lo, int64_t hi) {
  check_same_device(op, name, t, logits);
  TORCH_CHECK(t.scalar_type() == at::kInt, op, ": ", name, " must be int32, got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == num_matrices, op, ": ", name, " must have shape [", num_matrices,
              "] (one entry per matrix), got ", t.sizes());
  const at::Tensor values = t.contiguous();
  if (values.is_cuda()) return values;
  const int32_t* v = values.const_data_ptr<int32_t>();
  for (int64_t m = 0; m < num_matrices; ++m) {
    TORCH_CHECK(v[m] >= lo && v[m] <= hi, op, ": ", name, " must lie in ", lo, "..", hi, ", got ", name, "[", m,
                "] = ", v[m]);
  }
  return values;
}

}  // namespace

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_forward(const at::Tensor& logits_in,
                                                                            const std::vector<int64_t>& sizes,
                                                                            const std::vector<int64_t>& counts,
                                                                            int64_t n_iter, double tau, double tol,
                                                                            const std::optional<at::Tensor>& caps_in) {
  const char* op = "sinkhorn_forward";
  check_logits(op, logits_in);
  TORCH_CHECK(n_iter >= 1 && n_iter <= std::numeric_limits<int32_t>::max(), op, ": n_iter must be >= 1, got ",
              n_iter);
  check_tau(op, tau);
  TORCH_CHECK(tol >= 0.0, op, ": tol must be >= 0 (0 disables the early exit), got ", tol);
  const RaggedShape shape = check_ragged(op, sizes, counts, logits_in.numel());
  check_cuda_count(op, logits_in, shape);
  const int64_t num_matrices = shape.num_matrices;
  at::Tensor caps;
  if (caps_in.has_value()) {
    caps = check_counts_tensor(op, "caps", *caps_in, logits_in, num_matrices, 1, n_iter);
  }
  const at::Tensor logits = logits_in.contiguous();

  at::Tensor p = at::empty_like(logits, at::MemoryFormat::Contiguous);
  at::Tensor cols = at::empty({num_matrices, n_iter, shape.max_n}, logits.options().dtype(at::kDouble));
  at::Tensor domain = at::empty({num_matrices}, logits.options().dtype(at::kInt));
  at::Tensor iterations = at::empty({num_matrices}, logits.options().dtype(at::kInt));
  const int32_t* cap_values = caps.defined() ? caps.const_data_ptr<int32_t>() : nullptr;
  if (num_matrices == 0) {
    // Every output is empty.
  } else if (logits.is_cuda()) {
#ifdef SYMKERNELS_WITH_CUDA
    sinkhorn_detail::sinkhorn_forward_cuda(logits, sizes, counts, n_iter, tau, tol, cap_values, p, cols, domain,
                                           iterations);
#endif
  } else {
    sinkhorn_detail::sinkhorn_forward_cpu(logits, ragged_layout(sizes, counts, shape), n_iter, tau, tol, cap_values,
                                          p, cols, domain, iterations);
  }
  return {p, cols, domain, iterations};
}

at::Tensor sinkhorn_backward(const at::Tensor& grad_p_in, const at::Tensor& logits_in,
                             const std::vector<int64_t>& sizes, const std::vector<int64_t>& counts,
                             const at::Tensor& cols_in, const at::Tensor& domain_in,
                             const at::Tensor& iterations_in, double tau) {
  const char* op = "sinkhorn_backward";
  check_logits(op, logits_in);
  check_tau(op, tau);
  check_same_device(op, "grad_p", grad_p_in, logits_in);
  TORCH_CHECK(grad_p_in.sizes() == logits_in.sizes(), op, ": grad_p must have the shape of logits ",
              logits_in.sizes(), ", got ", grad_p_in.sizes());
  TORCH_CHECK(grad_p_in.scalar_type() == logits_in.scalar_type(), op, ": grad_p must have the dtype of logits (",
              logits_in.scalar_type(), "), got ", grad_p_in.scalar_type());
  const RaggedShape shape = check_ragged(op, sizes, counts, logits_in.numel());
  check_cuda_count(op, logits_in, shape);
  const int64_t num_matrices = shape.num_matrices;
  check_same_device(op, "cols", cols_in, logits_in);
  TORCH_CHECK(cols_in.scalar_type() == at::kDouble, op, ": cols must be float64, got ", cols_in.scalar_type());
  TORCH_CHECK(cols_in.dim() == 3 && cols_in.size(0) == num_matrices && cols_in.size(1) >= 1 &&
                  cols_in.size(1) <= std::numeric_limits<int32_t>::max() && cols_in.size(2) == shape.max_n,
              op, ": cols must have shape [M, n_iter, max_n] = [", num_matrices, ", n_iter >= 1, ", shape.max_n,
              "], got ", cols_in.sizes());
  const int64_t n_iter = cols_in.size(1);
  const at::Tensor domain = check_counts_tensor(op, "domain", domain_in, logits_in, num_matrices, 0, 1);
  const at::Tensor iterations = check_counts_tensor(op, "iterations", iterations_in, logits_in, num_matrices, 1,
                                                    n_iter);
  const at::Tensor logits = logits_in.contiguous();
  const at::Tensor grad_p = grad_p_in.contiguous();
  const at::Tensor cols = cols_in.contiguous();

  at::Tensor grad_logits = at::empty_like(logits, at::MemoryFormat::Contiguous);
  if (num_matrices == 0) {
    // grad_logits is empty.
  } else if (logits.is_cuda()) {
#ifdef SYMKERNELS_WITH_CUDA
    sinkhorn_detail::sinkhorn_backward_cuda(grad_p, logits, sizes, counts, cols, domain, iterations, tau,
                                            grad_logits);
#endif
  } else {
    sinkhorn_detail::sinkhorn_backward_cpu(grad_p, logits, ragged_layout(sizes, counts, shape), cols, domain,
                                           iterations, tau, grad_logits);
  }
  return grad_logits;
}

}  // namespace symkernels
