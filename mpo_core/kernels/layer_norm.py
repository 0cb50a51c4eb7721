"""LayerNorm forward and backward in Triton (style of the Triton layer-norm tutorial).

Forward: one program per row, the whole row in registers (``BLOCK_N`` = next power of
two of the hidden size), fp32 statistics; writes ``y``, ``mean`` and ``rstd``.

Backward: ``G`` programs (a few per SM, :func:`~mpo_core.kernels.reduce.num_partials`),
each owning a contiguous block of rows: it writes ``dh`` for each row and keeps
running fp32 sums of ``dy * xhat`` and ``dy`` in registers, stored once as its
partial row of a ``(G, N)`` buffer; :func:`~mpo_core.kernels.reduce.column_sum` then
reduces the partials. No atomics, no races. The same backward kernel serves the
residual + dropout + LayerNorm op (:mod:`mpo_core.kernels.residual_layer_norm`):
with ``HAS_DROPOUT`` it also writes ``dr = dh * keep / (1 - p)``, recomputing the
keep mask from ``(seed, offset)`` exactly as the forward drew it.

Bytes per row of ``N`` elements of size ``s``: forward reads ``N s`` and writes
``N s + 8``; backward reads ``2 N s + 8`` and writes ``N s`` (plus ``N s`` for ``dr``).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mpo_core.kernels.reduce import column_sum, num_partials

MAX_FUSED_BYTES = 65536
"""Largest row, in bytes, kept in registers by one program (65536 B: 16384 fp32 or 32768 fp16)."""


@triton.jit
def dropout_keep(seed, offset, row, cols, N, p):
    """Keep mask of element ``(row, cols)``: Philox uniform at ``offset + row * N + col`` >= p."""
    return tl.rand(seed, offset + row * N + cols) >= p


@triton.jit
def normalize_row(h, cols, mask, W, B, N, eps, HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr):
    """LayerNorm of one fp32 row ``h`` (zero on masked lanes); returns ``(y, mean, rstd)``."""
    mean = tl.sum(h, axis=0) / N
    centered = tl.where(mask, h - mean, 0.0)
    var = tl.sum(centered * centered, axis=0) / N
    rstd = 1.0 / tl.sqrt(var + eps)
    y = centered * rstd
    if HAS_WEIGHT:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    return y, mean, rstd


@triton.jit
def _layer_norm_fwd_kernel(X, Y, W, B, Mean, Rstd, N, eps,
                           HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK_N: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    x = tl.load(X + row * N + cols, mask=mask, other=0.0).to(tl.float32)
    y, mean, rstd = normalize_row(x, cols, mask, W, B, N, eps, HAS_WEIGHT, HAS_BIAS)
    tl.store(Y + row * N + cols, y.to(Y.dtype.element_ty), mask=mask)
    tl.store(Mean + row, mean)
    tl.store(Rstd + row, rstd)


@triton.jit
def _layer_norm_bwd_kernel(DY, H, W, Mean, Rstd, DH, DR, DW, DB, M, N, rows_per_program, p, scale, seed, offset,
                           HAS_WEIGHT: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                           BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_WEIGHT:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros((BLOCK_N,), dtype=tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for row in range(row_start, row_end):
        h = tl.load(H + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(DY + row * N + cols, mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(Mean + row)
        rstd = tl.load(Rstd + row)
        xhat = tl.where(mask, (h - mean) * rstd, 0.0)
        if HAS_WEIGHT:
            wdy = dy * w
            dw += dy * xhat
        else:
            wdy = dy
        if HAS_BIAS:
            db += dy
        c1 = tl.sum(xhat * wdy, axis=0) / N
        c2 = tl.sum(wdy, axis=0) / N
        dh = (wdy - (xhat * c1 + c2)) * rstd
        tl.store(DH + row * N + cols, dh.to(DH.dtype.element_ty), mask=mask)
        if HAS_DROPOUT:
            keep = dropout_keep(seed, offset, row, cols, N, p)
            dr = tl.where(keep, dh * scale, 0.0)
            tl.store(DR + row * N + cols, dr.to(DR.dtype.element_ty), mask=mask)
    if HAS_WEIGHT:
        tl.store(DW + pid * N + cols, dw, mask=mask)
    if HAS_BIAS:
        tl.store(DB + pid * N + cols, db, mask=mask)


def block_and_warps(n: int, element_size: int, backward: bool = False) -> tuple[int, int]:
    """``BLOCK_N`` (next power of two of ``n``) and ``num_warps`` for a row of ``n`` elements.

    Forward: the tutorial's ``BLOCK_N / 256`` warps, 4 to 8. Backward (about seven fp32
    row vectors live): 4 to 8 warps from ``BLOCK_N / 128``. ptxas (Triton 3.9,
    ``cuobjdump --dump-resource-usage``, bf16 and fp32): no spills up to ``BLOCK_N = 8192``
    on sm_80; on sm_90 none up to 4096 without dropout, 312 B of stack at 8192, and the
    dropout backward (Philox in the row loop) 40-72 B at 4096, ~1600 B at 8192. BERT
    hidden sizes (``BLOCK_N = 1024``) spill nowhere; 16 warps spilled more.
    """
    block = triton.next_power_of_2(n)
    if block * element_size > MAX_FUSED_BYTES:
        raise ValueError(f"hidden size {n} is too large for the Triton LayerNorm (max {MAX_FUSED_BYTES // element_size} "
                         f"elements of {element_size} bytes)")
    return block, min(max(block // (128 if backward else 256), 4 if backward else 1), 8)


def layer_norm_fwd(x: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """LayerNorm of each row of contiguous 2-D ``x``; returns ``(y, mean, rstd)``, stats fp32 ``(M,)``."""
    m, n = x.shape
    y = torch.empty_like(x)
    mean = torch.empty(m, dtype=torch.float32, device=x.device)
    rstd = torch.empty(m, dtype=torch.float32, device=x.device)
    block, warps = block_and_warps(n, x.element_size())
    if m:
        _layer_norm_fwd_kernel[(m,)](x, y, weight, bias, mean, rstd, n, eps, HAS_WEIGHT=weight is not None,
                                     HAS_BIAS=bias is not None, BLOCK_N=block, num_warps=warps)
    return y, mean, rstd


def dropout_scale(p: float) -> float:
    """Scale of kept elements under dropout with drop probability ``p`` (0 when ``p == 1``)."""
    return 0.0 if p >= 1.0 else 1.0 / (1.0 - p)


def layer_norm_bwd(dy: torch.Tensor, h: torch.Tensor, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   mean: torch.Tensor, rstd: torch.Tensor, dr: torch.Tensor | None = None, p: float = 0.0,
                   seed: int = 0, offset: int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """Backward of :func:`layer_norm_fwd` w.r.t. its input ``h``; returns ``(dh, dweight, dbias)``.

    ``bias`` is only read for its presence and dtype. ``dweight``/``dbias`` are ``None``
    when ``weight``/``bias`` are. When ``dr`` (an output buffer like ``h``) is given, the
    kernel also writes into it ``dh * keep / (1 - p)`` with the dropout keep mask drawn
    from ``(seed, offset)`` as in the forward.
    """
    m, n = h.shape
    dh = torch.empty_like(h)
    block, warps = block_and_warps(n, h.element_size(), backward=True)
    g = num_partials(m, h.device)
    dw_part = torch.empty((g, n), dtype=torch.float32, device=h.device) if weight is not None else None
    db_part = torch.empty((g, n), dtype=torch.float32, device=h.device) if bias is not None else None
    # with no rows the single program still runs and stores zero partials
    _layer_norm_bwd_kernel[(g,)](dy, h, weight, mean, rstd, dh, dr, dw_part, db_part, m, n, triton.cdiv(m, g),
                                 p, dropout_scale(p), seed, offset, HAS_WEIGHT=weight is not None,
                                 HAS_BIAS=bias is not None, HAS_DROPOUT=dr is not None, BLOCK_N=block,
                                 num_warps=warps)
    dw = column_sum(dw_part, weight.dtype) if weight is not None else None
    db = column_sum(db_part, bias.dtype) if bias is not None else None
    return dh, dw, db
