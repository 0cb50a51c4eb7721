"""The one cost model (mpo_core.cost) against hand counts, torch's own FLOP count, and the planner that uses it."""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils.flop_counter import FlopCounterMode

from mpo_core.contract import clear_plan_cache, explain
from mpo_core.cost import (DEFAULT_MODELS, Cost, DeviceModel, chain_cost, core_shapes, dense_linear_cost, device_model,
                           epilogue_cost, gemm_cost, set_device_model)
from mpo_core.shapes import core_params, full_ranks

RATES = {"float32": 2e12, "bfloat16": 8e12}


def test_seconds_is_the_roofline_plus_overhead_per_op():
    dev = DeviceModel("toy", RATES, vector_flops=1e12, bandwidth=1e9, overhead=1e-3)
    # memory bound: 2e9 bytes / 1e9 B/s = 2 s, plus 3 ops of 1 ms
    assert dev.seconds(Cost(flops_tensor=2e12, bytes_read=1e9, bytes_written=1e9, launches=3), torch.float32) \
        == pytest.approx(2.003)
    # compute bound: 16e12 / 8e12 (bf16 matmul) + 1e12 / 1e12 (vector) = 3 s > 1 s of memory
    assert dev.seconds(Cost(flops_tensor=16e12, flops_fma=1e12, bytes_read=1e9), torch.bfloat16) \
        == pytest.approx(3.001)
    assert dev.matmul_rate(torch.float16) == 2e12  # not listed: the float32 rate
    assert dev.op_seconds(4e12, 1e9, torch.float32) == pytest.approx(2.001)


def test_op_seconds_is_the_planners_old_formula():
    """``max(flops / peak, bytes / bandwidth) + overhead``, exactly, for every runtime entry and dtype."""
    for model in DEFAULT_MODELS.values():
        for dtype in (torch.float64, torch.float32, torch.bfloat16, torch.float16):
            for flops, nbytes in ((0, 4096), (1e9, 1e3), (12345, 67890)):
                want = max(flops / model.matmul_rate(dtype), nbytes / model.bandwidth) + model.overhead
                assert model.op_seconds(flops, nbytes, dtype) == want


def test_bad_device_models_are_rejected():
    with pytest.raises(ValueError, match="float32"):
        DeviceModel("x", {"bfloat16": 1e12}, vector_flops=1e12, bandwidth=1e9)
    with pytest.raises(ValueError, match="> 0"):
        DeviceModel("x", {"float32": 0.0}, vector_flops=1e12, bandwidth=1e9)
    with pytest.raises(ValueError, match="overhead"):
        DeviceModel("x", RATES, vector_flops=1e12, bandwidth=1e9, overhead=-1.0)
    with pytest.raises(TypeError, match="cost must be a Cost"):
        DEFAULT_MODELS["cpu"].seconds(1.0, torch.float32)
    with pytest.raises(TypeError, match="torch.dtype"):
        DEFAULT_MODELS["cpu"].matmul_rate("float32")
    with pytest.raises(TypeError, match="model"):
        set_device_model("cpu", object())


def test_a_calibrated_entry_replaces_the_table_and_the_planner_uses_it():
    cores = [torch.randn(1, 4, 4, 8), torch.randn(8, 4, 4, 8), torch.randn(8, 4, 4, 1)]
    assert device_model("cpu") is DEFAULT_MODELS["cpu"] and device_model("xpu") is DEFAULT_MODELS["cuda"]
    before = explain(64, cores).chosen.seconds
    slow = DeviceModel("calibrated cpu", {"float32": 1e9}, vector_flops=1e9, bandwidth=1e8, overhead=1e-2)
    try:
        set_device_model("cpu", slow)
        clear_plan_cache()
        assert device_model("cpu") is slow
        plan = explain(64, cores)
        assert plan.chosen.seconds > before and all(c.seconds >= slow.overhead for c in plan.candidates)
    finally:
        set_device_model("cpu", None)
        clear_plan_cache()
    assert device_model("cpu") is DEFAULT_MODELS["cpu"] and explain(64, cores).chosen.seconds == before


def _chain(cores: list[torch.Tensor]) -> torch.Tensor:
    t = cores[0]
    for c in cores[1:]:
        x0, a, b, _ = t.shape
        _, i, j, e = c.shape
        t = (t.reshape(-1, t.shape[-1]) @ c.reshape(c.shape[0], -1)).reshape(x0, a, b, i, j, e)
        t = t.permute(0, 1, 3, 2, 4, 5).reshape(x0, a * i, b * j, e)
    return t


