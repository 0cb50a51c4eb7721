"""Truncated SVD splits and the threshold rule shared by decomposition and rounding.

The guarantee (Oseledets 2011, TT-SVD): if every one of the ``n - 1`` sequential splits
discards singular values of norm at most ``δ = ε ||W||_F / sqrt(n - 1)``, the result obeys
``||W - Ŵ||_F <= sqrt(sum of squared discarded singular values) <= ε ||W||_F``.
"""
from __future__ import annotations

import math

import numpy as np
import scipy.linalg
import torch

__all__ = ["check_rel_tol", "split_threshold", "robust_svd", "truncated_svd_split"]


def check_rel_tol(rel_tol: float | None) -> float | None:
    """Validate ``rel_tol``: ``None`` or a finite float in ``[0, 1)``."""
    if rel_tol is None:
        return None
    if isinstance(rel_tol, bool) or not isinstance(rel_tol, (int, float, np.floating)):
        raise TypeError(f"rel_tol must be a float, got {type(rel_tol).__name__}")
    if not (0.0 <= float(rel_tol) < 1.0):
        raise ValueError(f"rel_tol must be in [0, 1), got {rel_tol}")
    return float(rel_tol)


def split_threshold(rel_tol: float | None, norm: float, n: int) -> float | None:
    """Per-split discarded-norm threshold ``rel_tol * norm / sqrt(n - 1)`` (``None`` if no ``rel_tol``)."""
    rel_tol = check_rel_tol(rel_tol)
    if rel_tol is None or n < 2:
        return None
    return rel_tol * norm / math.sqrt(n - 1)


def robust_svd(mat: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Thin SVD ``mat = U diag(S) Vh``.

    Wide matrices are factored through their transpose and very tall ones (>= 64:1) through
    a QR first: LAPACK's divide-and-conquer driver is several times slower on those shapes,
    which are exactly the outer unfoldings of a TT-SVD. When torch's driver fails to converge,
    falls back to LAPACK ``gesvd`` (via scipy) rather than fail.
    """
    rows, cols = mat.shape
    if rows < cols:
        u, s, vh = robust_svd(mat.mT)
        return vh.mT, s, u.mT
    if rows >= 64 * cols:
        q, r = torch.linalg.qr(mat)
        u, s, vh = robust_svd(r)
        return q @ u, s, vh
    try:
        return torch.linalg.svd(mat, full_matrices=False)
    except (torch.linalg.LinAlgError, RuntimeError):
        u, s, vh = scipy.linalg.svd(
            mat.detach().cpu().numpy(), full_matrices=False, lapack_driver="gesvd", check_finite=False
        )
        return tuple(torch.from_numpy(np.ascontiguousarray(a)).to(mat.device) for a in (u, s, vh))


def truncated_svd_split(
    mat: torch.Tensor, max_bond: int | None, delta: float | None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Split ``mat ≈ left @ right`` by a truncated SVD.

    Keeps the smallest rank ``r`` whose discarded singular values have norm ``<= delta``
    (all of them when ``delta`` is ``None``), capped at ``max_bond``, and at least 1.
    ``left = U[:, :r]`` has orthonormal columns; ``right = diag(S[:r]) Vh[:r]``.

    Returns
    -------
    left, right, singular_values, discarded_sq
        ``singular_values`` are all of them (kept and discarded); ``discarded_sq`` is the
        sum of the squared discarded ones, as a Python float.
    """
    u, s, vh = robust_svd(mat)
    rank = s.shape[0]
    if delta is not None:
        # tail[r] = sum_{l >= r} s_l^2; keep the smallest r with tail[r] <= delta^2
        tail = torch.flip(torch.cumsum(torch.flip(s.double() ** 2, [0]), 0), [0])
        tail = torch.cat([tail, tail.new_zeros(1)])
        rank = int(torch.nonzero(tail <= delta * delta)[0, 0])
    if max_bond is not None:
        rank = min(rank, max_bond)
    rank = max(rank, 1)
    discarded_sq = float((s[rank:].double() ** 2).sum())
    return u[:, :rank], s[:rank, None] * vh[:rank], s, discarded_sq
