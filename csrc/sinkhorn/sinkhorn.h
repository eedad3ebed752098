// The Sinkhorn ops on ragged stacks of matrices: the entry points (device-generic: they check their inputs,
// allocate the outputs and call the kernel of the inputs' device) and the kernels behind them.
//
// `logits` is 1-D and holds M matrices back to back, row-major: stack l of the lists (sizes, counts) holds counts[l]
// matrices of sizes[l] x sizes[l]. Matrix m runs T_m iterations (rows, then columns) of L0 = logits / tau: the first
// t < limit_m whose iterate P_t has every row sum within tol of 1 (tol > 0), else limit_m = caps[m] (or n_iter).
//   forward  -> p (like logits): P_{T_m} of every matrix;
//               cols float64 [M, n_iter, max_n]: row t-1 holds c_t (scaling domain) or g_t (log domain) for
//               t <= T_m, zeros elsewhere (also past column n_m);
//               domain int32 [M] (0 scaling, 1 log); iterations int32 [M] (T_m);
//   backward -> grad_logits, the exact vector-Jacobian product of the T_m iterations each matrix ran, from the
//               saved state.
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace symkernels {

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> sinkhorn_forward(const at::Tensor& logits,
                                                                            const std::vector<int64_t>& sizes,
                                                                            const std::vector<int64_t>& counts,
                                                                            int64_t n_iter, double tau, double tol,
                                                                            const std::optional<at::Tensor>& caps);

at::Tensor sinkhorn_backward(const at::Tensor& grad_p, const at::Tensor& logits, const std::vector<int64_t>& sizes,
                             const std::vector<int64_t>& counts, const at::Tensor& cols, const at::Tensor& domain,
                             const at::Tensor& iterations, double tau);

namespace sinkhorn_detail {

// Where each of the M matrices lies in `logits`: its size and its first element.
struct RaggedLayout {
  std::vector<int64_t> size;    // [M]
  std::vector<int64_t> offset;  // [M]
  int64_t max_n = 0;            // 0 when M = 0

  int64_t num_matrices() const { return static_cast<int64_t>(size.size()); }
};

// Kernels (there are matrices). Inputs are checked and contiguous, outputs allocated with their final shapes and
// written in full. caps: nullptr or [M] iteration limits in 1..n_iter.
void sinkhorn_forward_cpu(const at::Tensor& logits, const RaggedLayout& layout, int64_t n_iter, double tau,
                          double tol, const int32_t* caps, const at::Tensor& p, const at::Tensor& cols,
                          const at::Tensor& domain, const at::Tensor& iterations);

void sinkhorn_backward_cpu(const at::Tensor& grad_p, const at::Tensor& logits, const RaggedLayout& layout,
                           const at::Tensor& cols, const at::Tensor& domain, const at::Tensor& iterations, double tau,
                           const at::Tensor& grad_logits);

#ifdef SYMKERNELS_WITH_CUDA
// CUDA tensors (float16, bfloat16, float32 computed in float32), on the current stream, without synchronising with
// the device; caps, domain and iterations are clamped into their ranges by the kernels. Sizes up to 1024.
void sinkhorn_forward_cuda(const at::Tensor& logits, const std::vector<int64_t>& sizes,
                           const std::vector<int64_t>& counts, int64_t n_iter, double tau, double tol,
                           const int32_t* caps, const at::Tensor& p, const at::Tensor& cols, const at::Tensor& domain,
                           const at::Tensor& iterations);

void sinkhorn_backward_cuda(const at::Tensor& grad_p, const at::Tensor& logits, const std::vector<int64_t>& sizes,
                            const std::vector<int64_t>& counts, const at::Tensor& cols, const at::Tensor& domain,
                            const at::Tensor& iterations, double tau, const at::Tensor& grad_logits);
#endif

}  // namespace sinkhorn_detail
}  // namespace symkernels
