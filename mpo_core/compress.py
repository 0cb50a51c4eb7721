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

import math
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from mpo_core.allocation import allocate_ranks, allocation_bound, budget_floor, resolve_budget
from mpo_core.compress_report import CompressionReport, CompressionRound, MatrixCompression, RoundsReport
from mpo_core.decompose import decompose
from mpo_core.family import DEFAULT_CORES, FamilyPlanner, family_member_name, member_at_tolerance
from mpo_core.mpo import MPO
from mpo_core.nn import (Include, MPOLinear, dense_module, is_linear, linear_weight, progress_bar, replace_module,
                         select_modules, set_trainable, shape_kwargs)
from mpo_core.sensitivity import output_sensitivities
from mpo_core.shapes import check_int, consistent_ranks, core_params, full_ranks, resolve_shapes
from mpo_core.truncation import check_rel_tol
from mpo_core.whitening import Whitening, collect_input_stats, output_error, whitening_factor

__all__ = ["CompressionAnalysis", "analyze", "allocate_ranks", "allocation_bound", "budget_floor", "consistent_ranks", "compress", "compress_in_rounds",
           "CompressionReport", "CompressionRound", "MatrixCompression", "RoundsReport"]


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
    rows, cols = linear_weight(mod).shape
    if n == 2:
        return dict(in_shape=(rows, 1), out_shape=(1, cols))  # the truncated SVD: the family's n=2 member
    return shape_kwargs(n, rows, cols)


def _check_n(n: object) -> None:
    if n == "auto" or callable(n):
        return
    if isinstance(n, bool) or not isinstance(n, int) or n < 2:
        raise ValueError(f"n must be an int >= 2, 'auto', or a callable (in, out) -> (in_shape, out_shape); got {n!r}")


@dataclass
class _Choice:
    """What to build for one matrix: shapes and bonds (``ranks=None``: keep dense), and why."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    ranks: list[int] | None
    member: str
    reason: str = ""
    full: MPO | None = None
    planned_error: float | None = None


def _calibrate(model: nn.Module, targets: list[tuple[str, nn.Module]], weights: Mapping[str, torch.Tensor],
               calibration: Iterable[Any], probe_batches: int) -> tuple[dict[str, Whitening], dict[str, float]]:
    batches = list(calibration)
    modules = dict(targets)
    stats = collect_input_stats(model, modules, batches, {name: w.shape[0] for name, w in weights.items()})
    whitenings = {name: whitening_factor(st.gram, name=f"the input Gram of {name}") for name, st in stats.items()}
    sens = output_sensitivities(model, modules, weights, whitenings, batches[:probe_batches])
    return whitenings, sens


def _auto_tolerance(weights: Mapping[str, torch.Tensor], rel_tol: float, whitenings: Mapping[str, Whitening],
                    cores: Sequence[int], kwargs: dict) -> dict[str, _Choice]:
    """Per matrix, the member with the fewest entries meeting ``rel_tol`` (dense when none saves any)."""
    out = {}
    for name, w in weights.items():
        point, _, sizes = member_at_tolerance(w, rel_tol, whitenings.get(name), cores, **kwargs)
        sizes_text = ", ".join(f"{k} {v}" for k, v in sizes.items())
        if point.params >= w.numel():
            out[name] = _Choice((w.shape[0], 1), (1, w.shape[1]), None, "dense",
                                f"no member meets rel_tol={rel_tol} below {w.numel()} dense entries ({sizes_text})")
        else:
            out[name] = _Choice(point.member.in_shape, point.member.out_shape, point.ranks, point.member.name,
                                f"fewest entries at rel_tol={rel_tol} ({sizes_text})")
    return out


@dataclass
class CompressionAnalysis:
    """What :func:`compress` learns about a model before choosing ranks, kept to compress it again at other budgets:
    the chosen layers, their input statistics and sensitivities (with calibration) and, for ``n="auto"``, the
    family's curves (:class:`~mpo_core.family.FamilyPlanner`, built on first use). Made by :func:`analyze`."""

    names: list[str]
    fingerprints: dict[str, tuple[tuple[int, ...], float, float]]
    whitenings: dict[str, Whitening]
    sensitivities: dict[str, float]
    cores: tuple[int, ...]
    planner: FamilyPlanner | None = None

    def check(self, weights: Mapping[str, torch.Tensor]) -> None:
        """``ValueError`` unless ``weights`` are the matrices this analysis was made of."""
        if list(weights) != self.names:
            raise ValueError(f"analysis was made for layers {self.names[:4]}..., not {list(weights)[:4]}...")
        for name, w in weights.items():
            if _fingerprint(w) != self.fingerprints[name]:
                raise ValueError(f"analysis was made for other weights: layer {name!r} changed since")

    def family_planner(self, weights: Mapping[str, torch.Tensor]) -> FamilyPlanner:
        if self.planner is None:
            self.planner = FamilyPlanner(weights, self.whitenings, self.sensitivities or None, self.cores)
        return self.planner


