// Launchers of the CUDA kernels in csrc/cuda/*.cu, written against plain pointers.
//
// No torch headers here or in the .cu files: they compile standalone with `nvcc -c`
// (scripts/nvcc_check.py). The torch-facing glue (glue.cpp) validates tensors, allocates
// outputs and workspaces, and calls these on the current stream. Every launcher returns the
// launch's cudaError_t (cudaSuccess when there was nothing to do).
//
// Conventions: activations are `dtype` (float32, float16 or bfloat16), row-major, contiguous,
// `rows` x `n`; LayerNorm/GELU parameters (gamma, beta, bias) and their gradients are float32;
// all arithmetic accumulates in float32. 16-byte vector loads are used when n and every
// pointer allow it, scalar loads otherwise. Gradient reductions over rows go through
// per-block partial sums in a workspace and a column-sum kernel: no atomics, deterministic.
#pragma once

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

namespace mpo_core {
namespace cuda {

enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

// Largest normalized size of the LayerNorm kernels (each row lives in registers).
constexpr int kMaxLayerNormHidden = 8192;

// y = LayerNorm(x + dropout(r)) over rows of length n.
// Dropout (applied to r only, when r != nullptr and dropout_p > 0) keeps flat element e with
// probability 1 - p and scales it by 1 / (1 - p): keep iff
//   (philox4x32_10(counter = {e/4 lo, e/4 hi, offset lo, offset hi}, key = {seed lo, seed hi})[e % 4]
//    >> 8) * 2^-24  <  float(1 - p)
// (see philox.cuh), so the backward recomputes the mask instead of storing it.
struct LayerNormForwardArgs {
  const void* x = nullptr;      // rows x n
  const void* r = nullptr;      // rows x n, or nullptr (plain LayerNorm)
  const float* gamma = nullptr;  // n, or nullptr (no scale)
  const float* beta = nullptr;   // n, or nullptr (no shift)
  void* y = nullptr;            // rows x n
  void* h = nullptr;            // rows x n: x + dropout(r) in dtype; nullptr: not written
  float* mean = nullptr;        // rows
  float* rstd = nullptr;        // rows
  int64_t rows = 0;
  int n = 0;                    // 1 <= n <= kMaxLayerNormHidden
  float eps = 1e-5f;
  float dropout_p = 0.0f;       // in [0, 1]
  uint64_t seed = 0;
  uint64_t offset = 0;
};
cudaError_t layernorm_forward(DType dtype, const LayerNormForwardArgs& args, cudaStream_t stream);

// Gradients of layernorm_forward: dh (the gradient of x and of the dropped-out r's sum h),
// dr = dh * mask / (1 - p) when dr != nullptr, and dgamma/dbeta when gamma != nullptr.
struct LayerNormBackwardArgs {
  const void* dy = nullptr;      // rows x n
  const void* h = nullptr;       // rows x n (the forward's h, or x when it had no r)
  const float* gamma = nullptr;  // n, or nullptr
  const float* mean = nullptr;   // rows
  const float* rstd = nullptr;   // rows
  void* dh = nullptr;            // rows x n
  void* dr = nullptr;            // rows x n, or nullptr
  float* dgamma = nullptr;       // n (written iff gamma != nullptr)
  float* dbeta = nullptr;        // n (written iff gamma != nullptr)
  float* workspace = nullptr;    // layernorm_backward_workspace(...) floats
  int64_t rows = 0;
  int n = 0;
  float dropout_p = 0.0f;
  uint64_t seed = 0;
  uint64_t offset = 0;
};
// Floats of workspace layernorm_backward needs for these arguments on the current device.
size_t layernorm_backward_workspace(DType dtype, const LayerNormBackwardArgs& args);
cudaError_t layernorm_backward(DType dtype, const LayerNormBackwardArgs& args, cudaStream_t stream);

// y = gelu(x + bias) with bias (n, float32) broadcast over rows; tanh_approx picks
// 0.5 u (1 + tanh(sqrt(2/pi) (u + 0.044715 u^3))) over 0.5 u (1 + erf(u / sqrt(2))).
cudaError_t bias_gelu_forward(DType dtype, const void* x, const float* bias, void* y, int64_t rows,
                              int n, bool tanh_approx, cudaStream_t stream);
// dx = dy * gelu'(x + bias), dbias = sum over rows of dx (float32, before rounding dx).
size_t bias_gelu_backward_workspace(DType dtype, int64_t rows, int n);
cudaError_t bias_gelu_backward(DType dtype, const void* dy, const void* x, const float* bias,
                               void* dx, float* dbias, float* workspace, int64_t rows, int n,
                               bool tanh_approx, cudaStream_t stream);

// out[j] = sum_{p < parts} in[p * n + j] (float32, fixed order per column).
cudaError_t column_sums(const float* in, int64_t parts, int n, float* out, cudaStream_t stream);

// Streaming multiprocessors of the current device (cached per device).
int sm_count();

}  // namespace cuda
}  // namespace mpo_core
