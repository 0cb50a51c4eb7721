"""Fused MPO linear (mpo_core.ops.mpo_linear + mpo_core.kernels.mpo_matmul) vs the torch reference.

On CPU the Triton kernel runs under TRITON_INTERPRET=1 (set by conftest), forced with
``backend="triton"``. Errors are relative to the reference's largest magnitude:
``max|a - ref| / max|ref|``. Tolerances: fp32 2e-5 (observed ~5e-7); fp16 inputs
5e-3 against the fp32 reference on the same fp16 values (factors and each rebuilt
W tile are rounded to fp16 before the fp32-accumulated dot, and the interpreter
does not fuse fma).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from mpo_core.cost import choose_split, mpo_linear_cost
from mpo_core.kernels import mpo_matmul as kernel
from mpo_core.ops import mpo_linear as ops
from mpo_core.ops import BackendUnavailableError
from mpo_core.ops.mpo_linear import mpo_linear, mpo_linear_reference

# The interpreter's numpy exp overflows (harmlessly: sigmoid -> 0) for very negative inputs.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in exp:RuntimeWarning")

ACTS = [None, "gelu", "gelu_tanh"]
# (in_shape, out_shape, ranks): n = 2..5, odd factors, ranks including 1.
CASES = [
    ((3, 5), (7, 2), [1, 1, 1]),
    ((5, 3), (2, 7), [1, 6, 1]),
    ((3, 2, 5), (2, 4, 3), [1, 3, 4, 1]),
    ((4, 2, 3), (4, 3, 3), [1, 4, 5, 1]),  # odd last modes: the first core is kept on chip
    ((2, 3, 2, 2), (3, 2, 2, 3), [1, 2, 4, 1, 1]),
    ((2, 1, 3, 2, 2), (2, 3, 1, 2, 2), [1, 4, 4, 3, 2, 1]),
]
FP32_TOL = 2e-5
FP16_TOL = 5e-3


def make_cores(in_shape, out_shape, ranks, dtype=torch.float32, seed=0, requires_grad=False):
    """Random cores scaled so that W has entries of order 1."""
    g = torch.Generator().manual_seed(seed)
    cores = []
    for k, (i, j) in enumerate(zip(in_shape, out_shape)):
        c = torch.randn(ranks[k], i, j, ranks[k + 1], generator=g, dtype=torch.float64) / math.sqrt(ranks[k])
        cores.append(c.to(dtype).requires_grad_(requires_grad))
    return cores


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    return ((a.double() - ref.double()).abs().max() / ref.double().abs().max().clamp_min(1e-30)).item()


def dense_w(cores) -> torch.Tensor:
    """Independent dense rebuild (row-by-row matrix products, C order) for checking the reference itself."""
    in_shape = [c.shape[1] for c in cores]
    out_shape = [c.shape[2] for c in cores]
    w = torch.empty(math.prod(in_shape), math.prod(out_shape), dtype=torch.float64)
    for r in range(w.shape[0]):
        ii = torch.unravel_index(torch.tensor(r), in_shape)
        for col in range(w.shape[1]):
            jj = torch.unravel_index(torch.tensor(col), out_shape)
            v = torch.ones(1, 1, dtype=torch.float64)
            for c, i, j in zip(cores, ii, jj):
                v = v @ c[:, i, j, :].double()
            w[r, col] = v[0, 0]
    return w


# ----------------------------------------------------------------------------- reference sanity
def test_reference_matches_independent_dense_rebuild():
    in_shape, out_shape, ranks = CASES[2]
    cores = make_cores(in_shape, out_shape, ranks, torch.float64)
    x = torch.randn(4, math.prod(in_shape), dtype=torch.float64)
    b = torch.randn(math.prod(out_shape), dtype=torch.float64)
    w = dense_w(cores)
    ref = torch.nn.functional.gelu(x @ w + b)
    assert rel_err(mpo_linear_reference(x, cores, b, "gelu"), ref) < 1e-12
    tanh_ref = 0.5 * (x @ w) * (1 + torch.tanh(math.sqrt(2 / math.pi) * ((x @ w) + 0.044715 * (x @ w) ** 3)))
    assert rel_err(mpo_linear_reference(x, cores, None, "gelu_tanh"), tanh_ref) < 1e-12


# ----------------------------------------------------------------------------- forward
@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{len(c[0])}")
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_forward_fp32(case, activation, with_bias):
    in_shape, out_shape, ranks = case
    cores = make_cores(in_shape, out_shape, ranks)
    x = torch.randn(2, 37, math.prod(in_shape))  # 74 rows: not a multiple of the row block
    b = torch.randn(math.prod(out_shape)) if with_bias else None
    y = mpo_linear(x, cores, b, activation, backend="triton")
    ref = mpo_linear_reference(x, cores, b, activation)
    assert y.shape == ref.shape == (2, 37, math.prod(out_shape)) and y.dtype == torch.float32
    assert rel_err(y, ref) < FP32_TOL


@pytest.mark.parametrize("case", [CASES[0], CASES[3], CASES[4]], ids=lambda c: f"n{len(c[0])}")
@pytest.mark.parametrize("activation", ACTS)
def test_forward_fp16(case, activation):
    in_shape, out_shape, ranks = case
    cores = make_cores(in_shape, out_shape, ranks, torch.float16)
    x = torch.randn(45, math.prod(in_shape)).half()
    b = torch.randn(math.prod(out_shape)).half()
    y = mpo_linear(x, cores, b, activation, backend="triton")
    assert y.dtype == torch.float16
    ref = mpo_linear_reference(x.float(), [c.float() for c in cores], b.float(), activation)
    assert rel_err(y, ref) < FP16_TOL


def test_forward_larger_tiles_and_strided_input():
    """K and N span several 16/32-wide tiles; x is a non-contiguous view."""
    in_shape, out_shape, ranks = (4, 3, 5), (5, 2, 6), [1, 3, 2, 1]
    cores = make_cores(in_shape, out_shape, ranks, seed=3)
    x = torch.randn(70, 2 * 60)[:, ::2]
    assert not x.is_contiguous()
    b = torch.randn(60)
    assert rel_err(mpo_linear(x, cores, b, "gelu", backend="triton"), mpo_linear_reference(x, cores, b, "gelu")) < FP32_TOL


def test_empty_batch():
    cores = make_cores(*CASES[0])
    y = mpo_linear(torch.randn(0, 15), cores, None, "gelu", backend="triton")
    assert y.shape == (0, 14)


# ----------------------------------------------------------------------------- backward
def _grads(fn, x, cores, b, activation, gy):
    y = fn(x, cores, b, activation)
    inputs = [x, *cores] + ([b] if b is not None else [])
    return torch.autograd.grad(y, inputs, gy)


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"n{len(c[0])}")
@pytest.mark.parametrize("activation", ACTS)
def test_backward_fp32(case, activation):
    in_shape, out_shape, ranks = case
    cores = make_cores(in_shape, out_shape, ranks, requires_grad=True)
    x = torch.randn(3, 13, math.prod(in_shape), requires_grad=True)
    b = torch.randn(math.prod(out_shape), requires_grad=True)
    gy = torch.randn(3, 13, math.prod(out_shape))
    got = _grads(lambda *a: mpo_linear(*a, backend="triton"), x, cores, b, activation, gy)
    want = _grads(mpo_linear_reference, x, cores, b, activation, gy)
    names = ["x"] + [f"core{k}" for k in range(len(cores))] + ["bias"]
    for name, g, w in zip(names, got, want):
        assert g.shape == w.shape, name
        assert rel_err(g, w) < FP32_TOL, name


def test_backward_fp16():
    in_shape, out_shape, ranks = CASES[3]
    cores = make_cores(in_shape, out_shape, ranks, torch.float16, requires_grad=True)
    x = torch.randn(33, math.prod(in_shape)).half().requires_grad_()
    b = torch.randn(math.prod(out_shape)).half().requires_grad_()
    gy = torch.randn(33, math.prod(out_shape)).half()
    got = _grads(lambda *a: mpo_linear(*a, backend="triton"), x, cores, b, "gelu", gy)
    ref_inputs = [t.detach().float().requires_grad_() for t in (x, *cores, b)]
    want = _grads(mpo_linear_reference, ref_inputs[0], ref_inputs[1:-1], ref_inputs[-1], "gelu", gy.float())
    for g, w in zip(got, want):
        assert g.dtype == torch.float16
        assert rel_err(g, w) < 2e-2  # fp16 dW and factor gradients: one more rounding each


def test_backward_only_some_inputs_need_grad():
    """Frozen central core and no bias grad (MPOP's lightweight fine-tuning)."""
    in_shape, out_shape, ranks = CASES[4]
    cores = make_cores(in_shape, out_shape, ranks)
    for k, c in enumerate(cores):
        c.requires_grad_(k != 2)
    x = torch.randn(9, math.prod(in_shape))
    y = mpo_linear(x, cores, None, "gelu_tanh", backend="triton")
    yr = mpo_linear_reference(x, cores, None, "gelu_tanh")
    gy = torch.randn_like(y)
    trainable = [c for c in cores if c.requires_grad]
    for g, w in zip(torch.autograd.grad(y, trainable, gy), torch.autograd.grad(yr, trainable, gy)):
        assert rel_err(g, w) < FP32_TOL


# ----------------------------------------------------------------------------- program order, ragged tiles, GPU tiles
# One end core (D=5, 3x4: padded to 4x4) and a big factor of 37 x 40 modes: K = 111, N = 160. With
# BLOCK_K = 32 (8 big rows per K step) the forward takes 5 K steps, the last one ragged (37 = 4*8 + 5),
# and its 40 big columns fill 2 (BLOCK_N 128) or 3 (BLOCK_N 64) column blocks, the last ragged; dx
# (transposed factors) swaps the two. Rows: GROUP_M + 2 full row blocks and a ragged one, so the
# grouped program order runs a second, partial group.
RAGGED_BIG = (37, 40)


def _ragged_problem(small_left: bool, rows: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    big = torch.randn(1, *RAGGED_BIG, 5, generator=g) / math.sqrt(5)
    small = torch.randn(5, 3, 4, 1, generator=g)
    cores = [small.permute(3, 1, 2, 0).contiguous(), big.permute(3, 1, 2, 0).contiguous()] if small_left else [big, small]
    k = math.prod(c.shape[1] for c in cores)
    n = math.prod(c.shape[2] for c in cores)
    assert choose_split([c.shape[1] for c in cores], [c.shape[2] for c in cores], [1, 5, 1]) is small_left
    return cores, torch.randn(rows, k, generator=g), torch.randn(n, generator=g), torch.randn(rows, n, generator=g)


def _check_forward_dx(cores, x, b, gy, activation):
    """y and dx (the transposed-factor launch) of the kernel vs the reference; with ``x`` needing a
    gradient and an activation, the forward is the training one (stores the pre-activation)."""
    x = x.clone().requires_grad_()
    y = mpo_linear(x, cores, b, activation, backend="triton")
    (dx,) = torch.autograd.grad(y, x, gy)
    xr = x.detach().clone().requires_grad_()
    yr = mpo_linear_reference(xr, cores, b, activation)
    (dxr,) = torch.autograd.grad(yr, xr, gy)
    assert rel_err(y, yr) < FP32_TOL, "y"
    assert rel_err(dx, dxr) < FP32_TOL, "dx"


def _check_inference_forward_and_dx(cores, x, b, gy, activation):
    """The inference forward (bias + activation epilogue, nothing stored), then dx through an
    activation-free training forward (which stores nothing either)."""
    with torch.no_grad():
        y = mpo_linear(x, cores, b, activation, backend="triton")
    assert rel_err(y, mpo_linear_reference(x, cores, b, activation)) < FP32_TOL, "inference y"
    _check_forward_dx(cores, x, b, gy, None)


@pytest.mark.parametrize("small_left", [False, True])
def test_interpreter_tile_several_program_groups(small_left):
    """The interpreter's own tile (BLOCK 32, GROUP_M 4): 140 rows = 5 row blocks, 2 program groups."""
    cores, x, b, gy = _ragged_problem(small_left, 140, seed=5)
    _check_forward_dx(cores, x, b, gy, "gelu")


def _config_id(c) -> str:
    return "M{BLOCK_M}N{BLOCK_N}K{BLOCK_K}G{GROUP_M}".format(**c.kwargs) + f"w{c.num_warps}s{c.num_stages}"


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(kernel.launch_configs(False))),
                         ids=[_config_id(c) for c in kernel.launch_configs(False)])
