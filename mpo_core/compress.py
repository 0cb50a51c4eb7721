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

:func:`compress` applies this to the linear modules (``nn.Linear``, transformers ``Conv1D``,
:class:`~mpo_core.nn.MPOLinear`) of a model and returns a :class:`CompressionReport`. It never returns
a larger model: a matrix whose MPO at its allocated ranks would hold at least as many entries as the
dense matrix stays (or becomes again) dense, and the report says which and why; the budget counts
such a matrix at its dense size. MPOP's lightweight fine-tuning then trains the auxiliary cores only
(:func:`mpo_core.nn.set_trainable` with ``"auxiliary"``); :func:`compress_in_rounds` alternates the
two (truncate a little, fine-tune, repeat) until the budget is reached.
"""
from __future__ import annotations

import heapq
import math
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from mpo_core.decompose import decompose
from mpo_core.mpo import MPO
from mpo_core.nn import (Include, MPOLinear, dense_module, is_linear, linear_weight, progress_bar, replace_module,
                         select_modules, set_trainable, shape_kwargs)
from mpo_core.shapes import core_params, resolve_shapes
from mpo_core.truncation import check_rel_tol

__all__ = ["allocate_ranks", "allocation_bound", "budget_floor", "consistent_ranks", "compress", "compress_in_rounds",
           "CompressionReport", "CompressionRound", "MatrixCompression", "RoundsReport"]


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
    kept_all = mpo.spectra is not None and all(len(s) == r for s, r in zip(mpo.spectra, mpo.ranks[1:-1]))
    if not kept_all or mpo.norm is None:
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
        Total entries allowed over all matrices: an int >= 1, or a float in ``(0, 1]`` read as
        a fraction of their total dense entries. A matrix counts at ``min(core entries, dense
        entries)`` (one whose MPO would be no smaller stays dense). Truncation stops as soon as it is met.
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
        Both or neither of ``budget``/``rel_tol``, a budget below the all-ones-bond minimum (it cannot be
        met), an inexact MPO.
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
    seconds: float = 0.0
    """Time of this matrix's decompositions (exact, then truncated)."""
    kept_dense: bool = False
    reason: str = ""
    """Why the matrix stayed dense (its MPO would not have saved entries)."""

    @property
    def relative_error_bound(self) -> float:
        return self.error_bound / self.norm if self.norm > 0 else 0.0


