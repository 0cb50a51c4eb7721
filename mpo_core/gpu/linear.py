"""Forward and backward cost of one MPO linear layer ``act(x @ W + b)`` by strategy (model).

``dense`` and ``fused`` come from :mod:`mpo_core.cost`; ``sequential`` is the contraction
planner's own pick (:func:`mpo_core.contract.plan.make_plan`, on its ``"cuda"`` device model).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from mpo_core.contract.plan import make_plan
from mpo_core.cost import Cost, dense_linear_cost, epilogue_cost, fused_linear_cost
from mpo_core.shapes import full_ranks

__all__ = ["LINEAR_STRATEGIES", "linear_cost"]

LINEAR_STRATEGIES = ("dense", "sequential", "fused")
"""``dense``: the unfused torch sequence (rebuild ``W``, ``F.linear``, bias add, GELU);
``sequential``: core-by-core contraction (:mod:`mpo_core.contract`); ``fused``: our kernel."""

_DTYPES = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}


def linear_cost(strategy: str, tokens: int, in_shape: Sequence[int], out_shape: Sequence[int],
                ranks: Sequence[int] | None = None, dtype_bytes: int = 2, *, bias: bool = True,
                activation: bool = True, training: bool = True) -> dict[str, Cost]:
    """``{"fwd": Cost, "bwd": Cost}`` of one MPO linear layer by ``strategy`` (model).

    * ``dense``: :func:`mpo_core.cost.dense_linear_cost`.
    * ``fused``: :func:`mpo_core.cost.fused_linear_cost` (the op's own model: padded
      tensor-core GEMM + on-chip rebuild + pre-contraction; ``training`` stores the pre-activation).
    * ``sequential``: the contraction planner's forward (best core order) with the bias + GELU
      epilogue of ``dense``; backward twice the forward (two GEMMs per step); intermediates are
      written once and read once, so bytes split evenly.

    ``ranks`` defaults to :func:`mpo_core.shapes.full_ranks`.
    """
    if strategy not in LINEAR_STRATEGIES:
        raise ValueError(f"strategy must be one of {LINEAR_STRATEGIES}, got {strategy!r}")
    ranks = list(ranks) if ranks is not None else full_ranks(in_shape, out_shape)
    if strategy == "dense":
        return dense_linear_cost(tokens, in_shape, out_shape, ranks, dtype_bytes, bias=bias, activation=activation)
    if strategy == "fused":
        return fused_linear_cost(tokens, in_shape, out_shape, ranks, dtype_bytes, bias=bias, activation=activation,
                                 training=training)
    plan = make_plan(tuple(in_shape), tuple(out_shape), tuple(ranks), tokens, "cuda", _DTYPES[dtype_bytes],
                     "sequential", None, False, None, False)
    chosen = plan.chosen
    fwd = Cost(flops_tensor=chosen.flops, bytes_read=chosen.bytes / 2, bytes_written=chosen.bytes / 2,
               launches=len(in_shape))
    if bias or activation:
        fwd = fwd + epilogue_cost(tokens, math.prod(out_shape), dtype_bytes, bias=bias, activation=activation)
    return {"fwd": fwd, "bwd": 2 * fwd}
