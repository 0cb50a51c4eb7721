// Device helpers shared by the kernels: dtype conversion, vector loads/stores, reductions,
// launch planning. Plain CUDA, no torch.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "kernels.h"
#include "philox.cuh"

// Kernel launches and dynamic shared memory go through these two, so that host_emulation.h
// (tests on machines without a GPU) can stand in for them.
#ifndef MPO_CUDA_HOST_EMULATION
#define MPO_LAUNCH(grid, block, smem, stream, ...) __VA_ARGS__<<<grid, block, smem, stream>>>
#endif

namespace mpo_core {
namespace cuda {
namespace detail {

#ifdef MPO_CUDA_HOST_EMULATION
using mpo_emu::dynamic_smem;
#else
template <typename T>
__device__ __forceinline__ T* dynamic_smem() {
  extern __shared__ float4 mpo_dynamic_smem[];
  return reinterpret_cast<T*>(mpo_dynamic_smem);
}
#endif

template <typename T>
__device__ __forceinline__ float to_float(T v);
template <>
__device__ __forceinline__ float to_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ float to_float<__half>(__half v) {
  return __half2float(v);
}
template <>
__device__ __forceinline__ float to_float<__nv_bfloat16>(__nv_bfloat16 v) {
  return __bfloat162float(v);
}

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) {
  return v;
}
template <>
__device__ __forceinline__ __half from_float<__half>(float v) {
  return __float2half_rn(v);
}
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
  return __float2bfloat16_rn(v);
}

// VEC consecutive elements, moved as one (up to 16-byte) access.
template <typename T, int VEC>
struct alignas(sizeof(T) * VEC > 16 ? 16 : sizeof(T) * VEC) Pack {
  T v[VEC];
};

template <typename T, int VEC>
__device__ __forceinline__ void load(const T* __restrict__ p, float (&out)[VEC]) {
  const Pack<T, VEC> pk = *reinterpret_cast<const Pack<T, VEC>*>(p);
#pragma unroll
  for (int j = 0; j < VEC; ++j) out[j] = to_float(pk.v[j]);
}

template <typename T, int VEC>
__device__ __forceinline__ void store(T* __restrict__ p, const float (&in)[VEC]) {
  Pack<T, VEC> pk;
#pragma unroll
  for (int j = 0; j < VEC; ++j) pk.v[j] = from_float<T>(in[j]);
  *reinterpret_cast<Pack<T, VEC>*>(p) = pk;
}

// Round v to T and back (the value a stored-then-reloaded T would have).
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return to_float(from_float<T>(v));
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum of v over the threadIdx.x threads that share a row: one warp when blockDim.x == 32,
// else the whole block (the launchers then use blockDim.y == 1, so every thread of the
// block calls this the same number of times). `scratch` holds >= 32 floats.
__device__ __forceinline__ float row_sum(float v, float* scratch) {
  v = warp_sum(v);
  if (blockDim.x == 32) return v;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
  if (lane == 0) scratch[warp] = v;
  __syncthreads();
  v = lane < static_cast<int>(blockDim.x >> 5) ? scratch[lane] : 0.0f;
  v = warp_sum(v);
  __syncthreads();  // scratch is reused by the next call
  return v;
}

// Inverted dropout of VEC values whose first flat index is e0 (see LayerNormForwardArgs).
// VEC % 4 == 0 callers guarantee e0 % 4 == 0, so each Philox block serves 4 values.
template <int VEC>
__device__ __forceinline__ void dropout(float (&v)[VEC], uint64_t e0, uint64_t seed, uint64_t offset,
                                        float keep_prob, float scale) {
  if constexpr (VEC % 4 == 0) {
#pragma unroll
    for (int q = 0; q < VEC / 4; ++q) {
      const Philox4 b = dropout_block((e0 >> 2) + q, seed, offset);
      v[4 * q + 0] = unit_float(b.x) < keep_prob ? v[4 * q + 0] * scale : 0.0f;
      v[4 * q + 1] = unit_float(b.y) < keep_prob ? v[4 * q + 1] * scale : 0.0f;
      v[4 * q + 2] = unit_float(b.z) < keep_prob ? v[4 * q + 2] * scale : 0.0f;
      v[4 * q + 3] = unit_float(b.w) < keep_prob ? v[4 * q + 3] * scale : 0.0f;
    }
  } else {
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      const uint64_t e = e0 + j;
      const Philox4 b = dropout_block(e >> 2, seed, offset);
      const int lane = static_cast<int>(e & 3);
      const uint32_t bits = lane == 0 ? b.x : lane == 1 ? b.y : lane == 2 ? b.z : b.w;
      v[j] = unit_float(bits) < keep_prob ? v[j] * scale : 0.0f;
    }
  }
}

constexpr int64_t ceil_div(int64_t a, int64_t b) {
  return (a + b - 1) / b;
}

inline bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

inline int dtype_size(DType t) {
  return t == DType::kFloat32 ? 4 : 2;
}

// Host side of dropout: keep probability and scale as the kernels use them.
struct DropoutParams {
  float keep_prob, scale;
};
inline DropoutParams dropout_params(float p) {
  return {static_cast<float>(1.0 - p), p < 1.0f ? static_cast<float>(1.0 / (1.0 - p)) : 0.0f};
}

}  // namespace detail
}  // namespace cuda
}  // namespace mpo_core
