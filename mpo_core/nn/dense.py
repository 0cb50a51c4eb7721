"""What a dense linear module is to the MPO methods: ``nn.Linear`` or transformers' ``Conv1D`` (GPT-2).

``Conv1D`` computes the same ``y = x @ W + b`` as ``nn.Linear`` but stores ``W`` as ``in x out``;
it is recognized by class name and layout, so transformers is never imported here.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["dense_from_weight", "is_linear", "linear_weight"]


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


def dense_from_weight(weight: torch.Tensor, bias: torch.Tensor | None, origin: str = "linear") -> nn.Module:
    """A new dense module computing ``x @ weight + bias`` (``weight``: ``in x out``): ``nn.Linear`` for
    ``origin="linear"``, transformers' ``Conv1D`` for ``"conv1d"`` (imported only then; a missing bias is zero)."""
    if origin not in ("linear", "conv1d"):
        raise ValueError(f"origin must be 'linear' or 'conv1d', got {origin!r}")
    fan_in, fan_out = weight.shape
    kw = dict(device=weight.device, dtype=weight.dtype)
    if origin == "linear":
        module = nn.Linear(fan_in, fan_out, bias=bias is not None, **kw)
        target = module.weight
        weight = weight.T
    else:
        from transformers.pytorch_utils import Conv1D

        module = Conv1D(fan_out, fan_in).to(**kw)
        target = module.weight
    with torch.no_grad():
        target.copy_(weight)
        if module.bias is not None and bias is None:
            module.bias.zero_()
        elif module.bias is not None:
            module.bias.copy_(bias)
    return module
