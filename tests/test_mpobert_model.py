"""MPOBERT model: forward vs a plain torch reference, sharing, groups, adapters, heads, reports, config."""
from __future__ import annotations

import json
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

from mpo_core.activation import apply_activation
from mpo_core.contract import dense_weight
from mpobert import (
    MATRICES,
    MPOBertConfig,
    MPOBertForPreTraining,
    MPOBertForQuestionAnswering,
    MPOBertForSequenceClassification,
    MPOBertModel,
    count_parameters,
)

torch.set_default_dtype(torch.float32)


def _batch(cfg: MPOBertConfig, b: int = 2, s: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, cfg.vocab_size, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[-1, s - 2:] = 0
    types = torch.zeros(b, s, dtype=torch.long)
    types[:, s // 2:] = 1
    return ids, mask, types


def _layer_weight(model: MPOBertModel, l: int, name: str) -> torch.Tensor:
    """W(l) (in x out) rebuilt from the layer's cores (+ adapter), or the group's dense matrix."""
    layer, group = model.encoder.layers[l], model.encoder.groups[model.config.group_of(l)]
    w = dense_weight(list(layer.mpo[name].cores)) if name in layer.mpo else group.dense[name].T
    if name in layer.adapters:
        w = w + layer.adapters[name].U @ layer.adapters[name].D
    return w


def _reference_forward(model: MPOBertModel, ids, mask, types) -> torch.Tensor:
    """Plain torch post-LN BERT with the dense weights W(l): softmax attention, F.layer_norm, F.gelu."""
    cfg = model.config
    emb = model.embeddings
    pos = torch.arange(ids.shape[1])
    x = emb.word_embeddings.weight[ids] + emb.token_type_embeddings.weight[types] + emb.position_embeddings.weight[pos]
    x = F.layer_norm(x, (cfg.embedding_size,), emb.ln_weight, emb.ln_bias, cfg.layer_norm_eps)
    h = x @ emb.projection.weight.T + emb.projection.bias
    b, s, _ = h.shape
    neg = (1.0 - mask[:, None, None, :].float()) * -1e30
    for l in range(cfg.num_layers):
        g = model.encoder.layers[l].norms  # biases and LayerNorms: the group's, or the layer's own
        proj = {m: lambda t, m=m: t @ _layer_weight(model, l, m) + g.bias[m] for m in MATRICES}
        q, k, v = (proj[m](h).view(b, s, cfg.num_heads, cfg.head_dim).transpose(1, 2) for m in ("q", "k", "v"))
        att = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim) + neg, dim=-1)
        ctx = (att @ v).transpose(1, 2).reshape(b, s, -1)
        h = F.layer_norm(h + proj["attn_out"](ctx), (cfg.hidden_size,), g.attn_ln_weight, g.attn_ln_bias, cfg.layer_norm_eps)
        f = proj["ffn_out"](apply_activation(proj["ffn_in"](h), cfg.activation))
        h = F.layer_norm(h + f, (cfg.hidden_size,), g.ffn_ln_weight, g.ffn_ln_bias, cfg.layer_norm_eps)
    return h


def _randomize_adapters(model: nn.Module, seed: int = 1) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".adapters." in name:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


# ---------------------------------------------------------------------- forward
def test_forward_matches_dense_reference():
    torch.manual_seed(0)
    cfg = MPOBertConfig.tiny(num_groups=2, hidden_act="gelu")
    model = MPOBertModel(cfg).eval()
    _randomize_adapters(model)
    ids, mask, types = _batch(cfg)
    with torch.no_grad():
        out = model(ids, attention_mask=mask, token_type_ids=types, output_hidden_states=True)
        ref = _reference_forward(model, ids, mask, types)
    assert out.last_hidden_state.shape == (2, 7, cfg.hidden_size)
    assert out.pooler_output.shape == (2, cfg.hidden_size)
    assert len(out.hidden_states) == cfg.num_layers + 1
    torch.testing.assert_close(out.last_hidden_state, ref, atol=2e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooler_output, torch.tanh(ref[:, 0] @ model.pooler.weight.T + model.pooler.bias),
                               atol=2e-5, rtol=1e-5)


