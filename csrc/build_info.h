// What the native library was compiled with, reported by symkernels._C.build_info().
#pragma once

#include <string>

namespace symkernels {

// Whether the CPU kernels were compiled with OpenMP (without it at::parallel_for runs on one thread).
bool cpu_kernels_use_openmp();

#ifdef SYMKERNELS_WITH_CUDA
// Defined in cuda_info.cu; only referenced when the CUDA part is built, so a CPU build needs no CUDA symbol.
std::string cuda_arch_list();  // the architectures nvcc compiled for, e.g. "900" or "800,900"
int cuda_runtime_version();    // CUDART_VERSION of the toolkit, e.g. 13000
#endif

}  // namespace symkernels
