// (Residual + dropout +) LayerNorm, forward and backward.
//
// Geometry: a row is owned by `threads_per_row` threads (threadIdx.x), each holding up to
// kElemsPerThread of its values in registers, loaded VEC at a time (16-byte loads when n and
// the pointers allow). Rows of up to 32 * kElemsPerThread elements take one warp each (4 rows
// per block, warp-shuffle reductions only); longer rows take a whole block (blockDim.y == 1,
// shared-memory reduction across warps). The backward runs a persistent grid: each row group
// walks rows with a stride, accumulating dgamma/dbeta for its columns in registers; each block
// then writes one partial row, and column_sums adds the partials in a fixed order.
#include "common.cuh"

namespace mpo_core {
namespace cuda {
namespace {

using detail::ceil_div;

constexpr int kElemsPerThread = 16;
constexpr int kMaxThreads = kMaxLayerNormHidden / kElemsPerThread;  // 512
constexpr int kRowsPerWarpBlock = 4;
constexpr int kThreadsPerSm = 2048;  // resident threads per SM on sm_80/sm_90 (sm_75: 1024)

struct Geometry {
  int vec;              // elements per load
  int threads_per_row;  // blockDim.x
  int rows_per_block;   // blockDim.y
};

Geometry plan(DType dtype, int n, bool pointers_aligned) {
  const int full = 16 / detail::dtype_size(dtype);
  const int vec = pointers_aligned && n % full == 0 ? full : 1;
  const int64_t threads_needed = ceil_div(ceil_div(n, vec), kElemsPerThread / vec);
  const int threads = static_cast<int>(ceil_div(threads_needed, 32) * 32);
  return {vec, threads, threads == 32 ? kRowsPerWarpBlock : 1};
}

template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    layernorm_forward_kernel(LayerNormForwardArgs a, float keep_prob, float scale) {
  constexpr int CHUNKS = kElemsPerThread / VEC;
  __shared__ float scratch[32];
  const int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y;
  if (row >= a.rows) return;  // whole row groups only (see row_sum)
  const int n = a.n;
  const int64_t base = row * n;
  const T* x = static_cast<const T*>(a.x) + base;
  const T* r = a.r != nullptr ? static_cast<const T*>(a.r) + base : nullptr;
  T* h = a.h != nullptr ? static_cast<T*>(a.h) + base : nullptr;
  const bool drop = r != nullptr && a.dropout_p > 0.0f;

  float v[CHUNKS][VEC];
  float sum = 0.0f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = (threadIdx.x + c * blockDim.x) * VEC;
    if (col < n) {
      detail::load<T, VEC>(x + col, v[c]);
      if (r != nullptr) {
        float rv[VEC];
        detail::load<T, VEC>(r + col, rv);
        if (drop) detail::dropout<VEC>(rv, base + col, a.seed, a.offset, keep_prob, scale);
#pragma unroll
        for (int j = 0; j < VEC; ++j) v[c][j] = detail::round_to<T>(v[c][j] + rv[j]);
        if (h != nullptr) detail::store<T, VEC>(h + col, v[c]);
      }
#pragma unroll
      for (int j = 0; j < VEC; ++j) sum += v[c][j];
    }
  }
  const float inv_n = 1.0f / static_cast<float>(n);
  const float mean = detail::row_sum(sum, scratch) * inv_n;
  float sq = 0.0f;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = (threadIdx.x + c * blockDim.x) * VEC;
    if (col < n) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        const float d = v[c][j] - mean;
        sq += d * d;
      }
    }
  }
  const float rstd = rsqrtf(detail::row_sum(sq, scratch) * inv_n + a.eps);
  if (threadIdx.x == 0) {
    a.mean[row] = mean;
    a.rstd[row] = rstd;
  }
  T* y = static_cast<T*>(a.y) + base;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = (threadIdx.x + c * blockDim.x) * VEC;
    if (col < n) {
      float out[VEC], g[VEC], b[VEC];
      if (a.gamma != nullptr) detail::load<float, VEC>(a.gamma + col, g);
      if (a.beta != nullptr) detail::load<float, VEC>(a.beta + col, b);
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        out[j] = (v[c][j] - mean) * rstd;
        if (a.gamma != nullptr) out[j] *= g[j];
        if (a.beta != nullptr) out[j] += b[j];
      }
      detail::store<T, VEC>(y + col, out);
    }
  }
}

