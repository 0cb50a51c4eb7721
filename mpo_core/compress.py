"""MPOP (Liu et al., ACL 2021): compress a model by truncating MPO bonds under a global budget.

Every chosen matrix is decomposed exactly first; its :attr:`~mpo_core.mpo.MPO.spectra` hold the
singular values of each unfolding ``W_k`` (rows ``(i1 j1 .. ik jk)``). Truncating bond ``k`` to
``r_k`` then costs at most ``sum_{l >= r_k} s_{k,l}^2`` and, by Oseledets (2011, Thm 2.2), the
TT-SVD with ranks ``r`` obeys::

    ||W - W_r||_F^2 <= sum_k sum_{l >= r_k} s_{k,l}^2          (the "allocation bound")

:func:`allocate_ranks` spends truncation where it is cheapest: a greedy over all bonds of all
matrices that repeatedly removes the singular value with the smallest discarded energy
(relative to its matrix, ``s^2 / ||W||_F^2``) per parameter saved, until a global parameter
budget is met (``budget=``) or, with ``rel_tol=ε``, while every matrix keeps
``||W - W_r||_F <= ε ||W||_F``. Ranks are kept consistent (``r_k <= r_{k-1} i_k j_k`` and
``r_k <= r_{k+1} i_{k+1} j_{k+1}``; an inconsistent bond would silently shrink), and the
singular values such clamping drops are charged to the move that caused it.

:func:`compress` applies this to the ``nn.Linear`` / :class:`~mpo_core.nn.MPOLinear` modules of a
model and returns a :class:`CompressionReport`; MPOP's lightweight fine-tuning then trains the
auxiliary cores only (:func:`mpo_core.nn.set_trainable` with ``"auxiliary"``).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import asdict, dataclass, field
from typing import Callable, Mapping, Sequence

import torch
from torch import nn

from mpo_core.decompose import decompose
from mpo_core.mpo import MPO
from mpo_core.nn import Include, MPOLinear, name_matcher, replace_module
from mpo_core.shapes import core_params
from mpo_core.truncation import check_rel_tol

__all__ = ["allocate_ranks", "allocation_bound", "consistent_ranks", "compress",
           "CompressionReport", "MatrixCompression"]


def consistent_ranks(ranks: Sequence[int], in_shape: Sequence[int], out_shape: Sequence[int]) -> list[int]:
    """Shrink bonds to the ranks a TT-SVD can actually produce.

    Bond ``k`` can be at most ``r_{k-1} i_k j_k`` (rows of its unfolding given the left bond) and
    at most ``r_{k+1} i_{k+1} j_{k+1}``; larger requests are clamped (left sweep, then right sweep).
    """
    r = list(ranks)
    modes = [i * j for i, j in zip(in_shape, out_shape)]
    n = len(modes)
    for k in range(1, n):
        r[k] = min(r[k], r[k - 1] * modes[k - 1])
    for k in range(n - 1, 0, -1):
        r[k] = min(r[k], r[k + 1] * modes[k])
    return r


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
    if mpo.spectra is None or mpo.error_bound != 0.0 or mpo.norm is None:
        raise ValueError(f"{name} must be an exact decomposition (decompose without max_bond/rel_tol): "
                         f"it needs the full spectra and the norm of W")


class _MatrixState:
    """Ranks, accumulated relative error and greedy candidates of one matrix."""

    def __init__(self, mpo: MPO) -> None:
        self.in_shape, self.out_shape = mpo.in_shape, mpo.out_shape
        self.sq = [(s.double() ** 2).tolist() for s in mpo.spectra]
        scale = mpo.norm ** 2 if mpo.norm > 0 else 1.0
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
) -> dict[str, list[int]]:
    """Choose truncated bonds for several matrices at once (MPOP's global allocation).

    Parameters
    ----------
    mpos : mapping of str to MPO
        Exact decompositions (with spectra and norm) of the matrices, by name.
    budget : int or float, optional
        Total core entries allowed over all matrices: an int >= 1, or a float in ``(0, 1]`` read as
        a fraction of their total dense entries. Truncation stops as soon as it is met.
    rel_tol : float, optional
        ``ε`` in ``[0, 1)``: truncate as far as possible while every matrix keeps the guarantee
        ``||W - W_r||_F <= ε ||W||_F`` (allocation bound). Give exactly one of ``budget``/``rel_tol``.

    Returns
    -------
    dict of str to list of int
        Ranks ``[1, d_1, ..., d_{n-1}, 1]`` per matrix (consistent, see :func:`consistent_ranks`).

    Raises
    ------
    ValueError
        Both or neither of ``budget``/``rel_tol``, a budget below the all-ones-bond minimum, an inexact MPO.
    """
    if not isinstance(mpos, Mapping) or not mpos:
        raise TypeError("mpos must be a non-empty mapping of name -> exact MPO")
    if (budget is None) == (rel_tol is None):
        raise ValueError("give exactly one of budget= and rel_tol=")
    for name, mpo in mpos.items():
        _check_exact(f"mpos[{name!r}]", mpo)
    states = {name: _MatrixState(mpo) for name, mpo in mpos.items()}
    limit_sq = None
    target = None
    if rel_tol is not None:
        limit_sq = check_rel_tol(rel_tol) ** 2
    else:
        target = _resolve_budget(budget, sum(math.prod(m.shape) for m in mpos.values()))
        floor = sum(core_params(s.in_shape, s.out_shape, [1] * (s.n + 1)) for s in mpos.values())
        if target < floor:
            raise ValueError(f"budget={budget} ({target} entries) is below the minimum {floor} (all bonds 1)")

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
    total = sum(st.params for st in states.values())
    while heap and (target is None or total > target):
        _, cost, name, bond, version = heapq.heappop(heap)
        st = states[name]
        if version != st.version:
            continue  # stale: the matrix changed since this candidate was scored
        if limit_sq is not None and st.err + cost > limit_sq * (1 + 1e-12):
            continue  # infeasible now and forever (errors only grow)
        _, saved, trial = st.move(bond)
        st.ranks, st.err, st.params, st.version = trial, st.err + cost, st.params - saved, st.version + 1
        total -= saved
        push(name)
    return {name: st.ranks for name, st in states.items()}


def _resolve_budget(budget: int | float, dense: int) -> int:
    if isinstance(budget, bool) or not isinstance(budget, (int, float)):
        raise TypeError(f"budget must be an int (entries) or a float fraction, got {type(budget).__name__}")
    if isinstance(budget, float):
        if not 0.0 < budget <= 1.0:
            raise ValueError(f"a float budget is a fraction of the dense entries and must be in (0, 1], got {budget}")
        return int(budget * dense)
    if budget < 1:
        raise ValueError(f"budget must be >= 1 entry, got {budget}")
    return budget


@dataclass
class MatrixCompression:
    """One compressed matrix: shapes, ranks, sizes and error bounds (absolute and relative to ``||W||_F``)."""

    name: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    full_ranks: list[int]
    ranks: list[int]
    dense_params: int
    full_params: int
    params: int
    norm: float
    error_bound: float
    allocation_bound: float

    @property
    def relative_error_bound(self) -> float:
        return self.error_bound / self.norm if self.norm > 0 else 0.0


@dataclass
class CompressionReport:
    """What :func:`compress` did; ``print`` it for a table, :meth:`to_dict` for JSON.

    ``params`` count core entries of the compressed matrices only (biases are unchanged);
    ``model_params_*`` count every parameter of the model.
    """

    budget: int | float | None
    rel_tol: float | None
    model_params_before: int
    model_params_after: int
    matrices: list[MatrixCompression] = field(default_factory=list)

    @property
    def dense_params(self) -> int:
        return sum(m.dense_params for m in self.matrices)

    @property
    def params(self) -> int:
        return sum(m.params for m in self.matrices)

    @property
    def total_relative_sq_error(self) -> float:
        """``sum_m (error_bound_m / ||W_m||)^2``, the quantity the allocation minimizes."""
        return sum(m.relative_error_bound ** 2 for m in self.matrices)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(dense_params=self.dense_params, params=self.params, total_relative_sq_error=self.total_relative_sq_error)
        return out

    def __str__(self) -> str:
        head = f"{'matrix':<28}{'ranks':<26}{'dense':>9}{'params':>9}{'rel err bound':>15}"
        lines = [head, "-" * len(head)]
        for m in self.matrices:
            lines.append(f"{m.name:<28}{str(m.ranks[1:-1]):<26}{m.dense_params:>9}{m.params:>9}{m.relative_error_bound:>15.3e}")
        goal = f"budget={self.budget}" if self.budget is not None else f"rel_tol={self.rel_tol}"
        lines.append(
            f"{goal}: matrix entries {self.dense_params} dense -> {self.params} cores "
            f"({self.params / max(self.dense_params, 1):.3f}x); model parameters {self.model_params_before} -> "
            f"{self.model_params_after}; sum of squared relative errors {self.total_relative_sq_error:.3e}"
        )
        return "\n".join(lines)


def _shared_cores(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for layer in model.modules():
        if isinstance(layer, MPOLinear):
            for core in layer.cores:
                seen[id(core)] = seen.get(id(core), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def compress(
    model: nn.Module,
    budget: int | float | None = None,
    rel_tol: float | None = None,
    include: Include = None,
    n: int | Callable[[int, int], tuple[Sequence[int], Sequence[int]]] = 5,
    strategy: str = "auto",
) -> CompressionReport:
    """MPOP compression: replace chosen linear layers in place by truncated :class:`MPOLinear`.

    Parameters
    ----------
    model : nn.Module
        Modified in place.
    budget : int or float, optional
        Core entries allowed over all chosen matrices (int), or a fraction of their dense entries
        (float in ``(0, 1]``); see :func:`allocate_ranks`.
    rel_tol : float, optional
        Global ``ε``: every matrix is guaranteed ``||W - W_mpo||_F <= ε ||W||_F``.
    include : str, list of str, or callable, optional
        Module names / glob patterns / predicate, as :func:`mpo_core.nn.mpo_ify`; default every
        ``nn.Linear`` and :class:`MPOLinear` of the model.
    n : int or callable
        Cores per ``nn.Linear`` (balanced factorization) or ``fn(in_features, out_features) -> (in_shape,
        out_shape)``. Existing :class:`MPOLinear` keep their shapes.
    strategy : str
        Contraction strategy of the layers created from ``nn.Linear`` (``MPOLinear`` keep theirs).

    Returns
    -------
    CompressionReport
        Per matrix: ranks, parameters, the decomposition's guaranteed error bound (the discarded
        singular values of the actual TT-SVD) and the allocation bound; totals.

    Raises
    ------
    ValueError
        No matching layer, a shared core (e.g. MPOBERT's shared centrals: truncating one layer
        would change the others), or a budget/rel_tol problem from :func:`allocate_ranks`.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    match = name_matcher(include)
    shared = _shared_cores(model)
    targets = [(name, mod) for name, mod in model.named_modules()
               if name and isinstance(mod, (nn.Linear, MPOLinear)) and match(name, mod)]
    if not targets:
        raise ValueError("include matched no nn.Linear or MPOLinear module of the model")
    before = sum(p.numel() for p in model.parameters())
    exact: dict[str, MPO] = {}
    for name, mod in targets:
        if isinstance(mod, MPOLinear):
            if any(id(c) in shared for c in mod.cores):
                raise ValueError(f"layer {name!r} shares cores with other layers; compress cannot truncate it alone")
            with torch.no_grad():
                weight = mod.weight.detach().T
            shape_kw = dict(in_shape=mod.in_shape, out_shape=mod.out_shape)
        else:
            weight = mod.weight.detach().T
            if callable(n):
                in_shape, out_shape = n(mod.in_features, mod.out_features)
                shape_kw = dict(in_shape=in_shape, out_shape=out_shape)
            else:
                shape_kw = dict(n=n)
        try:
            exact[name] = decompose(weight, **shape_kw)
        except ValueError as exc:
            raise ValueError(f"cannot decompose layer {name!r} ({tuple(weight.shape)}): {exc}") from exc
    ranks = allocate_ranks(exact, budget=budget, rel_tol=rel_tol)
    report = CompressionReport(budget, rel_tol, before, before)
    for name, mod in targets:
        mpo = exact[name]
        source = mod.to_linear() if isinstance(mod, MPOLinear) else mod
        layer = MPOLinear.from_linear(source, mpo.in_shape, mpo.out_shape, max_bond=ranks[name],
                                      strategy=mod.strategy if isinstance(mod, MPOLinear) else strategy)
        if isinstance(mod, MPOLinear):
            layer.cache_weight = mod.cache_weight
        replace_module(model, name, layer)
        actual = layer.ranks
        report.matrices.append(MatrixCompression(
            name, mpo.in_shape, mpo.out_shape, mpo.ranks, actual, math.prod(mpo.shape), mpo.num_params,
            core_params(mpo.in_shape, mpo.out_shape, actual), float(mpo.norm), float(layer.error_bound),
            allocation_bound(mpo, ranks[name]),
        ))
    report.model_params_after = sum(p.numel() for p in model.parameters())
    return report
