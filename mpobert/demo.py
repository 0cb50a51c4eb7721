"""``python -m mpobert demo``: the package end to end on bundled data, CPU-sized (see the README's MPOBERT section).

:func:`demo` (:class:`DemoConfig`) trains a tokenizer, pretrains MLM + SOP on the text of the bundled
pydoc-topics train paragraphs, fine-tunes on a few labelled paragraphs per class and, with the same labels,
seed and steps, a random init of the same config, to measure what pretraining adds. It builds on the
workflows of :mod:`mpobert.workflows` and returns a JSON-able dict (also written to ``demo_metrics.json``).
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
from mpobert.data import get_task, load_split, split_sentences, write_corpus, write_pydoc_topic_task
from mpobert.heads import MPOBertForSequenceClassification
from mpobert.options import option
from mpobert.train import OPTIMIZERS, PROGRESS_MODES, TrainConfig
from mpobert.workflows import (
    PRESET_HELP, TOKENIZER_FILE, FinetuneConfig, PretrainConfig, finetune, model_config, pretrain,
)

__all__ = ["DemoConfig", "demo"]


@dataclass(kw_only=True)
class DemoConfig:
    """Settings of :func:`demo` (defaults from the measurements in the README's MPOBERT section)."""

    output_dir: str = option("results/demo", "where data, runs and demo_metrics.json go")
    quick: bool = option(False, "smoke run (100 pretraining steps, 2 fine-tuning epochs, the first lr, no scratch twin)")
    pretrain_steps: int = option(600, "MLM+SOP pretraining steps (on the text of all train paragraphs, no labels)")
    pretrain_lr: float = option(2e-3, "pretraining peak learning rate")
    optimizer: str = option("adamw", "pretraining optimizer", choices=OPTIMIZERS)
    mlm_probability: float = option(0.3, "fraction of tokens to predict in pretraining")
    compare_scratch: bool = option(True, "also fine-tune a random init the same way (labels, seed, lrs): what pretraining adds")
    few_shot: int = option(32, "labelled train paragraphs per class for fine-tuning (0 = all 1224)")
    finetune_epochs: float = option(20.0, "fine-tuning epochs over the labelled paragraphs")
    finetune_lrs: list[float] = option([5e-4, 1e-3], "fine-tuning peak lrs (AdamW), each tried on both; each at its best")
    batch_size: int = option(32, "batch size of both stages")
    dropout: float = option(0.0, "hidden/attention/classifier dropout; a model this small underfits, so none")
    max_seq_len: int = option(64, "tokens per sequence, both stages")
    vocab_size: int = option(1000, "WordPiece vocabulary trained on the corpus")
    model_config: str = option("tiny", PRESET_HELP + ", with the sizes below")
    hidden_size: int = option(128, "H (intermediate 4H, 4 heads, rank-4 adapters)")
    embedding_size: int = option(64, "E")
    num_layers: int = option(2, "L")
    seed: int = option(0, "seed of the data split, the labelled subset, init and training")
    threads: int = option(1, "torch CPU threads (0 = torch's default); torch's 2 ran ~10x slower on the loaded 2-core CPU")
    progress: str = option("plain", "progress display", choices=PROGRESS_MODES)
    device: str = option("auto", "'auto' (CUDA if available), 'cpu', 'cuda:0', ...")




def demo(cfg: DemoConfig) -> dict[str, Any]:
    """End to end on bundled data: tokenizer, MLM+SOP pretraining, fine-tuning on pydoc-topics, and the same
    fine-tuning from a random init, to measure what pretraining adds."""
    t0 = time.perf_counter()
    if not cfg.finetune_lrs:
        raise ValueError("--finetune-lrs needs at least one learning rate")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    if cfg.quick:  # a smoke run for tests and first contact
        cfg = dataclasses.replace(cfg, pretrain_steps=100, finetune_epochs=2.0, finetune_lrs=cfg.finetune_lrs[:1], compare_scratch=False)
    out = Path(cfg.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    task_dir = write_pydoc_topic_task(out / "data" / "pydoc-topics", seed=cfg.seed)
    spec = get_task("pydoc-topics")
    # Pretrain on the text of the train paragraphs only; the dev paragraphs are held out (MLM/SOP eval corpus).
    write_corpus([split_sentences(e.text_a) for e in load_split(spec, task_dir, "train")], out / "pretrain" / "corpus.txt")
    write_corpus([split_sentences(e.text_a) for e in load_split(spec, task_dir, "dev")], out / "heldout.txt")
    model_config(cfg.model_config, hidden_size=cfg.hidden_size, embedding_size=cfg.embedding_size, num_layers=cfg.num_layers,
                 intermediate_size=4 * cfg.hidden_size, num_heads=4, adapter_rank=4).save(out / "model_config.json")
    run = dict(model_config=str(out / "model_config.json"), batch_size=cfg.batch_size, max_seq_len=cfg.max_seq_len,
               dropout=cfg.dropout)
    common = dict(seed=cfg.seed, progress=cfg.progress, device=cfg.device)
    pre = pretrain(PretrainConfig(
        **run, corpus=[str(out / "pretrain" / "corpus.txt")], eval_corpus=str(out / "heldout.txt"),
        vocab_size=cfg.vocab_size, mlm_probability=cfg.mlm_probability,
        train=TrainConfig(output_dir=str(out / "pretrain"), max_steps=cfg.pretrain_steps, lr=cfg.pretrain_lr,
                          optimizer=cfg.optimizer, warmup_steps=max(1, cfg.pretrain_steps // 10),
                          log_every=max(1, cfg.pretrain_steps // 20), **common)))
    pretrained = out / "pretrain" / "model"
    def finetune_from(output: str, lr: float, **source: Any) -> dict[str, Any]:
        return finetune(FinetuneConfig(
            **{**run, **source}, task="pydoc-topics", data_dir=[str(task_dir)], epochs=cfg.finetune_epochs,
            few_shot=cfg.few_shot, train=TrainConfig(output_dir=str(out / output), lr=lr, optimizer="adamw", **common)))
    contenders = {"pretrained": dict(model=str(pretrained))}
    if cfg.compare_scratch:  # the same fine-tuning from a randomly initialized model of the same config and vocab
        contenders["scratch"] = dict(model_config=str(pretrained / "config.json"), tokenizer=str(pretrained / TOKENIZER_FILE))
    runs = {name: {lr: finetune_from(f"finetune_{name}_lr{lr:g}", lr, **source) for lr in cfg.finetune_lrs}
            for name, source in contenders.items()}  # each contender at every lr, same seed and labelled subset
    best = {name: max(r, key=lambda lr: r[lr]["eval"]["accuracy"]) for name, r in runs.items()}
    fine = runs["pretrained"][best["pretrained"]]
    n_train, n_dev = (len(load_split(spec, task_dir, split)) for split in ("train", "dev"))
    labelled = f"{cfg.few_shot} per class" if cfg.few_shot else f"all {n_train}"
    result = {name: {"best_lr": best[name], "steps": r[best[name]]["steps"], "dev": r[best[name]]["eval"],
                     "dev_accuracy_by_lr": {str(lr): r[lr]["eval"]["accuracy"] for lr in cfg.finetune_lrs},
                     "model": str(out / f"finetune_{name}_lr{best[name]:g}" / "model")} for name, r in runs.items()}
    gain = fine["eval"]["accuracy"] - result["scratch"]["dev"]["accuracy"] if "scratch" in runs else None
    report = MPOBertForSequenceClassification.from_pretrained(result["pretrained"]["model"]).parameter_report()
    summary = {
        "parameters": report.to_dict(), "seed": cfg.seed,
        "pretrain": {"steps": pre["steps"], "loss_curve": pre["loss_curve"], "heldout": pre["eval"],
                     "tokens_per_s": pre["tokens_per_s"], "train_time_s": pre["train_time_s"]},
        "finetune": {**result["pretrained"], "labelled": labelled, "epochs": cfg.finetune_epochs,
                     "majority_baseline": fine["majority_baseline"]["pydoc-topics"]},
        "finetune_from_scratch": result.get("scratch"),
        "gain_dev_accuracy": gain, "total_time_s": time.perf_counter() - t0,
    }
    atomic_write(out / "demo_metrics.json", json.dumps(summary, indent=2).encode("utf-8"))
    print("\n== MPOBERT demo (bundled pydoc corpus, CPU-sized) ==")
    print(report)
    print(f"\npretraining (MLM + SOP, {cfg.mlm_probability:.0%} masked) on the text of the {n_train} train paragraphs, "
          "no labels; loss, step: loss\n  " + ", ".join(f"{s}: {l:.3f}" for s, l in pre["loss_curve"]))
    print(f"held-out (dev paragraphs) MLM accuracy {pre['eval']['mlm_accuracy']:.3f}, SOP {pre['eval']['sop_accuracy']:.3f}")
    acc, base = fine["eval"]["accuracy"], fine["majority_baseline"]["pydoc-topics"]["accuracy"]
    print(f"\nfine-tuning on pydoc-topics, {labelled} labelled train paragraphs, {cfg.finetune_epochs:g} epochs, "
          f"seed {cfg.seed}, AdamW at each lr of {cfg.finetune_lrs}; dev accuracy ({n_dev} paragraphs) by lr:")
    for name, r in runs.items():
        print(f"  {name if name == 'pretrained' else 'from a random init':>18}: "
              + ", ".join(f"lr {lr:g} {r[lr]['eval']['accuracy']:.3f}" for lr in cfg.finetune_lrs))
    print(f"pydoc-topics dev accuracy {acc:.3f} (pretrained, lr {best['pretrained']:g}) vs majority-class baseline "
          f"{base:.3f} (Matthews corr. {fine['eval']['matthews_corrcoef']:.3f})")
    if gain is not None:
        sc = runs["scratch"][best["scratch"]]["eval"]
        print(f"same fine-tuning from a random init: dev accuracy {sc['accuracy']:.3f} (lr {best['scratch']:g}, "
              f"Matthews corr. {sc['matthews_corrcoef']:.3f})")
        verdict = "pretraining helps on this run" if gain > 0 else "no gain from pretraining on this run"
        print(f"=> {verdict}: {gain:+.3f} dev accuracy, each model at its best lr (seed {cfg.seed})")
    print(f"total time {summary['total_time_s']:.0f} s; metrics written to {out / 'demo_metrics.json'}")
    return summary
