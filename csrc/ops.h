// Torch-facing declarations of the ops in mpo_core._C.
//
// CPU ops (always built) live in residual_layernorm_cpu.cpp, argument checks shared
// by the CPU and CUDA paths in checks.cpp, CUDA ops (built only with
// MPO_CORE_WITH_CUDA) in cuda/glue.cpp, and the Python bindings in bindings.cpp.
#pragma once

#include <torch/extension.h>

#include <optional>
#include <tuple>

namespace mpo_core {

using at::Tensor;
using OptTensor = std::optional<Tensor>;

// ---- argument checks (checks.cpp) -------------------------------------------------
// Each raises ValueError (shape, device, value) or TypeError (dtype) naming the argument.

// x: (..., n) floating; residual: like x or None; weight/bias: (n,) of x's dtype or of the
// accumulation dtype, or None; eps: finite and >= 0. `op` names the caller in messages.
void check_layernorm_forward_args(const char* op, const Tensor& x, const OptTensor& residual,
                                  const OptTensor& weight, const OptTensor& bias, double eps);
// dy, h: same shape and dtype; weight as above; mean, rstd: (rows,) of the accumulation dtype.
void check_layernorm_backward_args(const char* op, const Tensor& dy, const Tensor& h,
                                   const OptTensor& weight, const Tensor& mean, const Tensor& rstd);
// Accumulation dtype for an input dtype: float64 for float64, float32 otherwise.
at::ScalarType accumulation_dtype(at::ScalarType t);
// "torch.float32" style name of a dtype, for error messages.
std::string dtype_name(at::ScalarType t);

// ---- CPU (residual_layernorm_cpu.cpp) ----------------------------------------------
// y = LayerNorm(x + residual) over the last dim. Returns (y, h, mean, rstd) with h = x + residual
// (h is x itself when residual is None).
std::tuple<Tensor, Tensor, Tensor, Tensor> residual_layernorm_forward_cpu(
    const Tensor& x, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    double eps);
// Returns (dh, dweight, dbias); dweight/dbias are None when weight is None.
std::tuple<Tensor, OptTensor, OptTensor> residual_layernorm_backward_cpu(
    const Tensor& dy, const Tensor& h, const OptTensor& weight, const Tensor& mean,
    const Tensor& rstd);

#ifdef MPO_CORE_WITH_CUDA
// ---- CUDA (cuda/glue.cpp) ------------------------------------------------------------
// Same contracts as the CPU ops, for CUDA tensors (float32 / bfloat16 / float16).
std::tuple<Tensor, Tensor, Tensor, Tensor> residual_layernorm_forward_cuda(
    const Tensor& x, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    double eps);
std::tuple<Tensor, OptTensor, OptTensor> residual_layernorm_backward_cuda(
    const Tensor& dy, const Tensor& h, const OptTensor& weight, const Tensor& mean,
    const Tensor& rstd);
// y = LayerNorm(x + dropout(r, p)); the mask is a function of (seed, offset, element index).
std::tuple<Tensor, Tensor, Tensor, Tensor> residual_dropout_layernorm_forward_cuda(
    const Tensor& x, const Tensor& r, const OptTensor& weight, const OptTensor& bias, double p,
    int64_t seed, int64_t offset, double eps);
// Returns (dx, dr, dweight, dbias), recomputing the dropout mask from (seed, offset).
std::tuple<Tensor, Tensor, OptTensor, OptTensor> residual_dropout_layernorm_backward_cuda(
    const Tensor& dy, const Tensor& h, const OptTensor& weight, const Tensor& mean,
    const Tensor& rstd, double p, int64_t seed, int64_t offset);
// y = gelu(x + bias), approximate in {"none", "tanh"}.
Tensor bias_gelu_forward_cuda(const Tensor& x, const Tensor& bias, const std::string& approximate);
// Returns (dx, dbias).
std::tuple<Tensor, Tensor> bias_gelu_backward_cuda(const Tensor& dy, const Tensor& x,
                                                   const Tensor& bias,
                                                   const std::string& approximate);
#endif

}  // namespace mpo_core
