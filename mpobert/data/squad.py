"""SQuAD v1.1: JSON reading, the official EM/F1 metric, features and span decoding.

The metric follows the official ``evaluate-v1.1.py``: answers are normalised
(lowercase, punctuation and the articles a/an/the removed, whitespace
collapsed); exact match and token-level F1 are maximised over the gold answers
of each question and averaged, as percentages.
"""
from __future__ import annotations

import collections
import json
import os
import re
import string
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mpobert.data.tokenizer import WordPieceTokenizer


@dataclass(frozen=True)
class SquadExample:
    """One question: id, question, context, gold answer texts and their character starts."""

    qid: str
    question: str
    context: str
    answers: tuple[str, ...]
    answer_starts: tuple[int, ...]


def read_squad(path: str | os.PathLike) -> list[SquadExample]:
    """Read a SQuAD v1.1 JSON file (``{"data": [{"paragraphs": [{"context", "qas"}]}]}``)."""
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"SQuAD file {os.fspath(path)!r} does not exist") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"SQuAD file {os.fspath(path)!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("data"), list):
        raise ValueError(f"SQuAD file {os.fspath(path)!r} lacks a top-level 'data' list")
    out = []
    for article in data["data"]:
        for para in article.get("paragraphs", []):
            ctx = para["context"]
            for qa in para["qas"]:
                answers = tuple(a["text"] for a in qa.get("answers", []))
                starts = tuple(int(a["answer_start"]) for a in qa.get("answers", []))
                out.append(SquadExample(str(qa["id"]), qa["question"], ctx, answers, starts))
    if not out:
        raise ValueError(f"SQuAD file {os.fspath(path)!r} holds no questions")
    return out


def normalize_answer(s: str) -> str:
    """Lowercase, drop punctuation, drop articles (a, an, the), collapse whitespace (official SQuAD)."""
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def exact_match_score(prediction: str, ground_truth: str) -> float:
    """1.0 when the normalised strings are equal, else 0.0."""
    return float(normalize_answer(prediction) == normalize_answer(ground_truth))


def f1_score(prediction: str, ground_truth: str) -> float:
    """Token-level F1 of the normalised strings (0 when they share no token)."""
    pred, gold = normalize_answer(prediction).split(), normalize_answer(ground_truth).split()
    common = collections.Counter(pred) & collections.Counter(gold)
    num_same = sum(common.values())
    if num_same == 0:
        return 0.0
    precision, recall = num_same / len(pred), num_same / len(gold)
    return 2 * precision * recall / (precision + recall)


def squad_metrics(predictions: Mapping[str, str], examples: Sequence[SquadExample]) -> dict[str, float]:
    """``{"exact_match", "f1"}`` in percent over ``examples`` (a missing prediction scores 0)."""
    if not examples:
        raise ValueError("examples must not be empty")
    em = f1 = 0.0
    for ex in examples:
        if not ex.answers:
            raise ValueError(f"question {ex.qid!r} has no gold answer")
        pred = predictions.get(ex.qid, "")
        em += max(exact_match_score(pred, g) for g in ex.answers)
        f1 += max(f1_score(pred, g) for g in ex.answers)
    return {"exact_match": 100.0 * em / len(examples), "f1": 100.0 * f1 / len(examples)}


def squad_features(
    examples: Sequence[SquadExample], tokenizer: WordPieceTokenizer, max_seq_len: int = 384,
    doc_stride: int = 128, max_query_len: int = 64,
) -> list[dict[str, Any]]:
    """Windowed model inputs ``[CLS] question [SEP] context-window [SEP]``.

    A context longer than the window is covered by windows overlapping by
    ``doc_stride`` tokens. Each feature holds ``input_ids``, ``token_type_ids``,
    ``start_positions``/``end_positions`` (token indices of the first gold answer,
    0 = ``[CLS]`` when the answer is not inside the window) and, for decoding,
    ``example_index`` and ``offsets`` (character span per token, None outside the context).
    """
    if max_seq_len < max_query_len + 4:
        raise ValueError(f"max_seq_len ({max_seq_len}) must exceed max_query_len + 3 ({max_query_len + 3})")
    if not 0 < doc_stride < max_seq_len:
        raise ValueError(f"doc_stride must be in (0, max_seq_len), got {doc_stride!r}")
    tok = tokenizer.backend
    feats: list[dict[str, Any]] = []
    for ei, ex in enumerate(examples):
        q = tokenizer.encode(ex.question)[:max_query_len]
        enc = tok.encode(ex.context, add_special_tokens=False)
        ctx_ids, ctx_off = enc.ids, enc.offsets
        window = max_seq_len - len(q) - 3
        start_char = ex.answer_starts[0] if ex.answer_starts else -1
        end_char = start_char + len(ex.answers[0]) if ex.answers else -1
        lo = 0
        while True:
            hi = min(lo + window, len(ctx_ids))
            ids = [tokenizer.cls_id, *q, tokenizer.sep_id, *ctx_ids[lo:hi], tokenizer.sep_id]
            types = [0] * (len(q) + 2) + [1] * (hi - lo + 1)
            base = len(q) + 2
            offsets: list[tuple[int, int] | None] = [None] * base + list(ctx_off[lo:hi]) + [None]
            s_pos = e_pos = 0
            if start_char >= 0 and hi > lo and ctx_off[lo][0] <= start_char and ctx_off[hi - 1][1] >= end_char:
                # first token ending after the answer start, last token starting before its end
                s_pos = base + next(i for i in range(lo, hi) if ctx_off[i][1] > start_char) - lo
                e_pos = base + max(i for i in range(lo, hi) if ctx_off[i][0] < end_char) - lo
            feats.append({"input_ids": ids, "token_type_ids": types, "start_positions": s_pos,
                          "end_positions": e_pos, "example_index": ei, "offsets": offsets})
            if hi >= len(ctx_ids):
                break
            lo += doc_stride
    return feats


def best_spans(
    examples: Sequence[SquadExample], features: Sequence[dict[str, Any]], start_logits: np.ndarray,
    end_logits: np.ndarray, max_answer_len: int = 30,
) -> dict[str, str]:
    """Decode the highest-scoring context span (start ≤ end < start + max_answer_len) per question."""
    if len(features) != len(start_logits) or len(features) != len(end_logits):
        raise ValueError(f"got {len(start_logits)}/{len(end_logits)} logit rows for {len(features)} features")
    best: dict[int, tuple[float, str]] = {}
    for f, sl, el in zip(features, start_logits, end_logits):
        offs = f["offsets"]
        valid = np.array([o is not None for o in offs] + [False] * (len(sl) - len(offs)))
        s = np.where(valid, sl, -np.inf)
        e = np.where(valid, el, -np.inf)
        score = s[:, None] + e[None, :]
        n = len(s)
        i, j = np.indices((n, n))
        score[(j < i) | (j - i >= max_answer_len)] = -np.inf
        k = int(np.argmax(score))
        si, ej = divmod(k, n)
        if not np.isfinite(score[si, ej]):
            continue
        ctx = examples[f["example_index"]].context
        text = ctx[offs[si][0] : offs[ej][1]]
        ei = f["example_index"]
        if ei not in best or score[si, ej] > best[ei][0]:
            best[ei] = (float(score[si, ej]), text)
    return {examples[ei].qid: text for ei, (_, text) in best.items()}
