"""MPOBERT initialization and checkpoints: ALBERT equivalence, BERT fit, depth scaling, save/load round trip.

The ALBERT/BERT tests build tiny random models with ``transformers`` (a test-only dependency);
the readers under test do not import it.
"""
from __future__ import annotations

import json
import math
import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mpo_core import decompose
from mpo_core.contract import dense_weight
from mpobert import MATRICES, MPOBertConfig, MPOBertForPreTraining, MPOBertForSequenceClassification, MPOBertModel
from mpobert.fit import fit_auxiliaries
from mpobert.hf_checkpoint import read_hf_checkpoint
from mpobert.init import depth_scale, xavier_core_std

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=50, hidden_size=32, num_hidden_layers=3, num_attention_heads=4, intermediate_size=64,
             max_position_embeddings=32, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def _inputs(vocab: int = 50, b: int = 2, s: int = 9):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(1, vocab, (b, s), generator=g)
    mask = torch.ones(b, s, dtype=torch.long)
    mask[1, 6:] = 0
    types = torch.zeros(b, s, dtype=torch.long)
    types[:, 5:] = 1
    return ids, mask, types


@pytest.fixture(scope="module")
def albert_dir(tmp_path_factory):
    torch.manual_seed(0)
    cfg = transformers.AlbertConfig(embedding_size=16, **SMALL)
    model = transformers.AlbertForPreTraining(cfg).eval()
    path = tmp_path_factory.mktemp("albert")
    model.save_pretrained(path)
    return path, model


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory):
    torch.manual_seed(1)
    model = transformers.BertModel(transformers.BertConfig(**SMALL)).eval()
    path = tmp_path_factory.mktemp("bert")
    model.save_pretrained(path)
    return path, model


