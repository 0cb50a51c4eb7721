"""Sequential strategy: contract the input through the cores one at a time, never forming ``W``.

The contracted cores always form a contiguous segment ``a..b``, and the activation keeps
the layout ``(N, i_1..i_{a-1}, d_a, j_a..j_b, d_{b+1}, i_{b+1}..i_n)`` (C order). Extending the
segment by one core contracts an *adjacent* pair of axes (``i_{a-1}, d_a`` or ``d_{b+1}, i_{b+1}``)
and writes the new axes in their place, so every step is one (batched) GEMM on a view of
the activation: no permute of the activation is ever needed, except the transpose used when
the trailing block is too narrow for an efficient batched GEMM (``"tmm"`` below).
"""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from typing import Sequence

import torch

from mpo_core.cost import DeviceModel, gemm_cost

__all__ = ["SeqStep", "named_orders", "all_orders", "check_order", "plan_sequential", "run_sequential"]

# Below this trailing width a batched GEMM of many thin matrices is slow; transpose instead.
BMM_MIN_COLS = 8


@dataclass(frozen=True)
class SeqStep:
    """One contraction: activation viewed as ``(tokens * batch, k, m)`` times a ``(k, p)`` core matrix.

    ``core_perm`` permutes core ``core`` (axes ``d_left, i, j, d_right``) before it is reshaped to
    ``(k, p)``. ``method`` is ``"mm"`` (``m == 1``), ``"bmm"`` (batched, in place) or ``"tmm"``
    (transpose the activation to ``(batch * m, k)``, one GEMM, transpose back).
    """

    core: int
    core_perm: tuple[int, ...]
    batch: int
    k: int
    m: int
    p: int
    method: str


def named_orders(n: int) -> dict[str, tuple[int, ...]]:
    """``ltr`` (left to right), ``rtl`` (right to left), ``mid`` (central core first, then alternately right/left)."""
    c = n // 2
    mid = [c]
    lo, hi = c, c
    while len(mid) < n:
        if hi + 1 < n:
            hi += 1
            mid.append(hi)
        if lo - 1 >= 0:
            lo -= 1
            mid.append(lo)
    return {"ltr": tuple(range(n)), "rtl": tuple(range(n - 1, -1, -1)), "mid": tuple(mid)}


def all_orders(n: int, limit: int = 10) -> list[tuple[int, ...]]:
    """Every segment-growing order (``2**(n-1)`` of them) for ``n <= limit``; the named ones beyond."""
    if n > limit:
        return list(dict.fromkeys(named_orders(n).values()))
    orders = []
    for start in range(n):
        for sides in itertools.combinations(range(n - 1), start):  # which steps extend to the left
            lo = hi = start
            order = [start]
            for step in range(n - 1):
                if step in sides:
                    lo -= 1
                    order.append(lo)
                else:
                    hi += 1
                    order.append(hi)
            orders.append(tuple(order))
    return orders


def check_order(order: Sequence[int], n: int) -> tuple[int, ...]:
    """Validate a contraction order: a permutation of ``range(n)`` whose prefixes are contiguous segments."""
    order = tuple(int(k) for k in order)
    if sorted(order) != list(range(n)):
        raise ValueError(f"order must be a permutation of range({n}), got {order}")
    lo = hi = order[0]
    for k in order[1:]:
        if k == lo - 1:
            lo = k
        elif k == hi + 1:
            hi = k
        else:
            raise ValueError(f"order {order}: core {k} is not adjacent to the contracted segment {lo}..{hi}")
    return order


def plan_sequential(
    order: tuple[int, ...], in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int],
    tokens: int, itemsize: int, model: DeviceModel, dtype: torch.dtype,
) -> tuple[tuple[SeqStep, ...], int, int, float]:
    """Steps of the contraction in ``order`` and their modelled FLOPs, bytes and seconds."""
    n = len(in_shape)
    # axis labels -> sizes; ("r", b) is bond b (between cores b-1 and b)
    size = {("i", k): in_shape[k] for k in range(n)}
    size.update({("j", k): out_shape[k] for k in range(n)})
    size.update({("r", b): ranks[b] for b in range(1, n)})
    state = [("i", k) for k in range(n)]  # the token axis N is implicit in front
    steps, flops, nbytes, seconds = [], 0, 0, 0.0
    lo = None  # leftmost core contracted so far (order was checked to grow one contiguous run)
    for k in order:
        left = [("r", k)] if k > 0 else []
        right = [("r", k + 1)] if k < n - 1 else []
        if lo is None:
            contracted, new = [("i", k)], left + [("j", k)] + right
            lo = k
        elif k == lo - 1:
            contracted, new = [("i", k), ("r", k + 1)], left + [("j", k)]
            lo = k
        else:
            contracted, new = [("r", k), ("i", k)], [("j", k)] + right
        axis = {("r", k): 0, ("i", k): 1, ("j", k): 2, ("r", k + 1): 3}
        used = [axis[a] for a in contracted + new]
        core_perm = tuple(used + [a for a in range(4) if a not in used])  # boundary bonds (size 1) last
        pos = state.index(contracted[0])
        before, after = state[:pos], state[pos + len(contracted):]
        batch = math.prod(size[a] for a in before)
        kk = math.prod(size[a] for a in contracted)
        m = math.prod(size[a] for a in after)
        p = math.prod(size[a] for a in new)
        method = "mm" if m == 1 else ("bmm" if m >= BMM_MIN_COLS else "tmm")
        rows = tokens * batch
        gemm = gemm_cost(rows * m, kk, p, itemsize)  # the state (rows * m, kk) @ the core (kk, p)
        f, b = gemm.flops_tensor, gemm.bytes
        if method == "tmm":
            b += 2 * itemsize * (rows * kk * m + rows * p * m)
        steps.append(SeqStep(k, core_perm, batch, kk, m, p, method))
        flops, nbytes = flops + f, nbytes + b
        seconds += model.op_seconds(f, b, dtype)
        state = before + new + after
    return tuple(steps), flops, nbytes, seconds


def run_sequential(x2d: torch.Tensor, cores: Sequence[torch.Tensor], steps: Sequence[SeqStep]) -> torch.Tensor:
    """Apply the cores to ``x2d`` (``tokens x prod(in_shape)``) by ``steps``; returns ``tokens x prod(out_shape)``."""
    tokens = x2d.shape[0]
    s = x2d
    for st in steps:
        mat = cores[st.core].permute(st.core_perm).reshape(st.k, st.p)
        rows = tokens * st.batch
        if st.method == "mm":
            s = s.reshape(rows, st.k) @ mat
        elif st.method == "bmm":
            s = torch.matmul(mat.mT, s.reshape(rows, st.k, st.m))
        else:
            t = s.reshape(rows, st.k, st.m).transpose(1, 2).reshape(rows * st.m, st.k)
            s = (t @ mat).view(rows, st.m, st.p).transpose(1, 2)
    return s.reshape(tokens, math.prod(c.shape[2] for c in cores))
