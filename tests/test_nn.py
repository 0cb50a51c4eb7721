"""Tests for mpo_core.nn: MPOLinear, shared cores, freezing helpers, mpo_ify."""
from __future__ import annotations

import io

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mpo_core.nn import MPOLinear, mpo_ify, set_trainable, unmpo_ify
from mpo_core.shapes import full_ranks


def _linear(i, o, dtype=torch.float64, seed=0):
    torch.manual_seed(seed)
    return nn.Linear(i, o).to(dtype)


@settings(max_examples=15)
@given(
    st.sampled_from([(2, 3), (3, 2), (2, 2, 3), (3, 1, 4), (2, 3, 2, 2)]),
    st.sampled_from([(3, 2), (2, 2), (2, 1, 2), (4, 3, 1), (2, 2, 2, 1)]),
    st.integers(0, 1000),
)
def test_from_linear_to_linear_round_trip_exact(in_shape, out_shape, seed):
    if len(in_shape) != len(out_shape):
        out_shape = (2,) * len(in_shape)
    i, o = int(torch.tensor(in_shape).prod()), int(torch.tensor(out_shape).prod())
    lin = _linear(i, o, seed=seed)
    layer = MPOLinear.from_linear(lin, in_shape=in_shape, out_shape=out_shape)
    assert layer.error_bound < 1e-10
    x = torch.randn(5, i, dtype=torch.float64)
    torch.testing.assert_close(layer(x), lin(x), rtol=1e-12, atol=1e-12)
    back = layer.to_linear()
    torch.testing.assert_close(back.weight, lin.weight, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(back.bias, lin.bias, rtol=0, atol=0)
    torch.testing.assert_close(layer.weight, lin.weight, rtol=1e-12, atol=1e-12)


def test_to_linear_merges_trained_cores_exactly_float32():
    """Over-parameterized fine-tuning (OPF): train the cores, then contract back with no added latency."""
    layer = MPOLinear(48, 60, n=3)
    opt = torch.optim.SGD(layer.parameters(), lr=0.1)
    x = torch.randn(16, 48)
    for _ in range(3):
        opt.zero_grad()
        layer(x).square().mean().backward()
        opt.step()
    lin = layer.to_linear()
    with torch.no_grad():
        torch.testing.assert_close(lin(x), layer(x), rtol=1e-5, atol=1e-6)


def test_truncated_from_linear_keeps_error_bound():
    lin = _linear(64, 64)
    layer = MPOLinear.from_linear(lin, n=3, max_bond=6)
    err = float(torch.linalg.vector_norm(layer.weight.detach() - lin.weight.detach()))
    assert 0 < err <= layer.error_bound * (1 + 1e-9)
    assert max(c.shape[0] for c in layer.cores) <= 6


@pytest.mark.parametrize("n,ranks,seeds", [(3, 64, 4), (5, 32, 10)])
def test_init_matches_nn_linear_variance(n, ranks, seeds):
    """E[var(W)] = 1/(3 in) as nn.Linear; one draw fluctuates (entries share cores), so average a few."""
    ref_var = 1.0 / (3 * 768)
    ratios = []
    for seed in range(seeds):
        torch.manual_seed(seed)
        layer = MPOLinear(768, 768, n=n, max_bond=ranks)
        with torch.no_grad():
            ratios.append(float(layer.weight.var()) / ref_var)
        assert float(layer.bias.detach().abs().max()) <= 1 / 768 ** 0.5
    assert abs(sum(ratios) / seeds - 1) < 0.1


def test_max_bond_argument():
    assert MPOLinear(768, 768, n=5).ranks == full_ranks((4, 4, 4, 4, 3), (4, 4, 4, 4, 3)) == [1, 16, 256, 144, 9, 1]
    assert MPOLinear(768, 768, n=5, max_bond=20).ranks == [1, 16, 20, 20, 9, 1]
    assert MPOLinear(24, 24, in_shape=(2, 3, 4), out_shape=(4, 3, 2), max_bond=[2, 3]).ranks == [1, 2, 3, 1]
    assert MPOLinear(24, 24, in_shape=(2, 3, 4), out_shape=(4, 3, 2), max_bond=[100, 3]).ranks == [1, 8, 3, 1]
    with pytest.raises(ValueError, match="max_bond must be"):
        MPOLinear(24, 24, n=3, max_bond=[1, 2, 3])
    with pytest.raises(ValueError, match="max_bond must be >= 1"):
        MPOLinear(24, 24, n=3, max_bond=0)
    with pytest.raises(TypeError, match="max_bond must be an int"):
        MPOLinear(24, 24, n=3, max_bond="full")
    with pytest.raises(ValueError, match="strategy"):
        MPOLinear(24, 24, n=3, strategy="fast")
    with pytest.raises(ValueError, match="in_shape"):
        MPOLinear(24, 24, in_shape=(2, 3, 5), out_shape=(2, 3, 4))


def test_shared_central_across_layers():
    torch.manual_seed(0)
    first = MPOLinear.from_linear(_linear(64, 64, torch.float32, 1), n=3)
    shared = first.central
    layers = nn.ModuleList([first] + [MPOLinear.from_linear(_linear(64, 64, torch.float32, s), n=3, shared_central=shared) for s in (2, 3)])
    assert all(layer.central is shared for layer in layers)
    unique = sum(p.numel() for p in layers.parameters())
    assert unique == sum(layer.num_params for layer in layers) - 2 * shared.numel()
    x = torch.randn(4, 64)
    grads = []
    for layer in layers:
        shared.grad = None
        layer(x).sum().backward()
        grads.append(shared.grad.clone())
    shared.grad = None
    sum(layer(x).sum() for layer in layers).backward()
    torch.testing.assert_close(shared.grad, sum(grads), rtol=1e-5, atol=1e-5)


def test_share_core_validates():
    layer = MPOLinear(24, 24, n=3)
    with pytest.raises(ValueError, match="core 1 needs"):
        layer.share_core(1, nn.Parameter(torch.zeros(2, 2, 2, 2)))
    with pytest.raises(TypeError, match="nn.Parameter"):
        layer.share_core(1, torch.zeros_like(layer.cores[1]))
    with pytest.raises(ValueError, match="index"):
        layer.share_core(3, nn.Parameter(torch.zeros(1)))


def test_set_trainable():
    model = nn.Sequential(MPOLinear(64, 64, n=3, max_bond=8), nn.Linear(64, 64), MPOLinear(64, 64, n=3, max_bond=8))
    model[2].share_core(1, model[0].central)
    n_aux = sum(c.numel() for m in (model[0], model[2]) for c in m.auxiliary)
    n_central = model[0].central.numel()
    other = sum(p.numel() for p in model[1].parameters())
    biases = 128
    assert set_trainable(model, "auxiliary") == n_aux + other + biases
    assert not model[0].central.requires_grad and all(c.requires_grad for c in model[2].auxiliary)
    assert set_trainable(model, "central", bias=False) == n_central + other
    assert set_trainable(model, "all", bias=True) == n_aux + n_central + other + biases
    with pytest.raises(ValueError, match="which"):
        set_trainable(model, "bias")


def test_autocast_bf16_cpu_forward_backward():
    torch.manual_seed(0)
    layer = MPOLinear(64, 48, n=3, max_bond=8)
    x = torch.randn(10, 64)
    ref = layer(x).detach()
    for strategy in ("dense", "sequential"):
        layer.strategy = strategy
        with torch.autocast("cpu", dtype=torch.bfloat16):
            y = layer(x)
        assert y.dtype == torch.bfloat16
        torch.testing.assert_close(y.float(), ref, rtol=5e-2, atol=5e-2 * float(ref.abs().max()))
        y.float().sum().backward()
        assert all(c.grad is not None and c.grad.dtype == torch.float32 for c in layer.cores)
        layer.zero_grad()


def test_state_dict_round_trip_with_shared_cores():
    def build():
        a = MPOLinear(64, 64, n=3, max_bond=8)
        b = MPOLinear(64, 64, n=3, max_bond=8)
        b.share_core(1, a.central)
        return nn.Sequential(a, b)

    torch.manual_seed(0)
    src = build()
    buf = io.BytesIO()
    torch.save(src.state_dict(), buf)
    buf.seek(0)
    torch.manual_seed(1)
    dst = build()
    dst.load_state_dict(torch.load(buf, weights_only=True))
    assert dst[1].central is dst[0].central
    x = torch.randn(3, 64)
    torch.testing.assert_close(dst(x), src(x), rtol=0, atol=0)


def test_inference_weight_cache_tracks_core_updates():
    layer = MPOLinear(64, 64, n=3)
    x = torch.randn(256, 64)
    with torch.no_grad():
        y1 = layer(x)
        assert layer._cached is not None
        layer.cores[0].mul_(2.0)  # in-place update bumps the version counter
        y2 = layer(x)
    torch.testing.assert_close(y2 - layer.bias, 2 * (y1 - layer.bias), rtol=1e-5, atol=1e-5)
    y3 = layer(x)  # training mode forward: no cache, gradient flows
    assert layer._cached is None and y3.requires_grad


def test_repr_mentions_shapes_ranks_params_compression():
    text = repr(MPOLinear(768, 768, n=5, max_bond=16))
    for piece in ("in_shape=(4, 4, 4, 4, 3)", "ranks=[1, 16, 16, 16, 9, 1]", "params=", "compression=", "x vs dense"):
        assert piece in text


def test_mpo_ify_report():
    torch.manual_seed(0)
    model = nn.Sequential()
    model.add_module("enc", nn.Sequential(nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 32)))
    model.add_module("head", nn.Linear(32, 2))
    before = sum(p.numel() for p in model.parameters())
    x = torch.randn(5, 64)
    ref_mid = model.enc(x)
    report = mpo_ify(model, include="enc.*", n=3)
    assert isinstance(model.enc[0], MPOLinear) and isinstance(model.enc[2], MPOLinear) and isinstance(model.head, nn.Linear)
    assert report.params_before == before
    assert report.params_after == sum(p.numel() for p in model.parameters())
    assert [r.name for r in report.layers] == ["enc.0", "enc.2"]
    assert all(r.relative_error < 1e-5 and r.error_bound < 1e-3 for r in report.layers)
    assert report.layers[0].mpo_params == model.enc[0].num_params
    torch.testing.assert_close(model.enc(x), ref_mid, rtol=1e-4, atol=1e-5)
    text = str(report)
    assert "enc.0" in text and "rel err" in text and f"{before} -> {report.params_after}" in text

    trunc = mpo_ify(model, include=lambda name, m: name == "head", n=lambda i, o: ((4, 8), (2, 1)), max_bond=1)
    assert trunc.layers[0].in_shape == (4, 8) and trunc.layers[0].ranks == [1, 1, 1]
    assert trunc.layers[0].relative_error <= trunc.layers[0].error_bound / float(torch.linalg.vector_norm(model.head.weight)) + 1.0
    assert trunc.layers[0].relative_error > 0


