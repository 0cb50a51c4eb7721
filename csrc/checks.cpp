// Argument checks shared by the CPU and CUDA ops: early, typed errors naming the argument.
#include "ops.h"

#include <cmath>

namespace mpo_core {

at::ScalarType accumulation_dtype(at::ScalarType t) {
  return t == at::kDouble ? at::kDouble : at::kFloat;
}

std::string dtype_name(at::ScalarType t) {
  return "torch." + std::string(c10::getDtypeNames(t).first);
}

namespace {

bool is_supported_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kDouble || t == at::kBFloat16 || t == at::kHalf;
}

void check_same_device(const char* op, const char* name, const Tensor& t, const Tensor& ref,
                       const char* ref_name) {
  TORCH_CHECK_VALUE(t.device() == ref.device(), op, ": ", name, " must be on the same device as ",
                    ref_name, " (", ref.device(), "), got ", t.device());
}

// weight / bias: 1-D of length n, dtype = x's dtype or the accumulation dtype.
void check_affine(const char* op, const char* name, const OptTensor& t, const Tensor& x) {
  if (!t.has_value()) return;
  const int64_t n = x.size(-1);
  check_same_device(op, name, *t, x, "x");
  TORCH_CHECK_VALUE(t->dim() == 1 && t->size(0) == n, op, ": ", name,
                    " must have shape (", n, ",) (the last dim of x), got ", t->sizes());
  const auto acc = accumulation_dtype(x.scalar_type());
  TORCH_CHECK_TYPE(t->scalar_type() == x.scalar_type() || t->scalar_type() == acc, op, ": ", name,
                   " must have dtype ", dtype_name(x.scalar_type()), " (like x) or ", dtype_name(acc),
                   ", got ", dtype_name(t->scalar_type()));
}

void check_rows_input(const char* op, const char* name, const Tensor& x) {
  TORCH_CHECK_TYPE(is_supported_dtype(x.scalar_type()), op, ": ", name,
                   " must be float32, float64, bfloat16 or float16, got ", dtype_name(x.scalar_type()));
  TORCH_CHECK_VALUE(x.dim() >= 1, op, ": ", name, " must have at least 1 dim, got a scalar");
  TORCH_CHECK_VALUE(x.size(-1) > 0, op, ": ", name,
                    " must have a non-empty last (normalized) dim, got shape ", x.sizes());
}

}  // namespace

void check_layernorm_forward_args(const char* op, const Tensor& x, const OptTensor& residual,
                                  const OptTensor& weight, const OptTensor& bias, double eps) {
  check_rows_input(op, "x", x);
  if (residual.has_value()) {
    check_same_device(op, "residual", *residual, x, "x");
    TORCH_CHECK_VALUE(residual->sizes() == x.sizes(), op, ": residual must have the shape of x ",
                      x.sizes(), ", got ", residual->sizes());
    TORCH_CHECK_TYPE(residual->scalar_type() == x.scalar_type(), op,
                     ": residual must have the dtype of x (", dtype_name(x.scalar_type()),
                     "), got ", dtype_name(residual->scalar_type()));
  }
  check_affine(op, "weight", weight, x);
  check_affine(op, "bias", bias, x);
  TORCH_CHECK_VALUE(std::isfinite(eps) && eps >= 0.0, op, ": eps must be finite and >= 0, got ",
                    eps);
}

void check_layernorm_backward_args(const char* op, const Tensor& dy, const Tensor& h,
                                   const OptTensor& weight, const Tensor& mean,
                                   const Tensor& rstd) {
  check_rows_input(op, "h", h);
  check_same_device(op, "dy", dy, h, "h");
  TORCH_CHECK_VALUE(dy.sizes() == h.sizes(), op, ": dy must have the shape of h ", h.sizes(),
                    ", got ", dy.sizes());
  TORCH_CHECK_TYPE(dy.scalar_type() == h.scalar_type(), op, ": dy must have the dtype of h (",
                   dtype_name(h.scalar_type()), "), got ", dtype_name(dy.scalar_type()));
  check_affine(op, "weight", weight, h);
  const int64_t rows = h.numel() / h.size(-1);
  const auto acc = accumulation_dtype(h.scalar_type());
  for (const auto& [name, t] : {std::pair<const char*, const Tensor&>{"mean", mean},
                                std::pair<const char*, const Tensor&>{"rstd", rstd}}) {
    check_same_device(op, name, t, h, "h");
    TORCH_CHECK_VALUE(t.dim() == 1 && t.size(0) == rows, op, ": ", name, " must have shape (",
                      rows, ",) (one entry per row of h), got ", t.sizes());
    TORCH_CHECK_TYPE(t.scalar_type() == acc, op, ": ", name, " must have dtype ", dtype_name(acc),
                     ", got ", dtype_name(t.scalar_type()));
  }
}

}  // namespace mpo_core
