"""MPOP's global rank allocation: truncate the bonds of several MPOs under one budget or tolerance.

Every matrix is decomposed exactly first; its :attr:`~mpo_core.mpo.MPO.spectra` hold the singular
values of each unfolding ``W_k``. Truncating bond ``k`` to ``r_k`` then costs at most
``sum_{l >= r_k} s_{k,l}^2`` and, by Oseledets (2011, Thm 2.2), the TT-SVD with ranks ``r`` obeys::

    ||W - W_r||_F^2 <= sum_k sum_{l >= r_k} s_{k,l}^2          (the "allocation bound")

:func:`allocate_ranks` spends truncation where it is cheapest: a greedy over all bonds of all
matrices that repeatedly removes the singular value with the smallest discarded energy (relative to
its matrix, ``s^2 / ||W||_F^2``, times the matrix's objective weight) per parameter saved, until a
global parameter budget is met (``budget=``) or, with ``rel_tol=ε``, while every matrix keeps
``||W - W_r||_F <= ε ||W||_F``. Ranks are kept consistent (``r_k <= r_{k-1} i_k j_k`` and
``r_k <= r_{k+1} i_{k+1} j_{k+1}``; an inconsistent bond would silently shrink), and the singular
values such clamping drops are charged to the move that caused it. With whitened MPOs
(``decompose(..., input_cov=)``) the spectra and norms, and so the allocation, are in the output norm.
"""
from __future__ import annotations

import heapq
import math
from typing import Mapping, Sequence

from mpo_core.mpo import MPO
from mpo_core.shapes import consistent_ranks, core_params
from mpo_core.truncation import check_rel_tol

__all__ = ["allocate_ranks", "allocation_bound", "budget_floor", "resolve_budget"]


def allocation_bound(mpo: MPO, ranks: Sequence[int]) -> float:
    """``sqrt(sum_k sum_{l >= r_k} s_{k,l}^2)``: a guaranteed bound on ``||W - W_r||_F``.

    ``mpo`` must be an exact decomposition (``error_bound == 0`` with :attr:`~MPO.spectra`), so that
    its spectra are those of the unfoldings of ``W``.
    """
    _check_exact("mpo", mpo)
    if len(ranks) != mpo.n + 1:
        raise ValueError(f"ranks must have n+1={mpo.n + 1} entries, got {len(ranks)}")
    return math.sqrt(sum(float((s[r:].double() ** 2).sum()) for s, r in zip(mpo.spectra, ranks[1:-1])))


def _check_exact(name: str, mpo: MPO) -> None:
    if not isinstance(mpo, MPO):
        raise TypeError(f"{name} must be an MPO, got {type(mpo).__name__}")
    kept_all = mpo.spectra is not None and all(len(s) == r for s, r in zip(mpo.spectra, mpo.ranks[1:-1]))
    if not kept_all or mpo.norm is None:
        raise ValueError(f"{name} must be an exact decomposition (decompose without max_bond/rel_tol): "
                         f"it needs the full spectra and the norm of W")


class _MatrixState:
    """Ranks, accumulated relative error and greedy candidates of one matrix."""

    def __init__(self, mpo: MPO, weight: float = 1.0) -> None:
        self.in_shape, self.out_shape = mpo.in_shape, mpo.out_shape
        self.sq = [(s.double() ** 2).tolist() for s in mpo.spectra]
        scale = (mpo.norm ** 2 if mpo.norm > 0 else 1.0) / weight
        self.rel_sq = [[v / scale for v in bond] for bond in self.sq]
        self.ranks = consistent_ranks([1] + [len(s) for s in self.sq] + [1], self.in_shape, self.out_shape)
        self.err = self._dropped(self.ranks, [1] + [len(s) for s in self.sq] + [1])  # 0 unless full bonds clamp
        self.params = core_params(self.in_shape, self.out_shape, self.ranks)
        self.version = 0

    def _dropped(self, new: Sequence[int], old: Sequence[int]) -> float:
        return sum(sum(self.rel_sq[k - 1][new[k]:old[k]]) for k in range(1, len(new) - 1))

    def move(self, bond: int) -> tuple[float, int, list[int]] | None:
        """(relative error added, parameters saved, new ranks) of removing one value at ``bond``."""
        if self.ranks[bond] <= 1:
            return None
        trial = list(self.ranks)
        trial[bond] -= 1
        trial = consistent_ranks(trial, self.in_shape, self.out_shape)
        return self._dropped(trial, self.ranks), self.params - core_params(self.in_shape, self.out_shape, trial), trial