def test_each_gpu_tile_config_forward_dx(index):
    """Every tile the autotuner may pick, forced, on a problem ragged in M, N and K with two program
    groups: inference forward (bias + GELU epilogue) and dx. Orientation alternates over the configs."""
    config = kernel.launch_configs(False)[index]
    rows = (config.kwargs["GROUP_M"] + 2) * config.kwargs["BLOCK_M"] + 37
    cores, x, b, gy = _ragged_problem(index % 2 == 1, rows, seed=index)
    with kernel.forced_config(config):
        _check_inference_forward_and_dx(cores, x, b, gy, "gelu")


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(kernel.launch_configs(True))),
                         ids=[_config_id(c) for c in kernel.launch_configs(True)])
def test_each_gpu_tile_config_training_forward(index):
    """The training forward (pre-activation stored for backward) at every tile it may pick, forced;
    the backward's GELU derivative reads that stored pre-activation."""
    config = kernel.launch_configs(True)[index]
    rows = (config.kwargs["GROUP_M"] + 2) * config.kwargs["BLOCK_M"] + 37
    cores, x, b, gy = _ragged_problem(index % 2 == 0, rows, seed=10 + index)
    calls = []
    real = kernel.mpo_matmul

    def spy(*args, **kwargs):
        calls.append(args[5] if len(args) > 5 else kwargs.get("store_pre", False))
        return real(*args, **kwargs)

    with kernel.forced_config(config), pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernel, "mpo_matmul", spy)
        _check_forward_dx(cores, x, b, gy, "gelu_tanh")
    assert calls == [True, False], "the forward stores pre, dx does not"


