"""The MPO family picks its member: per matrix, the cores, the mode factorization and the bonds, under one budget.

The family of a matrix ``W`` (``I x J``): ``n = 2`` is the truncated SVD (``in_shape = (I, 1)``,
``out_shape = (1, J)``: the only split is the SVD of ``W`` itself), ``n = 3, 4, 5, ...`` the MPOs with
the balanced factorization of :func:`~mpo_core.shapes.factorize` (central mode largest). Each member
has a curve of (entries, error) points: every rank for the SVD, and for an MPO the bonds MPOP's
allocation gives at a grid of sizes. :func:`plan` picks one point per matrix so that the weighted sum
of relative squared errors is smallest under one entry budget, with a matrix left dense when that is
best (the greedy over the lower convex hulls of the curves, then the leftover budget spent on the best
upgrades), and compares the result with every fixed member's plan (MPOP's allocation and one uniform
bond cap) under the same objective, keeping the best.

The error is the one the model's outputs feel when calibration statistics are given: the relative
output error ``||X (W - W')||_F^2 / ||X W||_F^2`` of each layer (:mod:`mpo_core.whitening`), times a
per-matrix sensitivity (how much the model's output moves per unit of that layer's relative output
error, measured by :mod:`mpo_core.sensitivity`). Without them it is the relative weight error.
The SVD member's errors are exact (closed form from the whitened spectrum); an MPO member's are
computed from its rebuilt truncation.
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass, field
from typing import Mapping, Sequence

import torch

from mpo_core.allocation import allocate_ranks
from mpo_core.decompose import decompose
from mpo_core.mpo import MPO
from mpo_core.shapes import capped_ranks, check_int, core_params, factorize, full_ranks
from mpo_core.truncation import check_rel_tol
from mpo_core.whitening import Whitening, output_error

__all__ = ["DEFAULT_CORES", "FamilyPlanner", "Member", "Plan", "PlanEntry", "Point", "family_member_name", "family_members",
           "uniform_ranks", "member_curve", "plan", "member_for_budget", "member_at_tolerance"]

DEFAULT_CORES = (2, 3, 4, 5)
"""The numbers of cores ``n="auto"`` considers."""
CURVE_LEVELS = 8
"""Sizes (fractions of the dense entries, geometric between 2% and 100%) at which an MPO member is truncated."""
SMALLEST_LEVEL = 0.02


@dataclass(frozen=True)
class Member:
    """One member of the family: its mode shapes (``n = 2`` with ``(I, 1) x (1, J)`` is the truncated SVD)."""

    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]

    @property
    def n(self) -> int:
        return len(self.in_shape)

    @property
    def name(self) -> str:
        return family_member_name(self.in_shape, self.out_shape)

    def describe(self) -> str:
        return "truncated SVD" if self.name == "svd" else f"MPO n={self.n} {self.in_shape}x{self.out_shape}"


@dataclass
class Point:
    """A way to store one matrix: a member at some bonds (``member=None``: kept dense), its entries and error."""

    member: Member | None
    ranks: list[int] | None
    params: int
    error: float
    """Relative squared error in the objective's norm (output or weight)."""


@dataclass
class PlanEntry:
    """The plan for one matrix: the chosen point, its objective weight, and the best point of each member
    at the same or fewer entries (why this one)."""

    name: str
    point: Point
    weight: float
    alternatives: dict[str, float] = field(default_factory=dict)
    """Member name -> its smallest relative squared error at no more entries than the chosen point."""

    def why(self) -> str:
        chosen = "dense" if self.point.member is None else self.point.member.name
        others = ", ".join(f"{k} {v:.3g}" for k, v in sorted(self.alternatives.items()) if k != chosen)
        return f"{chosen}: error {self.point.error:.3g} at {self.point.params} entries" + (
            f" (at no more entries: {others})" if others else "")


