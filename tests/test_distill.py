"""Distillation of a Hugging Face teacher into its MPOBERT conversion (tiny random teachers, tokenizers built here)."""
from __future__ import annotations

import copy
import json

import pytest
import torch

from mpobert.data import StreamBatches
from mpobert.distill import (
    DistillLoss, Distiller, TextStream, convert_student, evaluate_distillation, format_comparison,
    heldout_batches, load_teacher, teacher_layer_list,
)
from mpobert.train import TrainConfig, Trainer

transformers = pytest.importorskip("transformers")

WORDS = ("the a list tuple value name class function object module error type call return loop index key "
         "string number file line text word data item set map order first last new old big small").split()
SMALL = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64, max_position_embeddings=64,
             hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0, initializer_range=0.2)


def _tokenizer(path):
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, ".", ","]
    return transformers.BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)


def _teacher_dir(tmp_path_factory, name, cls, seed, **extra):
    path = tmp_path_factory.mktemp(name)
    tok = _tokenizer(path)
    torch.manual_seed(seed)
    cfg = transformers.BertConfig(vocab_size=len(tok), **{**SMALL, **extra})
    cls(cfg).eval().save_pretrained(path)
    tok.save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def mlm_teacher(tmp_path_factory):
    return _teacher_dir(tmp_path_factory, "bert_mlm", transformers.BertForMaskedLM, 0)


@pytest.fixture(scope="module")
def base_teacher(tmp_path_factory):
    return _teacher_dir(tmp_path_factory, "bert_base", transformers.BertModel, 1)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    rng = torch.Generator().manual_seed(0)
    docs = []
    for _ in range(40):
        lines = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(n),), generator=rng)) + " ."
                 for n in torch.randint(3, 12, (3,), generator=rng)]
        docs.append("\n".join(lines))
    path = tmp_path_factory.mktemp("corpus") / "corpus.txt"
    path.write_text("\n\n".join(docs) + "\n", encoding="utf-8")
    return path


def test_text_stream_split_and_resume(mlm_teacher, corpus):
    tok = load_teacher(mlm_teacher).tokenizer
    train = TextStream([corpus], tok, max_seq_len=16, split="train", holdout_every=5, loop=False)
    held = TextStream([corpus], tok, max_seq_len=16, split="heldout", holdout_every=5, loop=False)
    train_items, held_items = [x["input_ids"] for x in train], [x["input_ids"] for x in held]
    assert train_items and held_items
    assert all(len(x) <= 16 and x[0] == tok.cls_token_id and x[-1] == tok.sep_token_id for x in train_items + held_items)
    every = TextStream([corpus], tok, max_seq_len=16, split="train", holdout_every=0, loop=False)
    assert sorted(map(tuple, [x["input_ids"] for x in every])) == sorted(map(tuple, train_items + held_items))
    # resume: the position after k items continues with item k
    s = TextStream([corpus], tok, max_seq_len=16, split="train", holdout_every=5, loop=True)
    it = iter(s)
    for _ in range(7):
        next(it)
    state = s.state_dict()
    expected = [next(it)["input_ids"] for _ in range(len(train_items))]  # crosses the epoch boundary
    s2 = TextStream([corpus], tok, max_seq_len=16, split="train", holdout_every=5, loop=True)
    s2.load_state_dict(state)
    it2 = iter(s2)
    assert [next(it2)["input_ids"] for _ in range(len(expected))] == expected


def test_layer_spec():
    assert teacher_layer_list("all", 4) == [1, 2, 3, 4]
    assert teacher_layer_list("last", 4) == [4]
    assert teacher_layer_list("0,2", 4) == [0, 2]
    with pytest.raises(ValueError, match="outside"):
        teacher_layer_list("5", 4)
    with pytest.raises(ValueError, match="comma-separated"):
        teacher_layer_list("two", 4)


