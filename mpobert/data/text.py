"""Plain text for models with a Hugging Face tokenizer: a resumable stream of token sequences with held-out documents.

The corpus format is pretraining's (one sentence per line, a blank line between documents) and
the documents are read by the same resumable reader (:func:`~mpobert.data.pretraining.read_documents`).
Used by distillation (teacher-matching on text) and by any workflow that feeds a
``transformers`` tokenizer's ids to a model: no labels, no masking, only ``input_ids``.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from mpobert.data.pretraining import corpus_files, pad_collate, read_documents

__all__ = ["TextStream", "heldout_batches"]


class TextStream:
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
        self.files = corpus_files(files)
        if not isinstance(max_seq_len, int) or max_seq_len < 4:
            raise ValueError(f"max_seq_len must be an int >= 4, got {max_seq_len!r}")
        if split not in ("train", "heldout"):
            raise ValueError(f"split must be 'train' or 'heldout', got {split!r}")
        if not isinstance(holdout_every, int) or holdout_every < 0 or (split == "heldout" and holdout_every == 0):
            raise ValueError(f"holdout_every must be an int >= 0 (>= 1 for the held-out split), got {holdout_every!r}")
        self.tokenizer, self.max_seq_len, self.split = tokenizer, max_seq_len, split
        self.holdout_every, self.loop = holdout_every, loop
        self._pos = {"epoch": 0, "file": 0, "offset": 0, "doc": 0, "skip": 0}

    def state_dict(self) -> dict[str, int]:
        """Position after the last sequence handed out."""
        return dict(self._pos)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a :meth:`state_dict`."""
        if not isinstance(state, dict) or set(state) != set(self._pos):
            raise ValueError(f"text stream state must have keys {sorted(self._pos)}, got {state!r}")
        if not 0 <= state["file"] < len(self.files):
            raise ValueError(f"text stream state names file {state['file']}, the stream has {len(self.files)}")
        self._pos = {k: int(v) for k, v in state.items()}

    def _wanted(self, doc: int) -> bool:
        held = self.holdout_every > 0 and doc % self.holdout_every == 0
        return held == (self.split == "heldout")

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

    def __iter__(self) -> Iterator[dict[str, list[int]]]:
        produced = False
        while True:
            epoch, file_idx = self._pos["epoch"], self._pos["file"]
            doc = self._pos["doc"]
            for start, nxt, lines in read_documents(self.files[file_idx], self._pos["offset"]):
                if self._wanted(doc):
                    skip = self._pos["skip"] if start == self._pos["offset"] else 0
                    seqs = self.pack(lines)
                    for k in range(skip, len(seqs)):
                        self._pos = {"epoch": epoch, "file": file_idx, "offset": start, "doc": doc, "skip": k + 1}
                        produced = True
                        yield {"input_ids": seqs[k]}
                doc += 1
                self._pos = {"epoch": epoch, "file": file_idx, "offset": nxt, "doc": doc, "skip": 0}
            if file_idx + 1 < len(self.files):
                self._pos = {"epoch": epoch, "file": file_idx + 1, "offset": 0, "doc": doc, "skip": 0}
                continue
            if not produced:
                raise ValueError(f"corpus files {[str(f) for f in self.files]} yield no {self.split} text")
            if not self.loop:
                return
            self._pos = {"epoch": epoch + 1, "file": 0, "offset": 0, "doc": 0, "skip": 0}
            produced = False


def heldout_batches(stream: TextStream, batch_size: int, max_sequences: int, pad_id: int) -> list[dict[str, torch.Tensor]]:
    """Up to ``max_sequences`` held-out sequences of ``stream`` (a non-looping stream) in batches."""
    items = [x for _, x in zip(range(max_sequences), stream)]
    if not items:
        raise ValueError("the held-out text yields no sequence")
    return [pad_collate(items[i : i + batch_size], pad_id) for i in range(0, len(items), batch_size)]
