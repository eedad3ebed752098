// The one translation unit that includes the heavy torch/pybind11 headers (~30-45 s to compile): the Python module
// symkernels._C and its functions. The op schemas, fake implementations and autograd live in Python; kernels live
// in one folder per op family and include only lean ATen headers.
#include <torch/extension.h>

#include <string>

#include "build_info.h"
#include "expansion/expansion.h"
#include "sinkhorn/sinkhorn.h"

#define SYMKERNELS_STRINGIFY_(x) #x
#define SYMKERNELS_STRINGIFY(x) SYMKERNELS_STRINGIFY_(x)

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
  // The CUDA kernels of the Sinkhorn ops (sinkhorn_cuda_*.cu) and of the kernel-expansion ops (expansion_cuda_launchers.cu).
  info["cuda_kernels"] = true;
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
  info["cuda_kernels"] = false;
  info["cuda_archs"] = pybind11::list();
  info["cuda_runtime_version"] = pybind11::none();
#endif
  return info;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "symkernels native kernels, called by the ops torch.ops.symkernels.*";
  m.def("build_info", &build_info, "What this library was compiled with (parts, CUDA archs, torch version).");

  // The kernels release the GIL: they touch no Python object.
  const auto no_gil = py::call_guard<py::gil_scoped_release>();
  m.def("sinkhorn_forward", &symkernels::sinkhorn_forward, no_gil, py::arg("stacks"), py::arg("n_iter"),
        py::arg("tau"), py::arg("tol"), py::arg("stop_by_stack"), py::arg("caps"),
        "Sinkhorn on the list of stacks [G_l, n_l, n_l]; returns (p, cols, domain, iterations), p one tensor per "
        "stack.");
  m.def("sinkhorn_backward", &symkernels::sinkhorn_backward, no_gil, py::arg("grad_p"), py::arg("stacks"),
        py::arg("cols"), py::arg("domain"), py::arg("iterations"), py::arg("tau"),
        "The exact vector-Jacobian product of the iterations sinkhorn_forward ran: one gradient per stack.");
  m.def("expand_forward", &symkernels::expand_forward, no_gil, py::arg("reps"), py::arg("weight"),
        py::arg("kernel_size"), py::arg("leading_identity"), py::arg("kernel"),
        "reps [G', d, d], weight [O, I, d] -> writes kernel [O*G, I*G_in, k, k] (contiguous or channels_last) of the "
        "stack [I_d (if leading_identity), reps...].");
  m.def("expand_backward", &symkernels::expand_backward, no_gil, py::arg("grad_kernel"), py::arg("reps"),
        py::arg("weight"), py::arg("kernel_size"), py::arg("leading_identity"),
        "grad_kernel [O*G, I*G_in, k, k] -> (grad_reps [G', d, d], grad_weight [O, I, d]).");
}
