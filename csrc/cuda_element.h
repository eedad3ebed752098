// The element types the CUDA kernels read and write (they compute in float, or double), shared by the host code
// that launches them and the device code; plain C++.
#pragma once

#include <cstdint>

namespace symkernels::cuda {

enum class ElementType : int32_t { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

}  // namespace symkernels::cuda
