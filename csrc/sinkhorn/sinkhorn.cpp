// Entry points of the Sinkhorn ops: input checks, output allocation, and the kernel of the stacks' device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#ifdef SYMKERNELS_WITH_CUDA
#include <ATen/ops/cat.h>
#endif

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

// One stack of logits, [G, n, n], on the device and with the dtype of the first.
void check_stack(const char* op, const char* name, size_t l, const at::Tensor& stack, const at::Tensor& first) {
  TORCH_CHECK(stack.defined(), op, ": ", name, "[", l, "] is an undefined tensor");
  if (kCudaKernels) {
    TORCH_CHECK(stack.is_cpu() || stack.is_cuda(), op, ": ", name, "[", l,
                "] must be a CPU tensor or a CUDA tensor, got ", stack.device());
  } else {
    TORCH_CHECK(!stack.is_cuda(), op, ": ", name, "[", l, "] is on ", stack.device(),
                ", but this build of symkernels has no CUDA kernels; pass CPU tensors");
    TORCH_CHECK(stack.is_cpu(), op, ": ", name, "[", l, "] must be a CPU tensor, got ", stack.device());
  }
  TORCH_CHECK(stack.dim() == 3 && stack.size(1) == stack.size(2) && stack.size(1) >= 1, op, ": ", name, "[", l,
              "] must have shape [G, n, n] with n >= 1, got ", stack.sizes());
  TORCH_CHECK(stack.size(1) <= kMaxSize, op, ": ", name, "[", l, "] has n = ", stack.size(1), ", more than ",
              kMaxSize);
  TORCH_CHECK(stack.device() == first.device(), op, ": ", name, "[", l, "] must be on the device of ", name,
              "[0] (", first.device(), "), got ", stack.device());
  TORCH_CHECK(stack.scalar_type() == first.scalar_type(), op, ": ", name, "[", l, "] must have the dtype of ", name,
              "[0] (", first.scalar_type(), "), got ", stack.scalar_type());
  if (stack.is_cuda()) {
    TORCH_CHECK(stack.scalar_type() == at::kFloat || stack.scalar_type() == at::kHalf ||
                    stack.scalar_type() == at::kBFloat16,
                op, ": CUDA ", name, " must be float16, bfloat16 or float32, got ", stack.scalar_type());
  } else {
    TORCH_CHECK(stack.scalar_type() == at::kFloat || stack.scalar_type() == at::kDouble, op, ": ", name,
                " must be float32 or float64, got ", stack.scalar_type());
  }
}

// A tensor that must sit on the stacks' device.
void check_same_device(const char* op, const char* name, const at::Tensor& t, const c10::Device& device) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on the stacks' device ", device, ", got ", t.device());
}

void check_tau(const char* op, double tau) {
  TORCH_CHECK(tau > 0.0, op, ": tau must be > 0, got ", tau);
}

// The stacks, checked and contiguous, with their layout: each matrix's size and where each stack ends.
struct Stacks {
  std::vector<at::Tensor> tensors;
  std::vector<int64_t> sizes, counts;  // per stack
  RaggedLayout layout;
  at::TensorOptions options;  // of the stacks (CPU float32 when there are none)
};

Stacks check_stacks(const char* op, const char* name, const std::vector<at::Tensor>& stacks) {
  Stacks checked;
  for (size_t l = 0; l < stacks.size(); ++l) {
    check_stack(op, name, l, stacks[l], stacks[0]);
    const int64_t n = stacks[l].size(1);
    const int64_t count = stacks[l].size(0);
    checked.tensors.push_back(stacks[l].contiguous());
    checked.sizes.push_back(n);
    checked.counts.push_back(count);
    checked.layout.size.insert(checked.layout.size.end(), static_cast<size_t>(count), n);
    checked.layout.stack_end.push_back(checked.layout.num_matrices());
    if (count > 0) checked.layout.max_n = std::max(checked.layout.max_n, n);
  }
  checked.options = stacks.empty() ? at::TensorOptions().dtype(at::kFloat) : checked.tensors[0].options();
  return checked;
}

// The second list (grad_p) against the stacks: one tensor per stack, of its shape, dtype and device.
std::vector<at::Tensor> check_like_stacks(const char* op, const char* name, const std::vector<at::Tensor>& tensors,
                                          const Stacks& stacks) {
  TORCH_CHECK(tensors.size() == stacks.tensors.size(), op, ": ", name, " must have one tensor per stack (",
              stacks.tensors.size(), "), got ", tensors.size());
  std::vector<at::Tensor> contiguous;
  for (size_t l = 0; l < tensors.size(); ++l) {
    const at::Tensor& t = tensors[l];
    const at::Tensor& stack = stacks.tensors[l];
    TORCH_CHECK(t.defined(), op, ": ", name, "[", l, "] is an undefined tensor");
    TORCH_CHECK(t.sizes() == stack.sizes(), op, ": ", name, "[", l, "] must have the shape of stacks[", l, "] ",
                stack.sizes(), ", got ", t.sizes());
    TORCH_CHECK(t.scalar_type() == stack.scalar_type(), op, ": ", name, "[", l, "] must have the dtype of stacks (",
                stack.scalar_type(), "), got ", t.scalar_type());
    check_same_device(op, name, t, stack.device());
    contiguous.push_back(t.contiguous());
  }
  return contiguous;
}

