"""Bias add + GELU in Triton, forward and backward; erf and tanh forms.

``y = gelu(x + b)`` over a contiguous ``(M, N)`` input with a bias of length ``N``.
The interpreter has no ``tanh``, so the tanh form uses ``tanh(u) = 2 sigmoid(2u) - 1``.

Forward: a 2-D grid of ``(BLOCK_M, BLOCK_N)`` tiles, fp32 math. Backward: ``G``
programs along the rows times ``N / BLOCK_N`` along the columns; each walks its block
of rows writing ``dx = dy * gelu'(x + b)`` and keeps the fp32 column sums of ``dx`` as
its partial ``dbias`` row; :func:`~mpo_core.kernels.reduce.column_sum` reduces them.
Bytes per element of size ``s``: forward ``2 s``, backward ``3 s`` (plus the bias).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from mpo_core.kernels.reduce import column_sum, num_partials

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)


@triton.jit
def _gelu_and_grad(u, APPROX_TANH: tl.constexpr):
    """``(gelu(u), gelu'(u))`` in fp32, erf or tanh form."""
    if APPROX_TANH:
        inner = _SQRT_2_OVER_PI * (u + 0.044715 * u * u * u)
        t = 2.0 * tl.sigmoid(2.0 * inner) - 1.0
        y = 0.5 * u * (1.0 + t)
        dy = 0.5 * (1.0 + t) + 0.5 * u * (1.0 - t * t) * _SQRT_2_OVER_PI * (1.0 + 3.0 * 0.044715 * u * u)
    else:
        cdf = 0.5 * (1.0 + tl.erf(u * _SQRT1_2))
        y = u * cdf
        dy = cdf + u * _INV_SQRT_2PI * tl.exp(-0.5 * u * u)
    return y, dy


@triton.jit
def _bias_gelu_fwd_kernel(X, B, Y, M, N, HAS_BIAS: tl.constexpr, APPROX_TANH: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    rows = tl.program_id(0).to(tl.int64) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows[:, None] < M) & (cols[None, :] < N)
    offs = rows[:, None] * N + cols[None, :]
    u = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        u += tl.load(B + cols, mask=cols < N, other=0.0).to(tl.float32)[None, :]
    y, _ = _gelu_and_grad(u, APPROX_TANH)
    tl.store(Y + offs, y.to(Y.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(DY, X, B, DX, DB, M, N, rows_per_program, HAS_BIAS: tl.constexpr,
                          APPROX_TANH: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    pid = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    col_mask = cols < N
    if HAS_BIAS:
        b = tl.load(B + cols, mask=col_mask, other=0.0).to(tl.float32)
    db = tl.zeros((BLOCK_N,), dtype=tl.float32)
    row_start = pid.to(tl.int64) * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)
        mask = (rows[:, None] < row_end) & col_mask[None, :]
        offs = rows[:, None] * N + cols[None, :]
        u = tl.load(X + offs, mask=mask, other=0.0).to(tl.float32)
        if HAS_BIAS:
            u += b[None, :]
        _, grad = _gelu_and_grad(u, APPROX_TANH)
        dx = tl.where(mask, tl.load(DY + offs, mask=mask, other=0.0).to(tl.float32) * grad, 0.0)
        tl.store(DX + offs, dx.to(DX.dtype.element_ty), mask=mask)
        db += tl.sum(dx, axis=0)
    if HAS_BIAS:
        tl.store(DB + pid * N + cols, db, mask=col_mask)


WARPS = 8
"""4096-element tiles over 256 threads: 16 elements per thread, no spills (ptxas, sm_80/sm_90)."""


def blocks(n: int) -> tuple[int, int]:
    """``(BLOCK_M, BLOCK_N)`` tile for rows of ``n`` elements: up to 1024 columns, 4096 elements."""
    block_n = min(triton.next_power_of_2(n), 1024)
    return max(1, 4096 // block_n), block_n


def bwd_rows_per_program(m: int, g: int, block_m: int) -> int:
    """Rows each of the ``g`` backward programs walks: a multiple of ``block_m`` covering ``m``."""
    return triton.cdiv(triton.cdiv(m, g), block_m) * block_m


def bias_gelu_fwd(x: torch.Tensor, bias: torch.Tensor | None, approximate: str) -> torch.Tensor:
    """``gelu(x + bias)`` for contiguous 2-D ``x``; ``approximate`` is ``"none"`` (erf) or ``"tanh"``."""
    m, n = x.shape
    y = torch.empty_like(x)
    block_m, block_n = blocks(n)
    if m:
        grid = (triton.cdiv(m, block_m), triton.cdiv(n, block_n))
        _bias_gelu_fwd_kernel[grid](x, bias, y, m, n, HAS_BIAS=bias is not None, APPROX_TANH=approximate == "tanh",
                                    BLOCK_M=block_m, BLOCK_N=block_n, num_warps=WARPS)
    return y


def bias_gelu_bwd(dy: torch.Tensor, x: torch.Tensor, bias: torch.Tensor | None, approximate: str
                  ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Backward of :func:`bias_gelu_fwd`; returns ``(dx, dbias)`` (``dbias`` is ``None`` without bias)."""
    m, n = x.shape
    dx = torch.empty_like(x)
    block_m, block_n = blocks(n)
    g = num_partials(triton.cdiv(m, block_m), x.device)
    rows_per_program = bwd_rows_per_program(m, g, block_m)
    db_part = torch.empty((g, n), dtype=torch.float32, device=x.device) if bias is not None else None
    # with no rows the programs still run and store zero partials
    _bias_gelu_bwd_kernel[(g, triton.cdiv(n, block_n))](dy, x, bias, dx, db_part, m, n, rows_per_program,
                                                        HAS_BIAS=bias is not None,
                                                        APPROX_TANH=approximate == "tanh", BLOCK_M=block_m,
                                                        BLOCK_N=block_n, num_warps=WARPS)
    return dx, (column_sum(db_part, bias.dtype) if bias is not None else None)