@dataclass
class Plan:
    """One point per matrix, the objective ``sum_m weight_m * error_m`` and where the plan came from."""

    entries: dict[str, PlanEntry]
    source: str
    """``"envelope"`` (the per-matrix choice over all members) or the fixed member plan it lost to."""
    candidates: dict[str, float] = field(default_factory=dict)
    """Objective of every plan compared: ``"envelope"``, ``"svd allocated"``, ``"mpo5 uniform"``, ..."""

    @property
    def objective(self) -> float:
        return sum(e.weight * e.point.error for e in self.entries.values())

    @property
    def params(self) -> int:
        return sum(e.point.params for e in self.entries.values())


def family_member_name(in_shape: Sequence[int], out_shape: Sequence[int]) -> str:
    """``"svd"`` for ``(I, 1) x (1, J)``, else ``"mpo<n>"``."""
    n = len(in_shape)
    return "svd" if n == 2 and in_shape[1] == 1 and out_shape[0] == 1 else f"mpo{n}"


def family_members(rows: int, cols: int, cores: Sequence[int] = DEFAULT_CORES) -> list[Member]:
    """The members for an ``rows x cols`` matrix: ``n = 2`` the SVD, others balanced (skipped when a
    dimension cannot be factored into ``n`` modes >= 2)."""
    members = []
    for n in cores:
        if n == 2:
            members.append(Member((rows, 1), (1, cols)))
            continue
        try:
            members.append(Member(factorize(rows, n), factorize(cols, n)))
        except ValueError:
            continue
    return members


def _relative(value_sq: float, norm_sq: float) -> float:
    return value_sq / norm_sq if norm_sq > 0 else 0.0


def _reference_sq(weight: torch.Tensor, whitening: Whitening | None) -> float:
    """``||W||_F^2``, or ``||X W||_F^2`` with input statistics: what :func:`_evaluate`'s errors are relative to."""
    if whitening is None:
        return float((weight.to(torch.float64) ** 2).sum())
    return output_error(weight, torch.zeros_like(weight), whitening.gram) ** 2


def _evaluate(weight: torch.Tensor, member: Member, ranks: Sequence[int], whitening: Whitening | None,
              reference_sq: float) -> float:
    """Relative squared error of the TT-SVD of ``weight`` (whitened when given) at ``ranks``, from its rebuild."""
    mpo = decompose(weight, member.in_shape, member.out_shape, max_bond=list(ranks), input_cov=whitening)
    return _error_of(weight, mpo, whitening, reference_sq)


def _error_of(weight: torch.Tensor, mpo: MPO, whitening: Whitening | None, reference_sq: float) -> float:
    """Relative squared error of ``mpo`` (a decomposition of ``weight``) in the objective's norm, from its rebuild."""
    if whitening is None:
        w = weight.to(torch.float64)
        return _relative(float(((w - mpo.to_dense().to(torch.float64)) ** 2).sum()), reference_sq)
    error = mpo.metadata.get("output_error")  # computed by decompose for Kronecker whitening
    if error is None:
        error = output_error(weight, mpo.to_dense(), whitening.gram)
    return _relative(error ** 2, reference_sq)


def _svd_points(mpo: MPO, member: Member) -> list[Point]:
    """Every rank of the SVD member, errors exact from its (whitened) spectrum."""
    s_sq = (mpo.spectra[0].double() ** 2)
    total = float(s_sq.sum())
    tail = torch.flip(torch.cumsum(torch.flip(s_sq, [0]), 0), [0]).tolist() + [0.0]
    rows, cols = mpo.shape
    return [Point(member, [1, r, 1], r * (rows + cols), _relative(tail[r], total)) for r in range(1, len(s_sq) + 1)]


def member_curve(weight: torch.Tensor, member: Member, whitening: Whitening | None = None,
                 levels: int = CURVE_LEVELS) -> tuple[MPO, list[Point]]:
    """The exact (whitened) decomposition of ``weight`` (``I x J``) as ``member`` and its (entries, error) points."""
    mpo = decompose(weight, member.in_shape, member.out_shape, input_cov=whitening)
    if member.name == "svd":
        return mpo, _svd_points(mpo, member)
    dense = math.prod(mpo.shape)
    floor = core_params(member.in_shape, member.out_shape, [1] * (member.n + 1))
    seen, points = set(), []
    reference_sq = _reference_sq(weight, whitening)
    for k in range(levels):
        size = int(dense * SMALLEST_LEVEL ** (1 - k / max(levels - 1, 1)))
        if size < floor:
            continue
        ranks = allocate_ranks({"w": mpo}, budget=size)["w"]
        if tuple(ranks) in seen:
            continue
        seen.add(tuple(ranks))
        points.append(Point(member, ranks, core_params(member.in_shape, member.out_shape, ranks),
                            _evaluate(weight, member, ranks, whitening, reference_sq)))
    return mpo, points