// dh = rstd * (g - (sum(g) + xhat * sum(g * xhat)) / n), g = dy * gamma, xhat = (h - mean) * rstd.
template <typename T, int VEC>
__global__ void __launch_bounds__(kMaxThreads)
    layernorm_backward_kernel(LayerNormBackwardArgs a, float keep_prob, float scale) {
  constexpr int CHUNKS = kElemsPerThread / VEC;
  float* partial_smem = detail::dynamic_smem<float>();  // 2 x blockDim.y x n floats when blockDim.y > 1
  __shared__ float scratch[32];
  const int n = a.n;
  const bool affine = a.gamma != nullptr;
  const float inv_n = 1.0f / static_cast<float>(n);
  float dgamma[CHUNKS][VEC], dbeta[CHUNKS][VEC];
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c)
#pragma unroll
    for (int j = 0; j < VEC; ++j) dgamma[c][j] = dbeta[c][j] = 0.0f;

  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.y;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < a.rows;
       row += stride) {
    const int64_t base = row * n;
    const T* dy = static_cast<const T*>(a.dy) + base;
    const T* h = static_cast<const T*>(a.h) + base;
    const float mean = a.mean[row], rstd = a.rstd[row];
    float xhat[CHUNKS][VEC], g[CHUNKS][VEC];
    float sum_g = 0.0f, sum_gx = 0.0f;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int col = (threadIdx.x + c * blockDim.x) * VEC;
      if (col < n) {
        float gam[VEC];
        detail::load<T, VEC>(dy + col, g[c]);
        detail::load<T, VEC>(h + col, xhat[c]);
        if (affine) detail::load<float, VEC>(a.gamma + col, gam);
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
          xhat[c][j] = (xhat[c][j] - mean) * rstd;
          if (affine) {
            dgamma[c][j] += g[c][j] * xhat[c][j];
            dbeta[c][j] += g[c][j];
            g[c][j] *= gam[j];
          }
          sum_g += g[c][j];
          sum_gx += g[c][j] * xhat[c][j];
        }
      }
    }
    sum_g = detail::row_sum(sum_g, scratch);
    sum_gx = detail::row_sum(sum_gx, scratch);
    T* dh = static_cast<T*>(a.dh) + base;
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int col = (threadIdx.x + c * blockDim.x) * VEC;
      if (col < n) {
        float out[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] = rstd * (g[c][j] - (sum_g + xhat[c][j] * sum_gx) * inv_n);
        detail::store<T, VEC>(dh + col, out);
        if (a.dr != nullptr) {
          if (a.dropout_p > 0.0f) detail::dropout<VEC>(out, base + col, a.seed, a.offset, keep_prob, scale);
          detail::store<T, VEC>(static_cast<T*>(a.dr) + base + col, out);
        }
      }
    }
  }
  if (!affine) return;

  // One partial row per block: workspace = [dgamma partials (gridDim.x x n), dbeta partials].
  float* ws_gamma = a.workspace + static_cast<int64_t>(blockIdx.x) * n;
  float* ws_beta = a.workspace + (static_cast<int64_t>(gridDim.x) + blockIdx.x) * n;
  if (blockDim.y == 1) {
#pragma unroll
    for (int c = 0; c < CHUNKS; ++c) {
      const int col = (threadIdx.x + c * blockDim.x) * VEC;
      if (col < n) {
        detail::store<float, VEC>(ws_gamma + col, dgamma[c]);
        detail::store<float, VEC>(ws_beta + col, dbeta[c]);
      }
    }
    return;
  }
  float* sm_gamma = partial_smem + threadIdx.y * n;
  float* sm_beta = partial_smem + (blockDim.y + threadIdx.y) * n;
#pragma unroll
  for (int c = 0; c < CHUNKS; ++c) {
    const int col = (threadIdx.x + c * blockDim.x) * VEC;
    if (col < n) {
#pragma unroll
      for (int j = 0; j < VEC; ++j) {
        sm_gamma[col + j] = dgamma[c][j];
        sm_beta[col + j] = dbeta[c][j];
      }
    }
  }
  __syncthreads();
  for (int col = threadIdx.y * blockDim.x + threadIdx.x; col < n; col += blockDim.x * blockDim.y) {
    float sg = 0.0f, sb = 0.0f;
    for (int y = 0; y < static_cast<int>(blockDim.y); ++y) {
      sg += partial_smem[y * n + col];
      sb += partial_smem[(blockDim.y + y) * n + col];
    }
    ws_gamma[col] = sg;
    ws_beta[col] = sb;
  }
}

template <typename T>
cudaError_t launch_forward(const LayerNormForwardArgs& a, const Geometry& geo, cudaStream_t stream) {
  const detail::DropoutParams dp = detail::dropout_params(a.dropout_p);
  const dim3 block(geo.threads_per_row, geo.rows_per_block);
  const int64_t blocks = ceil_div(a.rows, geo.rows_per_block);
  if (blocks > 0x7fffffff) return cudaErrorInvalidConfiguration;
  const dim3 grid(static_cast<unsigned>(blocks));
  if (geo.vec == 1)
    MPO_LAUNCH(grid, block, 0, stream, layernorm_forward_kernel<T, 1>)(a, dp.keep_prob, dp.scale);
  else
    MPO_LAUNCH(grid, block, 0, stream, layernorm_forward_kernel<T, 16 / sizeof(T)>)(a, dp.keep_prob, dp.scale);
  return cudaGetLastError();
}

