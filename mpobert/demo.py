"""``python -m mpobert demo``: compress-and-heal of a model the demo trains itself, on bundled data, CPU-sized.

:func:`demo` (:class:`DemoConfig`) trains a WordPiece vocabulary and a small BERT classifier
(``transformers``) on the bundled pydoc-topics task, then compresses its encoder's linear layers to a
fraction of their entries twice with :func:`mpo_core.compress.compress` (through
:func:`mpobert.distill.heal.compress_student`, as ``python -m mpobert heal`` does): calibrated (whitened by
training-text activations, ranks allocated by measured layer sensitivity: the library's default) and plain
(the same truncated SVD and budget, weight error only). Each is healed toward the trained model by the same
:func:`~mpobert.distill.workflow.match_teacher` run, and both are measured before and after healing on the
held-out dev paragraphs: the relative error of the last hidden state, the sentence cosine, and dev accuracy.
The verdict is computed from those numbers (:func:`verdict`); everything goes to ``demo_metrics.json``.
"""
from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mpo_core.io import atomic_write
from mpo_core.nn import num_parameters
from mpobert.data import (ExampleBatches, encode_examples, get_task, load_split, split_sentences, train_wordpiece,
                          write_corpus, write_pydoc_topic_task)
from mpobert.distill.heal import HEAL_TARGETS, HealConfig, compress_student, heal_trainable
from mpobert.distill.teacher import Teacher
from mpobert.distill.workflow import match_teacher
from mpobert.evaluation import evaluate_task, majority_baseline
from mpobert.options import option
from mpobert.train import PROGRESS_MODES, TrainConfig, Trainer

__all__ = ["DemoConfig", "demo", "verdict"]

CONTENDERS = {"calibrated": "calibrated SVD (the library's default: whitened, sensitivity-allocated)",
              "plain": "plain truncated SVD (weight error only)"}


@dataclass(kw_only=True)
class DemoConfig:
    """Settings of :func:`demo` (defaults from the measurements in the README's MPOBERT section)."""

    output_dir: str = option("results/demo", "where data, the trained model, runs and demo_metrics.json go")
    quick: bool = option(False, "smoke run (1 training epoch, 5 healing steps, 32 calibration and held-out sequences)")
    epochs: float = option(15.0, "training epochs of the classifier over the labelled train paragraphs")
    lr: float = option(1e-3, "training peak learning rate (AdamW)")
    budget: float = option(0.05, "entries kept: a fraction of the encoder's linear layers' dense entries")
    calibration_sequences: int = option(128, "train-text sequences whose activations calibrate the calibrated contender")
    heal_steps: int = option(100, "healing steps of each compressed model (hidden states toward the trained model's)")
    heal_lr: float = option(3e-5, "healing peak learning rate (AdamW; the lr this demo was measured with)")
    eval_sequences: int = option(128, "held-out (dev paragraph) sequences of the hidden-state metrics")
    max_error_ratio: float = option(0.8, "the gain holds when the calibrated model's held-out error is at most this "
                                         "fraction of the plain one's, compressed and healed, its cosine is higher and ...")
    accuracy_tolerance: float = option(0.03, "... its dev accuracy is at most this much lower (run-to-run noise)")
    batch_size: int = option(32, "batch size of training (healing: half)")
    max_seq_len: int = option(64, "tokens per sequence")
    vocab_size: int = option(1000, "WordPiece vocabulary trained on the train paragraphs")
    hidden_size: int = option(128, "H of the classifier (intermediate 4H, 4 heads)")
    num_layers: int = option(2, "L of the classifier")
    seed: int = option(0, "seed of the data split, init, training, calibration and healing")
    threads: int = option(1, "torch CPU threads (0 = torch's default); torch's 2 ran ~10x slower on the loaded 2-core CPU")
    progress: str = option("none", "progress display of the training runs", choices=PROGRESS_MODES)
    device: str = option("auto", "'auto' (CUDA if available), 'cpu', 'cuda:0', ...")


