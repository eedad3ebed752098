// The op implementations that live in Python (symkernels/ops/sinkhorn.py, symkernels/ops/expansion.py): the Triton
// kernels, the automatic choice ("auto"), and the errors of a choice that cannot serve the tensors. The native CPU
// and CUDA kernels of the ops (sinkhorn_op.cpp, expansion_op.cpp) hand them every call whose backend argument names
// no native kernel for its tensors. Python registers them when it imports the op modules (register.cpp:
// set_python_kernel); the call takes the GIL, and a Python exception reaches the caller as itself.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>
#include <c10/core/ScalarType.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace symkernels::python_kernels {

using SinkhornOutputs = std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor>;

SinkhornOutputs sinkhorn(at::TensorList stacks, int64_t n_iter, double tau, double tol, c10::string_view stop,
                         const std::optional<at::Tensor>& caps, c10::string_view backend);

std::vector<at::Tensor> sinkhorn_backward(at::TensorList grad_p, at::TensorList stacks, const at::Tensor& cols,
                                          const at::Tensor& domain, const at::Tensor& iterations, double tau,
                                          c10::string_view backend);

at::Tensor expand_kernel(const at::Tensor& reps, const at::Tensor& weight, int64_t kernel_size, bool leading_identity,
                         bool channels_last, at::ScalarType dtype, c10::string_view backend);

std::tuple<at::Tensor, at::Tensor> expand_kernel_backward(const at::Tensor& grad, const at::Tensor& reps,
                                                          const at::Tensor& weight, int64_t kernel_size,
                                                          bool leading_identity, c10::string_view backend);

}  // namespace symkernels::python_kernels