@settings(max_examples=6, deadline=None)
@given(heads=st.integers(1, 3), head_dim=st.sampled_from([4, 8]), groups=st.integers(1, 2),
       per_group=st.integers(1, 2), rank=st.integers(0, 3), n=st.sampled_from([1, 3]),
       dense_subset=st.sets(st.sampled_from(MATRICES), max_size=2), seed=st.integers(0, 100))
def test_forward_matches_reference_random_configs(heads, head_dim, groups, per_group, rank, n, dense_subset, seed):
    torch.manual_seed(seed)
    h = heads * head_dim
    cfg = MPOBertConfig(vocab_size=30, embedding_size=6, hidden_size=h, num_layers=groups * per_group, num_heads=heads,
                        intermediate_size=2 * h, max_position_embeddings=16, mpo_n=n, num_groups=groups,
                        adapter_rank=rank, mpo_matrices=tuple(m for m in MATRICES if m not in dense_subset),
                        adapter_matrices=MATRICES, mpo_shapes={} if n == 1 else {h: (2, h // 4, 2), 2 * h: (2, h // 2, 2)})
    model = MPOBertModel(cfg).eval()
    _randomize_adapters(model, seed)
    ids, mask, types = _batch(cfg, b=2, s=5, seed=seed)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, types).last_hidden_state, _reference_forward(model, ids, mask, types),
                                   atol=2e-5, rtol=1e-5)


def test_padding_is_masked():
    torch.manual_seed(0)
    cfg = MPOBertConfig.tiny()
    model = MPOBertModel(cfg).eval()
    ids, mask, _ = _batch(cfg)
    other = ids.clone()
    other[-1, -2:] = (ids[-1, -2:] % (cfg.vocab_size - 2)) + 1  # change the padded tokens only
    with torch.no_grad():
        a = model(ids, attention_mask=mask).last_hidden_state
        b = model(other, attention_mask=mask).last_hidden_state
        c = model(other).last_hidden_state
    torch.testing.assert_close(a[:, :5], b[:, :5], atol=1e-6, rtol=0)
    assert not torch.allclose(a[-1, :5], c[-1, :5], atol=1e-4)


def test_bad_inputs_raise():
    model = MPOBertModel(MPOBertConfig.tiny())
    ids = torch.randint(0, 10, (2, 5))
    with pytest.raises(ValueError, match="exactly one"):
        model()
    with pytest.raises(ValueError, match="input_ids"):
        model(ids.float())
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids, attention_mask=torch.ones(2, 4))
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(torch.randint(0, 10, (1, 65)))
    with pytest.raises(ValueError, match="inputs_embeds"):
        model(inputs_embeds=torch.randn(2, 5, 3))
    with pytest.raises(TypeError, match="config"):
        MPOBertModel({"hidden_size": 32})


# ---------------------------------------------------------------------- sharing
def test_central_is_one_parameter_shared_by_all_layers():
    cfg = MPOBertConfig.tiny(num_layers=3)
    model = MPOBertModel(cfg)
    group = model.encoder.groups[0]
    for name in MATRICES:
        for layer in model.encoder.layers:
            lin = layer.mpo[name]
            assert lin.central is group.central[name]
        auxes = [id(p) for layer in model.encoder.layers for p in layer.mpo[name].auxiliary]
        assert len(set(auxes)) == len(auxes)  # auxiliaries are per layer
    ids = {id(p) for p in model.parameters()}
    assert len(ids) == len(list(model.parameters()))
    assert sum(p.numel() for p in model.parameters()) == model.parameter_report().total


def test_central_gradient_is_sum_over_layers():
    torch.manual_seed(0)
    cfg = MPOBertConfig.tiny(num_layers=3)
    tied = MPOBertModel(cfg)
    untied = MPOBertModel(cfg)
    untied.load_state_dict(tied.state_dict())
    copies = {}
    for l, layer in enumerate(untied.encoder.layers):  # give every layer its own copy of the central
        for name, lin in layer.mpo.items():
            copies[l, name] = nn.Parameter(lin.central.detach().clone())
            lin.share_core(lin.central_index, copies[l, name])
    ids, mask, types = _batch(cfg)
    for model in (tied, untied):
        model(ids, mask, types).last_hidden_state.pow(2).sum().backward()
    for name in MATRICES:
        grads = [copies[l, name].grad for l in range(cfg.num_layers)]
        assert all(g is not None and g.abs().sum() > 0 for g in grads)
        torch.testing.assert_close(tied.encoder.groups[0].central[name].grad, sum(grads), atol=1e-5, rtol=1e-4)


