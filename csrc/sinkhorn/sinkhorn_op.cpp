// The dispatcher's kernels of symkernels::sinkhorn and symkernels::sinkhorn_backward (their schemas, fake kernels
// and the Python implementation are in symkernels/ops/sinkhorn.py):
//   CPU and CUDA: the native entry points (sinkhorn.h) when the backend argument names them, else the Python
//                 implementation (python_kernels.h);
//   Autograd:     runs the forward below autograd and records a SinkhornBackward node, whose backward is a call of
//                 symkernels::sinkhorn_backward through the dispatcher (so that the fake kernel traces it).
// All of it C++: a call from Python crosses into Python again only for the Triton kernels.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/zeros_like.h>
#include <torch/csrc/autograd/autograd_not_implemented_fallback.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <string>
#include <utility>
#include <vector>

#include "autograd_node.h"
#include "native_backend.h"
#include "python_kernels.h"
#include "sinkhorn/sinkhorn.h"

namespace symkernels {
namespace {

using python_kernels::SinkhornOutputs;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

using ForwardSignature = SinkhornOutputs(at::TensorList, int64_t, double, double, c10::string_view,
                                         const std::optional<at::Tensor>&, c10::string_view);
using BackwardSignature = std::vector<at::Tensor>(at::TensorList, at::TensorList, const at::Tensor&,
                                                  const at::Tensor&, const at::Tensor&, double, c10::string_view);

// Looked up on first use: the schemas are defined when Python imports symkernels.ops.sinkhorn.
const c10::TypedOperatorHandle<ForwardSignature>& forward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("symkernels::sinkhorn", "").typed<ForwardSignature>();
  return op;
}

const c10::TypedOperatorHandle<BackwardSignature>& backward_op() {
  static const auto op =
      c10::Dispatcher::singleton().findSchemaOrThrow("symkernels::sinkhorn_backward", "").typed<BackwardSignature>();
  return op;
}

std::vector<at::Tensor> widened(at::TensorList tensors) {
  std::vector<at::Tensor> out(tensors.begin(), tensors.end());
  for (at::Tensor& t : out) {
    if (widened_on_cpu(t)) t = t.to(at::kFloat);
  }
  return out;
}

// Results computed in float32 for float16/bfloat16 stacks, rounded back to the stacks' dtype.
std::vector<at::Tensor> narrowed(std::vector<at::Tensor> results, at::TensorList like) {
  for (size_t l = 0; l < results.size(); ++l) {
    if (results[l].scalar_type() != like[l].scalar_type()) results[l] = results[l].to(like[l].scalar_type());
  }
  return results;
}

SinkhornOutputs forward_kernel(at::TensorList stacks, int64_t n_iter, double tau, double tol, c10::string_view stop,
                               const std::optional<at::Tensor>& caps, c10::string_view backend) {
  const bool known_stop = stop == "matrix" || stop == "stack";
  if (stacks.empty() || !known_stop || !native_serves(backend, stacks[0])) {
    return python_kernels::sinkhorn(stacks, n_iter, tau, tol, stop, caps, backend);
  }
  auto [p, cols, domain, iterations] = sinkhorn_forward(widened(stacks), n_iter, tau, tol, stop == "stack", caps);
  return {narrowed(std::move(p), stacks), std::move(cols), std::move(domain), std::move(iterations)};
}

std::vector<at::Tensor> backward_kernel(at::TensorList grad_p, at::TensorList stacks, const at::Tensor& cols,
                                        const at::Tensor& domain, const at::Tensor& iterations, double tau,
                                        c10::string_view backend) {
  if (stacks.empty() || !native_serves(backend, stacks[0])) {
    return python_kernels::sinkhorn_backward(grad_p, stacks, cols, domain, iterations, tau, backend);
  }
  return narrowed(sinkhorn_backward(widened(grad_p), widened(stacks), cols, domain, iterations, tau), stacks);
}

// The backward of one symkernels::sinkhorn call: the stacks and the saved state in, one gradient per stack out
// (cols, domain and iterations are not differentiable).
struct SinkhornBackward final : torch::autograd::Node {
  std::vector<SavedVariable> stacks;
  SavedVariable cols, domain, iterations;
  double tau = 1.0;
  std::string backend;

  std::string name() const override { return "SinkhornBackward"; }

  variable_list apply(variable_list&& grads) override {
    std::vector<at::Tensor> saved;
    saved.reserve(stacks.size());
    for (const SavedVariable& stack : stacks) saved.push_back(stack.unpack());
    // A stack whose P took no part in the loss has no gradient coming in.
    for (size_t l = 0; l < grads.size(); ++l) {
      if (!grads[l].defined()) grads[l] = at::zeros_like(saved[l]);
    }
    return backward_op().call(grads, saved, cols.unpack(), domain.unpack(), iterations.unpack(), tau, backend);
  }

  void release_variables() override {
    for (SavedVariable& stack : stacks) stack.reset_data();
    cols.reset_data();
    domain.reset_data();
    iterations.reset_data();
  }
};

SinkhornOutputs autograd_kernel(c10::DispatchKeySet keys, at::TensorList stacks, int64_t n_iter, double tau,
                                double tol, c10::string_view stop, const std::optional<at::Tensor>& caps,
                                c10::string_view backend) {
  SinkhornOutputs out;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    out = forward_op().redispatch(keys & c10::after_autograd_keyset, stacks, n_iter, tau, tol, stop, caps, backend);
  }
  if (torch::autograd::compute_requires_grad(stacks)) {
    auto& [p, cols, domain, iterations] = out;
    auto node = make_node<SinkhornBackward>();
    node->set_next_edges(torch::autograd::collect_next_edges(stacks));
    node->stacks.reserve(stacks.size());
    for (const at::Tensor& stack : stacks) node->stacks.emplace_back(stack, /*is_output=*/false);
    // Outputs without a history (not differentiable): saved as plain tensors.
    node->cols = SavedVariable(cols, false);
    node->domain = SavedVariable(domain, false);
    node->iterations = SavedVariable(iterations, false);
    node->tau = tau;
    node->backend = std::string(backend.data(), backend.size());
    torch::autograd::set_history(p, node);
  }
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(symkernels, CPU, m) {
  m.impl("sinkhorn", TORCH_FN(forward_kernel));
  m.impl("sinkhorn_backward", TORCH_FN(backward_kernel));
}

TORCH_LIBRARY_IMPL(symkernels, CUDA, m) {
  m.impl("sinkhorn", TORCH_FN(forward_kernel));
  m.impl("sinkhorn_backward", TORCH_FN(backward_kernel));
}

TORCH_LIBRARY_IMPL(symkernels, Autograd, m) {
  m.impl("sinkhorn", TORCH_FN(autograd_kernel));
  // Not differentiable itself (no double backward): a backward through it raises instead of passing nothing on.
  m.impl("sinkhorn_backward", torch::autograd::autogradNotImplementedFallback());
}

}  // namespace symkernels
