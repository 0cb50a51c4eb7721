"""The GPU traffic / FLOP model (mpo_core.gpu over mpo_core.cost) against hand counts and against torch itself.

The torch eager rows are checked against an independent count: the unfused sequence is
run under a ``TorchDispatchMode`` that adds up the bytes of every aten op's tensor inputs
(read) and outputs (written), which must equal the model exactly (fp32, so ``s = 4``).
"""
from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

from mpo_core.cost import Cost, dense_linear_cost, mpo_linear_cost
from mpo_core import gpu as rl
from mpo_core.gpu import registry
from mpo_core.gpu.shapes import MPO_MODES
from mpo_core.shapes import capped_ranks, full_ranks

_VIEWS = {"view", "_unsafe_view", "t", "transpose", "expand", "detach", "reshape", "alias", "unsqueeze", "squeeze"}


class _ByteCounter(TorchDispatchMode):
    """Bytes read (tensor inputs) and written (tensor outputs) per aten op, views excluded."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        name = func.overloadpacket.__name__
        if name not in _VIEWS:
            size = lambda tree: sum(t.numel() * t.element_size() for t in tree_flatten(tree)[0]  # noqa: E731
                                    if isinstance(t, torch.Tensor))
            self.ops.append((name, size((args, kwargs)), size(out)))
        return out


def _counted(fn) -> _ByteCounter:
    counter = _ByteCounter()
    with counter:
        fn()
    return counter


def _torch_model(op: str, direction: str, m: int, n: int) -> list[tuple[float, float]]:
    return [(c.bytes_read, c.bytes_written) for c in rl.fused_op_kernels(op, direction, m, n, 4, impl="torch")]


@settings(max_examples=20)
@given(m=st.integers(1, 40), n=st.integers(1, 70))
def test_property_torch_sequences_match_aten_byte_counts(m, n):
    x, r = torch.randn(m, n, requires_grad=True), torch.randn(m, n)
    w, b = torch.randn(n), torch.randn(n, requires_grad=True)
    got = _counted(lambda: F.layer_norm(x, (n,), w, b)).ops
    assert [(rd, wr) for _, rd, wr in got] == _torch_model("layer_norm", "fwd", m, n)
    got = _counted(lambda: F.layer_norm(x + r, (n,), w, b)).ops
    assert [name for name, _, _ in got] == ["add", "native_layer_norm"]
    assert [(rd, wr) for _, rd, wr in got] == _torch_model("residual_layer_norm", "fwd", m, n)
    got = _counted(lambda: F.gelu(x + b)).ops
    assert [(rd, wr) for _, rd, wr in got] == _torch_model("bias_gelu", "fwd", m, n)
    y = F.gelu(x + b)
    dy = torch.randn(m, n)
    got = _counted(lambda: torch.autograd.grad(y, [x, b], dy)).ops
    assert [name for name, _, _ in got] == ["gelu_backward", "sum"]
    assert [(rd, wr) for _, rd, wr in got] == _torch_model("bias_gelu", "bwd", m, n)


def test_kernel_cost_hand_counts():
    m, n, s = 2, 3, 2  # e = 12 bytes, p = 6, stats = 16, partials (G=5) = 60
    c = rl.kernel_cost("layer_norm_fwd", m, n, s)
    assert (c.bytes_read, c.bytes_written, c.flops_fma) == (24, 28, 7 * 6)
    c = rl.kernel_cost("residual_layer_norm_fwd", m, n, s, dropout=True)
    assert (c.bytes_read, c.bytes_written, c.flops_fma) == (36, 40, 10 * 6)
    c = rl.kernel_cost("layer_norm_bwd", m, n, s, dropout=True, partials=5)
    assert (c.bytes_read, c.bytes_written) == (24 + 16 + 6, 24 + 120)
    c = rl.kernel_cost("column_sum", m, n, s, partials=5)
    assert (c.bytes_read, c.bytes_written) == (60, 6)
    c = rl.kernel_cost("torch_dropout", m, n, s)
    assert (c.bytes_read, c.bytes_written) == (12, 12 + 6)


def test_fused_op_totals_at_bert_base():
    m, n, s = 16384, 768, 2
    e, p, st_, part = m * n * s, n * s, 8 * m, 264 * n * 4
    fused = {d: rl.fused_op_cost("residual_dropout_layer_norm", d, m, n, s) for d in ("fwd", "bwd")}
    torch_ = {d: rl.fused_op_cost("residual_dropout_layer_norm", d, m, n, s, "torch") for d in ("fwd", "bwd")}
    assert fused["fwd"].bytes == 4 * e + st_ + 2 * p
    assert torch_["fwd"].bytes == 7 * e + m * n + st_ + 2 * p
    assert fused["bwd"].bytes == 4 * e + st_ + p + 4 * part + 2 * p
    assert torch_["bwd"].bytes == 7 * e + m * n + 2 * st_ + 3 * p
    assert fused["fwd"].launches == 1 and fused["bwd"].launches == 3 and torch_["fwd"].launches == 3


@settings(max_examples=30)
@given(m=st.integers(4096, 1 << 17), n=st.sampled_from([128, 768, 1024, 3072, 4096, 8192]),
       op=st.sampled_from(rl.FUSED_OPS), s=st.sampled_from([2, 4]))
def test_property_fusion_never_moves_more_bytes(m, n, op, s):
    for d in ("fwd", "bwd"):
        assert rl.fused_op_cost(op, d, m, n, s).bytes <= rl.fused_op_cost(op, d, m, n, s, "torch").bytes


def test_roofline_seconds():
    assert rl.roofline_seconds(Cost(bytes_read=3.35e9), rl.H100) == pytest.approx(1e-3)
    assert rl.roofline_seconds(Cost(flops_tensor=989e12, bytes_read=1), rl.H100) == pytest.approx(1.0)
    c = Cost(flops_tensor=312e9, flops_fma=19.5e9, bytes_read=1e9, bytes_written=1e9)
    assert rl.roofline_seconds(c, rl.A100) == pytest.approx(2e-3)  # 1 ms + 1 ms compute > 1 ms memory
    assert rl.sequence_seconds([c, c], rl.A100) == pytest.approx(4e-3)


def test_linear_cost_fused_is_the_ops_cost_model():
    shape = MPO_MODES[768], MPO_MODES[3072]
    ranks = full_ranks(*shape)
    c = rl.linear_cost("fused", 4096, *shape, ranks, 2, training=False)
    ref = mpo_linear_cost(4096, *shape, ranks, 2, bias=True, activation="gelu")
    assert c["fwd"].bytes == ref["bytes"] and c["fwd"].flops == ref["flops_tensor"] + ref["flops_fma"]
    assert c["bwd"].bytes == ref["bytes_bwd"] and c["bwd"].flops == ref["flops_bwd"]
    train = rl.linear_cost("fused", 4096, *shape, ranks, 2)
    assert train["fwd"].bytes_written == c["fwd"].bytes_written + 2 * 4096 * 3072  # stored pre-activation


def test_dense_linear_cost_counts():
    m, shape = 1000, ((2, 3), (4, 5))
    ranks = full_ranks(*shape)
    assert ranks == [1, 8, 1]
    c = dense_linear_cost(m, *shape, ranks, 2, bias=True, activation=True)
    k, n = 6, 20
    # rebuild: 2 * (2*4 rows) * 8 * 3*5 * 1 FLOPs; GEMM 2 m k n
    assert c["fwd"].flops_tensor == 2 * 8 * 8 * 15 + 2 * m * k * n
    assert c["fwd"].flops_fma == 9 * m * n
    assert c["bwd"].flops_tensor == 2 * (2 * 8 * 8 * 15) + 4 * m * k * n
    cores = 2 * 4 * 8 + 8 * 3 * 5
    assert c["fwd"].bytes == 2 * (cores + k * n) + 2 * (m * k + k * n + m * n) + 2 * (2 * m * n + n) + 2 * 2 * m * n


def test_sequential_strategy_is_the_contract_planner():
    from mpo_core.contract.plan import make_plan

    shape = MPO_MODES[768], MPO_MODES[768]
    ranks = capped_ranks(*shape, 16)
    c = rl.linear_cost("sequential", 512, *shape, ranks, 2, bias=False, activation=False)
    plan = make_plan(*shape, tuple(ranks), 512, "cuda", torch.bfloat16, "sequential", None, False, None, False)
    assert c["fwd"].flops == plan.chosen.flops and c["fwd"].bytes == plan.chosen.bytes
    assert c["bwd"].bytes == 2 * c["fwd"].bytes


def test_kernel_fraction_little_law():
    dev = rl.H100
    needed = dev.model.bandwidth * dev.hbm_latency_s
    cost = Cost(bytes_read=1e9)
    full = rl.kernel_fraction(cost, cost, needed / dev.sm_count, 1, dev)
    assert full["fraction"] == pytest.approx(1.0) and full["bound"] == "memory"
    half = rl.kernel_fraction(cost, cost, needed / dev.sm_count / 2, 1, dev)
    assert half["fraction"] == pytest.approx(0.5) and half["bw_fraction"] == pytest.approx(0.5)
    # compute-bound with padding: executed 4/3 of the useful FLOPs -> 3/4 of the roofline
    padded = rl.kernel_fraction(Cost(flops_tensor=4e12), Cost(flops_tensor=3e12), 1e6, 1, dev)
    assert padded["fraction"] == pytest.approx(0.75) and padded["bound"] == "compute"
    assert rl.kernel_fraction(cost, cost, 1e3, 0, dev)["fraction"] == 0.0


def test_every_registered_kernel_has_a_model():
    for spec in registry.kernel_specs():
        executed, useful, flight = rl.spec_model(spec)
        assert executed.bytes > 0 and flight > 0 and useful.flops_tensor <= executed.flops_tensor
        if spec.family == "mpo_matmul":  # BERT's 4x4 end cores: no padding, rebuild = DP / BLOCK_M of the GEMM
            m, k, n = spec.problem
            rebuild = executed.flops_tensor / useful.flops_tensor - 1
            assert rebuild == pytest.approx(16 * math.ceil(m / spec.constexprs["BLOCK_M"]) / m)


def test_mpobert_step_fused_saves_exactly_the_fused_ops_and_linears():
    from mpobert.config import MPOBertConfig

    shape = rl.BertShape.from_config(MPOBertConfig.mpobert12(), params=20_000_000)
    fused, unfused = rl.mpobert_step(shape, fused=True), rl.mpobert_step(shape, fused=False)
    common = lambda ks: {n: c for n, c in ks if not any(t in n for t in ("layer_norm", "_ln", "gelu", ".fused", ".dense"))}  # noqa: E731
    assert common(fused) == common(unfused)  # attention, adapters, bias adds, GEMMs of the heads, LAMB
    m, h = 32 * 512, 768
    attention = dict(fused)["layer0.attention"]
    assert attention.flops_tensor == 4 * m * 512 * h
    s_f, s_u = rl.step_summary(fused), rl.step_summary(unfused)
    assert s_f["kind"] == "model" and s_f["GB"] < s_u["GB"]
    saved = sum(c.bytes for _, c in unfused) - sum(c.bytes for _, c in fused)
    per_layer = sum(rl.fused_op_cost(op, d, m, n, 2, "torch").bytes - rl.fused_op_cost(op, d, m, n, 2).bytes
                    for op, n in (("residual_layer_norm", h), ("residual_layer_norm", h), ("bias_gelu", 3072))
                    for d in ("fwd", "bwd"))
    linear = sum(rl.linear_cost(st_, m, MPO_MODES[k], MPO_MODES[n], None, 2, bias=False,
                                activation=False)[d].bytes * sign
                 for st_, sign in (("dense", 1), ("fused", -1))
                 for k, n in ((h, h), (h, h), (h, h), (h, h), (h, 3072), (3072, h)) for d in ("fwd", "bwd"))
    heads = sum(rl.fused_op_cost(op, d, m, 128, 2, "torch").bytes - rl.fused_op_cost(op, d, m, 128, 2).bytes
                for op in ("layer_norm", "layer_norm", "bias_gelu") for d in ("fwd", "bwd"))
    assert saved == pytest.approx(12 * (per_layer + linear) + heads)
    for name in ("ms_A100-80GB", "ms_H100-SXM"):
        assert s_u[name] > 0 and s_f[name] > 0


def test_bad_input_is_rejected():
    with pytest.raises(ValueError, match="kernel must be one of"):
        rl.kernel_cost("softmax", 2, 3)
    with pytest.raises(ValueError, match="tokens must be >= 1"):
        rl.kernel_cost("layer_norm_fwd", 0, 3)
    with pytest.raises(ValueError, match="op must be one of"):
        rl.fused_op_cost("rms_norm", "fwd", 2, 3)
    with pytest.raises(ValueError, match="direction"):
        rl.fused_op_cost("layer_norm", "both", 2, 3)
    with pytest.raises(ValueError, match="impl"):
        rl.fused_op_cost("layer_norm", "fwd", 2, 3, impl="apex")
    with pytest.raises(ValueError, match="strategy must be one of"):
        rl.linear_cost("cached", 2, (4, 4), (4, 4))
    with pytest.raises(TypeError, match="cost must be a Cost"):
        rl.roofline_seconds(1.0, rl.H100)
    with pytest.raises(TypeError, match="device must be a Gpu"):
        rl.roofline_seconds(Cost(), rl.H100.model)
    with pytest.raises(ValueError, match="blocks_per_sm"):
        rl.kernel_fraction(Cost(), Cost(), 1.0, -1, rl.H100)
