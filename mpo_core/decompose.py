"""TT-SVD: factor a dense matrix into an :class:`~mpo_core.mpo.MPO`.

The matrix ``W`` (``I x J``, ``I = prod(in_shape)``, ``J = prod(out_shape)``) is reshaped in
C order to ``(i1, ..., in, j1, ..., jn)``, its modes interleaved to ``(i1, j1, i2, j2, ...)``,
and split from the left by ``n - 1`` sequential SVDs (Oseledets 2011). Each split keeps the
largest singular values, so every bond is ordered by singular value and its truncation is
the best one for that split.

Large truncated splits use :mod:`mpo_core.randomized` (a randomized range finder, or the
small Gram matrix of a very wide unfolding) instead of a full SVD; their discarded norms are
computed, not estimated, so ``error_bound`` stays a bound. Memory: the caller's matrix plus
one working copy (in the SVD precision) written straight into the interleaved layout, which
the splits overwrite in place where they can; everything else is a fraction of it. No working
copy when the first core holds every input mode and no output mode (``in_shape[0] = rows``,
``out_shape[0] = 1``: the truncated SVD member) and that split is sketched: the sketch reads
the caller's matrix in place, column block by column block, converted to the SVD precision as
it streams (memory: the matrix plus ``O((rows + cols) * bond)``).
"""
from __future__ import annotations

import math
import warnings
from typing import Sequence

import numpy as np
import torch

from mpo_core.mpo import MPO
from mpo_core.randomized import (OVERSAMPLE, POWER_ITERS, Split, gemm_rounding_slack, orthogonality_loss, sketched_split,
                                 squared_norm, whole_range_split)
from mpo_core.shapes import BondSpec, bond_caps, bond_limits, check_int, full_ranks, resolve_shapes
from mpo_core.truncation import check_rel_tol, split_threshold, truncated_svd_split
from mpo_core.whitening import Whitening, kronecker_factors, output_error, whitening_factor

__all__ = ["decompose"]

