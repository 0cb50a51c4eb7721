"""Cost of the unfused MPO linear: rebuild ``W`` from the cores, ``F.linear``, bias add, GELU (model)."""
from __future__ import annotations

import math
from typing import Sequence

from mpo_core.cost.chain import BIAS_FLOPS, GELU_FLOPS, chain_cost, core_shapes, elementwise_flops, gemm_cost
from mpo_core.cost.model import Cost
from mpo_core.shapes import check_int

__all__ = ["dense_linear_cost", "epilogue_cost"]


def epilogue_cost(tokens: int, cols: int, dtype_bytes: int, *, bias: bool, activation: bool) -> Cost:
    """The unfused epilogue on a ``(tokens, cols)`` output: torch's bias add (reads ``y``, ``b``, writes;
    1 FLOP each) then GELU (reads, writes; ~8 FLOPs each), one op each."""
    mn, b = tokens * cols, dtype_bytes
    ops = [Cost(flops_fma=BIAS_FLOPS * mn, bytes_read=b * (mn + cols), bytes_written=b * mn)] if bias else []
    ops += [Cost(flops_fma=GELU_FLOPS * mn, bytes_read=b * mn, bytes_written=b * mn)] if activation else []
    if not ops:
        raise ValueError("an epilogue needs bias or activation")
    return sum(ops[1:], ops[0])


def dense_linear_cost(tokens: int, in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int],
                      dtype_bytes: int = 2, *, bias: bool = True, activation: bool = True) -> dict[str, Cost]:
    """The unfused torch sequence, forward and backward (model).

    Rebuild: :func:`~mpo_core.cost.chain.chain_cost` of every core (left to right).
    Forward: rebuild, GEMM (``2MKN`` tensor FLOPs; reads ``x``, ``W``, writes ``y``),
    :func:`epilogue_cost`. Backward: GELU backward (reads ``dy``, ``pre``, writes ``g``), bias gradient (reads
    ``g``), ``dx = g W^T`` (reads ``g``, ``W``; writes ``dx``), ``dW = x^T g`` (reads ``x``,
    ``g``; writes ``dW``), rebuild backward (twice the rebuild's FLOPs and bytes).

    Returns
    -------
    dict
        ``{"fwd": Cost, "bwd": Cost}``.
    """
    check_int("tokens", tokens)
    check_int("dtype_bytes", dtype_bytes)
    m, k, n, b = tokens, math.prod(in_shape), math.prod(out_shape), dtype_bytes
    chain = chain_cost(core_shapes(in_shape, out_shape, ranks), b)
    mn = m * n
    fwd = chain + gemm_cost(m, k, n, b)
    if bias or activation:
        fwd = fwd + epilogue_cost(m, n, b, bias=bias, activation=activation)
    epilogue = elementwise_flops(bias, activation)
    bwd = Cost(flops_tensor=4 * m * k * n, flops_fma=epilogue * mn, launches=2,
               bytes_read=b * (mn + k * n + m * k + mn), bytes_written=b * (m * k + k * n)) + 2 * chain
    if activation:
        bwd = bwd + Cost(bytes_read=2 * b * mn, bytes_written=b * mn)
    if bias:
        bwd = bwd + Cost(bytes_read=b * mn, bytes_written=b * n)
    return {"fwd": fwd, "bwd": bwd}
