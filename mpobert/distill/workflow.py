"""The ``distill`` workflow: a local Hugging Face BERT/ALBERT/RoBERTa checkpoint (the teacher) brought
back into its MPOBERT conversion (the student) on plain text, with a before/after held-out report.

The pieces it assembles are reusable for any student (:mod:`mpobert.distill`): the teacher
(:mod:`~mpobert.distill.teacher`), the student view (:mod:`~mpobert.distill.student`), the losses
and the trained :class:`~mpobert.distill.loss.Distiller` (:mod:`~mpobert.distill.loss`), the
held-out evaluation (:mod:`~mpobert.distill.evaluate`) and the text stream (:mod:`mpobert.data.text`).
``python -m mpobert distill`` reaches it through :mod:`mpobert.workflows`.
"""
from __future__ import annotations

import json
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mpo_core.io import atomic_write
from mpo_core.nn import num_parameters
from mpobert.data import StreamBatches
from mpobert.data.text import TextStream, heldout_batches
from mpobert.distill.evaluate import evaluate_distillation, format_comparison
from mpobert.distill.loss import DistillLoss, Distiller
from mpobert.distill.student import convert_student
from mpobert.distill.teacher import Teacher, check_vocabulary, load_teacher
from mpobert.options import nested, option
from mpobert.train import TrainConfig, Trainer, setup_distributed

__all__ = ["DistillConfig", "TeacherMatchConfig", "distill", "match_teacher", "time_limit", "training_corpus", "write_json"]


def write_json(path: str | os.PathLike, data: Any) -> None:
    """``data`` as indented JSON at ``path``, written atomically."""
    atomic_write(path, (json.dumps(data, indent=2) + "\n").encode())


@dataclass(kw_only=True)
class TeacherMatchConfig:
    """Settings shared by every teacher-matching workflow (``distill``, ``heal``): teacher, text, loss, training."""

    teacher: str = option(help="Hugging Face BERT/ALBERT/RoBERTa checkpoint directory: config.json, weights, tokenizer files")
    corpus: list[str] | None = option(None, "plain-text files: one sentence per line, blank line between documents "
                                            "(default: the bundled pydoc corpus)")
    eval_corpus: list[str] | None = option(None, "held-out text files (default: every HOLDOUT_EVERY-th document of the "
                                                 "corpus, which training then skips)")
    holdout_every: int = option(20, "hold out documents k with k %% HOLDOUT_EVERY == 0 when --eval-corpus is absent")
    eval_sequences: int = option(128, "held-out sequences of the before/after report")
    batch_size: int = option(16, "per-device micro-batch size (sequences)")
    max_seq_len: int = option(64, "tokens per sequence incl. specials")
    hidden_weight: float = option(1.0, "weight of the hidden-state term (relative squared error, summed over layers)")
    hidden_layers: str = option("all", "teacher layers the hidden-state term matches: all, last, none, or e.g. 0,3,6 "
                                       "(0 = embeddings output)")
    cosine_weight: float = option(1.0, "weight of 1 - cosine of the mean-pooled sentence embeddings")
    attention_weight: float = option(0.0, "weight of the attention-probability KL term")
    attention_layers: str = option("all", "teacher layers (1..L) the attention term matches")
    logits_weight: float = option(0.0, "weight of the MLM-logits KL term (teacher with an MLM head)")
    temperature: float = option(2.0, "softmax temperature of the logits term")
    teacher_input_steps: int = option(0, "for this many micro-batches feed every student layer the teacher's hidden "
                                         "state (layer-local matching, fast early progress), end to end after")
    train_embeddings: bool = option(False, "also train the embeddings and pooler (copied from the teacher; frozen "
                                           "by default)")
    max_minutes: float = option(0.0, "stop training after this many minutes (0 = run all --max-steps); the checkpoint "
                                      "and the after-report still follow")
    threads: int = option(0, "torch CPU threads (0 = torch's default); 1 is fastest on a shared, loaded CPU")

    def loss(self) -> DistillLoss:
        return DistillLoss(hidden_weight=self.hidden_weight, hidden_layers=self.hidden_layers,
                           cosine_weight=self.cosine_weight, attention_weight=self.attention_weight,
                           attention_layers=self.attention_layers, logits_weight=self.logits_weight,
                           temperature=self.temperature, teacher_input_steps=self.teacher_input_steps)

    def check_files(self) -> None:
        """``ValueError`` naming corpus files that do not exist (before anything is built or written)."""
        missing = [f for f in [*(self.corpus or []), *(self.eval_corpus or [])] if not os.path.isfile(f)]
        if missing:
            raise ValueError(f"corpus files {missing} do not exist (expected plain-text files)")


