// Python bindings of mpo_core._C: device dispatch for the LayerNorm ops, CUDA-only ops
// when built with MPO_CORE_WITH_CUDA.
#include "ops.h"

namespace mpo_core {
namespace {

#ifdef MPO_CORE_WITH_CUDA
constexpr bool kWithCuda = true;

void require_cuda(const char* op, const Tensor& t) {
  TORCH_CHECK_VALUE(t.is_cuda(), op, " is a CUDA-only kernel: got a tensor on ", t.device(),
                    "; use the torch reference path (mpo_core.ops) on this device");
}
#else
constexpr bool kWithCuda = false;
#endif

void require_cpu_or_cuda(const char* op, const Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu() || (kWithCuda && t.is_cuda()), op,
                    ": tensors must be on the CPU", kWithCuda ? " or a CUDA device" : "",
                    " (this build of mpo_core._C ", kWithCuda ? "has" : "has no", " CUDA kernels)",
                    ", got ", t.device());
}

std::tuple<Tensor, Tensor, Tensor, Tensor> residual_layernorm_forward(
    const Tensor& x, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    double eps) {
  require_cpu_or_cuda("residual_layernorm_forward", x);
#ifdef MPO_CORE_WITH_CUDA
  if (x.is_cuda()) return residual_layernorm_forward_cuda(x, residual, weight, bias, eps);
#endif
  return residual_layernorm_forward_cpu(x, residual, weight, bias, eps);
}

std::tuple<Tensor, OptTensor, OptTensor> residual_layernorm_backward(
    const Tensor& dy, const Tensor& h, const OptTensor& weight, const Tensor& mean,
    const Tensor& rstd) {
  require_cpu_or_cuda("residual_layernorm_backward", h);
#ifdef MPO_CORE_WITH_CUDA
  if (h.is_cuda()) return residual_layernorm_backward_cuda(dy, h, weight, mean, rstd);
#endif
  return residual_layernorm_backward_cpu(dy, h, weight, mean, rstd);
}

}  // namespace
}  // namespace mpo_core

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace mpo_core;
  m.doc() = "mpo-core compiled kernels: fused residual + LayerNorm (CPU, CUDA), CUDA bias+GELU "
            "and residual+dropout+LayerNorm";
  m.attr("WITH_CUDA") = py::bool_(kWithCuda);
  m.def("residual_layernorm_forward", &residual_layernorm_forward, py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("eps"),
        "y = layer_norm(x + residual) over the last dim -> (y, h, mean, rstd), h = x + residual. "
        "residual, weight and bias may be None; mean/rstd have shape (rows,) and dtype float32 "
        "(float64 for float64 input).");
  m.def("residual_layernorm_backward", &residual_layernorm_backward, py::arg("dy"), py::arg("h"),
        py::arg("weight"), py::arg("mean"), py::arg("rstd"),
        "Gradients of residual_layernorm_forward -> (dh, dweight, dbias); dweight and dbias are "
        "None when weight is None. dh is the gradient of both x and residual.");
#ifdef MPO_CORE_WITH_CUDA
  m.def(
      "bias_gelu_forward",
      [](const Tensor& x, const Tensor& bias, const std::string& approximate) {
        require_cuda("bias_gelu_forward", x);
        return bias_gelu_forward_cuda(x, bias, approximate);
      },
      py::arg("x"), py::arg("bias"), py::arg("approximate") = "none",
      "y = gelu(x + bias) on CUDA; approximate is 'none' (erf) or 'tanh'.");
  m.def(
      "bias_gelu_backward",
      [](const Tensor& dy, const Tensor& x, const Tensor& bias, const std::string& approximate) {
        require_cuda("bias_gelu_backward", x);
        return bias_gelu_backward_cuda(dy, x, bias, approximate);
      },
      py::arg("dy"), py::arg("x"), py::arg("bias"), py::arg("approximate") = "none",
      "Gradients of bias_gelu_forward on CUDA -> (dx, dbias).");
  m.def(
      "residual_dropout_layernorm_forward",
      [](const Tensor& x, const Tensor& r, const OptTensor& weight, const OptTensor& bias,
         double p, int64_t seed, int64_t offset, double eps) {
        require_cuda("residual_dropout_layernorm_forward", x);
        return residual_dropout_layernorm_forward_cuda(x, r, weight, bias, p, seed, offset, eps);
      },
      py::arg("x"), py::arg("r"), py::arg("weight"), py::arg("bias"), py::arg("p"),
      py::arg("seed"), py::arg("offset"), py::arg("eps"),
      "y = layer_norm(x + dropout(r, p)) on CUDA -> (y, h, mean, rstd). The mask of element e "
      "(flat index) is Philox4x32-10(key=seed, counter=(e // 4, offset))[e % 4] / 2^32 < 1 - p.");
  m.def(
      "residual_dropout_layernorm_backward",
      [](const Tensor& dy, const Tensor& h, const OptTensor& weight, const Tensor& mean,
         const Tensor& rstd, double p, int64_t seed, int64_t offset) {
        require_cuda("residual_dropout_layernorm_backward", h);
        return residual_dropout_layernorm_backward_cuda(dy, h, weight, mean, rstd, p, seed, offset);
      },
      py::arg("dy"), py::arg("h"), py::arg("weight"), py::arg("mean"), py::arg("rstd"),
      py::arg("p"), py::arg("seed"), py::arg("offset"),
      "Gradients of residual_dropout_layernorm_forward on CUDA -> (dx, dr, dweight, dbias); the "
      "dropout mask is recomputed from (seed, offset), never stored.");
#endif
}
