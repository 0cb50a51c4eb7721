"""Pretraining data: MLM masking, sentence-order prediction, a resumable file stream.

Corpus format (BERT/ALBERT's): plain-text files, one sentence (or line) per
line, documents separated by blank lines. :class:`PretrainingStream` reads the
files lazily, one document at a time, so a corpus larger than memory works; its
position (epoch, file, byte offset of the current document, instances already
taken from it) is a small dict, saved in checkpoints and restored exactly (the
reader and the position: :mod:`mpobert.data.documents`).

Randomness never comes from a global generator: each document's instances are
drawn from ``random.Random(f"{seed}:{epoch}:{file}:{offset}")``, so an instance
depends only on where it is in the corpus. Resuming from a position therefore
reproduces exactly the instances an uninterrupted run would have seen.
"""
from __future__ import annotations

import os
import random
from collections.abc import Sequence
from typing import Any

import torch
from torch.utils.data import IterableDataset

from mpobert.data.documents import DocumentStream, corpus_files, read_documents  # noqa: F401 (re-exported)
from mpobert.data.tokenizer import WordPieceTokenizer

IGNORE_INDEX = -100
"""Label value for positions that carry no MLM loss (torch's cross-entropy default)."""


def mask_tokens(
    input_ids: Sequence[int],
    special_ids: frozenset[int] | set[int],
    vocab_size: int,
    rng: random.Random,
    mlm_probability: float = 0.15,
    mask_id: int = 4,
) -> tuple[list[int], list[int]]:
    """BERT masking: pick ``round(p·n)`` (at least 1) of the ``n`` non-special positions.

    Of the picked positions, 80% become ``mask_id``, 10% a random non-special token,
    10% stay as they are. Special tokens are never picked.

    Parameters
    ----------
    input_ids : sequence of int
        One sequence, special tokens included.
    special_ids : set of int
        Ids never masked and never drawn as random replacements.
    vocab_size : int
        Random replacements are drawn from ``range(vocab_size)`` minus ``special_ids``.
    rng : random.Random
        Source of randomness.
    mlm_probability : float
        Fraction of candidate positions to predict, in (0, 1].
    mask_id : int
        Id of ``[MASK]``.

    Returns
    -------
    masked_ids, labels : list of int
        ``labels`` holds the original id at picked positions and ``IGNORE_INDEX`` elsewhere.
    """
    if not 0.0 < mlm_probability <= 1.0:
        raise ValueError(f"mlm_probability must be in (0, 1], got {mlm_probability!r}")
    if vocab_size <= len(special_ids):
        raise ValueError(f"vocab_size ({vocab_size}) must exceed the number of special ids ({len(special_ids)})")
    ids = list(input_ids)
    labels = [IGNORE_INDEX] * len(ids)
    candidates = [i for i, t in enumerate(ids) if t not in special_ids]
    if not candidates:
        return ids, labels
    n_mask = min(len(candidates), max(1, round(mlm_probability * len(candidates))))
    for pos in sorted(rng.sample(candidates, n_mask)):
        labels[pos] = ids[pos]
        r = rng.random()
        if r < 0.8:
            ids[pos] = mask_id
        elif r < 0.9:
            tok = rng.randrange(vocab_size)
            while tok in special_ids:
                tok = rng.randrange(vocab_size)
            ids[pos] = tok
    return ids, labels


def sop_instances(
    segments: Sequence[Sequence[int]], max_seq_len: int, rng: random.Random
) -> list[tuple[list[int], list[int], int]]:
    """Pack one document's segments into sentence-order-prediction pairs (ALBERT's recipe).

    Consecutive segments are accumulated until they fill ``max_seq_len - 3`` tokens
    (or the document ends); the chunk is cut at a random segment boundary into A
    and B (a one-segment chunk is cut at a random token), the pair is swapped with
    probability 0.5 (label 1 = swapped, 0 = in order) and the longer side is
    trimmed, from a random end, until the pair fits.

    Parameters
    ----------
    segments : sequence of sequence of int
        The document's sentences as token ids (no special tokens).
    max_seq_len : int
        Length bound including ``[CLS]`` and two ``[SEP]``.
    rng : random.Random
        Source of randomness.

    Returns
    -------
    list of (tokens_a, tokens_b, sop_label)
    """
    if max_seq_len < 5:
        raise ValueError(f"max_seq_len must be >= 5 for a sentence pair, got {max_seq_len!r}")
    target = max_seq_len - 3
    out: list[tuple[list[int], list[int], int]] = []
    chunk: list[list[int]] = []
    length = 0
    segs = [list(s) for s in segments if len(s) > 0]
    for i, seg in enumerate(segs):
        chunk.append(seg)
        length += len(seg)
        if i == len(segs) - 1 or length >= target:
            if len(chunk) >= 2:
                a_end = rng.randint(1, len(chunk) - 1)
                a = [t for s in chunk[:a_end] for t in s]
                b = [t for s in chunk[a_end:] for t in s]
            elif len(chunk[0]) >= 2:
                seg = chunk[0][:target]  # one segment: cut it at a random token
                cut = rng.randint(1, len(seg) - 1)
                a, b = seg[:cut], seg[cut:]
            else:
                a, b = [], []
            chunk, length = [], 0
            if not a or not b:
                continue
            while len(a) + len(b) > target:
                longer = a if len(a) >= len(b) else b
                del longer[0 if rng.random() < 0.5 else -1]
            label = 0
            if rng.random() < 0.5:
                a, b, label = b, a, 1
            out.append((a, b, label))
    return out


