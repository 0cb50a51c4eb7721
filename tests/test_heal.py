"""Healing: a transformers checkpoint compressed, then trained back toward the original (tiny random teachers)."""
from __future__ import annotations

import json

import pytest
import torch

from mpo_core.lightweight import load_mpo_model
from mpo_core.nn import MPOLinear
from mpobert.distill.heal import HealConfig, heal, heal_trainable
from mpobert.train import TrainConfig

transformers = pytest.importorskip("transformers")

WORDS = ("the a list tuple value name class function object module error type call return loop index key "
         "string number file line text word data item set map order first last new old big small").split()


def _teacher(path, cls=None, seed=0):
    cls = cls or transformers.BertForMaskedLM
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, ".", ","]
    tok = transformers.BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                  intermediate_size=64, max_position_embeddings=64)
    cls(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = torch.Generator().manual_seed(0)
    docs = []
    for _ in range(60):
        lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(n),), generator=rng)) + " ."
                 for n in torch.randint(4, 14, (3,), generator=rng)]
        docs.append("\n".join(lines))
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def _cfg(teacher, corpus, out, **kw):
    train = TrainConfig(output_dir=str(out), max_steps=kw.pop("max_steps", 12), lr=kw.pop("lr", 1e-3), optimizer="adamw",
                        weight_decay=0.0, warmup_steps=1, log_every=100, progress="none")
    return HealConfig(teacher=str(teacher), corpus=[str(corpus)], batch_size=8, max_seq_len=24, eval_sequences=16,
                      calibration_sequences=16, holdout_every=5, train=train, **kw)


def test_heal_improves_the_compressed_model_and_exports_both_checkpoints(tmp_path, corpus):
    teacher = _teacher(tmp_path / "teacher")
    report = heal(_cfg(teacher, corpus, tmp_path / "out", budget=0.35, max_steps=40))
    assert report["compression"]["params"] <= int(0.35 * report["compression"]["dense_params"])
    before, after = report["before"], report["after"]
    assert after["layer_rel_error"][-1] < 0.9 * before["layer_rel_error"][-1]
    assert after["sentence_cosine"] >= before["sentence_cosine"] - 1e-6
    assert json.loads((tmp_path / "out" / "heal_report.json").read_text())["after"] == after
    # the MPO checkpoint loads back bitwise; the merged one is a plain transformers checkpoint
    mpo = load_mpo_model(transformers.BertForMaskedLM, tmp_path / "out" / "mpo")
    assert any(isinstance(m, MPOLinear) for m in mpo.modules())
    merged = transformers.BertForMaskedLM.from_pretrained(tmp_path / "out" / "merged").eval()
    assert not any(isinstance(m, MPOLinear) for m in merged.modules())
    ids = torch.randint(5, 30, (2, 10))
    with torch.no_grad():
        a = mpo.eval()(input_ids=ids).logits
        b = merged(input_ids=ids).logits
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert report["merge_max_relative_change"] < 1e-5


def test_heal_auxiliary_keeps_centrals_frozen():
    model = transformers.BertModel(transformers.BertConfig(vocab_size=40, hidden_size=32, num_hidden_layers=1,
                                                           num_attention_heads=4, intermediate_size=64))
    from mpo_core.compress import compress
    compress(model, budget=0.6, include=["query", "intermediate.dense"], n=5)
    heal_trainable(model, "auxiliary")
    layers = [m for m in model.modules() if isinstance(m, MPOLinear)]
    assert layers
    for layer in layers:
        for k, core in enumerate(layer.cores):
            assert core.requires_grad == (k != layer.central_index)
    assert not model.embeddings.word_embeddings.weight.requires_grad
    assert model.encoder.layer[0].attention.self.key.bias.requires_grad
    assert not model.encoder.layer[0].attention.self.key.weight.requires_grad
    with pytest.raises(ValueError, match="train_cores"):
        heal_trainable(model, "centrals")


def test_heal_rejects_bad_input_before_writing(tmp_path, corpus):
    teacher = _teacher(tmp_path / "teacher")
    out = tmp_path / "out"
    with pytest.raises(ValueError, match="do not exist"):
        heal(_cfg(teacher, tmp_path / "missing.txt", out))
    with pytest.raises(ValueError, match="cannot be met"):
        heal(_cfg(teacher, corpus, out, budget=0.001))
    with pytest.raises(ValueError, match="n must be"):
        heal(_cfg(teacher, corpus, out, n="one"))
    with pytest.raises(ValueError, match="budget must be"):
        heal(_cfg(teacher, corpus, out, budget=1.5))
    gpt = tmp_path / "gpt2"
    transformers.GPT2Model(transformers.GPT2Config(n_layer=1, n_embd=16, n_head=2, vocab_size=50)).save_pretrained(gpt)
    with pytest.raises(ValueError, match="model_type"):
        heal(_cfg(gpt, corpus, out))
    assert not out.exists()
