"""The ``fused`` strategy: the fused Triton op :func:`mpo_core.ops.mpo_linear.mpo_linear`.

Whether ``auto`` may offer it is the one dispatcher's answer (:func:`mpo_core.ops.dispatch.default_backend`),
not a second rule here.
"""
from __future__ import annotations

from typing import Sequence

import torch

from mpo_core.ops.dispatch import default_backend
from mpo_core.ops.mpo_linear import mpo_linear

__all__ = ["fused_available", "run_fused"]


def fused_available(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether ``auto`` may choose the fused path: ``backend=None`` would run the Triton kernel for
    ``dtype`` tensors on ``device`` (a CUDA GPU of compute capability >= 8.0; below it, Triton's
    ``tl.dot`` has no tensor cores and cuBLAS through torch wins)."""
    return default_backend("mpo_linear", device, dtype) == "triton"


def run_fused(
    x2d: torch.Tensor, cores: Sequence[torch.Tensor], bias: torch.Tensor | None, activation: str | None
) -> torch.Tensor:
    """Run the fused Triton kernel (forced: :class:`~mpo_core.ops.BackendUnavailableError` where it cannot run)."""
    return mpo_linear(x2d, list(cores), bias=bias, activation=activation, backend="triton")
