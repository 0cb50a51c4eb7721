"""mpo-core: matrix product operator (tensor-train matrix) factorization for PyTorch.

Public API (re-exports only; see the submodules for the implementations).
"""
from mpo_core._backends import backends
from mpo_core.decompose import decompose
from mpo_core.mpo import MPO
from mpo_core.shapes import factorize

__all__ = ["MPO", "backends", "decompose", "factorize"]
__version__ = "0.1.0"
