"""MPOE: routing, capacity, load-balancing loss, central gradient balancing, equivalence to an MPO FFN."""

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mpo_core import MPOLinear
from mpo_core.moe import MPOEFeedForward, load_balancing_loss, route


@settings(max_examples=25)
@given(tokens=st.integers(1, 40), experts=st.integers(1, 6), data=st.data())
def test_route_topk_and_gates(tokens, experts, data):
    k = data.draw(st.integers(1, experts))
    logits = torch.randn(tokens, experts, generator=torch.Generator().manual_seed(tokens * 7 + experts))
    r = route(logits, k)
    probs = torch.softmax(logits, -1)
    ref_top, ref_idx = probs.topk(k, -1)
    assert torch.equal(r.index, ref_idx)
    expected = ref_top / ref_top.sum(-1, keepdim=True) if k > 1 else ref_top
    assert torch.allclose(r.gates, expected, atol=1e-7)
    assert bool(r.keep.all()) and r.capacity is None and r.dropped == 0
    assert int(r.counts().sum()) == tokens * k


def test_capacity_fills_first_choices_first():
    # 6 tokens, 2 experts, top-2: every token prefers expert 0 and then expert 1
    logits = torch.tensor([[2.0, 1.0]] * 6)
    r = route(logits, k=2, capacity_factor=0.5)  # capacity = ceil(0.5 * 6 * 2 / 2) = 3 per expert
    assert r.capacity == 3
    assert r.keep[:, 0].tolist() == [True, True, True, False, False, False]
    assert r.keep[:, 1].tolist() == [True, True, True, False, False, False]
    assert r.dropped == 6
    # a token's second choice never displaces another token's first choice
    logits = torch.tensor([[2.0, 1.0], [1.0, 2.0], [1.0, 2.0], [2.0, 1.0]])
    r = route(logits, k=2, capacity_factor=0.5)  # capacity 2
    assert r.keep[:, 0].all() and not r.keep[:, 1].any()
    with pytest.raises(ValueError, match="capacity_factor"):
        route(logits, 1, capacity_factor=0.0)
    with pytest.raises(ValueError, match="k must be"):
        route(logits, 3)


def test_balancing_loss_hand_values():
    probs = torch.tensor([[0.8, 0.2], [0.6, 0.4], [0.3, 0.7], [0.9, 0.1]])
    r = route(probs.log(), k=1)
    # f = (3/4, 1/4), P = (0.65, 0.35): 2 * (0.75 * 0.65 + 0.25 * 0.35) = 1.15
    assert float(load_balancing_loss(r)) == pytest.approx(1.15, abs=1e-6)
    balanced = route(torch.tensor([[5.0, 0.0], [0.0, 5.0]] * 3), k=1)
    assert float(load_balancing_loss(balanced)) == pytest.approx(1.0, abs=1e-6)
    collapsed = route(torch.tensor([[50.0, 0.0, 0.0]] * 4), k=1)
    assert float(load_balancing_loss(collapsed)) == pytest.approx(3.0, abs=1e-6)
    top2 = route(probs.log(), k=2)  # every token uses both experts: f = (1/2, 1/2)
    assert float(load_balancing_loss(top2)) == pytest.approx(2 * (0.5 * 0.65 + 0.5 * 0.35), abs=1e-6)


def _ffn(seed: int, h: int = 16, i: int = 32):
    torch.manual_seed(seed)
    return nn.Linear(h, i), nn.Linear(i, h)


def test_one_expert_equals_the_mpo_ffn_and_the_dense_ffn():
    lin_in, lin_out = _ffn(0)
    mpo_in = MPOLinear.from_linear(lin_in, in_shape=(2, 4, 2), out_shape=(2, 8, 2))
    mpo_out = MPOLinear.from_linear(lin_out, in_shape=(2, 8, 2), out_shape=(2, 4, 2))
    layer = MPOEFeedForward.from_mpo(mpo_in, mpo_out, num_experts=1)
    x = torch.randn(3, 5, 16)
    out = layer(x)
    assert out.output.shape == x.shape
    assert torch.allclose(out.output, mpo_out(F.gelu(mpo_in(x))), atol=1e-5)
    assert torch.allclose(out.output, lin_out(F.gelu(lin_in(x))), atol=1e-5)
    assert float(out.balance_loss.detach()) == pytest.approx(1.0)
    # E identical experts with top-2 renormalized gates are the same FFN too
    many = MPOEFeedForward.from_dense(lin_in, lin_out, num_experts=4, top_k=2, n=3)
    assert torch.allclose(many(x).output, lin_out(F.gelu(lin_in(x))), atol=1e-5)


