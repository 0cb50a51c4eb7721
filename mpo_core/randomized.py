"""Randomized truncated splits with a certified discarded norm, for TT-SVD at LLM scale.

A split factors an unfolding ``A`` (``m x N``) as ``A ≈ left @ right`` with ``left`` having
orthonormal columns. :func:`sketched_split` finds ``left`` without a full SVD:

* **Range finder**: randomized subspace iteration (Halko, Martinsson & Tropp 2011, Alg. 4.4):
  ``Y = A Ω`` with a Gaussian ``Ω`` of ``k = rank + oversample`` columns, then ``power_iters``
  rounds of ``Q = qr(A qr(Aᵀ Q))``; each product re-orthonormalized (Householder QR).
* **Projection**: ``B = Qᵀ A`` (``k x N``) and its SVD ``B = U_B S V_Bᵀ``; ``left = Q U_B[:, :r]``
  and ``right = S_r V_B[:, :r]ᵀ = left.T @ A``.
* **Whole range** (:func:`whole_range_split`): for a lopsided unfolding, the eigenvectors of
  the Gram matrix of its smaller side give the exact dominant subspace at the cost of about
  one GEMM pass; nothing truncated, the rotation ``Vᵀ A`` is done in place, block by block
  (no second copy of ``A``).

**Certified discarded norm.** With ``Q`` orthonormal, ``||A - left right||_F² =
||(I - QQᵀ)A||_F² + Σ_{i >= r} ||row_i(U_Bᵀ B)||²``. The second sum is computed directly from
the rotated rows (no cancellation). The first is ``||A||² - ||B||²`` when that difference is
at least ``CANCELLATION_GUARD`` of ``||A||²``; below that the subtraction would lose most of
its digits, so it is recomputed directly as ``||A - Q B||_F²`` in column blocks (one more
pass). The sum is what the split reports; it is a bound on the split's error that needs no
probabilistic argument (the randomness only affects how small it is).

With a threshold ``delta`` and no rank given, the sketch starts at ``INITIAL_RANK`` and
doubles until the certified discarded norm is ``<= delta`` (or the sketch covers the
smaller dimension, where the split is exact).

Passes over ``A`` (reported in :class:`Split`): ``3 + 2 * power_iters`` for a sketched split
(the squared norm, one sketch, two per power iteration, one projection); for a whole-range
split two (Gram, projection) when wide and three (Gram, ``A V_r``, projection) when tall;
``+1`` wherever the direct residual is needed. Orthonormalizations use CholeskyQR2 (BLAS-3)
with a Householder fallback (:func:`orthonormalize`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

__all__ = ["Split", "sketched_split", "whole_range_split", "range_basis", "orthonormalize", "gemm_rounding_slack"]

OVERSAMPLE = 10
POWER_ITERS = 1
INITIAL_RANK = 32
CANCELLATION_GUARD = 1e-6
_CHOLQR_COND_LIMIT = 10.0  # second CholeskyQR round this well conditioned: output orthonormal to ~eps
_BLOCK_ELEMENTS = 1 << 22  # columns per block in the streamed passes: about 32 MiB of float64


@dataclass
class Split:
    """One split ``A ≈ left @ right``.

    ``singular_values``: the leading singular values found (all ``min(m, N)`` for a whole-range
    split; the ``k`` singular values of ``Qᵀ A`` for a sketched one, each a lower bound of the
    corresponding singular value of ``A``). ``discarded_sq``: the certified ``||A - left right||_F²``.
    ``passes``: passes over ``A``. ``sketch``: the sketch size ``k`` (``None`` for a whole-range split).
    """

    left: torch.Tensor
    right: torch.Tensor
    singular_values: torch.Tensor
    discarded_sq: float
    passes: int
    sketch: int | None


def _block_columns(rows: int, cols: int) -> int:
    return max(1, min(cols, _BLOCK_ELEMENTS // max(rows, 1)))


def _sum_sq(x: torch.Tensor) -> float:
    """``||x||_F²`` accumulated in float64 (no float64 copy of ``x`` for float32 input: per block)."""
    if x.dtype == torch.float64:
        return float(torch.linalg.vector_norm(x)) ** 2
    flat = x.reshape(x.shape[0], -1)
    step = _block_columns(flat.shape[0], flat.shape[1])
    return sum(float((flat[:, j:j + step].double() ** 2).sum()) for j in range(0, flat.shape[1], step))


def _row_sq(x: torch.Tensor) -> torch.Tensor:
    return (x.double() ** 2).sum(dim=1)


def orthonormalize(y: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of the columns of a tall ``y`` (full column rank expected).

    CholeskyQR2 (two rounds of ``Y ← Y chol(YᵀY)⁻ᵀ``, BLAS-3 only; Fukaya et al. 2014) when
    the second round's factor is well conditioned (then the result is orthonormal to working
    precision); Householder QR otherwise (rank-deficient or ill-conditioned ``y``).
    """
    q = y
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(q.mT @ q)
        if int(info) != 0:
            return torch.linalg.qr(y).Q
        q = torch.linalg.solve_triangular(chol.mT, q, upper=True, left=False)
    if float(torch.linalg.cond(chol)) > _CHOLQR_COND_LIMIT:
        return torch.linalg.qr(y).Q
    return q