def _dense_point(weight: torch.Tensor) -> Point:
    return Point(None, None, weight.numel(), 0.0)


def _pareto(points: list[Point]) -> list[Point]:
    """Points no other point beats in both entries and error, by entries ascending."""
    front: list[Point] = []
    for p in sorted(points, key=lambda p: (p.params, p.error)):
        if not front or p.error < front[-1].error:
            front.append(p)
    return front


def _hull(front: list[Point], weight: float) -> list[Point]:
    """The lower convex hull of a Pareto front in (entries, weighted error)."""
    hull: list[Point] = []
    for p in front:
        while len(hull) >= 2:
            a, b = hull[-2], hull[-1]
            # b is above the segment a -> p: drop it
            if (b.error - a.error) * (p.params - a.params) >= (p.error - a.error) * (b.params - a.params):
                hull.pop()
            else:
                break
        hull.append(p)
    return hull


def _choose(fronts: Mapping[str, list[Point]], weights: Mapping[str, float], budget: int) -> dict[str, Point]:
    """One point per matrix, weighted error smallest (greedy on the hulls) with at most ``budget`` entries."""
    hulls = {name: _hull(front, weights[name]) for name, front in fronts.items()}
    index = {name: len(h) - 1 for name, h in hulls.items()}
    total = sum(h[-1].params for h in hulls.values())
    heap: list[tuple[float, str, int]] = []

    def push(name: str) -> None:
        k = index[name]
        if k > 0:
            hi, lo = hulls[name][k], hulls[name][k - 1]
            slope = weights[name] * (lo.error - hi.error) / max(hi.params - lo.params, 1)
            heapq.heappush(heap, (slope, name, k))

    for name in hulls:
        push(name)
    while total > budget and heap:
        _, name, k = heapq.heappop(heap)  # one entry per matrix: pushed again only after its pop
        total -= hulls[name][k].params - hulls[name][k - 1].params
        index[name] = k - 1
        push(name)
    if total > budget:
        raise ValueError(f"budget {budget} cannot be met: the smallest member of every matrix needs {total} entries")
    chosen = {name: hulls[name][index[name]] for name in hulls}
    while True:  # spend what is left on the best upgrades (any Pareto point, not only hull ones)
        slack = budget - sum(p.params for p in chosen.values())
        best = None
        for name, front in fronts.items():
            cur = chosen[name]
            for p in front:
                extra = p.params - cur.params
                gain = weights[name] * (cur.error - p.error)
                if 0 < extra <= slack and gain > 0 and (best is None or gain > best[0]):
                    best = (gain, name, p)
        if best is None:
            return chosen
        chosen[best[1]] = best[2]


def uniform_ranks(members: Mapping[str, Member], budget: int) -> tuple[int, dict[str, list[int]]] | None:
    """One bond cap for every matrix, the largest whose total meets the budget (a matrix whose factors would hold at
    least its dense entries counts, and stays, dense): ``(cap, ranks per matrix)``, or ``None`` if even 1 is too big."""
    def ranks_at(cap: int) -> dict[str, list[int]]:
        return {name: capped_ranks(m.in_shape, m.out_shape, cap) for name, m in members.items()}

    def size(r: dict[str, list[int]]) -> int:
        return sum(min(core_params(m.in_shape, m.out_shape, r[name]), math.prod(m.in_shape) * math.prod(m.out_shape))
                   for name, m in members.items())

    lo, hi = 1, max(max(full_ranks(m.in_shape, m.out_shape)) for m in members.values())
    if size(ranks_at(lo)) > budget:
        return None
    while lo < hi:
        mid = (lo + hi + 1) // 2
        lo, hi = (mid, hi) if size(ranks_at(mid)) <= budget else (lo, mid - 1)
    return lo, ranks_at(lo)