def test_groups_share_within_group_only():
    cfg = MPOBertConfig.tiny(num_layers=6, num_groups=3)
    model = MPOBertModel(cfg)
    layers, groups = model.encoder.layers, model.encoder.groups
    assert len(groups) == 3
    for l, layer in enumerate(layers):
        for name in MATRICES:
            assert layer.mpo[name].central is groups[l // 2].central[name]
    centrals = {id(g.central["q"]) for g in groups}
    assert len(centrals) == 3
    rep = model.parameter_report()
    assert rep.central == 3 * sum(p.numel() for p in groups[0].central.values())


def test_dense_matrices_are_shared_per_group():
    cfg = MPOBertConfig.tiny(mpo_matrices=("q", "k", "v", "attn_out"), num_groups=2)
    model = MPOBertModel(cfg)
    assert set(model.encoder.layers[0].mpo) == {"q", "k", "v", "attn_out"}
    assert set(model.encoder.groups[0].dense) == {"ffn_in", "ffn_out"}
    assert model.encoder.groups[0].dense["ffn_in"].shape == (cfg.intermediate_size, cfg.hidden_size)


# ---------------------------------------------------------------------- adapters
def test_adapters_start_as_identity_change():
    torch.manual_seed(0)
    cfg = MPOBertConfig.tiny(adapter_rank=3, adapter_matrices=MATRICES)
    with_ad = MPOBertModel(cfg).eval()
    without = MPOBertModel(cfg.replace(adapter_rank=0)).eval()
    missing, unexpected = without.load_state_dict(with_ad.state_dict(), strict=False)
    assert not missing and all(".adapters." in k for k in unexpected) and unexpected
    for layer in with_ad.encoder.layers:
        for ad in layer.adapters.values():
            assert torch.count_nonzero(ad.U) == 0 and ad.D.std() > 0
    ids, mask, types = _batch(cfg)
    with torch.no_grad():
        torch.testing.assert_close(with_ad(ids, mask, types).last_hidden_state,
                                   without(ids, mask, types).last_hidden_state, atol=0, rtol=0)
    # U receives gradient at init (D does not: U = 0), so the adapter starts learning
    with_ad.train()
    with_ad(ids, mask, types).last_hidden_state.pow(2).sum().backward()
    ad = with_ad.encoder.layers[0].adapters["q"]
    assert ad.U.grad.abs().sum() > 0 and ad.D.grad.abs().sum() == 0


def test_adapter_count_and_placement():
    cfg = MPOBertConfig.tiny(adapter_rank=2, adapter_matrices=("ffn_in",))
    model = MPOBertModel(cfg)
    assert all(set(layer.adapters) == {"ffn_in"} for layer in model.encoder.layers)
    assert model.parameter_report().adapters == cfg.num_layers * 2 * (cfg.hidden_size + cfg.intermediate_size)


# ---------------------------------------------------------------------- heads
def test_pretraining_head_losses():
    torch.manual_seed(0)
    cfg = MPOBertConfig.tiny()
    model = MPOBertForPreTraining(cfg).eval()
    ids, mask, types = _batch(cfg)
    labels = torch.full_like(ids, -100)
    labels[:, 2] = ids[:, 2]
    sop = torch.tensor([0, 1])
    out = model(ids, attention_mask=mask, token_type_ids=types, labels=labels, sentence_order_label=sop)
    assert out.logits.shape == (2, 7, cfg.vocab_size) and out.sop_logits.shape == (2, 2)
    mlm = F.cross_entropy(out.logits[:, 2], ids[:, 2])
    torch.testing.assert_close(out.mlm_loss, mlm)
    torch.testing.assert_close(out.loss, mlm + F.cross_entropy(out.sop_logits, sop))
    assert out["loss"] is out.loss and "loss" in out
    assert "loss" not in model(ids)
    # the decoder is tied to the word embeddings
    assert model.mlm.word_embeddings[0].weight is model.mpobert.embeddings.word_embeddings.weight
    with pytest.raises(ValueError, match="labels"):
        model(ids, labels=labels[:, :3])


def test_classification_and_regression_heads():
    torch.manual_seed(0)
    cfg = MPOBertConfig.tiny(num_labels=3)
    ids, mask, _ = _batch(cfg)
    clf = MPOBertForSequenceClassification(cfg).eval()
    y = torch.tensor([2, 0])
    out = clf(ids, attention_mask=mask, labels=y)
    assert out.logits.shape == (2, 3)
    torch.testing.assert_close(out.loss, F.cross_entropy(out.logits, y))
    reg = MPOBertForSequenceClassification(cfg.replace(num_labels=1)).eval()
    t = torch.tensor([0.5, -1.0])
    out = reg(ids, attention_mask=mask, labels=t)
    torch.testing.assert_close(out.loss, F.mse_loss(out.logits[:, 0], t))
    with pytest.raises(TypeError, match="floating"):
        reg(ids, labels=torch.tensor([1, 0]))


def test_question_answering_head():
    torch.manual_seed(0)
    cfg = MPOBertConfig.tiny()
    ids, mask, _ = _batch(cfg)
    qa = MPOBertForQuestionAnswering(cfg).eval()
    start, end = torch.tensor([1, 3]), torch.tensor([2, 99])  # 99 is outside: ignored
    out = qa(ids, attention_mask=mask, start_positions=start, end_positions=end)
    assert out.start_logits.shape == (2, 7) and out.end_logits.shape == (2, 7)
    expect = (F.cross_entropy(out.start_logits, start) + F.cross_entropy(out.end_logits[:1], end[:1])) / 2
    torch.testing.assert_close(out.loss, expect)
    with pytest.raises(ValueError, match="both"):
        qa(ids, start_positions=start)


def test_training_step_reduces_loss():
    torch.manual_seed(0)
    cfg = MPOBertConfig.tiny(hidden_dropout=0.1, attention_dropout=0.1)
    model = MPOBertForSequenceClassification(cfg)
    ids, mask, _ = _batch(cfg, b=4)
    y = torch.tensor([0, 1, 0, 1])
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        opt.zero_grad()
        loss = model(ids, attention_mask=mask, labels=y).loss
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.6 * losses[0]
    # after the step the central is still one parameter, shared
    assert model.mpobert.encoder.layers[3].mpo["q"].central is model.mpobert.encoder.groups[0].central["q"]


# ---------------------------------------------------------------------- parameter report
# Two counting conventions reproduce the paper's sizes (measured values in the comments):
# * "public code": MPOBERT + MLM/SOP pretraining heads + pooler, no adapters (docs/architecture.md, MPOBERT):
#   MPOBERT12 19.544M (paper table 20M; public code ~19.5M), MPOBERT24 46.233M (46M),
#   MPOBERT48 74.618M (75M): within 0.5% of the public-code figures, 2.3% of the paper's rounded 20M.
# * "AlbertModel" (base model incl. pooler, no task heads) with rank-r adapters on the four
#   attention matrices: w/o adapter 19.414M (19.4M), r=4 19.709M (19.7M), r=8 20.004M (20.0M),
#   r=64 24.133M (24.3M, -0.7%); MPOBERT48+ (3 groups, r=8) 102.79M (102M, +0.8%).
PUBLIC_CODE = [("mpobert12", 19.5e6, 0.005), ("mpobert24", 46.2e6, 0.005), ("mpobert48", 74.6e6, 0.005)]
ADAPTER_ABLATION = [(0, 19.4e6, 0.002), (4, 19.7e6, 0.002), (8, 20.0e6, 0.002), (64, 24.3e6, 0.01)]


@pytest.mark.parametrize("preset,expected,tol", PUBLIC_CODE)
def test_preset_sizes_public_code_counting(preset, expected, tol):
    rep = count_parameters(getattr(MPOBertConfig, preset)(adapter_rank=0), MPOBertForPreTraining)
    assert abs(rep.total - expected) <= tol * expected, (preset, rep.total)
    assert rep.adapters == 0


@pytest.mark.parametrize("rank,expected,tol", ADAPTER_ABLATION)
def test_adapter_ablation_sizes(rank, expected, tol):
    rep = count_parameters(MPOBertConfig.mpobert12(adapter_rank=rank))
    assert rep.heads == 0
    assert abs(rep.base_model - expected) <= tol * expected, (rank, rep.base_model)
    assert rep.adapters == rank * 12 * 4 * (768 + 768)


def test_mpobert48_plus_size():
    rep = count_parameters(MPOBertConfig.mpobert48_plus())
    assert abs(rep.base_model - 102e6) <= 0.01 * 102e6, rep.base_model
    assert rep.central == 3 * (4 * 1024 ** 2 + 2 * 1024 * 4096)  # exact MPO: central = dense entries


def test_unshared_biases_and_norms(tmp_path):
    """share_biases_norms=False: every layer owns its biases and LayerNorms (the groups hold none);
    the forward matches the reference, the count grows by exactly (L - G) x their size, and a
    checkpoint round-trips."""
    torch.manual_seed(0)
    cfg = MPOBertConfig.tiny(num_groups=2, share_biases_norms=False)
    model = MPOBertModel(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".own." in name:
                p.add_(0.1 * torch.randn_like(p))
    layers = model.encoder.layers
    assert layers[0].norms is layers[0].own and layers[0].norms is not layers[1].norms
    assert not hasattr(model.encoder.groups[0], "bias")
    ids, mask, types = _batch(cfg)
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, types).last_hidden_state, _reference_forward(model, ids, mask, types),
                                   atol=2e-5, rtol=2e-5)
    per = sum(cfg.matrix_dims(m)[1] for m in MATRICES) + 4 * cfg.hidden_size
    shared = count_parameters(cfg.replace(share_biases_norms=True))
    assert count_parameters(cfg).total - shared.total == (cfg.num_layers - cfg.num_groups) * per
    model.save_pretrained(tmp_path)
    loaded = MPOBertModel.from_pretrained(tmp_path).eval()
    with torch.no_grad():
        assert torch.equal(loaded(ids, mask, types).last_hidden_state, model(ids, mask, types).last_hidden_state)