def test_parameter_count_vs_plain_moe(capsys):
    layer = MPOEFeedForward(64, 256, num_experts=8, n=3)
    rep = layer.parameter_report()
    assert all(e.central is layer.experts_in[0].central for e in layer.experts_in)
    assert all(e.central is layer.experts_out[0].central for e in layer.experts_out)
    aux = sum(a.numel() for a in layer.experts_in[0].auxiliary) + sum(a.numel() for a in layer.experts_out[0].auxiliary)
    biases = 8 * (256 + 64)
    assert rep["mpoe"] == rep["shared_central"] + 8 * aux + biases + 64 * 8
    assert rep["plain_moe"] == 8 * (2 * 64 * 256 + 64 + 256) + 64 * 8
    assert rep["mpoe"] < 0.25 * rep["plain_moe"]
    with capsys.disabled():
        print(f"\nMPOE 64->256->64, 8 experts (n=3, full rank): {rep['mpoe']} parameters vs plain MoE "
              f"{rep['plain_moe']} ({rep['mpoe'] / rep['plain_moe']:.3f}x), dense FFN {rep['dense_ffn']}")


def _skewed_layer(mode: str, seed: int = 0) -> MPOEFeedForward:
    torch.manual_seed(seed)
    layer = MPOEFeedForward(16, 32, num_experts=3, n=3, central_grad=mode)
    with torch.no_grad():  # expert 0 wins for most tokens
        layer.router.weight.copy_(torch.randn(3, 16, generator=torch.Generator().manual_seed(seed)) * 0.1)
        layer.router.weight[0] += 0.3
    return layer


def _central_grads(layer, x, w, token_mask=None):
    layer.zero_grad(set_to_none=True)
    y = layer(x).output
    if token_mask is not None:
        y = y * token_mask[:, None]
    (y * w).sum().backward()
    return (layer.experts_in[0].central.grad.clone(), layer.experts_out[0].central.grad.clone(),
            [a.grad.clone() for a in layer.experts_in[1].auxiliary])


def test_inverse_frequency_central_gradient(capsys):
    x = torch.randn(60, 16, generator=torch.Generator().manual_seed(1)) + 0.2  # along expert 0's router row
    w = torch.randn(60, 16, generator=torch.Generator().manual_seed(2))
    plain = _skewed_layer("none")
    masked = _skewed_layer("inverse_frequency")
    masked.load_state_dict(plain.state_dict())
    counts = route(plain.router(x), 1).counts()
    assert int(counts[0]) > 30 and int(counts.min()) > 0  # skewed, every expert used
    idx = route(plain.router(x), 1).index[:, 0]
    parts = [_central_grads(plain, x, w, (idx == e).float()) for e in range(3)]  # per-expert contributions
    total_in, total_out, aux_plain = _central_grads(plain, x, w)
    assert torch.allclose(total_in, sum(p[0] for p in parts), atol=1e-5)
    got_in, got_out, aux_masked = _central_grads(masked, x, w)
    factors = [60 / (3 * int(c)) for c in counts]
    assert torch.allclose(got_in, sum(f * p[0] for f, p in zip(factors, parts)), atol=1e-5)
    assert torch.allclose(got_out, sum(f * p[1] for f, p in zip(factors, parts)), atol=1e-5)
    assert all(torch.equal(a, b) for a, b in zip(aux_plain, aux_masked))  # auxiliaries untouched

    def share(g, weights):
        norms = [float(torch.linalg.vector_norm(wt * p[0])) for wt, p in zip(weights, parts)]
        return norms[0] / sum(norms)

    before, after = share(total_in, [1, 1, 1]), share(got_in, factors)
    assert after < before
    with capsys.disabled():
        print(f"\ncentral grad: routing counts {counts.tolist()}, most-routed expert's share of the summed "
              f"per-expert gradient norms {before:.3f} -> {after:.3f} with inverse-frequency scaling")
    masked.eval()  # no scaling at evaluation time / without grad
    assert torch.allclose(masked(x).output, plain(x).output)


