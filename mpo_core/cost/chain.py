"""FLOP / byte algebra of the two building blocks: a GEMM and a left-to-right chain of MPO cores."""
from __future__ import annotations

from typing import Sequence

from mpo_core.cost.model import Cost

__all__ = ["BIAS_FLOPS", "CoreShape", "GELU_FLOPS", "chain_cost", "core_shapes", "elementwise_flops", "gemm_cost"]

CoreShape = tuple[int, int, int, int]
"""``(d_left, i, j, d_right)`` of one core."""

BIAS_FLOPS = 1
"""FLOPs per output element of the bias add (vector units)."""
GELU_FLOPS = 8
"""FLOPs per output element of GELU (erf or tanh form; vector units): the one GELU price of the model."""


def elementwise_flops(bias: bool, activation: bool) -> int:
    """FLOPs per output element of the linear's epilogue: :data:`BIAS_FLOPS` and/or :data:`GELU_FLOPS`."""
    return (BIAS_FLOPS if bias else 0) + (GELU_FLOPS if activation else 0)


def core_shapes(in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int]) -> list[CoreShape]:
    """The ``(d_{k-1}, i_k, j_k, d_k)`` of every core of an MPO with bonds ``ranks``."""
    return [(ranks[k], i, j, ranks[k + 1]) for k, (i, j) in enumerate(zip(in_shape, out_shape))]


def gemm_cost(m: int, k: int, n: int, dtype_bytes: int, bias: bool = False, batch: int = 1) -> Cost:
    """``(m x k) @ (k x n)`` (``+ bias`` of ``n``): ``2 m k n`` matmul FLOPs; reads both operands, writes the
    result. ``batch``: that many independent products in one op (a batched GEMM)."""
    return Cost(flops_tensor=2 * batch * m * k * n,
                bytes_read=dtype_bytes * batch * (m * k + k * n + (n if bias else 0)),
                bytes_written=dtype_bytes * batch * m * n)


def chain_cost(cores: Sequence[CoreShape], dtype_bytes: int) -> Cost:
    """Contract consecutive cores left to right into one ``(d_left, prod i, prod j, d_right)`` tensor.

    Step ``q`` multiplies the ``R_q = d_left prod_{<q} i j`` rows so far by core ``q``:
    ``2 R_q d_q i_q j_q d_{q+1}`` matmul FLOPs. Reads the cores and every intermediate
    once, writes every intermediate and the result once; one op per step.
    """
    if not cores:
        raise ValueError("cores must hold at least one core shape")
    d0, i0, j0, e0 = cores[0]
    flops, rows, inter = 0, d0 * i0 * j0, 0
    for q, (d, i, j, e) in enumerate(cores[1:], start=1):
        flops += 2 * rows * d * i * j * e
        rows *= i * j
        if q < len(cores) - 1:
            inter += rows * e
    result = rows * cores[-1][3]
    core_elems = sum(d * i * j * e for d, i, j, e in cores)
    return Cost(flops_tensor=flops, bytes_read=dtype_bytes * (core_elems + inter),
                bytes_written=dtype_bytes * (inter + result), launches=max(len(cores) - 1, 0))