def range_basis(a: torch.Tensor, k: int, power_iters: int, generator: torch.Generator) -> torch.Tensor:
    """Orthonormal ``m x k`` basis of the dominant range of ``a`` (randomized subspace iteration)."""
    omega = torch.randn(a.shape[1], k, generator=generator, dtype=a.dtype, device=a.device)
    y = a @ omega
    del omega
    for _ in range(power_iters):
        y = a @ orthonormalize(a.mT @ orthonormalize(y))
    return orthonormalize(y)


def _residual_sq(a: torch.Tensor, q: torch.Tensor, b: torch.Tensor, a_sq: float, b_sq: float) -> tuple[float, int]:
    """``||(I - QQᵀ) a||_F²`` and the passes it cost: by difference, or directly when that cancels."""
    diff = a_sq - b_sq
    if diff >= CANCELLATION_GUARD * a_sq:
        return diff, 0
    step = _block_columns(a.shape[0], a.shape[1])
    total = 0.0
    for j in range(0, a.shape[1], step):
        total += float((torch.addmm(a[:, j:j + step], q, b[:, j:j + step], alpha=-1).double() ** 2).sum())
    return total, 1


def _rank_for(tail_sq: list[float], cap: int, delta: float | None) -> int:
    """Smallest rank ``r <= cap`` with ``tail_sq[r] <= delta²`` (``cap`` when none or no ``delta``), >= 1."""
    if delta is None:
        return max(cap, 1)
    limit = delta * delta
    for r in range(min(cap, len(tail_sq) - 1) + 1):
        if tail_sq[r] <= limit:
            return max(r, 1)
    return max(cap, 1)


def _tails(base_sq: float, row_sq: torch.Tensor) -> list[float]:
    """``tails[r] = base_sq + Σ_{i >= r} row_sq[i]`` for ``r = 0 .. len(row_sq)``."""
    rev = torch.cumsum(torch.flip(row_sq.double(), [0]), 0)
    tails = torch.cat([torch.flip(rev, [0]), rev.new_zeros(1)]) + base_sq
    return tails.tolist()


def _eig_desc(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0) and eigenvectors of a symmetric PSD ``gram``, largest first."""
    evals, v = torch.linalg.eigh(gram)
    return evals.flip(-1).clamp_min(0), v.flip(-1)


def _rotate_inplace(b: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``b ← vᵀ b`` in place, by column blocks (``v`` square)."""
    vt = v.mT.contiguous()
    step = _block_columns(b.shape[0], b.shape[1])
    for j in range(0, b.shape[1], step):
        block = b[:, j:j + step]
        block.copy_(vt @ block)
    return b


def _detach_rows(x: torch.Tensor, r: int) -> torch.Tensor:
    """The first ``r`` rows of ``x``, copied when they are only part of it (so the rest can be freed)."""
    return x if r == x.shape[0] else x[:r].clone()


def _certified_projection(a, left, a_sq, passes) -> tuple[torch.Tensor, float, int]:
    """``right = leftᵀ a`` and its certified ``||a - left right||_F²`` (difference, or direct when it cancels)."""
    right = left.mT @ a
    disc, extra = _residual_sq(a, left, right, a_sq, _sum_sq(right))
    return right, disc, passes + 1 + extra


