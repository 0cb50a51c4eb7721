"""mpo-core: matrix product operator (tensor-train matrix) factorization for PyTorch.

Public API (re-exports only; see the submodules for the implementations).
"""
from mpo_core._backends import backends

__all__ = ["backends"]
__version__ = "0.1.0"