def test_bernoulli_central_mask():
    torch.manual_seed(0)
    layer = _skewed_layer("bernoulli")
    layer.mask_prob = 0.7
    x = torch.randn(80, 16)
    g_in, g_out, _ = _central_grads(layer, x, torch.ones(80, 16))
    zero_frac = float((g_in == 0).float().mean())
    assert 0.6 < zero_frac < 0.8
    plain = _skewed_layer("none")
    plain.load_state_dict(layer.state_dict())
    p_in, _, _ = _central_grads(plain, x, torch.ones(80, 16))
    kept = g_in != 0
    assert torch.allclose(g_in[kept], p_in[kept], atol=1e-6)


def test_balance_loss_training_spreads_tokens(capsys):
    layer = _skewed_layer("none", seed=3)
    with torch.no_grad():
        layer.router.weight.mul_(10.0)  # confident router: probabilities as skewed as the counts
    x = torch.randn(256, 16, generator=torch.Generator().manual_seed(4)) + 0.5  # expert 0's direction dominates
    opt = torch.optim.Adam(layer.router.parameters(), lr=0.05)
    first = None
    for _ in range(40):
        out = layer(x)
        if first is None:
            first = (float(out.balance_loss.detach()), out.routing.counts().tolist())
        opt.zero_grad()
        out.balance_loss.backward()
        opt.step()
    with torch.no_grad():
        out = layer(x)
    last = (float(out.balance_loss), out.routing.counts().tolist())
    assert last[0] < first[0] - 0.1 and max(last[1]) < max(first[1])
    with capsys.disabled():
        print(f"\nbalance loss {first[0]:.3f} -> {last[0]:.3f}, expert counts {first[1]} -> {last[1]} (40 router steps)")


def test_validation():
    with pytest.raises(ValueError, match="top_k"):
        MPOEFeedForward(16, 32, 2, top_k=3, n=3)
    with pytest.raises(ValueError, match="central_grad"):
        MPOEFeedForward(16, 32, 2, n=3, central_grad="sometimes")
    with pytest.raises(ValueError, match="odd"):
        MPOEFeedForward(16, 32, 2, n=2)
    with pytest.raises(ValueError, match="hidden_size"):
        MPOEFeedForward(16, 32, 2, n=3)(torch.randn(2, 8))
    lin_in, lin_out = _ffn(1)
    with pytest.raises(TypeError, match="MPOLinear"):
        MPOEFeedForward.from_mpo(lin_in, lin_out, 2)


@pytest.mark.parametrize("side", ["left", "right"])
def test_shared_central_gradient_scale_against_per_chain_rebuilds(side):
    """shared_central_weights' central_grad_scale: per chain (L,) factors and a mask, both sides of the product,
    against each chain rebuilt alone (mpo_core.rebuild.dense_matrix) in float64."""
    from mpo_core.accumulate import shared_central_weights
    from mpo_core.rebuild import dense_matrix

    g = torch.Generator().manual_seed(0)
    central = torch.randn(4, 2, 3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    chains = [[torch.randn(1, 2, 2, 4, dtype=torch.float64, generator=g, requires_grad=True), central,
               torch.randn(5, 3, 2, 1, dtype=torch.float64, generator=g, requires_grad=True)] for _ in range(3)]
    probe = torch.randn(3, 12, 12, dtype=torch.float64, generator=g)
    parts = []  # each chain's own gradient contributions, from a plain rebuild
    for ch, p in zip(chains, probe):
        parts.append(torch.autograd.grad((dense_matrix(ch) * p).sum(), [central, ch[0], ch[2]]))
    factors = torch.tensor([0.5, 2.0, 0.0], dtype=torch.float64)
    w = shared_central_weights(chains, 1, side=side, central_grad_scale=factors)
    assert torch.allclose(w, torch.stack([dense_matrix(ch) for ch in chains]))
    grads = torch.autograd.grad((w * probe).sum(), [central] + [t for ch in chains for t in (ch[0], ch[2])])
    assert torch.allclose(grads[0], sum(f * p[0] for f, p in zip(factors, parts)))
    for l, p in enumerate(parts):  # the chains' own cores: unscaled
        assert torch.allclose(grads[1 + 2 * l], p[1]) and torch.allclose(grads[2 + 2 * l], p[2])
    mask = (torch.rand(central.shape, generator=g) > 0.5).double()
    w = shared_central_weights(chains, 1, side=side, central_grad_scale=mask)
    (got,) = torch.autograd.grad((w * probe).sum(), [central])
    assert torch.allclose(got, mask * sum(p[0] for p in parts))
