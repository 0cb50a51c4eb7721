"""OPF: exact over-parameterized expansion, merge back to dense, importance-based static/dynamic selection."""
import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mpo_core import MPOLinear, decompose
from mpo_core.shapes import full_ranks
from mpo_core.opf import OverParameterization, sync_optimizer, expand_linear, importance_scores, select_top

SHAPES = [((2, 3, 2), (2, 2, 4)), ((4, 2), (3, 3)), ((2, 2, 2, 2, 2), (2, 2, 2, 2, 2)), ((3, 2, 2), (1, 4, 2))]


@settings(max_examples=20)
@given(shape=st.sampled_from(SHAPES), pad=st.integers(0, 6), seed=st.integers(0, 1000), bias=st.booleans())
def test_expansion_is_exact_and_larger(shape, pad, seed, bias):
    in_shape, out_shape = shape
    torch.manual_seed(seed)
    linear = nn.Linear(math.prod(in_shape), math.prod(out_shape), bias=bias).double()
    full = full_ranks(in_shape, out_shape)
    ranks = [1] + [f + pad for f in full[1:-1]] + [1]
    layer = expand_linear(linear, in_shape=in_shape, out_shape=out_shape, min_bond=ranks, noise_std=0.1,
                          generator=torch.Generator().manual_seed(seed))
    assert [c.shape[0] for c in layer.cores] + [1] == ranks
    x = torch.randn(7, linear.in_features, dtype=torch.float64)
    assert torch.allclose(layer(x), linear(x), atol=1e-10, rtol=1e-10)
    if pad:  # the padded slots are really there: noise on one side, zeros that get gradient on the other
        assert any(bool(c[:, :, :, full[k + 1]:].abs().sum() > 0) for k, c in enumerate(layer.cores[:-1]))
        layer(x).pow(2).sum().backward()
        assert bool(layer.cores[1].grad[full[1]:].abs().sum() > 0)


def test_full_rank_expansion_has_more_params_than_dense():
    linear = nn.Linear(32, 64)
    layer = expand_linear(linear, n=5)
    assert sum(c.numel() for c in layer.cores) > linear.weight.numel()
    padded = expand_linear(linear, n=3, min_bond=40)
    assert [c.shape[3] for c in padded.cores[:-1]] == [max(f, 40) for f in full_ranks(padded.in_shape, padded.out_shape)[1:-1]]
    with pytest.raises(ValueError, match="below the full rank"):
        expand_linear(linear, n=3, min_bond=[1, 1, 1, 1])
    with pytest.raises(TypeError, match="nn.Linear"):
        expand_linear(MPOLinear(4, 4, n=2))
    with pytest.raises(ValueError, match="noise_std"):
        expand_linear(linear, noise_std=-1.0)


class _Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Linear(16, 32)
        self.b = nn.Linear(32, 32)
        self.c = nn.Linear(32, 4)

    def forward(self, x):
        return self.c(torch.tanh(self.b(torch.tanh(self.a(x)))))


def _loss(model, batch):
    x, y = batch
    return nn.functional.cross_entropy(model(x), y)


def _batches(seed, count=3):
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(32, 16, generator=g), torch.randint(0, 4, (32,), generator=g)) for _ in range(count)]


def test_train_then_merge_is_identical_and_dense():
    torch.manual_seed(0)
    model = _Net()
    dense_params = sum(p.numel() for p in model.parameters())
    opf = OverParameterization(model, n=lambda i, o: ((2, 4, 2) if i == 16 else (4, 2, 4), (4, 2, 4) if o == 32 else (1, 4, 1)),
                               min_bond=None)
    opf.expand(opf.candidates)
    assert opf.extra_params() > 0
    assert sum(p.numel() for p in model.parameters()) > dense_params
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    losses = []
    for batch in _batches(1, 30):
        loss = _loss(model, batch)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < losses[0]
    x = torch.randn(50, 16)
    with torch.no_grad():
        before = model(x)
    assert opf.merge() == ["a", "b", "c"]
    assert all(type(m) is nn.Linear for m in (model.a, model.b, model.c))
    assert sum(p.numel() for p in model.parameters()) == dense_params
    with torch.no_grad():
        after = model(x)
    assert torch.allclose(before, after, atol=1e-5, rtol=1e-5)