@pytest.mark.parametrize("teacher_input_steps", [0, 1])
def test_exact_student_has_zero_loss(mlm_teacher, corpus, teacher_input_steps):
    """One group per layer, no adapters: the conversion is exact, so every loss term vanishes,
    the cosine is 1 and the MLM predictions agree (checks layer matching, attention probabilities,
    the copied MLM head and the metrics against an independent reference: the teacher itself)."""
    teacher = load_teacher(mlm_teacher, attentions=True)
    student = convert_student(teacher, num_groups=2, adapter_rank=0)
    loss = DistillLoss(hidden_weight=1, hidden_layers="0,1,2", cosine_weight=1, attention_weight=1, logits_weight=1,
                       teacher_input_steps=teacher_input_steps)
    model = Distiller(student, teacher, loss).train(bool(teacher_input_steps))  # local (teacher inputs) in training
    batch = next(iter(StreamBatches(TextStream([corpus], teacher.tokenizer, 24), 4, pad_id=teacher.tokenizer.pad_token_id)))
    out = model(**batch)
    assert set(out.terms) == {"hidden", "cosine", "attention", "logits"}
    assert all(abs(v) < 1e-5 for v in out.terms.values()), out.terms
    held = heldout_batches(TextStream([corpus], teacher.tokenizer, 24, split="heldout", holdout_every=4, loop=False), 4, 16, 0)
    metrics = evaluate_distillation(student, teacher, held)
    assert metrics["sentence_cosine"] > 1 - 1e-5
    assert max(metrics["layer_rel_error"]) < 1e-4
    assert metrics["mlm_agreement"] == 1.0
    assert metrics["mlm_accuracy_student"] == metrics["mlm_accuracy_teacher"]


def test_distillation_improves_shared_student(mlm_teacher, corpus, tmp_path):
    """One shared central for both layers: the conversion is lossy; a short distillation with the
    Trainer brings the held-out cosine up and every layer's error down, and resumes exactly."""
    teacher = load_teacher(mlm_teacher)
    torch.manual_seed(0)
    student = convert_student(teacher, num_groups=1, adapter_rank=2)
    tok = teacher.tokenizer
    held = heldout_batches(TextStream([corpus], tok, 24, split="heldout", holdout_every=4, loop=False), 8, 32, tok.pad_token_id)
    before = evaluate_distillation(student, teacher, held)
    model = Distiller(student, teacher, DistillLoss(logits_weight=1.0, teacher_input_steps=20))
    batches = StreamBatches(TextStream([corpus], tok, 24, holdout_every=4), 8, pad_id=tok.pad_token_id)
    cfg = TrainConfig(output_dir=str(tmp_path / "run"), max_steps=40, optimizer="adamw", lr=3e-3, weight_decay=0.0,
                      progress="none", device="cpu", log_every=10)
    Trainer(model, batches, cfg).train()
    assert int(model.teacher_input_steps_done) == 40  # 20 layer-local steps, then 20 end to end
    after = evaluate_distillation(student, teacher, held)
    assert after["sentence_cosine"] > before["sentence_cosine"] + 0.02, (before, after)
    assert all(a < b for a, b in zip(after["layer_rel_error"][1:], before["layer_rel_error"][1:])), (before, after)
    assert after["mlm_agreement"] >= before["mlm_agreement"]
    table = format_comparison(before, after, student.parameter_report().total, teacher.num_params)
    assert "sentence-embedding cosine" in table and "layer 2" in table and "MLM top-1 agreement" in table