def test_forced_config_rejects_what_the_autotuner_would_not_pick():
    big_tile = next(c for c in kernel.launch_configs(False) if c.kwargs["BLOCK_M"] > kernel.STORE_PRE_MAX_BLOCK_M)
    cores, x, b, _ = _ragged_problem(False, 40, seed=0)
    with kernel.forced_config(big_tile), pytest.raises(ValueError, match="not a config the autotuner may pick"):
        mpo_linear(x.requires_grad_(), cores, b, "gelu", backend="triton")
    with pytest.raises(TypeError, match="config: expected a triton.Config"):
        with kernel.forced_config({"BLOCK_M": 64}):
            pass


# ----------------------------------------------------------------------------- hypothesis
@st.composite
def mpo_problems(draw):
    n = draw(st.integers(2, 4))
    in_shape = tuple(draw(st.lists(st.integers(1, 4), min_size=n, max_size=n)))
    out_shape = tuple(draw(st.lists(st.integers(1, 4), min_size=n, max_size=n)))
    ranks = [1] + draw(st.lists(st.integers(1, 4), min_size=n - 1, max_size=n - 1)) + [1]
    tokens = draw(st.integers(1, 70))
    return in_shape, out_shape, ranks, tokens, draw(st.booleans()), draw(st.sampled_from(ACTS)), draw(st.integers(0, 99))


