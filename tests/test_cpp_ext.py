"""The compiled extension ``mpo_core._C`` against plain torch.

CPU: fused residual + LayerNorm forward/backward vs ``F.layer_norm(x + residual)`` and
autograd (float64 to 1e-12, float32 to ~1e-5, bf16/fp16 to a couple of ulps).
CUDA (marked ``cuda``, run only with a GPU): the same ops plus bias+GELU and
residual+dropout+LayerNorm, whose dropout mask is checked bit for bit against a numpy
Philox4x32-10 (itself checked on the Random123 known-answer vectors).
"""
from __future__ import annotations

import ctypes
import os
import re
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mpo_core
from mpo_core._backends import extension
from mpo_core.gpu import nvcc as nvcc_tools
from mpo_core.gpu.philox import KNOWN_ANSWERS, cuda_keep_mask, philox4x32_10

AFFINE = ["both", "weight", "bias", "none"]
# Relative accuracy per dtype: tight for float64/float32 (the statistics and sums run in that
# precision), one ulp for bfloat16/float16 outputs (rounded once from float32 results).
TOL = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 2.0**-7, torch.float16: 2.0**-10}


@pytest.fixture(scope="module")
def C():
    """The extension; a failure under CI (where scripts/env.sh builds it), else a skip."""
    ext = extension()
    if ext is None:
        msg = "mpo_core._C is not built: run `pip install --no-build-isolation -e .`"
        if os.environ.get("CI"):
            pytest.fail(msg)
        pytest.skip(msg)
    return ext


def _inputs(shape, dtype, residual, affine, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]

    def rnd(*s):
        return torch.randn(*s, generator=g, dtype=torch.float64).to(device=device, dtype=dtype)

    x = rnd(*shape) * 2 + 0.5
    r = rnd(*shape) if residual else None
    w = rnd(n) if affine in ("both", "weight") else None
    b = rnd(n) if affine in ("both", "bias") else None
    dy = rnd(*shape)
    return x, r, w, b, dy


def _reference(x, r, w, b, dy, eps):
    """h = x + r in the inputs' dtype (as torch adds), then F.layer_norm(h) and its autograd
    gradients in float64: the exact answer the kernels approximate."""
    h = x + r if r is not None else x
    leaves = [t.detach().double().clone().requires_grad_(True) if t is not None else None for t in (h, w, b)]
    hl, wl, bl = leaves
    y = F.layer_norm(hl, (x.shape[-1],), wl, bl, eps)
    y.backward(dy.double())
    hf = hl.detach().reshape(-1, x.shape[-1])
    mean = hf.mean(-1)
    rstd = (hf.var(-1, unbiased=False) + eps).rsqrt()
    grads = [t.grad if t is not None else None for t in (hl, wl, bl)]
    return (y.detach(), h, mean, rstd, *grads)


def _close(actual, expected, tol, what, atol=None):
    """|actual - expected| <= atol + tol * |expected| elementwise (atol defaults to tol)."""
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=tol, atol=tol if atol is None else atol,
        msg=lambda m: f"{what}: {m}",
    )


def _check(C, shape, dtype, residual, affine, eps=1e-5, seed=0, device="cpu"):
    """Our forward and backward against the float64 reference, on any device."""
    x, r, w, b, dy = _inputs(shape, dtype, residual, affine, device=device, seed=seed)
    y, h, mean, rstd = C.residual_layernorm_forward(x, r, w, b, eps)
    assert y.device == h.device == mean.device == x.device
    ry, rh, rmean, rrstd, rdx, rdw, rdb = _reference(x, r, w, b, dy, eps)
    # Arithmetic runs in the accumulation dtype, whose rounding errors in xhat = (h - mean) * rstd
    # scale with |h| * rstd (cancellation in h - mean), and in y, dh, dweight with a further |w|:
    # that is the absolute tolerance. The relative one is the output dtype's rounding (TOL).
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    acc_tol = 1e-12 if dtype == torch.float64 else 1e-5
    cond = max(1.0, float(h.abs().max()) * float(rrstd.max()))
    cond *= 1.0 if w is None else max(1.0, float(w.abs().max()))
    rtol, atol = TOL[dtype], acc_tol * cond
    assert y.shape == x.shape and y.dtype == dtype and h.dtype == dtype
    assert mean.shape == rstd.shape == (x.numel() // shape[-1],) and mean.dtype == rstd.dtype == acc
    _close(h, rh, 0.0, "h")
    _close(y, ry, rtol, "y", atol)
    _close(mean, rmean, acc_tol, "mean")
    _close(rstd, rrstd, acc_tol * max(1.0, float(rrstd.max())), "rstd")
    dh, dw, db = C.residual_layernorm_backward(dy, h, w, mean, rstd)
    _close(dh, rdx, rtol, "dh", atol)
    if w is None:
        assert dw is None and db is None
    else:  # sums over rows: 10x the absolute slack
        rdb_ = dy.reshape(-1, shape[-1]).sum(0) if b is None else rdb
        _close(dw, rdw, rtol, "dweight", atol * 10)
        _close(db, rdb_, rtol, "dbias", acc_tol * 10)


def test_backends_report_cpp(C):
    assert mpo_core.backends()["cpp"] is True
    assert isinstance(C.WITH_CUDA, bool)
    if torch.version.cuda is None:  # a CPU torch cannot have built the CUDA sources
        assert C.WITH_CUDA is False
        assert not hasattr(C, "bias_gelu_forward")


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("affine", AFFINE)
@pytest.mark.parametrize("n", [1, 2, 3, 7, 31, 64, 127, 768, 1023, 1024])
def test_cpu_matches_torch(C, dtype, residual, affine, n):
    _check(C, (3, 5, n), dtype, residual, affine)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(96, 1024), (4, 128, 768), (8192, 5)])