def test_distill_resume_matches_uninterrupted(base_teacher, corpus, tmp_path):
    """Crash after the step-3 checkpoint, resume: the student equals an uninterrupted run's bitwise;
    checkpoints hold the student only."""
    teacher = load_teacher(base_teacher)
    tok = teacher.tokenizer
    base = convert_student(teacher, adapter_rank=0)

    def trainer(name, resume=False, hook=None):
        student = copy.deepcopy(base)
        if hook is not None:
            student.register_forward_hook(hook)
        batches = StreamBatches(TextStream([corpus], tok, 16, holdout_every=4), 4, pad_id=tok.pad_token_id)
        cfg = TrainConfig(output_dir=str(tmp_path / name), max_steps=6, optimizer="adamw", lr=1e-3, progress="none",
                          device="cpu", resume=resume, save_every=3)
        return student, Trainer(Distiller(student, teacher, DistillLoss()), batches, cfg)

    ref, t = trainer("ref")
    t.train()
    calls = {"n": 0}

    def boom(module, args, output):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("injected failure at step 4")

    _, t = trainer("cut", hook=boom)
    with pytest.raises(RuntimeError, match="injected"):
        t.train()
    resumed, t = trainer("cut", resume=True)
    final = t.train()
    assert final["resumed_from"] == 3
    sa, sb = ref.state_dict(), resumed.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa)
    ckpt = torch.load(tmp_path / "ref" / "checkpoint.pt", weights_only=False)
    assert all(k.startswith("student.") for k in ckpt["model"] if k != "teacher_input_steps_done")  # never the teacher


def test_bad_input(tmp_path, base_teacher, mlm_teacher):
    with pytest.raises(ValueError, match="not a directory"):
        load_teacher(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no config.json"):
        load_teacher(tmp_path / "empty")
    gpt = tmp_path / "gpt2"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}), encoding="utf-8")
    with pytest.raises(ValueError, match=r"model_type='gpt2'; expected one of \['bert', 'albert', 'roberta'\]"):
        load_teacher(gpt)
    teacher = load_teacher(base_teacher)
    other = _teacher_dir_vocab(tmp_path, extra_words=7)
    student = convert_student(load_teacher(other), adapter_rank=0)
    with pytest.raises(ValueError, match="vocabulary mismatch"):
        Distiller(student, teacher, DistillLoss())
    with pytest.raises(ValueError, match="MLM head"):
        Distiller(convert_student(teacher, adapter_rank=0), teacher, DistillLoss(logits_weight=1.0))
    with pytest.raises(ValueError, match="at least one"):
        DistillLoss(hidden_weight=0, cosine_weight=0)
    with pytest.raises(ValueError, match="hidden_weight"):
        DistillLoss(hidden_weight=-1)


def _teacher_dir_vocab(tmp_path, extra_words: int):
    path = tmp_path / "bigger_vocab"
    path.mkdir()
    vocab = _tokenizer(path).get_vocab()
    tok = transformers.BertTokenizer(vocab={**vocab, **{f"extra{i}": len(vocab) + i for i in range(extra_words)}})
    torch.manual_seed(2)
    transformers.BertModel(transformers.BertConfig(vocab_size=len(tok), **SMALL)).save_pretrained(path)
    tok.save_pretrained(path)
    return path


def test_transformers_student_runs_its_layers_on_given_inputs(mlm_teacher, corpus):
    """Layer-local matching for any transformers encoder: fed its own hidden states it reproduces them; fed
    other states, layer i's output is layer i run directly on them (the model's own mask); hooks are removed."""
    from mpobert.distill import as_student

    tok = load_teacher(mlm_teacher).tokenizer
    batch = heldout_batches(TextStream([corpus], tok, 24, split="heldout", holdout_every=4, loop=False), 8, 8,
                            tok.pad_token_id)[0]
    assert bool((batch["attention_mask"] == 0).any())  # padding: the mask matters
    model = transformers.BertForMaskedLM.from_pretrained(mlm_teacher, attn_implementation="eager")
    view = as_student(model)
    assert view.supports_layer_inputs
    states = [s.detach() for s in view.hidden_states(batch)]
    own = view.layer_states(batch, states[:-1], embeddings=True)
    assert len(own) == len(states) and all(torch.allclose(a, b, atol=1e-5) for a, b in zip(own, states))
    torch.manual_seed(0)
    other = [torch.randn_like(s) for s in states[:-1]]
    got = view.layer_states(batch, other, embeddings=False)
    assert got[0] is other[0]
    mask = (1.0 - batch["attention_mask"][:, None, None, :].float()) * torch.finfo(torch.float32).min  # eager: additive
    for i, layer in enumerate(model.bert.encoder.layer):
        out = layer(other[i], mask)
        assert torch.allclose(got[i + 1], out[0] if isinstance(out, tuple) else out, atol=1e-5), i
    assert all(torch.equal(a, b) for a, b in zip(view.hidden_states(batch), states))
    with pytest.raises(ValueError, match="one hidden state per layer"):
        view.layer_states(batch, other[:1], embeddings=False)


