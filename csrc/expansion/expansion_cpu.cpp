// CPU kernels of the kernel-expansion ops (expansion.h): the expansion and both gradients are chains of small
// row-major GEMMs on sub-matrices of the operands, run from inside an at::parallel_for. With leading_identity the
// identity's block of the kernel is a copy of weight and its term of grad_weight a copy of grad_kernel's block.
//
// GEMMs: float32 goes to at::native::cpublas::brgemm, oneDNN's JIT micro-kernel (with BLAS as its own fallback
// where the CPU, the torch build or torch.backends.mkldnn.enabled = False rule it out). It picks AVX-512 where the
// BLAS may not: on an AVX-512 AMD CPU, where MKL takes its AVX2 path, it ran these shapes ~2.2x faster than sgemm.
// float64 goes to at::mm_out / at::addmm_out on strided views (BLAS; nested in the parallel region, single-threaded).
// Both take A [M, K] and B [K, N] untransposed, so the transposed factors (reps[g]^T, weight^T) are copied once
// into small contiguous buffers.
//
// Determinism: how the work is cut into GEMMs and row blocks depends only on the shapes, never on the thread
// count, and every reduction across GEMMs (over g for grad_weight, over o or i for grad_reps) is a chain of
// accumulating GEMMs in a fixed order inside one task. The thread count only decides which thread runs a task.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/LegacyTypeDispatch.h>
#include <ATen/core/Tensor.h>
#include <ATen/native/CPUBlas.h>
#include <ATen/ops/addmm.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/mm.h>

#include <algorithm>
#include <cstdint>

#include "expansion/expansion.h"

namespace symkernels::expansion_detail {
namespace {

// Multiply-adds one parallel chunk should carry at least, so that tiny problems do not pay for threads.
constexpr int64_t kMinChunkWork = int64_t{1} << 16;
// A GEMM batch smaller than this is cut into row blocks too, so that the threads have enough tasks to share
// (kept low: shorter GEMMs run slower on the BLAS path, measured ~12% for float64 grad_reps at d = 196) ...
constexpr int64_t kMinTasks = 4;
// ... but not into blocks shorter than this.
constexpr int64_t kMinRows = 16;

// The nested GEMMs go through the dispatcher on plain sub-views: skip the autograd layers there. The guard is
// thread-local, so each parallel task sets it itself (worker threads do not inherit the caller's).
using BelowAutograd = at::AutoDispatchBelowADInplaceOrView;

int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

// A row-major matrix inside a tensor: element (r, c) at data[offset + r * ld + c].
struct Mat {
  const at::Tensor& t;
  int64_t offset;
  int64_t ld;

