"""GLUE-format classification/regression tasks: TSV layouts, metrics, few-shot sampling.

Each task's TSV layout (0-based columns, as in the GLUE distribution):

=========  ======  ======  ======  =====  ==================================
task       text_a  text_b  label   header labels (dev file)
=========  ======  ======  ======  =====  ==================================
cola       3       —       1       no     0 1 — Matthews corr.
sst2       0       —       1       yes    0 1 — accuracy
mrpc       3       4       0       yes    0 1 — accuracy, F1
stsb       7       8       last    yes    regression — Pearson, Spearman
qqp        3       4       5       yes    0 1 — accuracy, F1
mnli       8       9       last    yes    contradiction entailment neutral (dev_matched.tsv)
qnli       1       2       last    yes    entailment not_entailment
rte        1       2       last    yes    entailment not_entailment
=========  ======  ======  ======  =====  ==================================

plus two bundled tasks in the SST-2 layout: ``pydoc-topics`` (five topic families of the CPython
reference manual, generated, see :mod:`mpobert.data.corpus`) and ``stdlib-docs`` (eight areas of the
standard library, from docstrings, shipped under ``mpobert/data/tasks/stdlib-docs`` with its provenance).
"""
from __future__ import annotations

import csv
import os
import random
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mpobert.data.corpus import TOPIC_FAMILIES
from mpobert.data.metrics import METRICS
from mpobert.data.tokenizer import WordPieceTokenizer


@dataclass(frozen=True)
class TaskSpec:
    """Layout and metrics of one GLUE-format task.

    Attributes
    ----------
    name : str
        Task name (lowercase).
    text_a, text_b, label : int or None
        Column indices (negative counts from the end); ``text_b`` None for single-sentence tasks.
    header : bool
        Whether the TSV files start with a header row.
    labels : tuple of str or None
        Label strings in id order; None for regression (float labels).
    metrics : tuple of str
        Metric names (keys of :data:`mpobert.data.metrics.METRICS`); the first is the main one.
    dev_file : str
        File name of the dev split.
    """

    name: str
    text_a: int
    text_b: int | None
    label: int
    header: bool
    labels: tuple[str, ...] | None
    metrics: tuple[str, ...]
    dev_file: str = "dev.tsv"

    @property
    def num_labels(self) -> int:
        """Number of classes (1 for regression)."""
        return 1 if self.labels is None else len(self.labels)

    @property
    def is_regression(self) -> bool:
        """Whether labels are real numbers."""
        return self.labels is None


_BIN = ("0", "1")
STDLIB_AREAS = ("text", "datatypes", "numeric", "files", "formats", "concurrency", "internet", "devtools")
"""Labels of the bundled ``stdlib-docs`` task (``scripts/build_stdlib_docs_task.py``)."""
_ENT = ("entailment", "not_entailment")
TASKS: dict[str, TaskSpec] = {
    t.name: t
    for t in (
        TaskSpec("cola", 3, None, 1, False, _BIN, ("matthews_corrcoef",)),
        TaskSpec("sst2", 0, None, 1, True, _BIN, ("accuracy",)),
        TaskSpec("mrpc", 3, 4, 0, True, _BIN, ("accuracy", "f1")),
        TaskSpec("stsb", 7, 8, -1, True, None, ("pearson", "spearman")),
        TaskSpec("qqp", 3, 4, 5, True, _BIN, ("accuracy", "f1")),
        TaskSpec("mnli", 8, 9, -1, True, ("contradiction", "entailment", "neutral"), ("accuracy",), "dev_matched.tsv"),
        TaskSpec("qnli", 1, 2, -1, True, _ENT, ("accuracy",)),
        TaskSpec("rte", 1, 2, -1, True, _ENT, ("accuracy",)),
        TaskSpec("pydoc-topics", 0, None, 1, True, tuple(TOPIC_FAMILIES), ("accuracy", "matthews_corrcoef")),
        TaskSpec("stdlib-docs", 0, None, 1, True, STDLIB_AREAS, ("accuracy", "matthews_corrcoef")),
    )
}
"""Known tasks by name."""

BUNDLED_TASKS = {"stdlib-docs": Path(__file__).resolve().parent / "tasks" / "stdlib-docs"}
"""Tasks shipped with the package (TSV files), by name: their ``data_dir``."""

_ALIASES = {"sst-2": "sst2", "sts-b": "stsb", "mnli-m": "mnli", "pydoc_topics": "pydoc-topics"}


