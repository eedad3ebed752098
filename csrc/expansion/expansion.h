// The kernel-expansion ops: the entry points (device-generic: they check their inputs, allocate the outputs and
// call the kernel of the inputs' device) and the kernels behind them.
//
// reps [G', d, d], weight [O, I, d] with d = G_in * k^2; the stack is R = [I_d, reps...] with leading_identity
// (G = G' + 1, the identity never materialised), else R = reps (G = G').
//   forward  -> writes the conv weight kernel [O*G, I*G_in, k, k], allocated by the caller in the layout and dtype
//               the convolution wants (contiguous, memory-identical to [O, G, I, d], or channels_last):
//               kernel[o*G + g, i*G_in + h, ky, kx] = (R_g @ weight[o, i, :])[h*k^2 + ky*k + kx];
//   backward -> grad_reps [G', d, d] (the learned matrices only), grad_weight [O, I, d] (with the identity's term),
//               in reps' dtype, from grad_kernel in any layout and dtype; deterministic reductions.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <tuple>
#include <vector>

namespace symkernels {

// The conv weight's shape [O*G, I*G_in, k, k] for checked inputs (an error naming the argument otherwise).
std::vector<int64_t> expanded_kernel_shape(const at::Tensor& reps, const at::Tensor& weight, int64_t kernel_size,
                                           bool leading_identity);

void expand_forward(const at::Tensor& reps, const at::Tensor& weight, int64_t kernel_size, bool leading_identity,
                    const at::Tensor& kernel);

std::tuple<at::Tensor, at::Tensor> expand_backward(const at::Tensor& grad_kernel, const at::Tensor& reps,
                                                   const at::Tensor& weight, int64_t kernel_size,
                                                   bool leading_identity);

namespace expansion_detail {

// Kernels. Inputs are checked; reps and weight are contiguous; outputs are allocated with their final shapes,
// non-empty, and written in full. The CPU kernels see kernel and grad_kernel as contiguous [O, G, I, d] of reps'
// dtype; the CUDA kernels take the conv weight [O*G, I*G_in, k, k] itself, contiguous or channels_last, in any of
// their element types.
void expand_forward_cpu(const at::Tensor& reps, const at::Tensor& weight, bool leading_identity,
                        const at::Tensor& kernel);

void expand_backward_cpu(const at::Tensor& grad_kernel, const at::Tensor& reps, const at::Tensor& weight,
                         bool leading_identity, const at::Tensor& grad_reps, const at::Tensor& grad_weight);

#ifdef SYMKERNELS_WITH_CUDA
// CUDA tensors (float16, bfloat16, float32, accumulated in float32), on the current stream, without synchronising
// with the host (expansion_cuda.cpp).
void expand_forward_cuda(const at::Tensor& reps, const at::Tensor& weight, bool leading_identity,
                         const at::Tensor& kernel, bool channels_last);

void expand_backward_cuda(const at::Tensor& grad_kernel, bool channels_last, const at::Tensor& reps,
                          const at::Tensor& weight, bool leading_identity, const at::Tensor& grad_reps,
                          const at::Tensor& grad_weight);
#endif

}  // namespace expansion_detail
}  // namespace symkernels
