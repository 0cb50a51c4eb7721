"""Lightweight (auxiliary-only) fine-tuning with peft's verbs: choose, train, save only the trained tensors, load, merge."""
import copy
import json
import os

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from mpo_core import MPOLinear  # noqa: E402
from mpo_core.lightweight import (  # noqa: E402
    CONFIG_NAME, WEIGHTS_NAME, LightweightConfig, LightweightModel, fix_gauge, get_lightweight_model,
)

V, T = 100, 10


def bert(seed: int = 0, labels: int = 3):
    torch.manual_seed(seed)
    config = transformers.BertConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=4, intermediate_size=96,
                                     vocab_size=V, max_position_embeddings=32, num_labels=labels)
    return transformers.BertForSequenceClassification(config).eval()


def batch(seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (8, T), generator=g)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": torch.randint(0, 3, (8,), generator=g)}


def logits(model, seed: int = 1):
    feed = batch(seed)
    feed.pop("labels")
    with torch.no_grad():
        return model(**feed).logits


def train(model, steps: int = 5):
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    for step in range(steps):
        loss = model(**batch(step)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()


CONFIG = dict(target_modules=["query", "value", "intermediate.dense"], modules_to_save=["classifier"])


def test_only_auxiliaries_and_chosen_modules_train(capsys):
    model = get_lightweight_model(bert(), LightweightConfig(**CONFIG))
    trained = set(model._trained_names())
    for name, p in model.base_model.named_parameters():
        assert p.requires_grad == (name in trained), name
    layers = [m for m in model.modules() if isinstance(m, MPOLinear)]
    assert len(layers) == 6
    for layer in layers:
        assert not layer.central.requires_grad and all(a.requires_grad for a in layer.auxiliary)
        assert not layer.bias.requires_grad
    assert {n for n in trained if n.startswith("classifier")} == {"classifier.weight", "classifier.bias"}
    before = [p.detach().clone() for p in model.parameters()]
    train(model)
    changed = [not torch.equal(b, p) for b, p in zip(before, model.parameters())]
    assert changed == [p.requires_grad for p in model.parameters()], "exactly the trainable tensors moved"
    model.print_trainable_parameters()
    line = capsys.readouterr().out.strip()
    trainable, total = model.get_nb_trainable_parameters()
    assert line == f"trainable params: {trainable:,d} || all params: {total:,d} || trainable%: {100 * trainable / total:.4f}"


def test_options_bias_layer_norms_and_all_cores():
    model = get_lightweight_model(bert(), LightweightConfig(target_modules="query", train="all", train_bias=True,
                                                            train_layer_norms=True))
    names = set(model._trained_names())
    assert "bert.encoder.layer.0.attention.self.query.cores.2" in names
    assert "bert.encoder.layer.0.attention.self.query.bias" in names
    assert "bert.encoder.layer.1.output.LayerNorm.weight" in names and "bert.embeddings.LayerNorm.bias" in names
    assert not any(n.startswith("classifier") for n in names)


def test_save_only_trained_tensors_and_reload(tmp_path):
    model = get_lightweight_model(bert(), LightweightConfig(**CONFIG))
    train(model)
    tuned = logits(model)
    model.save_pretrained(tmp_path)
    from safetensors.torch import load_file
    saved = load_file(tmp_path / WEIGHTS_NAME)
    assert sorted(saved) == sorted(model._trained_names())
    assert sum(t.numel() for t in saved.values()) == model.get_nb_trainable_parameters()[0]
    full_bytes = sum(p.numel() * 4 for p in bert().parameters())
    assert os.path.getsize(tmp_path / WEIGHTS_NAME) < 0.25 * full_bytes
    settings = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert settings["method"] == "mpo-lightweight" and len(settings["layers"]) == 6

    again = LightweightModel.from_pretrained(bert(), tmp_path)
    assert float((logits(again) - tuned).abs().max()) < 1e-6
    assert not any(p.requires_grad for p in again.parameters())
    trainable = LightweightModel.from_pretrained(bert(), tmp_path, is_trainable=True)
    assert trainable.get_nb_trainable_parameters() == model.get_nb_trainable_parameters()


def test_truncated_mpos_reload_too(tmp_path):
    model = get_lightweight_model(bert(), LightweightConfig(target_modules=["query", "value"], max_bond=6))
    assert any(layer.error_bound > 0 for layer in model.modules() if isinstance(layer, MPOLinear))
    train(model, 3)
    tuned = logits(model)
    model.save_pretrained(tmp_path)
    assert float((logits(LightweightModel.from_pretrained(bert(), tmp_path)) - tuned).abs().max()) < 1e-6


def test_merge_unmerge_and_merge_and_unload():
    model = get_lightweight_model(bert(), LightweightConfig(**CONFIG))
    train(model, 3)
    tuned = logits(model)
    model.merge()
    assert not any(isinstance(m, MPOLinear) for m in model.modules())
    assert float((logits(model) - tuned).abs().max()) < 1e-5
    model.unmerge()
    assert sum(isinstance(m, MPOLinear) for m in model.modules()) == 6
    assert float((logits(model) - tuned).abs().max()) < 1e-6
    plain = model.merge_and_unload()
    assert type(plain) is transformers.BertForSequenceClassification
    assert float((logits(plain) - tuned).abs().max()) < 1e-5


def test_fix_gauge_makes_sign_flipped_decompositions_equal():
    layer = MPOLinear.from_linear(torch.nn.Linear(24, 36), n=3)
    flipped = MPOLinear.from_linear(torch.nn.Linear(24, 36), n=3)
    with torch.no_grad():
        flipped.load_state_dict(layer.state_dict())
        signs = torch.tensor([(-1.0) ** k for k in range(layer.cores[0].shape[-1])])
        flipped.cores[0].mul_(signs)
        flipped.cores[1].mul_(signs.reshape(-1, 1, 1, 1))
    w = layer.weight.detach().clone()
    assert not torch.equal(layer.cores[0], flipped.cores[0])
    fix_gauge(layer)
    fix_gauge(flipped)
    for a, b in zip(layer.cores, flipped.cores):
        assert torch.allclose(a, b, atol=1e-7)
    assert torch.allclose(layer.weight, w, atol=1e-6)


def test_bad_input(tmp_path):
    with pytest.raises(ValueError, match="'qurey'"):
        get_lightweight_model(bert(), LightweightConfig(target_modules=["qurey"]))
    with pytest.raises(ValueError, match="train"):
        LightweightConfig(target_modules="query", train="centre")
    with pytest.raises(TypeError, match="target_modules"):
        LightweightConfig(target_modules=[])
    with pytest.raises(FileNotFoundError, match=CONFIG_NAME):
        LightweightModel.from_pretrained(bert(), tmp_path / "nothing")
    model = get_lightweight_model(bert(), LightweightConfig(**CONFIG))
    train(model, 2)
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="central core differs"):
        LightweightModel.from_pretrained(bert(seed=5), tmp_path)   # another checkpoint of the same architecture
    torch.manual_seed(0)
    distil = transformers.DistilBertModel(transformers.DistilBertConfig(dim=48, n_layers=2, n_heads=4, hidden_dim=96,
                                                                        vocab_size=V, max_position_embeddings=32))
    with pytest.raises(ValueError, match="query"):
        LightweightModel.from_pretrained(distil, tmp_path)          # another family
    with pytest.raises(ValueError, match="already holds MPOLinear"):
        get_lightweight_model(model.base_model, LightweightConfig(**CONFIG))


