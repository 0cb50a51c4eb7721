"""The training loop with the real tiny MPOBERT: exact resume, checkpoint errors, non-finite steps,
gradient accumulation, mixed precision, logging and evaluation."""
import importlib.util
import json
import os
import random

import pytest
import torch

from mpobert import MPOBertConfig, MPOBertForPreTraining, MPOBertForSequenceClassification
from mpobert.checkpoint import load_checkpoint, save_checkpoint
from mpobert.data import ExampleBatches, PretrainingStream, StreamBatches, split_sentences, train_wordpiece, write_corpus
from mpobert.evaluation import evaluate_pretraining
from mpobert.train import NonFiniteLossError, TrainConfig, Trainer, read_metrics

V = 60


def features(n=48, seed=0):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        length = rng.randint(4, 12)
        label = rng.randrange(3)
        out.append({"input_ids": [2] + [5 + label * 10 + rng.randrange(10) for _ in range(length)] + [3],
                    "token_type_ids": [0] * (length + 2), "labels": label})
    return out


def classifier(seed=0, dropout=0.1):
    torch.manual_seed(seed)
    return MPOBertForSequenceClassification(MPOBertConfig.tiny(
        vocab_size=V, num_labels=3, hidden_dropout=dropout, attention_dropout=dropout, classifier_dropout=dropout))


def run(tmp_path, name, model=None, batch_size=8, hooks=(), eval_fn=None, **cfg):
    model = model if model is not None else classifier()
    for module, hook in hooks:
        module.register_forward_hook(hook)
    batches = ExampleBatches(features(), batch_size, seed=1)
    settings = dict(output_dir=str(tmp_path / name), max_steps=6, optimizer="adamw", lr=3e-3, warmup_steps=2,
                    log_every=1, progress="none")
    settings.update(cfg)
    trainer = Trainer(model, batches, TrainConfig(**settings), eval_fn=eval_fn, fingerprint={"model": model.config.to_dict()})
    return trainer, trainer.train()


def same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    return all(torch.equal(sa[k], sb[k]) for k in sa)


class Boom(RuntimeError):
    pass


def raise_on_call(n):
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        if calls["n"] == n:
            raise Boom(f"injected failure at forward call {n}")
    return hook


# ---------------------------------------------------------------- exact resume
@pytest.mark.parametrize("optimizer, grad_accum", [("adamw", 1), ("lamb", 2)])
def test_resume_after_crash_matches_uninterrupted_run(tmp_path, optimizer, grad_accum):
    ref_model = classifier()
    run(tmp_path, "ref", ref_model, optimizer=optimizer, grad_accum=grad_accum)
    crashed = classifier()
    # checkpoint at step 4 (save_every=2); the forward call of step 5 raises
    with pytest.raises(Boom):
        run(tmp_path, "crash", crashed, optimizer=optimizer, grad_accum=grad_accum, save_every=2,
            hooks=[(crashed, raise_on_call(4 * grad_accum + 1))])
    assert load_checkpoint(tmp_path / "crash" / "checkpoint.pt")["step"] == 4
    resumed = classifier(seed=123)  # different init: everything must come from the checkpoint
    _, final = run(tmp_path, "crash", resumed, optimizer=optimizer, grad_accum=grad_accum, save_every=2, resume=True)
    assert final["resumed_from"] == 4 and final["steps"] == 6
    assert same_weights(resumed, ref_model)  # bitwise, dropout on (RNG restored)
    steps = [r["step"] for r in read_metrics(tmp_path / "crash" / "metrics.jsonl") if "loss" in r]
    assert steps == [1, 2, 3, 4, 5, 6]
    ref_losses = [r["loss"] for r in read_metrics(tmp_path / "ref" / "metrics.jsonl") if "loss" in r]
    losses = [r["loss"] for r in read_metrics(tmp_path / "crash" / "metrics.jsonl") if "loss" in r]
    assert losses == ref_losses


