// Torch-facing glue of the CUDA kernels (compiled only in CUDA builds, MPO_CORE_WITH_CUDA):
// validates tensors, makes them contiguous, allocates outputs and workspaces with torch's
// caching allocator, and launches on the current stream of the tensors' device.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include <limits>

#include "cuda/kernels.h"
#include "ops.h"

namespace mpo_core {
namespace {

cuda::DType kernel_dtype(const char* op, const char* name, at::ScalarType t) {
  switch (t) {
    case at::kFloat: return cuda::DType::kFloat32;
    case at::kHalf: return cuda::DType::kFloat16;
    case at::kBFloat16: return cuda::DType::kBFloat16;
    default:
      TORCH_CHECK_TYPE(false, op, ": ", name,
                       " must be torch.float32, torch.bfloat16 or torch.float16 on CUDA (float64 runs on "
                       "the torch path), got ", dtype_name(t));
  }
  return cuda::DType::kFloat32;  // unreachable: TORCH_CHECK_TYPE(false, ...) throws
}

void check_launch(const char* op, cudaError_t err) {
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA kernel launch failed: ", cudaGetErrorString(err));
}

void check_hidden(const char* op, const char* name, int64_t n) {
  TORCH_CHECK_VALUE(n <= cuda::kMaxLayerNormHidden, op, ": the last dim of ", name, " must be <= ",
                    cuda::kMaxLayerNormHidden, " for the CUDA kernel, got ", n);
}

void check_dropout_p(const char* op, double p) {
  TORCH_CHECK_VALUE(p >= 0.0 && p <= 1.0, op, ": p must be in [0, 1], got ", p);
}

OptTensor float_contiguous(const OptTensor& t) {
  return t.has_value() ? OptTensor(t->to(at::kFloat).contiguous()) : std::nullopt;
}

template <typename T>
T* ptr_or_null(const OptTensor& t) {
  return t.has_value() ? static_cast<T*>(t->data_ptr()) : nullptr;
}

std::tuple<Tensor, Tensor, Tensor, Tensor> forward_impl(const char* op, const Tensor& x_in,
                                                       const OptTensor& r_in, const OptTensor& weight,
                                                       const OptTensor& bias, double p, int64_t seed,
                                                       int64_t offset, double eps) {
  check_layernorm_forward_args(op, x_in, r_in, weight, bias, eps);
  const cuda::DType dtype = kernel_dtype(op, "x", x_in.scalar_type());
  check_hidden(op, "x", x_in.size(-1));
  check_dropout_p(op, p);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  const OptTensor r = r_in.has_value() ? OptTensor(r_in->contiguous()) : std::nullopt;
  const OptTensor w = float_contiguous(weight), b = float_contiguous(bias);
  const int64_t n = x.size(-1), rows = x.numel() / n;
  Tensor y = at::empty_like(x);
  Tensor h = r.has_value() ? at::empty_like(x) : x;
  Tensor mean = at::empty({rows}, x.options().dtype(at::kFloat));
  Tensor rstd = at::empty({rows}, x.options().dtype(at::kFloat));
  cuda::LayerNormForwardArgs a;
  a.x = x.data_ptr();
  a.r = ptr_or_null<const void>(r);
  a.gamma = ptr_or_null<const float>(w);
  a.beta = ptr_or_null<const float>(b);
  a.y = y.data_ptr();
  a.h = r.has_value() ? h.data_ptr() : nullptr;
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.rows = rows;
  a.n = static_cast<int>(n);
  a.eps = static_cast<float>(eps);
  a.dropout_p = static_cast<float>(p);
  a.seed = static_cast<uint64_t>(seed);
  a.offset = static_cast<uint64_t>(offset);
  check_launch(op, cuda::layernorm_forward(dtype, a, c10::cuda::getCurrentCUDAStream()));
  return {y, h, mean, rstd};
}

// Returns (dh, dr or undefined, dweight or None, dbias or None).
std::tuple<Tensor, Tensor, OptTensor, OptTensor> backward_impl(const char* op, const Tensor& dy_in,
                                                              const Tensor& h_in, const OptTensor& weight,
                                                              const Tensor& mean_in, const Tensor& rstd_in,
                                                              bool want_dr, double p, int64_t seed,
                                                              int64_t offset) {
  check_layernorm_backward_args(op, dy_in, h_in, weight, mean_in, rstd_in);
  const cuda::DType dtype = kernel_dtype(op, "h", h_in.scalar_type());
  check_hidden(op, "h", h_in.size(-1));
  check_dropout_p(op, p);
  const c10::cuda::CUDAGuard guard(h_in.device());
  const Tensor dy = dy_in.contiguous(), h = h_in.contiguous();
  const Tensor mean = mean_in.contiguous(), rstd = rstd_in.contiguous();
  const OptTensor w = float_contiguous(weight);
  const int64_t n = h.size(-1), rows = h.numel() / n;
  const auto f32 = h.options().dtype(at::kFloat);
  Tensor dh = at::empty_like(h);
  Tensor dr = want_dr ? at::empty_like(h) : Tensor();
  Tensor dw = w.has_value() ? at::empty({n}, f32) : Tensor();
  Tensor db = w.has_value() ? at::empty({n}, f32) : Tensor();
  cuda::LayerNormBackwardArgs a;
  a.dy = dy.data_ptr();
  a.h = h.data_ptr();
  a.gamma = ptr_or_null<const float>(w);
  a.mean = mean.data_ptr<float>();
  a.rstd = rstd.data_ptr<float>();
  a.dh = dh.data_ptr();
  a.dr = want_dr ? dr.data_ptr() : nullptr;
  a.dgamma = w.has_value() ? dw.data_ptr<float>() : nullptr;
  a.dbeta = w.has_value() ? db.data_ptr<float>() : nullptr;
  a.rows = rows;
  a.n = static_cast<int>(n);
  a.dropout_p = static_cast<float>(p);
  a.seed = static_cast<uint64_t>(seed);
  a.offset = static_cast<uint64_t>(offset);
  const size_t ws_floats = cuda::layernorm_backward_workspace(dtype, a);
  Tensor ws = at::empty({static_cast<int64_t>(ws_floats)}, f32);
  a.workspace = ws_floats > 0 ? ws.data_ptr<float>() : nullptr;
  check_launch(op, cuda::layernorm_backward(dtype, a, c10::cuda::getCurrentCUDAStream()));
  if (!w.has_value()) return {dh, dr, std::nullopt, std::nullopt};
  const auto wdtype = weight->scalar_type();
  return {dh, dr, dw.to(wdtype), db.to(wdtype)};
}

bool tanh_approximation(const char* op, const std::string& approximate) {
  TORCH_CHECK_VALUE(approximate == "none" || approximate == "tanh", op,
                    ": approximate must be 'none' or 'tanh', got '", approximate, "'");
  return approximate == "tanh";
}

void check_gelu_args(const char* op, const Tensor& x, const Tensor& bias) {
  TORCH_CHECK_VALUE(x.dim() >= 1 && x.size(-1) > 0, op,
                    ": x must have at least 1 dim and a non-empty last dim, got shape ", x.sizes());
  TORCH_CHECK_VALUE(bias.device() == x.device(), op, ": bias must be on the device of x (", x.device(),
                    "), got ", bias.device());
  TORCH_CHECK_VALUE(bias.dim() == 1 && bias.size(0) == x.size(-1), op, ": bias must have shape (",
                    x.size(-1), ",) (the last dim of x), got ", bias.sizes());
  TORCH_CHECK_TYPE(bias.scalar_type() == x.scalar_type() || bias.scalar_type() == at::kFloat, op,
                   ": bias must have the dtype of x (", dtype_name(x.scalar_type()),
                   ") or torch.float32, got ", dtype_name(bias.scalar_type()));
  TORCH_CHECK_VALUE(x.size(-1) <= std::numeric_limits<int>::max(), op, ": the last dim of x is too large");
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> residual_layernorm_forward_cuda(
    const Tensor& x, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias, double eps) {
  return forward_impl("residual_layernorm_forward", x, residual, weight, bias, 0.0, 0, 0, eps);
}

std::tuple<Tensor, OptTensor, OptTensor> residual_layernorm_backward_cuda(
    const Tensor& dy, const Tensor& h, const OptTensor& weight, const Tensor& mean, const Tensor& rstd) {
  auto [dh, dr, dw, db] =
      backward_impl("residual_layernorm_backward", dy, h, weight, mean, rstd, false, 0.0, 0, 0);
  return {dh, dw, db};
}

std::tuple<Tensor, Tensor, Tensor, Tensor> residual_dropout_layernorm_forward_cuda(
    const Tensor& x, const Tensor& r, const OptTensor& weight, const OptTensor& bias, double p, int64_t seed,
    int64_t offset, double eps) {
  return forward_impl("residual_dropout_layernorm_forward", x, r, weight, bias, p, seed, offset, eps);
}

std::tuple<Tensor, Tensor, OptTensor, OptTensor> residual_dropout_layernorm_backward_cuda(
    const Tensor& dy, const Tensor& h, const OptTensor& weight, const Tensor& mean, const Tensor& rstd, double p,
    int64_t seed, int64_t offset) {
  return backward_impl("residual_dropout_layernorm_backward", dy, h, weight, mean, rstd, true, p, seed, offset);
}

Tensor bias_gelu_forward_cuda(const Tensor& x_in, const Tensor& bias, const std::string& approximate) {
  constexpr const char* op = "bias_gelu_forward";
  const bool tanh_approx = tanh_approximation(op, approximate);
  const cuda::DType dtype = kernel_dtype(op, "x", x_in.scalar_type());
  check_gelu_args(op, x_in, bias);
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous();
  const Tensor b = bias.to(at::kFloat).contiguous();
  const int64_t n = x.size(-1), rows = x.numel() / n;
  Tensor y = at::empty_like(x);
  check_launch(op, cuda::bias_gelu_forward(dtype, x.data_ptr(), b.data_ptr<float>(), y.data_ptr(), rows,
                                           static_cast<int>(n), tanh_approx, c10::cuda::getCurrentCUDAStream()));
  return y;
}

std::tuple<Tensor, Tensor> bias_gelu_backward_cuda(const Tensor& dy_in, const Tensor& x_in, const Tensor& bias,
                                                   const std::string& approximate) {
  constexpr const char* op = "bias_gelu_backward";
  const bool tanh_approx = tanh_approximation(op, approximate);
  const cuda::DType dtype = kernel_dtype(op, "x", x_in.scalar_type());
  check_gelu_args(op, x_in, bias);
  TORCH_CHECK_VALUE(dy_in.device() == x_in.device() && dy_in.sizes() == x_in.sizes(), op,
                    ": dy must have the shape and device of x (", x_in.sizes(), " on ", x_in.device(), "), got ",
                    dy_in.sizes(), " on ", dy_in.device());
  TORCH_CHECK_TYPE(dy_in.scalar_type() == x_in.scalar_type(), op, ": dy must have the dtype of x (",
                   dtype_name(x_in.scalar_type()), "), got ", dtype_name(dy_in.scalar_type()));
  const c10::cuda::CUDAGuard guard(x_in.device());
  const Tensor x = x_in.contiguous(), dy = dy_in.contiguous();
  const Tensor b = bias.to(at::kFloat).contiguous();
  const int64_t n = x.size(-1), rows = x.numel() / n;
  Tensor dx = at::empty_like(x);
  Tensor dbias = at::empty({n}, x.options().dtype(at::kFloat));
  const size_t ws_floats = cuda::bias_gelu_backward_workspace(dtype, rows, static_cast<int>(n));
  Tensor ws = at::empty({static_cast<int64_t>(ws_floats)}, x.options().dtype(at::kFloat));
  check_launch(op, cuda::bias_gelu_backward(dtype, dy.data_ptr(), x.data_ptr(), b.data_ptr<float>(), dx.data_ptr(),
                                            dbias.data_ptr<float>(), ws_floats > 0 ? ws.data_ptr<float>() : nullptr,
                                            rows, static_cast<int>(n), tanh_approx,
                                            c10::cuda::getCurrentCUDAStream()));
  return {dx, dbias.to(bias.scalar_type())};
}

}  // namespace mpo_core
