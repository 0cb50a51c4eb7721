"""The ``heal`` workflow: compress a transformers checkpoint, then train its factors back toward the original.

The student is the teacher's own model with its chosen linear layers compressed by
:func:`mpo_core.compress.compress` (default: the truncated SVD member, whitened by calibration text and
allocated by measured layer sensitivity; ``--n auto`` lets the family pick per matrix); healing trains every core (``--train-cores all``) or only the
auxiliaries (``auxiliary``), plus the encoder's biases and LayerNorms, to match the original's hidden states
(and optionally its MLM logits) on a text stream, through the same teacher-matching core as ``distill``
(:func:`mpobert.distill.workflow.match_teacher`: the one Trainer, checkpoints, ``--resume``, ``torchrun``,
``--max-minutes``, before/after held-out report). The result is written twice: as an MPO checkpoint
(``OUTPUT_DIR/mpo``, :func:`mpo_core.lightweight.save_mpo_model`: safetensors, loads back bitwise) and
merged back to a plain transformers checkpoint (``OUTPUT_DIR/merged``, with the merge's largest relative
weight change in the report).
"""
from __future__ import annotations

import copy
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpo_core.compress import compress
from mpo_core.lightweight import save_mpo_model
from mpo_core.nn import MPOLinear, num_parameters, unmpo_ify
from mpobert.data.text import TextStream, heldout_batches
from mpobert.distill.evaluate import format_comparison
from mpobert.distill.teacher import Teacher, load_teacher
from mpobert.distill.workflow import TeacherMatchConfig, match_teacher, training_corpus, write_json
from mpobert.options import nested, option
from mpobert.train import TrainConfig, setup_distributed

__all__ = ["HEAL_TARGETS", "HealConfig", "compress_student", "heal", "heal_trainable"]

HEAL_TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
"""The encoder's linear layers (transformers BERT/RoBERTa names, as suffixes)."""


@dataclass(kw_only=True)
class HealConfig(TeacherMatchConfig):
    """Settings of ``python -m mpobert heal`` (see :func:`heal`)."""

    budget: float = option(0.5, "entries kept: a fraction in (0, 1] of the targeted matrices' dense entries")
    n: str = option("2", "cores per matrix: 2 (truncated SVD, the member that won on every matrix measured), 3, 4, 5, "
                         "or auto (the family picks per matrix; slower)")
    include: list[str] | None = option(None, "linear layers to compress (names, suffixes or globs; default the "
                                             "encoder's query key value attention.output.dense intermediate.dense "
                                             "output.dense)")
    calibration_sequences: int = option(128, "training-text sequences whose activations whiten the factorization "
                                             "and measure each layer's sensitivity (0: weight error only)")
    train_cores: str = option("all", "which factors heal: all cores, or only the auxiliaries (centrals frozen); the "
                                     "encoder's biases and LayerNorms train either way", choices=("all", "auxiliary"))
    # LAMB 1e-3: on all-MiniLM-L6-v2 at 50% (calibrated SVD), 80 steps took the held-out cosine 0.800 -> 0.862-0.865,
    # against AdamW 3e-5 0.839-0.840, 1e-4 0.856, 1e-5 0.856, LAMB 3e-4 0.861, 3e-3 0.821 (AdamW 2e-4 diverged)
    train: TrainConfig = nested(TrainConfig, "training", required=("output_dir",), max_steps=200, lr=1e-3,
                                optimizer="lamb", weight_decay=0.0, warmup_steps=10, log_every=10)


def _n(value: str) -> int | str:
    if value == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        raise ValueError(f"n must be 'auto' or an int >= 2, got {value!r}") from None
    if n < 2:
        raise ValueError(f"n must be 'auto' or an int >= 2, got {value!r}")
    return n


def compress_student(cfg: HealConfig, teacher: Teacher, files: list[str]) -> tuple[nn.Module, Any]:
    """A copy of the teacher's model with its chosen layers compressed (calibrated on training text)."""
    student = copy.deepcopy(teacher.model)
    student.requires_grad_(True)
    calibration = None
    if cfg.calibration_sequences:
        stream = TextStream(files, teacher.tokenizer, cfg.max_seq_len, split="train",
                            holdout_every=0 if cfg.eval_corpus else cfg.holdout_every, loop=False)
        batches = heldout_batches(stream, cfg.batch_size, cfg.calibration_sequences, teacher.tokenizer.pad_token_id)
        calibration = [{k: v for k, v in b.items() if k in ("input_ids", "attention_mask", "token_type_ids")}
                       for b in batches]
    report = compress(student.base_model, budget=cfg.budget, include=cfg.include or HEAL_TARGETS, n=_n(cfg.n),
                      calibration=calibration, progress=False)
    return student, report