def test_pretraining_stream_resume_is_exact(tmp_path):
    texts = ["The if statement selects a suite. Its else clause runs otherwise. Nothing else happens.",
             "A for loop iterates over a sequence. The break statement ends it early."] * 6
    tok = train_wordpiece(texts, vocab_size=120, min_frequency=1)
    corpus = write_corpus([split_sentences(t) for t in texts], tmp_path / "c.txt")

    def go(name, seed=0, **kw):
        torch.manual_seed(seed)
        model = MPOBertForPreTraining(MPOBertConfig.tiny(vocab_size=tok.vocab_size, hidden_dropout=0.1))
        src = StreamBatches(PretrainingStream([corpus], tok, max_seq_len=24), batch_size=4)
        cfg = TrainConfig(output_dir=str(tmp_path / name), max_steps=5, optimizer="lamb", lr=1e-2, log_every=1,
                          progress="none", **kw)
        return model, Trainer(model, src, cfg)

    ref, t = go("ref")
    t.train()
    model, t = go("cut", save_every=3)
    model.register_forward_hook(raise_on_call(4))
    with pytest.raises(Boom):
        t.train()
    model, t = go("cut", seed=7, save_every=3, resume=True)
    t.train()
    assert same_weights(model, ref)
    assert t.batches.state_dict() == load_checkpoint(tmp_path / "ref" / "checkpoint.pt")["data"]


# ---------------------------------------------------------------- checkpoint errors
def test_corrupt_or_mismatched_checkpoint_is_a_clear_error(tmp_path):
    run(tmp_path, "a", max_steps=2)
    path = tmp_path / "a" / "checkpoint.pt"
    good = path.read_bytes()
    with pytest.raises(ValueError, match=r"lr: checkpoint 0.003 vs now 0.01"):
        run(tmp_path, "a", max_steps=2, lr=1e-2, resume=True)
    with pytest.raises(ValueError, match="model: checkpoint"):
        other = MPOBertForSequenceClassification(MPOBertConfig.tiny(vocab_size=V, num_labels=3, adapter_rank=3))
        run(tmp_path, "a", other, max_steps=2, resume=True)
    path.write_bytes(good[: len(good) // 2])
    with pytest.raises(ValueError, match="corrupt or unreadable"):
        run(tmp_path, "a", max_steps=2, resume=True)
    torch.save({"weights": torch.zeros(2)}, path)
    with pytest.raises(ValueError, match="not an MPOBERT training checkpoint"):
        run(tmp_path, "a", max_steps=2, resume=True)
    # same fingerprint but a differently shaped model: the state itself does not fit
    path.write_bytes(good)
    ckpt = load_checkpoint(path)
    ckpt["model"] = {k: v[..., :1] if v.dim() else v for k, v in ckpt["model"].items()}
    save_checkpoint(path, {k: v for k, v in ckpt.items() if k not in ("format", "version")})
    with pytest.raises(ValueError, match="does not match this model"):
        run(tmp_path, "a", max_steps=2, resume=True)


def test_checkpoint_write_is_atomic(tmp_path):
    run(tmp_path, "a", max_steps=2)
    path = tmp_path / "a" / "checkpoint.pt"
    before = path.read_bytes()
    state = {k: v for k, v in load_checkpoint(path).items() if k not in ("format", "version")}
    state["data"] = {"unpicklable": lambda: 0}  # torch.save fails half-way
    with pytest.raises(Exception):
        save_checkpoint(path, state)
    assert path.read_bytes() == before
    assert sorted(os.listdir(tmp_path / "a")) == ["checkpoint.pt", "final_metrics.json", "metrics.jsonl"]
    with pytest.raises(ValueError, match="lacks"):
        save_checkpoint(path, {"step": 1})


# ---------------------------------------------------------------- non-finite steps
def nan_from_call(first, last=10**9):
    calls = {"n": 0}

    def hook(module, args, output):
        calls["n"] += 1
        return output * float("nan") if first <= calls["n"] <= last else output
    return hook


def test_transient_nan_step_is_skipped_and_counted(tmp_path):
    model = classifier(dropout=0.0)
    _, final = run(tmp_path, "nan", model, hooks=[(model.mpobert.embeddings, nan_from_call(3, 3))])
    assert final["skipped_steps"] == 1 and final["steps"] == 6
    recs = read_metrics(tmp_path / "nan" / "metrics.jsonl")
    assert [r["step"] for r in recs if r.get("skipped_nonfinite")] == [3]
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_persistent_nan_stops_after_k_in_a_row_without_touching_weights(tmp_path):
    ref = classifier(dropout=0.0)
    with pytest.raises(Boom):
        run(tmp_path, "ref", ref, save_every=1, hooks=[(ref, raise_on_call(2))])  # keeps the state after step 1
    model = classifier(dropout=0.0)
    with pytest.raises(NonFiniteLossError, match="3 consecutive steps with a non-finite loss"):
        run(tmp_path, "nan", model, max_nonfinite=3, hooks=[(model.mpobert.embeddings, nan_from_call(2))])
    after_step1 = classifier(seed=5, dropout=0.0)
    after_step1.load_state_dict(load_checkpoint(tmp_path / "ref" / "checkpoint.pt")["model"])
    assert same_weights(model, after_step1)  # the skipped steps changed nothing


# ---------------------------------------------------------------- accumulation, precision, logging
def test_gradient_accumulation_matches_full_batch(tmp_path):
    full, accum = classifier(dropout=0.0), classifier(dropout=0.0)
    run(tmp_path, "full", full, batch_size=8, max_steps=3)
    run(tmp_path, "accum", accum, batch_size=4, grad_accum=2, max_steps=3)
    # The key bias gets an exactly-zero true gradient (softmax ignores a per-query constant), so
    # AdamW turns its ~1e-9 rounding noise into full-size updates: it is excluded. Every other
    # tensor agrees to 1e-6 (measured ~1e-7: fp32 summation order differs).
    for (k, a), b in zip(full.state_dict().items(), accum.state_dict().values()):
        if not k.endswith("bias.k"):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=k)
    losses = [[r["loss"] for r in read_metrics(tmp_path / n / "metrics.jsonl")] for n in ("full", "accum")]
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)