def test_report_structure_and_exact_counts():
    cfg = MPOBertConfig.mpobert12(adapter_rank=0)
    rep = count_parameters(cfg)
    # full-rank central cores hold exactly the dense matrices' entries (docs/architecture.md, MPOBERT)
    assert rep.central == 4 * 768 * 768 + 2 * 768 * 3072
    # 0.64M per-layer auxiliaries at H=768: q/k/v/o 86,609 each, ffn_in/ffn_out 148,880 each
    assert rep.auxiliary_per_layer == 4 * 86609 + 2 * 148880
    assert rep.shared_other == 4 * 768 + 3072 + 768 + 4 * 768
    assert rep.embeddings == 30000 * 128 + 512 * 128 + 2 * 128 + 2 * 128 + 128 * 768 + 768
    assert rep.dense_equivalent == rep.embeddings + rep.pooler + 12 * (4 * (768 * 768 + 768) + 2 * 768 * 3072 + 3072 + 768 + 4 * 768)
    assert count_parameters(MPOBertConfig.mpobert24(adapter_rank=0)).auxiliary_per_layer == pytest.approx(1.18e6, rel=0.01)
    d = rep.to_dict()
    assert d["total"] == rep.total and json.dumps(d)
    text = str(rep)
    assert "central cores" in text and f"{rep.total:,}" in text


