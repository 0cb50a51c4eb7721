"""Residual add + dropout + LayerNorm in Triton: ``y = LN(x + dropout(r, p))``.

Forward: one program per row (row in registers, as in :mod:`.layer_norm`); it forms
``h = x + r * keep / (1 - p)`` in fp32, rounds it to the storage dtype (so forward
and backward see the same ``h``), stores ``h`` and normalizes it. The keep mask is a
Philox draw ``tl.rand(seed, offset + row * N + col) >= p``: it is never stored, the
backward recomputes it from ``(seed, offset)``. With ``p == 0`` no random number is
drawn and the kernel is exactly residual add + LayerNorm.

Backward: the LayerNorm backward kernel of :mod:`.layer_norm` on ``h``, which also
writes ``dr = dh * keep / (1 - p)``; ``dx = dh`` (and ``dr = dh`` when ``p == 0``), called by
:mod:`mpo_core.ops.norm` directly.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mpo_core.kernels.layer_norm import block_and_warps, dropout_keep, dropout_scale, normalize_row


@triton.jit
def _residual_layer_norm_fwd_kernel(X, R, Y, H, W, B, Mean, Rstd, N, eps, p, scale, seed, offset,
                                    HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                                    BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(R + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        keep = dropout_keep(seed, offset, row, cols, N, p)
        r = tl.where(keep, r * scale, 0.0)
    h = (x + r).to(H.dtype.element_ty)
    tl.store(H + row * N + cols, h, mask=mask)
    y, mean, rstd = normalize_row(h.to(tl.float32), cols, mask, W, B, N, eps, HAS_WEIGHT, HAS_BIAS)
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


def residual_layer_norm_fwd(x: torch.Tensor, r: torch.Tensor, weight: torch.Tensor | None,
                            bias: torch.Tensor | None, eps: float, p: float = 0.0, seed: int = 0, offset: int = 0
                            ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``y = LN(x + dropout(r, p))`` over rows of contiguous 2-D ``x``, ``r``; returns ``(y, h, mean, rstd)``."""
    m, n = x.shape
    y = torch.empty_like(x)
    h = torch.empty_like(x)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    block, warps = block_and_warps(n, x.element_size())
    if m:
        _residual_layer_norm_fwd_kernel[(m,)](x, r, y, h, weight, bias, mean, rstd, n, eps, p, dropout_scale(p), seed,
                                              offset, HAS_WEIGHT=weight is not None, HAS_BIAS=bias is not None,
                                              HAS_DROPOUT=p > 0, BLOCK_N=block, num_warps=warps)
    return y, h, mean, rstd