def test_importance_scores_match_dense_gradient_and_ignore_param_grads():
    torch.manual_seed(1)
    model = _Net()
    batches = _batches(2)
    ref = {}
    model.zero_grad()
    for batch in batches:
        _loss(model, batch).backward()
    for name in ("a", "b", "c"):
        lin = model.get_submodule(name)
        ref[name] = float(torch.linalg.vector_norm(lin.weight.detach().double() * lin.weight.grad.double()))
    model.zero_grad(set_to_none=True)
    scores = importance_scores(model, batches, _loss)
    for name in ref:
        assert scores[name] == pytest.approx(ref[name], rel=1e-5)
    assert all(p.grad is None for p in model.parameters())
    # an expanded layer scores as its dense matrix does
    opf = OverParameterization(model, include=["b"], n=3)
    opf.expand(["b"])
    expanded = importance_scores(model, batches, _loss, include="b")
    assert expanded["b"] == pytest.approx(ref["b"], rel=1e-4)
    with pytest.raises(ValueError, match="matched no"):
        importance_scores(model, batches, _loss, include="zzz")
    with pytest.raises(ValueError, match="at least one batch"):
        importance_scores(model, [], _loss)
    with pytest.raises(TypeError, match="loss_fn"):
        importance_scores(model, batches, None)


def test_select_top():
    scores = {"x": 1.0, "y": 3.0, "z": 3.0, "w": 0.5}
    assert select_top(scores, 2) == ["y", "z"]
    assert select_top(scores, 0.5) == ["y", "z"]
    assert select_top(scores, 0) == []
    with pytest.raises(ValueError):
        select_top(scores, 5)
    with pytest.raises(ValueError):
        select_top(scores, 1.5)
    with pytest.raises(TypeError):
        select_top(scores, "2")


def test_dynamic_selection_swaps_and_keeps_function():
    torch.manual_seed(2)
    model = _Net()
    opf = OverParameterization(model, n=2, seed=3)
    x = torch.randn(20, 16)
    with torch.no_grad():
        ref = model(x)
    added, dropped = opf.select({"a": 3.0, "b": 2.0, "c": 1.0}, 2)
    assert (added, dropped) == (["a", "b"], [])
    assert isinstance(model.a, MPOLinear) and isinstance(model.b, MPOLinear) and type(model.c) is nn.Linear
    opt = torch.optim.AdamW([p for p in model.parameters()], lr=1e-3)
    _loss(model, (x, torch.zeros(20, dtype=torch.long))).backward()
    opt.step()
    kept = list(model.b.parameters())
    with torch.no_grad():
        mid = model(x)
    added, dropped = opf.select({"a": 0.0, "b": 2.0, "c": 5.0}, 2)
    assert (added, dropped) == (["c"], ["a"])
    assert type(model.a) is nn.Linear and isinstance(model.c, MPOLinear) and opf.expanded == {"b", "c"}
    with torch.no_grad():
        assert torch.allclose(model(x), mid, atol=1e-5)
        assert not torch.allclose(mid, ref, atol=1e-6)  # the step changed the function
    states = {id(p): opt.state[p] for p in kept}
    assert sync_optimizer(opt, model.parameters()) is opt
    held = [p for g in opt.param_groups for p in g["params"]]
    assert {id(p) for p in held} == {id(p) for p in model.parameters()}
    assert all(opt.state[p] is states[id(p)] for p in kept)
    assert all(p not in opt.state for p in model.c.parameters())
    assert len(opt.state) == len(kept)  # only b survived; new parameters get state at their first step
    _loss(model, (x, torch.zeros(20, dtype=torch.long))).backward()
    opt.step()  # the synced optimizer trains the new layout
    with pytest.raises(ValueError, match="not candidate"):
        opf.expand(["nope"])
    with pytest.raises(ValueError, match="lack"):
        opf.select({"a": 1.0}, 1)


def test_static_rescore_picks_the_layer_that_matters():
    torch.manual_seed(3)
    model = _Net()
    with torch.no_grad():
        model.a.weight.mul_(1e-3)  # a nearly dead first layer has tiny W * dL/dW
    opf = OverParameterization(model, n=2)
    added, _ = opf.rescore(_batches(4), _loss, 1)
    assert added != ["a"] and len(opf.expanded) == 1


def test_expanded_cores_are_balanced():
    """The cores' RMS entries are comparable (balanced gauge), unlike the TT-SVD's, and W is unchanged."""
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    layer = expand_linear(linear, n=3)
    rms = [float(c.detach().pow(2).mean().sqrt()) for c in layer.cores]
    raw = [float(c.pow(2).mean().sqrt()) for c in decompose(linear.weight.detach().T.double(), n=3).cores]
    assert max(rms) / min(rms) < 2.0 < max(raw) / min(raw)
    torch.testing.assert_close(layer.to_linear().weight, linear.weight, rtol=1e-5, atol=1e-6)
