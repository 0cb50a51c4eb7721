"""mpo-core: matrix product operator (tensor-train matrix) factorization for PyTorch.

Public API (re-exports only; see the submodules for the implementations):

- :func:`decompose`, :class:`MPO`, :func:`factorize`: TT-SVD factorization and the MPO container;
- :func:`contract`, :func:`explain`: apply an MPO to inputs with the cheapest strategy;
- :class:`MPOLinear`, :func:`mpo_ify`, :func:`set_trainable`: ``torch.nn`` layers and helpers;
- :mod:`mpo_core.ops`: fused ops (``layer_norm``, ``residual_layer_norm``, ``bias_gelu``,
  ``mpo_linear``) dispatched to CUDA, Triton or torch;
- :func:`compress` (MPOP), :class:`OverParameterization` / :func:`expand_linear` (OPF),
  :class:`MPOEFeedForward` (MPOE; :func:`mpoe_ify` / :func:`unmpoe_ify` upcycle transformers models' FFNs into it):
  the MPO method family;
- :func:`backends`, :func:`extension`: what this installation can use, and the compiled ``mpo_core._C``.
"""
from mpo_core import ops
from mpo_core._backends import backends, extension
from mpo_core.compress import compress
from mpo_core.contract import contract, explain
from mpo_core.decompose import decompose
from mpo_core.moe import MPOEFeedForward
from mpo_core.mpo import MPO
from mpo_core.nn import MPOLinear, mpo_ify, set_trainable
from mpo_core.opf import OverParameterization, expand_linear
from mpo_core.shapes import factorize
from mpo_core.upcycle import mpoe_ify, unmpoe_ify

__all__ = [
    "MPO",
    "MPOEFeedForward",
    "MPOLinear",
    "OverParameterization",
    "backends",
    "compress",
    "contract",
    "decompose",
    "expand_linear",
    "explain",
    "extension",
    "factorize",
    "mpo_ify",
    "mpoe_ify",
    "ops",
    "set_trainable",
    "unmpoe_ify",
]
__version__ = "0.1.0"
