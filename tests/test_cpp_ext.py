"""The compiled extension ``mpo_core._C`` against plain torch.

CPU: fused residual + LayerNorm forward/backward vs ``F.layer_norm(x + residual)`` and
autograd (float64 to 1e-12, float32 to ~1e-5, bf16/fp16 to a couple of ulps).
CUDA (marked ``cuda``, run only with a GPU): the same ops plus bias+GELU and
residual+dropout+LayerNorm, whose dropout mask is checked bit for bit against a numpy
Philox4x32-10 (itself checked on the Random123 known-answer vectors).
"""
from __future__ import annotations

import os

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import mpo_core
from mpo_core._backends import extension

AFFINE = ["both", "weight", "bias", "none"]
TOL = {torch.float64: 1e-12, torch.float32: 1e-5}


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


def _close(actual, expected, tol, what):
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}"
    )


def _check_cpu(C, shape, dtype, residual, affine, eps=1e-5, seed=0):
    x, r, w, b, dy = _inputs(shape, dtype, residual, affine, seed=seed)
    y, h, mean, rstd = C.residual_layernorm_forward(x, r, w, b, eps)
    ry, rh, rmean, rrstd, rdx, rdw, rdb = _reference(x, r, w, b, dy, eps)
    # Rounding errors of xhat = (h - mean) * rstd scale with |h| * rstd (cancellation in
    # h - mean), and y, dh, dweight carry a further factor |w|: tolerances are relative to it.
    cond = max(1.0, float(h.abs().max()) * float(rrstd.max()))
    cond *= 1.0 if w is None else max(1.0, float(w.abs().max()))
    tol = TOL[dtype] * cond
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    assert y.shape == x.shape and y.dtype == dtype and h.dtype == dtype
    assert mean.shape == rstd.shape == (x.numel() // shape[-1],) and mean.dtype == rstd.dtype == acc
    _close(h, rh, 0.0, "h")
    _close(y, ry, tol, "y")
    _close(mean, rmean, TOL[dtype], "mean")
    _close(rstd, rrstd, TOL[dtype] * max(1.0, float(rrstd.max())), "rstd")
    dh, dw, db = C.residual_layernorm_backward(dy, h, w, mean, rstd)
    _close(dh, rdx, tol, "dh")
    if w is None:
        assert dw is None and db is None
    else:
        rdb_ = dy.reshape(-1, shape[-1]).sum(0) if b is None else rdb
        _close(dw, rdw, tol * 10, "dweight")
        _close(db, rdb_, TOL[dtype] * 10, "dbias")


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
    _check_cpu(C, (3, 5, n), dtype, residual, affine)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=str)
@pytest.mark.parametrize("shape", [(96, 1024), (4, 128, 768), (8192, 5)])
def test_cpu_multithreaded_rows(C, dtype, shape):
    """Large enough to run on several OpenMP threads, with per-thread dweight partials."""
    threads = torch.get_num_threads()
    torch.set_num_threads(max(2, threads))
    try:
        _check_cpu(C, shape, dtype, True, "both", seed=3)
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
    _check_cpu(C, (*lead, n), dtype, residual, affine, eps=eps, seed=seed)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("n", [5, 768])
def test_cpu_reduced_precision(C, dtype, n):
    """h is x + residual rounded to the dtype (as torch does); statistics in float32."""
    x, r, w, b, dy = _inputs((6, n), dtype, True, "both", seed=1)
    y, h, mean, rstd = C.residual_layernorm_forward(x, r, w, b, 1e-5)
    ry, rh, rmean, rrstd, rdx, rdw, rdb = _reference(x, r, w, b, dy, 1e-5)
    assert mean.dtype == rstd.dtype == torch.float32
    assert torch.equal(h, rh)
    _close(mean, rmean, 1e-5, "mean")
    _close(rstd, rrstd, 1e-5, "rstd")
    ulp = 2.0**-7 if dtype == torch.bfloat16 else 2.0**-10
    _close(y, ry, 2 * ulp * float(ry.abs().max()), "y")
    dh, dw, db = C.residual_layernorm_backward(dy, h, w, mean, rstd)
    assert dh.dtype == dw.dtype == db.dtype == dtype
    _close(dh, rdx, 2 * ulp * float(rdx.abs().max()), "dh")
    # dweight/dbias: our sums are in float32, torch's in its own order: compare to float64.
    hx = ((h.double() - mean.double()[:, None]) * rstd.double()[:, None])
    _close(dw, (dy.double() * hx).sum(0).to(dtype), 2 * ulp * 8, "dweight")
    _close(db, dy.double().sum(0).to(dtype), 2 * ulp * 8, "dbias")


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
