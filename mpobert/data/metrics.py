"""Evaluation metrics of GLUE (accuracy, F1, Matthews, Pearson, Spearman) in NumPy."""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def _pair(preds: Sequence, labels: Sequence, dtype=None) -> tuple[np.ndarray, np.ndarray]:
    p, y = np.asarray(preds, dtype=dtype), np.asarray(labels, dtype=dtype)
    if p.ndim != 1 or y.ndim != 1:
        raise ValueError(f"preds and labels must be 1-D, got shapes {p.shape} and {y.shape}")
    if p.shape != y.shape:
        raise ValueError(f"preds and labels must have the same length, got {p.shape[0]} and {y.shape[0]}")
    if p.size == 0:
        raise ValueError("preds and labels must not be empty")
    return p, y


def accuracy(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Fraction of ``preds`` equal to ``labels``."""
    p, y = _pair(preds, labels)
    return float(np.mean(p == y))


def f1_binary(preds: Sequence[int], labels: Sequence[int], positive: int = 1) -> float:
    """F1 of the ``positive`` class: ``2·tp / (2·tp + fp + fn)`` (0 when there is no positive at all)."""
    p, y = _pair(preds, labels)
    tp = np.sum((p == positive) & (y == positive))
    fp = np.sum((p == positive) & (y != positive))
    fn = np.sum((p != positive) & (y == positive))
    denom = 2 * tp + fp + fn
    return float(2 * tp / denom) if denom else 0.0


def matthews_corrcoef(preds: Sequence[int], labels: Sequence[int]) -> float:
    """Matthews correlation coefficient, multiclass form (Gorodkin 2004); 0 when undefined.

    For two classes it equals ``(tp·tn − fp·fn) / sqrt((tp+fp)(tp+fn)(tn+fp)(tn+fn))``.
    """
    p, y = _pair(preds, labels)
    classes = np.union1d(p, y)
    idx_p, idx_y = np.searchsorted(classes, p), np.searchsorted(classes, y)
    c = np.zeros((classes.size, classes.size), dtype=np.float64)
    np.add.at(c, (idx_y, idx_p), 1.0)
    t, pk = c.sum(axis=1), c.sum(axis=0)  # true and predicted counts per class
    n, correct = c.sum(), np.trace(c)
    cov_yp = correct * n - t @ pk
    cov_pp = n * n - pk @ pk
    cov_yy = n * n - t @ t
    denom = np.sqrt(cov_pp * cov_yy)
    return float(cov_yp / denom) if denom > 0 else 0.0


def pearson(preds: Sequence[float], labels: Sequence[float]) -> float:
    """Pearson correlation; 0 when either side is constant."""
    p, y = _pair(preds, labels, np.float64)
    p, y = p - p.mean(), y - y.mean()
    denom = np.sqrt((p @ p) * (y @ y))
    return float(p @ y / denom) if denom > 0 else 0.0


def _ranks(x: np.ndarray) -> np.ndarray:
    """1-based ranks with ties given their average rank."""
    order = np.argsort(x, kind="mergesort")
    sorted_x = x[order]
    ranks = np.empty(x.size, dtype=np.float64)
    starts = np.flatnonzero(np.r_[True, sorted_x[1:] != sorted_x[:-1]])
    ends = np.r_[starts[1:], x.size]
    for s, e in zip(starts, ends):
        ranks[order[s:e]] = (s + e + 1) / 2.0
    return ranks


def spearman(preds: Sequence[float], labels: Sequence[float]) -> float:
    """Spearman rank correlation (Pearson of average ranks); 0 when either side is constant."""
    p, y = _pair(preds, labels, np.float64)
    return pearson(_ranks(p), _ranks(y))


METRICS = {
    "accuracy": accuracy,
    "f1": f1_binary,
    "matthews_corrcoef": matthews_corrcoef,
    "pearson": pearson,
    "spearman": spearman,
}
"""Metric name → function ``(preds, labels) -> float``."""