def test_mpo_ify_errors():
    model = nn.Sequential(nn.Linear(7, 7))
    with pytest.raises(ValueError, match="cannot decompose layer '0'"):
        mpo_ify(model, n=3)
    with pytest.raises(TypeError, match="include"):
        mpo_ify(model, include=[3])
    with pytest.raises(TypeError, match="nn.Linear"):
        MPOLinear.from_linear(nn.Conv1d(2, 2, 1), n=1)


def test_patterns_suffixes_and_unmatched_pattern_errors():
    model = nn.Sequential()
    model.add_module("enc", nn.Sequential(nn.Linear(16, 16), nn.GELU()))
    model.add_module("query", nn.Linear(16, 16))
    model.add_module("head", nn.Linear(16, 4))
    report = mpo_ify(model, include=["query", "enc.0"], n=2)   # a name, a suffix
    assert [r.name for r in report.layers] == ["enc.0", "query"]
    fresh = nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 4))
    with pytest.raises(ValueError, match=r"pattern 'qurey' matched no linear module.*linear modules: 0, 1"):
        mpo_ify(fresh, include=["0", "qurey"], n=2)
    assert not any(isinstance(m, MPOLinear) for m in fresh.modules()), "nothing replaced on a bad pattern"
    with pytest.raises(ValueError, match="matched no linear module"):
        mpo_ify(fresh, include=lambda name, m: False, n=2)