@dataclass(kw_only=True)
class DistillConfig(TeacherMatchConfig):
    """Settings of ``python -m mpobert distill`` (see :func:`distill`)."""

    student: str | None = option(None, "start from this MPOBERT model directory (save_pretrained / convert output) "
                                       "instead of converting the teacher")
    num_groups: int | None = option(None, "student: groups sharing a central (default 1: one central per matrix)")
    adapter_rank: int | None = option(None, "student: rank of the per-layer adapters (default: the config's, 8)")
    unshare_biases_norms: bool = option(False, "student: every layer keeps its own biases and LayerNorms (copied "
                                               "exactly; costs L x (6 biases + 2 LayerNorms))")
    central_from: str = option("mean", "student (BERT/RoBERTa): each group's central from the mean of its layers, "
                                       "or 'layer:K'")
    dropout: float = option(0.0, "student hidden/attention dropout while distilling")
    train: TrainConfig = nested(TrainConfig, "training", required=("output_dir",), max_steps=300, lr=1e-3,
                                optimizer="adamw", weight_decay=0.0, warmup_steps=10, log_every=10)


def training_corpus(cfg: TeacherMatchConfig, out: Path, rank: int, world: int) -> list[str]:
    """The training text files: ``cfg.corpus``, or the bundled pydoc corpus written once to ``out/corpus.txt``."""
    if cfg.corpus:
        return list(cfg.corpus)
    path = out / "corpus.txt"
    if rank == 0 and not path.exists():
        from mpobert.data import write_corpus
        from mpobert.data.corpus import pydoc_documents

        write_corpus(pydoc_documents(), path)
    if world > 1:
        torch.distributed.barrier()
    return [str(path)]


def _student(cfg: DistillConfig, teacher: Teacher) -> nn.Module:
    if cfg.student:
        from mpobert import MPOBertForPreTraining, MPOBertModel

        cls = MPOBertForPreTraining if teacher.has_mlm else MPOBertModel
        return cls.from_pretrained(cfg.student, strict=False)
    overrides = {k: getattr(cfg, k) for k in ("num_groups", "adapter_rank") if getattr(cfg, k) is not None}
    return convert_student(teacher, central_from=cfg.central_from, hidden_dropout=cfg.dropout,
                           attention_dropout=cfg.dropout, share_biases_norms=not cfg.unshare_biases_norms, **overrides)


def _freeze_unused(student: nn.Module, cfg: DistillConfig) -> None:
    """Freeze what no loss term trains (DDP needs a gradient for every trainable tensor): the
    sentence-order head, the MLM head unless ``logits_weight > 0``, the embeddings and pooler unless
    ``train_embeddings`` (the pooler then rides along: ``find_unused_parameters``)."""
    frozen = [getattr(student, "sop_classifier", None)]
    if not cfg.logits_weight:
        frozen.append(getattr(student, "mlm", None))
    if not cfg.train_embeddings:
        frozen += [student.base_model.embeddings, student.base_model.pooler]
    for module in frozen:
        if module is not None:
            module.requires_grad_(False)


def time_limit(minutes: float, world: int) -> Any:
    """An ``on_step`` hook ending the run (at the same step on every rank) once ``minutes`` have passed."""
    if not minutes:
        return None
    if minutes < 0:
        raise ValueError(f"max_minutes must be >= 0, got {minutes!r}")
    start = time.perf_counter()

    def on_step(trainer: Trainer) -> None:
        over = torch.tensor([float(time.perf_counter() - start >= 60.0 * minutes)], device=trainer.device)
        if world > 1:
            torch.distributed.all_reduce(over, op=torch.distributed.ReduceOp.MAX)
        if over.item():
            trainer.config.max_steps = trainer.step  # the loop ends here; save and final metrics follow

    return on_step


