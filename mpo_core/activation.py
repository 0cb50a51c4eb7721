"""The activation vocabulary of the public API, and its one mapping to what torch and the kernels take.

``activation`` is ``None`` (identity), ``"gelu"`` (the exact erf GELU, BERT's ``"gelu"``) or
``"gelu_tanh"`` (its tanh approximation, transformers' ``"gelu_new"``). Every public function that
applies an activation (:func:`mpo_core.contract.contract`, :func:`mpo_core.ops.bias_gelu`,
:func:`mpo_core.ops.mpo_linear.mpo_linear`, the cost model) speaks this vocabulary; the mapping to
torch's ``approximate="none"/"tanh"`` (which ``F.gelu``, the C++/CUDA extension and the Triton
bias + GELU kernel take) and to the fused MPO kernel's epilogue name lives here only.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["ACTIVATIONS", "GELUS", "apply_activation", "check_activation", "epilogue_name", "gelu_approximate"]

ACTIVATIONS = (None, "gelu", "gelu_tanh")
"""Every activation a fused linear or a contraction accepts."""

GELUS = ("gelu", "gelu_tanh")
"""The GELU forms (what :func:`mpo_core.ops.bias_gelu` accepts)."""


def check_activation(activation: object, allowed: tuple = ACTIVATIONS) -> str | None:
    """Return ``activation`` if it is one of ``allowed``, else raise ``ValueError`` naming them."""
    if activation not in allowed:
        raise ValueError(f"activation must be one of {allowed}, got {activation!r}")
    return activation


def gelu_approximate(activation: str) -> str:
    """torch's ``approximate`` constant of a GELU activation: ``"none"`` (erf) or ``"tanh"``."""
    return "tanh" if check_activation(activation, GELUS) == "gelu_tanh" else "none"


def epilogue_name(activation: str | None) -> str:
    """The fused MPO kernel's epilogue name (a plain ``str`` for the custom-op schema): ``"none"`` for ``None``."""
    return "none" if check_activation(activation) is None else activation


def apply_activation(z: torch.Tensor, activation: str | None) -> torch.Tensor:
    """``activation(z)`` with torch (the reference every fused epilogue is tested against)."""
    if check_activation(activation) is None:
        return z
    return F.gelu(z, approximate=gelu_approximate(activation))