def verdict(calibrated: dict[str, Any], plain: dict[str, Any], max_error_ratio: float,
            accuracy_tolerance: float) -> tuple[bool, str]:
    """Whether calibrated compression beat plain SVD on this run, and why (from the measured numbers only).

    Each contender is ``{"compressed": m, "healed": m}`` with ``m`` holding ``heldout_error``,
    ``heldout_cosine`` and ``dev_accuracy``. The gain holds when, compressed and healed alike, the
    calibrated error is at most ``max_error_ratio`` times the plain one, and, healed, its cosine is higher
    and its dev accuracy at most ``accuracy_tolerance`` lower.
    """
    failed = [f"{stage} error {calibrated[stage]['heldout_error']:.3f} > {max_error_ratio:g} x {plain[stage]['heldout_error']:.3f}"
              for stage in ("compressed", "healed")
              if calibrated[stage]["heldout_error"] > max_error_ratio * plain[stage]["heldout_error"]]
    cal, pla = calibrated["healed"], plain["healed"]
    if cal["heldout_cosine"] <= pla["heldout_cosine"]:
        failed.append(f"healed cosine {cal['heldout_cosine']:.4f} <= {pla['heldout_cosine']:.4f}")
    if cal["dev_accuracy"] < pla["dev_accuracy"] - accuracy_tolerance:
        failed.append(f"healed dev accuracy {cal['dev_accuracy']:.3f} < {pla['dev_accuracy']:.3f} - {accuracy_tolerance:g}")
    if failed:
        return False, "no gain from calibration on this run: " + "; ".join(failed)
    return True, (f"calibration gains on this run: held-out error x{cal['heldout_error'] / pla['heldout_error']:.2f} "
                  f"({cal['heldout_error']:.3f} vs {pla['heldout_error']:.3f}) after healing, "
                  f"x{calibrated['compressed']['heldout_error'] / plain['compressed']['heldout_error']:.2f} before; "
                  f"dev accuracy {cal['dev_accuracy']:.3f} vs {pla['dev_accuracy']:.3f}")


def _metrics(report: dict[str, Any], accuracy: float) -> dict[str, float]:
    return {"heldout_error": report["layer_rel_error"][-1], "heldout_cosine": report["sentence_cosine"],
            "dev_accuracy": accuracy}


