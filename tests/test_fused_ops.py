"""Triton fused kernels (LayerNorm, residual + dropout + LayerNorm, bias + GELU) vs the torch reference.

On CPU the kernels run under TRITON_INTERPRET=1 (set by conftest) through ``backend="triton"``;
shapes are small because the interpreter is slow. Tolerances: fp32 ``1e-5`` (abs and rel);
fp16 ``1e-2`` (one fp16 ulp of values up to ~8, both sides round an fp32 result); bf16
``2e-2`` (one to two bf16 ulps: the interpreter's bf16 rounding may differ from torch's).
"""
from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpo_core import ops
from mpo_core.ops import reference

TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float16: dict(atol=1e-2, rtol=1e-2),
       torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
SHAPES = [(1, 1), (3, 7), (5, 33), (17, 64), (9, 255), (4, 1000), (2, 1024)]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
AFFINE = ["weight+bias", "weight", "bias", "none"]


def _make(shape, dtype, affine="weight+bias", device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    n = shape[-1]

    def rand(*s):
        return torch.randn(*s, generator=g).to(device=device, dtype=dtype).requires_grad_()

    x, r, dy = rand(*shape), rand(*shape), torch.randn(*shape, generator=g).to(device=device, dtype=dtype)
    w = (1.0 + 0.5 * torch.randn(n, generator=g)).to(device=device, dtype=dtype).requires_grad_() \
        if "weight" in affine else None
    b = rand(n) if "bias" in affine else None
    return x, r, w, b, dy


def _grads(out, inputs, dy):
    return torch.autograd.grad(out, [t for t in inputs if t is not None], dy)


def _check(kernel, ref, inputs, dy, dtype, scale=1.0, grad_scale=None):
    """Output and gradients of ``kernel(*inputs)`` vs ``ref`` (float64 copies for fp32 inputs).

    ``scale`` multiplies the absolute tolerance of the output, ``grad_scale`` (default
    ``scale``) that of the gradients (parameter gradients sum over rows).
    """
    y = kernel(*inputs)
    grads = _grads(y, inputs, dy)
    if dtype == torch.float32:  # fp64 reference: the kernel's own fp32 error is what is measured
        inputs = [None if t is None else t.detach().double().requires_grad_() for t in inputs]
        dy = dy.double()
    y_ref = ref(*inputs)
    grads_ref = [g.to(dtype) for g in _grads(y_ref, inputs, dy)]
    tol = TOL[dtype]
    grad_scale = scale if grad_scale is None else grad_scale
    for actual, expected, s in [(y, y_ref.to(dtype), scale)] + [(a, e, grad_scale) for a, e in zip(grads, grads_ref)]:
        assert actual.dtype == expected.dtype and actual.shape == expected.shape
        torch.testing.assert_close(actual, expected, atol=tol["atol"] * s, rtol=tol["rtol"])


# ------------------------------------------------------------------------------------------------ LayerNorm
def _ln(backend, eps=1e-5):
    return lambda x, w, b: ops.layer_norm(x, w, b, eps=eps, backend=backend)


def _ln_ref(eps=1e-5):
    return lambda x, w, b: reference.layer_norm(x, w, b, eps=eps)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", AFFINE)
def test_layer_norm_fp32_matches_reference(shape, affine):
    x, _, w, b, dy = _make(shape, torch.float32, affine)
    _check(_ln("triton"), _ln_ref(), [x, w, b], dy, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("shape", [(5, 33), (9, 255)])
def test_layer_norm_half_io(dtype, shape):
    x, _, w, b, dy = _make(shape, dtype)
    # dweight/dbias sum over rows: scale the absolute tolerance by sqrt(rows)
    _check(_ln("triton"), _ln_ref(), [x, w, b], dy, dtype, grad_scale=shape[0] ** 0.5)


def test_layer_norm_hidden_8192_and_batched_dims():
    x, _, w, b, dy = _make((2, 1, 8192), torch.float32)
    _check(_ln("triton"), _ln_ref(), [x, w, b], dy, torch.float32, grad_scale=10.0)


def test_layer_norm_row_too_long_for_registers():
    from mpo_core.kernels.layer_norm import block_and_warps

    assert block_and_warps(16384, 4)[0] == 16384
    with pytest.raises(ValueError, match="hidden size 16385"):
        block_and_warps(16385, 4)


def test_layer_norm_bwd_no_rows_gives_zero_parameter_grads():
    from mpo_core.kernels.layer_norm import layer_norm_bwd

    w, b, stats = torch.ones(6), torch.zeros(6), torch.empty(0)
    dh, dw, db = layer_norm_bwd(torch.empty(0, 6), torch.empty(0, 6), w, b, stats, stats)
    assert dh.shape == (0, 6)
    assert torch.equal(dw, torch.zeros(6)) and torch.equal(db, torch.zeros(6))


# ---------------------------------------------------------------------------- residual + dropout + LayerNorm
def _rln(backend, eps=1e-5, **kw):
    return lambda x, r, w, b: ops.residual_layer_norm(x, r, w, b, eps=eps, backend=backend, **kw)


def _rln_ref(eps=1e-5, **kw):
    return lambda x, r, w, b: reference.residual_layer_norm(x, r, w, b, eps, **kw)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("affine", ["weight+bias", "none"])
def test_residual_layer_norm_fp32_matches_reference(shape, affine):
    x, r, w, b, dy = _make(shape, torch.float32, affine)
    _check(_rln("triton", eps=1e-6), _rln_ref(eps=1e-6), [x, r, w, b], dy, torch.float32)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_residual_layer_norm_half_io(dtype):
    x, r, w, b, dy = _make((7, 96), dtype)
    # the kernel rounds h = x + r to the storage dtype before normalizing (as torch eager
    # would), the reference does not: allow two ulps
    _check(_rln("triton"), _rln_ref(), [x, r, w, b], dy, dtype, scale=2.0, grad_scale=4.0)


def test_dropout_p0_is_exactly_residual_add_layer_norm():
    x, r, w, b, _ = _make((6, 50), torch.float32)
    fused = ops.residual_layer_norm(x, r, w, b, dropout_p=0.0, seed=3, backend="triton")
    plain = ops.layer_norm(x + r, w, b, backend="triton")
    assert torch.equal(fused, plain)
    evaluated = ops.residual_layer_norm(x, r, w, b, dropout_p=0.5, training=False, seed=3, backend="triton")
    assert torch.equal(evaluated, plain)


@pytest.mark.parametrize("p", [0.1, 0.5, 0.9])
def test_dropout_mask_fraction_and_backward_recomputes_forward_mask(p):
    from mpo_core.kernels.residual_layer_norm import residual_layer_norm_fwd

    x, r, w, b, dy = _make((40, 97), torch.float32, seed=1)
    seed = 1234
    _, h, _, _ = residual_layer_norm_fwd(x.detach(), r.detach(), w.detach(), b.detach(), 1e-5, p, seed)
    keep = (h - x.detach()) != 0  # r is Gaussian: a kept element is never exactly 0
    dropped = 1.0 - keep.float().mean().item()
    assert abs(dropped - p) < 4 * (p * (1 - p) / keep.numel()) ** 0.5
    torch.testing.assert_close(h[keep], (x + r / (1 - p)).detach()[keep], atol=1e-5, rtol=1e-5)
    # the op (same seed) against the reference applied with the mask recovered from h - x:
    # output and every gradient, so the backward's recomputed mask is the forward's
    _check(_rln("triton", dropout_p=p, seed=seed), _rln_ref(keep_mask=keep, dropout_p=p), [x, r, w, b], dy,
           torch.float32, grad_scale=10.0)
    dr, = _grads(ops.residual_layer_norm(x, r, w, b, dropout_p=p, seed=seed, backend="triton"), [r], dy)
    assert torch.equal(dr != 0, keep)  # dr vanishes exactly where the forward dropped


def test_dropout_same_seed_same_output_other_seed_differs():
    x, r, w, b, _ = _make((8, 64), torch.float32)
    a = ops.residual_layer_norm(x, r, w, b, dropout_p=0.3, seed=7, backend="triton")
    again = ops.residual_layer_norm(x, r, w, b, dropout_p=0.3, seed=7, backend="triton")
    other = ops.residual_layer_norm(x, r, w, b, dropout_p=0.3, seed=8, backend="triton")
    assert torch.equal(a, again)
    assert not torch.equal(a, other)
    torch.manual_seed(0)
    drawn = ops.residual_layer_norm(x, r, w, b, dropout_p=0.3, backend="triton")
    torch.manual_seed(0)
    assert torch.equal(drawn, ops.residual_layer_norm(x, r, w, b, dropout_p=0.3, backend="triton"))


def test_dropout_p1_drops_the_whole_residual():
    x, r, w, b, dy = _make((4, 24), torch.float32)
    y = ops.residual_layer_norm(x, r, w, b, dropout_p=1.0, seed=1, backend="triton")
    assert torch.equal(_grads(y, [r], dy)[0], torch.zeros_like(r))
    _check(lambda x, w, b: ops.residual_layer_norm(x, r, w, b, dropout_p=1.0, seed=1, backend="triton"),
           _ln_ref(), [x, w, b], dy, torch.float32)


# ---------------------------------------------------------------------------------------------- bias + GELU
def _gelu(backend, activation):
    return lambda x, b: ops.bias_gelu(x, b, activation=activation, backend=backend)


def _gelu_ref(activation):
    return lambda x, b: reference.bias_gelu(x, b, activation=activation)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.parametrize("with_bias", [True, False])
def test_bias_gelu_fp32_matches_reference(shape, activation, with_bias):
    x, _, _, b, dy = _make(shape, torch.float32, "bias" if with_bias else "none")
    # dbias sums over rows
    _check(_gelu("triton", activation), _gelu_ref(activation), [x, b], dy, torch.float32,
           grad_scale=shape[0] ** 0.5)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_bias_gelu_half_io(dtype, activation):
    x, _, _, b, dy = _make((33, 70), dtype, "bias")
    _check(_gelu("triton", activation), _gelu_ref(activation), [x, b], dy, dtype, grad_scale=33 ** 0.5)


def test_bias_gelu_many_rows_split_over_programs():
    # more row blocks than backward programs: each program loops over several blocks (n = 3: blocks of
    # 1024 rows, so 5000 rows are 5 blocks for 4 programs on CPU; dbias accumulates over the loop)
    x, _, _, b, dy = _make((5000, 3), torch.float32, "bias")
    _check(_gelu("triton", "gelu"), _gelu_ref("gelu"), [x, b], dy, torch.float32, grad_scale=20.0)


# ------------------------------------------------------------------------------------- property-based tests
shapes = st.tuples(st.integers(1, 24), st.integers(1, 200))


@settings(max_examples=25)
@given(shape=shapes, affine=st.sampled_from(AFFINE), with_residual=st.booleans(),
       eps=st.sampled_from([1e-5, 1e-12, 0.1]))
def test_property_layer_norms_match_reference(shape, affine, with_residual, eps):
    x, r, w, b, dy = _make(shape, torch.float32, affine, seed=shape[0] * 1000 + shape[1])
    if with_residual:
        _check(_rln("triton", eps), _rln_ref(eps), [x, r, w, b], dy, torch.float32, scale=10.0,
               grad_scale=10.0 * shape[0] ** 0.5)
    else:
        _check(_ln("triton", eps), _ln_ref(eps), [x, w, b], dy, torch.float32, scale=10.0,
               grad_scale=10.0 * shape[0] ** 0.5)


@settings(max_examples=25)
@given(shape=shapes, activation=st.sampled_from(["gelu", "gelu_tanh"]), with_bias=st.booleans())
def test_property_bias_gelu_matches_reference(shape, activation, with_bias):
    x, _, _, b, dy = _make(shape, torch.float32, "bias" if with_bias else "none", seed=shape[0] + 7 * shape[1])
    _check(_gelu("triton", activation), _gelu_ref(activation), [x, b], dy, torch.float32,
           grad_scale=shape[0] ** 0.5)


# ----------------------------------------------------------------------------------------- on a real GPU
def _gpu_backends():
    from mpo_core import backends

    return ["triton"] + (["cuda"] if backends()["cuda"] else [])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 1), (37, 768), (130, 1024), (8, 3072), (4, 8192)])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_layer_norms_match_reference(dtype, shape, with_residual):
    for backend in _gpu_backends():
        x, r, w, b, dy = _make(shape, dtype, device="cuda")
        scale = 2.0 if dtype != torch.float32 else 10.0
        if with_residual:
            _check(_rln(backend), _rln_ref(), [x, r, w, b], dy, dtype, scale, scale * shape[0] ** 0.5)
        else:
            _check(_ln(backend), _ln_ref(), [x, w, b], dy, dtype, scale, scale * shape[0] ** 0.5)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_bias_gelu_matches_reference(dtype, activation):
    for backend in _gpu_backends():
        x, _, _, b, dy = _make((1000, 3072), dtype, "bias", device="cuda")
        _check(_gelu(backend, activation), _gelu_ref(activation), [x, b], dy, dtype, grad_scale=1000 ** 0.5)


@pytest.mark.parametrize("p", [0.1, 0.5])
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gpu_dropout_backward_matches_forward_mask(p):
    for backend in _gpu_backends():
        x, r, w, b, dy = _make((256, 1024), torch.float32, device="cuda")
        y = ops.residual_layer_norm(x, r, w, b, dropout_p=p, seed=11, backend=backend)
        assert torch.equal(y, ops.residual_layer_norm(x, r, w, b, dropout_p=p, seed=11, backend=backend))
        dr, = _grads(y, [r], dy)
        keep = dr != 0
        assert abs((1 - keep.float().mean().item()) - p) < 0.01
        _check(_rln(backend, dropout_p=p, seed=11), _rln_ref(keep_mask=keep, dropout_p=p), [x, r, w, b], dy,
               torch.float32, scale=10.0, grad_scale=100.0)