@settings(max_examples=12, deadline=None)
@given(mpo_problems())
def test_property_forward_backward_fp32(problem):
    in_shape, out_shape, ranks, tokens, with_bias, activation, seed = problem
    cores = make_cores(in_shape, out_shape, ranks, seed=seed, requires_grad=True)
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(tokens, math.prod(in_shape), generator=g).requires_grad_()
    b = torch.randn(math.prod(out_shape), generator=g).requires_grad_() if with_bias else None
    gy = torch.randn(tokens, math.prod(out_shape), generator=g)
    y = mpo_linear(x, cores, b, activation, backend="triton")
    yr = mpo_linear_reference(x, cores, b, activation)
    assert rel_err(y, yr) < FP32_TOL
    inputs = [x, *cores] + ([b] if with_bias else [])
    for got, want in zip(torch.autograd.grad(y, inputs, gy), torch.autograd.grad(yr, inputs, gy)):
        assert rel_err(got, want) < FP32_TOL


# ----------------------------------------------------------------------------- custom op
@pytest.mark.parametrize("activation,store_pre,with_bias,small_left", [
    ("none", False, True, False), ("gelu", True, True, True), ("gelu_tanh", False, False, False)])
def test_opcheck(activation, store_pre, with_bias, small_left):
    """Schema, fake tensor, autograd registration and AOT dispatch of mpo_core::mpo_kron_linear.

    ``store_pre=False`` with an activation exercises the backward's recompute of the pre-activation.
    """
    g = torch.Generator().manual_seed(1)
    x = torch.randn(21, 6, generator=g, requires_grad=True)
    left = torch.randn(3, 2, 5, generator=g, requires_grad=True)
    right = torch.randn(3, 3, 4, generator=g, requires_grad=True)
    bias = torch.randn(20, generator=g, requires_grad=True) if with_bias else None
    args = (x, left, right, bias, activation, store_pre, small_left)
    torch.library.opcheck(torch.ops.mpo_core.mpo_kron_linear.default, args)