def allocate_ranks(
    mpos: Mapping[str, MPO],
    budget: int | float | None = None,
    rel_tol: float | None = None,
    weights: Mapping[str, float] | None = None,
) -> dict[str, list[int]]:
    """Choose truncated bonds for several matrices at once (MPOP's global allocation).

    Parameters
    ----------
    mpos : mapping of str to MPO
        Exact decompositions (with spectra and norm) of the matrices, by name.
    budget : int or float, optional
        Total entries allowed over all matrices: an int >= 1, or a float in ``(0, 1]`` read as
        a fraction of their total dense entries. A matrix counts at ``min(core entries, dense
        entries)`` (one whose MPO would be no smaller stays dense). Truncation stops as soon as it is met.
    rel_tol : float, optional
        ``ε`` in ``[0, 1)``: truncate as far as possible while every matrix keeps the guarantee
        ``||W - W_r||_F <= ε ||W||_F`` (allocation bound). Give exactly one of ``budget``/``rel_tol``.
    weights : mapping of str to float, optional
        With ``budget``: the objective weight of each matrix's relative squared error (default 1 each),
        e.g. how strongly the model's output feels it (:mod:`mpo_core.family`). Every weight > 0.

    Returns
    -------
    dict of str to list of int
        Ranks ``[1, d_1, ..., d_{n-1}, 1]`` per matrix (consistent, see :func:`consistent_ranks`).

    Raises
    ------
    ValueError
        Both or neither of ``budget``/``rel_tol``, a budget below the all-ones-bond minimum (it cannot be
        met), an inexact MPO.
    """
    if not isinstance(mpos, Mapping) or not mpos:
        raise TypeError("mpos must be a non-empty mapping of name -> exact MPO")
    if (budget is None) == (rel_tol is None):
        raise ValueError("give exactly one of budget= and rel_tol=")
    for name, mpo in mpos.items():
        _check_exact(f"mpos[{name!r}]", mpo)
    if weights is not None:
        if rel_tol is not None:
            raise ValueError("weights apply to a budget; with rel_tol every matrix keeps its own tolerance")
        missing = set(mpos) - set(weights)
        if missing:
            raise ValueError(f"weights has no entry for {sorted(missing)}")
        bad = {k: v for k, v in weights.items() if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0)}
        if bad:
            raise ValueError(f"weights must be finite floats > 0, got {bad}")
    states = {name: _MatrixState(mpo, 1.0 if weights is None else float(weights[name])) for name, mpo in mpos.items()}
    limit_sq = None
    target = None
    if rel_tol is not None:
        limit_sq = check_rel_tol(rel_tol) ** 2
    else:
        target = resolve_budget(budget, sum(math.prod(m.shape) for m in mpos.values()))
        floor = budget_floor([(s.in_shape, s.out_shape) for s in mpos.values()])
        if target < floor:
            raise ValueError(f"budget={budget} ({target} entries) cannot be met: it is below the minimum {floor} "
                             f"(all bonds 1)")
    dense = {name: math.prod(mpo.shape) for name, mpo in mpos.items()}

    heap: list[tuple[float, float, str, int, int]] = []

    def push(name: str) -> None:
        st = states[name]
        for bond in range(1, len(st.ranks) - 1):
            mv = st.move(bond)
            if mv is not None:
                cost, saved, _ = mv
                heapq.heappush(heap, (cost / saved, cost, name, bond, st.version))

    for name in states:
        push(name)
    total = sum(min(st.params, dense[name]) for name, st in states.items())
    while heap and (target is None or total > target):
        _, cost, name, bond, version = heapq.heappop(heap)
        st = states[name]
        if version != st.version:
            continue  # stale: the matrix changed since this candidate was scored
        if limit_sq is not None and st.err + cost > limit_sq * (1 + 1e-12):
            continue  # infeasible now and forever (errors only grow)
        _, saved, trial = st.move(bond)
        total -= min(st.params, dense[name]) - min(st.params - saved, dense[name])
        st.ranks, st.err, st.params, st.version = trial, st.err + cost, st.params - saved, st.version + 1
        push(name)
    return {name: st.ranks for name, st in states.items()}


def budget_floor(shapes: Sequence[tuple[Sequence[int], Sequence[int]]]) -> int:
    """The smallest budget :func:`allocate_ranks` can meet for matrices of these ``(in_shape, out_shape)``:
    every bond 1, or the dense size where that is smaller."""
    return sum(min(core_params(i, o, [1] * (len(i) + 1)), math.prod(i) * math.prod(o)) for i, o in shapes)


def resolve_budget(budget: int | float, dense: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be an int (entries) or a float fraction, got {type(budget).__name__}")
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"a float budget is a fraction of the dense entries and must be in (0, 1], got {budget}")
        return int(budget * dense)
    if budget < 1:
        raise ValueError(f"budget must be >= 1 entry, got {budget}")
    return budget
