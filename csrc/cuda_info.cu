// Build facts only nvcc knows. Kept apart from the kernels and free of ATen headers so it compiles in seconds.
#include <cuda_runtime_api.h>

#include <string>

#include "build_info.h"

#define SYMKERNELS_STRINGIFY_(...) #__VA_ARGS__
#define SYMKERNELS_STRINGIFY(...) SYMKERNELS_STRINGIFY_(__VA_ARGS__)

namespace symkernels {

std::string cuda_arch_list() {
#ifdef __CUDA_ARCH_LIST__
  // nvcc defines this in every compilation pass as the list of real architectures it compiles for.
  return SYMKERNELS_STRINGIFY(__CUDA_ARCH_LIST__);
#else
  return "";
#endif
}

int cuda_runtime_version() { return CUDART_VERSION; }

}  // namespace symkernels