@pytest.mark.parametrize("small_left", [False, True])
def test_op_both_orientations_match_kronecker_sum(small_left):
    """The op's W is sum_s left[s] (x) right[s] whichever factor the kernel keeps on chip."""
    g = torch.Generator().manual_seed(4)
    x = torch.randn(50, 5 * 3, generator=g)
    left = torch.randn(6, 5, 7, generator=g)
    right = torch.randn(6, 3, 2, generator=g)
    bias = torch.randn(14, generator=g)
    w = torch.einsum("sab,sij->aibj", left, right).reshape(15, 14)
    y, pre = torch.ops.mpo_core.mpo_kron_linear(x, left, right, bias, "gelu", True, small_left)
    assert rel_err(pre, x @ w + bias) < FP32_TOL
    assert rel_err(y, torch.nn.functional.gelu(x @ w + bias)) < FP32_TOL


# ----------------------------------------------------------------------------- dispatch
def test_dispatch_cpu_uses_reference(monkeypatch):
    calls = []
    monkeypatch.setattr(ops, "_kron_linear_op", lambda *a: calls.append(a))
    cores = make_cores(*CASES[0])
    x = torch.randn(4, 15)
    y = mpo_linear(x, cores, None, "gelu")
    assert calls == [] and rel_err(y, mpo_linear_reference(x, cores, None, "gelu")) == 0.0
    mpo_linear(x, cores, None, "gelu", backend="torch")
    assert calls == []


def test_dispatch_capable_gpu_uses_triton(monkeypatch):
    """With the device check mocked true, backend=None takes the kernel (here: the interpreter)."""
    real = ops._kron_linear_op
    calls = []

    def spy(*a):
        calls.append(a[4])
        return real(*a)

    monkeypatch.setattr(ops, "resolve_backend", lambda op, x, backend: backend or "triton")
    monkeypatch.setattr(ops, "_kron_linear_op", spy)
    cores = make_cores(*CASES[2])
    x = torch.randn(5, 30)
    y = mpo_linear(x, cores, None, "gelu_tanh")
    assert calls == ["gelu_tanh"]
    assert rel_err(y, mpo_linear_reference(x, cores, None, "gelu_tanh")) < FP32_TOL


