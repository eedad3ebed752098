// The one translation unit that includes the heavy torch/pybind11 headers (~30-45 s to compile): the Python module
// symkernels._C and its functions, and the calls of the ops' Python implementations (python_kernels.h). The op
// schemas and fake kernels live in Python; the ops' dispatcher kernels and autograd in <family>/<family>_op.cpp; the
// kernels in one folder per op family, with only lean ATen headers.
#include <torch/csrc/DynamicTypes.h>
#include <torch/csrc/Exceptions.h>
#include <torch/extension.h>

#include <algorithm>
#include <array>
#include <string>
#include <string_view>
#include <utility>

#include "build_info.h"
#include "cpu_pool.h"
#include "expansion/expansion.h"
#include "python_kernels.h"
#include "sinkhorn/sinkhorn.h"

#define SYMKERNELS_STRINGIFY_(x) #x
#define SYMKERNELS_STRINGIFY(x) SYMKERNELS_STRINGIFY_(x)

namespace symkernels {
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

// The Python implementations, by op; set once, when Python imports the op modules. Never destroyed: a kernel may run
// while the interpreter shuts down.
constexpr std::array<std::string_view, 4> kPythonOps{"sinkhorn", "sinkhorn_backward", "expand_kernel",
                                                      "expand_kernel_backward"};
std::array<pybind11::object*, kPythonOps.size()> python_ops{};

size_t python_op_index(std::string_view op) {
  const auto found = std::find(kPythonOps.begin(), kPythonOps.end(), op);
  TORCH_CHECK_VALUE(found != kPythonOps.end(), "set_python_kernel: no op named ", op);
  return static_cast<size_t>(found - kPythonOps.begin());
}

void set_python_kernel(const std::string& op, pybind11::function implementation) {
  pybind11::object*& slot = python_ops[python_op_index(op)];
  if (slot == nullptr) slot = new pybind11::object();
  *slot = std::move(implementation);
}

std::string text(c10::string_view view) { return std::string(view.data(), view.size()); }

template <typename Result, typename... Args>
Result call_python(std::string_view op, Args&&... args) {
  pybind11::gil_scoped_acquire gil;
  const pybind11::object* implementation = python_ops[python_op_index(op)];
  TORCH_CHECK(implementation != nullptr, "symkernels::", op,
              ": its Python implementation is not registered (import symkernels first)");
  try {
    return (*implementation)(std::forward<Args>(args)...).template cast<Result>();
  } catch (pybind11::error_already_set& error) {
    // Raised again in the caller as the same Python exception (also across the autograd engine's threads).
    error.restore();
    python_error raised;
    raised.persist();
    throw raised;
  }
}

}  // namespace