# ---------------------------------------------------------------------- ALBERT
def test_albert_equivalence(albert_dir):
    path, ref = albert_dir
    assert os.path.exists(os.path.join(path, "model.safetensors"))
    model = MPOBertForPreTraining.from_albert(path, adapter_rank=0).eval()
    assert model.config.num_layers == 3 and model.config.hidden_act == "gelu_new"
    ids, mask, types = _inputs()
    with torch.no_grad():
        r = ref(input_ids=ids, attention_mask=mask, token_type_ids=types)
        rb = ref.albert(input_ids=ids, attention_mask=mask, token_type_ids=types)
        o = model(ids, attention_mask=mask, token_type_ids=types)
        ob = model.mpobert(ids, attention_mask=mask, token_type_ids=types)
    torch.testing.assert_close(ob.last_hidden_state, rb.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ob.pooler_output, rb.pooler_output, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o.logits, r.prediction_logits, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(o.sop_logits, r.sop_logits, atol=1e-5, rtol=1e-5)


def test_albert_from_pytorch_bin(albert_dir, tmp_path):
    path, ref = albert_dir
    ref.save_pretrained(tmp_path, safe_serialization=False) if _accepts_safe_serialization() else _save_bin(ref, tmp_path)
    assert os.path.exists(tmp_path / "pytorch_model.bin")
    model = MPOBertModel.from_albert(tmp_path, adapter_rank=0).eval()
    ids, mask, types = _inputs()
    with torch.no_grad():
        torch.testing.assert_close(model(ids, mask, types).last_hidden_state,
                                   ref.albert(input_ids=ids, attention_mask=mask, token_type_ids=types).last_hidden_state,
                                   atol=1e-5, rtol=1e-5)


def _accepts_safe_serialization() -> bool:
    import inspect

    return "safe_serialization" in inspect.signature(transformers.PreTrainedModel.save_pretrained).parameters


def _save_bin(model, directory) -> None:
    model.config.save_pretrained(directory)
    torch.save(model.state_dict(), os.path.join(directory, "pytorch_model.bin"))


def test_albert_deeper_groups_and_layer_copies(albert_dir):
    path, ref = albert_dir
    model = MPOBertModel.from_albert(path, num_layers=6, num_groups=2, adapter_rank=2)
    w = ref.albert.encoder.albert_layer_groups[0].albert_layers[0].attention.query.weight.detach()
    for l in range(6):
        torch.testing.assert_close(dense_weight(list(model.encoder.layers[l].mpo["q"].cores)), w.T, atol=1e-5, rtol=1e-5)
    g0, g1 = model.encoder.groups
    assert g0.central["q"] is not g1.central["q"]
    torch.testing.assert_close(g0.central["q"], g1.central["q"], atol=0, rtol=0)


def test_albert_truncated(albert_dir):
    path, ref = albert_dir
    model = MPOBertModel.from_albert(path, max_bond=4, adapter_rank=0)
    lin = model.encoder.layers[0].mpo["ffn_in"]
    assert max(lin.ranks) == 4
    w = ref.albert.encoder.albert_layer_groups[0].albert_layers[0].ffn.weight.detach().T
    expect = decompose(w, lin.in_shape, lin.out_shape, max_bond=4)
    torch.testing.assert_close(dense_weight(list(lin.cores)), expect.to_dense(), atol=1e-5, rtol=1e-5)


def test_depth_scaling_random_reading(albert_dir):
    """§3.3's text: layers above 24 get Xavier auxiliaries times (2L)^(-1/4)."""
    path, ref = albert_dir
    torch.manual_seed(0)
    L = 26
    model = MPOBertModel.from_albert(path, num_layers=L, adapter_rank=0, depth_scaling="random")
    first = model.encoder.layers[0]
    for l in (0, 23):  # copied from ALBERT
        for name in MATRICES:
            for a, b in zip(model.encoder.layers[l].mpo[name].auxiliary, first.mpo[name].auxiliary):
                assert torch.equal(a, b)
    normalized = []
    for l in (24, 25):
        assert depth_scale(l, model.config) == (2 * L) ** -0.25
        for name in MATRICES:
            lin = model.encoder.layers[l].mpo[name]
            std = xavier_core_std(lin.in_features, lin.out_features, lin.ranks)
            normalized += [a.flatten() / std for a in lin.auxiliary]
            assert lin.central is model.encoder.groups[0].central[name]
    z = torch.cat(normalized)
    assert z.numel() > 3000
    # std of N(0, (2L)^(-1/2)) samples; 5 sigma of the std estimate ~ 5 / sqrt(2 N)
    assert abs(float(z.detach().std()) / (2 * L) ** -0.25 - 1) < 5 / math.sqrt(2 * z.numel())
    assert abs(float(z.detach().mean())) < 5 * (2 * L) ** -0.25 / math.sqrt(z.numel())


def test_depth_scaling_algorithm1_reading(albert_dir):
    """Appendix A.2 (the default): layers above 24 get ALBERT's own auxiliaries, each core times
    (2L)^(-1/4), so their weights are ALBERT's times (2L)^(-(n-1)/4); the report shows the ratio."""
    path, ref = albert_dir
    L = 26
    model = MPOBertModel.from_albert(path, num_layers=L, adapter_rank=0)
    assert model.config.depth_scaling == "algorithm1"
    s = (2 * L) ** -0.25
    w = ref.albert.encoder.albert_layer_groups[0].albert_layers[0].attention.query.weight.detach().T
    report = model.init_report
    for name in MATRICES:
        low, high = model.encoder.layers[0].mpo[name], model.encoder.layers[25].mpo[name]
        for a, b in zip(high.auxiliary, low.auxiliary):
            torch.testing.assert_close(a, b * s, rtol=1e-6, atol=0)
        n_aux = len(high.auxiliary)
        for l in (0, 23):
            assert report.norm_ratio(l, name) == pytest.approx(1.0, abs=1e-5)
            assert report[(l, name)] < 1e-5
        for l in (24, 25):
            assert report.norm_ratio(l, name) == pytest.approx(s ** n_aux, rel=1e-5)
            assert report[(l, name)] == pytest.approx(1 - s ** n_aux, rel=1e-4)
    torch.testing.assert_close(dense_weight(list(model.encoder.layers[24].mpo["q"].cores)), w * s ** 4, rtol=1e-4, atol=1e-6)
    assert "|W|/|src|" in report.table() and len(report.table().splitlines()) == 3 + L
    with pytest.raises(ValueError, match="depth_scaling"):
        MPOBertConfig.tiny(depth_scaling="paper")


def test_from_scratch_depth_scaling_and_xavier():
    torch.manual_seed(0)
    cfg = MPOBertConfig.tiny(num_layers=26, hidden_size=64, num_heads=4, intermediate_size=128, adapter_rank=0)
    model = MPOBertModel(cfg)
    for l, expect in ((0, 1.0), (23, 1.0), (24, (2 * 26) ** -0.25), (25, (2 * 26) ** -0.25)):
        z = torch.cat([a.flatten() / xavier_core_std(lin.in_features, lin.out_features, lin.ranks)
                       for lin in model.encoder.layers[l].mpo.values() for a in lin.auxiliary])
        assert abs(float(z.detach().std()) / expect - 1) < 5 / math.sqrt(2 * z.numel()), l
    # with every core Xavier-scaled, the dense W has variance 2 / (in + out)
    w = torch.stack([dense_weight(list(layer.mpo["q"].cores)) for layer in model.encoder.layers[:24]])
    assert float(w.var()) == pytest.approx(2 / 128, rel=0.15)


# ---------------------------------------------------------------------- BERT
def _bert_layer_weight(ref, l, name):
    layer = ref.encoder.layer[l]
    lin = {"q": layer.attention.self.query, "k": layer.attention.self.key, "v": layer.attention.self.value,
           "attn_out": layer.attention.output.dense, "ffn_in": layer.intermediate.dense,
           "ffn_out": layer.output.dense}[name]
    return lin.weight.detach().T


def test_from_bert_layer_k_is_exact_and_fit_beats_copy(bert_dir):
    path, ref = bert_dir
    model = MPOBertModel.from_bert(path, central_from="layer:1", adapter_rank=0)
    assert model.config.embedding_size == 32
    for name in MATRICES:
        assert model.init_report[(1, name)] < 1e-6
        torch.testing.assert_close(dense_weight(list(model.encoder.layers[1].mpo[name].cores)),
                                   _bert_layer_weight(ref, 1, name), atol=1e-5, rtol=1e-5)
        for l in (0, 2):  # the fitted auxiliaries beat plain copies of layer 1's
            target = _bert_layer_weight(ref, l, name).double()
            copied = dense_weight([c.double() for c in model.encoder.layers[1].mpo[name].cores])
            copy_err = float(torch.linalg.vector_norm(copied - target) / torch.linalg.vector_norm(target))
            fitted = dense_weight([c.double() for c in model.encoder.layers[l].mpo[name].cores])
            fit_err = float(torch.linalg.vector_norm(fitted - target) / torch.linalg.vector_norm(target))
            assert fit_err == pytest.approx(model.init_report[(l, name)], abs=1e-5)
            assert fit_err < copy_err


def test_from_bert_identical_layers_matches_bert(tmp_path):
    torch.manual_seed(2)
    ref = transformers.BertModel(transformers.BertConfig(**SMALL)).eval()
    with torch.no_grad():
        for layer in ref.encoder.layer[1:]:
            layer.load_state_dict(ref.encoder.layer[0].state_dict())
    ref.save_pretrained(tmp_path)
    model = MPOBertModel.from_bert(tmp_path, central_from="mean", adapter_rank=0).eval()
    assert model.config.hidden_act == "gelu"
    ids, mask, types = _inputs()
    with torch.no_grad():
        out = model(ids, attention_mask=mask, token_type_ids=types)
        r = ref(input_ids=ids, attention_mask=mask, token_type_ids=types)
    torch.testing.assert_close(out.last_hidden_state, r.last_hidden_state, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out.pooler_output, r.pooler_output, atol=1e-5, rtol=1e-5)


def test_from_bert_report_shared_biases_and_norms(tmp_path):
    """The report's bias/LayerNorm errors are those of the group's merged (mean) tensors against
    each BERT layer's own; with one group per layer everything is exact."""
    torch.manual_seed(4)
    ref = transformers.BertModel(transformers.BertConfig(**SMALL)).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.1 * torch.randn_like(p))  # biases 0 and LayerNorms 1 would all agree
    ref.save_pretrained(tmp_path)
    path = tmp_path
    model = MPOBertModel.from_bert(path, adapter_rank=0)
    report = model.init_report
    q_bias = torch.stack([ref.encoder.layer[l].attention.self.query.bias.detach() for l in range(3)])
    ln_w = torch.stack([ref.encoder.layer[l].output.LayerNorm.weight.detach() for l in range(3)])
    for l in range(3):
        expect = float((q_bias.mean(0) - q_bias[l]).norm() / q_bias[l].norm())
        assert report[(l, "q.bias")] == pytest.approx(expect, rel=1e-5)
        assert report[(l, "ffn_ln.weight")] == pytest.approx(float((ln_w.mean(0) - ln_w[l]).norm() / ln_w[l].norm()),
                                                             rel=1e-5, abs=1e-9)
        assert 0 < report[(l, "q")] < 1 and 0 < report.norm_ratio(l, "q") < 1.5
    assert {r["tensor"] for r in report.to_dict()["rows"]} >= {"q", "q.bias", "attn_ln.bias", "ffn_ln.weight"}
    exact = MPOBertModel.from_bert(path, num_groups=3, adapter_rank=0).init_report
    assert max(r["rel_error"] for r in exact.rows) < 1e-5
    own = MPOBertModel.from_bert(path, adapter_rank=0, share_biases_norms=False)
    for l in range(3):  # every layer keeps BERT's own biases and LayerNorms; the weights fit as before
        assert own.encoder.layers[l].norms.bias["q"].tolist() == pytest.approx(q_bias[l].tolist(), abs=1e-7)
        assert own.init_report[(l, "q.bias")] < 1e-6 and own.init_report[(l, "ffn_ln.weight")] < 1e-6
        assert own.init_report[(l, "v")] == pytest.approx(report[(l, "v")], rel=1e-6)