def _fingerprint(w: torch.Tensor) -> tuple[tuple[int, ...], float, float]:
    w64 = w.detach().to(torch.float64)
    return tuple(w.shape), float(w64.sum()), float((w64 ** 2).sum())


def analyze(model: nn.Module, include: Include = None, calibration: Iterable[Any] | None = None,
            cores: Sequence[int] = DEFAULT_CORES, probe_batches: int = 4) -> CompressionAnalysis:
    """Input statistics and sensitivities of the layers :func:`compress` would change (see its ``calibration``),
    to pass as ``compress(..., analysis=)`` at several budgets without gathering or decomposing again.
    The model is not changed."""
    probe_batches = check_int("probe_batches", probe_batches)
    targets = _targets(model, include)
    weights = {name: _in_out(mod) for name, mod in targets}
    whitenings: dict[str, Whitening] = {}
    sens: dict[str, float] = {}
    if calibration is not None:
        whitenings, sens = _calibrate(model, targets, weights, calibration, probe_batches)
    return CompressionAnalysis(list(weights), {k: _fingerprint(w) for k, w in weights.items()}, whitenings, sens,
                               tuple(cores))


def compress(
    model: nn.Module,
    budget: int | float | None = None,
    rel_tol: float | None = None,
    include: Include = None,
    n: int | str | Callable[[int, int], tuple[Sequence[int], Sequence[int]]] = 2,
    strategy: str = "auto",
    decompose_kwargs: dict | None = None,
    progress: bool | None = None,
    calibration: Iterable[Any] | None = None,
    cores: Sequence[int] = DEFAULT_CORES,
    probe_batches: int = 4,
    analysis: CompressionAnalysis | None = None,
) -> CompressionReport:
    """MPOP compression: replace chosen linear layers in place by truncated :class:`MPOLinear`.

    The new layers' cores are in the balanced gauge (:meth:`~mpo_core.mpo.MPO.balanced`): every bond's two
    sides carry entries of the same size, so that healing or fine-tuning them with Adam is well scaled (the
    TT-SVD's own gauge puts the whole norm in the last core, and input whitening makes the first core tiny).

    Parameters
    ----------
    model : nn.Module
        Modified in place.
    budget : int or float, optional
        Entries allowed over all chosen matrices (int), or a fraction of their dense entries
        (float in ``(0, 1]``); see :func:`allocate_ranks`.
    rel_tol : float, optional
        Global ``ε``: every matrix is guaranteed ``||W - W_mpo||_F <= ε ||W||_F`` (with calibration:
        ``||X (W - W_mpo)||_F <= ε ||X W||_F``).
    include : str, list of str, or callable, optional
        Module names / suffixes / glob patterns / predicate, as :func:`mpo_core.nn.mpo_ify`; default
        every linear module (``nn.Linear``, transformers ``Conv1D``) and :class:`MPOLinear` of the model.
    n : int, "auto" or callable, default 2
        Cores per dense matrix: ``2`` is the truncated SVD (``in_shape=(I, 1)``, ``out_shape=(1, J)``; the
        default because it was the best member on every matrix measured: on all-MiniLM-L6-v2 its relative
        error at equal entries was 2-10x below n=3, 4 and 5, with and without calibration, see the README),
        ``3, 4, 5, ...`` the balanced factorization; ``"auto"``: per matrix, the member of the family
        (:mod:`mpo_core.family`: SVD or MPO, its shapes and bonds) under one global budget that minimises
        the objective, the report saying which and why (it truncates every member at 8 sizes per matrix: some
        seconds per matrix; :func:`analyze` keeps that work for a budget sweep); or ``fn(in_features, out_features) ->
        (in_shape, out_shape)``. Existing :class:`MPOLinear` keep their shapes (except with ``"auto"``).
    strategy : str
        Contraction strategy of the layers created from dense modules (``MPOLinear`` keep theirs).
    decompose_kwargs : dict, optional
        Further arguments of :func:`mpo_core.decompose` (e.g. its SVD options), for every decomposition.
    progress : bool, optional
        A tqdm progress bar over the matrices (default: on long runs at a terminal).
    calibration : iterable, optional
        Model inputs (a dict is passed as ``model(**batch)``, a tensor as ``model(batch)``). Their input
        Grams (:mod:`mpo_core.whitening`, forward hooks, float64) whiten every factorization so that it
        minimises the output error ``||X W - X W'||_F`` (SVD-LLM's whitening), and the first
        ``probe_batches`` measure how much the model's output feels each layer's error
        (:mod:`mpo_core.sensitivity`); the allocation then minimises ``sum_m s_m e_m``, ``e_m`` the
        layer's relative squared output error. Without it the objective is the relative weight error.
    cores : sequence of int
        The numbers of cores ``n="auto"`` considers (2 = truncated SVD).
    probe_batches : int
        Calibration batches used for the sensitivity probes (one model pass per layer each).
    analysis : CompressionAnalysis, optional
        From :func:`analyze` on this model and ``include`` (then give neither ``calibration`` nor ``cores``):
        its statistics, sensitivities and (``n="auto"``) family curves are reused, so a budget sweep gathers
        and decomposes once. A ``ValueError`` if the layers or their weights differ from the analysed ones.

    Returns
    -------
    CompressionReport
        Per matrix: member, ranks, parameters, the error bound (weight norm: the discarded singular values
        of the actual TT-SVD; with calibration: the output error, computed exactly), the planned error
        and the decomposition time, or ``kept_dense`` with the reason; totals, the objective and (auto)
        every plan compared. Never more entries than the dense matrices: a matrix whose MPO would not save
        entries stays dense (an :class:`MPOLinear` given is contracted back to its dense module type then).

    Raises
    ------
    ValueError
        A pattern matching no layer, a shared core (e.g. MPOBERT's shared centrals: truncating one layer
        would change the others), a budget that cannot be met or a rel_tol problem, calibration batches that
        do not fit the model, NaN/Inf in their statistics: all before the model changes.
    """
    _check_n(n)
    if (budget is None) == (rel_tol is None):
        raise ValueError("give exactly one of budget= and rel_tol=")
    check_rel_tol(rel_tol)
    probe_batches = check_int("probe_batches", probe_batches)
    kwargs = dict(decompose_kwargs or {})
    if "input_cov" in kwargs:
        raise ValueError("pass calibration= to compress rather than decompose_kwargs['input_cov']")
    targets = _targets(model, include)
    before = sum(p.numel() for p in model.parameters())
    weights = {name: _in_out(mod) for name, mod in targets}
    target = None if budget is None else resolve_budget(budget, sum(w.numel() for w in weights.values()))
    if analysis is None:
        analysis = analyze(model, include, calibration, cores, probe_batches)
    elif calibration is not None:
        raise ValueError("give calibration= or analysis=, not both (the analysis holds the calibration statistics)")
    analysis.check(weights)
    whitenings, sens = analysis.whitenings, analysis.sensitivities
    report = CompressionReport(budget, rel_tol, before, before)
    report.objective = ("sensitivity-weighted relative output error ||X dW||^2 / ||X W||^2" if whitenings
                        else "relative weight error ||dW||^2 / ||W||^2")
    seconds = {name: 0.0 for name in weights}
    if n == "auto" and rel_tol is not None:
        choices = _auto_tolerance(weights, rel_tol, whitenings, analysis.cores, kwargs)
    elif n == "auto":
        start = time.perf_counter()
        chosen = analysis.family_planner(weights).plan(target)
        report.plans, report.chosen_plan = chosen.candidates, chosen.source
        choices = {}
        for name, entry in chosen.entries.items():
            pt = entry.point
            if pt.member is None:
                rows, cols = weights[name].shape
                choices[name] = _Choice((rows, 1), (1, cols), None, "dense", "kept dense: " + entry.why())
            else:
                choices[name] = _Choice(pt.member.in_shape, pt.member.out_shape, pt.ranks, pt.member.name,
                                        entry.why(), planned_error=pt.error)
        per = (time.perf_counter() - start) / max(len(weights), 1)
        seconds = {name: per for name in weights}
    else:
        exact: dict[str, MPO] = {}
        for name, mod in progress_bar(targets, "compress: exact TT-SVD", progress):
            start = time.perf_counter()
            try:
                exact[name] = decompose(weights[name], **_shape_kw(mod, n), input_cov=whitenings.get(name), **kwargs)
            except ValueError as exc:
                raise ValueError(f"cannot decompose layer {name!r} ({tuple(weights[name].shape)}): {exc}") from exc
            seconds[name] = time.perf_counter() - start
        ranks = allocate_ranks(exact, budget=target, rel_tol=rel_tol, weights=sens or None)
        choices = {}
        for name, mpo in exact.items():
            member = family_member_name(mpo.in_shape, mpo.out_shape)
            choices[name] = _Choice(mpo.in_shape, mpo.out_shape, ranks[name], member, full=mpo,
                                    planned_error=(allocation_bound(mpo, ranks[name]) / mpo.norm) ** 2 if mpo.norm else 0.0)
    for name, mod in progress_bar(targets, "compress: truncate", progress):
        report.matrices.append(_apply(model, name, mod, weights.pop(name), choices[name], whitenings.get(name),
                                      sens.get(name, 1.0), strategy, kwargs, seconds[name]))
    report.model_params_after = sum(p.numel() for p in model.parameters())
    return report


