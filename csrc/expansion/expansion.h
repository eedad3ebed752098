// The kernel-expansion ops: the entry points (device-generic: they check their inputs, allocate the outputs and
// call the kernel of the inputs' device) and the kernels behind them.
//
// reps [G', d, d], weight [O, I, d] with d = G_in * k^2; the stack is R = [I_d, reps...] with leading_identity
// (G = G' + 1, the identity never materialised), else R = reps (G = G').
//   forward  -> kernel [O*G, I*G_in, k, k], contiguous (memory-identical to [O, G, I, d]):
//               kernel[o, g, i, :] = R_g @ weight[o, i, :];
//   backward -> grad_reps [G', d, d] (the learned matrices only), grad_weight [O, I, d] (with the identity's term),
//               deterministic reductions.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>

namespace symkernels {

at::Tensor expand_forward(const at::Tensor& reps, const at::Tensor& weight, int64_t kernel_size,
                          bool leading_identity);

std::tuple<at::Tensor, at::Tensor> expand_backward(const at::Tensor& grad_kernel, const at::Tensor& reps,
                                                   const at::Tensor& weight, int64_t kernel_size,
                                                   bool leading_identity);

namespace expansion_detail {

// Kernels. Inputs are checked and contiguous; kernel and grad_kernel are seen as [O, G, I, d]; outputs are
// allocated with their final shapes, non-empty, and written in full.
void expand_forward_cpu(const at::Tensor& reps, const at::Tensor& weight, bool leading_identity,
                        const at::Tensor& kernel);

void expand_backward_cpu(const at::Tensor& grad_kernel, const at::Tensor& reps, const at::Tensor& weight,
                         bool leading_identity, const at::Tensor& grad_reps, const at::Tensor& grad_weight);

#ifdef SYMKERNELS_WITH_CUDA
// CUDA tensors (float16, bfloat16, float32, accumulated in float32), on the current stream, without synchronising
// with the host (expansion_cuda.cpp).
void expand_forward_cuda(const at::Tensor& reps, const at::Tensor& weight, bool leading_identity,
                         const at::Tensor& kernel);

void expand_backward_cuda(const at::Tensor& grad_kernel, const at::Tensor& reps, const at::Tensor& weight,
                          bool leading_identity, const at::Tensor& grad_reps, const at::Tensor& grad_weight);
#endif

}  // namespace expansion_detail
}  // namespace symkernels