namespace python_kernels {

SinkhornOutputs sinkhorn(at::TensorList stacks, int64_t n_iter, double tau, double tol, c10::string_view stop,
                         const std::optional<at::Tensor>& caps, c10::string_view backend) {
  return call_python<SinkhornOutputs>("sinkhorn", stacks.vec(), n_iter, tau, tol, text(stop), caps, text(backend));
}

std::vector<at::Tensor> sinkhorn_backward(at::TensorList grad_p, at::TensorList stacks, const at::Tensor& cols,
                                          const at::Tensor& domain, const at::Tensor& iterations, double tau,
                                          c10::string_view backend) {
  return call_python<std::vector<at::Tensor>>("sinkhorn_backward", grad_p.vec(), stacks.vec(), cols, domain,
                                              iterations, tau, text(backend));
}

at::Tensor expand_kernel(const at::Tensor& reps, const at::Tensor& weight, int64_t kernel_size, bool leading_identity,
                         bool channels_last, at::ScalarType dtype, c10::string_view backend) {
  // The dtype as the torch.dtype object itself (torch's pybind caster for it is not in every torch version).
  const auto torch_dtype =
      pybind11::reinterpret_borrow<pybind11::object>(reinterpret_cast<PyObject*>(torch::getTHPDtype(dtype)));
  return call_python<at::Tensor>("expand_kernel", reps, weight, kernel_size, leading_identity, channels_last,
                                 torch_dtype, text(backend));
}

std::tuple<at::Tensor, at::Tensor> expand_kernel_backward(const at::Tensor& grad, const at::Tensor& reps,
                                                          const at::Tensor& weight, int64_t kernel_size,
                                                          bool leading_identity, c10::string_view backend) {
  return call_python<std::tuple<at::Tensor, at::Tensor>>("expand_kernel_backward", grad, reps, weight, kernel_size,
                                                         leading_identity, text(backend));
}

}  // namespace python_kernels

}  // namespace symkernels

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "symkernels native kernels, called by the ops torch.ops.symkernels.*";
  m.def("build_info", &symkernels::build_info,
        "What this library was compiled with (parts, CUDA archs, torch version).");

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
  m.def(
      "set_cpu_task_threads",
      [](const std::string& choice) {
        if (choice == "adaptive") {
          symkernels::set_task_threads(symkernels::TaskThreads::kAdaptive);
        } else if (choice == "team") {
          symkernels::set_task_threads(symkernels::TaskThreads::kTeam);
        } else if (choice == "pool") {
          symkernels::set_task_threads(symkernels::TaskThreads::kPool);
        } else {
          throw py::value_error("choice must be 'adaptive', 'team' or 'pool', got '" + choice + "'");
        }
      },
      py::arg("choice"),
      "Where the CPU kernels take their helper threads: 'adaptive' (default: torch's intra-op threads until one "
      "joins late, then the library's own pool for a while, and libgomp's idle workers quieted while stalls recur), "
      "always 'team' (torch's) or always 'pool'. Overrides SYMKERNELS_CPU_THREADS.");
  m.def(
      "cpu_task_counts",
      [] {
        const symkernels::TaskCounts counts = symkernels::task_counts();
        py::dict out;
        out["inline"] = counts.inline_calls;
        out["team"] = counts.team_calls;
        out["pool"] = counts.pool_calls;
        out["team_stalls"] = counts.team_stalls;
        out["quiet_starts"] = counts.quiet_starts;
        return out;
      },
      "The CPU kernels' parallel calls since the process started, by where their tasks ran (inline: on the caller "
      "alone), the team calls that waited for a late thread, and the times libgomp's idle workers were quieted.");
  m.def(
      "trace_cpu_tasks",
      [](int64_t num_tasks, int64_t task_us, int64_t nested_tasks, int64_t fail_task) {
        symkernels::TaskTrace trace;
        {
          const py::gil_scoped_release no_gil_here;
          trace = symkernels::trace_parallel_tasks(num_tasks, task_us, nested_tasks, fail_task);
        }
        py::dict out;
        out["task_thread"] = trace.task_thread;
        out["nested_thread"] = trace.nested_thread;
        out["error"] = trace.error;
        return out;
      },
      py::arg("num_tasks"), py::arg("task_us"), py::arg("nested_tasks"), py::arg("fail_task"),
      "Test hook: one parallel call of the CPU kernels' threads over tasks that spin task_us, each running "
      "nested_tasks inner tasks, task fail_task throwing; the thread of every task and inner task, and the error.");
  m.def(
      "hold_cpu_quiet",
      [](double ms) {
        return symkernels::hold_quiet_for_test(
            std::chrono::duration_cast<std::chrono::steady_clock::duration>(std::chrono::duration<double, std::milli>(ms)));
      },
      py::arg("ms"),
      "Test hook: quiet libgomp's idle workers for ms milliseconds, as the adaptive choice does when stalls recur; "
      "False when it cannot here (torch leaves CPUs free, or no OpenMP).");
  m.def("replay_cpu_task_choices", &symkernels::replay_choices, py::arg("calls"),
        "Test hook: for calls (time in ms, the wait in microseconds a team call would see at its end), whether the "
        "adaptive choice ran each on torch's threads, and whether libgomp's idle workers are quiet after it.");
  m.def("set_python_kernel", &symkernels::set_python_kernel, py::arg("op"), py::arg("implementation"),
        "Register the Python implementation of op (sinkhorn, sinkhorn_backward, expand_kernel, "
        "expand_kernel_backward): the ops' CPU and CUDA kernels call it for the backends they do not compute.");
}