def _apply(model: nn.Module, name: str, mod: nn.Module, weight: torch.Tensor, choice: _Choice,
           whitening: Whitening | None, sensitivity: float, strategy: str, kwargs: dict, seconds: float
           ) -> MatrixCompression:
    """Build the planned layer for one matrix (or keep it dense) and describe it."""
    in_shape, out_shape = choice.in_shape, choice.out_shape
    dense = weight.numel()
    full = full_ranks(in_shape, out_shape)
    full_params = choice.full.num_params if choice.full is not None else core_params(in_shape, out_shape, full)
    norm = float(choice.full.norm) if choice.full is not None else (
        output_error(weight, torch.zeros_like(weight), whitening.gram) if whitening is not None
        else float(torch.linalg.vector_norm(weight, dtype=torch.float64)))
    common = dict(error_norm="output" if whitening is not None else "weight", sensitivity=sensitivity,
                  whitening=whitening.describe() if whitening is not None else "")
    needed = None if choice.ranks is None else core_params(in_shape, out_shape, choice.ranks)
    if needed is None or needed >= dense:
        if isinstance(mod, MPOLinear):
            replace_module(model, name, _dense_like(mod))
        reason = choice.reason or f"an MPO with bonds {choice.ranks[1:-1]} needs {needed} entries >= {dense} dense"
        return MatrixCompression(name, in_shape, out_shape, full, [], dense, full_params, dense, norm, 0.0, 0.0,
                                 seconds, True, reason, member="dense", **common)
    source = _dense_like(mod) if isinstance(mod, MPOLinear) else mod
    start = time.perf_counter()
    layer = MPOLinear.from_linear(source, in_shape, out_shape, max_bond=choice.ranks,
                                  strategy=mod.strategy if isinstance(mod, MPOLinear) else strategy,
                                  decompose_kwargs={**kwargs, "input_cov": whitening}, balance=True)
    seconds += time.perf_counter() - start
    if isinstance(mod, MPOLinear):
        layer.cache_weight = mod.cache_weight
    layer.train(mod.training)
    replace_module(model, name, layer)
    if whitening is not None:
        with torch.no_grad():
            error = output_error(weight, layer.weight.detach().T, whitening.gram)
    else:
        error = float(layer.error_bound)
    planned = math.sqrt(choice.planned_error) * norm if choice.planned_error is not None else error
    return MatrixCompression(name, in_shape, out_shape, full, layer.ranks, dense, full_params,
                             core_params(in_shape, out_shape, layer.ranks), norm, error, planned, seconds,
                             reason=choice.reason, member=choice.member, **common)


