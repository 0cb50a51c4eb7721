// y = gelu(x + bias) and its backward (dx, dbias), erf and tanh forms.
//
// Geometry (shared by both directions): blockDim.x threads cover a column tile, VEC columns
// each (16-byte loads when n and the pointers allow); blockDim.y rows are processed at once and
// the grid walks rows with a stride. Each thread loads its bias values once. The backward keeps
// its dbias sums in registers and writes one partial row per (blockIdx.y, threadIdx.y), which
// column_sums then reduces in a fixed order.
#include <initializer_list>

#include "common.cuh"

namespace mpo_core {
namespace cuda {
namespace {

using detail::ceil_div;

constexpr int kBlockThreads = 256;
constexpr int kMaxTileThreads = 256;  // blockDim.x cap
constexpr int kThreadsPerSm = 2048;
constexpr float kSqrt1_2 = 0.70710678118654752440f;     // 1 / sqrt(2)
constexpr float kInvSqrt2Pi = 0.39894228040143267794f;  // 1 / sqrt(2 pi)
constexpr float kBeta = 0.79788456080286535588f;        // sqrt(2 / pi)
constexpr float kKappa = 0.044715f;

__device__ __forceinline__ float gelu(float u, bool tanh_approx) {
  if (tanh_approx) return 0.5f * u * (1.0f + tanhf(kBeta * (u + kKappa * u * u * u)));
  return 0.5f * u * (1.0f + erff(u * kSqrt1_2));
}

__device__ __forceinline__ float gelu_grad(float u, bool tanh_approx) {
  if (tanh_approx) {
    const float u2 = u * u;
    const float t = tanhf(kBeta * u * (1.0f + kKappa * u2));
    return 0.5f * (1.0f + t) + 0.5f * u * (1.0f - t * t) * kBeta * (1.0f + 3.0f * kKappa * u2);
  }
  return 0.5f * (1.0f + erff(u * kSqrt1_2)) + u * kInvSqrt2Pi * expf(-0.5f * u * u);
}

struct Geometry {
  int vec;
  dim3 block, grid;
};

Geometry plan(DType dtype, int64_t rows, int n, bool pointers_aligned) {
  const int full = 16 / detail::dtype_size(dtype);
  const int vec = pointers_aligned && n % full == 0 ? full : 1;
  const int64_t vecs = ceil_div(n, vec);
  const int64_t tiles = ceil_div(vecs, kMaxTileThreads);
  const int tx = static_cast<int>(ceil_div(ceil_div(vecs, tiles), 32) * 32);
  const int ty = kBlockThreads / tx;
  const int64_t resident = static_cast<int64_t>(sm_count()) * (kThreadsPerSm / kBlockThreads);
  int64_t row_blocks = ceil_div(rows, ty);
  const int64_t cap = resident / tiles > 1 ? resident / tiles : 1;
  if (row_blocks > cap) row_blocks = cap;
  if (row_blocks > 65535) row_blocks = 65535;
  return {vec, dim3(tx, ty), dim3(static_cast<unsigned>(tiles), static_cast<unsigned>(row_blocks))};
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    bias_gelu_forward_kernel(const T* __restrict__ x, const float* __restrict__ bias, T* __restrict__ y,
                             int64_t rows, int n, bool tanh_approx) {
  const int col = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  if (col >= n) return;
  float b[VEC];
  detail::load<float, VEC>(bias + col, b);
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < rows; row += stride) {
    float v[VEC];
    detail::load<T, VEC>(x + row * n + col, v);
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = gelu(v[j] + b[j], tanh_approx);
    detail::store<T, VEC>(y + row * n + col, v);
  }
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kBlockThreads)
    bias_gelu_backward_kernel(const T* __restrict__ dy, const T* __restrict__ x, const float* __restrict__ bias,
                              T* __restrict__ dx, float* __restrict__ partial, int64_t rows, int n,
                              bool tanh_approx) {
  const int col = (blockIdx.x * blockDim.x + threadIdx.x) * VEC;
  if (col >= n) return;
  float b[VEC], acc[VEC];
  detail::load<float, VEC>(bias + col, b);
#pragma unroll
  for (int j = 0; j < VEC; ++j) acc[j] = 0.0f;
  const int64_t stride = static_cast<int64_t>(gridDim.y) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y; row < rows; row += stride) {
    float v[VEC], g[VEC];
    detail::load<T, VEC>(x + row * n + col, v);
    detail::load<T, VEC>(dy + row * n + col, g);
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
      g[j] *= gelu_grad(v[j] + b[j], tanh_approx);
      acc[j] += g[j];
    }
    detail::store<T, VEC>(dx + row * n + col, g);
  }
  const int64_t part = static_cast<int64_t>(blockIdx.y) * blockDim.y + threadIdx.y;
  detail::store<float, VEC>(partial + part * n + col, acc);
}

bool all_aligned(std::initializer_list<const void*> ptrs) {
  for (const void* p : ptrs)
    if (!detail::aligned16(p)) return false;
  return true;
}

template <typename T>
void launch_forward(const Geometry& g, const void* x, const float* bias, void* y, int64_t rows, int n,
                    bool tanh_approx, cudaStream_t stream) {
  const T* xt = static_cast<const T*>(x);
  T* yt = static_cast<T*>(y);
  if (g.vec == 1)
    MPO_LAUNCH(g.grid, g.block, 0, stream, bias_gelu_forward_kernel<T, 1>)(xt, bias, yt, rows, n, tanh_approx);
  else
    MPO_LAUNCH(g.grid, g.block, 0, stream, bias_gelu_forward_kernel<T, 16 / sizeof(T)>)(
        xt, bias, yt, rows, n, tanh_approx);
}

template <typename T>
void launch_backward(const Geometry& g, const void* dy, const void* x, const float* bias, void* dx,
                     float* partial, int64_t rows, int n, bool tanh_approx, cudaStream_t stream) {
  const T* dyt = static_cast<const T*>(dy);
  const T* xt = static_cast<const T*>(x);
  T* dxt = static_cast<T*>(dx);
  if (g.vec == 1)
    MPO_LAUNCH(g.grid, g.block, 0, stream, bias_gelu_backward_kernel<T, 1>)(
        dyt, xt, bias, dxt, partial, rows, n, tanh_approx);
  else
    MPO_LAUNCH(g.grid, g.block, 0, stream, bias_gelu_backward_kernel<T, 16 / sizeof(T)>)(
        dyt, xt, bias, dxt, partial, rows, n, tanh_approx);
}

}  // namespace

