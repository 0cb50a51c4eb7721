"""The teacher of distillation and healing: a frozen ``transformers`` model, its tokenizer and facts about it.

:func:`load_teacher` reads a local BERT / ALBERT / RoBERTa checkpoint directory;
:meth:`Teacher.wrap` takes any already-loaded encoder model (e.g. the original of a model that
was compressed in memory). :func:`hf_inputs` is the one place that turns a batch into the
keyword arguments of a ``transformers`` forward. ``transformers`` is imported lazily.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from mpo_core.nn import num_parameters

__all__ = ["TEACHER_FAMILIES", "MLM_ARCHITECTURES", "Teacher", "load_teacher", "hf_inputs", "has_mlm_head",
           "check_vocabulary"]

TEACHER_FAMILIES = ("bert", "albert", "roberta")
"""``model_type`` values of the teacher checkpoints :func:`load_teacher` accepts."""

MLM_ARCHITECTURES = ("ForMaskedLM", "ForPreTraining")
"""Class-name endings of ``transformers`` models with an MLM head."""


def has_mlm_head(model: nn.Module) -> bool:
    """Whether a ``transformers`` model (by its class name) carries an MLM head."""
    return type(model).__name__.endswith(MLM_ARCHITECTURES)


def hf_inputs(batch: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """The keyword arguments of a ``transformers`` encoder forward for ``batch``: ``input_ids``,
    ``attention_mask`` and ``token_type_ids`` where present (none for RoBERTa: a single token type)."""
    inputs = {k: batch[k] for k in ("input_ids", "attention_mask", "token_type_ids") if k in batch}
    if getattr(getattr(model, "config", None), "model_type", None) == "roberta":
        inputs.pop("token_type_ids", None)
    return inputs


@dataclass
class Teacher:
    """A loaded teacher: the ``transformers`` model (eval mode, frozen), its tokenizer and facts about it.

    Attributes
    ----------
    model : nn.Module
        ``AutoModelForMaskedLM`` when the checkpoint has an MLM head, else ``AutoModel``.
    tokenizer : transformers tokenizer
    family : str
        The config's ``model_type`` (one of :data:`TEACHER_FAMILIES` from :func:`load_teacher`).
    path : str
    has_mlm : bool
    num_layers : int
    num_params : int
        Unique parameters (tied tensors once).
    """

    model: nn.Module
    tokenizer: Any
    family: str
    path: str
    has_mlm: bool
    num_layers: int
    num_params: int

    @classmethod
    def wrap(cls, model: nn.Module, tokenizer: Any, path: str = "") -> "Teacher":
        """An already-loaded ``transformers`` model as the teacher (put in eval mode and frozen)."""
        model.eval().requires_grad_(False)
        return cls(model, tokenizer, model.config.model_type, path, has_mlm_head(model),
                   int(model.config.num_hidden_layers), num_parameters(model))

    @property
    def encoder(self) -> nn.Module:
        """The base encoder (``BertModel``, ...) inside an MLM model, or the model itself."""
        return getattr(self.model, self.model.base_model_prefix, self.model)

    def __call__(self, batch: dict[str, torch.Tensor], attentions: bool = False, logits: bool = False) -> Any:
        """Hidden states (and attentions / MLM logits) of ``batch``, without gradients."""
        net = self.model if logits else self.encoder
        with torch.no_grad():
            return net(**hf_inputs(batch, self.model), output_hidden_states=True, output_attentions=attentions)


def load_teacher(path: str | os.PathLike, attentions: bool = False) -> Teacher:
    """Load a local BERT / ALBERT / RoBERTa checkpoint directory (no network) as the teacher.

    Parameters
    ----------
    path : path-like
        Directory with ``config.json``, the weights and the tokenizer files.
    attentions : bool
        Load with eager attention so that attention probabilities can be returned.

    Raises
    ------
    ValueError
        Missing directory/config/tokenizer, or a ``model_type`` outside :data:`TEACHER_FAMILIES`.
    """
    path = os.fspath(path)
    cfg_path = os.path.join(path, "config.json")
    if not os.path.isdir(path):
        raise ValueError(f"teacher path {path!r} is not a directory (expected a Hugging Face checkpoint directory)")
    if not os.path.isfile(cfg_path):
        raise ValueError(f"teacher {path!r} has no config.json (expected a Hugging Face checkpoint directory)")
    try:
        with open(cfg_path, encoding="utf-8") as fh:
            hf = json.load(fh)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{cfg_path!r} is not valid JSON: {exc}") from exc
    family = hf.get("model_type") if isinstance(hf, dict) else None
    if family not in TEACHER_FAMILIES:
        raise ValueError(f"teacher {path!r} has model_type={family!r}; expected one of {list(TEACHER_FAMILIES)}")
    from transformers import AutoModel, AutoModelForMaskedLM, AutoTokenizer

    has_mlm = any(a.endswith(MLM_ARCHITECTURES) for a in hf.get("architectures") or [])
    kwargs = {"attn_implementation": "eager"} if attentions else {}
    try:
        model = (AutoModelForMaskedLM if has_mlm else AutoModel).from_pretrained(path, local_files_only=True, **kwargs)
    except OSError as exc:
        raise ValueError(f"cannot load the teacher weights from {path!r}: {exc}") from exc
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    except (OSError, ValueError, TypeError) as exc:
        raise ValueError(f"cannot load the teacher's tokenizer from {path!r} (vocab/tokenizer files): {exc}") from exc
    model.eval().requires_grad_(False)
    return Teacher(model, tokenizer, family, path, has_mlm, int(hf["num_hidden_layers"]), num_parameters(model))


def check_vocabulary(student: Any, teacher: Teacher) -> None:
    """Raise ``ValueError`` unless the student's vocabulary (``student.config.vocab_size``) is the
    teacher's tokenizer's."""
    n_tok, n_student = len(teacher.tokenizer), student.config.vocab_size
    n_teacher = teacher.encoder.config.vocab_size
    if n_student != n_teacher or n_tok > n_student:
        raise ValueError(f"vocabulary mismatch: student vocab_size={n_student}, teacher vocab_size={n_teacher}, "
                         f"teacher tokenizer {n_tok} tokens; the student must use the teacher's vocabulary")
