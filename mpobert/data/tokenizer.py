"""WordPiece tokenizer for MPOBERT, built on the ``tokenizers`` library.

A :class:`WordPieceTokenizer` wraps a ``tokenizers.Tokenizer`` configured like
BERT's uncased tokenizer (BERT normalizer, BERT pre-tokenizer, ``##`` continuation
pieces) and knows the ids of the five special tokens the model needs. It is
loaded from a BERT-style ``vocab.txt`` or a ``tokenizer.json``, or trained on a
corpus with :func:`train_wordpiece`.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from mpo_core.io import atomic_write

SPECIAL_TOKENS: tuple[str, ...] = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
"""Special tokens, in the order :func:`train_wordpiece` gives them ids 0..4."""


def _configure(tok: Tokenizer, lowercase: bool) -> Tokenizer:
    tok.normalizer = normalizers.BertNormalizer(clean_text=True, handle_chinese_chars=True, lowercase=lowercase)
    tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    tok.decoder = decoders.WordPiece(prefix="##")
    return tok


class WordPieceTokenizer:
    """A BERT-style WordPiece tokenizer with the special-token ids MPOBERT needs.

    Parameters
    ----------
    tokenizer : tokenizers.Tokenizer
        A WordPiece tokenizer whose vocabulary contains ``[PAD] [UNK] [CLS] [SEP] [MASK]``.

    Raises
    ------
    ValueError
        If a special token is missing from the vocabulary.
    """

    def __init__(self, tokenizer: Tokenizer) -> None:
        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"tokenizer must be a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        missing = [t for t in SPECIAL_TOKENS if tokenizer.token_to_id(t) is None]
        if missing:
            raise ValueError(f"tokenizer vocabulary lacks the special tokens {missing}")
        self._tok = tokenizer
        self._tok.no_padding()
        self._tok.no_truncation()
        self.pad_id: int = tokenizer.token_to_id("[PAD]")
        self.unk_id: int = tokenizer.token_to_id("[UNK]")
        self.cls_id: int = tokenizer.token_to_id("[CLS]")
        self.sep_id: int = tokenizer.token_to_id("[SEP]")
        self.mask_id: int = tokenizer.token_to_id("[MASK]")
        self.special_ids: frozenset[int] = frozenset(
            (self.pad_id, self.unk_id, self.cls_id, self.sep_id, self.mask_id)
        )
        # The post-processor adds [CLS]/[SEP] only in encode_pair-style calls of the raw tokenizer.
        self._tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", self.cls_id), ("[SEP]", self.sep_id)],
        )

    @property
    def vocab_size(self) -> int:
        """Number of entries in the vocabulary (special tokens included)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def backend(self) -> Tokenizer:
        """The underlying ``tokenizers.Tokenizer`` (for offsets and overflow handling)."""
        return self._tok

    def tokenize(self, text: str) -> list[str]:
        """Split ``text`` into WordPiece tokens (no special tokens)."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` without special tokens."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Token ids of each text in ``texts`` without special tokens (parallel in Rust)."""
        return [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]

    def build_pair(self, ids_a: Sequence[int], ids_b: Sequence[int] | None, max_length: int) -> tuple[list[int], list[int]]:
        """``[CLS] a [SEP] (b [SEP])`` ids and token-type ids, truncating the longer side first.

        Parameters
        ----------
        ids_a, ids_b : sequence of int
            Segment ids without special tokens; ``ids_b`` may be None (single segment).
        max_length : int
            Total length bound, special tokens included (at least 3, or 2 without ``ids_b``).

        Returns
        -------
        input_ids, token_type_ids : list of int
        """
        n_special = 2 if ids_b is None else 3
        if not isinstance(max_length, int) or max_length <= n_special:
            raise ValueError(f"max_length must be an int > {n_special}, got {max_length!r}")
        a, b = list(ids_a), list(ids_b) if ids_b is not None else []
        while len(a) + len(b) > max_length - n_special:
            if len(a) >= len(b):
                a.pop()
            else:
                b.pop()
        ids = [self.cls_id, *a, self.sep_id]
        types = [0] * len(ids)
        if ids_b is not None:
            ids += [*b, self.sep_id]
            types += [1] * (len(b) + 1)
        return ids, types

    def encode_pair(self, text_a: str, text_b: str | None = None, max_length: int = 128) -> tuple[list[int], list[int]]:
        """Encode one text or a text pair as model input (see :meth:`build_pair`)."""
        return self.build_pair(self.encode(text_a), None if text_b is None else self.encode(text_b), max_length)

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = True) -> str:
        """Text of ``ids`` (WordPiece continuation pieces joined)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def to_transformers(self) -> Any:
        """The same tokenizer as a ``transformers.PreTrainedTokenizerFast`` (same ids, specials and
        ``[CLS] A [SEP] B [SEP]`` template), for ``transformers`` models and :class:`~mpobert.data.text.TextStream`;
        it shares this tokenizer's backend. ``transformers`` is imported here, not at load time."""
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_object=self._tok, unk_token="[UNK]", pad_token="[PAD]",
                                       cls_token="[CLS]", sep_token="[SEP]", mask_token="[MASK]",
                                       model_input_names=["input_ids", "token_type_ids", "attention_mask"])

    def save(self, path: str | os.PathLike) -> None:
        """Write ``tokenizer.json`` (if ``path`` ends in .json) or a BERT ``vocab.txt``."""
        path = Path(path)
        if path.suffix == ".json":
            text = self._tok.to_str(pretty=True)  # what Tokenizer.save writes
        else:
            vocab = sorted(self._tok.get_vocab(with_added_tokens=True).items(), key=lambda kv: kv[1])
            text = "".join(tok + "\n" for tok, _ in vocab)
        atomic_write(path, text.encode("utf-8"))  # creates the folder

    @classmethod
    def from_file(cls, path: str | os.PathLike, lowercase: bool = True) -> WordPieceTokenizer:
        """Load a ``tokenizer.json``, a ``vocab.txt``, or a directory holding either.

        Parameters
        ----------
        path : path-like
            File or directory (``tokenizer.json`` is preferred over ``vocab.txt``).
        lowercase : bool
            For ``vocab.txt`` only: whether the normalizer lowercases (uncased vocab).
        """
        path = Path(path)
        if path.is_dir():
            for name in ("tokenizer.json", "vocab.txt"):
                if (path / name).is_file():
                    path = path / name
                    break
            else:
                raise ValueError(f"tokenizer path {str(path)!r} is a directory without tokenizer.json or vocab.txt")
        if not path.is_file():
            raise ValueError(f"tokenizer path {str(path)!r} does not exist")
        if path.suffix == ".json":
            return cls(Tokenizer.from_file(str(path)))
        vocab = {}
        for line in path.read_text(encoding="utf-8").splitlines():
            tok = line.rstrip("\n")
            if tok and tok not in vocab:
                vocab[tok] = len(vocab)
        if "[UNK]" not in vocab:
            raise ValueError(f"vocab file {str(path)!r} lacks [UNK]")
        return cls(_configure(Tokenizer(models.WordPiece(vocab, unk_token="[UNK]")), lowercase))


