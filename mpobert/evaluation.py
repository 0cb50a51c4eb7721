"""Evaluation of MPOBERT models: GLUE-format tasks, pretraining (MLM/SOP accuracy), SQuAD."""
from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from mpobert.data.glue import TaskSpec, compute_metrics
from mpobert.data.pretraining import IGNORE_INDEX, pad_collate
from mpobert.data.squad import SquadExample, best_spans, squad_metrics

_MODEL_INPUTS = ("input_ids", "token_type_ids", "attention_mask")


def _device_of(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def predict_logits(
    model: nn.Module, features: Sequence[dict[str, Any]], batch_size: int = 64, pad_id: int = 0,
    keys: tuple[str, ...] = ("logits",), per_token: bool = False, **forward_kwargs: Any,
) -> list[np.ndarray]:
    """Run ``model`` over encoded ``features`` (no labels) and stack the output fields ``keys``.

    Features are batched in order (length-padded per batch); ``forward_kwargs`` go to
    every call (e.g. ``task=`` for a multitask model). Returns one float32 array per key;
    with ``per_token=True`` the outputs are ``(B, S)`` and are padded with ``-inf`` to the
    longest feature.
    """
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not features:
        raise ValueError("features must not be empty")
    was_training = model.training
    model.eval()
    device = _device_of(model)
    outs: list[list[np.ndarray]] = [[] for _ in keys]
    try:
        for lo in range(0, len(features), batch_size):
            items = [{k: f[k] for k in ("input_ids", "token_type_ids")} for f in features[lo : lo + batch_size]]
            batch = {k: v.to(device) for k, v in pad_collate(items, pad_id).items() if k in _MODEL_INPUTS}
            out = model(**batch, **forward_kwargs)
            for acc, key in zip(outs, keys):
                acc.append(out[key].float().cpu().numpy())
    finally:
        model.train(was_training)
    width = max(len(f["input_ids"]) for f in features)
    result = []
    for acc in outs:
        if per_token:
            acc = [np.pad(a, ((0, 0), (0, width - a.shape[1])), constant_values=-np.inf) for a in acc]
        result.append(np.concatenate(acc))
    return result


def evaluate_task(
    model: nn.Module, features: Sequence[dict[str, Any]], spec: TaskSpec, batch_size: int = 64, pad_id: int = 0,
    **forward_kwargs: Any,
) -> dict[str, float]:
    """The task's metrics of ``model`` on labelled ``features`` (argmax, or the value for regression)."""
    (logits,) = predict_logits(model, features, batch_size, pad_id, **forward_kwargs)
    labels = [f["labels"] for f in features]
    preds = logits[:, 0] if spec.is_regression else logits.argmax(-1)
    return compute_metrics(spec, preds, labels)


def majority_baseline(train_labels: Iterable[int], eval_labels: Sequence[int], spec: TaskSpec) -> dict[str, float]:
    """Metrics of always predicting the most frequent training class."""
    if spec.is_regression:
        raise ValueError("a majority baseline needs class labels")
    counts = np.bincount(np.asarray(list(train_labels)), minlength=spec.num_labels)
    return compute_metrics(spec, [int(counts.argmax())] * len(eval_labels), list(eval_labels))


@torch.no_grad()
def evaluate_pretraining(model: nn.Module, batches: Iterable[dict[str, torch.Tensor]]) -> dict[str, float]:
    """MLM accuracy (over masked positions), SOP accuracy and mean loss of a pretraining model."""
    was_training = model.training
    model.eval()
    device = _device_of(model)
    mlm_hit = mlm_n = sop_hit = sop_n = 0
    losses = []
    try:
        for batch in batches:
            batch = {k: v.to(device) for k, v in batch.items()}
            out = model(**batch)
            labels = batch["labels"]
            sel = labels != IGNORE_INDEX
            mlm_hit += int((out["logits"].argmax(-1)[sel] == labels[sel]).sum())
            mlm_n += int(sel.sum())
            sop_hit += int((out["sop_logits"].argmax(-1) == batch["sentence_order_label"]).sum())
            sop_n += int(batch["sentence_order_label"].numel())
            losses.append(float(out["loss"]))
    finally:
        model.train(was_training)
    if not losses:
        raise ValueError("batches must not be empty")
    return {"loss": float(np.mean(losses)), "mlm_accuracy": mlm_hit / max(mlm_n, 1), "sop_accuracy": sop_hit / max(sop_n, 1)}


def evaluate_squad(
    model: nn.Module, examples: Sequence[SquadExample], features: Sequence[dict[str, Any]], batch_size: int = 32,
    pad_id: int = 0, max_answer_len: int = 30,
) -> dict[str, float]:
    """SQuAD exact match and F1 (percent) of a question-answering model."""
    start, end = predict_logits(model, features, batch_size, pad_id, keys=("start_logits", "end_logits"), per_token=True)
    return squad_metrics(best_spans(examples, features, start, end, max_answer_len), examples)
