"""Dense strategy: rebuild ``W`` from the cores in the cheapest merge order, then one GEMM.

Merged blocks are kept as ``(d_left, modes, d_right)`` with the modes in interleaved order
``(i_p, j_p, i_{p+1}, j_{p+1}, ...)``, so merging two blocks is one matrix product and a
*view*; a single permute at the end turns ``(i1, j1, ..., in, jn)`` into the C-order
``(i1..in, j1..jn)`` matrix.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from mpo_core.contract.costmodel import DeviceModel, op_seconds

__all__ = ["MergeTree", "plan_merge", "rebuild", "gemm_cost"]

MergeTree = Union[int, tuple]  # a core index, or (left subtree, right subtree)


def plan_merge(
    in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int], itemsize: int,
    model: DeviceModel, dtype: torch.dtype,
) -> tuple[MergeTree, int, int, float]:
    """Cheapest binary merge tree for rebuilding ``W`` (matrix-chain dynamic programme).

    Returns
    -------
    tree, flops, bytes, seconds
        ``tree`` is a nested tuple of core indices; the costs include the final permute.
    """
    n = len(in_shape)
    modes = [i * j for i, j in zip(in_shape, out_shape)]
    # best[p][q] = (seconds, flops, bytes, tree) for the block of cores p..q
    best: list[list[tuple]] = [[None] * n for _ in range(n)]
    for p in range(n):
        best[p][p] = (0.0, 0, 0, p)
    for length in range(2, n + 1):
        for p in range(n - length + 1):
            q = p + length - 1
            for s in range(p, q):
                left, right = best[p][s], best[s + 1][q]
                ma, mb = math.prod(modes[p : s + 1]), math.prod(modes[s + 1 : q + 1])
                flops = 2 * ranks[p] * ma * ranks[s + 1] * mb * ranks[q + 1]
                nbytes = itemsize * (
                    ranks[p] * ma * ranks[s + 1] + ranks[s + 1] * mb * ranks[q + 1] + ranks[p] * ma * mb * ranks[q + 1]
                )
                cand = (
                    left[0] + right[0] + op_seconds(flops, nbytes, model, dtype),
                    left[1] + right[1] + flops,
                    left[2] + right[2] + nbytes,
                    (left[3], right[3]),
                )
                if best[p][q] is None or cand[0] < best[p][q][0]:
                    best[p][q] = cand
    seconds, flops, nbytes, tree = best[0][n - 1]
    if n > 1:  # final interleaved -> C-order permute
        permute_bytes = 2 * itemsize * math.prod(modes)
        nbytes += permute_bytes
        seconds += op_seconds(0, permute_bytes, model, dtype)
    return tree, flops, nbytes, seconds


def gemm_cost(tokens: int, rows: int, cols: int, itemsize: int) -> tuple[int, int]:
    """FLOPs and bytes of ``(tokens x rows) @ (rows x cols)``."""
    return 2 * tokens * rows * cols, itemsize * (tokens * rows + rows * cols + tokens * cols)


def _merge(node: MergeTree, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(node, int):
        d0, i, j, d1 = cores[node].shape
        return cores[node].reshape(d0, i * j, d1)
    a, b = _merge(node[0], cores), _merge(node[1], cores)
    (da, ma, dm), (_, mb, db) = a.shape, b.shape
    return (a.reshape(da * ma, dm) @ b.reshape(dm, mb * db)).view(da, ma * mb, db)


def rebuild(cores: Sequence[torch.Tensor], tree: MergeTree) -> torch.Tensor:
    """Dense ``(prod(in_shape), prod(out_shape))`` matrix from ``cores`` merged along ``tree`` (C order)."""
    n = len(cores)
    in_shape = [c.shape[1] for c in cores]
    out_shape = [c.shape[2] for c in cores]
    merged = _merge(tree, cores)
    if n == 1:
        return merged.view(in_shape[0], out_shape[0])
    interleaved = merged.view(*[s for k in range(n) for s in (in_shape[k], out_shape[k])])
    perm = list(range(0, 2 * n, 2)) + list(range(1, 2 * n, 2))
    return interleaved.permute(perm).reshape(math.prod(in_shape), math.prod(out_shape))
