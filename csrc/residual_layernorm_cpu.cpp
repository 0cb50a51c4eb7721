// Fused residual-add + LayerNorm on CPU, forward and backward.
//
// Rows (all leading dims flattened) are split across OpenMP threads (the pool size follows
// torch.get_num_threads()); each row is processed with contiguous, `omp simd` inner loops.
// Statistics use two passes (mean, then the sum of squared deviations) in the accumulation
// type: float for float32/bfloat16/float16 inputs, double for float64. For reduced-precision
// inputs h = x + residual is rounded to the input dtype first, and the statistics are taken
// of the rounded h, which is also what the backward reads (this matches
// F.layer_norm(x + residual) in that dtype).
#include "ops.h"

#include <ATen/OpMathType.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <bit>
#include <cmath>
#include <cstdint>
#include <utility>

namespace mpo_core {
namespace {

// Below this many elements the work runs on the calling thread (no fork/join cost).
constexpr int64_t kParallelMinElements = 1 << 15;

int threads_for(int64_t elements) {
  return elements >= kParallelMinElements ? std::max(1, at::get_num_threads()) : 1;
}

// Element conversions. bfloat16 gets branch-free bit manipulation (round to nearest even, NaN
// kept quiet, as c10 does), which the compiler vectorizes; c10::BFloat16's own conversion does not.
template <typename Acc, typename T>
inline Acc widen(T v) {
  return static_cast<Acc>(v);
}
template <>
inline float widen<float, c10::BFloat16>(c10::BFloat16 v) {
  return std::bit_cast<float>(static_cast<uint32_t>(v.x) << 16);
}
template <typename T, typename Acc>
inline T narrow(Acc v) {
  return static_cast<T>(v);
}
template <>
inline c10::BFloat16 narrow<c10::BFloat16, float>(float v) {
  const uint32_t u = std::bit_cast<uint32_t>(v);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  const uint16_t bits = v != v ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
  return c10::BFloat16(bits, c10::BFloat16::from_bits());
}

// The row kernels are compiled for baseline x86-64 and, where GCC can dispatch at load time,
// for AVX2+FMA (x86-64-v3) and AVX-512 (x86-64-v4); the best one the CPU supports is picked once.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define MPO_CPU_CLONES __attribute__((target_clones("default", "arch=x86-64-v3", "arch=x86-64-v4")))
#else
#define MPO_CPU_CLONES
#endif

// One row: h = x + r (rounded to T; skipped when r == nullptr), two-pass mean / variance of h,
// y = (h - mean) * rstd [* w] [+ b]. Returns {mean, rstd}.
template <typename T, typename Acc>
MPO_CPU_CLONES std::pair<Acc, Acc> forward_row(const T* xr, const T* rr, const Acc* w, const Acc* b,
                                               T* yr, T* hw, int64_t n, Acc eps) {
  const Acc inv_n = Acc(1) / static_cast<Acc>(n);
  const T* hr = xr;  // h = x when there is no residual
  if (rr != nullptr) {
    // Separate from the sum below: a loop that stores T and reduces its widened value does not
    // vectorize for bfloat16; the second read of the row hits L1.
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) hw[j] = narrow<T>(widen<Acc>(xr[j]) + widen<Acc>(rr[j]));
    hr = hw;
  }
  Acc sum = 0;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) sum += widen<Acc>(hr[j]);
  const Acc mu = sum * inv_n;
  Acc sq = 0;
#pragma omp simd reduction(+ : sq)
  for (int64_t j = 0; j < n; ++j) {
    const Acc d = widen<Acc>(hr[j]) - mu;
    sq += d * d;
  }
  const Acc rs = Acc(1) / std::sqrt(sq * inv_n + eps);
  if (w != nullptr && b != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j)
      yr[j] = narrow<T>((widen<Acc>(hr[j]) - mu) * rs * w[j] + b[j]);
  } else if (w != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) yr[j] = narrow<T>((widen<Acc>(hr[j]) - mu) * rs * w[j]);
  } else if (b != nullptr) {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) yr[j] = narrow<T>((widen<Acc>(hr[j]) - mu) * rs + b[j]);
  } else {
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) yr[j] = narrow<T>((widen<Acc>(hr[j]) - mu) * rs);
  }
  return {mu, rs};
}