class PretrainingStream(DocumentStream, IterableDataset):
    """MLM + SOP instances streamed from plain-text corpus files, with a resumable position.

    Each item is a dict with ``input_ids``, ``token_type_ids``, ``labels`` (MLM,
    ``IGNORE_INDEX`` where no loss) and ``sentence_order_label``, all lists of int
    (the label an int). Iteration continues from the current position and, with
    ``loop=True``, starts a new epoch at the end of the last file. Use it with
    ``num_workers=0`` (its position is tracked in the consuming process). The reading and the
    position are :class:`~mpobert.data.documents.DocumentStream`'s.

    Parameters
    ----------
    files : sequence of path-like
        Corpus files (UTF-8; one sentence per line; blank line between documents).
    tokenizer : WordPieceTokenizer
        Tokenizer providing ids and special tokens.
    max_seq_len : int
        Sequence length bound (special tokens included).
    mlm_probability : float
        Masking rate.
    seed : int
        Seed of the per-document random streams.
    loop : bool
        Start over (next epoch) after the last file instead of stopping.
    """

    nothing = "sentence pairs"

    def __init__(
        self,
        files: Sequence[str | os.PathLike],
        tokenizer: WordPieceTokenizer,
        max_seq_len: int = 128,
        mlm_probability: float = 0.15,
        seed: int = 0,
        loop: bool = True,
    ) -> None:
        DocumentStream.__init__(self, files, loop)
        if not isinstance(tokenizer, WordPieceTokenizer):
            raise TypeError(f"tokenizer must be a WordPieceTokenizer, got {type(tokenizer).__name__}")
        if not isinstance(max_seq_len, int) or max_seq_len < 5:
            raise ValueError(f"max_seq_len must be an int >= 5, got {max_seq_len!r}")
        if not 0.0 < mlm_probability <= 1.0:
            raise ValueError(f"mlm_probability must be in (0, 1], got {mlm_probability!r}")
        self.tokenizer = tokenizer
        self.max_seq_len = max_seq_len
        self.mlm_probability = mlm_probability
        self.seed = int(seed)

    def document_items(self, epoch: int, file_idx: int, offset: int, doc: int, lines: Sequence[str]) -> list[Any]:
        return self.document_instances(epoch, file_idx, offset, lines)

    def document_instances(self, epoch: int, file_idx: int, offset: int, sentences: Sequence[str]) -> list[dict[str, Any]]:
        """The (deterministic) instances of the document starting at ``offset`` in file ``file_idx``."""
        rng = random.Random(f"{self.seed}:{epoch}:{file_idx}:{offset}")
        tok = self.tokenizer
        segments = tok.encode_batch(list(sentences))
        out = []
        for a, b, sop in sop_instances(segments, self.max_seq_len, rng):
            ids, types = tok.build_pair(a, b, self.max_seq_len)
            masked, labels = mask_tokens(ids, tok.special_ids, tok.vocab_size, rng, self.mlm_probability, tok.mask_id)
            out.append({"input_ids": masked, "token_type_ids": types, "labels": labels, "sentence_order_label": sop})
        return out


def pad_collate(items: Sequence[dict[str, Any]], pad_id: int = 0) -> dict[str, torch.Tensor]:
    """Stack instances into a batch, right-padding sequence fields to the longest item.

    Sequence fields (lists) are padded with ``pad_id`` (``input_ids``,
    ``token_type_ids``: 0; ``labels`` as lists: ``IGNORE_INDEX``); an
    ``attention_mask`` is added; scalar fields (``sentence_order_label``, a
    classification ``labels`` int or float) become 1-D tensors.
    """
    if not items:
        raise ValueError("pad_collate needs at least one item")
    length = max(len(it["input_ids"]) for it in items)
    batch: dict[str, torch.Tensor] = {}
    for key in items[0]:
        vals = [it[key] for it in items]
        if isinstance(vals[0], list):
            fill = pad_id if key == "input_ids" else (IGNORE_INDEX if key == "labels" else 0)
            batch[key] = torch.tensor([v + [fill] * (length - len(v)) for v in vals], dtype=torch.long)
        elif isinstance(vals[0], float):
            batch[key] = torch.tensor(vals, dtype=torch.float32)
        elif isinstance(vals[0], int):
            batch[key] = torch.tensor(vals, dtype=torch.long)
        else:
            raise TypeError(f"cannot collate field {key!r} of type {type(vals[0]).__name__}")
    batch["attention_mask"] = torch.tensor(
        [[1] * len(it["input_ids"]) + [0] * (length - len(it["input_ids"])) for it in items], dtype=torch.long
    )
    return batch