def test_meta_count_equals_real_model():
    cfg = MPOBertConfig.tiny(num_groups=2, adapter_rank=3)
    real = MPOBertForPreTraining(cfg).parameter_report()
    assert count_parameters(cfg, MPOBertForPreTraining) == real
    assert real.total == sum(p.numel() for p in MPOBertForPreTraining(cfg).parameters())


# ---------------------------------------------------------------------- config
def test_config_json_roundtrip(tmp_path):
    cfg = MPOBertConfig.tiny(mpo_shapes={32: (2, 2, 2, 2, 2)}, num_groups=2, max_bond=3)
    again = MPOBertConfig.from_json(cfg.to_json())
    assert again == cfg
    cfg.save(tmp_path / "c.json")
    assert MPOBertConfig.load(tmp_path / "c.json") == cfg
    assert MPOBertConfig.mpobert48_plus().num_groups == 3 and MPOBertConfig.mpobert48().num_layers == 48
    assert MPOBertConfig.mpobert12().shape_for(3072) == (4, 4, 8, 6, 4)
    assert MPOBertConfig.mpobert24().shape_for(4096) == (4, 4, 8, 8, 4)


@pytest.mark.parametrize("kwargs,field", [
    (dict(hidden_size=30, num_heads=4), "num_heads"),
    (dict(num_layers=5, num_groups=2), "num_groups"),
    (dict(adapter_rank=-1), "adapter_rank"),
    (dict(mpo_matrices=("q", "query")), "mpo_matrices"),
    (dict(adapter_matrices=("ffn",)), "adapter_matrices"),
    (dict(mpo_shapes={32: (2, 2, 2, 2, 3)}), "mpo_shapes"),
    (dict(mpo_shapes={32: (4, 8)}), "mpo_shapes"),
    (dict(mpo_n=4), "mpo_n"),
    (dict(hidden_dropout=1.0), "hidden_dropout"),
    (dict(hidden_act="relu"), "hidden_act"),
    (dict(max_bond=0), "max_bond"),
    (dict(hidden_size=34, num_heads=2), "mpo_shapes"),  # 34 = 2 * 17 has no 5-mode factorization
])
def test_config_validation_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        MPOBertConfig.tiny(**kwargs)