def test_forced_triton_unavailable_raises(monkeypatch):
    from mpo_core.kernels import mpo_matmul as kernel_module

    monkeypatch.setattr(kernel_module, "INTERPRETED", False)
    cores = make_cores(*CASES[0])
    with pytest.raises(BackendUnavailableError, match="backend 'triton' cannot run mpo_linear here.*TRITON_INTERPRET"):
        mpo_linear(torch.randn(2, 15), cores, backend="triton")


def test_bf16_reference_path():
    """bf16 on CPU runs the reference (the interpreter's bf16 tl.dot is wrong; the kernel's bf16 is a cuda test)."""
    from mpo_core.ops.dispatch import default_backend

    assert default_backend("mpo_linear", torch.device("cpu"), torch.bfloat16) == "torch"
    cores = make_cores(*CASES[3], dtype=torch.bfloat16)
    x = torch.randn(7, 24).bfloat16()
    b = torch.randn(36).bfloat16()
    y = mpo_linear(x, cores, b, "gelu")
    assert y.dtype == torch.bfloat16
    # held to the float64 product with the independent dense rebuild, not to the reference itself
    ref = torch.nn.functional.gelu(x.double() @ dense_w(cores) + b.double())
    assert rel_err(y, ref) < 3e-2  # W, x @ W and the GELU each rounded to bf16 (2^-8 each): measured 1.6e-3
    assert rel_err(mpo_linear(x, cores, b, None), ref) > 0.1  # the activation is applied: a wrong one fails


# ----------------------------------------------------------------------------- bad input
def _good():
    cores = make_cores(*CASES[2])
    return torch.randn(4, 30), cores, torch.randn(24)


@pytest.mark.parametrize("fn", [mpo_linear, mpo_linear_reference])
def test_bad_input(fn):
    x, cores, b = _good()
    with pytest.raises(ValueError, match="cores do not chain"):
        fn(x, [cores[0], cores[1][:, :, :, :2], cores[2]], b)
    with pytest.raises(ValueError, match=r"x must have shape \(\.\.\., 30\)"):
        fn(torch.randn(4, 29), cores, b)
    with pytest.raises(TypeError, match=r"cores\[1\] is torch.float64, but cores\[0\] is torch.float32"):
        fn(x, [cores[0], cores[1].double(), cores[2]], b)
    with pytest.raises(TypeError, match="bias is torch.float16 but the cores are torch.float32"):
        fn(x, cores, b.half())
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        fn(x.long(), cores, b)
    with pytest.raises(TypeError, match="x must have a floating dtype"):
        fn(x.to(torch.complex64), cores, b)
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fn(x.tolist(), cores, b)
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \(24,\)"):
        fn(x, cores, torch.randn(23))
    with pytest.raises(ValueError, match="boundary bonds must be 1"):
        fn(x, [torch.randn(2, 3, 2, 3), *cores[1:]], b)
    with pytest.raises(ValueError, match="at least 2 cores"):
        fn(torch.randn(4, 3), [torch.randn(1, 3, 2, 1)], None)
    with pytest.raises(ValueError, match=r"cores\[0\] must be 4-D \(d_left, in, out, d_right\)"):
        fn(x, [cores[0][0], *cores[1:]], b)
    with pytest.raises(TypeError, match="cores must be a list of 4-D tensors"):
        fn(x, torch.randn(1, 30, 24, 1), b)
    with pytest.raises(ValueError, match="activation must be one of"):
        fn(x, cores, b, "relu")


