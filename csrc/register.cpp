// The one translation unit that includes the heavy torch/pybind11 headers (~30-45 s to compile): op schemas and
// the Python module. Kernels live in one folder per op family, include only lean ATen headers, and register
// their implementations per dispatch key themselves (TORCH_LIBRARY_IMPL), the CUDA ones from their .cu file.
#include <torch/extension.h>

#include <string>

#include "build_info.h"

#define SYMKERNELS_STRINGIFY_(x) #x
#define SYMKERNELS_STRINGIFY(x) SYMKERNELS_STRINGIFY_(x)

TORCH_LIBRARY(symkernels, m) {
  // p: [..., n, n] float32/float64 -> [...]: max over rows and columns of |sum - 1| for each matrix.
  m.def("marginal_error(Tensor p) -> Tensor");

  // logits: [B, n, n] float32/float64, contiguous. Returns (P [B, n, n], row_log_scalings [B, T, n],
  // col_log_scalings [B, T, n]): T log-domain Sinkhorn iterations (rows, then columns) of L0 = logits / tau,
  // with f_t / g_t the row / column log-scalings after iteration t, so that P = exp(L0 + f_T 1' + 1 g_T').
  m.def("sinkhorn_forward(Tensor logits, int n_iter, float tau) -> (Tensor, Tensor, Tensor)");
  // The exact vector-Jacobian product of the T-step map, replayed from the saved log-scalings: grad_logits.
  m.def(
      "sinkhorn_backward(Tensor grad_p, Tensor logits, Tensor row_log_scalings, Tensor col_log_scalings, "
      "float tau) -> Tensor");

  // reps [G, d, d], weight [O, I, d] -> kernel [O, G, I, d]: kernel[o, g, i, :] = reps[g] @ weight[o, i, :].
  m.def("expand_kernel_forward(Tensor reps, Tensor weight) -> Tensor");
  // grad_kernel [O, G, I, d] -> (grad_reps [G, d, d], grad_weight [O, I, d]), deterministic reductions.
  m.def("expand_kernel_backward(Tensor grad_kernel, Tensor reps, Tensor weight) -> (Tensor, Tensor)");
}

namespace {

pybind11::dict build_info() {
  pybind11::dict info;
  info["cpu"] = true;
  info["openmp"] = symkernels::cpu_kernels_use_openmp();
#ifdef SYMKERNELS_TORCH_VERSION
  info["torch_version"] = std::string(SYMKERNELS_STRINGIFY(SYMKERNELS_TORCH_VERSION));
#else
  info["torch_version"] = pybind11::none();
#endif
#ifdef SYMKERNELS_WITH_CUDA
  info["cuda"] = true;
  const std::string archs = symkernels::cuda_arch_list();
  pybind11::list arch_list;
  size_t start = 0;
  while (start < archs.size()) {
    size_t comma = archs.find(',', start);
    if (comma == std::string::npos) comma = archs.size();
    arch_list.append(archs.substr(start, comma - start));
    start = comma + 1;
  }
  info["cuda_archs"] = arch_list;
  info["cuda_runtime_version"] = symkernels::cuda_runtime_version();
#else
  info["cuda"] = false;
  info["cuda_archs"] = pybind11::list();
  info["cuda_runtime_version"] = pybind11::none();
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "symkernels native kernels; the ops themselves are torch.ops.symkernels.*";
  m.def("build_info", &build_info, "What this library was compiled with (parts, CUDA archs, torch version).");
}
