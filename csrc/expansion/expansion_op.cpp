// The dispatcher's kernels of symkernels::expand_kernel and symkernels::expand_kernel_backward (their schemas, fake
// kernels and the Python implementation are in symkernels/ops/expansion.py):
//   CPU and CUDA: the native entry points (expansion.h) when the backend argument names them, else the Python
//                 implementation (python_kernels.h);
//   Autograd:     runs the forward below autograd and records an ExpandKernelBackward node, whose backward is a
//                 call of symkernels::expand_kernel_backward through the dispatcher.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/empty.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <string>
#include <tuple>

#include "autograd_node.h"
#include "expansion/expansion.h"
#include "native_backend.h"
#include "python_kernels.h"

namespace symkernels {
namespace {

using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

using ForwardSignature = at::Tensor(const at::Tensor&, const at::Tensor&, int64_t, bool, bool, at::ScalarType,
                                    c10::string_view);
using BackwardSignature = std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                             int64_t, bool, c10::string_view);

// Looked up on first use: the schemas are defined when Python imports symkernels.ops.expansion.
const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("symkernels::expand_kernel", "").typed<ForwardSignature>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op = c10::Dispatcher::singleton()
                             .findSchemaOrThrow("symkernels::expand_kernel_backward", "")
                             .typed<BackwardSignature>();
  return op;
}

at::Tensor widened(const at::Tensor& t) { return widened_on_cpu(t) ? t.to(at::kFloat) : t; }

// The kernel written in the layout and dtype the convolution wants, so that no copy or cast runs between the two.
at::Tensor forward_kernel(const at::Tensor& reps, const at::Tensor& weight, int64_t kernel_size, bool leading_identity,
                          bool channels_last, at::ScalarType dtype, c10::string_view backend) {
  if (!native_serves(backend, weight)) {
    return python_kernels::expand_kernel(reps, weight, kernel_size, leading_identity, channels_last, dtype, backend);
  }
  const at::Tensor wide_reps = widened(reps);
  const at::Tensor wide_weight = widened(weight);
  const auto layout = channels_last ? at::MemoryFormat::ChannelsLast : at::MemoryFormat::Contiguous;
  at::Tensor kernel =
      at::empty(expanded_kernel_shape(wide_reps, wide_weight, kernel_size, leading_identity),
                weight.options().dtype(dtype).memory_format(layout));
  expand_forward(wide_reps, wide_weight, kernel_size, leading_identity, kernel);
  return kernel;
}

// Gradients in reps' and weight's dtype, from a gradient of any layout and floating dtype.
std::tuple<at::Tensor, at::Tensor> backward_kernel(const at::Tensor& grad, const at::Tensor& reps,
                                                   const at::Tensor& weight, int64_t kernel_size,
                                                   bool leading_identity, c10::string_view backend) {
  if (!native_serves(backend, weight)) {
    return python_kernels::expand_kernel_backward(grad, reps, weight, kernel_size, leading_identity, backend);
  }
  auto [grad_reps, grad_weight] =
      expand_backward(widened(grad), widened(reps), widened(weight), kernel_size, leading_identity);
  return {grad_reps.to(reps.scalar_type()), grad_weight.to(weight.scalar_type())};
}

// The backward of one symkernels::expand_kernel call: (grad_reps, grad_weight) from the kernel's gradient.
struct ExpandKernelBackward final : torch::autograd::Node {
  SavedVariable reps, weight;
  int64_t kernel_size = 1;
  bool leading_identity = false;
  std::string backend;

  std::string name() const override { return "ExpandKernelBackward"; }

  variable_list apply(variable_list&& grads) override {
    if (!grads[0].defined()) return {at::Tensor(), at::Tensor()};
    auto [grad_reps, grad_weight] =
        backward_op().call(grads[0], reps.unpack(), weight.unpack(), kernel_size, leading_identity, backend);
    return {std::move(grad_reps), std::move(grad_weight)};
  }

  void release_variables() override {
    reps.reset_data();
    weight.reset_data();
  }
};

at::Tensor autograd_kernel(c10::DispatchKeySet keys, const at::Tensor& reps, const at::Tensor& weight,
                           int64_t kernel_size, bool leading_identity, bool channels_last, at::ScalarType dtype,
                           c10::string_view backend) {
  at::Tensor kernel;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    kernel = forward_op().redispatch(keys & c10::after_autograd_keyset, reps, weight, kernel_size, leading_identity,
                                     channels_last, dtype, backend);
  }
  if (torch::autograd::compute_requires_grad(reps, weight)) {
    auto node = make_node<ExpandKernelBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(reps, weight));
    node->reps = SavedVariable(reps, /*is_output=*/false);
    node->weight = SavedVariable(weight, /*is_output=*/false);
    node->kernel_size = kernel_size;
    node->leading_identity = leading_identity;
    node->backend = std::string(backend.data(), backend.size());
    torch::autograd::set_history(kernel, node);
  }
  return kernel;
}

}  // namespace

TORCH_LIBRARY_IMPL(symkernels, CPU, m) {
  m.impl("expand_kernel", TORCH_FN(forward_kernel));
  m.impl("expand_kernel_backward", TORCH_FN(backward_kernel));
}

TORCH_LIBRARY_IMPL(symkernels, CUDA, m) {
  m.impl("expand_kernel", TORCH_FN(forward_kernel));
  m.impl("expand_kernel_backward", TORCH_FN(backward_kernel));
}

TORCH_LIBRARY_IMPL(symkernels, Autograd, m) {
  m.impl("expand_kernel", TORCH_FN(autograd_kernel));
  // Not differentiable itself (no double backward): a backward through it raises instead of passing nothing on.
  m.impl("expand_kernel_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace symkernels
