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


def _close(actual, expected, tol, what):
    torch.testing.assert_close(
        actual.double(), expected.double(), rtol=tol, atol=tol, msg=lambda m: f"{what}: {m}"
    )


def _check(C, shape, dtype, residual, affine, eps=1e-5, seed=0, device="cpu"):
    """Our forward and backward against the float64 reference, on any device."""
    x, r, w, b, dy = _inputs(shape, dtype, residual, affine, device=device, seed=seed)
    y, h, mean, rstd = C.residual_layernorm_forward(x, r, w, b, eps)
    assert y.device == h.device == mean.device == x.device
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
    stats_tol = 1e-12 if dtype == torch.float64 else 1e-5  # float32 statistics otherwise
    _close(mean, rmean, stats_tol, "mean")
    _close(rstd, rrstd, stats_tol * max(1.0, float(rrstd.max())), "rstd")
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
# Dropout mask reference: Philox4x32-10 in numpy (the kernels' csrc/cuda/philox.cuh).

_M32 = np.uint64(0xFFFFFFFF)


def philox4x32_10(counter, key):
    """Philox4x32-10 of 4 counter words and 2 key words (numpy uint arrays or ints)."""
    c0, c1, c2, c3 = (np.asarray(c, dtype=np.uint64) for c in counter)
    k0, k1 = (np.asarray(k, dtype=np.uint64) for k in key)
    m0, m1 = np.uint64(0xD2511F53), np.uint64(0xCD9E8D57)
    w0, w1 = np.uint64(0x9E3779B9), np.uint64(0xBB67AE85)
    for _ in range(10):
        p0, p1 = m0 * c0, m1 * c2  # < 2^64: exact in uint64
        c0, c1, c2, c3 = (p1 >> np.uint64(32)) ^ c1 ^ k0, p1 & _M32, (p0 >> np.uint64(32)) ^ c3 ^ k1, p0 & _M32
        k0, k1 = (k0 + w0) & _M32, (k1 + w1) & _M32
    return c0, c1, c2, c3


def dropout_keep_mask(numel, p, seed, offset):
    """Keep mask of flat elements 0..numel-1, as LayerNormForwardArgs in kernels.h defines it."""
    e = np.arange(numel, dtype=np.uint64)
    block = e >> np.uint64(2)
    seed, offset = seed % 2**64, offset % 2**64
    words = philox4x32_10(
        (block & _M32, block >> np.uint64(32), offset & 0xFFFFFFFF, offset >> 32),
        (seed & 0xFFFFFFFF, seed >> 32),
    )
    bits = np.choose((e & np.uint64(3)).astype(np.int64), [np.broadcast_to(w, e.shape) for w in words])
    u = (bits >> np.uint64(8)).astype(np.float32) * np.float32(2.0**-24)
    return u < np.float32(1.0 - float(np.float32(p)))


def test_numpy_philox_reference_matches_random123_known_answers():
    kat = [
        ((0, 0, 0, 0), (0, 0), (0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8)),
        ((0xFFFFFFFF,) * 4, (0xFFFFFFFF,) * 2, (0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD)),
        ((0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344), (0xA4093822, 0x299F31D0),
         (0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1)),
    ]
    for counter, key, want in kat:
        assert tuple(int(w) for w in philox4x32_10(counter, key)) == want
    keep = dropout_keep_mask(40000, 0.3, seed=5, offset=11)
    assert abs(keep.mean() - 0.7) < 4 * (0.21 / 40000) ** 0.5
    assert dropout_keep_mask(16, 0.0, 1, 2).all() and not dropout_keep_mask(16, 1.0, 1, 2).any()


# ---------------------------------------------------------------------------------------------
# CUDA kernels (run only where a GPU is present).

requires_gpu = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
LOWP = [torch.float32, torch.bfloat16, torch.float16]


