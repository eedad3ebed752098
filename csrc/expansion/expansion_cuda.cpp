// The CUDA side of the kernel-expansion entry points (expansion.h): the plan of a call, the partial-sum workspace,
// the launches and their errors. Host code only (the kernels are in expansion_cuda.cuh); compiled when the CUDA part
// is built.
#ifdef SYMKERNELS_WITH_CUDA

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <limits>

#include "expansion/expansion.h"
#include "expansion/expansion_cuda.h"
#include "expansion/expansion_cuda_launchers.h"

namespace symkernels::expansion_detail {
namespace {

namespace ec = expansion_cuda;

ec::ElementType element_type(const char* op, const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return ec::ElementType::kFloat32;
    case at::kHalf:
      return ec::ElementType::kFloat16;
    case at::kBFloat16:
      return ec::ElementType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": CUDA tensors must be float16, bfloat16 or float32, got ", t.scalar_type());
  }
}

void check_cuda(const char* op, cudaError_t error) {
  TORCH_CHECK(error == cudaSuccess, op, ": launching a kernel failed: ", cudaGetErrorString(error));
}

// The kernels index rows, columns and CTAs with int32 (offsets with int64).
int32_t narrow(const char* op, const char* what, int64_t value) {
  TORCH_CHECK(value <= std::numeric_limits<int32_t>::max(), op, ": ", what, " = ", value,
              " is past what the CUDA kernels index (2^31 - 1)");
  return static_cast<int32_t>(value);
}

// The arguments and plan of a call with reps [G', d, d], weight [O, I, d] and the conv weight it writes (kernel) or
// reads (grad), contiguous or channels_last.
ec::ExpansionArgs arguments(const char* op, const at::Tensor& reps, const at::Tensor& weight,
                            const at::Tensor& conv_weight, bool channels_last, bool leading_identity,
                            ec::ExpansionPlan& plan) {
  const int64_t out = weight.size(0);
  const int64_t in = weight.size(1);
  const int64_t d = weight.size(2);
  const int64_t learned = reps.size(0);
  const int64_t groups = learned + (leading_identity ? 1 : 0);
  const int64_t kernel_area = conv_weight.size(2) * conv_weight.size(3);
  ec::ExpansionArgs a{};
  a.type = element_type(op, weight);
  a.kernel_type = element_type(op, conv_weight);
  a.channels_last = channels_last ? 1 : 0;
  a.kernel_area = narrow(op, "k^2", kernel_area);
  a.in_group = narrow(op, "G_in", d / kernel_area);
  a.out = narrow(op, "O", out);
  a.in = narrow(op, "I", in);
  narrow(op, "O * I", out * in);
  a.groups = narrow(op, "G", groups);
  a.learned = narrow(op, "G'", learned);
  a.identity = leading_identity ? 1 : 0;
  a.d = narrow(op, "d", d);
  narrow(op, "G' * d", learned * d);
  plan = ec::plan_expansion(out, in, groups, learned, d);
  narrow(op, "CTAs of the forward", plan.forward_ctas);
  narrow(op, "CTAs of grad_weight", plan.weight_ctas);
  narrow(op, "CTAs of grad_reps", plan.reps_ctas);
  narrow(op, "CTAs of the partial sums", plan.sum_ctas);
  a.split_rows = narrow(op, "the rows per split", plan.split_rows);
  a.splits = narrow(op, "the splits of grad_reps", plan.splits);
  return a;
}

}  // namespace

void expand_forward_cuda(const at::Tensor& reps, const at::Tensor& weight, bool leading_identity,
                         const at::Tensor& kernel, bool channels_last) {
  const char* op = "expand_forward";
  const c10::cuda::CUDAGuard guard(weight.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(weight.device().index()).stream();
  ec::ExpansionPlan plan{};
  ec::ExpansionArgs a = arguments(op, reps, weight, kernel, channels_last, leading_identity, plan);
  a.reps = reps.const_data_ptr();
  a.weight = weight.const_data_ptr();
  a.kernel = kernel.mutable_data_ptr();
  check_cuda(op, ec::launch_expand_forward(a, plan, stream));
}

void expand_backward_cuda(const at::Tensor& grad_kernel, bool channels_last, const at::Tensor& reps,
                          const at::Tensor& weight, bool leading_identity, const at::Tensor& grad_reps,
                          const at::Tensor& grad_weight) {
  const char* op = "expand_backward";
  const c10::cuda::CUDAGuard guard(weight.device());
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream(weight.device().index()).stream();
  ec::ExpansionPlan plan{};
  ec::ExpansionArgs a = arguments(op, reps, weight, grad_kernel, channels_last, leading_identity, plan);
  // The partial sums of a split grad_reps reduction: from the caching allocator, stream-ordered (no sync).
  at::Tensor partials;
  if (a.splits > 1 && a.learned > 0) {
    partials = at::empty({plan.splits, reps.size(0), reps.size(1), reps.size(2)}, weight.options().dtype(at::kFloat));
  }
  a.reps = reps.const_data_ptr();
  a.weight = weight.const_data_ptr();
  a.grad = grad_kernel.const_data_ptr();
  a.grad_weight = grad_weight.mutable_data_ptr();
  a.grad_reps = grad_reps.mutable_data_ptr();
  a.partials = partials.defined() ? partials.mutable_data_ptr<float>() : nullptr;
  check_cuda(op, ec::launch_expand_backward(a, plan, stream));
}

}  // namespace symkernels::expansion_detail

#endif  // SYMKERNELS_WITH_CUDA
