"""MPOBERT as a ``transformers`` model: a ``PretrainedConfig``, ``PreTrainedModel`` classes, Auto registration.

Usage::

    import mpobert.hf
    mpobert.hf.register()                      # AutoConfig / AutoModel / AutoModelForMaskedLM know "mpobert"
    model = mpobert.hf.MPOBertHFForMaskedLM.from_mpobert(mpobert_model)   # or MPOBertHFModel(...)
    model.save_pretrained(d)                   # config.json (model_type "mpobert") + model.safetensors
    transformers.AutoModelForMaskedLM.from_pretrained(d)
    transformers.pipeline("fill-mask", model=d, tokenizer=tok)

The config stores transformers' field names (:data:`mpobert.config.ALIASES`: ``num_hidden_layers``,
``num_attention_heads``, ``hidden_dropout_prob``, ...) and MPOBERT's own fields (``mpo_n``,
``num_groups``, ``adapter_rank``, ...); :meth:`MPOBertHFConfig.to_mpobert` gives the
:class:`~mpobert.config.MPOBertConfig`. The models wrap the native MPOBERT modules (same
parameters, same forward); the central cores shared by several layers are declared as tied
weights, so the safetensors file stores each once and loading restores the sharing.

This module imports ``transformers``; nothing else in ``mpobert`` or ``mpo_core`` does.
"""
from __future__ import annotations

import dataclasses
import re
from typing import Any

import torch
from torch import nn
from transformers import AutoConfig, AutoModel, AutoModelForMaskedLM, PretrainedConfig, PreTrainedModel
from transformers.modeling_outputs import BaseModelOutputWithPooling, MaskedLMOutput

from mpobert.config import ALIASES, MPOBertConfig
from mpobert.heads import IGNORE_INDEX, MPOBertForPreTraining
from mpobert.model import MPOBertModel, MPOBertPreTrainedModel, dedup_state

__all__ = ["MODEL_TYPE", "MPOBertHFConfig", "MPOBertHFModel", "MPOBertHFForMaskedLM", "register"]

MODEL_TYPE = "mpobert"

_HF_NAMES = {own: hf for hf, own in ALIASES.items()}
"""MPOBertConfig field -> the name ``transformers`` configs use for it (others are spelled alike)."""
_OWN_FIELDS = ("num_labels", "pad_token_id")  # handled by PretrainedConfig itself


def _field_names() -> list[str]:
    return [f.name for f in dataclasses.fields(MPOBertConfig)]


class MPOBertHFConfig(PretrainedConfig):
    """``transformers`` configuration of an MPOBERT model (``model_type = "mpobert"``).

    Accepts every :class:`~mpobert.config.MPOBertConfig` field under its own name or its
    ``transformers`` name, validates them with :class:`~mpobert.config.MPOBertConfig`, and stores
    the ``transformers`` spellings (``num_hidden_layers``, ...) in ``config.json``.
    """

    model_type = MODEL_TYPE
    attribute_map = {own: hf for own, hf in _HF_NAMES.items()}

    def __init__(self, **kwargs: Any) -> None:
        names = set(_field_names())
        inverse = {hf: own for own, hf in _HF_NAMES.items()}
        ours: dict[str, Any] = {}
        for key in list(kwargs):
            own = inverse.get(key, key)
            if own in names and own not in _OWN_FIELDS:
                ours[own] = kwargs.pop(key)
        if "num_labels" in kwargs:
            ours["num_labels"] = kwargs["num_labels"]
        elif "id2label" in kwargs:
            ours["num_labels"] = len(kwargs["id2label"])
        if "pad_token_id" in kwargs and kwargs["pad_token_id"] is not None:
            ours["pad_token_id"] = kwargs["pad_token_id"]
        if "mpo_shapes" in ours:  # JSON keys are strings
            ours["mpo_shapes"] = {int(k): tuple(v) for k, v in dict(ours["mpo_shapes"]).items()}
        cfg = MPOBertConfig(**ours)
        kwargs.setdefault("tie_word_embeddings", True)
        kwargs["pad_token_id"] = cfg.pad_token_id
        kwargs.setdefault("num_labels", cfg.num_labels)
        super().__init__(**kwargs)
        for name, value in cfg.to_dict().items():
            if name not in _OWN_FIELDS:
                setattr(self, _HF_NAMES.get(name, name), value)

    def to_mpobert(self) -> MPOBertConfig:
        """The equivalent :class:`~mpobert.config.MPOBertConfig`."""
        data = {name: getattr(self, _HF_NAMES.get(name, name)) for name in _field_names() if name not in _OWN_FIELDS}
        return MPOBertConfig(**data, num_labels=self.num_labels, pad_token_id=self.pad_token_id)

    @classmethod
    def from_mpobert(cls, config: MPOBertConfig, **kwargs: Any) -> "MPOBertHFConfig":
        """The ``transformers`` config of ``config`` (extra ``kwargs`` go to ``PretrainedConfig``)."""
        if not isinstance(config, MPOBertConfig):
            raise TypeError(f"config must be an MPOBertConfig, got {type(config).__name__}")
        return cls(**config.to_dict(), **kwargs)


