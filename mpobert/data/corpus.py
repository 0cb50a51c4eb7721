"""The bundled corpus: CPython's own documentation text (``pydoc_data.topics``).

No downloads: every CPython ships ``pydoc_data.topics.topics``, a dict from a
help topic (``"if"``, ``"typesseq"``, ...) to its reference-manual text. Here it
becomes

* a pretraining corpus: each paragraph is a document, its sentences the lines, in
  the usual plain-text format (one sentence per line, a blank line between
  documents), see :func:`write_pydoc_corpus`;
* a small real classification task, ``pydoc-topics``: from which family of the
  manual (statements, expressions, data model, built-in types, lexical analysis
  and execution) a paragraph comes, with a fixed seeded train/dev split written as
  GLUE-style TSV, see :func:`write_pydoc_topic_task`.
"""
from __future__ import annotations

import os
import random
import re
from pathlib import Path
from typing import BinaryIO

from mpo_core.io import atomic_write

TOPIC_FAMILIES: dict[str, tuple[str, ...]] = {
    "statements": (
        "assert", "assignment", "async", "augassign", "break", "class", "compound", "continue", "del",
        "else", "for", "function", "global", "if", "import", "nonlocal", "pass", "raise", "return",
        "try", "while", "with", "yield",
    ),
    "expressions": (
        "atom-identifiers", "atom-literals", "attribute-references", "await", "binary", "bitwise",
        "booleans", "calls", "comparisons", "conversions", "dict", "exprlists", "in", "lambda", "lists",
        "operator-summary", "power", "shifting", "slicings", "subscriptions", "unary",
    ),
    "datamodel": (
        "attribute-access", "callable-types", "context-managers", "customization", "numeric-types",
        "objects", "sequence-types", "specialattrs", "specialnames", "types",
    ),
    "builtins": (
        "bltin-code-objects", "bltin-ellipsis-object", "bltin-null-object", "bltin-type-objects",
        "formatstrings", "string-methods", "truth", "typesfunctions", "typesmapping", "typesmethods",
        "typesmodules", "typesseq", "typesseq-mutable",
    ),
    "lexical_execution": (
        "debugger", "dynamic-features", "exceptions", "execmodel", "floating", "id-classes",
        "identifiers", "imaginary", "integers", "naming", "numbers", "strings",
    ),
}
"""Topic family → the ``pydoc_data.topics`` keys it groups (topics not listed are ignored)."""

_SENTENCE_END = re.compile(r"(?<=[.!?])\s+(?=[A-Z\"'(\[])")
_UNDERLINE = re.compile(r"^[*=\-~^]{3,}$")


def split_sentences(text: str) -> list[str]:
    """Split a paragraph into sentences at ``. ! ?`` followed by a capitalised word.

    Parameters
    ----------
    text : str
        One paragraph (internal newlines are treated as spaces).
    """
    flat = " ".join(text.split())
    return [s for s in _SENTENCE_END.split(flat) if s]


def pydoc_paragraphs(min_chars: int = 40) -> list[tuple[str, str]]:
    """``(family, paragraph)`` pairs from ``pydoc_data.topics``, deduplicated.

    Paragraphs are separated by blank lines; heading underlines are dropped; a
    paragraph that occurs under topics of two different families (the manual
    repeats some sections) is dropped as ambiguous, repeats within one family are
    kept once. Order is deterministic (families, topics and paragraphs in
    manual order).

    Parameters
    ----------
    min_chars : int
        Drop paragraphs shorter than this (after whitespace normalisation).
    """
    from pydoc_data.topics import topics

    if not isinstance(min_chars, int) or min_chars < 0:
        raise ValueError(f"min_chars must be a non-negative int, got {min_chars!r}")
    seen: dict[str, str] = {}
    order: list[str] = []
    for family, names in TOPIC_FAMILIES.items():
        for name in names:
            for block in re.split(r"\n\s*\n", topics.get(name, "")):
                lines = [ln for ln in block.splitlines() if not _UNDERLINE.match(ln.strip())]
                para = " ".join(" ".join(lines).split())
                if len(para) < min_chars:
                    continue
                if para not in seen:
                    seen[para] = family
                    order.append(para)
                elif seen[para] != family:
                    seen[para] = ""  # ambiguous: dropped below
    return [(seen[p], p) for p in order if seen[p]]


def pydoc_documents(min_chars: int = 40) -> list[list[str]]:
    """The pretraining corpus: one document per paragraph, as a list of sentences."""
    return [split_sentences(p) for _, p in pydoc_paragraphs(min_chars)]


def write_corpus(documents: list[list[str]], path: str | os.PathLike) -> Path:
    """Write documents as plain text: one sentence per line, a blank line between documents.

    Sentences must not contain newlines (they would split the document).
    """
    path = Path(path)

    def write(f: BinaryIO) -> None:
        for doc in documents:
            lines = [" ".join(s.split()) for s in doc]
            lines = [s for s in lines if s]
            if lines:
                f.write(("\n".join(lines) + "\n\n").encode("utf-8"))

    atomic_write(path, write)  # creates the folder
    return path


def write_pydoc_corpus(path: str | os.PathLike) -> Path:
    """Write the bundled pydoc pretraining corpus to ``path`` (see :func:`write_corpus`)."""
    return write_corpus(pydoc_documents(), path)


def write_pydoc_topic_task(out_dir: str | os.PathLike, seed: int = 0, dev_fraction: float = 0.2) -> Path:
    """Write the ``pydoc-topics`` classification task as ``train.tsv`` and ``dev.tsv``.

    The format is GLUE's SST-2 layout: a header ``sentence\\tlabel`` and one
    example per row, the label being the family name. The split is stratified
    per family and fixed by ``seed``.

    Parameters
    ----------
    out_dir : path-like
        Directory to write into (created if needed).
    seed : int
        Seed of the train/dev split.
    dev_fraction : float
        Fraction of each family's paragraphs that go to dev, in (0, 1).

    Returns
    -------
    Path
        ``out_dir``.
    """
    if not 0.0 < dev_fraction < 1.0:
        raise ValueError(f"dev_fraction must be in (0, 1), got {dev_fraction!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    by_family: dict[str, list[str]] = {f: [] for f in TOPIC_FAMILIES}
    for family, para in pydoc_paragraphs():
        by_family[family].append(para)
    rng = random.Random(seed)
    train: list[tuple[str, str]] = []
    dev: list[tuple[str, str]] = []
    for family, paras in by_family.items():
        paras = paras[:]
        rng.shuffle(paras)
        n_dev = max(1, round(dev_fraction * len(paras)))
        dev += [(p, family) for p in paras[:n_dev]]
        train += [(p, family) for p in paras[n_dev:]]
    rng.shuffle(train)
    rng.shuffle(dev)
    for name, rows in (("train.tsv", train), ("dev.tsv", dev)):
        text = "sentence\tlabel\n" + "".join(f"{text}\t{label}\n" for text, label in rows)  # paragraphs hold no tab/newline
        atomic_write(out / name, text.encode("utf-8"))
    return out