@settings(max_examples=25, deadline=None)
@given(modes=st.lists(st.tuples(st.integers(1, 4), st.integers(1, 4)), min_size=1, max_size=4),
       cap=st.integers(1, 6), left=st.integers(1, 3))
def test_property_chain_cost_matches_torch_flops_and_element_counts(modes, cap, left):
    in_shape, out_shape = [i for i, _ in modes], [j for _, j in modes]
    ranks = [min(r, cap) for r in full_ranks(in_shape, out_shape)]
    ranks[0] = left  # a chain segment may start at an inner bond
    shapes = core_shapes(in_shape, out_shape, ranks)
    cores = [torch.randn(s) for s in shapes]
    with FlopCounterMode(display=False) as counter:
        result = _chain(cores)
    cost = chain_cost(shapes, 4)
    assert cost.flops_tensor == counter.get_total_flops() and cost.flops_fma == 0
    inter = sum(math.prod(_chain(cores[: q + 1]).shape) for q in range(1, len(cores) - 1))
    assert cost.bytes_read == 4 * (sum(c.numel() for c in cores) + inter)
    assert cost.bytes_written == 4 * (inter + result.numel())
    assert cost.launches == len(cores) - 1


@settings(max_examples=20, deadline=None)
@given(m=st.integers(1, 9), k=st.integers(1, 9), n=st.integers(1, 9), bias=st.booleans())
def test_property_gemm_cost_matches_torch(m, k, n, bias):
    x, w, b = torch.randn(m, k), torch.randn(k, n), torch.randn(n)
    with FlopCounterMode(display=False) as counter:
        torch.addmm(b, x, w) if bias else x @ w
    c = gemm_cost(m, k, n, 4, bias=bias)
    assert c.flops_tensor == counter.get_total_flops()
    assert (c.bytes_read, c.bytes_written) == (4 * (m * k + k * n + (n if bias else 0)), 4 * m * n)


def test_dense_linear_cost_is_chain_plus_gemm_plus_epilogue():
    in_shape, out_shape, m = (4, 4, 3), (4, 2, 4), 100
    ranks = full_ranks(in_shape, out_shape)
    c = dense_linear_cost(m, in_shape, out_shape, ranks, 2)
    k, n = math.prod(in_shape), math.prod(out_shape)
    parts = chain_cost(core_shapes(in_shape, out_shape, ranks), 2) + gemm_cost(m, k, n, 2) \
        + epilogue_cost(m, n, 2, bias=True, activation=True)
    assert c["fwd"] == parts and c["fwd"].launches == len(in_shape) - 1 + 3
    # the one intermediate: (4*4) * (4*2) rows of bond d_2, read once after being written once
    assert parts.bytes_read - gemm_cost(m, k, n, 2).bytes_read - epilogue_cost(m, n, 2, bias=True, activation=True) \
        .bytes_read == 2 * (core_params(in_shape, out_shape, ranks) + 16 * 8 * ranks[2])
    with pytest.raises(ValueError, match="bias or activation"):
        epilogue_cost(m, n, 2, bias=False, activation=False)
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        dense_linear_cost(0, in_shape, out_shape, ranks)


def test_batched_gemm_cost_is_batch_products_in_one_op():
    one, three = gemm_cost(5, 7, 11, 2), gemm_cost(5, 7, 11, 2, batch=3)
    assert (three.flops_tensor, three.bytes_read, three.bytes_written) == (3 * one.flops_tensor, 3 * one.bytes_read,
                                                                        3 * one.bytes_written)
    assert three.launches == one.launches == 1


def test_pricing_the_fused_path_needs_no_triton():
    """cost/ reads the kernel's tile rule from kernels.tiles, which imports no Triton (same padding as triton's helpers)."""
    import subprocess
    import sys

    code = ("import sys; from mpo_core.cost import mpo_linear_cost; "
            "mpo_linear_cost(64, (4, 4, 4, 4, 3), (4, 4, 8, 6, 4), [1, 16, 64, 64, 16, 1], 2); "
            "assert 'triton' not in sys.modules")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    triton = pytest.importorskip("triton")
    from mpo_core.kernels.tiles import next_power_of_2
    assert all(next_power_of_2(n) == triton.next_power_of_2(n) for n in range(0, 3000))
