"""Bad input gets an early ``TypeError``/``ValueError`` that names the argument (rule 6 of
docs/architecture.md), for the checks no other test reaches; and the small public paths beside them
(``MPO.clone``, a norm read from the cores, a Gram that needs a ridge) that CI must execute
(``bash scripts/coverage.sh``, docs/gpu.md)."""
from __future__ import annotations

import dataclasses

import pytest
import torch
from torch import nn

from mpo_core import MPO, decompose
from mpo_core.allocation import allocate_ranks, allocation_bound, resolve_budget
from mpo_core.cost.chain import chain_cost
from mpo_core.cost.devices import DEFAULT_MODELS, device_model, set_device_model
from mpo_core.cost.fused import fused_linear_cost
from mpo_core.mpo import validate_cores, validate_linear_inputs
from mpo_core.nn.dense import linear_weight
from mpo_core.shapes import resolve_shapes
from mpo_core.truncation import check_rel_tol
from mpo_core.whitening import InputStats, collect_input_stats, kronecker_factors, model_output, whitening_factor


def _mpo(seed: int = 0) -> MPO:
    w = torch.randn(8, 12, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    return decompose(w, n=2)


# ----------------------------------------------------------------------------- the MPO
def test_mpo_arguments():
    cores = _mpo().cores
    with pytest.raises(ValueError, match="error_bound must be a finite float >= 0, got -1.0"):
        MPO(cores, error_bound=-1.0)
    with pytest.raises(ValueError, match=r"canonical_center must be in \[0, 2\), got 2"):
        MPO(cores, canonical_center=2)
    with pytest.raises(ValueError, match="cores must not be empty"):
        validate_cores([])
    with pytest.raises(TypeError, match=r"cores\[1\] must be a torch.Tensor, got list"):
        validate_cores([cores[0], [1.0]])
    meta = [cores[0], torch.empty(cores[1].shape, dtype=cores[1].dtype, device="meta")]
    with pytest.raises(ValueError, match=r"cores\[1\] is on meta, but cores\[0\] is on cpu"):
        validate_cores(meta)
    x = torch.randn(3, 8, dtype=torch.float64)
    with pytest.raises(ValueError, match="bias is on meta but the cores are on cpu"):
        validate_linear_inputs(x, cores, torch.empty(12, dtype=torch.float64, device="meta"))
    with pytest.raises(TypeError, match="center must be an int, got float"):
        _mpo().canonicalize(1.0)
    with pytest.raises(ValueError, match=r"center must be in \[0, 2\), got 5"):
        _mpo().canonicalize(5)
    state = _mpo().state()
    del state["error_bound"]
    with pytest.raises(ValueError, match=r"MPO state is missing fields \['error_bound'\]"):
        MPO.from_state(state)


def test_mpo_clone_norms_and_map_location():
    mpo = _mpo()
    copy = mpo.clone()
    assert all(torch.equal(a, b) and a.data_ptr() != b.data_ptr() for a, b in zip(copy.cores, mpo.cores))
    bare = MPO([c.clone() for c in mpo.cores])  # no norm known, not canonical
    assert bare.relative_error_bound is None
    assert bare.frobenius_norm() == pytest.approx(float(mpo.to_dense().norm()), rel=1e-12)
    back = MPO.from_state(mpo.state(), map_location="cpu")
    assert torch.equal(back.to_dense(), mpo.to_dense())


# ----------------------------------------------------------------------------- allocation, budgets, shapes
def test_allocation_arguments():
    exact = {"a": _mpo(0), "b": _mpo(1)}
    with pytest.raises(ValueError, match="ranks must have n\\+1=3 entries, got 2"):
        allocation_bound(exact["a"], [1, 1])
    with pytest.raises(TypeError, match="mpo must be an MPO, got Tensor"):
        allocation_bound(torch.zeros(2, 2), [1, 1, 1])
    with pytest.raises(TypeError, match="mpos must be a non-empty mapping"):
        allocate_ranks({}, budget=10)
    with pytest.raises(ValueError, match="give exactly one of budget= and rel_tol="):
        allocate_ranks(exact, budget=10, rel_tol=0.1)
    with pytest.raises(ValueError, match="weights apply to a budget"):
        allocate_ranks(exact, rel_tol=0.1, weights={"a": 1.0, "b": 1.0})
    with pytest.raises(ValueError, match=r"weights has no entry for \['b'\]"):
        allocate_ranks(exact, budget=100, weights={"a": 1.0})
    with pytest.raises(ValueError, match="weights must be finite floats > 0"):
        allocate_ranks(exact, budget=100, weights={"a": 1.0, "b": 0.0})
    with pytest.raises(ValueError, match="budget must be >= 1 entry, got 0"):
        resolve_budget(0, 100)
    with pytest.raises(ValueError, match="in_shape must have at least one mode"):
        resolve_shapes(4, 4, in_shape=(), out_shape=(4,))
    with pytest.raises(TypeError, match="rel_tol must be a float, got str"):
        check_rel_tol("0.1")
    with pytest.raises(ValueError, match="matrix must not be empty"):
        decompose(torch.zeros(0, 4), n=2)


def test_half_precision_is_decomposed_in_float32():
    w = torch.randn(8, 12, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    mpo = decompose(w, n=2, svd_dtype="input")  # the input's dtype, but no LAPACK SVD takes bfloat16
    assert mpo.dtype == torch.bfloat16
    assert float((mpo.to_dense().float() - w.float()).norm() / w.float().norm()) < 1e-2


# ----------------------------------------------------------------------------- cost model
def test_cost_model_arguments():
    with pytest.raises(ValueError, match="cores must hold at least one core shape"):
        chain_cost([], 2)
    with pytest.raises(ValueError, match="the fused kernel does not take"):
        fused_linear_cost(16, (4, 4), (4, 4), [1, 100000, 1])
    with pytest.raises(TypeError, match="device_type must be a non-empty str"):
        set_device_model("", None)
    set_device_model("plasma", DEFAULT_MODELS["cpu"])
    assert device_model("plasma") is DEFAULT_MODELS["cpu"]
    set_device_model("plasma", None)  # not a default: forgotten, unknown types use the CUDA entry again
    assert device_model("plasma") is device_model("cuda") is not DEFAULT_MODELS["cpu"]


def test_linear_weight_of_a_non_linear_module():
    with pytest.raises(TypeError, match="expected an nn.Linear or a transformers Conv1D, got ReLU"):
        linear_weight(nn.ReLU())


# ----------------------------------------------------------------------------- whitening
def test_input_stats_arguments():
    with pytest.raises(ValueError, match="features must be an int >= 1, got 0"):
        InputStats(0)
    stats = InputStats(4, name="q")
    with pytest.raises(TypeError, match="the input of q must be a floating tensor"):
        stats.update(torch.ones(2, 4, dtype=torch.long))
    with pytest.raises(ValueError, match="the input of q has 3 features, expected 4"):
        stats.update(torch.ones(2, 3))


def test_whitening_factor_ridge_and_its_failure():
    with pytest.raises(ValueError, match="damping must be a float > 0, got 0"):
        whitening_factor(torch.eye(2, dtype=torch.float64), damping=0)
    # symmetric with a non-negative diagonal but indefinite: the Cholesky fails, the ridge grows until it succeeds
    w = whitening_factor(torch.tensor([[1.0, 2.0], [2.0, 1.0]], dtype=torch.float64))
    assert w.rank_deficient and w.ridge > 1.0
    # a zero diagonal: a ridge relative to it stays zero, nothing can help
    with pytest.raises(ValueError, match="could not be factored even with ridge 0: it is not positive semi-definite"):
        whitening_factor(torch.tensor([[0.0, 1.0], [1.0, 0.0]], dtype=torch.float64))
    with pytest.raises(ValueError, match=r"in_shape=\(2, 3\) has product 6, the Gram has 4 rows"):
        kronecker_factors(whitening_factor(torch.eye(4, dtype=torch.float64)), (2, 3))


def test_model_output_finds_the_tensor():
    t = torch.ones(2)
    assert model_output({"pooled": "x", "other": t}) is t  # a mapping without the usual keys: its first tensor
    assert model_output(("x", t)) is t
    with pytest.raises(TypeError, match="cannot find a tensor in the model's output"):
        model_output({"a": "x"})


def test_collect_input_stats_needs_tensor_inputs():
    class Keyword(nn.Module):
        def forward(self, x=None):
            return x

    class Odd(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Keyword()

        def forward(self, x):
            return self.inner(x=x)  # called with keywords only: the hook sees no positional input

    model = Odd()
    with pytest.raises(ValueError, match="inner was called without a tensor input"):
        collect_input_stats(model, {"inner": model.inner}, [torch.ones(2, 3)], {"inner": 3})
    assert not model.inner._forward_hooks  # removed either way



# ----------------------------------------------------------------------------- fused ops: arguments and backends
def test_fused_op_arguments():
    from mpo_core import ops

    x = torch.randn(2, 8)
    with pytest.raises(TypeError, match="weight must be a torch.Tensor or None, got list"):
        ops.layer_norm(x, [1.0] * 8)
    with pytest.raises(TypeError, match="bias must be a floating tensor, got torch.int64"):
        ops.layer_norm(x, None, torch.zeros(8, dtype=torch.long))
    with pytest.raises(TypeError, match="eps must be a float, got str"):
        ops.layer_norm(x, eps="1e-5")


def test_why_a_backend_is_unavailable(monkeypatch):
    from types import SimpleNamespace

    from mpo_core.ops import dispatch

    f32 = torch.float32
    assert dispatch.why_unavailable("layer_norm", "triton", torch.device("meta"), f32) == \
        "Triton does not run on meta tensors here"
    with pytest.raises(ValueError, match="op must be one of"):
        dispatch.resolve_backend("softmax", torch.ones(2), "torch")
    # a CUDA build of the extension, seen from here: it refuses float64, and its CPU part has no dropout
    names = {name: None for fns in dispatch._EXT_FUNCTIONS.values() for name in fns}
    monkeypatch.setattr(dispatch, "extension", lambda: SimpleNamespace(WITH_CUDA=True, **names))
    assert dispatch.why_unavailable("layer_norm", "cuda", torch.device("cuda", 0), torch.float64) == \
        "the CUDA kernels take float32/float16/bfloat16, got torch.float64"
    assert dispatch.why_unavailable("residual_dropout_layer_norm", "cpp", torch.device("cpu"), f32) == \
        "the C++ CPU extension has no residual_dropout_layer_norm (it has residual + LayerNorm without dropout)"
    monkeypatch.setattr(dispatch, "triton_importable", lambda: False)
    assert dispatch.triton_supported(torch.device("cpu")) is False
    assert dispatch.why_unavailable("layer_norm", "triton", torch.device("cpu"), f32) == "Triton is not installed"


# ----------------------------------------------------------------------------- GPU tooling: arguments
def test_gpu_tooling_arguments():
    from mpo_core.gpu import philox
    from mpo_core.gpu.devices import model_for
    from mpo_core.gpu.kernel_model import spec_model
    from mpo_core.gpu.registry import kernel_specs

    with pytest.raises(TypeError, match="offset must be a non-negative int, got -1"):
        philox.triton_keep_mask(2, 2, 0.1, seed=0, offset=-1)
    for mask in (philox.triton_keep_mask, philox.cuda_keep_mask):
        with pytest.raises(ValueError, match="rows must be >= 0 and n >= 1, got 2 and 0"):
            mask(2, 0, 0.1, 0)
    with pytest.raises(TypeError, match="name must be a str, got int"):
        model_for(100, (8, 0))
    spec = dataclasses.replace(kernel_specs()[0], family="softmax")
    with pytest.raises(ValueError, match="no model for kernel family 'softmax'"):
        spec_model(spec)


# ----------------------------------------------------------------------------- MoE, OPF, sensitivity
def test_moe_arguments():
    from mpo_core.moe import MPOEFeedForward, route
    from mpo_core.nn import MPOLinear

    with pytest.raises(ValueError, match="logits must be a floating \\(tokens, experts\\) tensor"):
        route(torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError, match="mask_prob must be in \\[0, 1\\), got 1.0"):
        MPOEFeedForward(16, 32, 2, n=3, mask_prob=1.0)
    with pytest.raises(ValueError, match="capacity_factor"):
        MPOEFeedForward(16, 32, 2, n=3, capacity_factor=-1.0)
    layer = MPOEFeedForward(16, 32, 2, n=3, capacity_factor=1.0)
    assert "num_experts=2" in repr(layer)
    torch.manual_seed(0)
    lin_in, lin_out, other = nn.Linear(16, 32), nn.Linear(32, 16), nn.Linear(32, 8)
    mpo_in = MPOLinear.from_linear(lin_in, in_shape=(2, 4, 2), out_shape=(2, 8, 2))
    with pytest.raises(ValueError, match="do not form an FFN"):
        MPOEFeedForward.from_mpo(mpo_in, MPOLinear.from_linear(other, in_shape=(2, 8, 2), out_shape=(2, 2, 2)), 2)
    with pytest.raises(ValueError, match="mpo_in and mpo_out must use the same mode shapes"):
        MPOEFeedForward.from_mpo(mpo_in, MPOLinear.from_linear(lin_out, in_shape=(4, 4, 2), out_shape=(2, 4, 2)), 2)
    mpo_out = MPOLinear.from_linear(lin_out, in_shape=(2, 8, 2), out_shape=(2, 4, 2))
    with pytest.raises(ValueError, match="do not match the layer's"):
        MPOEFeedForward.from_mpo(mpo_in, mpo_out, 2, max_bond=1)  # experts with smaller bonds than the FFN's
    x = torch.randn(1, 16)
    one_token = MPOEFeedForward.from_mpo(mpo_in, mpo_out, 4, top_k=2)(x)  # two of the four experts get no token
    assert sorted(one_token.routing.counts().tolist()) == [0, 0, 1, 1]
    # identical experts, top-2 gates renormalized: the FFN itself
    assert torch.allclose(one_token.output, mpo_out(torch.nn.functional.gelu(mpo_in(x))), atol=1e-5)


def test_opf_arguments():
    from mpo_core.opf import OverParameterization, importance_scores, select_top, sync_optimizer

    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        importance_scores("model", [], lambda m, b: None)
    with pytest.raises(TypeError, match="model must be an nn.Module, got str"):
        OverParameterization("model")
    model = nn.Sequential(nn.Linear(8, 8))
    with pytest.raises(ValueError, match="loss_fn must return a scalar tensor"):
        importance_scores(model, [torch.ones(2, 8)], lambda m, b: m(b))
    with pytest.raises(ValueError, match="scores must be a non-empty dict"):
        select_top({}, 1)
    with pytest.raises(TypeError, match="optimizer must be a torch.optim.Optimizer, got list"):
        sync_optimizer([], [])
    opf = OverParameterization(model, n=3)
    assert opf.merge(["0"]) == []  # not expanded: nothing to merge
    with pytest.raises(ValueError, match="cannot expand layer '0' \\(8x8\\): "):
        OverParameterization(model, n=3, min_bond=-1).expand(["0"])


def test_sensitivity_needs_a_batch():
    from mpo_core.sensitivity import output_sensitivities

    with pytest.raises(ValueError, match="sensitivity probes need at least one calibration batch"):
        output_sensitivities(nn.Linear(2, 2), {}, {}, {}, [])


# ----------------------------------------------------------------------------- compress
def test_compress_errors_and_a_tolerance_no_member_meets():
    from mpo_core.compress import analyze, compress, compress_in_rounds

    torch.manual_seed(0)
    with pytest.raises(ValueError, match="cannot decompose layer '0' \\(\\(5, 3\\)\\): dim=5 cannot be factored"):
        compress(nn.Sequential(nn.Linear(5, 3)), budget=0.9, n=3)  # 5 and 3 have no 3 factors >= 2
    with pytest.raises(TypeError, match="finetune must be callable"):
        compress_in_rounds(nn.Sequential(nn.Linear(8, 8)), 0.5, finetune="train")
    model = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 16))
    analysis = analyze(model, include=["0"])
    with pytest.raises(ValueError, match="analysis was made for layers \\['0'\\]"):
        compress(model, budget=0.5, include=["1"], analysis=analysis)
    report = compress(nn.Sequential(nn.Linear(16, 16)), rel_tol=1e-9, n="auto")  # exact needs every entry
    (matrix,) = report.matrices
    assert matrix.kept_dense
