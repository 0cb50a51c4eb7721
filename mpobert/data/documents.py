"""Corpus files and the one resumable reader of their documents.

Corpus format (BERT/ALBERT's): plain-text UTF-8 files, one sentence (or line) per line,
documents separated by blank lines. :func:`read_documents` reads a file lazily from a byte
offset, one document at a time, so a corpus larger than memory works.
:class:`DocumentStream` turns each document into items (a subclass's
:meth:`~DocumentStream.document_items`) and keeps its position (epoch, file, byte offset of the
current document, items already taken from it, and optionally the document count) as a small
dict, saved in checkpoints and restored exactly. :class:`~mpobert.data.pretraining.PretrainingStream`
(MLM + SOP) and :class:`~mpobert.data.text.TextStream` (token sequences for a Hugging Face
tokenizer) are its two kinds.
"""
from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

__all__ = ["corpus_files", "read_documents", "DocumentStream"]


def corpus_files(files: str | os.PathLike | Sequence[str | os.PathLike]) -> list[Path]:
    """``files`` (one path or several) as a list of existing text files; a ValueError naming the problem otherwise."""
    if isinstance(files, (str, os.PathLike)):
        files = [files]
    paths = [Path(f) for f in files]
    if not paths:
        raise ValueError("files must name at least one corpus file")
    for f in paths:
        if not f.is_file():
            raise ValueError(f"corpus file {str(f)!r} does not exist")
    return paths


def read_documents(path: str | os.PathLike, offset: int = 0) -> Iterator[tuple[int, int, list[str]]]:
    """The documents of a corpus file from byte ``offset`` on: ``(start_offset, next_offset, lines)`` each.

    A document is a run of non-empty lines (stripped); blank lines separate documents. The offsets
    are byte positions, so a stream that remembers ``start_offset`` resumes at that document.
    """
    with open(path, "rb") as f:
        f.seek(offset)
        start, lines = offset, []
        pos = offset
        for raw in iter(f.readline, b""):
            pos += len(raw)
            line = raw.decode("utf-8").strip()
            if line:
                lines.append(line)
            else:
                if lines:
                    yield start, pos, lines
                start, lines = pos, []
        if lines:
            yield start, pos, lines


class DocumentStream:
    """Items made from the documents of corpus files, with a resumable position.

    Iteration continues from the current position and, with ``loop=True``, starts a new epoch at
    the end of the last file (an epoch that yields nothing is a ``ValueError``). The position is
    ``{"epoch", "file", "offset", "skip"}`` (plus ``"doc"``, the 0-based document count over the
    files of this epoch, when ``count_documents``): :meth:`state_dict` / :meth:`load_state_dict`.
    Use it with ``num_workers=0`` (the position is tracked in the consuming process).

    Subclasses give :meth:`document_items` and :attr:`nothing` (what an empty epoch lacks, for its message).
    """

    nothing = "items"

    def __init__(self, files: Sequence[str | os.PathLike], loop: bool = True, count_documents: bool = False) -> None:
        self.files = corpus_files(files)
        self.loop = loop
        self._count = count_documents
        self._pos = self._position(0, 0, 0, 0, 0)

    def _position(self, epoch: int, file: int, offset: int, doc: int, skip: int) -> dict[str, int]:
        pos = {"epoch": epoch, "file": file, "offset": offset, "skip": skip}
        if self._count:
            pos = {"epoch": epoch, "file": file, "offset": offset, "doc": doc, "skip": skip}
        return pos

    def document_items(self, epoch: int, file_idx: int, offset: int, doc: int, lines: Sequence[str]) -> list[Any]:
        """The items of the document starting at byte ``offset`` of file ``file_idx`` (document ``doc`` of the epoch)."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, int]:
        """The position after the last item handed out."""
        return dict(self._pos)

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue from a position returned by :meth:`state_dict`."""
        keys = set(self._pos)
        if not isinstance(state, dict) or set(state) != keys:
            raise ValueError(f"stream state must be a dict with keys {sorted(keys)}, got {state!r}")
        if not 0 <= state["file"] < len(self.files):
            raise ValueError(f"stream state names file {state['file']}, but the stream has {len(self.files)} files")
        if not 0 <= state["offset"] <= self.files[state["file"]].stat().st_size:
            raise ValueError(f"stream state offset {state['offset']} lies outside {str(self.files[state['file']])!r}")
        self._pos = {k: int(v) for k, v in state.items()}

    def __iter__(self) -> Iterator[Any]:
        produced_this_epoch = self._pos["file"] > 0 or self._pos["offset"] > 0
        while True:
            epoch, file_idx, doc = self._pos["epoch"], self._pos["file"], self._pos.get("doc", 0)
            for start, nxt, lines in read_documents(self.files[file_idx], self._pos["offset"]):
                items = self.document_items(epoch, file_idx, start, doc, lines)
                skip = self._pos["skip"] if start == self._pos["offset"] else 0
                for k in range(skip, len(items)):
                    self._pos = self._position(epoch, file_idx, start, doc, k + 1)
                    produced_this_epoch = True
                    yield items[k]
                doc += 1
                self._pos = self._position(epoch, file_idx, nxt, doc, 0)
            if file_idx + 1 < len(self.files):
                self._pos = self._position(epoch, file_idx + 1, 0, doc, 0)
                continue
            if not produced_this_epoch:
                raise ValueError(f"corpus files {[str(f) for f in self.files]} yield no {self.nothing}")
            if not self.loop:
                return
            self._pos = self._position(epoch + 1, 0, 0, 0, 0)
            produced_this_epoch = False