template <typename T, typename Acc>
void forward_rows(const T* x, const T* r, const Acc* w, const Acc* b, T* y, T* h, Acc* mean_out,
                  Acc* rstd_out, int64_t rows, int64_t n, Acc eps) {
#pragma omp parallel for schedule(static) num_threads(threads_for(rows * n))
  for (int64_t row = 0; row < rows; ++row) {
    const auto [mu, rs] = forward_row<T, Acc>(x + row * n, r != nullptr ? r + row * n : nullptr, w, b,
                                              y + row * n, r != nullptr ? h + row * n : nullptr, n, eps);
    mean_out[row] = mu;
    rstd_out[row] = rs;
  }
}

// One row of dh = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w, xhat = (h - mean) * rstd;
// with w, also dw += dy * xhat and db += dy (this thread's partial rows).
template <typename T, typename Acc>
MPO_CPU_CLONES void backward_row(const T* dyr, const T* hr, const Acc* w, Acc mu, Acc rs, T* dhr, Acc* dw,
                                 Acc* db, int64_t n) {
  const Acc inv_n = Acc(1) / static_cast<Acc>(n);
  Acc sum_g = 0, sum_gx = 0;
  if (w != nullptr) {
#pragma omp simd reduction(+ : sum_g, sum_gx)
    for (int64_t j = 0; j < n; ++j) {
      const Acc d = widen<Acc>(dyr[j]);
      const Acc xhat = (widen<Acc>(hr[j]) - mu) * rs;
      const Acc g = d * w[j];
      sum_g += g;
      sum_gx += g * xhat;
      dw[j] += d * xhat;
      db[j] += d;
    }
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const Acc xhat = (widen<Acc>(hr[j]) - mu) * rs;
      const Acc g = widen<Acc>(dyr[j]) * w[j];
      dhr[j] = narrow<T>(rs * (g - (sum_g + xhat * sum_gx) * inv_n));
    }
  } else {
#pragma omp simd reduction(+ : sum_g, sum_gx)
    for (int64_t j = 0; j < n; ++j) {
      const Acc g = widen<Acc>(dyr[j]);
      sum_g += g;
      sum_gx += g * (widen<Acc>(hr[j]) - mu) * rs;
    }
#pragma omp simd
    for (int64_t j = 0; j < n; ++j) {
      const Acc xhat = (widen<Acc>(hr[j]) - mu) * rs;
      dhr[j] = narrow<T>(rs * (widen<Acc>(dyr[j]) - (sum_g + xhat * sum_gx) * inv_n));
    }
  }
}

// dw_part / db_part: nthreads x n, zero-initialized; each thread accumulates into its own row
// and they are reduced afterwards, so there are no races.
template <typename T, typename Acc>
void backward_rows(const T* dy, const T* h, const Acc* w, const Acc* mean, const Acc* rstd, T* dh,
                   Acc* dw_part, Acc* db_part, int nthreads, int64_t rows, int64_t n) {
#pragma omp parallel num_threads(nthreads)
  {
    const int tid = omp_get_thread_num();
    Acc* dw = w != nullptr ? dw_part + tid * n : nullptr;
    Acc* db = w != nullptr ? db_part + tid * n : nullptr;
#pragma omp for schedule(static)
    for (int64_t row = 0; row < rows; ++row)
      backward_row<T, Acc>(dy + row * n, h + row * n, w, mean[row], rstd[row], dh + row * n, dw, db, n);
  }
}

// out[j] = sum_t part[t * n + j], for t < parts.
template <typename Acc>
void sum_partials(const Acc* part, int parts, int64_t n, Acc* out) {
#pragma omp parallel for schedule(static) num_threads(threads_for(parts * n))
  for (int64_t j = 0; j < n; ++j) {
    Acc s = 0;
    for (int t = 0; t < parts; ++t) s += part[t * n + j];
    out[j] = s;
  }
}

template <typename Acc>
const Acc* affine_ptr(const std::optional<Tensor>& t) {
  return t.has_value() ? t->data_ptr<Acc>() : nullptr;
}

void check_cpu(const char* op, const Tensor& t) {
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": expected CPU tensors, got ", t.device());
}

}  // namespace