def test_from_roberta_matches_roberta(tmp_path):
    """RoBERTa: positions from pad_token_id + 1, one token type; one group per layer is exact."""
    torch.manual_seed(3)
    cfg = transformers.RobertaConfig(**{**SMALL, "max_position_embeddings": 34}, type_vocab_size=1, pad_token_id=1)
    ref = transformers.RobertaModel(cfg).eval()
    ref.save_pretrained(tmp_path)
    model = MPOBertModel.from_bert(tmp_path, num_groups=3, adapter_rank=0).eval()
    assert model.config.max_position_embeddings == 32 and model.config.pad_token_id == 1
    ids, mask, _ = _inputs()
    ids = ids.clamp(min=2).masked_fill(mask == 0, 1)
    with torch.no_grad():
        out = model(ids, attention_mask=mask)
        r = ref(input_ids=ids, attention_mask=mask)
    m = mask[..., None].bool()
    torch.testing.assert_close(out.last_hidden_state.masked_fill(~m, 0), r.last_hidden_state.masked_fill(~m, 0),
                               atol=1e-5, rtol=1e-5)
    assert model.init_report.source == "roberta"


def test_from_bert_bad_arguments(bert_dir, albert_dir):
    path, _ = bert_dir
    with pytest.raises(ValueError, match="expected a bert or roberta checkpoint, config.json says model_type='albert'"):
        MPOBertModel.from_bert(albert_dir[0])
    for bad in ("layer:3", "layer:x", "first", 3):
        with pytest.raises(ValueError, match="central_from"):
            MPOBertModel.from_bert(path, central_from=bad)
    with pytest.raises(ValueError, match="embedding_size"):
        MPOBertModel.from_bert(path, embedding_size=16)
    with pytest.raises(ValueError, match="expected a albert checkpoint, config.json says model_type='bert'"):
        MPOBertModel.from_albert(path)