@dataclass
class CompressionReport:
    """What :func:`compress` did; ``print`` it for a table, :meth:`to_dict` for JSON.

    ``params`` count the entries of the chosen matrices after compression (cores, or the dense
    matrix for those kept dense; biases are unchanged); ``model_params_*`` count every parameter.
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
            ranks = "dense" if m.kept_dense else str(m.ranks[1:-1])
            lines.append(f"{m.name:<28}{ranks:<26}{m.dense_params:>9}{m.params:>9}{m.relative_error_bound:>15.3e}"
                         + (f"  kept dense: {m.reason}" if m.kept_dense else ""))
        goal = f"budget={self.budget}" if self.budget is not None else f"rel_tol={self.rel_tol}"
        lines.append(
            f"{goal}: matrix entries {self.dense_params} dense -> {self.params} cores "
            f"({self.params / max(self.dense_params, 1):.3f}x); model parameters {self.model_params_before} -> "
            f"{self.model_params_after}; sum of squared relative errors {self.total_relative_sq_error:.3e}; "
            f"{sum(m.kept_dense for m in self.matrices)} kept dense"
        )
        return "\n".join(lines)


def _shared_cores(model: nn.Module) -> set[int]:
    seen: dict[int, int] = {}
    for layer in model.modules():
        if isinstance(layer, MPOLinear):
            for core in layer.cores:
                seen[id(core)] = seen.get(id(core), 0) + 1
    return {key for key, count in seen.items() if count > 1}


def _targets(model: nn.Module, include: Include) -> list[tuple[str, nn.Module]]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    targets = select_modules(model, include, kind=lambda m: is_linear(m) or isinstance(m, MPOLinear))
    shared = _shared_cores(model)
    for name, mod in targets:
        if isinstance(mod, MPOLinear) and any(id(c) in shared for c in mod.cores):
            raise ValueError(f"layer {name!r} shares cores with other layers; compress cannot truncate it alone")
    return targets


def _in_out(mod: nn.Module) -> torch.Tensor:
    """The ``in x out`` weight of a linear module or an :class:`MPOLinear` (rebuilt)."""
    if isinstance(mod, MPOLinear):
        with torch.no_grad():
            return mod.weight.detach().T
    return linear_weight(mod)


def _shape_kw(mod: nn.Module, n) -> dict:
    if isinstance(mod, MPOLinear):
        return dict(in_shape=mod.in_shape, out_shape=mod.out_shape)
    return shape_kwargs(n, *linear_weight(mod).shape)


def compress(
    model: nn.Module,
    budget: int | float | None = None,
    rel_tol: float | None = None,
    include: Include = None,
    n: int | Callable[[int, int], tuple[Sequence[int], Sequence[int]]] = 5,
    strategy: str = "auto",
    decompose_kwargs: dict | None = None,
    progress: bool | None = None,
) -> CompressionReport:
    """MPOP compression: replace chosen linear layers in place by truncated :class:`MPOLinear`.

    Parameters
    ----------
    model : nn.Module
        Modified in place.
    budget : int or float, optional
        Entries allowed over all chosen matrices (int), or a fraction of their dense entries
        (float in ``(0, 1]``); see :func:`allocate_ranks`.
    rel_tol : float, optional
        Global ``ε``: every matrix is guaranteed ``||W - W_mpo||_F <= ε ||W||_F``.
    include : str, list of str, or callable, optional
        Module names / suffixes / glob patterns / predicate, as :func:`mpo_core.nn.mpo_ify`; default
        every linear module (``nn.Linear``, transformers ``Conv1D``) and :class:`MPOLinear` of the model.
    n : int or callable
        Cores per dense matrix (balanced factorization) or ``fn(in_features, out_features) -> (in_shape,
        out_shape)``. Existing :class:`MPOLinear` keep their shapes.
    strategy : str
        Contraction strategy of the layers created from dense modules (``MPOLinear`` keep theirs).
    decompose_kwargs : dict, optional
        Further arguments of :func:`mpo_core.decompose` (e.g. its SVD options), for every decomposition.
    progress : bool, optional
        A tqdm progress bar over the matrices (default: on long runs at a terminal).

    Returns
    -------
    CompressionReport
        Per matrix: ranks, parameters, the decomposition's guaranteed error bound (the discarded
        singular values of the actual TT-SVD), the allocation bound and the decomposition time, or
        ``kept_dense`` with the reason; totals. Never more entries than the dense matrices: a matrix whose
        MPO would not save entries stays dense (an :class:`MPOLinear` given is contracted back to its
        dense module type then).

    Raises
    ------
    ValueError
        A pattern matching no layer, a shared core (e.g. MPOBERT's shared centrals: truncating one layer
        would change the others), or a budget/rel_tol problem from :func:`allocate_ranks` (the model is
        unchanged then).
    """
    targets = _targets(model, include)
    before = sum(p.numel() for p in model.parameters())
    exact: dict[str, MPO] = {}
    seconds: dict[str, float] = {}
    for name, mod in progress_bar(targets, "compress: exact TT-SVD", progress):
        weight = _in_out(mod)
        start = time.perf_counter()
        try:
            exact[name] = decompose(weight, **_shape_kw(mod, n), **(decompose_kwargs or {}))
        except ValueError as exc:
            raise ValueError(f"cannot decompose layer {name!r} ({tuple(weight.shape)}): {exc}") from exc
        seconds[name] = time.perf_counter() - start
        del weight
    ranks = allocate_ranks(exact, budget=budget, rel_tol=rel_tol)
    report = CompressionReport(budget, rel_tol, before, before)
    for name, mod in progress_bar(targets, "compress: truncate", progress):
        mpo = exact.pop(name)
        dense = math.prod(mpo.shape)
        needed = core_params(mpo.in_shape, mpo.out_shape, ranks[name])
        if needed >= dense:
            if isinstance(mod, MPOLinear):
                replace_module(model, name, _dense_like(mod))
            report.matrices.append(MatrixCompression(
                name, mpo.in_shape, mpo.out_shape, mpo.ranks, [], dense, mpo.num_params, dense, float(mpo.norm),
                0.0, 0.0, seconds[name], True,
                f"an MPO with bonds {ranks[name][1:-1]} needs {needed} entries >= {dense} dense",
            ))
            continue
        source = _dense_like(mod) if isinstance(mod, MPOLinear) else mod
        start = time.perf_counter()
        layer = MPOLinear.from_linear(source, mpo.in_shape, mpo.out_shape, max_bond=ranks[name],
                                      strategy=mod.strategy if isinstance(mod, MPOLinear) else strategy,
                                      decompose_kwargs=decompose_kwargs)
        seconds[name] += time.perf_counter() - start
        if isinstance(mod, MPOLinear):
            layer.cache_weight = mod.cache_weight
        layer.train(mod.training)
        replace_module(model, name, layer)
        actual = layer.ranks
        report.matrices.append(MatrixCompression(
            name, mpo.in_shape, mpo.out_shape, mpo.ranks, actual, dense, mpo.num_params,
            core_params(mpo.in_shape, mpo.out_shape, actual), float(mpo.norm), float(layer.error_bound),
            allocation_bound(mpo, ranks[name]), seconds[name],
        ))
    report.model_params_after = sum(p.numel() for p in model.parameters())
    return report


def _dense_like(layer: MPOLinear) -> nn.Module:
    dense = dense_module(layer)
    dense.train(layer.training)
    return dense


@dataclass
class CompressionRound:
    """One round of :func:`compress_in_rounds`: the budget, what it reached, and the metric after fine-tuning."""

    round: int
    budget: int
    params: int
    dense_params: int
    model_params: int
    kept_dense: int
    total_relative_sq_error: float
    metric: Any
    compress_seconds: float
    finetune_seconds: float


@dataclass
class RoundsReport:
    """What :func:`compress_in_rounds` did, round by round; ``print`` it for a table."""

    budget: int
    rounds: list[CompressionRound] = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)

    def __str__(self) -> str:
        head = f"{'round':>5}{'budget':>11}{'entries':>11}{'x dense':>9}{'kept dense':>11}{'sum rel err^2':>15}{'metric':>12}{'ft s':>8}"
        lines = [head, "-" * len(head)]
        for r in self.rounds:
            metric = f"{r.metric:.4g}" if isinstance(r.metric, (int, float)) else str(r.metric)
            lines.append(f"{r.round:>5}{r.budget:>11}{r.params:>11}{r.params / max(r.dense_params, 1):>9.3f}"
                         f"{r.kept_dense:>11}{r.total_relative_sq_error:>15.3e}{metric:>12}{r.finetune_seconds:>8.1f}")
        return "\n".join(lines)


def compress_in_rounds(
    model: nn.Module,
    budget: int | float,
    finetune: Callable[[nn.Module, int], Any],
    evaluate: Callable[[nn.Module], Any] | None = None,
    rounds: int = 3,
    include: Include = None,
    n: int | Callable[[int, int], tuple[Sequence[int], Sequence[int]]] = 5,
    strategy: str = "auto",
    decompose_kwargs: dict | None = None,
    progress: bool | None = None,
) -> RoundsReport:
    """MPOP's truncate-then-fine-tune loop: truncate a little, fine-tune the auxiliaries, repeat until the budget.

    Round ``r`` of ``R`` compresses to ``dense * (budget / dense) ** (r / R)`` entries (a geometric
    schedule ending exactly at ``budget``; ``dense``: the chosen matrices' dense entries), makes the
    auxiliary cores trainable and the central cores frozen (:func:`~mpo_core.nn.set_trainable`; other
    parameters keep their ``requires_grad``), calls ``finetune(model, r)``, then ``evaluate(model)``.

    Parameters
    ----------
    model : nn.Module
        Modified in place.
    budget : int or float
        The final budget, as :func:`compress` (entries, or a fraction of the dense entries).
    finetune : callable
        ``finetune(model, round)`` trains the model a little (its own optimizer, data, steps).
    evaluate : callable, optional
        ``evaluate(model) -> metric`` (e.g. dev accuracy), recorded per round.
    rounds : int, default 3
    include, n, strategy, decompose_kwargs, progress :
        As :func:`compress`.

    Returns
    -------
    RoundsReport
        Per round: the budget, the entries reached, matrices kept dense, the summed squared relative
        error bounds of that round's truncation, the metric, and timings.

    Raises
    ------
    ValueError
        A budget that cannot be met (below every bond at 1) or a pattern matching nothing: raised before
        the model is touched.
    """
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if not callable(finetune) or (evaluate is not None and not callable(evaluate)):
        raise TypeError("finetune must be callable (model, round) and evaluate callable (model) or None")
    targets = _targets(model, include)
    names = {name for name, _ in targets}
    shapes = []
    for _, mod in targets:
        kw = _shape_kw(mod, n)
        rows, cols = _in_out(mod).shape
        shapes.append(resolve_shapes(rows, cols, kw.get("in_shape"), kw.get("out_shape"), kw.get("n")))
    dense = sum(math.prod(i) * math.prod(o) for i, o in shapes)
    target = _resolve_budget(budget, dense)
    floor = budget_floor(shapes)
    if target < floor:
        raise ValueError(f"budget={budget} ({target} entries) cannot be met: it is below the minimum {floor} "
                         f"(all bonds 1) of the chosen matrices")
    report = RoundsReport(target)
    for r in range(1, rounds + 1):
        step_budget = target if r == rounds else max(target, int(dense * (target / dense) ** (r / rounds)))
        start = time.perf_counter()
        result = compress(model, budget=step_budget, include=lambda name, mod: name in names, n=n, strategy=strategy,
                          decompose_kwargs=decompose_kwargs, progress=progress)
        compress_s = time.perf_counter() - start
        set_trainable(model, "auxiliary")
        start = time.perf_counter()
        finetune(model, r)
        finetune_s = time.perf_counter() - start
        metric = evaluate(model) if evaluate is not None else None
        report.rounds.append(CompressionRound(
            r, step_budget, result.params, result.dense_params, sum(p.numel() for p in model.parameters()),
            sum(m.kept_dense for m in result.matrices), result.total_relative_sq_error, metric, compress_s, finetune_s,
        ))
    return report
