"""Availability and dispatch of the fused Triton path (``mpo_core.ops.mpo_linear``)."""
from __future__ import annotations

import importlib
import importlib.util
import os
from functools import lru_cache
from typing import Sequence

import torch

__all__ = ["fused_available", "run_fused"]

_OP_MODULE = "mpo_core.ops.mpo_linear"


@lru_cache(maxsize=None)
def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


@lru_cache(maxsize=None)
def _capability_ok(index: int) -> bool:
    return torch.cuda.get_device_capability(index) >= (8, 0)


def fused_available(device: torch.device) -> bool:
    """Whether ``auto`` may choose the fused path on ``device``.

    True for a CUDA device of compute capability >= 8.0 with Triton and the fused op
    importable. (Below 8.0, Triton's ``tl.dot`` has no tensor cores: cuBLAS through torch wins.)
    """
    if device.type != "cuda" or not (_importable("triton") and _importable(_OP_MODULE)):
        return False
    return _capability_ok(device.index if device.index is not None else torch.cuda.current_device())


def run_fused(
    x2d: torch.Tensor, cores: Sequence[torch.Tensor], bias: torch.Tensor | None, activation: str | None
) -> torch.Tensor:
    """Call the fused op; on CPU only under the Triton interpreter (``TRITON_INTERPRET=1``)."""
    if x2d.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        raise RuntimeError(
            f"strategy='fused' needs a CUDA tensor, or TRITON_INTERPRET=1 (set before importing mpo_core) "
            f"to run it through the Triton interpreter; got a {x2d.device.type} tensor"
        )
    try:
        op = importlib.import_module(_OP_MODULE).mpo_linear
    except (ImportError, AttributeError) as exc:
        raise RuntimeError(f"strategy='fused' needs {_OP_MODULE}.mpo_linear, which is not available: {exc}") from exc
    return op(x2d, list(cores), bias=bias, activation=activation)