def test_bad_backend():
    x, cores, b = _good()
    with pytest.raises(ValueError, match="backend must be None or one of"):
        mpo_linear(x, cores, b, backend="cuda")
    with pytest.raises(BackendUnavailableError, match="Triton kernels take float32/float16/bfloat16, got torch.float64"):
        mpo_linear(x.double(), [c.double() for c in cores], b.double(), backend="triton")
    # float64 with backend=None is the reference (also where a GPU would pick the kernel).
    y = mpo_linear(x.double(), [c.double() for c in cores], b.double())
    assert y.dtype == torch.float64


# ----------------------------------------------------------------------------- cost model
def test_cost_model_counts():
    in_shape, out_shape, ranks = (3, 2, 5), (2, 4, 3), [1, 3, 4, 1]
    tokens, k, n = 100, 30, 24
    cost = mpo_linear_cost(tokens, in_shape, out_shape, ranks, 2, block_m=32)
    assert cost["supported"] and cost["bond"] == 4 and cost["small_left"] is False
    assert cost["padded"] == (16, 8, 4)  # D 4 -> 16, i_n 5 -> 8, j_n 3 -> 4
    kp, np_ = 6 * 8, 8 * 4
    assert cost["flops_useful"] == cost["flops_dense_fwd"] == 2 * tokens * k * n
    assert cost["flops_gemm"] == 2 * tokens * kp * np_
    assert cost["flops_rebuild"] == 2 * 16 * kp * np_ * 4  # ceil(100/32) = 4 row blocks
    assert cost["factor_elems"] == (6 * 8 * 4) + 4 * 5 * 3  # left (IL=6, JL=8, D=4), right = last core
    assert cost["flops"] == cost["flops_tensor"] + cost["flops_fma"]
    # bf16/fp16: the pre-contraction runs on tensor cores; fp32: on the FMA units.
    assert cost["flops_tensor"] == cost["flops_gemm"] + cost["flops_rebuild"] + cost["flops_precontract"]
    cost32 = mpo_linear_cost(tokens, in_shape, out_shape, ranks, 4, block_m=32)
    assert cost32["flops_tensor"] == cost["flops_gemm"] + cost["flops_rebuild"]
    assert cost32["flops_fma"] == cost["flops_precontract"] + cost["flops_epilogue"] > 0
    assert cost["flops_dense_bwd"] == 4 * tokens * k * n
    # Compulsory bytes include x read and y written once.
    assert cost["bytes"] >= 2 * tokens * (k + n)


def test_cost_model_unsupported_last_core():
    cost = mpo_linear_cost(8, (16, 16), (16, 16), [1, 4, 1], 2)
    assert not cost["supported"] and cost["flops"] == math.inf and cost["flops_dense_fwd"] == 2 * 8 * 256 * 256


def test_choose_split_bert_shapes():
    """Odd last modes (768 = 4*4*4*4*3): keep the 4x4 first core on chip (no padding)."""
    assert choose_split((4, 4, 4, 4, 3), (4, 4, 4, 4, 3), [1, 16, 256, 144, 9, 1]) is True
    assert choose_split((4, 4, 4, 4, 3), (4, 4, 8, 6, 4), [1, 16, 256, 288, 12, 1]) is True
    assert choose_split((4, 4, 4, 4, 4), (4, 4, 8, 8, 4), [1, 16, 64, 64, 16, 1]) is False  # tie: last
    assert choose_split((16, 16), (16, 16), [1, 4, 1]) is None


def test_unsupported_last_core_falls_back_or_raises(monkeypatch):
    """End cores too large for the kernel: backend=None uses the reference, 'triton' raises."""
    cores = make_cores((16, 16), (16, 16), [1, 2, 1])
    x = torch.randn(5, 256)
    monkeypatch.setattr(ops, "resolve_backend", lambda op, x, backend: backend or "triton")
    assert rel_err(mpo_linear(x, cores), mpo_linear_reference(x, cores)) == 0.0
    with pytest.raises(BackendUnavailableError, match="whose padded size fits the kernel"):
        mpo_linear(x, cores, backend="triton")


