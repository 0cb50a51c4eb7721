"""Tests for mpo_core.contract: every strategy and order against the dense reference."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpo_core import MPO, decompose
from mpo_core.contract import clear_plan_cache, contract, dense_weight, explain
from mpo_core.contract import fused as fused_mod
from mpo_core.contract.plan import make_plan, token_bucket
from mpo_core.contract.sequential import all_orders, check_order, named_orders
from mpo_core.ops import BackendUnavailableError


def random_cores(in_shape, out_shape, inner_ranks, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    ranks = [1, *inner_ranks, 1]
    cores = []
    for k, (i, j) in enumerate(zip(in_shape, out_shape)):
        scale = 1.0 / math.sqrt(ranks[k] * i)
        cores.append((torch.randn(ranks[k], i, j, ranks[k + 1], generator=g, dtype=torch.float64) * scale).to(dtype))
    return cores


def reference_dense(cores):
    """W[(i1..in),(j1..jn)] = T1[0,i1,j1,:] @ ... @ Tn[:,in,jn,0], by an independent einsum chain."""
    acc = cores[0][0]  # (i, j, d)
    for core in cores[1:]:
        acc = torch.einsum("ija,aklb->ikjlb", acc, core)
        i, k, j, l, b = acc.shape
        acc = acc.reshape(i * k, j * l, b)
    return acc[..., 0]


@st.composite
def problems(draw):
    n = draw(st.integers(2, 5))
    in_shape = tuple(draw(st.lists(st.integers(1, 5), min_size=n, max_size=n)))
    out_shape = tuple(draw(st.lists(st.integers(1, 5), min_size=n, max_size=n)))
    inner = draw(st.lists(st.integers(1, 6), min_size=n - 1, max_size=n - 1))
    lead = tuple(draw(st.lists(st.sampled_from([1, 2, 3, 5, 7]), min_size=1, max_size=2)))
    seed = draw(st.integers(0, 2**16))
    return in_shape, out_shape, inner, lead, seed


def _check_all(in_shape, out_shape, inner, lead, seed, dtype, rtol):
    cores = random_cores(in_shape, out_shape, inner, dtype, seed)
    w = reference_dense([c.double() for c in cores])
    g = torch.Generator().manual_seed(seed + 1)
    x = torch.randn(*lead, math.prod(in_shape), generator=g, dtype=torch.float64).to(dtype)
    bias = torch.randn(math.prod(out_shape), generator=g, dtype=torch.float64).to(dtype)
    ref = x.double() @ w + bias.double()
    tol = dict(rtol=rtol, atol=rtol * max(1.0, float(ref.abs().max())))
    outs = {"dense": contract(x, cores, bias, strategy="dense"), "auto": contract(x, cores, bias)}
    for order in all_orders(len(cores)):
        outs[order] = contract(x, cores, bias, strategy="sequential", order=order)
    for key, y in outs.items():
        assert y.shape == (*lead, math.prod(out_shape)) and y.dtype == dtype, key
        torch.testing.assert_close(y.double(), ref, **tol, msg=lambda m: f"{key}: {m}")


@settings(max_examples=30)
@given(problems())
def test_every_strategy_and_order_float64(problem):
    _check_all(*problem, dtype=torch.float64, rtol=1e-12)


@settings(max_examples=15)
@given(problems())
def test_every_strategy_and_order_float32(problem):
    _check_all(*problem, dtype=torch.float32, rtol=1e-5)


def test_full_rank_decomposition_is_applied_exactly():
    w = torch.randn(96, 120, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    mpo = decompose(w, n=4)
    x = torch.randn(3, 17, 96, dtype=torch.float64)
    for strategy, order in [("dense", None), ("auto", None), ("sequential", "ltr"), ("sequential", "rtl"), ("sequential", "mid")]:
        torch.testing.assert_close(contract(x, mpo, strategy=strategy, order=order), x @ w, rtol=1e-10, atol=1e-10)


def test_dense_weight_matches_reference_and_mpo_to_dense():
    cores = random_cores((2, 3, 4), (4, 1, 3), (3, 5))
    torch.testing.assert_close(dense_weight(cores), reference_dense(cores), rtol=1e-13, atol=1e-13)
    torch.testing.assert_close(dense_weight(MPO(cores)), MPO(cores).to_dense(), rtol=1e-13, atol=1e-13)


def test_single_core_and_zero_tokens():
    cores = random_cores((6,), (5,), [])
    x = torch.randn(4, 6, dtype=torch.float64)
    for strategy in ("dense", "sequential"):
        torch.testing.assert_close(contract(x, cores, strategy=strategy), x @ cores[0][0, :, :, 0])
    cores = random_cores((2, 3), (3, 2), [2])
    for strategy in ("dense", "sequential", "auto"):
        y = contract(torch.empty(0, 6, dtype=torch.float64), cores, strategy=strategy)
        assert y.shape == (0, 6)


@pytest.mark.parametrize("activation", ["gelu", "gelu_tanh"])
def test_activation(activation):
    cores = random_cores((2, 3, 2), (3, 2, 2), (3, 4))
    x = torch.randn(5, 12, dtype=torch.float64)
    b = torch.randn(12, dtype=torch.float64)
    ref = torch.nn.functional.gelu(x @ reference_dense(cores) + b, approximate="tanh" if activation == "gelu_tanh" else "none")
    for strategy in ("dense", "sequential"):
        torch.testing.assert_close(contract(x, cores, b, strategy=strategy, activation=activation), ref)


@pytest.mark.parametrize(
    "strategy,order", [("dense", None), ("sequential", "ltr"), ("sequential", "rtl"), ("sequential", "mid"), ("sequential", (1, 2, 0))]
)
def test_gradcheck(strategy, order):
    cores = [c.requires_grad_() for c in random_cores((2, 3, 2), (2, 2, 3), (3, 2))]
    x = torch.randn(3, 12, dtype=torch.float64, requires_grad=True)
    b = torch.randn(12, dtype=torch.float64, requires_grad=True)

    def f(x, b, *cores):
        return contract(x, list(cores), b, strategy=strategy, order=order, activation="gelu")

    assert torch.autograd.gradcheck(f, (x, b, *cores))


def test_fused_forced_matches_reference_with_gradients():
    """strategy='fused' on CPU runs the Triton kernel through the interpreter (conftest sets TRITON_INTERPRET=1)."""
    cores = [c.requires_grad_() for c in random_cores((2, 4, 2), (2, 2, 4), (3, 4), dtype=torch.float32)]
    x = torch.randn(5, 16, requires_grad=True)
    b = torch.randn(16, requires_grad=True)
    y = contract(x, cores, b, strategy="fused", activation="gelu_tanh")
    ref = contract(x, cores, b, strategy="sequential", activation="gelu_tanh")
    torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-5)
    grads = torch.autograd.grad(y.square().sum(), [x, b, *cores])
    ref_grads = torch.autograd.grad(ref.square().sum(), [x, b, *cores])
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-4, atol=1e-4)


def test_fused_offered_only_where_available(monkeypatch):
    cores = random_cores((4, 4, 4), (4, 4, 4), (8, 8), dtype=torch.float32)
    assert "fused" not in {c.strategy for c in explain(64, cores).candidates}  # CPU: not available
    monkeypatch.setattr(fused_mod, "fused_available", lambda device, dtype: True)
    plan = explain(64, cores)
    assert "fused" in {c.strategy for c in plan.candidates}
    assert plan.chosen.seconds == min(c.seconds for c in plan.candidates)


def test_fused_available_is_false_on_cpu():
    assert fused_mod.fused_available(torch.device("cpu"), torch.float32) is False


def test_plan_cache_hit():
    clear_plan_cache()
    cores = random_cores((2, 3, 4), (4, 3, 2), (2, 3))
    x = torch.randn(10, 24, dtype=torch.float64)
    p1 = explain(x, cores)
    hits = make_plan.cache_info().hits
    contract(x, cores)
    assert make_plan.cache_info().hits == hits + 1
    assert explain(x, cores) is p1
    assert explain(torch.randn(13, 24, dtype=torch.float64), cores) is p1  # same power-of-two bucket
    assert explain(torch.randn(17, 24, dtype=torch.float64), cores) is not p1
    assert explain(x.float(), [c.float() for c in cores]) is not p1  # dtype is part of the key


def test_token_bucket():
    assert [token_bucket(t) for t in (0, 1, 2, 3, 4, 5, 1000, 1024, 1025)] == [1, 1, 2, 4, 4, 8, 1024, 1024, 2048]


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_cost_model_picks_dense_for_many_tokens_at_full_rank(device_type):
    """Documented case: BERT 768x768, n=5, full rank, 4096 tokens -> rebuild W once, one GEMM."""
    ranks = (1, 16, 256, 144, 9, 1)
    shape = (4, 4, 4, 4, 3)
    plan = make_plan(shape, shape, ranks, 4096, device_type, torch.float32, "auto", None, False, None, False)
    assert plan.strategy == "dense"
    # why, in FLOPs counted here: W is rebuilt once (a few % on top of the 4096x768x768 GEMM), while bonds
    # of 256 make every sequential order at least 100x that
    gemm = 2 * 4096 * 768 * 768
    assert gemm < plan.chosen.flops < 1.2 * gemm
    assert min(c.flops for c in plan.candidates if c.strategy == "sequential") > 100 * plan.chosen.flops


@pytest.mark.parametrize("device_type", ["cpu", "cuda"])
def test_cost_model_picks_sequential_for_small_ranks_and_few_tokens(device_type):
    """Documented case: BERT 768x768, n=5, bonds 4, 8 tokens -> never form the 768x768 W."""
    ranks = (1, 4, 4, 4, 4, 1)
    shape = (4, 4, 4, 4, 3)
    plan = make_plan(shape, shape, ranks, 8, device_type, torch.float32, "auto", None, False, None, False)
    assert plan.strategy == "sequential"
    # the dense route pays the GEMM plus at least the rebuild's last merge (768 x 768 entries over bond 4)
    (dense,) = [c for c in plan.candidates if c.strategy == "dense"]
    assert dense.flops >= 2 * 8 * 768 * 768 + 2 * 768 * 768 * 4
    assert plan.chosen.flops < 2 * 8 * 768 * 768  # fewer FLOPs than even the dense GEMM alone


def test_explain_lists_candidates_and_costs():
    cores = random_cores((4, 4, 4), (4, 4, 4), (4, 4), dtype=torch.float32)
    plan = explain(16, cores)
    text = str(plan)
    assert "chosen:" in text and "model" in text and plan.chosen.label in text
    assert len(plan.candidates) == 1 + len(all_orders(3))
    assert all(c.flops > 0 and c.bytes > 0 and c.seconds > 0 for c in plan.candidates)
    forced = explain(16, cores, strategy="sequential", order="rtl")
    assert forced.strategy == "sequential" and forced.order == (2, 1, 0) and len(forced.candidates) == 1


def test_orders():
    assert len(all_orders(5)) == 16 and len(set(all_orders(5))) == 16
    assert all(check_order(o, 5) == o for o in all_orders(5))
    assert named_orders(5) == {"ltr": (0, 1, 2, 3, 4), "rtl": (4, 3, 2, 1, 0), "mid": (2, 3, 1, 4, 0)}
    with pytest.raises(ValueError, match="adjacent"):
        check_order((0, 2, 1), 3)
    with pytest.raises(ValueError, match="permutation"):
        check_order((0, 1, 1), 3)


def test_autocast_bf16_cpu():
    cores = random_cores((4, 4, 4), (4, 4, 4), (8, 8), dtype=torch.float32)
    x = torch.randn(9, 64)
    ref = x @ reference_dense(cores)
    for strategy in ("dense", "sequential"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = contract(x, cores, strategy=strategy)
            y2 = contract(x.bfloat16(), cores, strategy=strategy)  # bf16 activations, fp32 cores: allowed under autocast
        assert y.dtype == torch.bfloat16 and y2.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2 * float(ref.abs().max()))


def test_errors():
    cores = random_cores((2, 3), (3, 2), (2,))
    x = torch.randn(4, 6, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"\(\.\.\., 6\)"):
        contract(torch.randn(4, 5, dtype=torch.float64), cores)
    with pytest.raises(TypeError, match="float32 but the cores are torch.float64"):
        contract(x.float(), cores)
    with pytest.raises(ValueError, match="on meta"):
        contract(torch.empty(4, 6, dtype=torch.float64, device="meta"), cores)
    with pytest.raises(ValueError, match="strategy must be one of"):
        contract(x, cores, strategy="fast")
    with pytest.raises(ValueError, match="activation must be one of"):
        contract(x, cores, activation="relu")
    with pytest.raises(ValueError, match="order applies to strategy='sequential'"):
        contract(x, cores, order="ltr")
    with pytest.raises(ValueError, match="order must be one of"):
        contract(x, cores, strategy="sequential", order="zigzag")
    with pytest.raises(ValueError, match="bias must be a tensor of shape"):
        contract(x, cores, bias=torch.zeros(5, dtype=torch.float64))
    with pytest.raises(TypeError, match="bias is torch.float32"):
        contract(x, cores, bias=torch.zeros(6))
    with pytest.raises(ValueError, match="left bond"):
        contract(x, [cores[0], cores[1][:1]])
    with pytest.raises(TypeError, match="MPO or a non-empty list"):
        contract(x, cores[0])
    with pytest.raises(TypeError, match="floating dtype"):
        contract(torch.ones(4, 6, dtype=torch.int64), cores)
    with pytest.raises(TypeError, match="token count"):
        explain(-1, cores)
    with pytest.raises(ValueError, match="at least 2 cores"):
        contract(x[:, :2], random_cores((2,), (2,), []), strategy="fused")


def test_sequential_steps_cover_every_gemm_form_and_never_permute_activation():
    """ltr on (4,4,4,4,3) uses batched GEMMs (wide trailing block), the transpose form (narrow) and a plain GEMM (last)."""
    cores = random_cores((4, 4, 4, 4, 3), (2, 3, 2, 3, 2), (3, 5, 4, 2))
    plan = explain(7, cores, strategy="sequential", order="ltr")
    assert [s.method for s in plan.chosen.steps] == ["bmm", "bmm", "bmm", "tmm", "mm"]
    assert [s.m for s in plan.chosen.steps] == [192, 48, 12, 3, 1]
    x = torch.randn(7, 768, dtype=torch.float64)
    torch.testing.assert_close(contract(x, cores, strategy="sequential", order="ltr"), x @ reference_dense(cores))


def test_accepts_the_parameter_list_of_an_mpo_linear():
    from mpo_core import MPOLinear

    layer = MPOLinear(12, 6, in_shape=(3, 4), out_shape=(2, 3), max_bond=2)
    x = torch.randn(5, 12)
    plan = explain(x, layer.cores)
    assert plan.strategy in ("dense", "sequential")
    torch.testing.assert_close(contract(x, layer.cores), x @ layer.weight.T)


# --- empty batches, non-contiguous inputs, size-scaled float32 tolerance --------------------------------------------

_EPS32 = torch.finfo(torch.float32).eps


def _every_route(n_cores: int, dtype: torch.dtype) -> list[tuple[str, object]]:
    """(strategy, order) for every strategy and every sequential order.

    ``fused`` (the Triton kernel, run by the interpreter on CPU) takes float32/16 only, so it is a route for
    float32 inputs; float64 is rejected by it with a ``TypeError`` (checked in ``test_fused_rejects_float64``).
    """
    routes = [("dense", None), ("auto", None)] + ([("fused", None)] if dtype == torch.float32 else [])
    return routes + [("sequential", order) for order in all_orders(n_cores)]


@st.composite
def views(draw):
    """A problem plus a way of making ``x`` a non-contiguous view: transposed, strided slice, or expanded."""
    in_shape, out_shape, inner, lead, seed = draw(problems())
    kind = draw(st.sampled_from(["transposed", "sliced", "batch_transposed", "expanded"]))
    return in_shape, out_shape, inner, lead, seed, kind


def _non_contiguous(kind: str, lead: tuple[int, ...], rows: int, g: torch.Generator) -> torch.Tensor:
    """A float64 view of shape ``(*lead, rows)`` whose strides are not the contiguous ones (unless degenerate)."""
    def randn(*shape):
        return torch.randn(*shape, generator=g, dtype=torch.float64)

    if kind == "transposed":  # feature axis outermost in memory: stride prod(lead)
        return randn(rows, *lead).movedim(0, -1)
    if kind == "sliced":  # every other token and every other feature of a larger tensor
        return randn(*lead[:-1], 2 * lead[-1], 2 * rows)[..., ::2, ::2]
    if kind == "batch_transposed" and len(lead) == 2:  # rows contiguous, the two leading dims swapped
        return randn(lead[1], lead[0], rows).transpose(0, 1)
    if kind == "batch_transposed":
        return randn(rows, *lead).movedim(0, -1)
    return randn(rows).expand(*lead, rows)  # expanded: zero stride on every leading dim


def _assert_every_route_matches(x, cores, bias, lead, tol):
    """Every route agrees with ``x @ MPO(cores).to_dense() + bias``; shape and dtype preserved."""
    w = MPO([c.double() for c in cores]).to_dense()
    ref = x.double() @ w + (0 if bias is None else bias.double())
    for strategy, order in _every_route(len(cores), x.dtype):
        y = contract(x, cores, bias, strategy=strategy, order=order)
        key = f"{strategy} {order}"
        assert y.shape == (*lead, w.shape[1]) and y.dtype == x.dtype, key
        torch.testing.assert_close(y.double(), ref, **tol(x, cores), msg=lambda m: f"{key}: {m}")


def _f64_tol(x, cores):
    return dict(rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("lead", [(0,), (0, 4), (3, 0), (2, 0, 5)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_every_route_on_empty_batches(lead, with_bias):
    cores = random_cores((2, 3, 2), (3, 2, 2), (3, 4))
    x = torch.randn(*lead, 12, dtype=torch.float64)
    bias = torch.randn(12, dtype=torch.float64) if with_bias else None
    _assert_every_route_matches(x, cores, bias, lead, _f64_tol)


def test_empty_batch_backward_gives_zero_core_gradients():
    cores = [c.requires_grad_() for c in random_cores((2, 3, 2), (3, 2, 2), (3, 4))]
    x = torch.randn(0, 7, 12, dtype=torch.float64, requires_grad=True)
    for strategy, order in _every_route(3, x.dtype):
        grads = torch.autograd.grad(contract(x, cores, strategy=strategy, order=order).sum(), [x, *cores], allow_unused=True)
        assert grads[0] is None or grads[0].shape == x.shape
        for g, c in zip(grads[1:], cores):
            assert g is None or (g.shape == c.shape and not g.any()), f"{strategy} {order}"


@settings(max_examples=12)
@given(views())
def test_every_route_on_non_contiguous_inputs_float64(problem):
    in_shape, out_shape, inner, lead, seed, kind = problem
    cores = random_cores(in_shape, out_shape, inner, torch.float64, seed)
    g = torch.Generator().manual_seed(seed + 1)
    x = _non_contiguous(kind, lead, math.prod(in_shape), g)
    assert x.shape == (*lead, math.prod(in_shape))
    bias = torch.randn(math.prod(out_shape), generator=g, dtype=torch.float64)
    _assert_every_route_matches(x, cores, bias, lead, _f64_tol)


def test_fused_rejects_float64():
    with pytest.raises(BackendUnavailableError, match="float64"):
        contract(torch.randn(3, 12, dtype=torch.float64), random_cores((2, 3, 2), (3, 2, 2), (3, 4)), strategy="fused")


@pytest.mark.parametrize("lead", [(0,), (3, 0)])
def test_fused_on_empty_float32_batches(lead):
    cores = random_cores((2, 3, 2), (3, 2, 2), (3, 4), torch.float32)
    _assert_every_route_matches(torch.randn(*lead, 12), cores, torch.randn(12), lead, _f32_size_scaled_tol)


def test_non_contiguous_views_really_are_non_contiguous():
    g = torch.Generator().manual_seed(0)
    for kind in ("transposed", "sliced", "batch_transposed", "expanded"):
        x = _non_contiguous(kind, (3, 5), 12, g)
        assert x.shape == (3, 5, 12) and not x.is_contiguous(), kind


def _f32_size_scaled_tol(x, cores):
    """Rounding bound ``4 * sqrt(in_features) * eps * max(|x| @ |W|)`` (a scalar atol, rtol 0).

    ``sqrt(in_features) * eps`` is the typical error of a float32 dot product of that length relative to
    ``sum |x_k w_k|``; the factor 4 is the safety margin (measured errors are ~100x below it at BERT size).
    """
    if x.numel() == 0:
        return dict(rtol=0.0, atol=0.0)
    w = MPO([c.double() for c in cores]).to_dense()
    scale = float((x.double().abs() @ w.abs()).max())
    return dict(rtol=0.0, atol=4 * math.sqrt(x.shape[-1]) * _EPS32 * scale)


@settings(max_examples=10)
@given(views())
def test_every_route_float32_within_size_scaled_tolerance(problem):
    in_shape, out_shape, inner, lead, seed, kind = problem
    cores = random_cores(in_shape, out_shape, inner, torch.float32, seed)
    x = _non_contiguous(kind, lead, math.prod(in_shape), torch.Generator().manual_seed(seed + 1)).float()
    _assert_every_route_matches(x, cores, None, lead, _f32_size_scaled_tol)


def test_float32_tolerance_is_tight_at_bert_size():
    """768 x 768, n=5, bonds 16: the size-scaled bound is small in absolute terms (outputs are O(1)) and holds."""
    cores = random_cores((4, 4, 4, 4, 3), (4, 4, 4, 4, 3), (16, 16, 16, 9), torch.float32)
    x = torch.randn(2, 9, 768).transpose(0, 1)
    tol = _f32_size_scaled_tol(x, cores)
    assert tol["atol"] < 1e-3
    _assert_every_route_matches(x, cores, torch.randn(768), (9, 2), _f32_size_scaled_tol)
