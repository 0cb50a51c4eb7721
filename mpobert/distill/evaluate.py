"""Held-out evaluation of a student against its teacher: sentence-embedding cosine, per-layer
hidden-state error and MLM top-1 agreement (:func:`evaluate_distillation`), and their before/after
table (:func:`format_comparison`). Works for any :class:`~mpobert.distill.student.Student`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mpobert.distill.loss import mask_for_mlm, sentence_cosine
from mpobert.distill.student import Student, as_student
from mpobert.distill.teacher import Teacher

__all__ = ["evaluate_distillation", "format_comparison"]


@torch.no_grad()
def evaluate_distillation(student: nn.Module | Student, teacher: Teacher, batches: Sequence[dict[str, torch.Tensor]],
                          mlm_probability: float = 0.15, seed: int = 0) -> dict[str, Any]:
    """Student vs teacher on held-out ``batches`` (``student``: an MPOBERT or ``transformers`` model, or a
    :class:`~mpobert.distill.student.Student` view).

    Returns
    -------
    dict
        ``sentence_cosine`` (mean over sequences of the cosine of the mean-pooled last hidden
        states) and ``sentence_cosine_min``; ``layer_rel_error``: per layer ``0..L`` of the
        student, ``||h_s - h_t||_F / ||h_t||_F`` over the non-padding tokens (matched teacher
        layer); ``mlm_agreement`` (fraction of masked positions where the top-1 predictions
        agree) and ``mlm_accuracy_student``/``_teacher`` (top-1 = the original token) when both
        have MLM heads, else ``None``; ``sequences``, ``tokens``.
    """
    if not batches:
        raise ValueError("evaluate_distillation needs at least one held-out batch")
    view = as_student(student)
    model = view.model
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ls, lt = view.num_layers, teacher.num_layers
    cos, err_num, err_den = [], torch.zeros(ls + 1), torch.zeros(ls + 1)
    agree = s_hit = t_hit = total = 0
    gen = torch.Generator().manual_seed(seed)
    mlm = teacher.has_mlm and view.has_mlm
    tokens = 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        mask = batch["attention_mask"]
        tokens += int(mask.sum())
        t_out = teacher(batch)
        s_states = view.hidden_states(batch)
        cos.append(sentence_cosine(s_states[-1], t_out.hidden_states[-1], mask).cpu())
        m = mask[..., None].float()
        for j in range(ls + 1):
            if (j * lt) % ls:
                continue
            t_h = t_out.hidden_states[j * lt // ls].float()
            err_num[j] += float((((s_states[j].float() - t_h) ** 2) * m).sum())
            err_den[j] += float(((t_h ** 2) * m).sum())
        if mlm:
            masked, where = mask_for_mlm({k: v.cpu() for k, v in batch.items()}, teacher.tokenizer, mlm_probability, gen)
            masked = {k: v.to(device) for k, v in masked.items()}
            where = where.to(device)
            t_pred = teacher(masked, logits=True).logits[where].argmax(-1)
            s_pred = view.logits(masked)[where].argmax(-1)
            truth = batch["input_ids"][where]
            agree += int((t_pred == s_pred).sum())
            s_hit += int((s_pred == truth).sum())
            t_hit += int((t_pred == truth).sum())
            total += int(where.sum())
    model.train(was_training)
    cos_all = torch.cat(cos)
    errors = [math.sqrt(float(n / d)) if d > 0 else None for n, d in zip(err_num, err_den)]
    return {
        "sentence_cosine": float(cos_all.mean()), "sentence_cosine_min": float(cos_all.min()),
        "layer_rel_error": errors, "mlm_agreement": agree / total if mlm and total else None,
        "mlm_accuracy_student": s_hit / total if mlm and total else None,
        "mlm_accuracy_teacher": t_hit / total if mlm and total else None,
        "sequences": int(cos_all.numel()), "tokens": tokens,
    }


def format_comparison(before: dict[str, Any], after: dict[str, Any] | None, student_params: int,
                      teacher_params: int) -> str:
    """A table of the :func:`evaluate_distillation` metrics before and after distillation."""
    cols = ["before"] + (["after"] if after is not None else [])
    rows: list[tuple[str, list[Any]]] = [
        ("sentence-embedding cosine (mean)", [r["sentence_cosine"] for r in (before, after) if r]),
        ("sentence-embedding cosine (min)", [r["sentence_cosine_min"] for r in (before, after) if r]),
    ]
    for j, e in enumerate(before["layer_rel_error"]):
        if e is not None:
            rows.append((f"hidden-state rel. error, layer {j}", [r["layer_rel_error"][j] for r in (before, after) if r]))
    if before.get("mlm_agreement") is not None:
        rows.append(("MLM top-1 agreement with teacher", [r["mlm_agreement"] for r in (before, after) if r]))
        rows.append(("MLM top-1 accuracy (student)", [r["mlm_accuracy_student"] for r in (before, after) if r]))
    width = max(len(r[0]) for r in rows) + 2
    lines = [f"{'held-out metric (student vs teacher)':<{width}}" + "".join(f"{c:>10}" for c in cols), "-" * (width + 10 * len(cols))]
    lines += [f"{name:<{width}}" + "".join(f"{v:>10.4f}" for v in vals) for name, vals in rows]
    lines.append(f"{'parameters: student / teacher':<{width}}{student_params:,} / {teacher_params:,} "
                 f"({student_params / max(teacher_params, 1):.3f}x)")
    return "\n".join(lines)