// CUDA kernels index matrices with int32.
void check_cuda_count(const char* op, const Stacks& stacks) {
  TORCH_CHECK(!stacks.options.device().is_cuda() ||
                  stacks.layout.num_matrices() <= std::numeric_limits<int32_t>::max() / 8,
              op, ": at most ", std::numeric_limits<int32_t>::max() / 8, " matrices per CUDA call, got ",
              stacks.layout.num_matrices());
}

// An int32 tensor [M] on the stacks' device with every value in [lo, hi]; returns its contiguous form. The values of
// a CUDA tensor are not read here (that would synchronise with the device): the kernels clamp them into [lo, hi].
at::Tensor check_counts_tensor(const char* op, const char* name, const at::Tensor& t, const Stacks& stacks, int64_t lo,
                               int64_t hi) {
  const int64_t num_matrices = stacks.layout.num_matrices();
  check_same_device(op, name, t, stacks.options.device());
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

std::vector<at::Tensor> empty_like_each(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> out;
  out.reserve(tensors.size());
  for (const at::Tensor& t : tensors) out.push_back(at::empty_like(t, at::MemoryFormat::Contiguous));
  return out;
}

#ifdef SYMKERNELS_WITH_CUDA
// The CUDA kernels read one buffer of matrices back to back: the stacks packed, and the results split again (each a
// tensor of its own, so that no two outputs alias).
at::Tensor packed(const std::vector<at::Tensor>& tensors) {
  std::vector<at::Tensor> flat;
  for (const at::Tensor& t : tensors) flat.push_back(t.reshape({-1}));
  return flat.size() == 1 ? flat[0] : at::cat(flat);
}

std::vector<at::Tensor> unpacked(const at::Tensor& flat, const std::vector<at::Tensor>& like) {
  std::vector<at::Tensor> out;
  int64_t offset = 0;
  for (const at::Tensor& t : like) {
    const at::Tensor piece = flat.narrow(0, offset, t.numel()).view(t.sizes());
    out.push_back(like.size() == 1 ? piece : piece.clone());
    offset += t.numel();
  }
  return out;
}

// [M]: the most iterations any matrix of each matrix's stack ran, within the matrix's own cap; on the device.
at::Tensor stack_iteration_caps(const at::Tensor& iterations, const std::vector<int64_t>& counts,
                                const at::Tensor& caps) {
  at::Tensor stack_caps = at::empty_like(iterations);
  int64_t begin = 0;
  for (const int64_t count : counts) {
    if (count > 0) {
      stack_caps.narrow(0, begin, count).copy_(iterations.narrow(0, begin, count).amax().expand({count}));
    }
    begin += count;
  }
  return caps.defined() ? stack_caps.minimum(caps) : stack_caps;
}
#endif

}  // namespace

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> sinkhorn_forward(
    const std::vector<at::Tensor>& stacks_in, int64_t n_iter, double tau, double tol, bool stop_by_stack,
    const std::optional<at::Tensor>& caps_in) {
  const char* op = "sinkhorn_forward";
  const Stacks stacks = check_stacks(op, "stacks", stacks_in);
  TORCH_CHECK(n_iter >= 1 && n_iter <= std::numeric_limits<int32_t>::max(), op, ": n_iter must be >= 1, got ",
              n_iter);
  check_tau(op, tau);
  TORCH_CHECK(tol >= 0.0, op, ": tol must be >= 0 (0 disables the early exit), got ", tol);
  check_cuda_count(op, stacks);
  const int64_t num_matrices = stacks.layout.num_matrices();
  at::Tensor caps;
  if (caps_in.has_value()) {
    caps = check_counts_tensor(op, "caps", *caps_in, stacks, 1, n_iter);
  }

  std::vector<at::Tensor> p;
  // CPU calls of small matrices only save no column scalings: their backward recomputes them.
  const bool saves_cols =
      !stacks.options.device().is_cpu() || stacks.layout.max_n > sinkhorn_detail::kRecomputedMaxSize;
  at::Tensor cols = at::empty({num_matrices, n_iter, saves_cols ? stacks.layout.max_n : 0},
                              stacks.options.dtype(at::kDouble));
  at::Tensor domain = at::empty({num_matrices}, stacks.options.dtype(at::kInt));
  at::Tensor iterations = at::empty({num_matrices}, stacks.options.dtype(at::kInt));
  const int32_t* cap_values = caps.defined() ? caps.const_data_ptr<int32_t>() : nullptr;
  if (num_matrices == 0) {
    p = empty_like_each(stacks.tensors);
  } else if (stacks.options.device().is_cuda()) {
#ifdef SYMKERNELS_WITH_CUDA
    const at::Tensor logits = packed(stacks.tensors);
    const at::Tensor flat_p = at::empty_like(logits, at::MemoryFormat::Contiguous);
    sinkhorn_detail::sinkhorn_forward_cuda(logits, stacks.sizes, stacks.counts, n_iter, tau, tol, cap_values, flat_p,
                                           cols, domain, iterations);
    if (stop_by_stack && tol > 0.0) {
      // Run again, each matrix capped at its stack's most iterations: two launches, no host synchronisation.
      const at::Tensor stack_caps = stack_iteration_caps(iterations, stacks.counts, caps);
      sinkhorn_detail::sinkhorn_forward_cuda(logits, stacks.sizes, stacks.counts, n_iter, tau, 0.0,
                                             stack_caps.const_data_ptr<int32_t>(), flat_p, cols, domain, iterations);
    }
    p = unpacked(flat_p, stacks.tensors);
#endif
  } else {
    p = empty_like_each(stacks.tensors);
    sinkhorn_detail::sinkhorn_forward_cpu(stacks.tensors, stacks.layout, n_iter, tau, tol, stop_by_stack, cap_values,
                                          p, cols, domain, iterations);
  }
  return {p, cols, domain, iterations};
}