@pytest.mark.parametrize("case", CASES[2:], ids=lambda c: f"n{len(c[0])}")
def test_cost_model_precontract_flops_match_torch_count(case):
    """The model's pre-contraction FLOPs equal what torch's FLOP counter sees in the triton path's einsums."""
    in_shape, out_shape, ranks = case
    cores = make_cores(in_shape, out_shape, ranks)
    x = torch.randn(3, math.prod(in_shape))
    with FlopCounterMode(display=False) as counter:
        mpo_linear(x, cores, None, None, backend="triton")
    cost = mpo_linear_cost(3, in_shape, out_shape, ranks, 4, bias=False)
    assert counter.get_total_flops() == cost["flops_precontract"]


@pytest.mark.parametrize("ranks,fwd_bound,bwd_bound", [
    ([1, 16, 256, 256, 16, 1], 1.15, 1.10),  # full rank
    ([1, 16, 64, 64, 16, 1], 1.15, 1.10),  # truncated bonds
])
def test_cost_model_vs_dense_path_flops(ranks, fwd_bound, bwd_bound):
    """By design the fused path's FLOPs stay near the dense path's (rebuild W + GEMM, counted by
    torch on meta tensors through the reference), for BERT-large-like power-of-two modes at 4096 tokens."""
    shape = (4, 4, 4, 4, 4)
    cores = [torch.empty(ranks[k], 4, 4, ranks[k + 1], device="meta", requires_grad=True) for k in range(5)]
    x = torch.empty(4096, 1024, device="meta", requires_grad=True)
    b = torch.empty(1024, device="meta", requires_grad=True)
    with FlopCounterMode(display=False) as fwd:
        y = mpo_linear_reference(x, cores, b, "gelu")
    with FlopCounterMode(display=False) as bwd:
        torch.autograd.grad(y, [x, b, *cores], torch.empty_like(y))
    cost = mpo_linear_cost(4096, shape, shape, ranks, 2, activation="gelu")
    assert cost["flops"] < fwd_bound * fwd.get_total_flops()
    assert cost["flops_bwd"] < bwd_bound * bwd.get_total_flops()


def test_cost_model_bad_args():
    with pytest.raises(ValueError, match="ranks"):
        mpo_linear_cost(8, (2, 2), (2, 2), [1, 2, 2], 2)
    with pytest.raises(ValueError, match="tokens"):
        mpo_linear_cost(-1, (2, 2), (2, 2), [1, 2, 1], 2)
    with pytest.raises(ValueError, match="dtype_bytes"):
        mpo_linear_cost(8, (2, 2), (2, 2), [1, 2, 1], 3)
    with pytest.raises(ValueError, match="in_shape/out_shape"):
        mpo_linear_cost(8, (2,), (2,), [1, 1], 2)


# ----------------------------------------------------------------------------- CUDA
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.float16, 5e-3), (torch.bfloat16, 3e-2)])
@pytest.mark.parametrize("activation", ACTS)
@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_forward_backward_bert_shape(dtype, tol, activation):
    shape = (4, 4, 4, 4, 3)  # 768 -> 768, truncated bonds
    cores = [c.cuda().requires_grad_() for c in make_cores(shape, shape, [1, 16, 32, 32, 9, 1], dtype)]
    x = torch.randn(300, 768, device="cuda").to(dtype).requires_grad_()
    b = torch.randn(768, device="cuda").to(dtype).requires_grad_()
    y = mpo_linear(x, cores, b, activation)  # backend=None picks triton on sm80+
    f32 = [t.detach().float().requires_grad_() for t in (x, *cores, b)]
    yr = mpo_linear_reference(f32[0], f32[1:-1], f32[-1], activation)
    assert rel_err(y, yr) < tol
    gy = torch.randn_like(yr)
    got = torch.autograd.grad(y, [x, *cores, b], gy.to(dtype))
    want = torch.autograd.grad(yr, f32, gy)
    for g, w in zip(got, want):
        assert rel_err(g, w) < 4 * tol