def test_bf16_autocast_trains_and_fp16_needs_cuda(tmp_path):
    model = classifier(dropout=0.0)
    _, final = run(tmp_path, "bf16", model, precision="bf16", max_steps=4)
    assert final["skipped_steps"] == 0 and all(torch.isfinite(p).all() for p in model.parameters())
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="fp16"):
            run(tmp_path, "fp16", precision="fp16")


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_fp16_grad_scaler_on_gpu(tmp_path):
    model = classifier(dropout=0.0)
    trainer, final = run(tmp_path, "fp16", model, precision="fp16", max_steps=6, device="cuda")
    assert trainer.scaler is not None and final["steps"] == 6
    assert all(torch.isfinite(p).all() for p in model.parameters())
    ckpt = load_checkpoint(tmp_path / "fp16" / "checkpoint.pt")
    assert ckpt["scaler"]["scale"] > 0


def test_logging_progress_eval_and_schedule(tmp_path, capsys):
    evals = []

    def eval_fn(m):
        evals.append(m.training)
        return {"score": 1.0}

    _, final = run(tmp_path, "log", progress="plain", log_every=2, eval_every=2, eval_fn=eval_fn, warmup_steps=2)
    out = capsys.readouterr().out
    assert [ln.split()[1] for ln in out.splitlines() if ln.startswith("step ")] == ["2/6", "4/6", "6/6"]
    assert "tok/s" in out and "ETA" in out
    recs = read_metrics(tmp_path / "log" / "metrics.jsonl")
    train_recs = [r for r in recs if "loss" in r]
    assert [r["step"] for r in train_recs] == [2, 4, 6]
    assert all(r["tokens_per_s"] > 0 for r in train_recs)
    # lr of the step taken: warmup 0 -> 1.5e-3 -> 3e-3, then linear decay over steps 3..6
    assert [r["lr"] for r in train_recs] == pytest.approx([1.5e-3, 3e-3 * 3 / 4, 3e-3 * 1 / 4])
    assert [r["step"] for r in recs if "eval" in r] == [2, 4, 6]
    assert evals == [False] * 3  # evaluated in eval mode
    assert final["eval"] == {"score": 1.0}
    saved = json.loads((tmp_path / "log" / "final_metrics.json").read_text())
    assert saved["steps"] == 6 and saved["loss_first"] > 0


