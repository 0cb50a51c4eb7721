"""TT-SVD: factor a dense matrix into an :class:`~mpo_core.mpo.MPO`.

The matrix ``W`` (``I x J``, ``I = prod(in_shape)``, ``J = prod(out_shape)``) is reshaped in
C order to ``(i1, ..., in, j1, ..., jn)``, its modes interleaved to ``(i1, j1, i2, j2, ...)``,
and split from the left by ``n - 1`` sequential SVDs (Oseledets 2011). Each split keeps the
largest singular values, so every bond is ordered by singular value and its truncation is
the best one for that split.
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from mpo_core.mpo import MPO
from mpo_core.shapes import BondSpec, bond_limits, resolve_shapes
from mpo_core.truncation import check_rel_tol, split_threshold, truncated_svd_split

__all__ = ["decompose"]

_SVD_DTYPES = {"float64": torch.float64, "input": None}


def _as_matrix(matrix: torch.Tensor | np.ndarray) -> torch.Tensor:
    if isinstance(matrix, np.ndarray):
        if not (np.issubdtype(matrix.dtype, np.floating)):
            raise TypeError(f"matrix must have a real floating dtype, got numpy {matrix.dtype}")
        matrix = torch.from_numpy(np.ascontiguousarray(matrix))
    elif not isinstance(matrix, torch.Tensor):
        raise TypeError(f"matrix must be a torch.Tensor or numpy.ndarray, got {type(matrix).__name__}")
    if not matrix.is_floating_point():
        raise TypeError(f"matrix must have a real floating dtype, got {matrix.dtype}")
    if matrix.dim() != 2:
        raise ValueError(f"matrix must be 2-D (rows, cols), got shape {tuple(matrix.shape)}")
    if matrix.numel() == 0:
        raise ValueError(f"matrix must not be empty, got shape {tuple(matrix.shape)}")
    if not bool(torch.isfinite(matrix).all()):
        raise ValueError("matrix contains NaN or Inf entries")
    return matrix


def decompose(
    matrix: torch.Tensor | np.ndarray,
    in_shape: Sequence[int] | None = None,
    out_shape: Sequence[int] | None = None,
    max_bond: BondSpec = None,
    rel_tol: float | None = None,
    *,
    n: int | None = None,
    svd_dtype: str = "float64",
) -> MPO:
    """Decompose a matrix into an MPO (tensor-train matrix) by TT-SVD.

    Parameters
    ----------
    matrix : torch.Tensor or numpy.ndarray
        Real floating matrix of shape ``(prod(in_shape), prod(out_shape))``, on CPU or CUDA.
        Row ``r`` corresponds to input modes ``unravel(r, in_shape)`` in C order.
    in_shape, out_shape : sequence of int, optional
        Mode sizes of the rows and the columns (same length ``n``). Omit them and give ``n``
        to use the balanced :func:`~mpo_core.shapes.factorize`.
    max_bond : int or list of int, optional
        Cap on every inner bond, or per bond (``n - 1`` entries, or a full ``n + 1`` ranks list).
    rel_tol : float, optional
        ``ε`` in ``[0, 1)``: the result is guaranteed to satisfy ``||W - Ŵ||_F <= ε ||W||_F``
        (each split discards at most ``ε ||W||_F / sqrt(n - 1)``). Exact when both
        ``max_bond`` and ``rel_tol`` are ``None``: bonds are then the full unfolding ranks.
    n : int, optional
        Number of cores, when shapes are not given (or to check them).
    svd_dtype : {"float64", "input"}, default "float64"
        Precision of the SVDs. Cores are returned in the input's dtype either way.

    Returns
    -------
    MPO
        Cores on the input's device (a numpy input gives CPU tensors). ``error_bound`` is
        ``sqrt(sum of squared discarded singular values)``, a guaranteed bound on
        ``||W - mpo.to_dense()||_F`` in exact arithmetic; ``norm`` is ``||W||_F``;
        ``spectra[k]`` holds all singular values at bond ``k + 1``; the cores left of the
        last are left-orthogonal (``canonical_center = n - 1``).

    Raises
    ------
    TypeError
        Non-tensor input, integer/complex/bool dtype, bad argument types.
    ValueError
        Not 2-D, NaN/Inf entries, shapes that do not match the matrix, a dimension that
        cannot be factored into ``n`` modes, ``max_bond < 1``, ``rel_tol`` outside ``[0, 1)``.

    Examples
    --------
    >>> import torch
    >>> from mpo_core import decompose
    >>> w = torch.randn(768, 768, dtype=torch.float64)
    >>> mpo = decompose(w, n=5)
    >>> mpo.in_shape, mpo.ranks
    ((4, 4, 4, 4, 3), [1, 16, 256, 144, 9, 1])
    >>> bool(torch.allclose(mpo.to_dense(), w))
    True
    """
    matrix = _as_matrix(matrix)
    in_shape, out_shape = resolve_shapes(matrix.shape[0], matrix.shape[1], in_shape, out_shape, n)
    n = len(in_shape)
    bonds = bond_limits(max_bond, n)
    check_rel_tol(rel_tol)
    if svd_dtype not in _SVD_DTYPES:
        raise ValueError(f"svd_dtype must be one of {sorted(_SVD_DTYPES)}, got {svd_dtype!r}")
    work_dtype = _SVD_DTYPES[svd_dtype] or matrix.dtype
    if work_dtype in (torch.float16, torch.bfloat16):
        work_dtype = torch.float32  # LAPACK/cuSOLVER have no half-precision SVD

    work = matrix.to(work_dtype)
    norm = float(torch.linalg.vector_norm(work))
    delta = split_threshold(rel_tol, norm, n)
    # (i1..in, j1..jn) -> (i1, j1, i2, j2, ..., in, jn), all C order
    perm = [p for k in range(n) for p in (k, n + k)]
    rest = work.reshape(*in_shape, *out_shape).permute(perm).contiguous()

    cores, spectra, discarded_sq = [], [], 0.0
    left_bond = 1
    for k in range(n - 1):
        unfolding = rest.reshape(left_bond * in_shape[k] * out_shape[k], -1)
        left, rest, s, disc = truncated_svd_split(unfolding, bonds[k], delta)
        cores.append(left.reshape(left_bond, in_shape[k], out_shape[k], left.shape[1]))
        spectra.append(s)
        discarded_sq += disc
        left_bond = left.shape[1]
    cores.append(rest.reshape(left_bond, in_shape[-1], out_shape[-1], 1))

    return MPO(
        [c.to(matrix.dtype).contiguous() for c in cores],
        in_shape,
        out_shape,
        error_bound=math.sqrt(discarded_sq),
        norm=norm,
        canonical_center=n - 1,
        spectra=spectra,
        metadata={"method": "tt-svd", "max_bond": None if max_bond is None else bonds, "rel_tol": rel_tol},
    )