std::vector<at::Tensor> sinkhorn_backward(const std::vector<at::Tensor>& grad_p_in,
                                          const std::vector<at::Tensor>& stacks_in, const at::Tensor& cols_in,
                                          const at::Tensor& domain_in, const at::Tensor& iterations_in, double tau) {
  const char* op = "sinkhorn_backward";
  const Stacks stacks = check_stacks(op, "stacks", stacks_in);
  check_tau(op, tau);
  const std::vector<at::Tensor> grad_p = check_like_stacks(op, "grad_p", grad_p_in, stacks);
  check_cuda_count(op, stacks);
  const int64_t num_matrices = stacks.layout.num_matrices();
  check_same_device(op, "cols", cols_in, stacks.options.device());
  TORCH_CHECK(cols_in.scalar_type() == at::kDouble, op, ": cols must be float64, got ", cols_in.scalar_type());
  // The CPU kernels recompute the column scalings where none were saved (width 0); the CUDA kernels read them.
  const bool cpu = stacks.options.device().is_cpu();
  TORCH_CHECK(cols_in.dim() == 3 && cols_in.size(0) == num_matrices && cols_in.size(1) >= 1 &&
                  cols_in.size(1) <= std::numeric_limits<int32_t>::max() &&
                  (cols_in.size(2) == stacks.layout.max_n || (cpu && cols_in.size(2) == 0)),
              op, ": cols must have shape [M, n_iter, max_n] = [", num_matrices, ", n_iter >= 1, ",
              stacks.layout.max_n, "]", cpu ? " (or [M, n_iter, 0]: nothing saved)" : "", ", got ",
              cols_in.sizes());
  const int64_t n_iter = cols_in.size(1);
  const at::Tensor domain = check_counts_tensor(op, "domain", domain_in, stacks, 0, 1);
  const at::Tensor iterations = check_counts_tensor(op, "iterations", iterations_in, stacks, 1, n_iter);
  const at::Tensor cols = cols_in.contiguous();

  std::vector<at::Tensor> grad_logits;
  if (num_matrices == 0) {
    grad_logits = empty_like_each(stacks.tensors);
  } else if (stacks.options.device().is_cuda()) {
#ifdef SYMKERNELS_WITH_CUDA
    const at::Tensor logits = packed(stacks.tensors);
    const at::Tensor flat_grad = at::empty_like(logits, at::MemoryFormat::Contiguous);
    sinkhorn_detail::sinkhorn_backward_cuda(packed(grad_p), logits, stacks.sizes, stacks.counts, cols, domain,
                                            iterations, tau, flat_grad);
    grad_logits = unpacked(flat_grad, stacks.tensors);
#endif
  } else {
    grad_logits = empty_like_each(stacks.tensors);
    sinkhorn_detail::sinkhorn_backward_cpu(grad_p, stacks.tensors, stacks.layout, cols, domain, iterations, tau,
                                           grad_logits);
  }
  return grad_logits;
}

}  // namespace symkernels
