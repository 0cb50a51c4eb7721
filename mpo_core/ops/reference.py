"""The torch reference of every fused op: plain torch, the one all tests compare against.

Each computes in float32 (float64 for float64 input) and returns the input dtype, the
same contract as the kernels (fp32 accumulation for fp16/bf16). They are also the
``backend="torch"`` path of :mod:`mpo_core.ops`, where autograd comes from torch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from mpo_core.activation import GELUS, apply_activation, check_activation


def _acc(t: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    return None if t is None else t.to(dtype)


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype the ops compute in for inputs of ``dtype``: float64 stays, all else is float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def residual_layer_norm(x: torch.Tensor, residual: torch.Tensor | None, weight: torch.Tensor | None,
                        bias: torch.Tensor | None, eps: float = 1e-5, keep_mask: torch.Tensor | None = None,
                        dropout_p: float = 0.0) -> torch.Tensor:
    """``LayerNorm(x + dropout(residual))`` over the last dim, with an explicit dropout mask.

    Parameters
    ----------
    x, residual : torch.Tensor
        Same shape ``(..., N)``; ``residual`` may be ``None`` (plain LayerNorm).
    weight, bias : torch.Tensor or None
        Affine parameters of shape ``(N,)``.
    eps : float
        Added to the variance.
    keep_mask : torch.Tensor or None
        Boolean, shape of ``residual``: which residual elements dropout keeps. ``None``
        means no dropout.
    dropout_p : float
        Drop probability the mask was drawn with; kept elements are scaled by
        ``1 / (1 - dropout_p)`` (by 0 when ``dropout_p == 1``).

    Returns
    -------
    torch.Tensor
        Same shape and dtype as ``x``.
    """
    acc = accumulation_dtype(x.dtype)
    h = x.to(acc)
    if residual is not None:
        r = residual.to(acc)
        if keep_mask is not None:
            scale = 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)
            r = torch.where(keep_mask, r * scale, torch.zeros((), dtype=acc, device=r.device))
        h = h + r
    return F.layer_norm(h, (h.shape[-1],), _acc(weight, acc), _acc(bias, acc), eps).to(x.dtype)


def layer_norm(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
               eps: float = 1e-5) -> torch.Tensor:
    """LayerNorm over the last dim: :func:`residual_layer_norm` without a residual."""
    return residual_layer_norm(x, None, weight, bias, eps)


def bias_gelu(x: torch.Tensor, bias: torch.Tensor | None, activation: str = "gelu") -> torch.Tensor:
    """``gelu(x + bias)`` (``activation`` ``"gelu"``: erf form, ``"gelu_tanh"``: tanh form), in ``x``'s dtype."""
    acc = accumulation_dtype(x.dtype)
    u = x.to(acc) if bias is None else x.to(acc) + bias.to(acc)
    return apply_activation(u, check_activation(activation, GELUS)).to(x.dtype)
