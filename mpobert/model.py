"""MPOBERT: the base model, its outputs, and checkpoint I/O shared by every head.

Public API (Hugging Face-like)::

    model = MPOBertModel(MPOBertConfig.tiny())
    out = model(input_ids, attention_mask=mask, token_type_ids=types)
    out.last_hidden_state, out.pooler_output
    model.save_pretrained(d); MPOBertModel.from_pretrained(d)
    MPOBertForPreTraining.from_albert(albert_dir, num_layers=48)
    print(model.parameter_report())
"""
from __future__ import annotations

import io
import os
from dataclasses import dataclass, fields
from typing import Any, Iterator

import torch
from torch import nn

from mpo_core.io import atomic_write, check_format, read_torch_file
from mpobert.config import MPOBertConfig
from mpobert.convert import from_albert, from_bert
from mpobert.init import init_model
from mpobert.layers import MPOBertEmbeddings, MPOBertEncoder, attention_bool_mask
from mpobert.params import ParameterReport, parameter_report

__all__ = ["ModelOutput", "MPOBertModelOutput", "MPOBertPreTrainedModel", "MPOBertModel", "count_parameters", "dedup_state", "CONFIG_NAME",
           "WEIGHTS_NAME"]

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "mpobert_model.pt"
_FORMAT = "mpobert.weights"
_VERSION = 1


class ModelOutput:
    """Dataclass outputs that also read like a dict: ``out.loss``, ``out["loss"]``, ``"loss" in out``."""

    def __getitem__(self, key: str) -> Any:
        if key not in self.keys():
            raise KeyError(key)
        return getattr(self, key)

    def __contains__(self, key: object) -> bool:
        return key in self.keys()

    def keys(self) -> list[str]:
        """Names of the fields that are not ``None``."""
        return [f.name for f in fields(self) if getattr(self, f.name) is not None]

    def __iter__(self) -> Iterator[str]:
        return iter(self.keys())


@dataclass
class MPOBertModelOutput(ModelOutput):
    """``last_hidden_state`` ``(B, S, H)``; ``pooler_output`` ``(B, H)`` (tanh of a dense layer on
    token 0); ``hidden_states``: embeddings output and every layer's output when asked."""

    last_hidden_state: torch.Tensor
    pooler_output: torch.Tensor
    hidden_states: list[torch.Tensor] | None = None