def test_config_type_and_json_errors():
    with pytest.raises(TypeError, match="num_layers"):
        MPOBertConfig.tiny(num_layers=2.0)
    with pytest.raises(ValueError, match="unknown MPOBertConfig fields"):
        MPOBertConfig.from_dict({"hidden_sise": 3})
    with pytest.raises(ValueError, match="JSON"):
        MPOBertConfig.from_json("{nope")


def test_bf16_autocast_forward_backward():
    torch.manual_seed(0)
    cfg = MPOBertConfig.tiny()
    model = MPOBertForPreTraining(cfg)
    ids, mask, types = _batch(cfg)
    kw = dict(attention_mask=mask, token_type_ids=types, labels=ids, sentence_order_label=torch.tensor([0, 1]))
    ref = model(ids, **kw).loss
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(ids, **kw)
    assert out.logits.dtype == torch.bfloat16
    assert abs(float(out.loss.detach()) - float(ref.detach())) < 0.02 * float(ref.detach())
    out.loss.backward()
    central = model.mpobert.encoder.groups[0].central["q"]
    assert central.grad.dtype == torch.float32 and bool(torch.isfinite(central.grad).all())


def test_torch_compile_matches_eager():
    """The model traces under torch.compile (the fused ops are torch.library ops); outputs and grads match eager."""
    torch.manual_seed(0)
    cfg = MPOBertConfig.tiny(hidden_dropout=0.0, attention_dropout=0.0, classifier_dropout=0.0)
    model = MPOBertForSequenceClassification(cfg)
    ids, mask, types = _batch(cfg)[:3]
    labels = torch.tensor([0, 1])
    eager = model(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    eager.loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    compiled = torch.compile(model, backend="aot_eager")
    out = compiled(ids, attention_mask=mask, token_type_ids=types, labels=labels)
    out.loss.backward()
    torch.testing.assert_close(out.logits, eager.logits, rtol=1e-5, atol=1e-6)
    assert eager_grads.keys() == {n for n, p in model.named_parameters() if p.grad is not None}
    for name, grad in eager_grads.items():
        torch.testing.assert_close(dict(model.named_parameters())[name].grad, grad, rtol=1e-4, atol=1e-6, msg=name)