def test_unmpo_ify_merges_back_and_report_has_times(capsys):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(16, 32), nn.GELU(), nn.Linear(32, 8, bias=False))
    x = torch.randn(4, 16)
    ref = model(x)
    report = mpo_ify(model, n=2, progress=True, decompose_kwargs={"svd_dtype": "float64"})
    assert "mpo_ify" in capsys.readouterr().err, "tqdm bar on stderr"
    assert all(r.seconds > 0 and r.origin == "linear" for r in report.layers) and "time s" in str(report)
    model[0].train(False)
    assert unmpo_ify(model) == ["0", "2"]
    assert type(model[0]) is nn.Linear and model[2].bias is None and not model[0].training
    torch.testing.assert_close(model(x), ref, rtol=1e-5, atol=1e-5)
    assert unmpo_ify(model) == []
    with pytest.raises(TypeError, match="no_such_option"):
        mpo_ify(model, n=2, decompose_kwargs={"no_such_option": 1})


def test_from_cores_copies_any_chain_and_bias():
    torch.manual_seed(0)
    cores = [torch.randn(1, 2, 3, 7), torch.randn(7, 4, 2, 1)]  # bond 7 > full rank 6: over-parameterized
    bias = torch.randn(6)
    layer = MPOLinear.from_cores(cores, bias, strategy="sequential")
    assert (layer.in_features, layer.out_features, layer.ranks) == (8, 6, [1, 7, 1])
    assert layer.strategy == "sequential" and layer.cores[0] is not cores[0]
    x = torch.randn(5, 8)
    w = torch.einsum("aijb,bklc->ikjl", cores[0], cores[1]).reshape(8, 6)
    torch.testing.assert_close(layer(x), x @ w + bias)
    with pytest.raises(ValueError, match=r"bias must be a tensor of shape \(6,\)"):
        MPOLinear.from_cores(cores, torch.zeros(5))