class MPOBertPreTrainedModel(nn.Module):
    """Base of every MPOBERT model: config, initialization, parameter report, checkpoints.

    Subclasses set :attr:`base_model_attr` to the attribute holding the :class:`MPOBertModel`
    (empty for the base model itself) and override :meth:`_init_heads` and
    :meth:`_load_albert_heads` when they have heads.
    """

    base_model_attr = "mpobert"

    def __init__(self, config: MPOBertConfig) -> None:
        super().__init__()
        if not isinstance(config, MPOBertConfig):
            raise TypeError(f"config must be an MPOBertConfig, got {type(config).__name__}")
        self.config = config

    @property
    def base_model(self) -> "MPOBertModel":
        return getattr(self, self.base_model_attr) if self.base_model_attr else self

    def _init_heads(self) -> None:
        """Initialize head parameters (Linear: N(0, initializer_range), bias 0; LayerNorm: 1, 0)."""
        std = self.config.initializer_range
        with torch.no_grad():
            for name, module in self.named_modules():
                if name.split(".")[0] == self.base_model_attr:
                    continue
                if isinstance(module, nn.Linear):
                    module.weight.normal_(0.0, std)
                    if module.bias is not None:
                        module.bias.zero_()

    def _load_albert_heads(self, state: dict[str, torch.Tensor]) -> None:
        """Copy head weights from an ALBERT state dict, when the head has an ALBERT counterpart."""

    # ------------------------------------------------------------------ reports
    def parameter_report(self) -> ParameterReport:
        """Parameters by role (each shared tensor counted once); see :mod:`mpobert.params`."""
        return parameter_report(self)

    # ------------------------------------------------------------------ checkpoints
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and the weights to ``directory`` (created if needed), each atomically.

        Each shared tensor is stored once; the file records which other names alias it, so
        loading restores the sharing and every layer's own auxiliaries exactly.
        """
        directory = os.fspath(directory)
        os.makedirs(directory, exist_ok=True)
        tensors, aliases = dedup_state(self)
        payload = {"format": _FORMAT, "version": _VERSION, "class": type(self).__name__,
                   "tensors": tensors, "aliases": aliases}
        buf = io.BytesIO()
        torch.save(payload, buf)
        atomic_write(os.path.join(directory, WEIGHTS_NAME), buf.getvalue())
        self.config.save(os.path.join(directory, CONFIG_NAME))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, map_location: str | torch.device = "cpu",
                        strict: bool = True) -> "MPOBertPreTrainedModel":
        """Load a model written by :meth:`save_pretrained`.

        A base-model checkpoint loads into a model with heads (the heads keep their fresh
        initialization) when ``strict=False``. A corrupt or mismatched checkpoint raises ``ValueError``.
        """
        directory = os.fspath(directory)
        config = MPOBertConfig.load(os.path.join(directory, CONFIG_NAME))
        path = os.path.join(directory, WEIGHTS_NAME)
        payload = check_format(read_torch_file(path, "MPOBERT weights", map_location), _FORMAT, _VERSION,
                               "an MPOBERT weights file", path)
        model = cls(config)
        model.load_weights(payload["tensors"], payload["aliases"], strict=strict)
        return model

    def load_weights(self, tensors: dict[str, torch.Tensor], aliases: dict[str, str], strict: bool = True) -> None:
        """Load deduplicated ``tensors`` plus ``aliases`` (name -> stored name), as saved by :meth:`save_pretrained`.

        With ``strict=False`` only the base model's tensors are required: a base-model
        checkpoint fills a model with heads (heads keep their initialization), and a
        checkpoint with other heads loads its base model (its heads are ignored).
        """
        full = dict(tensors)
        for name, source in aliases.items():
            if source not in tensors:
                raise ValueError(f"checkpoint alias {name!r} points to a missing tensor {source!r}")
            full[name] = tensors[source]
        prefix = f"{self.base_model_attr}." if self.base_model_attr else ""
        ckpt_prefix = "mpobert." if any(k.startswith("mpobert.") for k in full) else ""
        if not strict and ckpt_prefix != prefix:
            full = {prefix + k[len(ckpt_prefix):]: v for k, v in full.items() if k.startswith(ckpt_prefix)}
            aliases = {prefix + k[len(ckpt_prefix):]: prefix + v[len(ckpt_prefix):]
                       for k, v in aliases.items() if k.startswith(ckpt_prefix)}
        _, own_aliases = dedup_state(self, with_values=False)
        own = self.state_dict()
        if strict:
            required = set(own)
        else:
            required = {k for k in own if k.startswith(prefix)}
            full = {k: v for k, v in full.items() if k in own}
            aliases = {k: v for k, v in aliases.items() if k in own}
            own_aliases = {k: v for k, v in own_aliases.items() if k in required}
        if aliases != own_aliases:
            diff = sorted(set(aliases.items()) ^ set(own_aliases.items()))[:4]
            raise ValueError(f"checkpoint sharing structure does not match this model's config (e.g. {diff})")
        missing, unexpected = sorted(required - set(full)), sorted(set(full) - set(own))
        if missing or unexpected:
            raise ValueError(f"checkpoint does not match the model: missing {missing[:5]}, unexpected {unexpected[:5]}")
        try:
            self.load_state_dict(full, strict=False)
        except RuntimeError as exc:  # shape mismatches
            raise ValueError(f"checkpoint does not match the model: {exc}") from exc

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_albert(cls, path: str | os.PathLike, **overrides: Any) -> "MPOBertPreTrainedModel":
        """Build from a local Hugging Face ALBERT checkpoint (paper §3.3, Algorithm 1).

        See :func:`mpobert.convert.from_albert` for the arguments (``num_layers``, ``num_groups``,
        ``adapter_rank``, ``max_bond``, ... override the config derived from the checkpoint).
        """
        return from_albert(cls, path, **overrides)

    @classmethod
    def from_bert(cls, path: str | os.PathLike, central_from: str = "mean", **overrides: Any) -> "MPOBertPreTrainedModel":
        """Build from a local (non-shared) Hugging Face BERT checkpoint; see :func:`mpobert.convert.from_bert`."""
        return from_bert(cls, path, central_from=central_from, **overrides)


def dedup_state(model: nn.Module, with_values: bool = True) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``state_dict`` with each shared tensor once, and ``{alias name: stored name}`` for the rest (the one
    alias map of shared tensors: checkpoints here, transformers' tied-weight keys in :mod:`mpobert.hf`)."""
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    first: dict[int, str] = {}
    for name, tensor in model.state_dict(keep_vars=True).items():
        key = id(tensor)
        if key in first:
            aliases[name] = first[key]
        else:
            first[key] = name
            if with_values:
                tensors[name] = tensor.detach().cpu().clone()
    return tensors, aliases