def whole_range_split(a: torch.Tensor, max_rank: int, delta: float | None) -> Split:
    """Exact split of a lopsided ``a`` from the Gram matrix of its smaller side; may **overwrite** ``a``.

    The eigenvectors ``V`` of the small Gram matrix (``a aᵀ`` when wide, ``aᵀ a`` when tall)
    give the dominant subspace; the rank is the smallest ``<= max_rank`` whose eigenvalue
    tail meets ``delta``, grown while the certified discarded norm does not. Wide and nothing
    truncated: ``a ← Vᵀ a`` in place (``right`` is ``a`` itself, discarded norm 0). Otherwise
    ``left = V_r`` (wide) or ``orthonormalize(a V_r)`` (tall) and ``right = leftᵀ a`` with the
    certified discarded norm of :func:`_certified_projection`. ``singular_values`` are the
    square roots of the Gram eigenvalues (inaccurate below ``sqrt(eps)`` times the largest).
    """
    rows, cols = a.shape
    wide = rows <= cols
    evals, v = _eig_desc(a @ a.mT if wide else a.mT @ a)
    a_sq = float(evals.double().sum())
    small = min(rows, cols)
    cap = max(1, min(max_rank, small))
    r = _rank_for(_tails(0.0, evals), cap, delta)
    if wide and r == rows:
        return Split(v, _rotate_inplace(a, v), evals.sqrt(), 0.0, passes=2, sketch=None)
    passes = 1
    while True:
        left = v[:, :r].contiguous() if wide else orthonormalize(a @ v[:, :r])
        passes += 0 if wide else 1
        right, disc, passes = _certified_projection(a, left, a_sq, passes)
        if delta is None or disc <= delta * delta or r >= cap:
            return Split(left, right, evals.sqrt(), disc, passes=passes, sketch=None)
        r = min(cap, r + max(1, r // 8))


def sketched_split(
    a: torch.Tensor,
    max_rank: int | None,
    delta: float | None,
    *,
    oversample: int = OVERSAMPLE,
    power_iters: int = POWER_ITERS,
    generator: torch.Generator,
) -> Split | None:
    """Randomized split of ``a`` with a certified discarded norm (see the module docstring).

    ``max_rank`` caps the kept rank (``None``: up to ``min(m, N)``); ``delta`` is the largest
    allowed discarded norm (``None``: keep ``max_rank``). With ``delta``, the sketch grows until
    the certified norm meets it or the rank reaches the cap. Returns ``None`` when the sketch
    would cover the smaller dimension: the caller then splits exactly.
    """
    m, n_cols = a.shape
    small = min(m, n_cols)
    cap = small if max_rank is None else min(max_rank, small)
    want = cap if max_rank is not None else min(INITIAL_RANK, cap)
    a_sq = None
    passes = 0
    while True:
        k = want + oversample
        if k >= small:
            return None
        if a_sq is None:
            a_sq, passes = _sum_sq(a), 1
        q = range_basis(a, k, power_iters, generator)
        b = q.mT @ a
        passes += 2 + 2 * power_iters
        range_sq, extra = _residual_sq(a, q, b, a_sq, _sum_sq(b))
        passes += extra
        evals, v = _eig_desc(b @ b.mT)
        rotated = _rotate_inplace(b, v)
        row_sq = _row_sq(rotated)
        tails = _tails(range_sq, row_sq)
        r = _rank_for(tails, min(cap, k), delta)
        if delta is None or tails[r] <= delta * delta or want >= cap:
            return Split(q @ v[:, :r], _detach_rows(rotated, r), row_sq.sqrt(), tails[r], passes, sketch=k)
        want = min(2 * want, cap)


def gemm_rounding_slack(inner: int, columns: int, unit_roundoff: float) -> float:
    """``γ_inner · sqrt(columns)`` with ``γ_p = p u / (1 - p u)`` (Higham, *Accuracy and Stability*, §3.5).

    A product ``Qᵀ A`` with ``columns`` orthonormal columns in ``Q`` and inner dimension ``inner``
    computed in a precision with unit roundoff ``u`` has error ``||E||_F <= γ_inner ||Q||_F ||A||_F
    = γ_inner sqrt(columns) ||A||_F``; this is the factor of ``||A||_F``.
    """
    pu = inner * unit_roundoff
    if pu >= 1.0:
        return math.inf
    return pu / (1.0 - pu) * math.sqrt(columns)
