"""What a dense linear module is to the MPO methods: ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2).

``Conv1D`` computes the same ``y = x @ W + b`` as ``nn.Linear`` but stores ``W`` as ``in x out``;
it is recognized by class name and layout, so transformers is never imported here.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["is_linear", "linear_weight"]


def _is_conv1d(module: nn.Module) -> bool:
    """transformers' ``Conv1D`` (GPT-2): ``y = x @ weight + bias`` with ``weight`` stored ``in x out``."""
    weight = getattr(module, "weight", None)
    return (type(module).__name__ == "Conv1D" and isinstance(weight, torch.Tensor) and weight.dim() == 2
            and getattr(module, "nf", None) == weight.shape[1])


def is_linear(module: nn.Module) -> bool:
    """Whether ``module`` is a linear module the MPO methods replace: ``nn.Linear`` or transformers' ``Conv1D``."""
    return isinstance(module, nn.Linear) or _is_conv1d(module)


def linear_weight(module: nn.Module) -> torch.Tensor:
    """The ``in x out`` weight ``W`` of a linear module (``y = x @ W + b``), detached, no copy."""
    if isinstance(module, nn.Linear):
        return module.weight.detach().T
    if _is_conv1d(module):
        return module.weight.detach()
    raise TypeError(f"expected an nn.Linear or a transformers Conv1D, got {type(module).__name__}")
