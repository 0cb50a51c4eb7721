"""Task heads on :class:`~mpobert.model.MPOBertModel`: pretraining (MLM + SOP), classification/regression, QA spans.

Forward signatures follow Hugging Face's (``input_ids, attention_mask, token_type_ids,
position_ids, inputs_embeds`` plus the task's labels); outputs are small dataclasses that also
read like dicts, with ``loss`` set when labels are given.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from mpo_core.ops import bias_gelu, layer_norm
from mpobert.config import MPOBertConfig
from mpobert.model import ModelOutput, MPOBertModel, MPOBertPreTrainedModel

__all__ = [
    "PreTrainingOutput", "SequenceClassifierOutput", "QuestionAnsweringOutput",
    "MPOBertForPreTraining", "MPOBertForSequenceClassification", "MPOBertForQuestionAnswering",
]

IGNORE_INDEX = -100
"""MLM labels equal to this are not predicted (unmasked positions)."""


@dataclass
class PreTrainingOutput(ModelOutput):
    """``logits``: MLM scores ``(B, S, V)``; ``sop_logits``: ``(B, 2)``; ``loss = mlm_loss + sop_loss``."""

    logits: torch.Tensor
    sop_logits: torch.Tensor
    loss: torch.Tensor | None = None
    mlm_loss: torch.Tensor | None = None
    sop_loss: torch.Tensor | None = None
    hidden_states: list[torch.Tensor] | None = None


@dataclass
class SequenceClassifierOutput(ModelOutput):
    """``logits``: ``(B, num_labels)``; ``loss``: cross-entropy, or MSE when ``num_labels == 1``."""

    logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden_states: list[torch.Tensor] | None = None


@dataclass
class QuestionAnsweringOutput(ModelOutput):
    """``start_logits``/``end_logits``: ``(B, S)``; ``loss``: mean of the start and end cross-entropies."""

    start_logits: torch.Tensor
    end_logits: torch.Tensor
    loss: torch.Tensor | None = None
    hidden_states: list[torch.Tensor] | None = None


def _check_labels(name: str, labels: torch.Tensor, shape: tuple[int, ...], floating: bool = False) -> None:
    if not isinstance(labels, torch.Tensor) or tuple(labels.shape) != shape:
        raise ValueError(f"{name} must be a tensor of shape {shape}, got {getattr(labels, 'shape', type(labels).__name__)}")
    if labels.is_floating_point() != floating:
        raise TypeError(f"{name} must be {'a floating' if floating else 'an integer'} tensor, got {labels.dtype}")


class MPOBertMLMHead(nn.Module):
    """ALBERT's MLM head: ``H -> E`` dense, GELU, LayerNorm, then the (tied) ``E -> V`` word embeddings + bias."""

    def __init__(self, config: MPOBertConfig, word_embeddings: nn.Embedding) -> None:
        super().__init__()
        self.config = config
        self.dense = nn.Linear(config.hidden_size, config.embedding_size)
        self.ln_weight = nn.Parameter(torch.ones(config.embedding_size))
        self.ln_bias = nn.Parameter(torch.zeros(config.embedding_size))
        self.bias = nn.Parameter(torch.zeros(config.vocab_size))
        self.word_embeddings = [word_embeddings]  # tied, not registered twice

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        x = bias_gelu(F.linear(hidden, self.dense.weight), self.dense.bias, self.config.activation)
        x = layer_norm(x, self.ln_weight, self.ln_bias, self.config.layer_norm_eps)
        return F.linear(x, self.word_embeddings[0].weight, self.bias)


