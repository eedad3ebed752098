// Which op calls the native kernels compute in the dispatcher's CPU and CUDA kernels: those whose backend argument
// names them ("cpu", "cuda") for tensors of their device and of a dtype they serve, the same rule as
// symkernels/backends.py. Every other call goes to the Python implementation (python_kernels.h), which resolves an
// automatic choice, runs the Triton kernels, or raises with the reason a choice cannot serve.
#pragma once

#include <ATen/core/Tensor.h>
#include <c10/util/string_view.h>


namespace symkernels {

#ifdef SYMKERNELS_WITH_CUDA
inline constexpr bool kNativeCudaKernels = true;
#else
inline constexpr bool kNativeCudaKernels = false;
#endif

inline bool native_serves(c10::string_view backend, const at::Tensor& first) {
  const at::ScalarType dtype = first.scalar_type();
  const bool half = dtype == at::kHalf || dtype == at::kBFloat16;
  if (backend == "cpu") return first.is_cpu() && (half || dtype == at::kFloat || dtype == at::kDouble);
  if (backend == "cuda") return kNativeCudaKernels && first.is_cuda() && (half || dtype == at::kFloat);
  return false;
}

// The CPU kernels compute float16 and bfloat16 in float32: the inputs widened, the results rounded back once.
inline bool widened_on_cpu(const at::Tensor& t) {
  return t.is_cpu() && (t.scalar_type() == at::kHalf || t.scalar_type() == at::kBFloat16);
}

}  // namespace symkernels