def _fixed_point(weight: torch.Tensor, member: Member, ranks: list[int], exact: MPO, whitening: Whitening | None
                 ) -> Point:
    params = core_params(member.in_shape, member.out_shape, ranks)
    if params >= weight.numel():
        return _dense_point(weight)
    if member.name == "svd":
        return next(p for p in _svd_points(exact, member) if p.ranks[1] == ranks[1])
    return Point(member, ranks, params, _evaluate(weight, member, ranks, whitening, _reference_sq(weight, whitening)))


class FamilyPlanner:
    """The budget-independent part of :func:`plan`, done once: every member's exact decomposition and curve per
    matrix; :meth:`plan` then answers any budget (e.g. a sweep) without decomposing again.

    Parameters are those of :func:`plan` without ``budget``.
    """

    def __init__(self, weights: Mapping[str, torch.Tensor], whitenings: Mapping[str, Whitening] | None = None,
                 sensitivities: Mapping[str, float] | None = None, cores: Sequence[int] = DEFAULT_CORES) -> None:
        self.weights = dict(weights)
        self.whitenings = dict(whitenings or {})
        self.sens = {name: 1.0 if sensitivities is None else float(sensitivities[name]) for name in weights}
        self.cores = tuple(cores)
        self.curves: dict[str, list[Point]] = {}
        self.exact: dict[str, dict[str, tuple[Member, MPO]]] = {}
        self._points: dict[tuple[str, str, tuple[int, ...]], Point] = {}
        for name, w in self.weights.items():
            points = [_dense_point(w)]
            self.exact[name] = {}
            for member in family_members(*w.shape, self.cores):
                mpo, pts = member_curve(w, member, self.whitenings.get(name))
                self.exact[name][member.name] = (member, mpo)
                for p in pts:
                    self._points[(name, member.name, tuple(p.ranks))] = p
                points += pts
            self.curves[name] = points
        self.fronts = {name: _pareto(points) for name, points in self.curves.items()}

    def _fixed_point(self, name: str, kind: str, ranks: list[int]) -> Point:
        member = self.exact[name][kind][0]
        if core_params(member.in_shape, member.out_shape, ranks) >= self.weights[name].numel():
            return _dense_point(self.weights[name])  # as the allocation counts it: kept dense
        key = (name, kind, tuple(ranks))
        if key not in self._points:
            member, mpo = self.exact[name][kind]
            self._points[key] = _fixed_point(self.weights[name], member, ranks, mpo, self.whitenings.get(name))
        return self._points[key]

    def plan(self, budget: int, compare_fixed: bool = True) -> Plan:
        """The plan at ``budget`` entries (see :func:`plan`)."""
        chosen = _choose(self.fronts, self.sens, budget)
        best = _as_plan(chosen, self.curves, self.sens, "envelope")
        best.candidates["envelope"] = best.objective
        if not compare_fixed:
            return best
        kinds = sorted({kind for per in self.exact.values() for kind in per})
        for kind in kinds:
            if not all(kind in per for per in self.exact.values()):
                continue
            members = {name: per[kind][0] for name, per in self.exact.items()}
            mpos = {name: per[kind][1] for name, per in self.exact.items()}
            options = {}
            try:
                options["allocated"] = allocate_ranks(mpos, budget=budget, weights=self.sens)
            except ValueError:
                pass
            uniform = uniform_ranks(members, budget)
            if uniform is not None:
                options["uniform"] = uniform[1]
            for how, ranks in options.items():
                # allocate_ranks and uniform_ranks count a matrix as min(cores, dense), as _fixed_point does: in budget
                points = {name: self._fixed_point(name, kind, ranks[name]) for name in self.weights}
                candidate = _as_plan(points, self.curves, self.sens, f"{kind} {how}")
                best.candidates[candidate.source] = candidate.objective
                if candidate.objective < best.objective:
                    candidate.candidates = best.candidates
                    best = candidate
        return best


