"""Paths of the library that the rest of the suite does not take, taken here (``bash scripts/coverage.sh``):
a fused op traced by ``torch.compile``, plans that choose the fused kernel or a candidate outside the
table's first rows, a rounding bound that does not exist, model surgery on a bias-less GPT-2
``Conv1D`` or without tqdm, the weight cache of a DDP-wrapped model."""
from __future__ import annotations

import dataclasses
import math
import sys

import pytest
import torch
from torch import nn

from mpo_core import backends, ops


@pytest.mark.skipif(not backends()["cpp"], reason="needs the C++ extension (pip install -e .)")
def test_fused_op_under_torch_compile_goes_through_the_registered_op():
    """While dynamo traces, the op runs as its ``torch.library`` custom op (the graph cannot hold the autograd
    Function); forward and gradient equal the eager reference."""
    g = torch.Generator().manual_seed(0)
    x, r = torch.randn(4, 32, generator=g, requires_grad=True), torch.randn(4, 32, generator=g)
    w, b = torch.randn(32, generator=g), torch.randn(32, generator=g)
    compiled = torch.compile(lambda x, r: ops.residual_layer_norm(x, r, w, b, backend="cpp"), backend="aot_eager",
                             fullgraph=True)
    y, ref = compiled(x, r), ops.residual_layer_norm(x, r, w, b, backend="torch")
    assert torch.allclose(y, ref, atol=1e-5)
    (gx,), (gref,) = torch.autograd.grad(y.sum(), x), torch.autograd.grad(ref.sum(), x)
    assert torch.allclose(gx, gref, atol=1e-5)


@pytest.mark.skipif(not backends()["cpp"], reason="needs the C++ extension (pip install -e .)")
def test_the_registered_op_path_in_eager_mode(monkeypatch):
    """Dynamo runs that path symbolically (coverage.py never sees it): taken here in eager mode, it gives the
    autograd Function's forward and gradient."""
    g = torch.Generator().manual_seed(1)
    x, r = torch.randn(4, 32, generator=g, requires_grad=True), torch.randn(4, 32, generator=g)
    w, b = torch.randn(32, generator=g), torch.randn(32, generator=g)
    ref = ops.residual_layer_norm(x, r, w, b, backend="cpp")
    (gref,) = torch.autograd.grad(ref.sum(), x)
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    y = ops.residual_layer_norm(x, r, w, b, backend="cpp")
    (gx,) = torch.autograd.grad(y.sum(), x)
    assert torch.equal(y, ref) and torch.allclose(gx, gref, atol=1e-6)


def test_plans_with_the_fused_kernel_and_a_chosen_candidate_past_the_table(monkeypatch):
    from mpo_core.contract import explain
    from mpo_core.contract.plan import Candidate, Plan
    from mpo_core.contract.route import gemm_beats_plan
    from mpo_core.contract.sequential import all_orders, named_orders
    from mpo_core.nn import MPOLinear

    layer = MPOLinear(64, 96, (2, 4, 8), (2, 6, 8))
    x = torch.randn(16, 64)
    plan = explain(x, list(layer.cores), layer.bias)
    fused = Candidate("fused", (), plan.chosen.flops, plan.chosen.bytes, plan.chosen.seconds)
    assert fused.label == "fused mpo_linear (triton)"
    assert gemm_beats_plan(dataclasses.replace(plan, chosen=fused)) is False  # never a GEMM against the fused kernel
    monkeypatch.setattr(Plan, "MAX_ROWS", 1)
    chosen_last = dataclasses.replace(plan, chosen=plan.candidates[-1])
    assert plan.candidates[0] != plan.candidates[-1] and plan.candidates[-1].label in str(chosen_last)
    assert all_orders(12) == list(dict.fromkeys(named_orders(12).values()))  # past the limit: the named orders only


def test_rounding_slack_without_a_bound():
    from mpo_core.randomized import gemm_rounding_slack

    assert gemm_rounding_slack(10**8, 4, 2.0**-24) == math.inf  # p u >= 1: no bound
    assert gemm_rounding_slack(100, 4, 2.0**-24) == pytest.approx(100 * 2.0**-24 / (1 - 100 * 2.0**-24) * 2, rel=1e-12)


def test_surgery_of_a_biasless_conv1d_and_progress_without_tqdm(monkeypatch):
    from transformers.pytorch_utils import Conv1D

    from mpo_core.nn import MPOLinear
    from mpo_core.nn.surgery import dense_module, progress_bar

    conv = Conv1D(12, 8)
    conv.bias = None
    layer = MPOLinear.from_linear(conv, in_shape=(2, 4), out_shape=(3, 4))
    back = dense_module(layer)
    assert isinstance(back, Conv1D) and torch.count_nonzero(back.bias) == 0
    assert torch.allclose(back(torch.ones(2, 8)), torch.ones(2, 8) @ conv.weight, atol=1e-5)
    monkeypatch.setitem(sys.modules, "tqdm.auto", None)  # tqdm not installed
    items = list(range(10))
    assert progress_bar(items, "x", None) is items  # short, not a terminal: no bar
    with pytest.raises(ImportError, match="progress=True needs tqdm"):
        progress_bar(items, "x", progress=True)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)  # a long run on a terminal: a bar if tqdm were there
    assert progress_bar(items, "x", None) is items


def test_weight_cache_of_a_ddp_model_and_shared_central_side():
    import torch.distributed as dist

    from mpo_core.accumulate import shared_central_weights, weight_cache
    from mpo_core.nn import MPOLinear

    with pytest.raises(ValueError, match="side must be None, 'left' or 'right', got 'up'"):
        layer = MPOLinear(8, 8, (2, 4), (4, 2), n=None)
        shared_central_weights([list(layer.cores)], 0, side="up")
    if not dist.is_available():
        pytest.skip("torch.distributed is not built")
    dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    try:
        model = nn.Sequential(MPOLinear(8, 8, (2, 4), (4, 2)))
        ddp = nn.parallel.DistributedDataParallel(model)
        x = torch.randn(3, 8)
        with weight_cache(ddp):
            loss = ddp(x).square().sum()
            loss.backward()
        assert all(p.grad is not None for p in model.parameters())
        for p in model.parameters():
            p.grad = None
        with weight_cache(ddp, process_group=True):  # a forward without backward: no gradient to all-reduce
            ddp(x)
        assert all(p.grad is None for p in model.parameters())
    finally:
        dist.destroy_process_group()


def test_rounds_report_as_a_dict():
    from mpo_core.compress_report import RoundsReport

    assert RoundsReport(budget=100).to_dict() == {"budget": 100, "rounds": []}
