"""``real_checkpoint.py``'s healing sections: compressed contenders healed for the same number of steps, and the
MPOBERT conversion (one shared central per matrix kind) distilled beside per-matrix compression healed at its
parameter count.

Both go through the library's own workflows, as a user would: :func:`mpobert.distill.heal.heal` and
:func:`mpobert.distill.workflow.distill` (the same teacher-matching loss, text stream, held-out report and
Trainer), each writing its run directory under ``--work-dir``. A finished run directory is re-used (the Trainer
resumes at its last step and trains no further), so an interrupted benchmark continues where it stopped.
"""
from __future__ import annotations

import json
import os
from typing import Any

from torch import nn

from mpo_core.lightweight import load_mpo_model
from mpobert.distill.heal import HealConfig, compress_student, heal
from mpobert.distill.teacher import load_teacher
from mpobert.distill.workflow import DistillConfig, distill
from mpobert.train import TrainConfig

#: contender -> (``heal --n``, calibration sequences): SVD and MPO n=5 by weight error or calibrated, and auto
HEAL_CONTENDERS = {"svd": ("2", 0), "svd+calib": ("2", 128), "mpo5": ("5", 0), "mpo5+calib": ("5", 128),
                   "auto+calib": ("auto", 128)}


def _train(args, name: str, lr: float) -> TrainConfig:
    return TrainConfig(output_dir=os.path.join(args.work_dir, name), max_steps=args.heal_steps, lr=lr,
                       optimizer=args.heal_optimizer, weight_decay=0.0, warmup_steps=min(10, args.heal_steps // 10),
                       log_every=0, progress="none", resume=True)


def _row(section: str, contender: str, budget: float | None, lr: float, report: dict[str, Any], run_dir: str
         ) -> dict[str, Any]:
    student = report["student"]
    return {"section": section, "contender": contender, "budget": budget, "lr": lr, "run_dir": run_dir,
            "params": student["params"],
            "teacher_params": report["teacher"]["params"], "cosine_before": report["before"]["sentence_cosine"],
            "cosine_after": report["after"]["sentence_cosine"], "last_layer_err_after": report["after"]["layer_rel_error"][-1],
            "steps": report["train"]["steps"], "train_s": report["train"]["train_time_s"]}


def _heal_config(args, contender: str, budget: float, lr: float) -> HealConfig:
    n, calibration = HEAL_CONTENDERS[contender]
    name = f"heal_{contender}_{budget:g}_{args.heal_optimizer}{lr:g}_{args.heal_steps}_local{args.heal_teacher_input_steps}"
    return HealConfig(teacher=args.checkpoint, budget=budget, n=n, calibration_sequences=calibration,
                      teacher_input_steps=args.heal_teacher_input_steps, threads=args.threads,
                      train=_train(args, name, lr))


def heal_contender(args, contender: str, budget: float, lr: float) -> dict[str, Any]:
    """Compress the checkpoint as ``contender`` to ``budget`` of the encoder matrices' entries, heal, report."""
    cfg = _heal_config(args, contender, budget, lr)
    row = _row("heal", contender, budget, lr, heal(cfg), cfg.train.output_dir)
    print(f"[heal] {budget:.2f} {contender:<11} lr {lr:g}: cosine {row['cosine_before']:.4f} -> "
          f"{row['cosine_after']:.4f} in {row['steps']} steps ({row['train_s']:.0f} s)", flush=True)
    return row


def run_heal(args) -> list[dict[str, Any]]:
    """Every ``--heal-contenders`` at every ``--heal-budgets`` and ``--heal-lrs``, ``--heal-steps`` each."""
    return [heal_contender(args, c, b, lr) for b in args.heal_budgets for c in args.heal_contenders for lr in args.heal_lrs]


def heal_students(args, row: dict[str, Any]) -> tuple[nn.Module, nn.Module]:
    """A heal row's encoder as compressed, before healing (rebuilt: :func:`compress_student` is deterministic, and
    is given the run's own training text; its ranks are checked against the run's report) and as healed (its MPO
    checkpoint)."""
    cfg = _heal_config(args, row["contender"], row["budget"], row["lr"])
    teacher = load_teacher(args.checkpoint)
    compressed, report = compress_student(cfg, teacher, [os.path.join(row["run_dir"], "corpus.txt")])
    with open(os.path.join(row["run_dir"], "heal_report.json")) as f:
        healed_ranks = {m["name"]: m["ranks"] for m in json.load(f)["compression"]["matrices"]}
    if {m.name: list(m.ranks) for m in report.matrices} != healed_ranks:
        raise RuntimeError(f"{row['run_dir']}: the rebuilt compression differs from the healed run's")
    healed = load_mpo_model(type(teacher.model), os.path.join(row["run_dir"], "mpo"))
    return compressed.base_model, healed.base_model


def matched_budget(student_params: int, teacher_params: int, dense_entries: int) -> float:
    """The fraction of the encoder matrices' entries at which per-matrix compression has ``student_params``."""
    fraction = (student_params - (teacher_params - dense_entries)) / dense_entries
    if not 0.0 < fraction <= 1.0:
        raise ValueError(f"no per-matrix budget matches {student_params:,} parameters (teacher {teacher_params:,}, "
                         f"encoder matrices {dense_entries:,}): fraction {fraction:.3f}")
    return fraction


def run_convert(args, dense_entries: int) -> list[dict[str, Any]]:
    """MPOBERT's conversion distilled at each ``--distill-lrs``; then ``--convert-contenders`` healed at the
    conversion's parameter count (same steps, each at every ``--heal-lrs``)."""
    rows = []
    for lr in args.distill_lrs:
        train = _train(args, f"convert_mpobert_{args.heal_optimizer}{lr:g}_{args.heal_steps}"
                             f"_local{args.heal_teacher_input_steps}", lr)
        report = distill(DistillConfig(teacher=args.checkpoint, teacher_input_steps=args.heal_teacher_input_steps,
                                       threads=args.threads, train=train))
        rows.append(_row("convert", "mpobert conversion", None, lr, report, train.output_dir))
        print(f"[convert] MPOBERT lr {lr:g}: {report['student']['params']:,} parameters, cosine "
              f"{rows[-1]['cosine_before']:.4f} -> {rows[-1]['cosine_after']:.4f}", flush=True)
    try:
        budget = matched_budget(rows[0]["params"], rows[0]["teacher_params"], dense_entries)
    except ValueError as exc:  # e.g. a tiny model whose conversion (adapters included) outgrows it
        print(f"[convert] per-matrix contenders skipped: {exc}", flush=True)
        return rows
    for contender in args.convert_contenders:
        for lr in args.heal_lrs:
            row = heal_contender(args, contender, budget, lr)
            rows.append({**row, "section": "convert"})
    return rows


def add_arguments(p) -> None:
    """The healing sections' command-line options."""
    floats = lambda text: [float(v) for v in text.split(",") if v]  # noqa: E731
    names = lambda text: [v for v in text.split(",") if v]  # noqa: E731
    p.add_argument("--heal-contenders", type=names, default=["svd", "svd+calib", "mpo5+calib", "auto+calib"],
                   help=f"heal section contenders, from {', '.join(HEAL_CONTENDERS)}")
    p.add_argument("--convert-contenders", type=names, default=["svd+calib", "auto+calib"],
                   help="per-matrix contenders healed at the MPOBERT conversion's parameter count")
    p.add_argument("--heal-budgets", type=floats, default=[0.5])
    p.add_argument("--heal-steps", type=int, default=300)
    p.add_argument("--heal-optimizer", default="adamw", choices=("adamw", "lamb"))
    p.add_argument("--heal-lrs", type=floats, default=[3e-5])
    p.add_argument("--heal-teacher-input-steps", type=int, default=0,
                   help="first steps of every heal/distill run layer-local (each layer fed the original's input)")
    p.add_argument("--distill-lrs", type=floats, default=[1e-3])
    p.add_argument("--work-dir", help="run directories of the heal and convert sections (finished ones are "
                   "re-used; default: beside --output, OUTPUT_runs)")


def check_arguments(p, args) -> None:
    """Unknown contenders are a usage error; the default ``--work-dir`` follows ``--output``."""
    for c in args.heal_contenders + args.convert_contenders:
        if c not in HEAL_CONTENDERS:
            p.error(f"unknown heal contender {c!r}; choose from {', '.join(HEAL_CONTENDERS)}")
    if args.work_dir is None:
        args.work_dir = os.path.splitext(args.output)[0] + "_runs"


__all__ = ["HEAL_CONTENDERS", "add_arguments", "check_arguments", "heal_students", "matched_budget", "run_convert",
           "run_heal"]