def plan(
    weights: Mapping[str, torch.Tensor],
    budget: int,
    whitenings: Mapping[str, Whitening] | None = None,
    sensitivities: Mapping[str, float] | None = None,
    cores: Sequence[int] = DEFAULT_CORES,
    compare_fixed: bool = True,
) -> Plan:
    """Choose a member and bonds per matrix under one entry budget (see the module docstring).

    Parameters
    ----------
    weights : mapping of str to torch.Tensor
        The ``in x out`` matrices, by name.
    budget : int
        Entries allowed over all of them (a matrix kept dense counts at its dense size).
    whitenings : mapping of str to Whitening, optional
        Input statistics per matrix: errors are then relative output errors and MPOs are whitened.
    sensitivities : mapping of str to float, optional
        Objective weight per matrix (default 1).
    cores : sequence of int
        The numbers of cores to consider (2 = truncated SVD).
    compare_fixed : bool
        Also build every fixed member's plan (MPOP's allocation, one uniform bond) and keep the best.

    Raises
    ------
    ValueError
        A budget below what every matrix at its smallest needs.
    """
    return FamilyPlanner(weights, whitenings, sensitivities, cores).plan(budget, compare_fixed)


def _as_plan(chosen: Mapping[str, Point], curves: Mapping[str, list[Point]], sens: Mapping[str, float],
             source: str) -> Plan:
    entries = {}
    for name, point in chosen.items():
        alternatives: dict[str, float] = {}
        for p in curves[name]:
            key = "dense" if p.member is None else p.member.name
            if p.params <= point.params:
                alternatives[key] = min(alternatives.get(key, math.inf), p.error)
        entries[name] = PlanEntry(name, point, sens[name], alternatives)
    return Plan(entries, source)


def member_for_budget(weight: torch.Tensor, budget: int, whitening: Whitening | None = None,
                      cores: Sequence[int] = DEFAULT_CORES) -> PlanEntry:
    """``n="auto"`` for one matrix alone: its entry of :func:`plan` with ``{"matrix": weight}`` at ``budget``
    entries (the member and bonds with the smallest error that fit, or dense when that fits and is best).

    For a stream of matrices each under its own budget (``compress_checkpoint --n auto``); with several
    matrices under one budget, :func:`plan` spends more on the matrices that gain most.
    """
    check_int("budget", budget, 1)
    whitenings = None if whitening is None else {"matrix": whitening}
    return FamilyPlanner({"matrix": weight}, whitenings, cores=cores).plan(budget).entries["matrix"]


def member_at_tolerance(weight: torch.Tensor, rel_tol: float, whitening: Whitening | None = None,
                        cores: Sequence[int] = DEFAULT_CORES, **decompose_kwargs) -> tuple[Point, MPO, dict[str, int]]:
    """``n="auto"`` with ``rel_tol`` for one matrix: every member decomposed at ``rel_tol`` (``decompose_kwargs``
    passed on), the one with the fewest entries kept (the first of :func:`family_members` on a tie).

    Returns its point (member, ranks, entries, relative squared error from the rebuild), its decomposition
    and every member's entries by name. The caller decides whether dense (``weight.numel()``) is better.
    """
    if check_rel_tol(rel_tol) is None:
        raise TypeError("rel_tol must be a float, got None")
    best: tuple[Member, MPO] | None = None
    sizes: dict[str, int] = {}
    for member in family_members(*weight.shape, cores):
        mpo = decompose(weight, member.in_shape, member.out_shape, rel_tol=rel_tol, input_cov=whitening,
                        **decompose_kwargs)
        sizes[member.name] = mpo.num_params
        if best is None or mpo.num_params < best[1].num_params:
            best = (member, mpo)
    if best is None:
        raise ValueError(f"no member of cores={list(cores)} can factor a {tuple(weight.shape)} matrix")
    member, mpo = best
    error = _error_of(weight, mpo, whitening, _reference_sq(weight, whitening))
    return Point(member, list(mpo.ranks), mpo.num_params, error), mpo, sizes