bool forward_aligned(const LayerNormForwardArgs& a) {
  const void* ptrs[] = {a.x, a.r, a.gamma, a.beta, a.y, a.h};
  for (const void* p : ptrs)
    if (p != nullptr && !detail::aligned16(p)) return false;
  return true;
}

bool backward_aligned(const LayerNormBackwardArgs& a) {
  const void* ptrs[] = {a.dy, a.h, a.gamma, a.dh, a.dr};
  for (const void* p : ptrs)
    if (p != nullptr && !detail::aligned16(p)) return false;
  return true;
}

// Persistent blocks of the backward, and the dynamic shared memory each needs.
struct BackwardLaunch {
  Geometry geo;
  int blocks;
  size_t smem_bytes;
};

BackwardLaunch plan_backward(DType dtype, const LayerNormBackwardArgs& a) {
  const Geometry geo = plan(dtype, a.n, backward_aligned(a));
  const int threads = geo.threads_per_row * geo.rows_per_block;
  // One wave of resident blocks (more would only add partial rows to reduce).
  const int64_t resident = static_cast<int64_t>(sm_count()) * (kThreadsPerSm / threads);
  const int64_t needed = ceil_div(a.rows, geo.rows_per_block);
  const int blocks = static_cast<int>(needed < resident ? needed : resident);
  const size_t smem = geo.rows_per_block > 1 && a.gamma != nullptr
                          ? 2 * sizeof(float) * geo.rows_per_block * static_cast<size_t>(a.n)
                          : 0;
  return {geo, blocks, smem};
}

template <typename T>
cudaError_t launch_backward(const LayerNormBackwardArgs& a, const BackwardLaunch& l, cudaStream_t stream) {
  const detail::DropoutParams dp = detail::dropout_params(a.dropout_p);
  const dim3 block(l.geo.threads_per_row, l.geo.rows_per_block);
  if (l.geo.vec == 1)
    MPO_LAUNCH(l.blocks, block, l.smem_bytes, stream, layernorm_backward_kernel<T, 1>)(a, dp.keep_prob, dp.scale);
  else
    MPO_LAUNCH(l.blocks, block, l.smem_bytes, stream, layernorm_backward_kernel<T, 16 / sizeof(T)>)(
        a, dp.keep_prob, dp.scale);
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess || a.gamma == nullptr) return err;
  err = column_sums(a.workspace, l.blocks, a.n, a.dgamma, stream);
  if (err != cudaSuccess) return err;
  return column_sums(a.workspace + static_cast<int64_t>(l.blocks) * a.n, l.blocks, a.n, a.dbeta, stream);
}

}  // namespace

cudaError_t layernorm_forward(DType dtype, const LayerNormForwardArgs& a, cudaStream_t stream) {
  if (a.n < 1 || a.n > kMaxLayerNormHidden || a.rows < 0) return cudaErrorInvalidValue;
  if (a.rows == 0) return cudaSuccess;
  const Geometry geo = plan(dtype, a.n, forward_aligned(a));
  switch (dtype) {
    case DType::kFloat32: return launch_forward<float>(a, geo, stream);
    case DType::kFloat16: return launch_forward<__half>(a, geo, stream);
    case DType::kBFloat16: return launch_forward<__nv_bfloat16>(a, geo, stream);
  }
  return cudaErrorInvalidValue;
}

size_t layernorm_backward_workspace(DType dtype, const LayerNormBackwardArgs& a) {
  if (a.gamma == nullptr || a.rows <= 0 || a.n < 1) return 0;
  return 2 * static_cast<size_t>(plan_backward(dtype, a).blocks) * static_cast<size_t>(a.n);
}

cudaError_t layernorm_backward(DType dtype, const LayerNormBackwardArgs& a, cudaStream_t stream) {
  if (a.n < 1 || a.n > kMaxLayerNormHidden || a.rows < 0) return cudaErrorInvalidValue;
  if (a.rows == 0) {
    if (a.gamma == nullptr) return cudaSuccess;
    const cudaError_t err = cudaMemsetAsync(a.dgamma, 0, sizeof(float) * a.n, stream);
    return err != cudaSuccess ? err : cudaMemsetAsync(a.dbeta, 0, sizeof(float) * a.n, stream);
  }
  const BackwardLaunch l = plan_backward(dtype, a);
  switch (dtype) {
    case DType::kFloat32: return launch_backward<float>(a, l, stream);
    case DType::kFloat16: return launch_backward<__half>(a, l, stream);
    case DType::kBFloat16: return launch_backward<__nv_bfloat16>(a, l, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace cuda
}  // namespace mpo_core