def heal_trainable(student: nn.Module, train_cores: str) -> int:
    """Make the encoder's factors (all cores, or auxiliaries only), dense linears (``all``), biases and LayerNorms
    trainable; everything else (embeddings, pooler, heads) frozen. Returns the trainable count."""
    if train_cores not in ("all", "auxiliary"):
        raise ValueError(f"train_cores must be 'all' or 'auxiliary', got {train_cores!r}")
    student.requires_grad_(False)
    encoder = student.base_model.encoder
    for module in encoder.modules():
        if isinstance(module, MPOLinear):
            central = module.central_index
            for k, core in enumerate(module.cores):
                core.requires_grad_(train_cores == "all" or k != central)
            if module.bias is not None:
                module.bias.requires_grad_(True)
        elif isinstance(module, nn.LayerNorm):
            module.requires_grad_(True)
        elif isinstance(module, nn.Linear):
            module.weight.requires_grad_(train_cores == "all")
            if module.bias is not None:
                module.bias.requires_grad_(True)
    return num_parameters(student, trainable=True)


def _merged_change(student: nn.Module, merged: nn.Module) -> float:
    """Largest relative change of any encoder weight between the healed MPO model and its merge."""
    worst = 0.0
    merged_modules = dict(merged.named_modules())
    for name, module in student.named_modules():
        if isinstance(module, MPOLinear):
            dense = merged_modules[name].weight.detach()
            mpo = module.weight.detach()
            worst = max(worst, float((dense - mpo).norm() / mpo.norm().clamp_min(1e-30)))
    return worst


def heal(cfg: HealConfig) -> dict[str, Any]:
    """Compress a local transformers checkpoint and heal it toward the original (see the module docstring).

    Writes ``OUTPUT_DIR/heal_report.json`` (compression per matrix, before/after held-out metrics, parameter
    counts, training), ``OUTPUT_DIR/mpo`` (MPO checkpoint) and ``OUTPUT_DIR/merged`` (plain transformers
    checkpoint with the tokenizer). Bad settings, missing corpus files, an unsupported checkpoint family or a
    budget that cannot be met raise before anything is written.
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, _ = setup_distributed()
    cfg.loss()
    _n(cfg.n)
    if not 0.0 < cfg.budget <= 1.0:
        raise ValueError(f"budget must be a fraction in (0, 1], got {cfg.budget}")
    cfg.check_files()
    teacher = load_teacher(cfg.teacher, attentions=cfg.attention_weight > 0)
    out = Path(cfg.train.output_dir)
    start = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    with tempfile.TemporaryDirectory() as tmp:  # OUTPUT_DIR is created only once compression has worked
        calibration_files = cfg.corpus or training_corpus(cfg, Path(tmp), 0, 1)
        student, compression = compress_student(cfg, teacher, calibration_files)
    compress_s = time.perf_counter() - start
    for module in student.modules():  # healing matches the teacher's eval-mode outputs: no dropout
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    out.mkdir(parents=True, exist_ok=True)
    files = training_corpus(cfg, out, rank, world)
    trainable = heal_trainable(student, cfg.train_cores)
    student_params = num_parameters(student)
    if rank == 0:
        print(f"[heal] {teacher.family} ({teacher.num_params:,} parameters) compressed to {student_params:,} in "
              f"{compress_s:.0f} s (matrices {compression.dense_params:,} -> {compression.params:,} entries); "
              f"{trainable:,} trainable ({cfg.train_cores})", flush=True)
    fingerprint = {"compression": {"budget": cfg.budget, "n": cfg.n, "include": cfg.include or HEAL_TARGETS,
                                   "calibration_sequences": cfg.calibration_sequences,
                                   "ranks": {m.name: m.ranks for m in compression.matrices}},
                   "train_cores": cfg.train_cores}
    result = match_teacher(cfg, teacher, student, out, files, fingerprint, "heal", rank, world)
    if result is None:
        return {}
    student.eval()
    save_mpo_model(student, out / "mpo")
    merged = copy.deepcopy(student)
    unmpo_ify(merged)
    merge_change = _merged_change(student, merged)
    merged.save_pretrained(out / "merged")
    teacher.tokenizer.save_pretrained(out / "merged")
    teacher.tokenizer.save_pretrained(out / "mpo")
    report = {"teacher": {"path": cfg.teacher, "family": teacher.family, "params": teacher.num_params},
              "student": {"params": student_params, "trainable": trainable, "train_cores": cfg.train_cores},
              "compression": {**compression.to_dict(), "seconds": compress_s},
              "merge_max_relative_change": merge_change, **result}
    write_json(out / "heal_report.json", report)
    print(format_comparison(result["before"], result["after"], student_params, teacher.num_params))
    print(f"[heal] {result['train']['steps']} steps in {result['train']['train_time_s']:.0f} s; MPO checkpoint "
          f"{out / 'mpo'}, merged checkpoint {out / 'merged'}, report {out / 'heal_report.json'}")
    return report
