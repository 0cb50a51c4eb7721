"""MPOBERT as a transformers citizen: config aliases, Auto classes, safetensors round trip, pipelines, Trainer."""
from __future__ import annotations

import json

import pytest
import torch

from mpobert import MPOBertConfig, MPOBertForPreTraining, MPOBertModel

transformers = pytest.importorskip("transformers")
hf = pytest.importorskip("mpobert.hf")

WORDS = "the a list value name class function object module error type call return loop index key".split()
TINY = dict(vocab_size=5 + len(WORDS), embedding_size=16, hidden_size=32, num_layers=4, num_heads=4,
            intermediate_size=64, max_position_embeddings=32, num_groups=2, adapter_rank=2)


def _tokenizer():
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    return transformers.BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)


def _perturbed(model: torch.nn.Module) -> torch.nn.Module:
    """Move every parameter off its initial value (adapters' U starts at 0), so a round trip that
    re-initialized anything would show."""
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


def _inputs():
    ids = torch.tensor([[2, 6, 7, 8, 9, 3], [2, 10, 11, 3, 0, 0]])
    return ids, (ids != 0).long()


def test_config_accepts_transformers_names():
    a = MPOBertConfig(num_hidden_layers=6, num_attention_heads=8, hidden_size=64, intermediate_size=128,
                      hidden_dropout_prob=0.2, attention_probs_dropout_prob=0.3, hidden_act="gelu_pytorch_tanh")
    assert (a.num_layers, a.num_heads, a.hidden_dropout, a.attention_dropout) == (6, 8, 0.2, 0.3)
    assert (a.num_hidden_layers, a.num_attention_heads, a.hidden_dropout_prob) == (6, 8, 0.2)
    assert a.activation == MPOBertConfig(hidden_act="gelu_new").activation
    assert MPOBertConfig.from_dict({"num_hidden_layers": 6, "num_attention_heads": 8, "hidden_size": 64}).num_layers == 6
    with pytest.raises(ValueError, match="num_layers"):
        MPOBertConfig(num_layers=2, num_hidden_layers=3)
    c = hf.MPOBertHFConfig(num_hidden_layers=4, num_attention_heads=4, hidden_size=32, intermediate_size=64, num_groups=2)
    assert c.num_hidden_layers == 4 and c.num_layers == 4 and c.to_mpobert().num_groups == 2
    with pytest.raises(ValueError, match="num_groups"):
        hf.MPOBertHFConfig(num_hidden_layers=4, num_groups=3)


@pytest.mark.parametrize("cls, auto_name", [("MPOBertHFModel", "AutoModel"), ("MPOBertHFForMaskedLM", "AutoModelForMaskedLM")])
def test_save_and_auto_load_round_trip(tmp_path, cls, auto_name):
    hf.register()
    hf.register()  # idempotent
    torch.manual_seed(0)
    native = (MPOBertForPreTraining if cls.endswith("MaskedLM") else MPOBertModel)(MPOBertConfig(**TINY))
    model = getattr(hf, cls).from_mpobert(_perturbed(native)).eval()
    model.save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "config.json").read_text())
    assert saved["model_type"] == "mpobert" and saved["num_hidden_layers"] == 4 and saved["num_groups"] == 2
    assert (tmp_path / "model.safetensors").exists()
    assert transformers.AutoConfig.from_pretrained(tmp_path).to_mpobert() == native.config
    loaded = getattr(transformers, auto_name).from_pretrained(tmp_path).eval()
    assert type(loaded).__name__ == cls
    ids, mask = _inputs()
    with torch.no_grad():
        want, got = model(input_ids=ids, attention_mask=mask), loaded(input_ids=ids, attention_mask=mask)
    key = "logits" if cls.endswith("MaskedLM") else "last_hidden_state"
    torch.testing.assert_close(got[key], want[key], rtol=0, atol=0)
    # the sharing is restored: one central per group, the same parameter object in every layer of the group
    enc = loaded.native.base_model.encoder
    for l, layer in enumerate(enc.layers):
        lin = layer.mpo["q"]
        assert lin.cores[lin.central_index] is enc.groups[l // 2].central["q"]
    sa, sb = model.state_dict(), loaded.state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


def test_pipelines(tmp_path):
    hf.register()
    tok = _tokenizer()
    torch.manual_seed(0)
    model = hf.MPOBertHFForMaskedLM.from_mpobert(MPOBertForPreTraining(MPOBertConfig(**TINY))).eval()
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    fill = transformers.pipeline("fill-mask", model=str(tmp_path), tokenizer=str(tmp_path), device="cpu")
    preds = fill("the list [MASK] value", top_k=3)
    ids, _ = _inputs()
    enc = tok("the list [MASK] value", return_tensors="pt")
    with torch.no_grad():
        logits = model(**enc).logits[0, enc["input_ids"][0].tolist().index(tok.mask_token_id)]
    assert [p["token"] for p in preds] == logits.topk(3).indices.tolist()
    feats = transformers.pipeline("feature-extraction", model=str(tmp_path), tokenizer=str(tmp_path), device="cpu")
    out = torch.tensor(feats("the list value")[0])
    with torch.no_grad():
        ref = model.native.mpobert(**tok("the list value", return_tensors="pt")).last_hidden_state[0]
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-6)


def test_transformers_trainer_trains_it(tmp_path):
    hf.register()
    torch.manual_seed(0)
    model = hf.MPOBertHFForMaskedLM.from_mpobert(MPOBertForPreTraining(MPOBertConfig(**TINY)))
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(5, TINY["vocab_size"], (16, 8), generator=gen)
    labels = torch.where(torch.rand(ids.shape, generator=gen) < 0.3, ids, torch.full_like(ids, -100))
    data = [{"input_ids": i, "attention_mask": torch.ones_like(i), "labels": y} for i, y in zip(ids, labels)]
    before = {k: v.clone() for k, v in model.state_dict().items()}
    args = transformers.TrainingArguments(output_dir=str(tmp_path / "out"), per_device_train_batch_size=8, max_steps=3,
                                          learning_rate=1e-2, report_to=[], use_cpu=True, save_strategy="no",
                                          logging_steps=1)
    result = transformers.Trainer(model=model, args=args, train_dataset=data).train()
    assert result.global_step == 3 and torch.isfinite(torch.tensor(result.training_loss))
    central = "mpobert.encoder.groups.0.central.q"
    assert not torch.equal(before[central], model.state_dict()[central])
    enc = model.native.mpobert.encoder
    assert enc.layers[1].mpo["q"].cores[enc.layers[1].mpo["q"].central_index] is enc.groups[0].central["q"]
