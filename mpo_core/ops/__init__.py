"""Fused ops (autograd + dispatch): LayerNorm, residual + dropout + LayerNorm, bias + GELU.

Each op has one torch reference in :mod:`mpo_core.ops.reference`; backend choice lives in
:mod:`mpo_core.ops.dispatch` (also for the MPO linear op, imported by full path,
``mpo_core.ops.mpo_linear``).
"""
from mpo_core.ops.dispatch import BackendUnavailableError
from mpo_core.ops.gelu import bias_gelu
from mpo_core.ops.norm import layer_norm, residual_layer_norm

__all__ = ["BackendUnavailableError", "bias_gelu", "layer_norm", "residual_layer_norm"]