def test_transformers_student_matches_and_heals(mlm_teacher, corpus, tmp_path):
    """Any transformers model is a student (the healing path): a copy of the teacher has zero loss and
    agrees exactly; the same model with MPO-factorized linears (lossy) gets closer to the teacher by training."""
    from mpo_core.nn import mpo_ify, set_trainable
    from mpobert.distill import HFStudent, Teacher, as_student

    teacher = load_teacher(mlm_teacher)
    tok = teacher.tokenizer
    held = heldout_batches(TextStream([corpus], tok, 24, split="heldout", holdout_every=4, loop=False), 8, 32, tok.pad_token_id)
    same = transformers.BertForMaskedLM.from_pretrained(mlm_teacher)
    assert isinstance(as_student(same), HFStudent)
    out = Distiller(same, teacher, DistillLoss(logits_weight=1.0))(**held[0])
    assert set(out.terms) == {"hidden", "cosine", "logits"} and all(abs(v) < 1e-5 for v in out.terms.values()), out.terms
    local = Distiller(same, teacher, DistillLoss(teacher_input_steps=1)).train()(**held[0])  # layer-local step
    assert all(abs(v) < 1e-5 for v in local.terms.values()), local.terms
    same.eval()
    metrics = evaluate_distillation(same, teacher, held)
    assert metrics["sentence_cosine"] > 1 - 1e-5 and max(metrics["layer_rel_error"]) < 1e-4
    assert metrics["mlm_agreement"] == 1.0

    wrapped = Teacher.wrap(copy.deepcopy(same), tok)  # an in-memory original as the teacher
    assert (wrapped.has_mlm, wrapped.num_layers, wrapped.family) == (True, 2, "bert")
    torch.manual_seed(0)
    mpo_ify(same, include=["*.intermediate.dense", "*.output.dense"], n=3, max_bond=4)
    set_trainable(same, "auxiliary")
    before = evaluate_distillation(same, wrapped, held)
    with pytest.raises(ValueError, match="attention probabilities"):
        Distiller(same, wrapped, DistillLoss(attention_weight=1.0))
    model = Distiller(same, wrapped, DistillLoss())
    batches = StreamBatches(TextStream([corpus], tok, 24, holdout_every=4), 8, pad_id=tok.pad_token_id)
    cfg = TrainConfig(output_dir=str(tmp_path / "heal"), max_steps=20, optimizer="adamw", lr=3e-3, weight_decay=0.0,
                      progress="none", device="cpu", log_every=10)
    Trainer(model, batches, cfg).train()
    after = evaluate_distillation(same, wrapped, held)
    assert after["layer_rel_error"][-1] < before["layer_rel_error"][-1], (before, after)


# ---------------------------------------------------------------------------- command line
def test_distill_command(mlm_teacher, corpus, tmp_path, capsys):
    from mpobert import MPOBertForPreTraining
    from mpobert.cli import main

    out = tmp_path / "run"
    args = ["distill", "--teacher", str(mlm_teacher), "--corpus", str(corpus), "--output-dir", str(out),
            "--max-steps", "4", "--batch-size", "4", "--max-seq-len", "16", "--eval-sequences", "8", "--holdout-every", "4",
            "--teacher-input-steps", "2", "--logits-weight", "0.5", "--warmup-steps", "1", "--unshare-biases-norms", "--progress", "none",
            "--device", "cpu"]
    assert main(args) == 0
    printed = capsys.readouterr().out
    assert "sentence-embedding cosine (mean)" in printed and "MLM top-1 agreement" in printed
    report = json.loads((out / "distill_report.json").read_text())
    assert report["train"]["steps"] == 4 and report["before"]["sequences"] == 8
    assert report["student"]["params"] > report["student"]["trainable"] > 0 and report["teacher"]["params"] > 0
    assert report["loss"]["teacher_input_steps"] == 2 and report["student"]["config"]["share_biases_norms"] is False
    assert len(report["after"]["layer_rel_error"]) == 3
    student = MPOBertForPreTraining.from_pretrained(out / "model")
    assert (out / "model" / "tokenizer_config.json").exists() and student.config.vocab_size == report["student"]["config"]["vocab_size"]
    assert main([*args, "--resume"]) == 0  # resumes at step 4 of 4: nothing left to train, the report again
    assert json.loads((out / "distill_report.json").read_text())["train"]["resumed_from"] == 4


