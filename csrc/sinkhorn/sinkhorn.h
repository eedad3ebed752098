// The Sinkhorn ops on ragged stacks of matrices: the entry points (device-generic: they check their inputs,
// allocate the outputs and call the kernel of the inputs' device) and the kernels behind them.
//
// `stacks` is a list of L tensors [G_l, n_l, n_l] (sizes may differ; one device and dtype), M = sum G_l matrices in
// all, numbered stack by stack. Matrix m runs T_m iterations (rows, then columns) of L0 = logits / tau: the first
// t < limit_m whose iterate P_t has every row sum within tol of 1 (tol > 0), else limit_m = caps[m] (or n_iter).
// With stop_by_stack (and tol > 0), every matrix then runs as many iterations as the slowest matrix of its stack
// (within its limit): the authors' rule, which stops a whole stack at once.
//   forward  -> p (one tensor like each stack): P_{T_m} of every matrix;
//               cols float64 [M, n_iter, max_n]: row t-1 holds c_t (scaling domain) or g_t (log domain) for
//               t <= T_m, zeros elsewhere (also past column n_m); on the CPU, when max_n <= kRecomputedMaxSize,
//               [M, n_iter, 0] instead: nothing saved, the backward recomputes c_t (or g_t) from the logits;
//               domain int32 [M] (0 scaling, 1 log); iterations int32 [M] (T_m);
//   backward -> grad_logits (one tensor like each stack), the exact vector-Jacobian product of the T_m iterations
//               each matrix ran, from the saved state (the CPU kernels take either form of cols).
#pragma once

#include <ATen/core/Tensor.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <vector>

namespace symkernels {

std::tuple<std::vector<at::Tensor>, at::Tensor, at::Tensor, at::Tensor> sinkhorn_forward(
    const std::vector<at::Tensor>& stacks, int64_t n_iter, double tau, double tol, bool stop_by_stack,
    const std::optional<at::Tensor>& caps);

std::vector<at::Tensor> sinkhorn_backward(const std::vector<at::Tensor>& grad_p, const std::vector<at::Tensor>& stacks,
                                          const at::Tensor& cols, const at::Tensor& domain,
                                          const at::Tensor& iterations, double tau);

namespace sinkhorn_detail {

// The largest n of a CPU call that saves no cols: matrices this small take the CPU kernels' small-matrix path,
// whose backward recomputes the iterates (sinkhorn_cpu_lanes.h). symkernels/ops/sinkhorn.py's fake kernel
// follows the same rule.
constexpr int64_t kRecomputedMaxSize = 8;

// The M matrices of the stacks: each one's size, and where each stack ends.
struct RaggedLayout {
  std::vector<int64_t> size;       // [M]
  std::vector<int64_t> stack_end;  // [L]: one past the last matrix of stack l
  int64_t max_n = 0;               // 0 when M = 0

  int64_t num_matrices() const { return static_cast<int64_t>(size.size()); }
};

// Kernels (there are matrices). Inputs are checked and contiguous, outputs allocated with their final shapes and
// written in full. caps: nullptr or [M] iteration limits in 1..n_iter.
void sinkhorn_forward_cpu(const std::vector<at::Tensor>& stacks, const RaggedLayout& layout, int64_t n_iter,
                          double tau, double tol, bool stop_by_stack, const int32_t* caps,
                          const std::vector<at::Tensor>& p, const at::Tensor& cols, const at::Tensor& domain,
                          const at::Tensor& iterations);

void sinkhorn_backward_cpu(const std::vector<at::Tensor>& grad_p, const std::vector<at::Tensor>& stacks,
                           const RaggedLayout& layout, const at::Tensor& cols, const at::Tensor& domain,
                           const at::Tensor& iterations, double tau, const std::vector<at::Tensor>& grad_logits);

#ifdef SYMKERNELS_WITH_CUDA
// One buffer of matrices back to back (stack l: counts[l] matrices of sizes[l] x sizes[l]); CUDA tensors (float16,
// bfloat16, float32 computed in float32), on the current stream, without synchronising with
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
