"""The one dense rebuild: contract a chain of MPO cores into one tensor, in the cheapest merge order.

A chain of cores ``T_p .. T_q`` (``(d_{k-1}, i_k, j_k, d_k)`` each) contracts to one
``(d_{p-1}, i_p..i_q, j_p..j_q, d_q)`` block (C order); a whole MPO (``d_0 = d_n = 1``) gives the
dense ``W``. Merged blocks are kept as ``(d_left, modes, d_right)`` with the modes interleaved
``(i_p, j_p, i_{p+1}, j_{p+1}, ...)``, so merging two blocks is one matrix product and a *view*;
one permute at the end puts the rows' modes first.

The merge order is a binary tree over the cores chosen by a matrix-chain dynamic programme on
the modelled time of each product (:mod:`mpo_core.cost`); :meth:`MPO.to_dense
<mpo_core.mpo.MPO.to_dense>`, the contraction's ``dense`` strategy and the fused op's
pre-contraction all rebuild through :func:`rebuild`.
"""
from __future__ import annotations

import itertools
import math
from functools import lru_cache
from typing import Iterator, Sequence, Union

import torch

from mpo_core.cost import DeviceModel, device_model, gemm_cost

__all__ = ["REBUILD_SCOPE", "MergeTree", "dense_matrix", "dense_row_blocks", "left_to_right", "plan_merge", "rebuild"]

REBUILD_SCOPE = "mpo_core::rebuild"
"""The ``torch.profiler.record_function`` scope every dense rebuild runs in (:func:`rebuild`,
:func:`mpo_core.accumulate.build_weight_blocks`): a profile shows it as one named range."""

MergeTree = Union[int, tuple]
"""A core index, or ``(left subtree, right subtree)``."""