  Mat rows_from(int64_t r0) const {
    return {t, offset + r0 * ld, ld};
  }
};

// C[M, N] = A[M, K] @ B[K, N], or C += A @ B when accumulate.
template <typename scalar_t>
void gemm(int64_t M, int64_t N, int64_t K, const Mat& a, const Mat& b, const Mat& c, bool accumulate) {
  const at::Tensor av = a.t.as_strided({M, K}, {a.ld, 1}, a.t.storage_offset() + a.offset);
  const at::Tensor bv = b.t.as_strided({K, N}, {b.ld, 1}, b.t.storage_offset() + b.offset);
  at::Tensor cv = c.t.as_strided({M, N}, {c.ld, 1}, c.t.storage_offset() + c.offset);
  if (accumulate) {
    at::addmm_out(cv, cv, av, bv);
  } else {
    at::mm_out(cv, av, bv);
  }
}

#ifdef CPUBLAS_BRGEMM_F32F32F32
template <>
void gemm<float>(int64_t M, int64_t N, int64_t K, const Mat& a, const Mat& b, const Mat& c, bool accumulate) {
  at::native::cpublas::brgemm(M, N, K, a.ld, b.ld, c.ld, accumulate, a.t.const_data_ptr<float>() + a.offset,
                              b.t.const_data_ptr<float>() + b.offset, c.t.mutable_data_ptr<float>() + c.offset);
}
#endif

// Runs fn(b, r0, nr) for every GEMM b of a batch of `batch` GEMMs with M rows each, cut into blocks of rows
// [r0, r0 + nr) when the batch alone is too small to share; `row_work` is the multiply-adds per row.
template <typename F>
void for_row_blocks(int64_t batch, int64_t M, int64_t row_work, const F& fn) {
  const int64_t rows = std::max(std::min(M, kMinRows), ceil_div(M, ceil_div(kMinTasks, batch)));
  const int64_t blocks = ceil_div(M, rows);
  const int64_t grain = std::max<int64_t>(1, kMinChunkWork / std::max<int64_t>(1, rows * row_work));
  at::parallel_for(0, batch * blocks, grain, [&](int64_t begin, int64_t end) {
    const BelowAutograd below_autograd;
    for (int64_t t = begin; t < end; ++t) {
      const int64_t r0 = (t % blocks) * rows;
      fn(t / blocks, r0, std::min(rows, M - r0));
    }
  });
}

// dst rows [nr, d] = src rows [nr, d], both row-major with their own leading dimensions.
template <typename scalar_t>
void copy_rows(int64_t nr, int64_t d, const Mat& src, const Mat& dst) {
  const scalar_t* from = src.t.const_data_ptr<scalar_t>() + src.offset;
  scalar_t* to = dst.t.mutable_data_ptr<scalar_t>() + dst.offset;
  for (int64_t r = 0; r < nr; ++r) {
    std::copy(from + r * src.ld, from + r * src.ld + d, to + r * dst.ld);
  }
}

// kernel[o, g] = weight[o] @ R_g^T ([I, d] blocks, one GEMM per (o, g)), or, with o as the GEMM row when O > I,
// kernel[:, g, i, :] = weight[:, i, :] @ R_g^T ([O, d], strided rows, one GEMM per (g, i)). The first `identity`
// (0 or 1) blocks g are copies of weight; R_g = reps[g - identity] for the others.
template <typename scalar_t>
void forward_impl(const at::Tensor& reps_t, const at::Tensor& weight, int64_t identity, const at::Tensor& kernel) {
  const int64_t O = kernel.size(0);
  const int64_t G = kernel.size(1);
  const int64_t I = kernel.size(2);
  const int64_t d = kernel.size(3);
  if (I >= O) {
    for_row_blocks(O * G, I, d * d, [&](int64_t b, int64_t r0, int64_t nr) {
      const int64_t o = b / G;
      const int64_t g = b % G;
      const Mat src = Mat{weight, o * I * d, d}.rows_from(r0);
      const Mat dst = Mat{kernel, b * I * d, d}.rows_from(r0);
      if (g < identity) {
        copy_rows<scalar_t>(nr, d, src, dst);
      } else {
        gemm<scalar_t>(nr, d, d, src, Mat{reps_t, (g - identity) * d * d, d}, dst, false);
      }
    });
  } else {
    for_row_blocks(G * I, O, d * d, [&](int64_t b, int64_t r0, int64_t nr) {
      const int64_t g = b / I;
      const int64_t i = b % I;
      const Mat src = Mat{weight, i * d, I * d}.rows_from(r0);
      const Mat dst = Mat{kernel, b * d, G * I * d}.rows_from(r0);
      if (g < identity) {
        copy_rows<scalar_t>(nr, d, src, dst);
      } else {
        gemm<scalar_t>(nr, d, d, src, Mat{reps_t, (g - identity) * d * d, d}, dst, false);
      }
    });
  }
}

// grad_weight[o] = sum_g grad[o, g] @ R_g (one task per o), or with o as the GEMM row when O > I,
// grad_weight[:, i, :] = sum_g grad[:, g, i, :] @ R_g (one task per i); summed in the order g = 0, 1, ..., the
// identity's term (g = 0 with `identity` = 1) a copy.
template <typename scalar_t>
void grad_weight_impl(const at::Tensor& grad, const at::Tensor& reps, int64_t identity,
                      const at::Tensor& grad_weight) {
  const int64_t O = grad.size(0);
  const int64_t G = grad.size(1);
  const int64_t I = grad.size(2);
  const int64_t d = grad.size(3);
  // Sums the blocks g = 0..G-1 of grad, given as grad_block(g) ([nr, d] rows), into dst.
  auto sum_over_g = [&](int64_t nr, const Mat& dst, const auto& grad_block) {
    for (int64_t g = 0; g < G; ++g) {
      if (g < identity) {
        copy_rows<scalar_t>(nr, d, grad_block(g), dst);
      } else {
        gemm<scalar_t>(nr, d, d, grad_block(g), Mat{reps, (g - identity) * d * d, d}, dst, g > 0);
      }
    }
  };
  if (I >= O) {
    for_row_blocks(O, I, G * d * d, [&](int64_t o, int64_t r0, int64_t nr) {
      sum_over_g(nr, Mat{grad_weight, o * I * d, d}.rows_from(r0),
                 [&](int64_t g) { return Mat{grad, (o * G + g) * I * d, d}.rows_from(r0); });
    });
  } else {
    for_row_blocks(I, O, G * d * d, [&](int64_t i, int64_t r0, int64_t nr) {
      sum_over_g(nr, Mat{grad_weight, i * d, I * d}.rows_from(r0),
                 [&](int64_t g) { return Mat{grad, (g * I + i) * d, G * I * d}.rows_from(r0); });
    });
  }
}

// grad_reps[l]^T = sum_o weight[o]^T @ grad[o, g]                ([d, I] x [I, d] per o, B a contiguous block), or
//                = sum_i weight[:, i, :]^T @ grad[:, g, i, :]     ([d, O] x [O, d] per i, B with strided rows),
// with g = l + identity, the latter when I is short and O longer (lifting layers: I = 1). `weight_t` is weight
// transposed accordingly: [O, d, I] or [I, d, O]. Tasks are (l, block of rows m of grad_reps[l]^T); each sums into
// a buffer in a fixed order, then writes the block transposed into grad_reps[l][:, m0:m1].
template <typename scalar_t>
void grad_reps_impl(const at::Tensor& grad, const at::Tensor& weight_t, bool sum_over_o, int64_t identity,
                    const at::Tensor& grad_reps) {
  const int64_t O = grad.size(0);
  const int64_t G = grad.size(1);
  const int64_t I = grad.size(2);
  const int64_t d = grad.size(3);
  for_row_blocks(grad_reps.size(0), d, O * I * d, [&](int64_t l, int64_t m0, int64_t nm) {
    const int64_t g = l + identity;
    const at::Tensor buffer = at::empty({nm, d}, grad.options());
    const Mat acc{buffer, 0, d};
    if (sum_over_o) {
      for (int64_t o = 0; o < O; ++o) {
        gemm<scalar_t>(nm, d, I, Mat{weight_t, o * d * I, I}.rows_from(m0), Mat{grad, (o * G + g) * I * d, d}, acc,
                       o > 0);
      }
    } else {
      for (int64_t i = 0; i < I; ++i) {
        gemm<scalar_t>(nm, d, O, Mat{weight_t, i * d * O, O}.rows_from(m0), Mat{grad, (g * I + i) * d, G * I * d},
                       acc, i > 0);
      }
    }
    const scalar_t* src = buffer.const_data_ptr<scalar_t>();
    scalar_t* dst = grad_reps.mutable_data_ptr<scalar_t>() + l * d * d + m0;
    for (int64_t n = 0; n < d; ++n) {
      for (int64_t m = 0; m < nm; ++m) {
        dst[n * d + m] = src[m * d + n];
      }
    }
  });
}

}  // namespace

void expand_forward_cpu(const at::Tensor& reps, const at::Tensor& weight, bool leading_identity,
                        const at::Tensor& kernel) {
  const BelowAutograd below_autograd;
  const at::Tensor reps_t = reps.transpose(1, 2).contiguous();  // reps_t[l] = reps[l]^T
  AT_DISPATCH_FLOATING_TYPES(weight.scalar_type(), "expand_forward_cpu",
                             [&] { forward_impl<scalar_t>(reps_t, weight, leading_identity ? 1 : 0, kernel); });
}

void expand_backward_cpu(const at::Tensor& grad, const at::Tensor& reps, const at::Tensor& weight,
                         bool leading_identity, const at::Tensor& grad_reps, const at::Tensor& grad_weight) {
  const BelowAutograd below_autograd;
  const int64_t O = grad.size(0);
  const int64_t I = grad.size(2);
  const int64_t identity = leading_identity ? 1 : 0;
  // grad_reps sums over o, GEMMs with K = I whose B is a contiguous block of grad (measured faster), unless I is
  // short (I < min(O, kMinRows), lifting layers): then over i, with K = O.
  const bool sum_over_o = I >= std::min(O, kMinRows);
  AT_DISPATCH_FLOATING_TYPES(grad.scalar_type(), "expand_backward_cpu", [&] {
    grad_weight_impl<scalar_t>(grad, reps, identity, grad_weight);
    if (grad_reps.size(0) > 0) {
      const at::Tensor weight_t =
          sum_over_o ? weight.transpose(1, 2).contiguous() : weight.permute({1, 2, 0}).contiguous();
      grad_reps_impl<scalar_t>(grad, weight_t, sum_over_o, identity, grad_reps);
    }
  });
}

}  // namespace symkernels::expansion_detail