class MPOBertForPreTraining(MPOBertPreTrainedModel):
    """MPOBERT with the MLM head (tied to the word embeddings) and the sentence-order-prediction head."""

    def __init__(self, config: MPOBertConfig) -> None:
        super().__init__(config)
        self.mpobert = MPOBertModel(config)
        self.mlm = MPOBertMLMHead(config, self.mpobert.embeddings.word_embeddings)
        self.sop_dropout = nn.Dropout(config.classifier_dropout)
        self.sop_classifier = nn.Linear(config.hidden_size, 2)
        self._init_heads()

    def _load_albert_heads(self, state: dict[str, torch.Tensor]) -> None:
        """Copy ``predictions.*`` and ``sop_classifier.*`` from an ``AlbertForPreTraining`` state, when present."""
        cfg = self.config
        pairs = {
            "predictions.dense.weight": (self.mlm.dense.weight, (cfg.embedding_size, cfg.hidden_size)),
            "predictions.dense.bias": (self.mlm.dense.bias, (cfg.embedding_size,)),
            "predictions.LayerNorm.weight": (self.mlm.ln_weight, (cfg.embedding_size,)),
            "predictions.LayerNorm.bias": (self.mlm.ln_bias, (cfg.embedding_size,)),
            "predictions.bias": (self.mlm.bias, (cfg.vocab_size,)),
            "sop_classifier.classifier.weight": (self.sop_classifier.weight, (2, cfg.hidden_size)),
            "sop_classifier.classifier.bias": (self.sop_classifier.bias, (2,)),
        }
        for key, (param, shape) in pairs.items():
            if key in state:
                if tuple(state[key].shape) != shape:
                    raise ValueError(f"checkpoint tensor {key!r} has shape {tuple(state[key].shape)}, expected {shape}")
                param.copy_(state[key])

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        sentence_order_label: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> PreTrainingOutput:
        """``labels``: ``(B, S)`` token ids to predict, ``-100`` where not masked; ``sentence_order_label``:
        ``(B,)`` with 0 = in order, 1 = swapped. ``loss`` is the sum of the given losses."""
        out = self.mpobert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, output_hidden_states)
        logits = self.mlm(out.last_hidden_state)
        sop_logits = self.sop_classifier(self.sop_dropout(out.pooler_output))
        mlm_loss = sop_loss = None
        if labels is not None:
            _check_labels("labels", labels, tuple(logits.shape[:2]))
            mlm_loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1),
                                       ignore_index=IGNORE_INDEX)
        if sentence_order_label is not None:
            _check_labels("sentence_order_label", sentence_order_label, (sop_logits.shape[0],))
            sop_loss = F.cross_entropy(sop_logits.float(), sentence_order_label)
        losses = [x for x in (mlm_loss, sop_loss) if x is not None]
        loss = sum(losses[1:], losses[0]) if losses else None
        return PreTrainingOutput(logits, sop_logits, loss, mlm_loss, sop_loss, out.hidden_states)


class MPOBertForSequenceClassification(MPOBertPreTrainedModel):
    """Pooled output -> dropout -> ``H -> num_labels``; ``num_labels == 1`` is regression (MSE)."""

    def __init__(self, config: MPOBertConfig) -> None:
        super().__init__(config)
        self.mpobert = MPOBertModel(config)
        self.dropout = nn.Dropout(config.classifier_dropout)
        self.classifier = nn.Linear(config.hidden_size, config.num_labels)
        self._init_heads()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> SequenceClassifierOutput:
        """``labels``: ``(B,)`` class ids, or float targets when ``num_labels == 1``."""
        out = self.mpobert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, output_hidden_states)
        logits = self.classifier(self.dropout(out.pooler_output))
        loss = None
        if labels is not None:
            regression = self.config.num_labels == 1
            _check_labels("labels", labels, (logits.shape[0],), floating=regression)
            loss = (F.mse_loss(logits[:, 0].float(), labels.float()) if regression
                    else F.cross_entropy(logits.float(), labels))
        return SequenceClassifierOutput(logits, loss, out.hidden_states)


class MPOBertForQuestionAnswering(MPOBertPreTrainedModel):
    """Per-token ``H -> 2`` span scores (start, end)."""

    def __init__(self, config: MPOBertConfig) -> None:
        super().__init__(config)
        self.mpobert = MPOBertModel(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self._init_heads()

    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.Tensor | None = None,
        end_positions: torch.Tensor | None = None,
        output_hidden_states: bool = False,
    ) -> QuestionAnsweringOutput:
        """``start_positions``/``end_positions``: ``(B,)`` token indices (both or neither); positions
        outside the sequence are ignored (Hugging Face's convention)."""
        out = self.mpobert(input_ids, attention_mask, token_type_ids, position_ids, inputs_embeds, output_hidden_states)
        start_logits, end_logits = self.qa_outputs(out.last_hidden_state).unbind(-1)
        loss = None
        if (start_positions is None) != (end_positions is None):
            raise ValueError("give both start_positions and end_positions, or neither")
        if start_positions is not None:
            b, s = start_logits.shape
            terms = []
            for name, pos, logit in (("start_positions", start_positions, start_logits),
                                     ("end_positions", end_positions, end_logits)):
                _check_labels(name, pos, (b,))
                terms.append(F.cross_entropy(logit.float(), pos.clamp(0, s), ignore_index=s))
            loss = (terms[0] + terms[1]) / 2
        return QuestionAnsweringOutput(start_logits, end_logits, loss, out.hidden_states)