_SVD_DTYPES = {"float64": torch.float64, "float32": torch.float32, "input": None}
_METHODS = ("auto", "exact", "randomized")
# auto: below this many entries an unfolding's LAPACK SVD is cheap and exact; not worth a sketch
AUTO_MIN_ENTRIES = 1 << 20
# auto: a sketch when the oversampled rank is at most this fraction of the smaller dimension
AUTO_SKETCH_FRACTION = 0.25



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
    step = max(1, (1 << 20) // matrix.shape[1])  # by row blocks: isfinite's temporaries stay small
    if not all(bool(torch.isfinite(matrix[i:i + step]).all()) for i in range(0, matrix.shape[0], step)):
        raise ValueError("matrix contains NaN or Inf entries")
    return matrix


def _check_seed(seed: object) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise TypeError(f"seed must be an int, got {type(seed).__name__}")
    return int(seed)


def _route(method: str, rows: int, cols: int, cap: int | None, truncating: bool, oversample: int,
           power_iters: int) -> str:
    """``"sketch"``, ``"whole"`` (Gram of the smaller side) or ``"exact"`` (LAPACK SVD) for one split.

    ``auto``: exact below ``AUTO_MIN_ENTRIES`` or without truncation; otherwise the cheaper in
    flops of the whole-range split and (when ``cap + oversample <= AUTO_SKETCH_FRACTION`` of
    the smaller side) the sketch.
    """
    if method == "exact" or not truncating:
        return "exact"
    if method == "randomized":
        return "sketch"
    if rows * cols < AUTO_MIN_ENTRIES:
        return "exact"
    small, large = min(rows, cols), max(rows, cols)
    keep = small if cap is None else min(cap, small)
    whole_flops = small * small * large + (2 if rows <= cols else 6) * small * keep * large
    if cap is not None and cap + oversample <= AUTO_SKETCH_FRACTION * small:
        # sketch, 2 per power iteration, Ritz Gram: k columns each; the projection: the kept ones
        sketch_flops = 2 * rows * cols * ((2 * power_iters + 2) * (cap + oversample) + keep)
        if sketch_flops < whole_flops:
            return "sketch"
    return "whole"


def _split(unfolding, cap, delta, route, oversample, power_iters, generator, work_dtype,
           owned: bool) -> tuple[Split, str]:
    """One split by ``route``. An unfolding not ``owned`` is the caller's matrix itself, in any dtype and
    strides: a sketch only reads it (block by block, in ``work_dtype``); any other route overwrites its
    unfolding, so it gets its own contiguous working copy first."""
    rows, cols = unfolding.shape
    if route == "sketch":
        split = sketched_split(unfolding, cap, delta, oversample=oversample, power_iters=power_iters,
                               generator=generator, dtype=work_dtype)
        if split is not None:
            return split, "sketch"
        route = "whole"  # the sketch would cover the smaller side: the Gram route is exact and cheaper
    if not owned:
        unfolding = unfolding.to(work_dtype, memory_format=torch.contiguous_format, copy=True)
    if route == "whole":
        return whole_range_split(unfolding, min(rows, cols) if cap is None else cap, delta), "whole"
    left, right, s, disc = truncated_svd_split(unfolding, cap, delta)
    return Split(left, right, s, disc, passes=None, sketch=None), "exact"


def _interleaved_copy(matrix: torch.Tensor, in_shape, out_shape, dtype: torch.dtype) -> torch.Tensor:
    """A fresh ``(i1, j1, ..., in, jn)`` C-order tensor of ``matrix`` in ``dtype``: one copy, any input strides."""
    n = len(in_shape)
    row_strides = [matrix.stride(0) * math.prod(in_shape[k + 1:]) for k in range(n)]
    col_strides = [matrix.stride(1) * math.prod(out_shape[k + 1:]) for k in range(n)]
    view = matrix.as_strided((*in_shape, *out_shape), (*row_strides, *col_strides), matrix.storage_offset())
    perm = [p for k in range(n) for p in (k, n + k)]
    work = torch.empty([view.shape[p] for p in perm], dtype=dtype, device=matrix.device)
    work.copy_(view.permute(perm))
    return work


def decompose(
    matrix: torch.Tensor | np.ndarray,
    in_shape: Sequence[int] | None = None,
    out_shape: Sequence[int] | None = None,
    max_bond: BondSpec = None,
    rel_tol: float | None = None,
    *,
    n: int | None = None,
    svd_dtype: str = "float64",
    method: str = "auto",
    seed: int = 0,
    oversample: int = OVERSAMPLE,
    power_iters: int = POWER_ITERS,
    input_cov: torch.Tensor | Whitening | None = None,
) -> MPO:
    """Decompose a matrix into an MPO (tensor-train matrix) by TT-SVD.

    Parameters
    ----------
    matrix : torch.Tensor or numpy.ndarray
        Real floating matrix of shape ``(prod(in_shape), prod(out_shape))``, on CPU or CUDA
        (all the work then runs on that device).
        Row ``r`` corresponds to input modes ``unravel(r, in_shape)`` in C order.
    in_shape, out_shape : sequence of int, optional
        Mode sizes of the rows and the columns (same length ``n``). Omit them and give ``n``
        to use the balanced :func:`~mpo_core.shapes.factorize`.
    max_bond : int or list of int, optional
        Cap on every inner bond, or per bond (``n - 1`` entries, or a full ``n + 1`` ranks list).
        A cap above what the unfolding allows (:func:`~mpo_core.shapes.full_ranks`) is clamped
        to it; clamped bonds are listed in ``metadata["clamped_bonds"]``.
    rel_tol : float, optional
        ``ε`` in ``[0, 1)``: each split discards at most ``ε ||W||_F / sqrt(n - 1)``, so
        ``||W - Ŵ||_F <= ε ||W||_F``. Exact when both ``max_bond`` and ``rel_tol`` are
        ``None``: bonds are then the full unfolding ranks. With a ``max_bond`` too small to
        meet it, the cap wins: ``metadata["rel_tol_met"]`` is then ``False`` and a
        ``RuntimeWarning`` says so (``error_bound`` is the bound actually reached).
    n : int, optional
        Number of cores, when shapes are not given (or to check them).
    svd_dtype : {"float64", "float32", "input"}, default "float64"
        Precision of the working copy and of every SVD/GEMM. Cores are returned in the input's
        dtype either way. Each split adds its rounding to ``error_bound``:
        ``(γ_{m+k} sqrt(r) + ||LᵀL - I||_2) ||W||_F`` with ``γ_p = p u / (1 - p u)``,
        ``u`` the unit roundoff of the working precision (``2^-24`` in float32, ``2^-53`` in
        float64: about ``1e-13 ||W||_F`` for a 4096-row unfolding at bond 256), ``m`` the
        unfolding's rows, ``k`` the sketch size (its smaller dimension for an exact split),
        ``r`` the kept rank and ``L`` the split's left factor (its loss of orthogonality
        measured in float64): the standard bound on the products that form the kept rows
        (Higham, §3.5), first order in ``u``. An exact decomposition's bound is therefore this
        rounding term, not 0.
    method : {"auto", "exact", "randomized"}, default "auto"
        ``"exact"``: LAPACK SVD of every unfolding. ``"randomized"``: every truncated split by
        :func:`mpo_core.randomized.sketched_split` (randomized subspace iteration with
        ``oversample`` extra columns and ``power_iters`` power iterations; an unfolding the
        sketch would cover is split exactly, from its Gram matrix when it is wide).
        ``"auto"``: a request with neither ``max_bond`` nor ``rel_tol`` is exact, and so is an
        unfolding under ``AUTO_MIN_ENTRIES`` entries; a larger one takes the cheaper (in
        flops) of :func:`mpo_core.randomized.whole_range_split` (exact subspace from the Gram
        matrix of its smaller side) and, when ``bond + oversample <= AUTO_SKETCH_FRACTION *
        min(rows, cols)``, the sketch. Every route reports a certified discarded norm
        (computed, never estimated).
    seed : int, default 0
        Seed of the sketches' Gaussian matrices (a ``torch.Generator`` on the matrix's device):
        the same seed gives the same result.
    oversample, power_iters : int
        Sketch size ``bond + oversample`` (>= 1) and power iterations (>= 0) of the randomized route.
    input_cov : torch.Tensor or Whitening, optional
        The Gram ``G = X^T X`` of the inputs ``X`` this matrix sees (``I x I``; see
        :mod:`mpo_core.whitening`), or its :class:`~mpo_core.whitening.Whitening`. The factorization
        then minimises the output error ``||X (W - Ŵ)||_F`` instead of ``||W - Ŵ||_F``: ``L^T W`` is
        decomposed (``G = L L^T``, ridge-regularised when rank-deficient) and ``L^{-T}`` absorbed
        into the cores. ``error_bound``, ``norm``, ``spectra`` and ``rel_tol`` are then in the
        whitened norm, and ``metadata["whitening"]`` says which: ``"exact"`` when the first core
        holds every input mode (``in_shape = (I, 1, ..., 1)``, e.g. the truncated SVD
        ``in_shape=(I, 1), out_shape=(1, J)``): ``error_bound >= ||X (W - Ŵ)||_F``, certified;
        ``"kronecker"`` otherwise: the bound holds for the Kronecker product of the per-mode
        Grams, and ``metadata["output_error"]`` is ``||X (W - Ŵ)||_F`` computed exactly.

    Returns
    -------
    MPO
        Cores on the input's device (a numpy input gives CPU tensors). ``error_bound`` is
        ``sqrt(sum of the splits' squared discarded norms)`` plus the splits' rounding terms
        (``metadata["rounding_bound"]``, see ``svd_dtype``), a bound on ``||W - mpo.to_dense()||_F``
        before the cores are cast to the input's dtype; ``norm`` is
        ``||W||_F``; ``spectra[k]`` holds the singular values found at bond ``k + 1``: all
        of them for an exact split, the sketch's (lower bounds) for a sketched one; the cores
        left of the last are left-orthogonal (``canonical_center = n - 1``). ``metadata``
        records, per split, the route (``"routes"``), the sketch size (``"sketch_sizes"``)
        and the passes over the unfolding (``"passes"``, ``None`` for LAPACK), plus
        ``"passes_over_matrix"``: those passes weighted by the unfolding's size relative to
        ``W`` (the first copy into the interleaved layout counts as one).

    Raises
    ------
    TypeError
        Non-tensor input, integer/complex/bool dtype, bad argument types (a non-int ``seed``).
    ValueError
        Not 2-D, NaN/Inf entries, shapes that do not match the matrix, a dimension that
        cannot be factored into ``n`` modes, ``max_bond < 1``, ``rel_tol`` outside ``[0, 1)``,
        an unknown ``method`` or ``svd_dtype``, an ``input_cov`` that is not a finite symmetric
        ``I x I`` Gram.

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
    requested = bond_limits(max_bond, n)
    check_rel_tol(rel_tol)
    if svd_dtype not in _SVD_DTYPES:
        raise ValueError(f"svd_dtype must be one of {sorted(_SVD_DTYPES)}, got {svd_dtype!r}")
    if method not in _METHODS:
        raise ValueError(f"method must be one of {list(_METHODS)}, got {method!r}")
    seed = _check_seed(seed)
    oversample = check_int("oversample", oversample, 1)
    power_iters = check_int("power_iters", power_iters, 0)
    if input_cov is not None:
        return _decompose_whitened(matrix, in_shape, out_shape, whitening_factor(input_cov), dict(
            max_bond=max_bond, rel_tol=rel_tol, svd_dtype=svd_dtype, method=method, seed=seed,
            oversample=oversample, power_iters=power_iters))
    work_dtype = _SVD_DTYPES[svd_dtype] or matrix.dtype
    if work_dtype in (torch.float16, torch.bfloat16):
        work_dtype = torch.float32  # LAPACK/cuSOLVER have no half-precision SVD

    allowed = full_ranks(in_shape, out_shape)[1:-1]
    bonds = bond_caps(in_shape, out_shape, max_bond)
    clamped = [{"bond": k + 1, "requested": cap, "allowed": a}
               for k, (cap, a) in enumerate(zip(requested, allowed)) if cap is not None and cap > a]

    # a first unfolding that is the matrix itself (in_shape[0] = rows, out_shape[0] = 1: the SVD member)
    # split by a sketch is read in place, block by block: no working copy of W at all
    borrowed = in_shape[0] == matrix.shape[0] and out_shape[0] == 1 and _route(
        method, *matrix.shape, bonds[0], bonds[0] is not None or rel_tol is not None, oversample,
        power_iters) == "sketch"
    if borrowed:
        rest, norm = None, math.sqrt(squared_norm(matrix))
    else:
        rest = _interleaved_copy(matrix, in_shape, out_shape, work_dtype)
        norm = float(torch.linalg.vector_norm(rest, dtype=torch.float64))
    delta = split_threshold(rel_tol, norm, n)
    generator = torch.Generator(device=matrix.device).manual_seed(seed)
    unit_roundoff = float(torch.finfo(work_dtype).eps) / 2

    cores, spectra, discarded_sq, rounding = [], [], 0.0, 0.0
    routes, sketches, passes, weighted_passes = [], [], [], 1.0
    left_bond = 1
    for k in range(n - 1):
        unfolding = matrix if rest is None else rest.reshape(left_bond * in_shape[k] * out_shape[k], -1)
        truncating = bonds[k] is not None or delta is not None
        route = _route(method, *unfolding.shape, bonds[k], truncating, oversample, power_iters)
        split, route = _split(unfolding, bonds[k], delta, route, oversample, power_iters, generator, work_dtype,
                              owned=rest is not None)
        left, rest = split.left, split.right
        inner = unfolding.shape[0] + (split.sketch or min(unfolding.shape))
        rounding += (gemm_rounding_slack(inner, left.shape[1], unit_roundoff) + orthogonality_loss(left)) * norm
        size = unfolding.numel()
        del unfolding
        cores.append(left.reshape(left_bond, in_shape[k], out_shape[k], left.shape[1]))
        spectra.append(split.singular_values)
        discarded_sq += split.discarded_sq
        routes.append(route)
        sketches.append(split.sketch)
        passes.append(split.passes)
        if split.passes is not None:
            weighted_passes += split.passes * size / matrix.numel()
        left_bond = left.shape[1]
    cores.append(rest.reshape(left_bond, in_shape[-1], out_shape[-1], 1))

    error_bound = math.sqrt(discarded_sq) + rounding
    rel_tol_met = None if rel_tol is None else error_bound <= rel_tol * norm * (1 + 1e-12) + 1e-300
    if rel_tol_met is False:
        cause = (f"max_bond={max_bond} caps the bonds at {bonds}" if math.sqrt(discarded_sq) > rel_tol * norm
                 else f"the {str(work_dtype).replace('torch.', '')} rounding term ({rounding / norm:.3g} relative) "
                      f"exceeds it")
        warnings.warn(f"rel_tol={rel_tol} not met: {cause}, and the certified relative error bound is "
                      f"{error_bound / norm:.4g}", RuntimeWarning, stacklevel=2)
    return MPO(
        [c.to(matrix.dtype).contiguous() for c in cores],
        in_shape,
        out_shape,
        error_bound=error_bound,
        norm=norm,
        canonical_center=n - 1,
        spectra=spectra,
        metadata={"method": "tt-svd", "max_bond": None if max_bond is None else requested, "rel_tol": rel_tol,
                  "rel_tol_met": rel_tol_met, "clamped_bonds": clamped, "routes": routes, "seed": seed,
                  "sketch_sizes": sketches, "passes": passes, "passes_over_matrix": weighted_passes,
                  "svd_dtype": str(work_dtype).replace("torch.", ""), "rounding_bound": rounding},
    )


def _mode_product(tensor: torch.Tensor, matrix: torch.Tensor, axis: int) -> torch.Tensor:
    """``matrix`` applied to ``axis`` of ``tensor`` (``out[..., a, ...] = sum_b matrix[a, b] tensor[..., b, ...]``)."""
    return torch.tensordot(matrix, tensor, dims=([1], [axis])).movedim(0, axis)


def _decompose_whitened(matrix: torch.Tensor, in_shape: tuple[int, ...], out_shape: tuple[int, ...],
                        whitening: Whitening, options: dict) -> MPO:
    """TT-SVD of the whitened ``L^T W``, with ``L^{-T}`` absorbed into the cores (see ``decompose``'s ``input_cov``)."""
    rows = matrix.shape[0]
    if tuple(whitening.factor.shape) != (rows, rows):
        raise ValueError(f"input_cov must be {rows} x {rows} (the matrix's input size), "
                         f"got {tuple(whitening.factor.shape)}")
    device = matrix.device
    w = matrix.detach().to(torch.float64)
    exact = in_shape[0] == rows
    factors = [whitening] if exact else kronecker_factors(whitening, in_shape)
    lowers = [f.factor.to(device) for f in factors]
    if exact:
        whitened = lowers[0].mT @ w
    else:
        t = w.reshape(*in_shape, -1)
        for axis, lower in enumerate(lowers):
            t = _mode_product(t, lower.mT, axis)
        whitened = t.reshape(rows, -1)
    inner = decompose(whitened, in_shape, out_shape, **options)
    cores = [c.to(torch.float64) for c in inner.cores]
    for axis, lower in enumerate(lowers):
        k = 0 if exact else axis
        core = cores[k]
        flat = core.movedim(1, 0).reshape(core.shape[1], -1)
        flat = torch.linalg.solve_triangular(lower.mT, flat, upper=True)  # L^{-T} on the input mode
        cores[k] = flat.reshape(core.shape[1], core.shape[0], *core.shape[2:]).movedim(0, 1).contiguous()
    metadata = dict(inner.metadata)
    metadata["whitening"] = "exact" if exact else "kronecker"
    metadata["whitening_ridge"] = whitening.ridge
    metadata["whitening_rank_deficient"] = whitening.rank_deficient
    metadata["error_norm"] = ("||X (W - W')||_F (input_cov = X^T X)" if exact else
                              "||(L_1 ⊗ ... ⊗ L_n)^T (W - W')||_F (Kronecker-factored input_cov)")
    result = MPO([c.to(matrix.dtype) for c in cores], in_shape, out_shape, error_bound=inner.error_bound,
                 norm=inner.norm, spectra=inner.spectra, metadata=metadata)
    if not exact:
        result.metadata["output_error"] = output_error(w, result.to_dense(), whitening.gram.to(device))
    return result
