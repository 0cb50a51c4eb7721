"""Plain text for models with a Hugging Face tokenizer: a resumable stream of token sequences with held-out documents.

The corpus format is pretraining's (one sentence per line, a blank line between documents) and
the documents are read, and the position kept, by the same resumable reader
(:class:`~mpobert.data.documents.DocumentStream`).
Used by distillation (teacher-matching on text) and by any workflow that feeds a
``transformers`` tokenizer's ids to a model: no labels, no masking, only ``input_ids``.
"""
from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import torch

from mpobert.data.documents import DocumentStream
from mpobert.data.pretraining import pad_collate

__all__ = ["TextStream", "heldout_batches"]


class TextStream(DocumentStream):
    """Token sequences from plain-text files, streamed, resumable, with held-out documents.

    A document is a run of non-empty lines (blank lines separate documents). Its lines are
    tokenized and packed greedily into sequences of at most ``max_seq_len`` tokens (special
    tokens included; a longer line is cut). Document ``k`` (0-based, counted over all files)
    is held out when ``k % holdout_every == 0``: the ``"train"`` split skips those documents,
    the ``"heldout"`` split yields only them (``holdout_every = 0``: nothing held out).

    Parameters
    ----------
    files : sequence of path-like
    tokenizer : transformers tokenizer
        A ``transformers`` tokenizer (``__call__`` with ``truncation``/``max_length``).
    max_seq_len : int
    split : {"train", "heldout"}
    holdout_every : int
    loop : bool
        Start a new epoch after the last file (the training stream); otherwise stop.
    """

    def __init__(self, files: Sequence[str | os.PathLike], tokenizer: Any, max_seq_len: int = 128, split: str = "train",
                 holdout_every: int = 20, loop: bool = True) -> None:
        super().__init__(files, loop, count_documents=True)
        if not isinstance(max_seq_len, int) or max_seq_len < 4:
            raise ValueError(f"max_seq_len must be an int >= 4, got {max_seq_len!r}")
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if not isinstance(holdout_every, int) or holdout_every < 0 or (split == "heldout" and holdout_every == 0):
            raise ValueError(f"holdout_every must be an int >= 0 (>= 1 for the held-out split), got {holdout_every!r}")
        self.tokenizer, self.max_seq_len, self.split = tokenizer, max_seq_len, split
        self.holdout_every = holdout_every
        self.nothing = f"{split} text"

    def _wanted(self, doc: int) -> bool:
        held = self.holdout_every > 0 and doc % self.holdout_every == 0
        return held == (self.split == "heldout")

    def document_items(self, epoch: int, file_idx: int, offset: int, doc: int,
                       lines: Sequence[str]) -> list[dict[str, list[int]]]:
        """The packed sequences of document ``doc`` when this split wants it, else none."""
        return [{"input_ids": ids} for ids in self.pack(lines)] if self._wanted(doc) else []

    def pack(self, lines: Sequence[str]) -> list[list[int]]:
        """Token ids of ``lines`` grouped greedily into sequences of at most ``max_seq_len`` tokens
        (special tokens added by the tokenizer; a group is cut at ``max_seq_len``)."""
        tok = self.tokenizer
        room = self.max_seq_len - tok.num_special_tokens_to_add(pair=False)
        groups, cur, used = [], [], 0
        counted = tok(list(lines), add_special_tokens=False, truncation=True, max_length=room)["input_ids"]
        for line, ids in zip(lines, counted):
            if cur and used + len(ids) > room:
                groups.append(" ".join(cur))
                cur, used = [], 0
            cur.append(line)
            used += len(ids)
        if cur:
            groups.append(" ".join(cur))
        return tok(groups, truncation=True, max_length=self.max_seq_len)["input_ids"]


def heldout_batches(stream: TextStream, batch_size: int, max_sequences: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Up to ``max_sequences`` held-out sequences of ``stream`` (a non-looping stream) in batches."""
    items = [x for _, x in zip(range(max_sequences), stream)]
    if not items:
        raise ValueError("the held-out text yields no sequence")
    return [pad_collate(items[i : i + batch_size], pad_id) for i in range(0, len(items), batch_size)]