def get_task(name: str) -> TaskSpec:
    """The :class:`TaskSpec` of ``name`` (case-insensitive; ``SST-2``/``STS-B`` spellings accepted)."""
    if not isinstance(name, str):
        raise TypeError(f"task name must be a str, got {type(name).__name__}")
    key = _ALIASES.get(name.lower(), name.lower())
    if key not in TASKS:
        raise ValueError(f"unknown task {name!r}; known: {sorted(TASKS)}")
    return TASKS[key]


@dataclass(frozen=True)
class Example:
    """One labelled example: text(s) and a label id (classification) or value (regression)."""

    text_a: str
    text_b: str | None
    label: int | float


def read_tsv(path: str | os.PathLike, spec: TaskSpec) -> list[Example]:
    """Read one split of ``spec``'s task from a TSV file.

    Parameters
    ----------
    path : path-like
        The TSV file.
    spec : TaskSpec
        Its layout.

    Raises
    ------
    ValueError
        On a missing file, a row with too few columns or an unknown label (the message names file and line).
    """
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{spec.name} data file {str(path)!r} does not exist")
    cols = [c for c in (spec.text_a, spec.text_b, spec.label) if c is not None]
    need = max(c + 1 if c >= 0 else -c for c in cols)
    label_ids = {lab: i for i, lab in enumerate(spec.labels)} if spec.labels else None
    out: list[Example] = []
    with open(path, encoding="utf-8", newline="") as f:
        for lineno, row in enumerate(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE), start=1):
            if spec.header and lineno == 1:
                continue
            if not row or row == [""]:
                continue
            if len(row) < need:
                raise ValueError(f"{path}:{lineno}: expected at least {need} tab-separated columns for {spec.name}, got {len(row)}")
            raw = row[spec.label].strip()
            if label_ids is None:
                try:
                    label: int | float = float(raw)
                except ValueError:
                    raise ValueError(f"{path}:{lineno}: {spec.name} label {raw!r} is not a number") from None
            else:
                if raw not in label_ids:
                    raise ValueError(f"{path}:{lineno}: {spec.name} label {raw!r} is not one of {list(spec.labels)}")
                label = label_ids[raw]
            out.append(Example(row[spec.text_a], None if spec.text_b is None else row[spec.text_b], label))
    if not out:
        raise ValueError(f"{spec.name} data file {str(path)!r} holds no examples")
    return out


def load_split(task: str | TaskSpec, data_dir: str | os.PathLike, split: str) -> list[Example]:
    """Examples of ``split`` (``"train"`` or ``"dev"``) from a GLUE task directory."""
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    if split not in ("train", "dev"):
        raise ValueError(f"split must be 'train' or 'dev', got {split!r}")
    return read_tsv(Path(data_dir) / ("train.tsv" if split == "train" else spec.dev_file), spec)


def encode_examples(examples: Sequence[Example], tokenizer: WordPieceTokenizer, max_seq_len: int = 128) -> list[dict[str, Any]]:
    """Turn examples into model inputs: ``input_ids``, ``token_type_ids`` and ``labels``."""
    a_ids = tokenizer.encode_batch([e.text_a for e in examples])
    pair = [e.text_b is not None for e in examples]
    b_ids = tokenizer.encode_batch([e.text_b for e in examples if e.text_b is not None])
    b_iter = iter(b_ids)
    out = []
    for e, a, has_b in zip(examples, a_ids, pair):
        ids, types = tokenizer.build_pair(a, next(b_iter) if has_b else None, max_seq_len)
        out.append({"input_ids": ids, "token_type_ids": types, "labels": e.label})
    return out


def compute_metrics(task: str | TaskSpec, preds: Sequence, labels: Sequence) -> dict[str, float]:
    """The task's metrics of predictions (class ids, or values for regression) against labels."""
    spec = task if isinstance(task, TaskSpec) else get_task(task)
    return {m: METRICS[m](preds, labels) for m in spec.metrics}


def few_shot(examples: Sequence[Example], k: int, seed: int = 0) -> list[Example]:
    """``k`` examples per class, drawn without replacement with ``seed``, in their original order.

    Raises
    ------
    ValueError
        If ``k`` is not positive, the labels are real-valued, or a class has fewer than ``k`` examples.
    """
    if not isinstance(k, int) or k < 1:
        raise ValueError(f"k must be a positive int, got {k!r}")
    by_class: dict[int, list[int]] = defaultdict(list)
    for i, e in enumerate(examples):
        if isinstance(e.label, float):
            raise ValueError("few-shot sampling needs class labels, got a regression task")
        by_class[e.label].append(i)
    rng = random.Random(seed)
    chosen: list[int] = []
    for label in sorted(by_class):
        idx = by_class[label]
        if len(idx) < k:
            raise ValueError(f"class {label} has {len(idx)} examples, fewer than k={k}")
        chosen += rng.sample(idx, k)
    return [examples[i] for i in sorted(chosen)]