def test_save_mpo_model_is_all_or_nothing(tmp_path, monkeypatch):
    import safetensors.torch

    from mpo_core import compress
    from mpo_core.lightweight import load_mpo_model, save_mpo_model

    model = bert()
    compress(model, budget=0.5, include=["query", "value"])
    save_mpo_model(model, tmp_path / "ckpt")
    saved = sorted(os.listdir(tmp_path / "ckpt"))
    assert {"config.json", "model.safetensors", "mpo_layout.json"} <= set(saved)

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_model", disk_full)
    with pytest.raises(OSError, match="disk full"):
        save_mpo_model(model, tmp_path / "ckpt")
    assert sorted(os.listdir(tmp_path / "ckpt")) == saved and sorted(os.listdir(tmp_path)) == ["ckpt"]
    monkeypatch.undo()
    again = load_mpo_model(transformers.BertForSequenceClassification, tmp_path / "ckpt")
    assert float((logits(again) - logits(model)).abs().max()) < 1e-6
    with pytest.raises(ValueError, match="no MPOLinear"):
        save_mpo_model(bert(), tmp_path / "plain")
    assert not (tmp_path / "plain").exists()


def test_lightweight_cores_are_balanced_and_older_configs_keep_the_tt_svd_gauge():
    """New adapters start from balanced cores (comparable entries on both sides of every bond); a config saved
    before ``balance`` existed loads with the TT-SVD gauge, so its base checkpoint still matches."""
    from mpo_core.lightweight import LightweightConfig, get_lightweight_model

    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(48, 64))
    model = get_lightweight_model(copy.deepcopy(base), LightweightConfig(target_modules=["0"], n=3))
    layer = model.base_model[0]
    for k in range(layer.n - 1):
        left, right = layer.cores[k].detach(), layer.cores[k + 1].detach()
        a = left.reshape(-1, left.shape[-1]).pow(2).mean(0).sqrt()
        b = right.reshape(right.shape[0], -1).pow(2).mean(1).sqrt()
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-7)
    old = LightweightConfig(target_modules=["0"], n=3).to_dict()
    del old["balance"]
    assert LightweightConfig.from_dict(old).balance is False
    plain = get_lightweight_model(copy.deepcopy(base), LightweightConfig.from_dict(old)).base_model[0]
    rms = [float(c.detach().pow(2).mean().sqrt()) for c in plain.cores]
    assert max(rms) / min(rms) > 2.0  # the TT-SVD gauge: the last core carries the norm