def match_teacher(cfg: TeacherMatchConfig, teacher: Teacher, student: nn.Module, out: Path, files: list[str],
                  fingerprint: dict[str, Any], tag: str, rank: int, world: int) -> dict[str, Any] | None:
    """Train ``student`` to match ``teacher`` on ``files`` with the one :class:`~mpobert.train.Trainer`, between
    two held-out reports (sentence cosine, per-layer error, MLM agreement): the core of ``distill`` and ``heal``.

    Returns ``{"before", "after", "train"}`` on rank 0 (``None`` elsewhere). ``fingerprint`` describes the run for
    exact resume (the Trainer refuses a checkpoint of another run).
    """
    tok = teacher.tokenizer
    loss = cfg.loss()
    holdout = 0 if cfg.eval_corpus else cfg.holdout_every
    held_stream = TextStream(cfg.eval_corpus or files, tok, cfg.max_seq_len, split="heldout",
                             holdout_every=cfg.holdout_every if not cfg.eval_corpus else 1, loop=False)
    held = heldout_batches(held_stream, cfg.batch_size, cfg.eval_sequences, tok.pad_token_id)
    before = evaluate_distillation(student, teacher, held) if rank == 0 else None
    batches = StreamBatches(TextStream(files, tok, cfg.max_seq_len, split="train", holdout_every=holdout),
                            cfg.batch_size, rank, world, tok.pad_token_id)
    model = Distiller(student, teacher, loss, seed=cfg.train.seed)
    fingerprint = {**fingerprint, "teacher": os.path.abspath(cfg.teacher), "loss": asdict(loss),
                   "batch_size": cfg.batch_size, "max_seq_len": cfg.max_seq_len, "train_embeddings": cfg.train_embeddings}
    trainer = Trainer(model, batches, cfg.train, fingerprint=fingerprint, on_step=time_limit(cfg.max_minutes, world),
                      find_unused_parameters=bool(cfg.train_embeddings))  # the pooler has no gradient
    if rank == 0:
        print(f"[{tag}] held-out cosine before: {before['sentence_cosine']:.4f}; {cfg.train.max_steps} steps on "
              f"{trainer.device}", flush=True)
    final = trainer.train()
    if rank != 0:
        return None
    after = evaluate_distillation(student, teacher, held)
    return {"before": before, "after": after, "loss": asdict(loss),
            "train": {k: final[k] for k in ("steps", "train_time_s", "tokens_per_s", "loss_first", "loss_last",
                                            "resumed_from")}}


def distill(cfg: DistillConfig) -> dict[str, Any]:
    """Distill a local Hugging Face BERT/ALBERT/RoBERTa checkpoint into its MPOBERT conversion.

    Converts the teacher (or loads ``--student``), reports the held-out metrics of the
    conversion, trains with the :class:`~mpobert.train.Trainer` (progress, checkpoints,
    ``--resume``, ``torchrun``), reports them again and saves the student. Writes
    ``OUTPUT_DIR/distill_report.json`` (before, after, parameter counts, settings) and
    ``OUTPUT_DIR/model`` (an MPOBERT directory with the teacher's tokenizer files).
    """
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    rank, world, _ = setup_distributed()
    cfg.loss()  # bad loss settings fail before the teacher loads
    teacher = load_teacher(cfg.teacher, attentions=cfg.attention_weight > 0)
    tok = teacher.tokenizer
    t0 = time.perf_counter()
    torch.manual_seed(cfg.train.seed)
    student = _student(cfg, teacher)
    convert_s = time.perf_counter() - t0
    check_vocabulary(student, teacher)
    cfg.check_files()
    out = Path(cfg.train.output_dir)  # created only once the inputs proved valid
    out.mkdir(parents=True, exist_ok=True)
    files = training_corpus(cfg, out, rank, world)
    _freeze_unused(student, cfg)
    student_params, teacher_params = student.parameter_report().total, teacher.num_params
    if rank == 0:
        print(f"[distill] teacher {teacher.family} ({teacher_params:,} parameters), student MPOBERT "
              f"({student_params:,}; converted in {convert_s:.0f} s)", flush=True)
    result = match_teacher(cfg, teacher, student, out, files, {"student": student.config.to_dict()}, "distill",
                           rank, world)
    if result is None:
        return {}
    report = {"teacher": {"path": cfg.teacher, "family": teacher.family, "params": teacher_params},
              "student": {"params": student_params, "trainable": num_parameters(student, trainable=True),
                          "config": student.config.to_dict(), "convert_s": convert_s}, **result}
    student.save_pretrained(out / "model")
    tok.save_pretrained(out / "model")
    write_json(out / "distill_report.json", report)
    print(format_comparison(result["before"], result["after"], student_params, teacher_params))
    print(f"[distill] {result['train']['steps']} steps in {result['train']['train_time_s']:.0f} s; student saved to "
          f"{out / 'model'}; report in {out / 'distill_report.json'}")
    return report