def train_wordpiece(
    texts: Iterable[str], vocab_size: int = 4000, min_frequency: int = 2, lowercase: bool = True
) -> WordPieceTokenizer:
    """Train an uncased WordPiece vocabulary on ``texts``.

    Parameters
    ----------
    texts : iterable of str
        Training text (lines, paragraphs or documents).
    vocab_size : int
        Target vocabulary size, special tokens included (at least 64).
    min_frequency : int
        Minimum count for a merge to be kept.
    lowercase : bool
        Lowercase the text first (uncased model).

    Returns
    -------
    WordPieceTokenizer
        With ``[PAD] [UNK] [CLS] [SEP] [MASK]`` at ids 0..4.
    """
    if not isinstance(vocab_size, int) or vocab_size < 64:
        raise ValueError(f"vocab_size must be an int >= 64, got {vocab_size!r}")
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise ValueError(f"min_frequency must be an int >= 1, got {min_frequency!r}")
    tok = _configure(Tokenizer(models.WordPiece(unk_token="[UNK]")), lowercase)
    trainer = trainers.WordPieceTrainer(
        vocab_size=vocab_size, min_frequency=min_frequency, special_tokens=list(SPECIAL_TOKENS),
        continuing_subword_prefix="##", show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return WordPieceTokenizer(tok)