def demo(cfg: DemoConfig) -> dict[str, Any]:
    """Train a small BERT classifier, compress it calibrated and plain at one budget, heal both, compare
    (see the module docstring). Returns the summary written to ``OUTPUT_DIR/demo_metrics.json``."""
    t0 = time.perf_counter()
    if not 0.0 < cfg.budget < 1.0:
        raise ValueError(f"budget must be a fraction in (0, 1), got {cfg.budget}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.quick:  # a smoke run for tests and first contact
        cfg = dataclasses.replace(cfg, epochs=1.0, heal_steps=5, calibration_sequences=32, eval_sequences=32)
    import transformers

    out = Path(cfg.output_dir)
    task_dir = write_pydoc_topic_task(out / "data" / "pydoc-topics", seed=cfg.seed)
    spec = get_task("pydoc-topics")
    train, dev = load_split(spec, task_dir, "train"), load_split(spec, task_dir, "dev")
    # training text (healing, calibration) is the train paragraphs'; the held-out metrics use the dev paragraphs'
    corpus, heldout = out / "corpus.txt", out / "heldout.txt"
    write_corpus([split_sentences(e.text_a) for e in train], corpus)
    write_corpus([split_sentences(e.text_a) for e in dev], heldout)
    tok = train_wordpiece([e.text_a for e in train], vocab_size=cfg.vocab_size)
    hf_tok = tok.to_transformers()
    train_f, dev_f = encode_examples(train, tok, cfg.max_seq_len), encode_examples(dev, tok, cfg.max_seq_len)
    baseline = majority_baseline([e.label for e in train], [e.label for e in dev], spec)["accuracy"]

    def dev_accuracy(model: torch.nn.Module) -> float:
        return evaluate_task(model, dev_f, spec, 64, tok.pad_id)["accuracy"]

    torch.manual_seed(cfg.seed)
    model = transformers.BertForSequenceClassification(transformers.BertConfig(
        vocab_size=tok.vocab_size, hidden_size=cfg.hidden_size, num_hidden_layers=cfg.num_layers, num_attention_heads=4,
        intermediate_size=4 * cfg.hidden_size, max_position_embeddings=cfg.max_seq_len, hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0, num_labels=spec.num_labels))  # no dropout: healing matches eval-mode outputs
    batches = ExampleBatches(train_f, cfg.batch_size, 0, 1, seed=cfg.seed, pad_id=tok.pad_id)
    steps = max(1, int(cfg.epochs * batches.steps_per_epoch))
    common = dict(seed=cfg.seed, progress=cfg.progress, device=cfg.device)
    print(f"[demo] training a BERT classifier (H={cfg.hidden_size}, L={cfg.num_layers}) on {len(train)} labelled "
          f"paragraphs: {steps} steps; then compress to {cfg.budget:.0%} calibrated and plain, heal each "
          f"{cfg.heal_steps} steps", flush=True)
    trained = Trainer(model, batches, TrainConfig(output_dir=str(out / "train"), max_steps=steps, lr=cfg.lr,
                                                  optimizer="adamw", warmup_steps=max(1, steps // 10),
                                                  log_every=max(1, steps // 10), **common)).train()
    model.eval()
    model.save_pretrained(out / "model")  # a transformers checkpoint: `python -m mpobert heal --teacher` takes it
    hf_tok.save_pretrained(out / "model")
    teacher = Teacher.wrap(model, hf_tok, str(out / "model"))
    dense = {"params": num_parameters(model), "dev_accuracy": dev_accuracy(model), "steps": trained["steps"],
             "train_time_s": trained["train_time_s"]}
    print(f"[demo] trained: {dense['params']:,} parameters, {steps} steps, dev accuracy {dense['dev_accuracy']:.3f}",
          flush=True)

    results: dict[str, Any] = {}
    for name, calibration in (("calibrated", cfg.calibration_sequences), ("plain", 0)):
        run = HealConfig(teacher=str(out / "model"), corpus=[str(corpus)], eval_corpus=[str(heldout)],
                         batch_size=cfg.batch_size // 2 or 1, max_seq_len=cfg.max_seq_len,
                         eval_sequences=cfg.eval_sequences, budget=cfg.budget, n="2",
                         calibration_sequences=calibration, train=TrainConfig(
                             output_dir=str(out / f"heal_{name}"), max_steps=cfg.heal_steps, lr=cfg.heal_lr,
                             optimizer="adamw", weight_decay=0.0, warmup_steps=max(1, cfg.heal_steps // 10),
                             log_every=max(1, cfg.heal_steps // 5), **common))
        start = time.perf_counter()
        torch.manual_seed(cfg.seed)
        student, compression = compress_student(run, teacher, run.corpus)
        compress_s = time.perf_counter() - start
        compressed_accuracy = dev_accuracy(student)
        heal_trainable(student, "all")
        healed = match_teacher(run, teacher, student, out / f"heal_{name}", run.corpus,
                               {"demo": name, "budget": cfg.budget}, "demo", 0, 1)
        results[name] = {"entries": compression.params, "dense_entries": compression.dense_params,
                         "calibration_sequences": calibration, "compress_s": compress_s,
                         "ranks": {m.name: m.ranks for m in compression.matrices},
                         "compressed": _metrics(healed["before"], compressed_accuracy),
                         "healed": _metrics(healed["after"], dev_accuracy(student)), "heal": healed["train"]}
    holds, says = verdict(results["calibrated"], results["plain"], cfg.max_error_ratio, cfg.accuracy_tolerance)
    summary = {"seed": cfg.seed, "settings": dataclasses.asdict(cfg), "trained": dense, "majority_baseline": baseline,
               **results, "gain_holds": holds, "verdict": says, "total_time_s": time.perf_counter() - t0}
    atomic_write(out / "demo_metrics.json", json.dumps(summary, indent=2).encode("utf-8"))
    _print(cfg, summary, len(train), len(dev))
    return summary


def _print(cfg: DemoConfig, s: dict[str, Any], n_train: int, n_dev: int) -> None:
    cal = s["calibrated"]
    print(f"\n== mpobert demo: compress-and-heal of a model it trains itself (bundled pydoc-topics, seed {cfg.seed}) ==")
    print(f"1. trained a BERT classifier (transformers; H={cfg.hidden_size}, L={cfg.num_layers}, 4 heads, WordPiece "
          f"vocab {cfg.vocab_size}; {s['trained']['params']:,} parameters) on the {n_train} labelled train paragraphs, "
          f"{s['trained']['steps']} steps: dev accuracy {s['trained']['dev_accuracy']:.3f} "
          f"(majority class {s['majority_baseline']:.3f})")
    print(f"2. compressed its encoder's linear layers ({' '.join(HEAL_TARGETS)}) to {cfg.budget:.0%} of their "
          f"{cal['dense_entries']:,} entries, truncated SVD per matrix (mpo_core.compress, n=2), two ways:")
    for name, text in CONTENDERS.items():
        print(f"   {name}: {text}, {s[name]['entries']:,} entries")
    print(f"3. healed each {cfg.heal_steps} steps (AdamW {cfg.heal_lr:g}) toward the trained model's hidden states on "
          f"the train text; measured on the {n_dev} held-out dev paragraphs ({cfg.eval_sequences} sequences: "
          "relative error of the last hidden state, mean-pooled sentence cosine; dev accuracy):")
    print(f"   {'':>11} {'error':>17} {'cosine':>17} {'dev accuracy':>17}")
    print(f"   {'':>11} {'compressed healed':>17} {'compressed healed':>17} {'compressed healed':>17}")
    for name in CONTENDERS:
        row = "".join(f" {s[name]['compressed'][k]:>10.{d}f} {s[name]['healed'][k]:>6.{d}f}"
                      for k, d in (("heldout_error", 3), ("heldout_cosine", 4), ("dev_accuracy", 3)))
        print(f"   {name:>11}{row}")
    print(f"   {'trained':>11} {0.0:>10.3f} {'':>6} {1.0:>10.4f} {'':>6} {s['trained']['dev_accuracy']:>10.3f}")
    print(f"=> {s['verdict']} (holds: error ratio <= {cfg.max_error_ratio:g} compressed and healed, higher healed "
          f"cosine, dev accuracy within {cfg.accuracy_tolerance:g})")
    print(f"total time {s['total_time_s']:.0f} s; metrics written to {Path(cfg.output_dir) / 'demo_metrics.json'}")