def plan_merge(
    in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int], itemsize: int,
    model: DeviceModel, dtype: torch.dtype,
) -> tuple[MergeTree, int, int, float]:
    """Cheapest binary merge tree for contracting a chain of cores (matrix-chain dynamic programme).

    Parameters
    ----------
    in_shape, out_shape : sequence of int
        Modes of the ``n`` cores.
    ranks : sequence of int
        The ``n + 1`` bonds ``[d_left, d_1, ..., d_{n-1}, d_right]`` (boundaries need not be 1).
    itemsize : int
        Bytes per element.
    model : DeviceModel
        Prices each product (:meth:`~mpo_core.cost.DeviceModel.op_seconds`).
    dtype : torch.dtype
        Compute dtype.

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
                product = gemm_cost(ranks[p] * ma, ranks[s + 1], mb * ranks[q + 1], itemsize)
                flops, nbytes = product.flops_tensor, product.bytes
                cand = (
                    left[0] + right[0] + model.op_seconds(flops, nbytes, dtype),
                    left[1] + right[1] + flops,
                    left[2] + right[2] + nbytes,
                    (left[3], right[3]),
                )
                if best[p][q] is None or cand[0] < best[p][q][0]:
                    best[p][q] = cand
    seconds, flops, nbytes, tree = best[0][n - 1]
    if n > 1:  # final interleaved -> C-order permute
        permute_bytes = 2 * itemsize * ranks[0] * math.prod(modes) * ranks[n]
        nbytes += permute_bytes
        seconds += model.op_seconds(0, permute_bytes, dtype)
    return tree, flops, nbytes, seconds


def left_to_right(n: int) -> MergeTree:
    """The left-to-right merge tree of ``n`` cores: ``(((0, 1), 2), ...)``."""
    tree: MergeTree = 0
    for k in range(1, n):
        tree = (tree, k)
    return tree


@lru_cache(maxsize=1024)
def _cheapest_tree(in_shape: tuple, out_shape: tuple, ranks: tuple, dtype: torch.dtype, model: DeviceModel) -> MergeTree:
    return plan_merge(in_shape, out_shape, ranks, dtype.itemsize, model, dtype)[0]


def _merge(node: MergeTree, cores: Sequence[torch.Tensor]) -> torch.Tensor:
    if isinstance(node, int):
        d0, i, j, d1 = cores[node].shape
        return cores[node].reshape(d0, i * j, d1)
    a, b = _merge(node[0], cores), _merge(node[1], cores)
    (da, ma, dm), (_, mb, db) = a.shape, b.shape
    return (a.reshape(da * ma, dm) @ b.reshape(dm, mb * db)).view(da, ma * mb, db)


def rebuild(cores: Sequence[torch.Tensor], tree: MergeTree | None = None, interleaved: bool = False) -> torch.Tensor:
    """Contract a chain of cores into one ``(d_left, prod(in), prod(out), d_right)`` tensor (C order).

    Parameters
    ----------
    cores : sequence of torch.Tensor
        Consecutive cores ``(d_{k-1}, i_k, j_k, d_k)`` (checked by the callers:
        :func:`mpo_core.mpo.validate_cores` for whole MPOs), one dtype and device.
    tree : MergeTree, optional
        The merge order; default the cheapest one for the cores' device type and dtype
        (:func:`plan_merge` with :func:`mpo_core.cost.device_model`, cached per shape).
    interleaved : bool
        Return the merged block as it is built, ``(d_left, prod(i_k j_k), d_right)`` with the modes
        interleaved ``(i_p, j_p, i_{p+1}, j_{p+1}, ...)`` (no final permute).

    Returns
    -------
    torch.Tensor
        Differentiable with respect to every core.
    """
    n = len(cores)
    in_shape = tuple(int(c.shape[1]) for c in cores)
    out_shape = tuple(int(c.shape[2]) for c in cores)
    if tree is None:
        ranks = tuple(int(c.shape[0]) for c in cores) + (int(cores[-1].shape[3]),)
        first = cores[0]
        tree = _cheapest_tree(in_shape, out_shape, ranks, first.dtype, device_model(first.device.type))
    with torch.profiler.record_function(REBUILD_SCOPE):
        merged = _merge(tree, cores)
        if interleaved:
            return merged
        d_left, _, d_right = merged.shape
        interleaved = merged.view(d_left, *[s for k in range(n) for s in (in_shape[k], out_shape[k])], d_right)
        perm = [0] + list(range(1, 2 * n + 1, 2)) + list(range(2, 2 * n + 1, 2)) + [2 * n + 1]
        return interleaved.permute(perm).reshape(d_left, math.prod(in_shape), math.prod(out_shape), d_right)


def dense_matrix(cores: Sequence[torch.Tensor], tree: MergeTree | None = None) -> torch.Tensor:
    """The dense ``(prod(in_shape), prod(out_shape))`` matrix of a whole MPO (``d_0 = d_n = 1``): :func:`rebuild`."""
    return rebuild(cores, tree)[0, :, :, 0]


def dense_row_blocks(cores: Sequence[torch.Tensor], max_entries: int) -> Iterator[tuple[int, torch.Tensor]]:
    """The dense matrix of a whole MPO as consecutive row blocks ``(first row, W[first:first + b])``.

    Rows are ``(i_1, ..., i_n)`` in C order, so fixing the leading input modes selects a contiguous
    block: the first ``d`` modes are fixed one value at a time and mode ``d`` is sliced, with ``d``
    the smallest depth at which one value of mode ``d`` spans at most ``max_entries`` entries (or
    ``n - 1``); each block is one :func:`dense_matrix` of the sliced chain. Never the whole ``W``
    at once (unless it fits in ``max_entries``).
    """
    in_shape = [int(c.shape[1]) for c in cores]
    cols = math.prod(int(c.shape[2]) for c in cores)
    depth = 0
    while depth < len(cores) - 1 and math.prod(in_shape[depth + 1:]) * cols > max_entries:
        depth += 1
    inner = math.prod(in_shape[depth + 1:])
    step = max(1, max_entries // (inner * cols))
    row = 0
    for prefix in itertools.product(*(range(m) for m in in_shape[:depth])):
        fixed = [c[:, i:i + 1] for c, i in zip(cores, prefix)]
        for start in range(0, in_shape[depth], step):
            block = dense_matrix(fixed + [cores[depth][:, start:start + step]] + list(cores[depth + 1:]))
            yield row, block
            row += block.shape[0]