class MPOBertHFPreTrainedModel(PreTrainedModel):
    """Common base: config class, weight-init hook, the shared centrals declared as tied weights."""

    config_class = MPOBertHFConfig
    base_model_prefix = "mpobert"
    _native_class: type[MPOBertPreTrainedModel] = MPOBertModel

    def __init__(self, config: MPOBertHFConfig, native: MPOBertPreTrainedModel | None = None) -> None:
        super().__init__(config)
        native = native if native is not None else self._native_class(config.to_mpobert())
        if not isinstance(native, self._native_class):
            raise TypeError(f"native must be a {self._native_class.__name__}, got {type(native).__name__}")
        self._attach(native)
        # every layer's MPOLinear registers its group's central core again: tie those names to the group's
        self._tied_weights_keys = {re.escape(k): re.escape(v) for k, v in dedup_state(self, with_values=False)[1].items()}
        self.post_init()

    def _attach(self, native: MPOBertPreTrainedModel) -> None:
        """Register the native model's modules on this one (subclasses add their heads)."""
        self.mpobert = native.base_model

    def _init_weights(self, module: nn.Module) -> None:
        """``transformers``' default init for ``nn.Linear``/``nn.Embedding`` modules (skips loaded
        tensors); MPO cores, adapters and LayerNorm tensors keep MPOBERT's own initialization."""
        if isinstance(module, (nn.Linear, nn.Embedding)):
            super()._init_weights(module)

    @classmethod
    def from_mpobert(cls, model: MPOBertPreTrainedModel) -> "MPOBertHFPreTrainedModel":
        """Wrap a native MPOBERT model (shares its parameters, no copy)."""
        return cls(MPOBertHFConfig.from_mpobert(model.config), native=model)


class MPOBertHFModel(MPOBertHFPreTrainedModel):
    """The MPOBERT encoder for ``AutoModel`` / ``pipeline("feature-extraction")``.

    Returns ``BaseModelOutputWithPooling`` (``last_hidden_state``, ``pooler_output``, ``hidden_states``).
    """

    @property
    def native(self) -> MPOBertModel:
        """The wrapped :class:`~mpobert.model.MPOBertModel`."""
        return self.mpobert

    def get_input_embeddings(self) -> nn.Embedding:
        return self.mpobert.embeddings.word_embeddings

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, output_hidden_states: bool | None = None,
                return_dict: bool | None = None, **kwargs: Any) -> BaseModelOutputWithPooling:
        out = self.mpobert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_hidden_states=bool(output_hidden_states))
        states = tuple(out.hidden_states) if out.hidden_states is not None else None
        return BaseModelOutputWithPooling(last_hidden_state=out.last_hidden_state, pooler_output=out.pooler_output,
                                          hidden_states=states)


class MPOBertHFForMaskedLM(MPOBertHFPreTrainedModel):
    """MPOBERT with its MLM head (tied to the word embeddings) for ``AutoModelForMaskedLM`` /
    ``pipeline("fill-mask")`` / ``transformers.Trainer``: ``labels`` (``-100`` = ignored) give a loss.

    The sentence-order head of :class:`~mpobert.MPOBertForPreTraining` is kept (its weights load and
    save) but unused here.
    """

    _native_class = MPOBertForPreTraining

    def _attach(self, native: MPOBertForPreTraining) -> None:
        super()._attach(native)
        self.mlm = native.mlm
        self.sop_classifier = native.sop_classifier
        self._native = (native,)  # the native module, by reference (its submodules are registered above)

    @property
    def native(self) -> MPOBertForPreTraining:
        """The wrapped :class:`~mpobert.MPOBertForPreTraining` (same parameters)."""
        return self._native[0]

    def get_input_embeddings(self) -> nn.Embedding:
        return self.mpobert.embeddings.word_embeddings

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, position_ids: torch.Tensor | None = None,
                inputs_embeds: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                output_hidden_states: bool | None = None, return_dict: bool | None = None,
                **kwargs: Any) -> MaskedLMOutput:
        out = self.mpobert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds,
                           output_hidden_states=bool(output_hidden_states))
        logits = self.mlm(out.last_hidden_state)
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                               ignore_index=IGNORE_INDEX)
        states = tuple(out.hidden_states) if out.hidden_states is not None else None
        return MaskedLMOutput(loss=loss, logits=logits, hidden_states=states)


def register() -> None:
    """Make ``AutoConfig``, ``AutoModel`` and ``AutoModelForMaskedLM`` load ``model_type = "mpobert"``
    directories (idempotent)."""
    try:
        AutoConfig.register(MODEL_TYPE, MPOBertHFConfig)
    except ValueError:  # already registered (by this function: the same class)
        if AutoConfig.for_model(MODEL_TYPE).__class__ is not MPOBertHFConfig:
            raise
    for auto, cls in ((AutoModel, MPOBertHFModel), (AutoModelForMaskedLM, MPOBertHFForMaskedLM)):
        try:
            auto.register(MPOBertHFConfig, cls)
        except ValueError:
            if auto._model_mapping.get(MPOBertHFConfig) is not cls:
                raise
