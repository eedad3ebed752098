// Entry points of the kernel-expansion ops: input checks, output allocation, and the kernel of the inputs' device.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>

#include <vector>

#include "expansion/expansion.h"

namespace symkernels {
namespace {

#ifdef SYMKERNELS_WITH_CUDA
constexpr bool kCudaKernels = true;
#else
constexpr bool kCudaKernels = false;
#endif

void check_device(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.defined(), op, ": ", name, " is an undefined tensor");
  if (kCudaKernels) {
    TORCH_CHECK(t.is_cpu() || t.is_cuda(), op, ": ", name, " must be a CPU tensor or a CUDA tensor, got ",
                t.device());
  } else {
    TORCH_CHECK(!t.is_cuda(), op, ": ", name, " is on ", t.device(),
                ", but this build of symkernels has no CUDA kernels; pass CPU tensors");
    TORCH_CHECK(t.is_cpu(), op, ": ", name, " must be a CPU tensor, got ", t.device());
  }
}

// CUDA tensors are computed in float32 from any of the types they are stored in; the CPU kernels take float32 and
// float64 (the Python layer widens float16 and bfloat16 there).
void check_dtype(const char* op, const char* name, const at::Tensor& t) {
  if (t.is_cuda()) {
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16,
                op, ": CUDA ", name, " must be float16, bfloat16 or float32, got ", t.scalar_type());
  } else {
    TORCH_CHECK(t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble, op, ": ", name,
                " must be float32 or float64, got ", t.scalar_type());
  }
}

// The shape of an expansion, from checked inputs.
struct ExpansionShape {
  int64_t learned;   // G'
  int64_t groups;    // G
  int64_t d;
  int64_t out;       // O
  int64_t in;        // I
  int64_t in_group;  // G_in = d / k^2
  int64_t k;
};

ExpansionShape check_inputs(const char* op, const at::Tensor& reps, const at::Tensor& weight, int64_t kernel_size,
                            bool leading_identity) {
  check_device(op, "reps", reps);
  check_device(op, "weight", weight);
  TORCH_CHECK(reps.dim() == 3 && reps.size(1) == reps.size(2), op, ": reps must have shape [G', d, d], got ",
              reps.sizes());
  TORCH_CHECK(weight.dim() == 3, op, ": weight must have shape [O, I, d], got ", weight.sizes());
  TORCH_CHECK(weight.size(2) == reps.size(2), op, ": weight [O, I, d] and reps [G', d, d] disagree on d: ",
              weight.sizes(), " vs ", reps.sizes());
  check_dtype(op, "reps", reps);
  TORCH_CHECK(weight.scalar_type() == reps.scalar_type(), op, ": weight must have the dtype of reps (",
              reps.scalar_type(), "), got ", weight.scalar_type());
  TORCH_CHECK(weight.device() == reps.device(), op, ": weight must be on reps' device ", reps.device(), ", got ",
              weight.device());
  // (The upper bound keeps kernel_size^2 within int64.)
  TORCH_CHECK(kernel_size >= 1 && kernel_size <= 3037000499, op, ": kernel_size must be in 1..3037000499, got ",
              kernel_size);
  const int64_t d = reps.size(2);
  const int64_t k2 = kernel_size * kernel_size;
  TORCH_CHECK(d % k2 == 0, op, ": d = ", d, " (the last dimension of reps and weight) must be a multiple of ",
              "kernel_size^2 = ", k2);
  const int64_t learned = reps.size(0);
  return {learned, learned + (leading_identity ? 1 : 0), d, weight.size(0), weight.size(1), d / k2, kernel_size};
}

// The conv weights the CUDA kernels address directly; any other layout is copied first (a gradient) or refused
// (a kernel to write).
enum class Layout { kContiguous, kChannelsLast, kOther };

Layout layout_of(const at::Tensor& t) {
  // (A tensor can be both, e.g. with k = 1: then both layouts put every element at the same place.)
  if (t.is_contiguous()) return Layout::kContiguous;
  if (t.is_contiguous(at::MemoryFormat::ChannelsLast)) return Layout::kChannelsLast;
  return Layout::kOther;
}

