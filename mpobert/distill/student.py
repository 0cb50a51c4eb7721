"""The student of distillation and healing: what teacher-matching needs of a model, and MPOBERT's conversion.

A :class:`Student` is a view of a trainable model giving its hidden states ``0..L`` (embeddings
output, then each layer) and, where it has an MLM head, its MLM logits. Two views exist:

* :class:`MPOBertStudent`: an MPOBERT model; it also runs single layers on given inputs (layer-local
  matching, ``teacher_input_steps``) and gives attention probabilities (the attention term);
* :class:`HFStudent`: any ``transformers`` encoder (e.g. one whose ``nn.Linear`` layers were
  replaced by ``MPOLinear`` with :func:`mpo_core.mpo_ify` or :func:`mpo_core.compress.compress`); it runs
  single layers on given inputs too (through hooks; not ALBERT, whose layers are shared groups).

:func:`as_student` picks the view for a model. :func:`convert_student` builds MPOBERT's conversion
of a :class:`~mpobert.distill.teacher.Teacher`.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from mpobert.distill.teacher import Teacher, has_mlm_head, hf_inputs
from mpobert.layers import attention_bool_mask
from mpobert.model import MPOBertPreTrainedModel

__all__ = ["Student", "MPOBertStudent", "HFStudent", "as_student", "convert_student", "copy_mlm_head"]

Batch = dict[str, torch.Tensor]


class Student:
    """What teacher-matching needs of a student model (a view; ``model`` is the trained module).

    Subclasses give :attr:`num_layers`, :attr:`has_mlm`, :meth:`hidden_states` and :meth:`logits`;
    :meth:`layer_states` (layer-local matching) and :meth:`attention_probs` (the attention term)
    are optional: without them those features are a ``ValueError`` when a loss asks for them.
    """

    supports_layer_inputs = False
    supports_attention = False

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"student must be an nn.Module, got {type(model).__name__}")
        self.model = model

    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def num_layers(self) -> int:
        raise NotImplementedError

    @property
    def has_mlm(self) -> bool:
        raise NotImplementedError

    def hidden_states(self, batch: Batch) -> Sequence[torch.Tensor]:
        """Hidden states ``0..L`` of ``batch`` run end to end (0 = embeddings output)."""
        raise NotImplementedError

    def logits(self, batch: Batch) -> torch.Tensor:
        """MLM logits ``(B, S, V)`` of ``batch``."""
        raise NotImplementedError

    def layer_states(self, batch: Batch, inputs: Sequence[torch.Tensor], embeddings: bool) -> list[torch.Tensor]:
        """Layer-local hidden states: ``[h_0, layer_0(inputs[0]), ..., layer_{L-1}(inputs[L-1])]`` where ``h_0``
        is the embeddings output when ``embeddings`` else ``inputs[0]``."""
        raise ValueError(f"{type(self).__name__} cannot run its layers on given inputs (layer-local matching)")

    def attention_probs(self, hidden_in: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
        """Attention probabilities ``(B, heads, S, S)`` of layer ``layer`` (0-based) given its input."""
        raise ValueError(f"{type(self).__name__} gives no attention probabilities")


class MPOBertStudent(Student):
    """An MPOBERT model (:class:`~mpobert.MPOBertModel` or a model with heads) as a student."""

    supports_layer_inputs = True
    supports_attention = True

    @property
    def num_layers(self) -> int:
        return self.model.config.num_layers

    @property
    def has_mlm(self) -> bool:
        return hasattr(self.model, "mlm")

    def hidden_states(self, batch: Batch) -> Sequence[torch.Tensor]:
        out = self.model.base_model(batch["input_ids"], batch["attention_mask"], batch.get("token_type_ids"),
                                    output_hidden_states=True)
        return out.hidden_states

    def logits(self, batch: Batch) -> torch.Tensor:
        return self.model(**batch).logits

    def layer_states(self, batch: Batch, inputs: Sequence[torch.Tensor], embeddings: bool) -> list[torch.Tensor]:
        base = self.model.base_model
        ids = batch["input_ids"]
        mask = attention_bool_mask(batch["attention_mask"], ids.shape[0], ids.shape[1], ids.device)
        first = base.embeddings(ids, batch.get("token_type_ids"), None, None) if embeddings else inputs[0]
        return [first, *(layer(x, mask) for layer, x in zip(base.encoder.layers, inputs))]

    def attention_probs(self, hidden_in: torch.Tensor, attention_mask: torch.Tensor, layer: int) -> torch.Tensor:
        cfg = self.model.config
        lyr = self.model.base_model.encoder.layers[layer]
        b, s, _ = hidden_in.shape
        q, k = (lyr.project(m, hidden_in, lyr.norms.bias[m]).view(b, s, cfg.num_heads, cfg.head_dim).transpose(1, 2)
                for m in ("q", "k"))
        scores = q @ k.transpose(-1, -2) / math.sqrt(cfg.head_dim)
        scores = scores.masked_fill(~attention_mask.bool()[:, None, None, :], torch.finfo(scores.dtype).min)
        return scores.float().softmax(-1)


class HFStudent(Student):
    """A ``transformers`` encoder (``BertModel``, ``BertForMaskedLM``, ... possibly with ``MPOLinear``
    layers) as a student: hidden states and MLM logits from its own forward."""

    @property
    def num_layers(self) -> int:
        return int(self.model.config.num_hidden_layers)

    @property
    def has_mlm(self) -> bool:
        return has_mlm_head(self.model)

    def hidden_states(self, batch: Batch) -> Sequence[torch.Tensor]:
        encoder = getattr(self.model, self.model.base_model_prefix, self.model)
        return encoder(**hf_inputs(batch, self.model), output_hidden_states=True).hidden_states

    def logits(self, batch: Batch) -> torch.Tensor:
        return self.model(**hf_inputs(batch, self.model)).logits

    def _encoder(self) -> nn.Module:
        return getattr(self.model, self.model.base_model_prefix, self.model)

    def _layers(self) -> nn.ModuleList | None:
        """The encoder's list of its ``num_layers`` layers (``None`` for ALBERT's shared layer groups)."""
        if getattr(self.model.config, "model_type", None) == "albert":
            return None
        for module in self._encoder().modules():
            if isinstance(module, nn.ModuleList) and len(module) == self.num_layers:
                return module
        return None

    @property
    def supports_layer_inputs(self) -> bool:  # type: ignore[override]
        return self._layers() is not None

    def layer_states(self, batch: Batch, inputs: Sequence[torch.Tensor], embeddings: bool) -> list[torch.Tensor]:
        """One forward of the model in which hooks hand layer ``i`` the hidden state ``inputs[i]`` instead of its
        predecessor's output (the model builds its own attention mask, whatever its transformers version)."""
        layers = self._layers()
        if layers is None:
            raise ValueError(f"{type(self.model).__name__} has no list of {self.num_layers} layers to feed inputs to")
        if len(inputs) != len(layers):
            raise ValueError(f"inputs must hold one hidden state per layer ({len(layers)}), got {len(inputs)}")
        seen: dict[Any, torch.Tensor] = {}

        def feed(i: int) -> Any:
            def hook(module: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
                if args:
                    seen.setdefault("in", args[0])
                    return (inputs[i], *args[1:]), kwargs
                seen.setdefault("in", kwargs["hidden_states"])
                return args, {**kwargs, "hidden_states": inputs[i]}
            return hook

        def keep(i: int) -> Any:
            def hook(module: nn.Module, args: tuple, output: Any) -> None:
                seen[i] = output[0] if isinstance(output, tuple) else output
            return hook

        handles = [h for i, layer in enumerate(layers)
                   for h in (layer.register_forward_pre_hook(feed(i), with_kwargs=True), layer.register_forward_hook(keep(i)))]
        try:
            self._encoder()(**hf_inputs(batch, self.model))
        finally:
            for handle in handles:
                handle.remove()
        return [seen["in"] if embeddings else inputs[0], *(seen[i] for i in range(len(layers)))]


def as_student(model: nn.Module | Student) -> Student:
    """The :class:`Student` view of ``model``: itself if it is one, :class:`MPOBertStudent` for an
    MPOBERT model, else :class:`HFStudent` (a ``transformers`` model)."""
    if isinstance(model, Student):
        return model
    if isinstance(model, MPOBertPreTrainedModel):
        return MPOBertStudent(model)
    if hasattr(model, "base_model_prefix") and hasattr(getattr(model, "config", None), "num_hidden_layers"):
        return HFStudent(model)
    raise TypeError(f"student must be an MPOBERT or transformers model (or a Student view), got {type(model).__name__}")


_MLM_HEAD_KEYS = {
    "bert": ("cls.predictions.transform.dense", "cls.predictions.transform.LayerNorm", "cls.predictions.bias"),
    "roberta": ("lm_head.dense", "lm_head.layer_norm", "lm_head.bias"),
    "albert": ("predictions.dense", "predictions.LayerNorm", "predictions.bias"),
}


def convert_student(teacher: Teacher, **overrides: Any) -> nn.Module:
    """The teacher's MPOBERT conversion: :class:`~mpobert.MPOBertForPreTraining` (MLM head copied) when the
    teacher has an MLM head, else :class:`~mpobert.MPOBertModel`. ``overrides`` are config fields
    (``num_groups``, ``adapter_rank``, ...) and, for BERT/RoBERTa, ``central_from``."""
    from mpobert import MPOBertForPreTraining, MPOBertModel

    cls = MPOBertForPreTraining if teacher.has_mlm else MPOBertModel
    if teacher.family == "albert":
        overrides.pop("central_from", None)
        student = cls.from_albert(teacher.path, **overrides)
    else:
        student = cls.from_bert(teacher.path, **overrides)
    if teacher.has_mlm and teacher.family != "albert":  # from_albert copies ALBERT's heads itself
        copy_mlm_head(student, teacher)
    return student


def copy_mlm_head(student: nn.Module, teacher: Teacher) -> None:
    """Copy a BERT/RoBERTa teacher's MLM head (transform dense, LayerNorm, output bias) into MPOBERT's."""
    dense, ln, bias = _MLM_HEAD_KEYS[teacher.family]
    state = teacher.model.state_dict()
    head = student.mlm
    pairs = [(head.dense.weight, dense + ".weight"), (head.dense.bias, dense + ".bias"), (head.ln_weight, ln + ".weight"),
             (head.ln_bias, ln + ".bias"), (head.bias, bias)]
    with torch.no_grad():
        for param, key in pairs:
            if key not in state or state[key].shape != param.shape:
                raise ValueError(f"teacher MLM head tensor {key!r} is missing or has shape "
                                 f"{tuple(state[key].shape) if key in state else None}, expected {tuple(param.shape)}")
            param.copy_(state[key])
