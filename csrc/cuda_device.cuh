// Device basics of the CUDA kernels: element types read and written as float, warp and lane-group reductions, the
// dynamic shared memory, and the thread-block cluster of Hopper (one CTA per cluster elsewhere). Free of ATen, so
// a .cu that includes it compiles in seconds.
//
// Kernels use only what this header and the CUDA built-ins it names provide. Defined SYMKERNELS_CUDA_EMULATION
// compiles them for the host instead, with an emulation header (included before this one) standing in for the
// CUDA built-ins and for the namespace `emulation` used below.
#pragma once

#include <cstdint>

#include "cuda_element.h"

#ifndef SYMKERNELS_CUDA_EMULATION
#include <cooperative_groups.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>
#endif

#define SK_DEVICE __device__ __forceinline__

#ifdef SYMKERNELS_CUDA_EMULATION
#include <cmath>
#include <cstring>
#endif

namespace symkernels::cuda {

constexpr unsigned kFullMask = 0xffffffffu;
constexpr int kWarpSize = 32;

SK_DEVICE float load_element(const void* base, int64_t index, ElementType type) {
  switch (type) {
    case ElementType::kFloat16:
      return __half2float(static_cast<const __half*>(base)[index]);
    case ElementType::kBFloat16:
      return __bfloat162float(static_cast<const __nv_bfloat16*>(base)[index]);
    default:
      return static_cast<const float*>(base)[index];
  }
}

SK_DEVICE void store_element(void* base, int64_t index, float value, ElementType type) {
  switch (type) {
    case ElementType::kFloat16:
      static_cast<__half*>(base)[index] = __float2half_rn(value);
      break;
    case ElementType::kBFloat16:
      static_cast<__nv_bfloat16*>(base)[index] = __float2bfloat16_rn(value);
      break;
    default:
      static_cast<float*>(base)[index] = value;
  }
}

// The float whose bits are `bits`.
SK_DEVICE float float_from_bits(int bits) {
#ifdef SYMKERNELS_CUDA_EMULATION
  float value;
  std::memcpy(&value, &bits, sizeof(value));
  return value;
#else
  return __int_as_float(bits);
#endif
}

// exp(x) in float32 within 1.5 ulps over the whole float range (NaN stays NaN, overflow gives inf, underflow 0),
// from correctly rounded fmas and multiplications only, so that it rounds the same way on the GPU as where the
// kernels are emulated. CUDA's expf is up to 2 ulps off (ex2.approx after its reduction), and the log domain's
// entries exp(L0 + f + g) carry that into the gradients past the accuracy bound (tests/ops/test_cuda_emulation.py
// emulates it). x = k ln2 + r (|r| <= ln2 / 2), e^r by its Taylor polynomial of degree 7 (truncation below half an
// ulp), 2^k from its bits in two halves (subnormal results and overflow need no special case); the same as the
// Triton kernels' precise_exp.
SK_DEVICE float precise_expf(float x) {
  const float c = fminf(fmaxf(x, -104.f), 89.f);  // exp(-104) rounds to 0, exp(89) to inf; fmaxf drops NaN
  const float k = floorf(fmaf(c, 1.4426950408889634f, 0.5f));  // round(c log2 e), in [-150, 128]
  // ln 2 = 0.693145751953125 + 1.428606765330187e-06, the first part exact in k times it for |k| < 2^8.
  const float r = fmaf(-k, 1.428606765330187e-06f, fmaf(-k, 0.693145751953125f, c));
  float p = fmaf(r, 1.f / 40320.f, 1.f / 5040.f);
  p = fmaf(r, p, 1.f / 720.f);
  p = fmaf(r, p, 1.f / 120.f);
  p = fmaf(r, p, 1.f / 24.f);
  p = fmaf(r, p, 1.f / 6.f);
  p = fmaf(r, p, 0.5f);
  p = fmaf(r, p, 1.f);
  p = fmaf(r, p, 1.f);
  const int whole = static_cast<int>(k);
  const int half = whole >> 1;
  const float scaled = p * float_from_bits((half + 127) << 23) * float_from_bits((whole - half + 127) << 23);
  return x == x ? scaled : x;
}

// ---------------------------------------------------------------------------------------------------------------
// Reductions over aligned groups of S lanes (S a power of two <= 32) by xor butterflies: every lane of a group gets
// the same bits (each stage adds two equal partial sums in either order, and float addition is commutative). Every
// lane of the warp must call them.

template <int S, typename T>
SK_DEVICE T group_sum(T v) {
#pragma unroll
  for (int offset = S / 2; offset >= 1; offset /= 2) v += __shfl_xor_sync(kFullMask, v, offset);
  return v;
}

template <int S, typename T>
SK_DEVICE T group_max(T v) {
#pragma unroll
  for (int offset = S / 2; offset >= 1; offset /= 2) {
    const T other = __shfl_xor_sync(kFullMask, v, offset);
    v = other > v ? other : v;  // NaN is dropped here; sums carry it
  }
  return v;
}

template <int S>
SK_DEVICE bool group_any(bool v) {
  int x = v ? 1 : 0;
#pragma unroll
  for (int offset = S / 2; offset >= 1; offset /= 2) x |= __shfl_xor_sync(kFullMask, x, offset);
  return x != 0;
}

template <int S>
SK_DEVICE bool group_all(bool v) {
  return !group_any<S>(!v);
}

template <typename T>
SK_DEVICE T warp_sum(T v) {
  return group_sum<kWarpSize>(v);
}

template <typename T>
SK_DEVICE T warp_max(T v) {
  return group_max<kWarpSize>(v);
}

SK_DEVICE int lane_id() {
  return static_cast<int>(threadIdx.x) % kWarpSize;
}

SK_DEVICE int warp_id() {
  return static_cast<int>(threadIdx.x) / kWarpSize;
}

// The dynamic shared memory of the block, 16-byte aligned.
SK_DEVICE unsigned char* dynamic_shared_memory() {
#ifdef SYMKERNELS_CUDA_EMULATION
  return emulation::dynamic_shared_memory();
#else
  extern __shared__ __align__(16) unsigned char shared_bytes[];
  return shared_bytes;
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Thread-block clusters (sm_90): the CTAs of a cluster exchange partial sums through distributed shared memory.
// Launched without a cluster, or compiled for an older architecture, a CTA is a cluster of one.

SK_DEVICE int cluster_rank() {
#if defined(SYMKERNELS_CUDA_EMULATION)
  return emulation::cluster_rank();
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return static_cast<int>(cooperative_groups::this_cluster().block_rank());
#else
  return 0;
#endif
}

// A barrier of every thread of the cluster that orders their memory accesses (shared, distributed shared and
// global), or __syncthreads for a cluster of one.
SK_DEVICE void cluster_sync(int cluster_size) {
#if defined(SYMKERNELS_CUDA_EMULATION)
  if (cluster_size > 1) {
    emulation::cluster_sync();
  } else {
    __syncthreads();
  }
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  if (cluster_size > 1) {
    cooperative_groups::this_cluster().sync();
  } else {
    __syncthreads();
  }
#else
  (void)cluster_size;
  __syncthreads();
#endif
}

// The address of `local` (in this CTA's shared memory) in the shared memory of the cluster's CTA `rank`.
template <typename T>
SK_DEVICE T* cluster_peer(T* local, int rank) {
#if defined(SYMKERNELS_CUDA_EMULATION)
  return emulation::cluster_peer(local, rank);
#elif defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 900
  return cooperative_groups::this_cluster().map_shared_rank(local, rank);
#else
  (void)rank;
  return local;
#endif
}

}  // namespace symkernels::cuda