// A conv weight the kernels read (grad_kernel) or write (kernel): on reps' device, of the expansion's shape.
void check_conv_weight(const char* op, const char* name, const at::Tensor& t, const at::Tensor& reps,
                       const ExpansionShape& s) {
  check_device(op, name, t);
  TORCH_CHECK(t.device() == reps.device(), op, ": ", name, " must be on reps' device ", reps.device(), ", got ",
              t.device());
  const std::vector<int64_t> expected{s.out * s.groups, s.in * s.in_group, s.k, s.k};
  TORCH_CHECK(t.sizes() == at::IntArrayRef(expected), op, ": ", name,
              " must have the kernel's shape [O*G, I*G_in, k, k] = ", at::IntArrayRef(expected), ", got ", t.sizes());
  if (t.is_cuda()) {
    check_dtype(op, name, t);
  } else {
    TORCH_CHECK(at::isFloatingType(t.scalar_type()), op, ": ", name, " must be a floating-point tensor, got ",
                t.scalar_type());
  }
}

}  // namespace

std::vector<int64_t> expanded_kernel_shape(const at::Tensor& reps, const at::Tensor& weight, int64_t kernel_size,
                                           bool leading_identity) {
  const ExpansionShape s = check_inputs("expand_kernel", reps, weight, kernel_size, leading_identity);
  return {s.out * s.groups, s.in * s.in_group, s.k, s.k};
}

void expand_forward(const at::Tensor& reps_in, const at::Tensor& weight_in, int64_t kernel_size,
                    bool leading_identity, const at::Tensor& kernel) {
  const char* op = "expand_forward";
  const ExpansionShape s = check_inputs(op, reps_in, weight_in, kernel_size, leading_identity);
  check_conv_weight(op, "kernel", kernel, reps_in, s);
  const Layout layout = layout_of(kernel);
  TORCH_CHECK(layout != Layout::kOther, op, ": kernel must be contiguous or channels_last, got strides ",
              kernel.strides());
  if (kernel.numel() == 0) return;
  if (kernel.is_cuda()) {
#ifdef SYMKERNELS_WITH_CUDA
    expansion_detail::expand_forward_cuda(reps_in.contiguous(), weight_in.contiguous(), leading_identity, kernel,
                                          layout == Layout::kChannelsLast);
#endif
    return;
  }
  // The CPU kernels write [O, G, I, d] in reps' dtype with GEMMs; another layout or dtype is a copy of that.
  const bool direct = layout == Layout::kContiguous && kernel.scalar_type() == reps_in.scalar_type();
  const at::Tensor grouped =
      direct ? kernel.view({s.out, s.groups, s.in, s.d}) : at::empty({s.out, s.groups, s.in, s.d}, reps_in.options());
  expansion_detail::expand_forward_cpu(reps_in.contiguous(), weight_in.contiguous(), leading_identity, grouped);
  if (!direct) kernel.copy_(grouped.view(kernel.sizes()));
}

std::tuple<at::Tensor, at::Tensor> expand_backward(const at::Tensor& grad_in, const at::Tensor& reps_in,
                                                   const at::Tensor& weight_in, int64_t kernel_size,
                                                   bool leading_identity) {
  const char* op = "expand_backward";
  const ExpansionShape s = check_inputs(op, reps_in, weight_in, kernel_size, leading_identity);
  check_conv_weight(op, "grad_kernel", grad_in, reps_in, s);

  const auto options = reps_in.options().memory_format(at::MemoryFormat::Contiguous);
  if (s.out == 0 || s.in == 0 || s.d == 0 || s.groups == 0) {
    // Every sum is empty (or there is nothing to sum into): zero gradients of the right shapes.
    return {at::zeros({s.learned, s.d, s.d}, options), at::zeros({s.out, s.in, s.d}, options)};
  }
  at::Tensor grad_reps = at::empty({s.learned, s.d, s.d}, options);
  at::Tensor grad_weight = at::empty({s.out, s.in, s.d}, options);
  if (grad_in.is_cuda()) {
#ifdef SYMKERNELS_WITH_CUDA
    const Layout layout = layout_of(grad_in);
    const at::Tensor grad = layout == Layout::kOther ? grad_in.contiguous() : grad_in;
    expansion_detail::expand_backward_cuda(grad, layout == Layout::kChannelsLast, reps_in.contiguous(),
                                           weight_in.contiguous(), leading_identity, grad_reps, grad_weight);
#endif
  } else {
    const at::Tensor grad = grad_in.to(reps_in.scalar_type()).contiguous().view({s.out, s.groups, s.in, s.d});
    expansion_detail::expand_backward_cpu(grad, reps_in.contiguous(), weight_in.contiguous(), leading_identity,
                                          grad_reps, grad_weight);
  }
  return {grad_reps, grad_weight};
}

}  // namespace symkernels
