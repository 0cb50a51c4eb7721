"""Upcycling transformers FFNs into MPOE / Switch mixtures: exact at init, balance loss in the model's loss,
training modes, merging back, bad input. Tiny random GPT-2 / T5 / BERT / DistilBERT models, no downloads."""

import copy

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mpo_core import mpoe_ify, unmpoe_ify
from mpo_core.moe import MPOEFeedForward, SwitchFeedForward
from mpo_core.nn import num_parameters
from mpo_core.upcycle import (
    UpcycledFFN, active_parameters, add_balance_loss, balance_loss, moe_layers, reset_routing_stats, set_moe_trainable,
)

transformers = pytest.importorskip("transformers")


def _gpt2():
    cfg = transformers.GPT2Config(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=2, n_inner=64,
                                  resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return transformers.GPT2LMHeadModel(cfg)


def _t5(gated: bool = False):
    cfg = transformers.T5Config(vocab_size=97, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_decoder_layers=2,
                                num_heads=4, dropout_rate=0.0, feed_forward_proj="gated-gelu" if gated else "relu",
                                decoder_start_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg)


def _bert():
    cfg = transformers.BertConfig(vocab_size=97, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                  intermediate_size=64, max_position_embeddings=32, hidden_dropout_prob=0.0,
                                  attention_probs_dropout_prob=0.0)
    return transformers.BertForMaskedLM(cfg)


def _distilbert():
    cfg = transformers.DistilBertConfig(vocab_size=97, dim=32, n_layers=2, n_heads=2, hidden_dim=64,
                                        max_position_embeddings=32, dropout=0.0, attention_dropout=0.0)
    return transformers.DistilBertForMaskedLM(cfg)


MODELS = {"gpt2": _gpt2, "t5": _t5, "bert": _bert, "distilbert": _distilbert}


def _batch(name: str, seed: int = 0) -> dict:
    ids = torch.randint(1, 97, (3, 12), generator=torch.Generator().manual_seed(seed))
    if name == "t5":
        return {"input_ids": ids, "labels": ids.flip(1)}
    return {"input_ids": ids, "labels": ids}


def _scramble_routers(model, seed: int = 0) -> None:
    """Confident random routers: tokens spread over the experts (the exactness must not depend on routing)."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, layer in moe_layers(model):
            w = layer.moe.router.weight
            w.copy_(torch.randn(w.shape, generator=g) * 3.0)


@pytest.mark.parametrize("experts", ["mpo", "dense"])
@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("name", sorted(MODELS))
def test_exact_at_init_whatever_the_routing(name, top_k, experts):
    torch.manual_seed(0)
    model = MODELS[name]().eval()
    batch = _batch(name)
    with torch.no_grad():
        ref = model(**batch).logits
    report = mpoe_ify(model, num_experts=4, top_k=top_k, experts=experts)
    assert len(report.layers) == (4 if name == "t5" else 2)
    assert {r.family for r in report.layers} == {name}
    assert report.params_after > report.params_before and max(r.init_error for r in report.layers) < 1e-5
    _scramble_routers(model)
    reset_routing_stats(model)
    with torch.no_grad():
        got = model(**batch).logits
    rel = float(torch.linalg.vector_norm(got - ref) / torch.linalg.vector_norm(ref))
    assert rel <= 1e-5, rel
    for _, layer in moe_layers(model):  # the routing really spreads: several experts used in every layer
        assert int((layer.token_counts > 0).sum()) >= 3
        assert int(layer.assignments) == 3 * 12 * top_k or name == "t5"
    # the Switch gate (raw top-1 probability) is not exact: the test can tell
    if top_k == 1:
        for _, layer in moe_layers(model):
            layer.moe.gate = "switch"
        with torch.no_grad():
            switch = float(torch.linalg.vector_norm(model(**batch).logits - ref) / torch.linalg.vector_norm(ref))
        assert switch > max(100 * rel, 1e-4), (switch, rel)


@pytest.mark.parametrize("name", ["gpt2", "t5"])
def test_balance_loss_reaches_the_model_loss_and_the_routers(name):
    torch.manual_seed(1)
    model = MODELS[name]()
    mpoe_ify(model, num_experts=4)
    _scramble_routers(model, 1)
    batch = _batch(name)
    torch.manual_seed(5)
    plain = model(**batch)
    expected_aux = balance_loss(model)
    handle = add_balance_loss(model, coef=0.5)
    out = model(**batch)
    assert torch.allclose(out.balance_loss, expected_aux)
    assert torch.allclose(out.loss, plain.loss + 0.5 * expected_aux)
    assert float(expected_aux) > len(moe_layers(model))  # Switch's loss is >= 1 per layer; these routers are skewed
    # the router's gradient is the task loss's plus 0.5 x the balance loss's
    router = moe_layers(model)[0][1].moe.router.weight
    grad_task = torch.autograd.grad(plain.loss, router, retain_graph=True)[0]
    grad_aux = torch.autograd.grad(expected_aux, router, retain_graph=True)[0]
    grad_all = torch.autograd.grad(out.loss, router)[0]
    assert torch.allclose(grad_all, grad_task + 0.5 * grad_aux, atol=1e-6)
    assert float(grad_aux.abs().max()) > 0
    model.eval()  # evaluation reports the task's loss; the balance loss is still there to read
    evaluated = model(**batch)
    assert torch.allclose(evaluated.loss, plain.loss) and torch.allclose(evaluated.balance_loss, expected_aux)
    model.train()
    handle.remove()
    again = model(**batch)
    assert "balance_loss" not in again and torch.allclose(again.loss, plain.loss)
    with pytest.raises(TypeError, match="return_dict"):
        add_balance_loss(model)
        model(**batch, return_dict=False)


def test_training_modes_and_central_rules_train():
    torch.manual_seed(2)
    model = _gpt2()
    mpoe_ify(model, num_experts=4, train="auxiliary", central_grad="bernoulli")
    moe = moe_layers(model)[0][1].moe
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".moe." in n for n in trainable)
    assert all(not e.central.requires_grad and all(a.requires_grad for a in e.auxiliary) for e in moe.experts_in)
    assert moe.router.weight.requires_grad and not model.transformer.wte.weight.requires_grad
    before = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    add_balance_loss(model)
    model(**_batch("gpt2")).loss.backward()
    opt.step()
    after = model.state_dict()
    changed = {k for k in after if not torch.equal(after[k], before[k])}
    assert any("experts_in.1.cores.0" in k for k in changed) and any("router" in k for k in changed)
    assert not any("cores.1" in k for k in changed) and "transformer.wte.weight" not in changed  # centrals frozen
    assert set_moe_trainable(model, "all") == num_parameters(model)
    with pytest.raises(ValueError, match="mode must be"):
        set_moe_trainable(model, "central")
    switch = _gpt2()
    mpoe_ify(switch, num_experts=2, experts="dense")
    with pytest.raises(ValueError, match="needs MPO experts"):
        set_moe_trainable(switch, "auxiliary")


def test_parameter_counts_total_and_active():
    torch.manual_seed(3)
    dense = _gpt2()
    base = num_parameters(dense)
    ffn = 2 * (32 * 64) + 64 + 32
    switch, mpoe = copy.deepcopy(dense), copy.deepcopy(dense)
    rs = mpoe_ify(switch, num_experts=8, top_k=1, experts="dense")
    rm = mpoe_ify(mpoe, num_experts=8, top_k=1, experts="mpo")
    router = 8 * 32
    assert rs.params_after == base + 2 * (7 * ffn + router)
    assert active_parameters(switch) == base + 2 * router  # one expert per token: the dense FFN's size
    layer = moe_layers(mpoe)[0][1].moe
    rep = layer.parameter_report()
    assert rm.params_after == base + 2 * (rep["mpoe"] - ffn)
    assert active_parameters(mpoe) == base + 2 * (rep["mpoe"] - 7 * layer.per_expert_parameters() - ffn)
    assert rm.params_after < 0.25 * rs.params_after + 0.75 * base  # the mixture part is < 1/4 of Switch's
    assert "active per token" in str(rm) and "c_fc" not in str(rm)


@pytest.mark.parametrize("experts", ["mpo", "dense"])
def test_unmpoe_ify_merges_back(experts, tmp_path):
    torch.manual_seed(4)
    model = _gpt2().eval()
    original = copy.deepcopy(model)
    batch = _batch("gpt2")
    mpoe_ify(model, num_experts=3, experts=experts)
    fresh = unmpoe_ify(copy.deepcopy(model), merge="average")
    assert fresh.max_error < 1e-6  # identical experts: the merge is the FFN
    # make the experts differ, route some tokens, then merge by routed share
    with torch.no_grad():
        for _, layer in moe_layers(model):
            for p in layer.moe.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    _scramble_routers(model, 2)
    reset_routing_stats(model)
    with torch.no_grad():
        model(**batch)
    shares = {name: layer.token_counts.double() / layer.token_counts.sum() for name, layer in moe_layers(model)}
    expected = {}
    for name, layer in moe_layers(model):
        w_in, b_in, _, _ = layer.moe.expert_weights()
        expected[name] = (torch.einsum("e,eij->ij", shares[name], w_in.double()),
                          torch.einsum("e,ej->j", shares[name], b_in.double()))
    merged = copy.deepcopy(model)
    report = unmpoe_ify(merged, merge="routed")
    assert report.merge == "routed" and set(report.layers) == {"transformer.h.0.mlp", "transformer.h.1.mlp"}
    assert 0.01 < report.max_error < 1.0
    for block, row in report.layers.items():
        assert row["weights"] == pytest.approx(shares[block + ".c_fc"].tolist())
        c_fc = merged.get_submodule(block + ".c_fc")
        assert type(c_fc).__name__ == "Conv1D" and type(merged.get_submodule(block + ".c_proj")).__name__ == "Conv1D"
        assert torch.allclose(c_fc.weight.double(), expected[block + ".c_fc"][0], atol=1e-6)
        assert torch.allclose(c_fc.bias.double(), expected[block + ".c_fc"][1], atol=1e-6)
    assert not moe_layers(merged)
    assert [type(m) for m in merged.modules()] == [type(m) for m in original.modules()]
    merged.save_pretrained(tmp_path)  # an ordinary checkpoint again
    reloaded = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.allclose(reloaded(**batch).logits, merged(**batch).logits, atol=1e-5)
    with pytest.raises(ValueError, match="merge must be"):
        unmpoe_ify(model, merge="max")
    reset_routing_stats(model)
    with pytest.raises(ValueError, match="needs routing statistics"):
        unmpoe_ify(model, merge="routed")
    assert len(moe_layers(model)) == 2  # nothing merged by the failed call


def test_t5_merges_back_with_its_dropout_and_activation():
    torch.manual_seed(6)
    model = _t5().eval()
    ref_types = [type(m) for m in model.modules()]
    batch = _batch("t5")
    with torch.no_grad():
        ref = model(**batch).logits
    mpoe_ify(model, num_experts=2, include="DenseReluDense")
    report = unmpoe_ify(model)
    assert len(report.layers) == 4 and report.max_error < 1e-6
    assert [type(m) for m in model.modules()] == ref_types
    with torch.no_grad():
        assert torch.allclose(model(**batch).logits, ref, atol=1e-4)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def test_bad_input_raises_before_any_change():
    torch.manual_seed(7)
    model = _gpt2()
    state, types = _state(model), [type(m) for m in model.modules()]
    cases = [
        (dict(num_experts=1), ValueError, "num_experts must be an int >= 2"),
        (dict(num_experts=2.0), ValueError, "num_experts"),
        (dict(num_experts=4, top_k=5), ValueError, "top_k must be an int in \\[1, num_experts=4\\]"),
        (dict(num_experts=4, include="h.7.mlp"), ValueError, "include pattern 'h.7.mlp' matched no FFN block"),
        (dict(num_experts=4, include="attn"), ValueError, "include"),
        (dict(num_experts=4, experts="sparse"), ValueError, "experts must be"),
        (dict(num_experts=4, n=4), ValueError, "n must be odd"),
        (dict(num_experts=4, n=1), ValueError, "n must be"),
        (dict(num_experts=4, central_grad="often"), ValueError, "central_grad"),
        (dict(num_experts=4, capacity_factor=0.0), ValueError, "capacity_factor"),
        (dict(num_experts=4, gate="soft"), ValueError, "gate must be"),
        (dict(num_experts=4, train="central"), ValueError, "train must be"),
        (dict(num_experts=4, experts="dense", train="auxiliary"), ValueError, "train must be"),
    ]
    for kwargs, exc, match in cases:
        with pytest.raises(exc, match=match):
            mpoe_ify(model, **kwargs)
        assert [type(m) for m in model.modules()] == types
        assert all(torch.equal(v, state[k]) for k, v in model.state_dict().items())
    with pytest.raises(TypeError, match="model must be an nn.Module"):
        mpoe_ify("gpt2", num_experts=2)
    # an FFN whose hidden size is prime cannot be factored into n >= 3 cores
    odd = transformers.GPT2LMHeadModel(transformers.GPT2Config(vocab_size=50, n_positions=8, n_embd=37, n_layer=1,
                                                               n_head=1, n_inner=64))
    with pytest.raises(ValueError, match="n=3: FFN block 'transformer.h.0.mlp' \\(37 x 64\\) cannot be factored"):
        mpoe_ify(odd, num_experts=2)
    assert not moe_layers(odd)
    mpoe_ify(odd, num_experts=2, experts="dense")  # dense copies need no factorization
    gated = _t5(gated=True)
    with pytest.raises(TypeError, match="gated .*wi_0/wi_1.*supports non-gated FFNs only"):
        mpoe_ify(gated, num_experts=2)
    assert not moe_layers(gated)
    with pytest.raises(ValueError, match="no upcycled FFN"):
        add_balance_loss(gated)
    with pytest.raises(ValueError, match="coef must be"):
        add_balance_loss(odd, coef=-1.0)
    with pytest.raises(ValueError, match="no upcycled FFN has run a forward"):
        balance_loss(odd)


# ----------------------------------------------------------------------------- the layers against a plain loop
def _reference(layer, x: torch.Tensor) -> torch.Tensor:
    """Token by token: sum over its kept choices of gate * expert_e(x), experts' dense weights from
    MPOLinear.weight (MPOE) or the parameters (Switch), in float64."""
    out = layer(x)
    r = out.routing
    if isinstance(layer, MPOEFeedForward):
        mats = [(e_in.weight.T, e_in.bias, e_out.weight.T, e_out.bias) for e_in, e_out in zip(layer.experts_in, layer.experts_out)]
    else:
        mats = [(layer.w_in[e], layer.b_in[e], layer.w_out[e], layer.b_out[e]) for e in range(layer.num_experts)]
    ref = torch.zeros(x.shape[0], x.shape[1], dtype=torch.float64)
    for t in range(x.shape[0]):
        for j in range(r.index.shape[1]):
            if r.keep[t, j]:
                w_in, b_in, w_out, b_out = (m.double() for m in mats[int(r.index[t, j])])
                ref[t] += float(r.gates[t, j]) * (F.gelu(x[t].double() @ w_in + b_in) @ w_out + b_out)
    return out.output, ref


@settings(max_examples=12, deadline=None)
@given(experts=st.integers(2, 5), data=st.data(), switch=st.booleans())
def test_layer_matches_a_token_by_token_loop(experts, data, switch):
    top_k = data.draw(st.integers(1, experts))
    capacity = data.draw(st.sampled_from([None, 0.5, 1.0]))
    torch.manual_seed(experts * 10 + top_k)
    kw = dict(top_k=top_k, capacity_factor=capacity)
    layer = SwitchFeedForward(8, 12, experts, **kw) if switch else MPOEFeedForward(8, 12, experts, n=3, **kw)
    with torch.no_grad():
        layer.router.weight.mul_(100)
    x = torch.randn(20, 8)
    got, ref = _reference(layer, x)
    assert torch.allclose(got.double(), ref, atol=1e-5)


def test_switch_from_dense_copies_and_validates():
    lin_in, lin_out = nn.Linear(8, 16), nn.Linear(16, 8)
    layer = SwitchFeedForward.from_dense(lin_in, lin_out, 3, gate="unit_sum")
    x = torch.randn(10, 8)
    assert torch.allclose(layer(x).output, lin_out(F.gelu(lin_in(x))), atol=1e-6)
    assert layer.per_expert_parameters() == 2 * 8 * 16 + 8 + 16
    with pytest.raises(ValueError, match="do not form an FFN"):
        SwitchFeedForward.from_dense(lin_in, nn.Linear(16, 4), 2)
    with pytest.raises(ValueError, match="both have a bias"):
        SwitchFeedForward.from_dense(lin_in, nn.Linear(16, 8, bias=False), 2)
    with pytest.raises(ValueError, match="activation must be"):
        SwitchFeedForward(8, 16, 2, activation="swish")
    assert isinstance(moe_layers(nn.Sequential(UpcycledFFN(layer, None, "linear")))[0][1], UpcycledFFN)


def test_seeded_perturbation_of_the_auxiliaries():
    torch.manual_seed(8)
    dense = _gpt2().eval()
    models = [copy.deepcopy(dense) for _ in range(3)]
    reports = [mpoe_ify(m, num_experts=3, noise_std=0.05, seed=s) for m, s in zip(models, (1, 1, 2))]
    assert all(0 < r.init_error < 0.2 for r in reports[0].layers)  # perturbed: no longer exact, but close
    moe = [moe_layers(m)[0][1].moe for m in models]
    a, b, c = (m.experts_in[1].cores[0] for m in moe)
    assert torch.equal(a, b) and not torch.equal(a, c)  # seeded
    assert not torch.equal(moe[0].experts_in[0].cores[0], moe[0].experts_in[1].cores[0])  # experts differ
    assert torch.equal(moe[0].experts_in[0].central, moe[2].experts_in[0].central)  # the central is the pretrained one
    assert torch.equal(moe[0].router.weight, moe[1].router.weight) and not torch.equal(moe[0].router.weight, moe[2].router.weight)
