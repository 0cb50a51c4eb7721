"""What :func:`mpo_core.compress.compress` and :func:`~mpo_core.compress.compress_in_rounds` report: per matrix,
per model, per round; each prints as a table and converts to JSON."""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

__all__ = ["CompressionReport", "CompressionRound", "MatrixCompression", "RoundsReport"]


@dataclass
class MatrixCompression:
    """One compressed matrix: shapes, ranks, sizes and error bounds (absolute and relative to ``||W||_F``).

    With calibration data, ``norm``, ``error_bound`` and ``allocation_bound`` are in the output norm
    ``||X .||_F`` (see ``error_norm``)."""

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
    """Why the matrix stayed dense (its MPO would not have saved entries), or why this member (``n="auto"``)."""
    member: str = ""
    """``"svd"`` (n=2), ``"mpo3"``, ...; ``"dense"`` when kept dense."""
    error_norm: str = "weight"
    """``"weight"``: bounds on ``||W - W'||_F``; ``"output"``: on ``||X (W - W')||_F`` (calibration given)."""
    sensitivity: float = 1.0
    """Objective weight of this matrix's relative squared error (measured with calibration data, else 1)."""
    whitening: str = ""
    """With calibration: the input Gram's state (full rank, or the ridge that regularised it)."""

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
    objective: str = "relative weight error"
    """What the allocation minimised (``sum_m sensitivity_m * relative_error_m^2``, in which norm)."""
    plans: dict[str, float] = field(default_factory=dict)
    """``n="auto"``: the objective of every plan compared (the per-matrix choice and each fixed member's)."""
    chosen_plan: str = ""

    @property
    def dense_params(self) -> int:
        return sum(m.dense_params for m in self.matrices)

    @property
    def params(self) -> int:
        return sum(m.params for m in self.matrices)

    @property
    def total_relative_sq_error(self) -> float:
        """``sum_m (error_bound_m / norm_m)^2`` (in the norm of ``error_norm``)."""
        return sum(m.relative_error_bound ** 2 for m in self.matrices)

    @property
    def weighted_error(self) -> float:
        """``sum_m sensitivity_m (error_bound_m / norm_m)^2``: the objective the allocation minimised."""
        return sum(m.sensitivity * m.relative_error_bound ** 2 for m in self.matrices)

    def to_dict(self) -> dict:
        out = asdict(self)
        out.update(dense_params=self.dense_params, params=self.params, total_relative_sq_error=self.total_relative_sq_error,
                   weighted_error=self.weighted_error)
        return out

    def __str__(self) -> str:
        head = f"{'matrix':<40}{'member':<7}{'ranks':<22}{'dense':>9}{'params':>9}{'rel err bound':>15}{'sens':>8}"
        lines = [head, "-" * len(head)]
        for m in self.matrices:
            ranks = "dense" if m.kept_dense else str(m.ranks[1:-1])
            lines.append(f"{m.name:<40}{m.member:<7}{ranks:<22}{m.dense_params:>9}{m.params:>9}"
                         f"{m.relative_error_bound:>15.3e}{m.sensitivity:>8.3g}" + (f"  {m.reason}" if m.reason else ""))
        goal = f"budget={self.budget}" if self.budget is not None else f"rel_tol={self.rel_tol}"
        lines.append(
            f"{goal}: matrix entries {self.dense_params} dense -> {self.params} "
            f"({self.params / max(self.dense_params, 1):.3f}x); model parameters {self.model_params_before} -> "
            f"{self.model_params_after}; objective ({self.objective}) {self.weighted_error:.3e}; "
            f"{sum(m.kept_dense for m in self.matrices)} kept dense"
        )
        if self.plans:
            lines.append("plans compared (objective): " + ", ".join(f"{k} {v:.3e}" for k, v in self.plans.items())
                         + f"; chosen: {self.chosen_plan}")
        return "\n".join(lines)


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
