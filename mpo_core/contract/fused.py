"""Availability and dispatch of the fused Triton path (``mpo_core.ops.mpo_linear``)."""
from __future__ import annotations

import importlib
import importlib.util
from functools import lru_cache
from typing import Sequence

import torch

from mpo_core.ops import _dispatch

__all__ = ["fused_available", "fused_cost", "run_fused"]

_OP_MODULE = "mpo_core.ops.mpo_linear"


@lru_cache(maxsize=None)
def _importable(name: str) -> bool:
    try:
        return importlib.util.find_spec(name) is not None
    except ModuleNotFoundError:
        return False


def fused_available(device: torch.device) -> bool:
    """Whether ``auto`` may choose the fused path on ``device``.

    True for a CUDA device where Triton's ``tl.dot`` kernels run
    (:func:`mpo_core.ops._dispatch.triton_supported`: compute capability >= 8.0) with the
    fused op importable. (Below 8.0, Triton's ``tl.dot`` has no tensor cores: cuBLAS
    through torch wins.)
    """
    if device.type != "cuda" or not _importable(_OP_MODULE):
        return False
    return _dispatch.triton_supported(device, uses_dot=True)


def _op_module():
    try:
        return importlib.import_module(_OP_MODULE)
    except ImportError as exc:
        raise RuntimeError(f"strategy='fused' needs {_OP_MODULE}, which cannot be imported: {exc}") from exc


def fused_cost(tokens: int, in_shape, out_shape, ranks, itemsize: int, bias: bool, activation) -> tuple[int, int]:
    """Modelled forward FLOPs and bytes of the fused kernel (from the op's own cost model)."""
    cost = _op_module().mpo_linear_cost(tokens, in_shape, out_shape, ranks, itemsize, bias=bias, activation=activation)
    return cost["flops"], cost["bytes"]


def run_fused(
    x2d: torch.Tensor, cores: Sequence[torch.Tensor], bias: torch.Tensor | None, activation: str | None
) -> torch.Tensor:
    """Run the fused Triton kernel (forced: on CPU only under ``TRITON_INTERPRET=1``, else ``RuntimeError``)."""
    return _op_module().mpo_linear(x2d, list(cores), bias=bias, activation=activation, backend="triton")