@pytest.fixture(scope="module")
def CC(C):
    """The extension on a GPU machine: it must have been built with its CUDA kernels."""
    if not C.WITH_CUDA:
        pytest.fail("a GPU is present but mpo_core._C was built without CUDA (need a CUDA torch + nvcc)")
    return C


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("n", [1, 7, 64, 512, 768, 1000, 1001, 1024, 3072, 4099, 8192])
@pytest.mark.parametrize("residual", [True, False], ids=["residual", "no_residual"])
@pytest.mark.parametrize("affine", ["both", "none"])
def test_cuda_layernorm_matches_torch(CC, dtype, n, residual, affine):
    _check(CC, (3, 37, n), dtype, residual, affine, device="cuda", seed=n)


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("dtype", LOWP, ids=str)
def test_cuda_layernorm_misaligned_and_many_rows(CC, dtype):
    """Views starting one element into their storage take the scalar (unaligned) path and must
    agree with the vector path; 20000 rows exercise the persistent backward's row loop and
    its partial dgamma/dbeta rows."""
    for n in (256, 768):
        _check(CC, (20000, n), dtype, True, "both", device="cuda", seed=n)
        x, r, w, b, dy = _inputs((5, n), dtype, True, "both", device="cuda", seed=n + 1)

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


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("n", [768, 1001])
def test_cuda_dropout_mask_is_philox_and_backward_recomputes_it(CC, dtype, n):
    rows, p, seed, offset = 64, 0.25, 1234, 7
    g = torch.Generator().manual_seed(n)
    r = (torch.rand(rows, n, generator=g) + 0.5).to("cuda", dtype)  # nonzero everywhere
    zero = torch.zeros_like(r)
    w = torch.randn(n, generator=g).to("cuda", dtype)
    b = torch.randn(n, generator=g).to("cuda", dtype)
    keep = torch.from_numpy(dropout_keep_mask(rows * n, p, seed, offset)).view(rows, n).to("cuda")
    scale = 1.0 / (1.0 - float(np.float32(p)))

    # x = 0: h is exactly the dropped-out r, so the mask is observed bit for bit.
    _, h, _, _ = CC.residual_dropout_layernorm_forward(zero, r, w, b, p, seed, offset, 1e-5)
    assert torch.equal(h != 0, keep)
    torch.testing.assert_close(h, (r.float() * keep * scale).to(dtype), rtol=TOL[dtype], atol=0)

    x = torch.randn(rows, n, generator=g).to("cuda", dtype)
    y, h, mean, rstd = CC.residual_dropout_layernorm_forward(x, r, w, b, p, seed, offset, 1e-5)
    again = CC.residual_dropout_layernorm_forward(x, r, w, b, p, seed, offset, 1e-5)
    assert all(torch.equal(a, c) for a, c in zip((y, h, mean, rstd), again)), "not deterministic"
    h_ref = (x.float() + r.float() * keep * scale).to(dtype)
    torch.testing.assert_close(h, h_ref, rtol=TOL[dtype], atol=TOL[dtype])
    y_plain, *_ = CC.residual_layernorm_forward(h, None, w, b, 1e-5)
    torch.testing.assert_close(y, y_plain, rtol=TOL[dtype], atol=TOL[dtype])

    dy = torch.randn(rows, n, generator=g).to("cuda", dtype)
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


@pytest.mark.cuda
@requires_gpu
@pytest.mark.parametrize("dtype", LOWP, ids=str)
@pytest.mark.parametrize("approximate", ["none", "tanh"])
@pytest.mark.parametrize("shape", [(7, 1), (7, 5), (2, 9, 768), (33, 1001), (300, 3072)])
def test_cuda_bias_gelu_matches_torch(CC, dtype, approximate, shape):
    g = torch.Generator().manual_seed(shape[-1])
    x = (torch.randn(*shape, generator=g) * 3).to("cuda", dtype)
    bias = torch.randn(shape[-1], generator=g).to("cuda", dtype)
    dy = torch.randn(*shape, generator=g).to("cuda", dtype)
    xl, bl = x.double().requires_grad_(True), bias.double().requires_grad_(True)
    ref = F.gelu(xl + bl, approximate=approximate)
    ref.backward(dy.double())
    y = CC.bias_gelu_forward(x, bias, approximate)
    dx, dbias = CC.bias_gelu_backward(dy, x, bias, approximate)
    assert y.dtype == dx.dtype == dbias.dtype == dtype
    tol = TOL[dtype] * 4
    _close(y, ref.detach(), tol, "y")
    _close(dx, xl.grad, tol, "dx")
    _close(dbias, bl.grad, tol, "dbias")  # float32 sums of float32 dx, rounded once


@pytest.mark.cuda
@requires_gpu
def test_cuda_only_ops_reject_bad_input(CC):
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

