"""Contraction plans: every candidate strategy/order with its modelled cost, and the choice.

A plan depends only on ``(shapes, ranks, token bucket, device type, dtype, request)``, so it
is computed once per such key and cached (:func:`make_plan` is an ``lru_cache``).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from typing import Optional, Union

import torch

from mpo_core.contract.sequential import all_orders, named_orders, plan_sequential
from mpo_core.cost import Cost, device_model, epilogue_cost, gemm_cost, mpo_linear_cost
from mpo_core.rebuild import MergeTree, plan_merge

__all__ = ["Candidate", "Plan", "STRATEGIES", "make_plan", "token_bucket"]

STRATEGIES = ("auto", "dense", "sequential", "fused")


@dataclass(frozen=True)
class Candidate:
    """One way to compute ``x @ W``, with its modelled cost (a roofline *model*, not a measurement).

    Attributes
    ----------
    strategy : str
        ``"dense"``, ``"sequential"`` or ``"fused"``.
    order : tuple
        Sequential: the order in which cores are contracted. Dense: the merge tree. Fused: ``()``.
    flops, bytes : int
        Modelled arithmetic and memory traffic for the planned token count.
    seconds : float
        Modelled time.
    steps : tuple
        Executable schedule (sequential: :class:`~mpo_core.contract.sequential.SeqStep` s; otherwise empty).
    """

    strategy: str
    order: Union[tuple, MergeTree]
    flops: int
    bytes: int
    seconds: float
    steps: tuple = ()

    @property
    def label(self) -> str:
        if self.strategy == "dense":
            return f"dense merge={self.order}"
        if self.strategy == "fused":
            return "fused mpo_linear (triton)"
        names = {v: k for k, v in named_orders(len(self.order)).items()}
        order = ">".join(map(str, self.order))
        return f"sequential {names[self.order] + ' ' if self.order in names else ''}{order}"


@dataclass(frozen=True)
class Plan:
    """The chosen candidate and all the candidates considered (see :func:`mpo_core.contract.explain`)."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    ranks: tuple[int, ...]
    tokens: int
    device_type: str
    dtype: torch.dtype
    requested: str
    candidates: tuple[Candidate, ...]
    chosen: Candidate

    MAX_ROWS = 8  # candidates shown by __str__ (cheapest first)

    @property
    def strategy(self) -> str:
        return self.chosen.strategy

    @property
    def order(self) -> Union[tuple, MergeTree]:
        return self.chosen.order

    def __str__(self) -> str:
        rows, cols = math.prod(self.in_shape), math.prod(self.out_shape)
        lines = [
            f"MPO contraction plan: {rows} -> {cols}, in_shape={self.in_shape}, out_shape={self.out_shape}, "
            f"ranks={list(self.ranks)}",
            f"  tokens <= {self.tokens} (bucket), {self.device_type}, {str(self.dtype).replace('torch.', '')}, "
            f"requested {self.requested!r}; costs are a roofline model, not measurements",
            f"  {'':2}{'candidate':<40}{'GFLOP':>14}{'MB':>12}{'model ms':>12}",
        ]
        shown = self.candidates[: self.MAX_ROWS]
        if self.chosen not in shown:
            shown = shown + (self.chosen,)
        for cand in shown:
            mark = "*" if cand is self.chosen else ""
            lines.append(
                f"  {mark:2}{cand.label:<40}{cand.flops / 1e9:>14.4f}{cand.bytes / 1e6:>12.2f}{cand.seconds * 1e3:>12.4f}"
            )
        if len(self.candidates) > len(shown):
            lines.append(f"  ... {len(self.candidates) - len(shown)} more candidates (see .candidates)")
        lines.append(f"  chosen: {self.chosen.label}")
        return "\n".join(lines)


def token_bucket(tokens: int) -> int:
    """The power of two ``>= tokens`` (1 for 0 or 1 token): plans are shared within a bucket."""
    return 1 << max(0, int(tokens) - 1).bit_length()


@lru_cache(maxsize=1024)
def make_plan(
    in_shape: tuple[int, ...], out_shape: tuple[int, ...], ranks: tuple[int, ...], tokens: int,
    device_type: str, dtype: torch.dtype, requested: str, order: Optional[tuple[int, ...]],
    has_bias: bool, activation: Optional[str], fused_ok: bool,
) -> Plan:
    """Enumerate candidates for ``requested`` (``order`` restricts sequential), model them, pick the cheapest.

    The bias add and the activation are torch's elementwise ops after the unfused strategies
    (:func:`~mpo_core.cost.epilogue_cost`; ``addmm`` folds the bias of the dense one); the fused
    kernel does them in its epilogue (:func:`~mpo_core.cost.mpo_linear_cost`).
    """
    model = device_model(device_type)
    itemsize = dtype.itemsize
    rows, cols = math.prod(in_shape), math.prod(out_shape)
    gelu = activation is not None
    seq_epi, dense_epi = (epilogue_cost(tokens, cols, itemsize, bias=bias, activation=gelu) if bias or gelu else Cost(launches=0)
                          for bias in (has_bias, False))  # addmm folds the bias into the dense GEMM
    cands: list[Candidate] = []
    if requested in ("auto", "dense"):
        tree, flops, nbytes, seconds = plan_merge(in_shape, out_shape, ranks, itemsize, model, dtype)
        gemm = gemm_cost(tokens, rows, cols, itemsize, bias=has_bias)
        cands.append(Candidate(
            "dense", tree, flops + gemm.flops + dense_epi.flops, nbytes + gemm.bytes + dense_epi.bytes,
            seconds + model.seconds(gemm, dtype) + model.seconds(dense_epi, dtype),
        ))
    if requested in ("auto", "sequential"):
        for o in [order] if order is not None else all_orders(len(in_shape)):
            steps, flops, nbytes, seconds = plan_sequential(o, in_shape, out_shape, ranks, tokens, itemsize, model, dtype)
            cands.append(Candidate("sequential", o, flops + seq_epi.flops, nbytes + seq_epi.bytes,
                                   seconds + model.seconds(seq_epi, dtype), steps))
    if requested == "fused" or (requested == "auto" and fused_ok):
        fused = mpo_linear_cost(tokens, in_shape, out_shape, ranks, itemsize, bias=has_bias, activation=activation)
        flops, nbytes = fused["flops"], fused["bytes"]
        cands.append(Candidate("fused", (), flops, nbytes, model.op_seconds(flops, nbytes, dtype)))
    cands.sort(key=lambda c: c.seconds)
    return Plan(in_shape, out_shape, ranks, tokens, device_type, dtype, requested, tuple(cands), cands[0])