def test_cpu_multithreaded_rows(C, dtype, shape):
    """Large enough to run on several OpenMP threads, with per-thread dweight partials."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        _check(C, shape, dtype, True, "both", seed=3)
        x, r, w, b, dy = _inputs(shape, dtype, True, "both", seed=4)
        y, h, mean, rstd = C.residual_layernorm_forward(x, r, w, b, 1e-5)
        first = C.residual_layernorm_backward(dy, h, w, mean, rstd)
        second = C.residual_layernorm_backward(dy, h, w, mean, rstd)
        for a, c in zip(first, second):
            assert torch.equal(a, c), "backward must be deterministic"
    finally:
        torch.set_num_threads(threads)


@settings(max_examples=30)
@given(
    lead=st.lists(st.integers(1, 6), min_size=0, max_size=3),
    n=st.integers(1, 1024),
    dtype=st.sampled_from([torch.float64, torch.float32]),
    residual=st.booleans(),
    affine=st.sampled_from(AFFINE),
    eps=st.sampled_from([1e-5, 1e-12, 0.1]),
    seed=st.integers(0, 2**16),
)
def test_cpu_matches_torch_property(C, lead, n, dtype, residual, affine, eps, seed):
    _check(C, (*lead, n), dtype, residual, affine, eps=eps, seed=seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [5, 768])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
def test_cpu_reduced_precision(C, dtype, n, residual):
    """h is x + residual rounded to the dtype (as torch does); statistics in float32."""
    _check(C, (6, n), dtype, residual, "both", seed=1)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_cpu_nan_stays_in_its_row(C, dtype):
    x, r, w, b, _ = _inputs((4, 33), dtype, True, "both", seed=2)
    x[1, 5] = float("nan")
    y, h, mean, rstd = C.residual_layernorm_forward(x, r, w, b, 1e-5)
    assert torch.isnan(h[1, 5]) and torch.isnan(y[1]).all() and torch.isnan(mean[1])
    keep = [0, 2, 3]
    y_ok, h_ok, *_ = C.residual_layernorm_forward(x[keep], r[keep], w, b, 1e-5)
    assert torch.equal(y[keep], y_ok) and torch.equal(h[keep], h_ok)


def test_cpu_float32_affine_with_bfloat16_input(C):
    """fp32 LayerNorm parameters with a bf16 activation (mixed precision): grads stay fp32."""
    x, r, _, _, dy = _inputs((4, 64), torch.bfloat16, True, "none")
    w = torch.linspace(0.5, 1.5, 64)
    b = torch.linspace(-1, 1, 64)
    y, h, mean, rstd = C.residual_layernorm_forward(x, r, w, b, 1e-5)
    y16, *_ = C.residual_layernorm_forward(x, r, w.bfloat16(), b.bfloat16(), 1e-5)
    _close(y, y16, 2**-6 * float(y16.abs().max()), "y")
    dh, dw, db = C.residual_layernorm_backward(dy, h, w, mean, rstd)
    assert dw.dtype == db.dtype == torch.float32
    hx = (h.float() - mean[:, None]) * rstd[:, None]
    _close(dw, (dy.float() * hx).sum(0), 1e-5, "dweight")
    _close(db, dy.float().sum(0), 1e-5, "dbias")


def test_cpu_no_residual_returns_x_as_h_and_handles_layouts(C):
    base = torch.randn(64, 6, dtype=torch.float64)
    x = base.t()  # non-contiguous (6, 64)
    y, h, mean, rstd = C.residual_layernorm_forward(x, None, None, None, 1e-5)
    torch.testing.assert_close(y, F.layer_norm(x, (64,), eps=1e-5), rtol=1e-12, atol=1e-12)
    assert torch.equal(h, x)
    dy = torch.randn(64, 6, dtype=torch.float64).t()
    dh, dw, db = C.residual_layernorm_backward(dy, h, None, mean, rstd)
    xl = x.clone().requires_grad_(True)
    F.layer_norm(xl, (64,), eps=1e-5).backward(dy)
    torch.testing.assert_close(dh, xl.grad, rtol=1e-12, atol=1e-12)
    assert dw is None and db is None


def test_cpu_empty_rows(C):
    x = torch.empty(0, 8)
    w, b = torch.ones(8), torch.zeros(8)
    y, h, mean, rstd = C.residual_layernorm_forward(x, x, w, b, 1e-5)
    assert y.shape == h.shape == (0, 8) and mean.shape == rstd.shape == (0,)
    dh, dw, db = C.residual_layernorm_backward(x, h, w, mean, rstd)
    assert dh.shape == (0, 8) and torch.equal(dw, torch.zeros(8)) and torch.equal(db, torch.zeros(8))


def test_cpu_bad_arguments_raise_early(C):
    x = torch.randn(4, 8)
    fwd, bwd = C.residual_layernorm_forward, C.residual_layernorm_backward
    with pytest.raises(ValueError, match="residual must have the shape of x"):
        fwd(x, torch.randn(4, 7), None, None, 1e-5)
    with pytest.raises(TypeError, match="residual must have the dtype of x"):
        fwd(x, x.double(), None, None, 1e-5)
    with pytest.raises(TypeError, match="x must be float32, float64, bfloat16 or float16"):
        fwd(x.int(), None, None, None, 1e-5)
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        fwd(x, None, torch.ones(7), None, 1e-5)
    with pytest.raises(TypeError, match="bias must have dtype"):
        fwd(x, None, None, torch.ones(8, dtype=torch.float64), 1e-5)
    with pytest.raises(ValueError, match="eps must be finite and >= 0"):
        fwd(x, None, None, None, -1.0)
    with pytest.raises(ValueError, match="non-empty last"):
        fwd(torch.randn(4, 0), None, None, None, 1e-5)
    with pytest.raises(ValueError, match="at least 1 dim"):
        fwd(torch.tensor(1.0), None, None, None, 1e-5)
    y, h, mean, rstd = fwd(x, None, None, None, 1e-5)
    with pytest.raises(ValueError, match=r"mean must have shape \(4,\)"):
        bwd(x, h, None, mean[:3], rstd)
    with pytest.raises(TypeError, match="rstd must have dtype torch.float32, got torch.float64"):
        bwd(x, h, None, mean, rstd.double())
    with pytest.raises(ValueError, match="dy must have the shape of h"):
        bwd(x[:, :4], h, None, mean, rstd)
    if not C.WITH_CUDA:
        with pytest.raises(ValueError, match="tensors must be on the CPU"):
            fwd(x.to("meta"), None, None, None, 1e-5)


# ---------------------------------------------------------------------------------------------
# Dropout mask reference: Philox4x32-10 in numpy (mpo_core.gpu.philox; the kernels' csrc/cuda/philox.cuh).


def test_numpy_philox_reference_matches_random123_known_answers():
    for counter, key, want in KNOWN_ANSWERS:
        assert tuple(int(w) for w in philox4x32_10(counter, key)) == want
    keep = cuda_keep_mask(1, 40000, 0.3, seed=5, offset=11)
    assert abs(keep.double().mean() - 0.7) < 4 * (0.21 / 40000) ** 0.5
    assert cuda_keep_mask(1, 16, 0.0, 1, 2).all() and not cuda_keep_mask(1, 16, 1.0, 1, 2).any()


# ---------------------------------------------------------------------------------------------
# CUDA kernels: on a GPU through mpo_core._C ("cuda"), and everywhere through the host emulation
# of csrc/cuda/host_emulation.h ("emulated"): the same .cu sources compiled by g++, blocks run
# one after another, each block's threads as fibers switched at barriers, on CPU tensors. The
# emulation checks the kernels' arithmetic, indexing, launch planning and reductions; only the
# GPU checks speed, the real warp scheduler and the real toolchain's code generation.

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
LOWP = [torch.float32, torch.bfloat16, torch.float16]
ROOT = Path(__file__).resolve().parent.parent

# Stands in for the CUDA runtime calls the launchers make: device 0 with 2 SMs, so that the
# persistent grids of the backward kernels walk several rows per block even for small inputs.
_EMU_HARNESS = r"""
#include <cstring>
#include "kernels.h"
using namespace mpo_core::cuda;
cudaError_t cudaGetLastError() { return cudaSuccess; }
cudaError_t cudaGetDevice(int* device) { *device = 0; return cudaSuccess; }
cudaError_t cudaDeviceGetAttribute(int* value, cudaDeviceAttr attr, int) {
  *value = attr == cudaDevAttrMultiProcessorCount ? 2 : 0;
  return cudaSuccess;
}
cudaError_t cudaMemsetAsync(void* p, int v, size_t count, cudaStream_t) { std::memset(p, v, count); return cudaSuccess; }
extern "C" {
int emu_ln_fwd(int dt, const void* x, const void* r, const float* g, const float* b, void* y, void* h, float* mean,
               float* rstd, int64_t rows, int n, float eps, float p, uint64_t seed, uint64_t offset) {
  LayerNormForwardArgs a;
  a.x = x; a.r = r; a.gamma = g; a.beta = b; a.y = y; a.h = h; a.mean = mean; a.rstd = rstd;
  a.rows = rows; a.n = n; a.eps = eps; a.dropout_p = p; a.seed = seed; a.offset = offset;
  return layernorm_forward(static_cast<DType>(dt), a, nullptr);
}
static LayerNormBackwardArgs bwd_args(const void* dy, const void* h, const float* g, const float* mean,
                                      const float* rstd, void* dh, void* dr, float* dg, float* db, float* ws,
                                      int64_t rows, int n, float p, uint64_t seed, uint64_t offset) {
  LayerNormBackwardArgs a;
  a.dy = dy; a.h = h; a.gamma = g; a.mean = mean; a.rstd = rstd; a.dh = dh; a.dr = dr; a.dgamma = dg; a.dbeta = db;
  a.workspace = ws; a.rows = rows; a.n = n; a.dropout_p = p; a.seed = seed; a.offset = offset;
  return a;
}
size_t emu_ln_bwd_ws(int dt, const void* dy, const void* h, const float* g, void* dh, void* dr, int64_t rows, int n) {
  return layernorm_backward_workspace(static_cast<DType>(dt),
                                      bwd_args(dy, h, g, nullptr, nullptr, dh, dr, nullptr, nullptr, nullptr, rows, n, 0, 0, 0));
}
int emu_ln_bwd(int dt, const void* dy, const void* h, const float* g, const float* mean, const float* rstd, void* dh,
               void* dr, float* dg, float* db, float* ws, int64_t rows, int n, float p, uint64_t seed, uint64_t offset) {
  return layernorm_backward(static_cast<DType>(dt),
                            bwd_args(dy, h, g, mean, rstd, dh, dr, dg, db, ws, rows, n, p, seed, offset), nullptr);
}
int emu_gelu_fwd(int dt, const void* x, const float* b, void* y, int64_t rows, int n, int tanh_approx) {
  return bias_gelu_forward(static_cast<DType>(dt), x, b, y, rows, n, tanh_approx != 0, nullptr);
}
size_t emu_gelu_bwd_ws(int dt, int64_t rows, int n) { return bias_gelu_backward_workspace(static_cast<DType>(dt), rows, n); }
int emu_gelu_bwd(int dt, const void* dy, const void* x, const float* b, void* dx, float* db, float* ws, int64_t rows,
                 int n, int tanh_approx) {
  return bias_gelu_backward(static_cast<DType>(dt), dy, x, b, dx, db, ws, rows, n, tanh_approx != 0, nullptr);
}
}
"""


# Static shared arrays as the host emulation compiles them (see csrc/cuda/host_emulation.h).
_SHARED_ARRAY = re.compile(r"(?<!extern )__shared__\s+([\w:<>]+)\s+(\w+)\s*((?:\[[^\]]+\])+)\s*;")


def emulation_source(text: str) -> str:
    """A .cu/.cuh source for the host emulation: ``__shared__ T name[dims];`` -> ``MPO_EMU_SHARED(T, name, [dims]);``."""
    return _SHARED_ARRAY.sub(r"MPO_EMU_SHARED(\1, \2, \3);", text)


def _build_emulation(out_dir: Path, sources: dict[str, str] | None = None, harness: str | None = _EMU_HARNESS) -> Path:
    """Compile CUDA sources for host emulation (default csrc/cuda/*.cu, else ``sources``: name -> text,
    next to csrc/cuda's headers) plus the harness into one shared library."""
    nvcc = nvcc_tools.find_nvcc()
    if nvcc is None:
        pytest.skip("nvcc (and with it the CUDA headers) not found")
    cxx = os.environ.get("CXX") or shutil.which("g++") or shutil.which("c++")
    assert cxx, "a host C++ compiler is needed (the extension build needs one too)"
    src_dir = out_dir / "src"
    src_dir.mkdir()
    for path in (ROOT / "csrc" / "cuda").iterdir():
        text = path.read_text()
        (src_dir / path.name).write_text(emulation_source(text) if path.suffix in (".cu", ".cuh") else text)
    for name, text in (sources or {}).items():
        (src_dir / name).write_text(emulation_source(text))
    units = sorted(src_dir.glob("*.cu")) if sources is None else [src_dir / name for name in sources]
    flags = ["-std=c++20", "-O1", "-fPIC", "-pthread", "-DMPO_CUDA_HOST_EMULATION",
             *nvcc_tools.TORCH_NVCC_FLAGS[:-1], f"-I{src_dir}", *(f"-I{d}" for d in nvcc_tools.cuda_include_dirs(nvcc))]
    jobs = [[cxx, *flags, "-x", "c++", "-include", "host_emulation.h", "-c", str(src), "-o", str(out_dir / f"{src.stem}.o")]
            for src in units]
    if harness is not None:
        (out_dir / "harness.cpp").write_text(harness)
        jobs.append([cxx, *flags, "-c", str(out_dir / "harness.cpp"), "-o", str(out_dir / "harness.o")])
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        procs = list(pool.map(lambda cmd: subprocess.run(cmd, capture_output=True, text=True, check=False), jobs))
    for cmd, proc in zip(jobs, procs):
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{proc.stderr[-4000:]}"
    lib = out_dir / "libmpo_emu.so"
    subprocess.run([cxx, "-shared", "-pthread", *map(str, sorted(out_dir.glob("*.o"))), "-o", str(lib)], check=True)
    return lib


class EmulatedKernels:
    """The CUDA kernels under host emulation, behind the CUDA ops' signatures of mpo_core._C
    (same argument handling as csrc/cuda/glue.cpp), on CPU tensors."""

    DTYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 2}

    def __init__(self, path: Path):
        V, I64, I, F32, U64 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int, ctypes.c_float, ctypes.c_uint64
        self.lib = lib = ctypes.CDLL(str(path))
        lib.emu_ln_fwd.argtypes = [I, V, V, V, V, V, V, V, V, I64, I, F32, F32, U64, U64]
        lib.emu_ln_bwd_ws.argtypes = [I, V, V, V, V, V, I64, I]
        lib.emu_ln_bwd_ws.restype = ctypes.c_size_t
        lib.emu_ln_bwd.argtypes = [I, V, V, V, V, V, V, V, V, V, V, I64, I, F32, U64, U64]
        lib.emu_gelu_fwd.argtypes = [I, V, V, V, I64, I, I]
        lib.emu_gelu_bwd_ws.argtypes = [I, I64, I]
        lib.emu_gelu_bwd_ws.restype = ctypes.c_size_t
        lib.emu_gelu_bwd.argtypes = [I, V, V, V, V, V, V, I64, I, I]

    @staticmethod
    def _ptr(t):
        return None if t is None else t.data_ptr()

    @staticmethod
    def _f32(t):
        return None if t is None else t.float().contiguous()

    def residual_layernorm_forward(self, x, residual, weight, bias, eps):
        return self.residual_dropout_layernorm_forward(x, residual, weight, bias, 0.0, 0, 0, eps)

    def residual_dropout_layernorm_forward(self, x, r, weight, bias, p, seed, offset, eps):
        x, P = x.contiguous(), self._ptr
        r = None if r is None else r.contiguous()
        w, b = self._f32(weight), self._f32(bias)
        n = x.shape[-1]
        rows = x.numel() // n
        y, h = torch.empty_like(x), (x if r is None else torch.empty_like(x))
        mean, rstd = torch.empty(rows), torch.empty(rows)
        rc = self.lib.emu_ln_fwd(self.DTYPES[x.dtype], P(x), P(r), P(w), P(b), P(y), None if r is None else P(h),
                                 P(mean), P(rstd), rows, n, eps, p, seed % 2**64, offset % 2**64)
        assert rc == 0, f"layernorm_forward returned cudaError {rc}"
        return y, h, mean, rstd

    def _backward(self, dy, h, weight, mean, rstd, want_dr, p, seed, offset):
        dy, h, P = dy.contiguous(), h.contiguous(), self._ptr
        w = self._f32(weight)
        n = h.shape[-1]
        rows = h.numel() // n
        dh = torch.empty_like(h)
        dr = torch.empty_like(h) if want_dr else None
        dw, db = (torch.empty(n), torch.empty(n)) if w is not None else (None, None)
        dt = self.DTYPES[h.dtype]
        ws = torch.empty(self.lib.emu_ln_bwd_ws(dt, P(dy), P(h), P(w), P(dh), P(dr), rows, n))
        rc = self.lib.emu_ln_bwd(dt, P(dy), P(h), P(w), P(mean), P(rstd), P(dh), P(dr), P(dw), P(db),
                                 P(ws) if ws.numel() else None, rows, n, p, seed % 2**64, offset % 2**64)
        assert rc == 0, f"layernorm_backward returned cudaError {rc}"
        if w is not None:
            dw, db = dw.to(weight.dtype), db.to(weight.dtype)
        return dh, dr, dw, db

    def residual_layernorm_backward(self, dy, h, weight, mean, rstd):
        dh, _, dw, db = self._backward(dy, h, weight, mean, rstd, False, 0.0, 0, 0)
        return dh, dw, db

    def residual_dropout_layernorm_backward(self, dy, h, weight, mean, rstd, p, seed, offset):
        return self._backward(dy, h, weight, mean, rstd, True, p, seed, offset)

    def bias_gelu_forward(self, x, bias, approximate="none"):
        x, b, P = x.contiguous(), self._f32(bias), self._ptr
        y = torch.empty_like(x)
        n = x.shape[-1]
        rc = self.lib.emu_gelu_fwd(self.DTYPES[x.dtype], P(x), P(b), P(y), x.numel() // n, n, approximate == "tanh")
        assert rc == 0, f"bias_gelu_forward returned cudaError {rc}"
        return y

    def bias_gelu_backward(self, dy, x, bias, approximate="none"):
        x, dy, b, P = x.contiguous(), dy.contiguous(), self._f32(bias), self._ptr
        n = x.shape[-1]
        rows, dt = x.numel() // n, self.DTYPES[x.dtype]
        dx, dbias = torch.empty_like(x), torch.empty(n)
        ws = torch.empty(self.lib.emu_gelu_bwd_ws(dt, rows, n))
        rc = self.lib.emu_gelu_bwd(dt, P(dy), P(x), P(b), P(dx), P(dbias), P(ws) if ws.numel() else None, rows, n,
                                   approximate == "tanh")
        assert rc == 0, f"bias_gelu_backward returned cudaError {rc}"
        return dx, dbias.to(bias.dtype)


@pytest.fixture(scope="module", params=["emulated", pytest.param("cuda", marks=[pytest.mark.cuda, requires_gpu])])
def kernels(request, tmp_path_factory):
    """(ops, device): the CUDA kernels on a GPU, or under host emulation on the CPU."""
    if request.param == "emulated":
        return EmulatedKernels(_build_emulation(tmp_path_factory.mktemp("cuda_emu"))), "cpu"
    ext = extension()
    if ext is None or not ext.WITH_CUDA:
        pytest.fail("a GPU is present but mpo_core._C was not built with CUDA (need a CUDA torch + nvcc)")
    return ext, "cuda"


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("n", [1, 7, 64, 512, 768, 1000, 1001, 1024, 3072, 4099, 8192])
@pytest.mark.parametrize("residual,affine", [(True, "both"), (False, "none"), (True, "weight")])
def test_cuda_layernorm_matches_torch(kernels, dtype, n, residual, affine):
    ops, device = kernels
    lead = (3, 37) if device == "cuda" else (3, 5)  # the emulation runs its blocks one by one
    _check(ops, (*lead, n), dtype, residual, affine, device=device, seed=n)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_cuda_layernorm_misaligned_and_many_rows(kernels, dtype):
    """Views starting one element into their storage take the scalar (unaligned) path and must
    agree with the vector path; many rows exercise the persistent backward's row loop and its
    partial dgamma/dbeta rows (the emulated device has 2 SMs, so 300 rows suffice there)."""
    CC, device = kernels
    for n in (64, 768):
        _check(CC, (20000 if device == "cuda" else 300, n), dtype, True, "both", device=device, seed=n)
        x, r, w, b, dy = _inputs((5, n), dtype, True, "both", device=device, seed=n + 1)

        def shifted(t):
            buf = torch.empty(t.numel() + 1, device=t.device, dtype=t.dtype)
            view = buf[1:].view(t.shape)
            view.copy_(t)
            return view

        vec = CC.residual_layernorm_forward(x, r, w, b, 1e-5)
        sca = CC.residual_layernorm_forward(shifted(x), shifted(r), w, b, 1e-5)
        for name, a, c in zip(("y", "h", "mean", "rstd"), sca, vec):
            _close(a, c, 4 * TOL[dtype], f"unaligned {name}")
        y, h, mean, rstd = vec
        vec_b = CC.residual_layernorm_backward(dy, h, w, mean, rstd)
        sca_b = CC.residual_layernorm_backward(shifted(dy), shifted(h), w, mean, rstd)
        for name, a, c in zip(("dh", "dweight", "dbias"), sca_b, vec_b):
            _close(a, c, 4 * TOL[dtype], f"unaligned {name}")


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("n", [768, 1001])
def test_cuda_dropout_mask_is_philox_and_backward_recomputes_it(kernels, dtype, n):
    CC, device = kernels
    rows, p, seed, offset = 64, 0.25, 1234, 7
    g = torch.Generator().manual_seed(n)
    r = (torch.rand(rows, n, generator=g) + 0.5).to(device, dtype)  # nonzero everywhere
    zero = torch.zeros_like(r)
    w = torch.randn(n, generator=g).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype)
    keep = cuda_keep_mask(rows, n, p, seed, offset).to(device)
    scale = 1.0 / (1.0 - float(np.float32(p)))

    # x = 0: h is exactly the dropped-out r, so the mask is observed bit for bit.
    _, h, _, _ = CC.residual_dropout_layernorm_forward(zero, r, w, b, p, seed, offset, 1e-5)
    assert torch.equal(h != 0, keep)
    torch.testing.assert_close(h, (r.float() * keep * scale).to(dtype), rtol=TOL[dtype], atol=0)

    x = torch.randn(rows, n, generator=g).to(device, dtype)
    y, h, mean, rstd = CC.residual_dropout_layernorm_forward(x, r, w, b, p, seed, offset, 1e-5)
    again = CC.residual_dropout_layernorm_forward(x, r, w, b, p, seed, offset, 1e-5)
    assert all(torch.equal(a, c) for a, c in zip((y, h, mean, rstd), again)), "not deterministic"
    h_ref = (x.float() + r.float() * keep * scale).to(dtype)
    torch.testing.assert_close(h, h_ref, rtol=TOL[dtype], atol=TOL[dtype])
    y_plain, *_ = CC.residual_layernorm_forward(h, None, w, b, 1e-5)
    torch.testing.assert_close(y, y_plain, rtol=TOL[dtype], atol=TOL[dtype])

    dy = torch.randn(rows, n, generator=g).to(device, dtype)
    dx, dr, dw, db = CC.residual_dropout_layernorm_backward(dy, h, w, mean, rstd, p, seed, offset)
    dh, dw0, db0 = CC.residual_layernorm_backward(dy, h, w, mean, rstd)
    assert torch.equal(dx, dh) and torch.equal(dw, dw0) and torch.equal(db, db0)
    torch.testing.assert_close(dr, (dh.float() * keep * scale).to(dtype), rtol=TOL[dtype], atol=TOL[dtype])
    assert torch.equal(dr != 0, keep & (dh != 0))

    _, other, _, _ = CC.residual_dropout_layernorm_forward(zero, r, w, b, p, seed, offset + 1, 1e-5)
    assert not torch.equal(other != 0, keep), "a new offset must draw a new mask"
    _, h0, _, _ = CC.residual_dropout_layernorm_forward(x, r, w, b, 0.0, seed, offset, 1e-5)
    assert torch.equal(h0, (x.float() + r.float()).to(dtype))
    _, h1, _, _ = CC.residual_dropout_layernorm_forward(x, r, w, b, 1.0, seed, offset, 1e-5)
    assert torch.equal(h1, x)


@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(7, 1), (7, 5), (2, 9, 768), (33, 1001), (300, 3072)])
def test_cuda_bias_gelu_matches_torch(kernels, dtype, approximate, shape):
    CC, device = kernels
    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(*shape, generator=g) * 3).to(device, dtype)
    bias = torch.randn(shape[-1], generator=g).to(device, dtype)
    dy = torch.randn(*shape, generator=g).to(device, dtype)
    xl, bl = x.double().requires_grad_(True), bias.double().requires_grad_(True)
    ref = F.gelu(xl + bl, approximate=approximate)
    ref.backward(dy.double())
    y = CC.bias_gelu_forward(x, bias, approximate)
    dx, dbias = CC.bias_gelu_backward(dy, x, bias, approximate)
    assert y.dtype == dx.dtype == dbias.dtype == dtype
    # float32 arithmetic (atol), one rounding to the output dtype (rtol)
    _close(y, ref.detach(), TOL[dtype], "y", 1e-5)
    _close(dx, xl.grad, TOL[dtype], "dx", 1e-5)
    _close(dbias, bl.grad, TOL[dtype], "dbias", 1e-4)  # float32 sums of float32 dx, rounded once


@pytest.mark.cuda
@requires_gpu
def test_cuda_only_ops_reject_bad_input(C):
    """The argument checks of the torch glue (only a CUDA build has it)."""
    if not C.WITH_CUDA:
        pytest.fail("a GPU is present but mpo_core._C was built without CUDA (need a CUDA torch + nvcc)")
    CC = C
    x = torch.randn(4, 8, device="cuda")
    bias = torch.randn(8, device="cuda")
    with pytest.raises(ValueError, match="CUDA-only kernel.*torch reference path"):
        CC.bias_gelu_forward(x.cpu(), bias.cpu(), "none")
    with pytest.raises(ValueError, match="CUDA-only kernel"):
        CC.residual_dropout_layernorm_forward(x.cpu(), x.cpu(), None, None, 0.1, 0, 0, 1e-5)
    with pytest.raises(ValueError, match="approximate must be 'none' or 'tanh'"):
        CC.bias_gelu_forward(x, bias, "fast")
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        CC.bias_gelu_forward(x, bias[:4], "none")
    with pytest.raises(TypeError, match="float64 runs on the torch path"):
        CC.residual_layernorm_forward(x.double(), None, None, None, 1e-5)
    with pytest.raises(ValueError, match="must be <= 8192"):
        CC.residual_layernorm_forward(torch.randn(2, 8193, device="cuda"), None, None, None, 1e-5)
    with pytest.raises(ValueError, match=r"p must be in \[0, 1\]"):
        CC.residual_dropout_layernorm_forward(x, x, None, None, 1.5, 0, 0, 1e-5)
    with pytest.raises(ValueError, match="residual must be on the same device as x"):
        CC.residual_layernorm_forward(x, x.cpu(), None, None, 1e-5)



# ---------------------------------------------------------------------------------------------
# The host emulation itself must expose what a GPU would: a kernel with a deliberate shared-memory
# bug gives a wrong answer under it. Each variant below was written so that the previous emulation
# (zero-filled statics shared by blocks run in order, threads in index order) passed it.

_PROBE = r"""
// Variant 0 is correct; 1..4 each carry one bug a GPU would expose.
__global__ void probe_kernel(const float* in, float* out, int valid, int variant) {
  __shared__ float buf[64];
  __shared__ float table[64];
  __shared__ float slot[1];
  const int t = threadIdx.x;
  const float* src = in + blockIdx.x * 64;
  if (variant != 4 || blockIdx.x == 0) table[t] = 0.5f * t;  // 4: only the first block fills its table
  if (variant != 1) buf[t] = t < valid ? src[t] : 0.0f;       // 1: the padding is never written ...
  else if (t < valid) buf[t] = src[t];
  if (variant != 2) __syncthreads();                          // 2: the previous thread's value, unsynchronised
  float acc = buf[t] * (t < valid ? 1.0f : 0.0f)              // ... and read times zero
              + (t > 0 ? buf[t - 1] : 0.0f) + table[t];
  for (int round = 0; round < 2; ++round) {
    if (t == 0) slot[0] = src[round];  // thread 0 publishes one value per round
    __syncthreads();
    acc += slot[0] * (round + 1);
    if (variant != 3) __syncthreads();  // 3: the next round's write races this read
  }
  out[blockIdx.x * 64 + t] = acc;
}
extern "C" void probe(const float* in, float* out, int blocks, int valid, int variant) {
  MPO_LAUNCH(dim3(blocks), dim3(64), 0, 0, probe_kernel)(in, out, valid, variant);
}
"""


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    lib = ctypes.CDLL(str(_build_emulation(tmp_path_factory.mktemp("emu_probe"), {"probe.cu": _PROBE}, harness=None)))
    lib.probe.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_int, ctypes.c_int]

    def run(x: torch.Tensor, valid: int, variant: int) -> torch.Tensor:
        out = torch.empty_like(x)
        lib.probe(x.data_ptr(), out.data_ptr(), x.shape[0], valid, variant)
        return out

    return run


def _probe_reference(x: torch.Tensor, valid: int) -> torch.Tensor:
    t = torch.arange(64)
    buf = torch.where(t < valid, x, torch.zeros(()))
    prev = torch.cat([torch.zeros(x.shape[0], 1), buf[:, :-1]], 1)
    return buf + prev + 0.5 * t + x[:, :1] + 2 * x[:, 1:2]


def test_emulation_runs_the_correct_probe_exactly(probe):
    x = torch.randn(7, 64, dtype=torch.float32)
    for _ in range(3):  # a new schedule each launch
        torch.testing.assert_close(probe(x, 50, 0), _probe_reference(x, 50))


@pytest.mark.parametrize("variant,bug", [(1, "uninitialised padding read"), (2, "missing barrier before a neighbour read"),
                                         (3, "missing barrier before shared memory is reused"),
                                         (4, "shared memory assumed to survive from another block")])
def test_emulation_exposes_shared_memory_bugs(probe, variant, bug):
    x = torch.randn(7, 64, dtype=torch.float32)
    got = probe(x, 50, variant)
    assert not torch.allclose(got, _probe_reference(x, 50), equal_nan=False), f"emulation missed: {bug}"


def test_emulation_source_rewrites_static_shared_arrays():
    src = "  __shared__ float partial[kLanes][kColumns + 1];\n  extern __shared__ float4 dyn[];\n"
    assert emulation_source(src) == "  MPO_EMU_SHARED(float, partial, [kLanes][kColumns + 1]);\n  extern __shared__ float4 dyn[];\n"
