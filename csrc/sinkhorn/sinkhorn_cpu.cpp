// What the CPU kernels of the Sinkhorn ops were built with and run on: OpenMP (for the build record) and the
// widest instruction set of this CPU that the per-matrix code was compiled for (see sinkhorn_cpu.h), or a
// narrower one that SYMKERNELS_CPU_ISA asks for.
#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "build_info.h"
#include "sinkhorn/sinkhorn_cpu.h"

namespace symkernels {

bool cpu_kernels_use_openmp() {
#ifdef _OPENMP
  return true;
#else
  return false;
#endif
}

namespace sinkhorn_detail {

CpuIsa cpu_isa() {
#if SYMKERNELS_SINKHORN_AVX2
  static const CpuIsa isa = [] {
    __builtin_cpu_init();
    const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
    // Every feature the AVX-512 build's target attribute names (sinkhorn_cpu.h).
    const bool avx512 = avx2 && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512dq") &&
                        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512bw");
    const CpuIsa widest = avx512 ? CpuIsa::kAvx512 : (avx2 ? CpuIsa::kAvx2 : CpuIsa::kBaseline);
    // SYMKERNELS_CPU_ISA=baseline|avx2 runs the narrower builds on a wider CPU (their tests); never wider.
    const char* cap = std::getenv("SYMKERNELS_CPU_ISA");
    if (cap != nullptr && std::strcmp(cap, "baseline") == 0) return CpuIsa::kBaseline;
    if (cap != nullptr && std::strcmp(cap, "avx2") == 0) return std::min(widest, CpuIsa::kAvx2);
    return widest;
  }();
  return isa;
#else
  return CpuIsa::kBaseline;
#endif
}

}  // namespace sinkhorn_detail
}  // namespace symkernels