def test_layer_structure_is_its_mpo():
    """MPOLinear's shapes, ranks, central/auxiliary cores and counts are those of its chain as an MPO,
    whose cores are the layer's own parameters (shared ones included); from_mpo keeps the error bound."""
    from mpo_core import MPO, decompose

    w = torch.randn(64, 48, dtype=torch.float64)
    mpo = decompose(w, n=3, max_bond=5)
    layer = MPOLinear.from_mpo(mpo, torch.zeros(48, dtype=torch.float64))
    view = layer.mpo
    assert isinstance(view, MPO) and all(a is b for a, b in zip(view.cores, layer.cores))
    assert layer.error_bound == view.error_bound == mpo.error_bound > 0
    assert (layer.n, layer.ranks, layer.central_index) == (mpo.n, mpo.ranks, mpo.central_index)
    assert isinstance(layer.central, nn.Parameter) and layer.central is layer.cores[1]
    assert [id(a) for a in layer.auxiliary] == [id(layer.cores[0]), id(layer.cores[2])]
    assert layer.num_params == mpo.num_params + 48 and layer.compression == mpo.compression
    assert torch.equal(view.to_dense(), layer.weight.T.detach())
    shared = nn.Parameter(layer.central.detach().clone())
    layer.share_core(1, shared)
    assert layer.mpo.central is shared and MPOLinear(64, 48, n=3).mpo.error_bound == 0.0
    with pytest.raises(TypeError, match="mpo must be an MPO"):
        MPOLinear.from_mpo(list(mpo.cores))


def test_one_route_decision_and_explain_shows_it():
    """The forward's choice (step W, cached W, or the plan) is contract.route's, and explain(x, layer) shows it."""
    from mpo_core.accumulate import weight_cache
    from mpo_core.contract import choose_route, explain

    # under no_grad: a small layer takes the cached W; a wide low-rank one the sequential plan (cheaper than a GEMM)
    for layer, expected in ((MPOLinear(96, 128, n=3, max_bond=4), "cached W"), (MPOLinear(768, 3072, n=5, max_bond=4), "planned")):
        for tokens in (1, 8):
            x = torch.randn(tokens, layer.in_features)
            with torch.no_grad():
                shown = explain(x, layer)
                assert shown.route == choose_route(x, layer) == expected and shown.plan is not None
                layer(x)
                assert (layer._cached is not None) == (expected == "cached W")
                assert str(shown).startswith(f"route: {'cached W' if expected == 'cached W' else shown.plan.chosen.label}")
            planned = explain(x, layer)  # cores require grad: never the cached W
            assert planned.route == "planned" and planned.strategy == planned.plan.strategy
    with torch.no_grad():
        assert explain(8, layer).gemm_seconds > 0
    with weight_cache(layer):
        route = explain(torch.randn(2, 768), layer)
        assert (route.route, route.plan, route.strategy) == ("step W", None, "step W") and "step W" in str(route)
    with pytest.raises(ValueError, match="layer's own bias and strategy"):
        explain(torch.randn(2, 768), layer, strategy="dense")