def test_distill_command_bad_input_writes_nothing(mlm_teacher, corpus, tmp_path, capsys):
    from mpobert.cli import main

    gpt = tmp_path / "gpt2"
    gpt.mkdir()
    (gpt / "config.json").write_text(json.dumps({"model_type": "gpt2"}), encoding="utf-8")
    for teacher, extra, message in ((gpt, [], "expected one of"), (tmp_path / "none", [], "not a directory"),
                                    (mlm_teacher, ["--corpus", str(tmp_path / "nope.txt")], "do not exist")):
        out = tmp_path / "out"
        assert main(["distill", "--teacher", str(teacher), "--output-dir", str(out), *extra]) == 2
        assert message in capsys.readouterr().err
        assert not out.exists()


def test_convert_prints_and_writes_init_errors(base_teacher, tmp_path, capsys):
    from mpobert.cli import main

    out = tmp_path / "mpo"
    assert main(["convert", "--from", "bert", "--input", str(base_teacher), "--output", str(out), "--head", "base"]) == 0
    printed = capsys.readouterr().out
    assert "relative Frobenius errors" in printed and "biases" in printed and "LNs" in printed
    rows = json.loads((out / "init_report.json").read_text())["rows"]
    assert {(r["layer"], r["tensor"]) for r in rows} >= {(1, "ffn_out"), (0, "q.bias"), (1, "ffn_ln.bias")}
    bad = tmp_path / "bad"
    assert main(["convert", "--from", "roberta", "--input", str(base_teacher), "--output", str(bad)]) == 2
    assert "is a bert checkpoint" in capsys.readouterr().err and not bad.exists()
    # the converted directory as the student of a distillation (--student instead of converting again)
    run = tmp_path / "run"
    corpus = tmp_path / "c.txt"
    corpus.write_text("the list value .\nthe class name .\n\na key error .\nan index loop .\n", encoding="utf-8")
    assert main(["distill", "--teacher", str(base_teacher), "--student", str(out), "--corpus", str(corpus),
                 "--output-dir", str(run), "--max-steps", "1", "--warmup-steps", "0", "--batch-size", "1",
                 "--holdout-every", "2", "--progress", "none", "--device", "cpu"]) == 0
    report = json.loads((run / "distill_report.json").read_text())
    assert report["student"]["config"] == json.loads((out / "config.json").read_text()) and report["train"]["steps"] == 1
    assert report["before"]["layer_rel_error"][0] < 1e-6  # embeddings copied exactly by the conversion


@pytest.mark.slow
def test_distill_under_torchrun(mlm_teacher, corpus, tmp_path):
    """Two gloo ranks: every trainable tensor gets a gradient (frozen heads, no unused-parameter
    error), the ranks stay in step and rank 0 writes the report."""
    import os
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(root)}
    out = tmp_path / "ddp"
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "mpobert", "distill", "--teacher", str(mlm_teacher), "--corpus", str(corpus),
                          "--output-dir", str(out), "--max-steps", "3", "--warmup-steps", "1", "--batch-size", "2",
                          "--max-seq-len", "16", "--eval-sequences", "8", "--holdout-every", "4", "--teacher-input-steps", "1",
                          "--logits-weight", "0.5", "--progress", "none", "--device", "cpu"],
                         cwd=root, env=env, capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout + run.stderr
    report = json.loads((out / "distill_report.json").read_text())
    assert report["train"]["steps"] == 3
    assert json.loads((out / "final_metrics.json").read_text())["world_size"] == 2