@settings(max_examples=10, deadline=None)
@given(seed=st.integers(0, 1000), n=st.sampled_from([3, 5]), center_first=st.booleans())
def test_fit_auxiliaries_recovers_and_never_worsens(seed, n, center_first):
    g = torch.Generator().manual_seed(seed)
    in_shape, out_shape = (2,) * n, (2, 3) + (2,) * (n - 2)
    w = torch.randn(2 ** n, 3 * 2 ** (n - 1), generator=g, dtype=torch.float64)
    mpo = decompose(w, in_shape, out_shape)
    cores, err = fit_auxiliaries(w, mpo.cores, mpo.central_index)
    assert err < 1e-10  # exact when the central is the weight's own
    assert torch.equal(cores[mpo.central_index], mpo.cores[mpo.central_index])
    other = w + 0.5 * torch.randn(w.shape, generator=g, dtype=torch.float64)
    start = float(torch.linalg.vector_norm(mpo.to_dense() - other) / torch.linalg.vector_norm(other))
    fitted, err2 = fit_auxiliaries(other, mpo.cores, mpo.central_index)
    assert [c.shape for c in fitted] == [c.shape for c in mpo.cores]
    assert err2 <= start + 1e-12
    dense = dense_weight(fitted)
    assert float(torch.linalg.vector_norm(dense - other) / torch.linalg.vector_norm(other)) == pytest.approx(err2, abs=1e-9)