def _dense_like(layer: MPOLinear) -> nn.Module:
    dense = dense_module(layer)
    dense.train(layer.training)
    return dense


def compress_in_rounds(
    model: nn.Module,
    budget: int | float,
    finetune: Callable[[nn.Module, int], Any],
    evaluate: Callable[[nn.Module], Any] | None = None,
    rounds: int = 3,
    include: Include = None,
    n: int | str | Callable[[int, int], tuple[Sequence[int], Sequence[int]]] = 2,
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
    _check_n(n)
    if isinstance(rounds, bool) or not isinstance(rounds, int) or rounds < 1:
        raise ValueError(f"rounds must be an int >= 1, got {rounds!r}")
    if not callable(finetune) or (evaluate is not None and not callable(evaluate)):
        raise TypeError("finetune must be callable (model, round) and evaluate callable (model) or None")
    targets = _targets(model, include)
    names = {name for name, _ in targets}
    shapes = []
    for _, mod in targets:
        kw = _shape_kw(mod, 2 if n == "auto" else n)  # auto: the SVD member's floor
        rows, cols = _in_out(mod).shape
        shapes.append(resolve_shapes(rows, cols, kw.get("in_shape"), kw.get("out_shape"), kw.get("n")))
    dense = sum(math.prod(i) * math.prod(o) for i, o in shapes)
    target = resolve_budget(budget, dense)
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