def test_tqdm_progress(tmp_path, capsys):
    if importlib.util.find_spec("tqdm"):
        run(tmp_path, "bar", progress="tqdm", max_steps=2)
        assert "loss" in capsys.readouterr().err
    else:
        with pytest.raises(ValueError, match="tqdm is not installed"):
            run(tmp_path, "bar", progress="tqdm", max_steps=2)


def test_pretraining_evaluation_metrics(tmp_path):
    texts = ["Alpha beta gamma. Delta epsilon zeta."] * 8
    tok = train_wordpiece(texts, vocab_size=70, min_frequency=1)
    corpus = write_corpus([split_sentences(t) for t in texts], tmp_path / "c.txt")
    model = MPOBertForPreTraining(MPOBertConfig.tiny(vocab_size=tok.vocab_size))
    batches = list(StreamBatches(PretrainingStream([corpus], tok, max_seq_len=16, loop=False), batch_size=4))
    m = evaluate_pretraining(model, batches)
    assert set(m) == {"loss", "mlm_accuracy", "sop_accuracy"} and 0 <= m["mlm_accuracy"] <= 1 and m["loss"] > 0


@pytest.mark.parametrize("kwargs, match", [
    (dict(max_steps=0), "max_steps"), (dict(grad_accum=0), "grad_accum"), (dict(precision="fp8"), "precision"),
    (dict(warmup_steps=10, max_steps=5), "warmup_steps"), (dict(lr=0.0), "lr"), (dict(optimizer="sgd"), "optimizer"),
    (dict(progress="fancy"), "progress"), (dict(max_grad_norm=-1.0), "max_grad_norm"),
])
def test_train_config_validation(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


def test_trainer_rejects_bad_arguments(tmp_path):
    with pytest.raises(TypeError, match="model"):
        Trainer("model", ExampleBatches(features(), 8), TrainConfig(output_dir=str(tmp_path)))
    with pytest.raises(TypeError, match="batch source"):
        Trainer(classifier(), [1, 2], TrainConfig(output_dir=str(tmp_path)))


def test_on_step_hook_extra_metrics_and_loss_curve(tmp_path):
    model = classifier()
    seen = []

    def on_step(trainer):
        seen.append((trainer.step, trainer.optimizer.param_groups[0]["lr"]))

    trainer = Trainer(model, ExampleBatches(features(), 8, seed=1),
                      TrainConfig(output_dir=str(tmp_path), max_steps=4, optimizer="adamw", lr=1e-3, log_every=1, progress="none"),
                      on_step=on_step)
    final = trainer.train(extra_metrics={"baseline": {"accuracy": 0.5}})
    assert [s for s, _ in seen] == [1, 2, 3, 4]  # after every optimizer step, the scheduler already stepped
    assert [lr for _, lr in seen] == pytest.approx([1e-3 * 3 / 4, 1e-3 * 2 / 4, 1e-3 * 1 / 4, 0.0])
    saved = json.loads((tmp_path / "final_metrics.json").read_text())
    assert saved["baseline"] == {"accuracy": 0.5} == final["baseline"]
    logged = [(r["step"], r["loss"]) for r in read_metrics(tmp_path / "metrics.jsonl") if "loss" in r]
    assert [tuple(p) for p in saved["loss_curve"]] == [logged[i] for i in (0, 1, 2, 3)]


@pytest.mark.parametrize("grad_accum, cached", [(1, False), (2, True)])
def test_weight_cache_only_where_it_saves_rebuilds(tmp_path, monkeypatch, grad_accum, cached):
    """One micro-batch in one process: the encoder's forward_weights builds every W (no weight_cache);
    several: weight_cache builds them once for all (test_gradient_accumulation_matches_full_batch checks
    the two give the same training)."""
    import mpobert.train as train_module

    calls = []
    real = train_module.weight_cache

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(train_module, "weight_cache", spy)
    run(tmp_path, "run", grad_accum=grad_accum, batch_size=4, max_steps=2)
    assert len(calls) == (2 if cached else 0)
