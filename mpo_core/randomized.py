"""Truncated splits without a full SVD, with a certified discarded norm, for TT-SVD at LLM scale.

A split factors an unfolding ``A`` (``m x N``) as ``A ≈ left @ right`` with ``left`` having
orthonormal columns and ``right = leftᵀ A``. Two routes find ``left``:

* :func:`sketched_split`, **randomized subspace iteration** (Halko, Martinsson & Tropp 2011,
  Alg. 4.4): ``Y = A Ω`` with a Gaussian ``Ω`` of ``k = rank + oversample`` columns (drawn
  block by block from a seeded generator), then ``power_iters`` rounds of ``Y ← A (Aᵀ Q)``
  with ``Q = orth(Y)``; then Rayleigh-Ritz: the eigenvectors ``V`` of ``Qᵀ A Aᵀ Q`` (``k x k``)
  order the basis and ``left = Q V_r``.
* :func:`whole_range_split`, for a lopsided unfolding: the eigenvectors of the Gram matrix of
  its smaller side (``A Aᵀ`` or ``Aᵀ A``) give the exact dominant subspace at about one GEMM
  pass; nothing truncated on a wide ``A``, the rotation ``Vᵀ A`` is done in place.

Every product with ``A`` streams it in column blocks, so the extra memory of a split is
``right`` plus ``O((m + N) k)``, never a second copy of ``A``; a sketched split also reads an
``A`` stored in a lower precision than its working one (``dtype=``), block by block, and never
writes it.

**Certified discarded norm.** With ``left`` orthonormal, ``||A - left right||_F² = ||A||_F² -
||right||_F²``. When that difference is at least ``CANCELLATION_GUARD`` of ``||A||²`` it is
accurate; below, the subtraction would lose most of its digits, so it is recomputed directly
as ``||A - left right||_F²`` in column blocks (one more pass). It is a bound on the split's
error that needs no probabilistic argument: the randomness only affects how small it is. The
rank is first chosen from the Ritz/Gram eigenvalues; with a threshold ``delta`` it grows while
the certified norm misses it, and the sketch doubles (from ``INITIAL_RANK`` when no rank is
given) when its ``k`` directions are not enough.

Passes over ``A`` (reported in :class:`Split`): a sketched split costs ``4 + 2 * power_iters``
(squared norm, sketch, two per power iteration, the Ritz Gram ``Qᵀ A``, the projection
``leftᵀ A``); a whole-range split two when wide (Gram, projection or in-place rotation) and
three when tall (Gram, ``A V_r``, projection); ``+1`` wherever the direct residual is needed.
Orthonormalizations use CholeskyQR2 (BLAS-3, in place) with a Householder fallback.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch

__all__ = ["Split", "sketched_split", "whole_range_split", "range_basis", "orthonormalize_", "gemm_rounding_slack",
           "orthogonality_loss", "squared_norm"]

OVERSAMPLE = 10
POWER_ITERS = 1
INITIAL_RANK = 32
CANCELLATION_GUARD = 1e-6
_CHOLQR_COND_LIMIT = 10.0  # second CholeskyQR round this well conditioned: output orthonormal to ~eps
_BLOCK_ELEMENTS = 1 << 20  # entries per streamed block of A: 8 MiB of float64


@dataclass
class Split:
    """One split ``A ≈ left @ right``.

    ``singular_values``: the leading singular values found (square roots of the Gram
    eigenvalues for a whole-range split, all ``min(m, N)``; the ``k`` Ritz values of a sketched
    one, each a lower bound of the corresponding singular value of ``A``). ``discarded_sq``:
    the certified ``||A - left right||_F²``. ``passes``: passes over ``A`` (``None``: LAPACK).
    ``sketch``: the sketch size ``k`` (``None`` when no sketch was drawn).
    """

    left: torch.Tensor
    right: torch.Tensor
    singular_values: torch.Tensor
    discarded_sq: float
    passes: int | None
    sketch: int | None


def _column_blocks(a: torch.Tensor, width: int = 0):
    """Column slices of ``a`` holding about ``_BLOCK_ELEMENTS`` entries (of ``a`` and of a ``width``-row product)."""
    step = max(1, min(a.shape[1], _BLOCK_ELEMENTS // max(a.shape[0], width, 1)))
    return [slice(j, j + step) for j in range(0, a.shape[1], step)]


def squared_norm(x: torch.Tensor) -> float:
    """``||x||_F²`` accumulated in float64 (block by block for lower precisions: no float64 copy)."""
    if x.dtype == torch.float64:
        return float(torch.linalg.vector_norm(x)) ** 2
    x = x.reshape(x.shape[0], -1)
    return sum(float(torch.linalg.vector_norm(chunk)) ** 2 for _, chunk in _blocks(x, torch.float64))


def _blocks(a: torch.Tensor, dtype: torch.dtype, width: int = 0):
    """``(columns, a[:, columns] in dtype)`` for :func:`_column_blocks`: views when ``a`` is stored in ``dtype``,
    else copies into one buffer reused for every block (valid until the next block is drawn), laid out as the
    blocks are (a transposed weight's blocks stay transposed: the conversion is a plain copy, BLAS takes either)."""
    blocks = _column_blocks(a, width)
    buffer = None if a.dtype == dtype else torch.empty_like(a[:, blocks[0]], dtype=dtype)
    for blk in blocks:
        chunk = a[:, blk]
        if buffer is not None:
            chunk = buffer[:, :chunk.shape[1]].copy_(chunk)
        yield blk, chunk


def orthonormalize_(y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(Q, R)`` with ``y = Q R``, ``Q`` orthonormal, for a tall ``y`` (full column rank expected).

    CholeskyQR2 (two rounds of ``Y ← Y chol(YᵀY)⁻ᵀ``, by row blocks in ``y``'s own storage;
    Fukaya et al. 2014) when the second round's factor is well conditioned (``Q`` is then
    orthonormal to working precision); otherwise Householder QR (a new tensor).
    """
    r = None
    for _ in range(2):
        chol, info = torch.linalg.cholesky_ex(y.mT @ y)
        if int(info) != 0:
            break
        inv_t = torch.linalg.solve_triangular(chol, torch.eye(chol.shape[0], dtype=y.dtype, device=y.device),
                                              upper=False).mT
        step = max(1, _BLOCK_ELEMENTS // max(y.shape[1], 1))
        for i in range(0, y.shape[0], step):
            y[i:i + step] = y[i:i + step] @ inv_t
        r = chol.mT if r is None else chol.mT @ r
    else:
        if float(torch.linalg.cond(chol)) <= _CHOLQR_COND_LIMIT:
            return y, r
    q, r2 = torch.linalg.qr(y)
    return q, r2 if r is None else r2 @ r


def range_basis(a: torch.Tensor, k: int, power_iters: int, generator: torch.Generator,
                dtype: torch.dtype | None = None) -> torch.Tensor:
    """Orthonormal ``m x k`` basis of the dominant range of ``a`` (randomized subspace iteration, streamed).

    ``dtype``: the working precision (default ``a``'s); each column block of ``a`` is converted to it as read.
    """
    dtype = dtype or a.dtype
    y = a.new_zeros(a.shape[0], k, dtype=dtype)
    for _, chunk in _blocks(a, dtype, k):
        omega = torch.randn(chunk.shape[1], k, generator=generator, dtype=dtype, device=a.device)
        y.addmm_(chunk, omega)
    for _ in range(power_iters):
        q = orthonormalize_(y)[0]
        y = a.new_zeros(a.shape[0], k, dtype=dtype)
        for _, chunk in _blocks(a, dtype, k):
            y.addmm_(chunk, chunk.mT @ q)
    return orthonormalize_(y)[0]


def _project(a: torch.Tensor, left: torch.Tensor, a_sq: float) -> tuple[torch.Tensor, float, int]:
    """``right = leftᵀ a``, its certified ``||a - left right||_F²``, and the passes that cost.

    ``a`` stored in another precision than ``left``'s is converted block by block.
    """
    if a.dtype == left.dtype:
        right = left.mT @ a
    else:
        right = left.new_empty(left.shape[1], a.shape[1])
        for blk, chunk in _blocks(a, left.dtype, left.shape[1]):
            right[:, blk] = left.mT @ chunk
    diff = a_sq - squared_norm(right)
    if diff >= CANCELLATION_GUARD * a_sq:
        return right, diff, 1
    direct = sum(squared_norm(torch.addmm(chunk, left, right[:, blk], alpha=-1)) for blk, chunk in _blocks(a, left.dtype))
    return right, direct, 2


def _eig_desc(gram: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Eigenvalues (clamped at 0, float64) and eigenvectors of a symmetric PSD ``gram``, largest first."""
    evals, v = torch.linalg.eigh(gram)
    return evals.flip(-1).double().clamp_min(0), v.flip(-1)


def _rank_for(evals: torch.Tensor, base_sq: float, cap: int, delta: float | None) -> int:
    """Smallest ``r`` in ``[1, cap]`` with ``base_sq + sum(evals[r:]) <= delta²`` (``cap`` without ``delta``)."""
    if delta is None:
        return cap
    tails = torch.flip(torch.cumsum(torch.flip(evals, [0]), 0), [0]).tolist() + [0.0]
    for r in range(1, cap + 1):
        if base_sq + tails[min(r, len(tails) - 1)] <= delta * delta:
            return r
    return cap


def _certify(a, basis: Callable[[int], torch.Tensor], r: int, cap: int, delta, a_sq, passes):
    """Project on ``basis(r)``; while ``delta`` is missed and ``r < cap``, grow ``r`` by an eighth."""
    while True:
        left = basis(r)
        right, disc, extra = _project(a, left, a_sq)
        passes += extra
        if delta is None or disc <= delta * delta or r >= cap:
            return left, right, disc, passes
        r = min(cap, r + max(1, r // 8))


def whole_range_split(a: torch.Tensor, max_bond: int, delta: float | None) -> Split:
    """Exact split of a lopsided ``a`` from the Gram matrix of its smaller side; may **overwrite** ``a``.

    The eigenvectors ``V`` of ``a aᵀ`` (wide) or ``aᵀ a`` (tall) span the dominant subspace;
    the rank is the smallest ``<= max_bond`` whose eigenvalue tail meets ``delta``, grown while
    the certified norm does not. Wide with nothing truncated: ``a ← Vᵀ a`` in place, discarded
    norm 0; tall with nothing truncated: ``a ← orth(a V)`` in place, ``right = R Vᵀ``, discarded
    norm 0. Otherwise ``left = V_r`` (wide) or ``orthonormalize_(a V_r)`` (tall). The
    ``singular_values`` are inaccurate below ``sqrt(eps)`` times the largest.
    """
    rows, cols = a.shape
    wide = rows <= cols
    evals, v = _eig_desc(a @ a.mT if wide else a.mT @ a)
    a_sq = float(evals.sum())
    cap = max(1, min(max_bond, rows, cols))
    r = _rank_for(evals, 0.0, cap, delta)
    if wide and r == rows:
        vt = v.mT.contiguous()
        for blk in _column_blocks(a):
            a[:, blk] = vt @ a[:, blk]
        return Split(v, a, evals.sqrt(), 0.0, passes=2, sketch=None)
    if not wide and r == cols:  # left = orth(a V) in a's storage, right = R Vᵀ: no copy of a
        step = max(1, _BLOCK_ELEMENTS // cols)
        for i in range(0, rows, step):
            a[i:i + step] = a[i:i + step] @ v
        left, tri = orthonormalize_(a)
        return Split(left, tri @ v.mT, evals.sqrt(), 0.0, passes=3, sketch=None)
    basis = (lambda q: v[:, :q].contiguous()) if wide else (lambda q: orthonormalize_(a @ v[:, :q])[0])
    left, right, disc, passes = _certify(a, basis, r, cap, delta, a_sq, 1 if wide else 2)
    return Split(left, right, evals.sqrt(), disc, passes=passes, sketch=None)


def sketched_split(
    a: torch.Tensor,
    max_bond: int | None,
    delta: float | None,
    *,
    oversample: int = OVERSAMPLE,
    power_iters: int = POWER_ITERS,
    generator: torch.Generator,
    dtype: torch.dtype | None = None,
) -> Split | None:
    """Randomized split of ``a`` with a certified discarded norm (see the module docstring).

    ``max_bond`` caps the kept rank (``None``: up to ``min(m, N)``); ``delta`` is the largest
    allowed discarded norm (``None``: keep ``max_bond``). With ``delta``, the rank grows until
    the certified norm meets it or reaches the cap. Returns ``None`` when the sketch would
    cover the smaller dimension: the caller then splits exactly (:func:`whole_range_split`).
    ``dtype`` is the working precision (default ``a``'s): an ``a`` stored in a lower one (a float32
    weight split in float64) is read block by block, converted as it streams, never copied whole;
    ``a`` is only read.
    """
    dtype = dtype or a.dtype
    small = min(a.shape)
    cap = small if max_bond is None else min(max_bond, small)
    want = cap if max_bond is not None else min(INITIAL_RANK, cap)
    a_sq, passes = None, 0
    while True:
        k = want + oversample
        if k >= small:
            return None
        if a_sq is None:
            a_sq, passes = squared_norm(a), 1
        q = range_basis(a, k, power_iters, generator, dtype)
        ritz = q.new_zeros(k, k)
        for _, chunk in _blocks(a, dtype, k):
            b = q.mT @ chunk
            ritz.addmm_(b, b.mT)
        evals, v = _eig_desc(ritz)
        passes += 2 + 2 * power_iters
        range_sq = max(a_sq - float(evals.sum()), 0.0)  # estimate for the rank choice only; certified below
        kept_cap = min(cap, k)
        r = _rank_for(evals, range_sq, kept_cap, delta)
        left, right, disc, passes = _certify(a, lambda q_: q @ v[:, :q_], r, kept_cap, delta, a_sq, passes)
        if delta is None or disc <= delta * delta or want >= cap:
            return Split(left, right, evals.sqrt(), disc, passes, sketch=k)
        want = min(2 * want, cap)


def orthogonality_loss(q: torch.Tensor) -> float:
    """``||QᵀQ - I||_2`` of a factor ``Q`` meant to have orthonormal columns, measured in float64."""
    gram = q.double().mT @ q.double()
    return float(torch.linalg.matrix_norm(gram - torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device), ord=2))


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