# ---------------------------------------------------------------------- bad checkpoints
def test_corrupt_and_mismatched_checkpoints(albert_dir, tmp_path):
    path, ref = albert_dir
    with pytest.raises(ValueError, match="not a directory"):
        read_hf_checkpoint(tmp_path / "nope")
    with pytest.raises(ValueError, match="config.json"):
        read_hf_checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="JSON"):
        read_hf_checkpoint(tmp_path)
    cfg = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="neither"):
        read_hf_checkpoint(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"\x00garbage" * 10)
    with pytest.raises(ValueError, match="cannot read"):
        MPOBertModel.from_albert(tmp_path)
    (tmp_path / "model.safetensors").write_bytes((path / "model.safetensors").read_bytes())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "intermediate_size": 48}))
    with pytest.raises(ValueError, match="shape"):
        MPOBertModel.from_albert(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "num_hidden_groups": 2}))
    with pytest.raises(ValueError, match="num_hidden_groups"):
        MPOBertModel.from_albert(tmp_path)
    del cfg["hidden_size"]
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="hidden_size"):
        MPOBertModel.from_albert(tmp_path)


# ---------------------------------------------------------------------- save / load
def _perturb(model: torch.nn.Module) -> None:
    """One optimizer step so that every layer's auxiliaries and adapters differ from the others'."""
    cfg = model.config
    ids, mask, types = _inputs(cfg.vocab_size, s=6)
    opt = torch.optim.SGD(model.parameters(), lr=0.5)
    out = model(ids, attention_mask=mask, token_type_ids=types, labels=torch.tensor([0, 1]))
    out.loss.backward()
    opt.step()


def test_save_load_roundtrip_exact(tmp_path):
    torch.manual_seed(0)
    cfg = MPOBertConfig.tiny(num_layers=4, num_groups=2, adapter_rank=2, num_labels=2)
    model = MPOBertForSequenceClassification(cfg)
    _perturb(model)
    model.eval()
    aux0, aux1 = (model.mpobert.encoder.layers[i].mpo["q"].cores[0] for i in (0, 1))
    assert not torch.equal(aux0, aux1)
    model.save_pretrained(tmp_path)
    assert sorted(os.listdir(tmp_path)) == ["config.json", "mpobert_model.pt"]
    loaded = MPOBertForSequenceClassification.from_pretrained(tmp_path).eval()
    assert loaded.config == cfg
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    enc = loaded.mpobert.encoder
    for l, layer in enumerate(enc.layers):
        assert layer.mpo["ffn_in"].central is enc.groups[l // 2].central["ffn_in"]
    ids, mask, types = _inputs(cfg.vocab_size)
    with torch.no_grad():
        assert torch.equal(model(ids, mask, types).logits, loaded(ids, mask, types).logits)
    # the stored file holds each shared central once
    payload = torch.load(tmp_path / "mpobert_model.pt", weights_only=True)
    assert sum(k.endswith("central.q") for k in payload["tensors"]) == 2
    assert any(k.endswith("mpo.q.cores.2") for k in payload["aliases"])


def test_load_into_other_head_and_mismatches(tmp_path):
    torch.manual_seed(0)
    cfg = MPOBertConfig.tiny(adapter_rank=2)
    pre = MPOBertForPreTraining(cfg)
    pre.save_pretrained(tmp_path / "pre")
    clf = MPOBertForSequenceClassification.from_pretrained(tmp_path / "pre", strict=False)
    for k, v in pre.mpobert.state_dict().items():
        assert torch.equal(clf.mpobert.state_dict()[k], v)
    base = MPOBertModel.from_pretrained(tmp_path / "pre", strict=False)
    assert torch.equal(base.pooler.weight, pre.mpobert.pooler.weight)
    with pytest.raises(ValueError, match="does not match"):
        MPOBertForSequenceClassification.from_pretrained(tmp_path / "pre")
    # a config whose structure differs from the weights
    other = tmp_path / "other"
    pre.save_pretrained(other)
    cfg.replace(num_groups=2).save(other / "config.json")
    with pytest.raises(ValueError, match="sharing structure|does not match"):
        MPOBertForPreTraining.from_pretrained(other)
    cfg.replace(adapter_rank=3).save(other / "config.json")
    with pytest.raises(ValueError, match="does not match"):
        MPOBertForPreTraining.from_pretrained(other)
    (other / "mpobert_model.pt").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="cannot read"):
        MPOBertForPreTraining.from_pretrained(other)
    torch.save({"format": "something"}, other / "mpobert_model.pt")
    with pytest.raises(ValueError, match="format"):
        MPOBertForPreTraining.from_pretrained(other)
