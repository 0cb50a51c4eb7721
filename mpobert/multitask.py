"""Multitask fine-tuning: one shared MPOBERT encoder, one classification/regression head per task."""
from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F
from torch import nn

from mpobert.heads import SequenceClassifierOutput
from mpobert.model import MPOBertModel


class MPOBertForMultiTask(nn.Module):
    """An :class:`MPOBertModel` shared by several tasks, each with ``dropout → H → num_labels``.

    Parameters
    ----------
    encoder : MPOBertModel
        The shared encoder (e.g. loaded from a pretraining run).
    tasks : mapping of str to int
        Task name → number of labels (1 = regression, MSE loss).
    dropout : float, optional
        Head dropout (default: the encoder config's ``classifier_dropout``).
    """

    def __init__(self, encoder: MPOBertModel, tasks: Mapping[str, int], dropout: float | None = None) -> None:
        super().__init__()
        if not isinstance(encoder, MPOBertModel):
            raise TypeError(f"encoder must be an MPOBertModel, got {type(encoder).__name__}")
        if not tasks:
            raise ValueError("tasks must name at least one task")
        for name, n in tasks.items():
            if not isinstance(n, int) or n < 1:
                raise ValueError(f"tasks[{name!r}] must be a positive number of labels, got {n!r}")
        self.mpobert = encoder
        self.config = encoder.config
        self.num_labels = dict(tasks)
        self.dropout = nn.Dropout(self.config.classifier_dropout if dropout is None else dropout)
        self.heads = nn.ModuleDict({name: nn.Linear(self.config.hidden_size, n) for name, n in tasks.items()})
        with torch.no_grad():
            for head in self.heads.values():
                head.weight.normal_(0.0, self.config.initializer_range)
                head.bias.zero_()

    def forward(
        self, task: str, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        """Logits of ``task``'s head; ``loss`` (cross-entropy, or MSE for regression) when ``labels`` are given."""
        if task not in self.heads:
            raise ValueError(f"unknown task {task!r}; this model has heads for {sorted(self.heads)}")
        pooled = self.mpobert(input_ids, attention_mask, token_type_ids).pooler_output
        logits = self.heads[task](self.dropout(pooled))
        loss = None
        if labels is not None:
            if self.num_labels[task] == 1:
                loss = F.mse_loss(logits[:, 0].float(), labels.float())
            else:
                loss = F.cross_entropy(logits.float(), labels)
        return SequenceClassifierOutput(logits, loss)