std::tuple<Tensor, Tensor, Tensor, Tensor> residual_layernorm_forward_cpu(
    const Tensor& x_in, const OptTensor& residual, const OptTensor& weight, const OptTensor& bias,
    double eps) {
  constexpr const char* op = "residual_layernorm_forward";
  check_layernorm_forward_args(op, x_in, residual, weight, bias, eps);
  check_cpu(op, x_in);
  const auto acc = accumulation_dtype(x_in.scalar_type());
  const Tensor x = x_in.contiguous();
  const int64_t n = x.size(-1);
  const int64_t rows = x.numel() / n;
  const OptTensor r = residual.has_value() ? OptTensor(residual->contiguous()) : std::nullopt;
  const OptTensor w = weight.has_value() ? OptTensor(weight->to(acc).contiguous()) : std::nullopt;
  const OptTensor b = bias.has_value() ? OptTensor(bias->to(acc).contiguous()) : std::nullopt;
  Tensor y = at::empty_like(x);
  Tensor h = r.has_value() ? at::empty_like(x) : x;
  Tensor mean = at::empty({rows}, x.options().dtype(acc));
  Tensor rstd = at::empty({rows}, x.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, x.scalar_type(), op, [&] {
    using Acc = at::opmath_type<scalar_t>;
    forward_rows<scalar_t, Acc>(x.data_ptr<scalar_t>(),
                                r.has_value() ? r->data_ptr<scalar_t>() : nullptr,
                                affine_ptr<Acc>(w), affine_ptr<Acc>(b), y.data_ptr<scalar_t>(),
                                h.data_ptr<scalar_t>(), mean.data_ptr<Acc>(), rstd.data_ptr<Acc>(),
                                rows, n, widen<Acc>(eps));
  });
  return {y, h, mean, rstd};
}

std::tuple<Tensor, OptTensor, OptTensor> residual_layernorm_backward_cpu(
    const Tensor& dy_in, const Tensor& h_in, const OptTensor& weight, const Tensor& mean_in,
    const Tensor& rstd_in) {
  constexpr const char* op = "residual_layernorm_backward";
  check_layernorm_backward_args(op, dy_in, h_in, weight, mean_in, rstd_in);
  check_cpu(op, h_in);
  const auto acc = accumulation_dtype(h_in.scalar_type());
  const Tensor dy = dy_in.contiguous();
  const Tensor h = h_in.contiguous();
  const Tensor mean = mean_in.contiguous();
  const Tensor rstd = rstd_in.contiguous();
  const int64_t n = h.size(-1);
  const int64_t rows = h.numel() / n;
  const OptTensor w = weight.has_value() ? OptTensor(weight->to(acc).contiguous()) : std::nullopt;
  const int nthreads = threads_for(rows * n);
  Tensor dh = at::empty_like(h);
  Tensor dw_part, db_part;
  if (w.has_value()) {
    dw_part = at::zeros({nthreads, n}, h.options().dtype(acc));
    db_part = at::zeros({nthreads, n}, h.options().dtype(acc));
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kBFloat16, at::kHalf, h.scalar_type(), op, [&] {
    using Acc = at::opmath_type<scalar_t>;
    backward_rows<scalar_t, Acc>(
        dy.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), affine_ptr<Acc>(w),
        mean.data_ptr<Acc>(), rstd.data_ptr<Acc>(), dh.data_ptr<scalar_t>(),
        w.has_value() ? dw_part.data_ptr<Acc>() : nullptr,
        w.has_value() ? db_part.data_ptr<Acc>() : nullptr, nthreads, rows, n);
  });
  if (!w.has_value()) return {dh, std::nullopt, std::nullopt};
  Tensor dw = at::empty({n}, h.options().dtype(acc));
  Tensor db = at::empty({n}, h.options().dtype(acc));
  AT_DISPATCH_FLOATING_TYPES(acc, op, [&] {
    sum_partials<scalar_t>(dw_part.data_ptr<scalar_t>(), nthreads, n, dw.data_ptr<scalar_t>());
    sum_partials<scalar_t>(db_part.data_ptr<scalar_t>(), nthreads, n, db.data_ptr<scalar_t>());
  });
  const auto wdtype = weight->scalar_type();
  return {dh, dw.to(wdtype), db.to(wdtype)};
}

}  // namespace mpo_core