class MPOBertModel(MPOBertPreTrainedModel):
    """The MPOBERT encoder: factorized embeddings, ``L`` MPO layers with shared centrals, and a pooler.

    Parameters
    ----------
    config : MPOBertConfig
        Built with random weights (:func:`mpobert.init.init_model`: Xavier-like cores with the
        depth scaling for layers beyond ``config.depth_scaling_after``).
    """

    base_model_attr = ""

    def __init__(self, config: MPOBertConfig) -> None:
        super().__init__(config)
        self.embeddings = MPOBertEmbeddings(config)
        self.encoder = MPOBertEncoder(config)
        self.pooler = nn.Linear(config.hidden_size, config.hidden_size)
        init_model(self)

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> MPOBertModelOutput:
        """Encode a batch.

        Parameters
        ----------
        input_ids : torch.LongTensor, optional
            ``(B, S)`` token ids (exactly one of ``input_ids`` / ``inputs_embeds``).
        attention_mask : torch.Tensor, optional
            ``(B, S)``, 1 for tokens and 0 for padding.
        token_type_ids, position_ids : torch.LongTensor, optional
            ``(B, S)``; default zeros / ``0..S-1``.
        inputs_embeds : torch.Tensor, optional
            ``(B, S, E)`` embeddings instead of ``input_ids``.
        output_hidden_states : bool
            Also return the embeddings output and each layer's output.
        """
        if (input_ids is None) == (inputs_embeds is None):
            raise ValueError("give exactly one of input_ids and inputs_embeds")
        if input_ids is not None:
            if not isinstance(input_ids, torch.Tensor) or input_ids.dim() != 2 or input_ids.is_floating_point():
                raise ValueError(f"input_ids must be an integer tensor of shape (batch, seq), got "
                                 f"{getattr(input_ids, 'shape', type(input_ids).__name__)}")
            batch, seq = input_ids.shape
        else:
            if inputs_embeds.dim() != 3 or inputs_embeds.shape[-1] != self.config.embedding_size:
                raise ValueError(f"inputs_embeds must have shape (batch, seq, {self.config.embedding_size}), "
                                 f"got {tuple(inputs_embeds.shape)}")
            batch, seq = inputs_embeds.shape[:2]
        hidden = self.embeddings(input_ids, token_type_ids, position_ids, inputs_embeds)
        mask = attention_bool_mask(attention_mask, batch, seq, hidden.device)
        hidden, states = self.encoder(hidden, mask, output_hidden_states)
        pooled = torch.tanh(self.pooler(hidden[:, 0]))
        return MPOBertModelOutput(hidden, pooled, states)


def count_parameters(config: MPOBertConfig, model_class: type[MPOBertPreTrainedModel] = MPOBertModel) -> ParameterReport:
    """The report of ``model_class(config)`` built on the meta device (no memory, no decomposition).

    It builds the very modules a real model has, so the counts are the real model's.
    """
    with torch.device("meta"):
        model = model_class(config)
    return parameter_report(model)