cudaError_t bias_gelu_forward(DType dtype, const void* x, const float* bias, void* y, int64_t rows, int n,
                              bool tanh_approx, cudaStream_t stream) {
  if (n < 1 || rows < 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaSuccess;
  const Geometry g = plan(dtype, rows, n, all_aligned({x, bias, y}));
  switch (dtype) {
    case DType::kFloat32: launch_forward<float>(g, x, bias, y, rows, n, tanh_approx, stream); break;
    case DType::kFloat16: launch_forward<__half>(g, x, bias, y, rows, n, tanh_approx, stream); break;
    case DType::kBFloat16: launch_forward<__nv_bfloat16>(g, x, bias, y, rows, n, tanh_approx, stream); break;
  }
  return cudaGetLastError();
}

size_t bias_gelu_backward_workspace(DType dtype, int64_t rows, int n) {
  if (n < 1 || rows <= 0) return 0;
  // The vector width (decided by the pointers, workspace included) changes the tile shape and
  // so the number of partial rows: size for the larger of the two plans.
  const Geometry v = plan(dtype, rows, n, true);
  const Geometry s = plan(dtype, rows, n, false);
  const size_t parts_v = static_cast<size_t>(v.grid.y) * v.block.y;
  const size_t parts_s = static_cast<size_t>(s.grid.y) * s.block.y;
  return (parts_v > parts_s ? parts_v : parts_s) * static_cast<size_t>(n);
}

cudaError_t bias_gelu_backward(DType dtype, const void* dy, const void* x, const float* bias, void* dx,
                               float* dbias, float* workspace, int64_t rows, int n, bool tanh_approx,
                               cudaStream_t stream) {
  if (n < 1 || rows < 0) return cudaErrorInvalidValue;
  if (rows == 0) return cudaMemsetAsync(dbias, 0, sizeof(float) * n, stream);
  const Geometry g = plan(dtype, rows, n, all_aligned({dy, x, bias, dx, workspace}));
  switch (dtype) {
    case DType::kFloat32:
      launch_backward<float>(g, dy, x, bias, dx, workspace, rows, n, tanh_approx, stream);
      break;
    case DType::kFloat16:
      launch_backward<__half>(g, dy, x, bias, dx, workspace, rows, n, tanh_approx, stream);
      break;
    case DType::kBFloat16:
      launch_backward<__nv_bfloat16>(g, dy, x, bias, dx, workspace, rows, n, tanh_approx, stream);
      break;
  }
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) return err;
  return column_sums(workspace, static_cast<int64_t>(g.grid.y) * g.block.y, n, dbias, stream);
}

}  // namespace cuda
}  // namespace mpo_core
