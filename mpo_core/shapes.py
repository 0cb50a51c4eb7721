"""The vocabulary of MPO shapes and ranks: mode factorizations, bonds, core sizes, int checks.

Ranks are ``[1, d_1, ..., d_{n-1}, 1]`` (``n + 1`` entries, boundaries 1). A bond cap
(``max_bond``) is ``None`` (no cap), an int (every inner bond), or a per-bond list (the
``n - 1`` inner bonds, or all ``n + 1`` ranks with boundary 1s).

All reshapes in mpo-core are C (row-major) order: a row index ``r`` of a matrix with
``in_shape = (i1, ..., in)`` is ``r = ravel_multi_index((a1, ..., an), in_shape)``,
so ``a1`` is the slowest-varying mode and ``an`` the fastest.
"""
from __future__ import annotations

import math
import operator
from functools import lru_cache
from typing import Sequence, Union

import torch

__all__ = ["BondSpec", "bond_caps", "bond_limits", "bond_list", "capped_ranks", "check_int", "consistent_ranks", "core_params", "factorize",
           "full_ranks", "placement_order", "resolve_shapes"]

BondSpec = Union[int, Sequence[int], None]
"""A bond cap: ``None``, an int, or a per-bond list (see the module docstring)."""


def check_int(name: str, value: object, minimum: int = 1) -> int:
    """Return ``value`` as an int >= ``minimum``; ``TypeError`` for non-ints (bools included), else ``ValueError``."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int, got bool")
    try:
        value = operator.index(value)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {type(value).__name__}") from None
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return value


def _factor_multisets(dim: int, n: int, min_factor: int, start: int):
    """Yield non-decreasing tuples of ``n`` factors >= start whose product is ``dim``."""
    if n == 1:
        if dim >= start:
            yield (dim,)
        return
    f = start
    while f ** n <= dim:
        if dim % f == 0:
            for rest in _factor_multisets(dim // f, n - 1, min_factor, f):
                yield (f,) + rest
        f += 1


def placement_order(n: int) -> list[int]:
    """Positions filled by factors in descending size: centre, centre+1, centre-1, centre-2, centre+2, ...

    The largest factor goes to the central mode (index ``n // 2``); this order reproduces
    the published MPOBERT shapes (768 -> (4, 4, 4, 4, 3), 3072 -> (4, 4, 8, 6, 4),
    4096 -> (4, 4, 8, 8, 4)).
    """
    c = n // 2
    order = [c]
    for d in range(1, n):
        for pos in ((c + d, c - d) if d % 2 else (c - d, c + d)):
            if 0 <= pos < n:
                order.append(pos)
    return order


def factorize(dim: int, n: int, min_factor: int = 2) -> tuple[int, ...]:
    """Split ``dim`` into ``n`` balanced integer factors, the central one largest.

    Parameters
    ----------
    dim : int
        The dimension to factor (>= 1).
    n : int
        Number of factors (>= 1).
    min_factor : int, default 2
        Smallest factor allowed. With the default, a dimension that has no factorization
        into ``n`` factors >= 2 (e.g. a prime with ``n > 1``) is an error rather than a
        silent ``(1, ..., dim, ..., 1)``; pass ``min_factor=1`` to allow unit modes.

    Returns
    -------
    tuple of int
        The most square-like factorization (smallest variance of log-factors, then
        smallest maximum factor), arranged by :func:`placement_order`. Its product is ``dim``.

    Raises
    ------
    ValueError
        If no factorization into ``n`` factors >= ``min_factor`` exists.

    Examples
    --------
    >>> factorize(768, 5), factorize(3072, 5), factorize(4096, 5)
    ((4, 4, 4, 4, 3), (4, 4, 8, 6, 4), (4, 4, 8, 8, 4))
    """
    return _balanced_factors(check_int("dim", dim), check_int("n", n), check_int("min_factor", min_factor))


@lru_cache(maxsize=4096)
def _balanced_factors(dim: int, n: int, min_factor: int) -> tuple[int, ...]:
    """:func:`factorize` on checked ints (cached after the checks, so ``8.0`` never hits ``8``'s entry)."""
    best: tuple[float, int, tuple[int, ...]] | None = None
    mean_log = math.log(dim) / n
    for factors in _factor_multisets(dim, n, min_factor, min_factor):
        score = sum((math.log(f) - mean_log) ** 2 for f in factors)
        key = (round(score, 12), max(factors), factors)
        if best is None or key < best:
            best = key
    if best is None:
        raise ValueError(
            f"dim={dim} cannot be factored into n={n} factors >= {min_factor}; "
            f"choose another n, pass explicit shapes, or min_factor=1"
        )
    shape = [0] * n
    for pos, f in zip(placement_order(n), sorted(best[2], reverse=True)):
        shape[pos] = f
    return tuple(shape)


def _as_shape(shape: Sequence[int], name: str) -> tuple[int, ...]:
    if isinstance(shape, (str, bytes)) or not isinstance(shape, Sequence):
        raise TypeError(f"{name} must be a sequence of ints, got {type(shape).__name__}")
    if len(shape) == 0:
        raise ValueError(f"{name} must have at least one mode")
    return tuple(check_int(f"{name}[{k}]", s) for k, s in enumerate(shape))


def resolve_shapes(
    rows: int,
    cols: int,
    in_shape: Sequence[int] | None = None,
    out_shape: Sequence[int] | None = None,
    n: int | None = None,
) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Return validated ``(in_shape, out_shape)`` for a ``rows x cols`` matrix.

    Either give both shapes explicitly (their products must be ``rows`` and ``cols`` and
    their lengths equal), or give ``n`` and let :func:`factorize` choose; a given shape
    plus ``n`` must agree in length. A missing shape is factorized with the other's length.
    """
    if n is not None:
        check_int("n", n)
    shapes = {}
    for name, shape, dim in (("in_shape", in_shape, rows), ("out_shape", out_shape, cols)):
        if shape is None:
            continue
        shape = _as_shape(shape, name)
        if math.prod(shape) != dim:
            raise ValueError(f"{name}={shape} has product {math.prod(shape)}, expected {dim}")
        if n is not None and len(shape) != n:
            raise ValueError(f"{name}={shape} has {len(shape)} modes but n={n}")
        shapes[name] = shape
    if len(shapes) == 2 and len(shapes["in_shape"]) != len(shapes["out_shape"]):
        raise ValueError(
            f"in_shape={shapes['in_shape']} and out_shape={shapes['out_shape']} must have the same number of modes"
        )
    if n is None:
        if not shapes:
            raise ValueError("give in_shape and out_shape, or n (the number of cores)")
        n = len(next(iter(shapes.values())))
    in_s = shapes.get("in_shape") or factorize(rows, n)
    out_s = shapes.get("out_shape") or factorize(cols, n)
    return in_s, out_s


def full_ranks(in_shape: Sequence[int], out_shape: Sequence[int]) -> list[int]:
    """Bonds of an exact MPO: ``d_k = min(prod_{l<k} i_l j_l, prod_{l>=k} i_l j_l)``, boundaries 1."""
    modes = [i * j for i, j in zip(in_shape, out_shape)]
    return [1] + [min(math.prod(modes[:k]), math.prod(modes[k:])) for k in range(1, len(modes))] + [1]


def bond_list(values: Sequence[int], n: int, name: str = "ranks") -> list[int]:
    """The full ranks list ``[1, d_1, ..., d_{n-1}, 1]`` from a per-bond spec.

    ``values`` lists either the ``n - 1`` inner bonds or all ``n + 1`` ranks (whose two
    boundary entries must be 1); every entry must be an int >= 1.
    """
    if isinstance(values, (str, bytes)) or not isinstance(values, (Sequence, torch.Tensor)):
        raise TypeError(f"{name} must be an int or a list of ints, got {type(values).__name__}")
    values = list(values)
    if len(values) == n - 1:
        values = [1, *values, 1]
    elif len(values) != n + 1:
        raise ValueError(
            f"{name} must be the n-1={n - 1} inner bonds or all n+1={n + 1} ranks [1, d_1, ..., d_{n - 1}, 1], "
            f"got {len(values)} entries"
        )
    values = [check_int(f"{name}[{k}]", v) for k, v in enumerate(values)]
    if values[0] != 1 or values[-1] != 1:
        raise ValueError(f"a full {name} list must start and end with 1, got {values}")
    return values


def bond_limits(max_bond: BondSpec, n: int) -> list[int | None]:
    """Per-bond caps for the ``n - 1`` inner bonds from ``max_bond`` (``None`` entries: no cap)."""
    if max_bond is None:
        return [None] * (n - 1)
    if isinstance(max_bond, (Sequence, torch.Tensor)):  # str is a Sequence: bond_list rejects it
        return bond_list(max_bond, n, "max_bond")[1:-1]
    return [check_int("max_bond", max_bond)] * (n - 1)


def bond_caps(in_shape: Sequence[int], out_shape: Sequence[int], max_bond: BondSpec = None) -> list[int | None]:
    """The caps a TT-SVD applies to the ``n - 1`` inner bonds: each cap of ``max_bond`` clamped to the
    bond's :func:`full_ranks` entry (``None``: no cap). The one rank-clamping rule; :func:`capped_ranks`
    adds what the sweep itself implies."""
    allowed = full_ranks(in_shape, out_shape)[1:-1]
    return [None if cap is None else min(cap, a) for cap, a in zip(bond_limits(max_bond, len(in_shape)), allowed)]


def capped_ranks(in_shape: Sequence[int], out_shape: Sequence[int], max_bond: BondSpec = None) -> list[int]:
    """The ranks a left-to-right TT-SVD with ``max_bond`` gives a generic matrix: bond ``k`` is the
    smallest of its :func:`bond_caps` entry, its full rank and ``d_{k-1} i_k j_k`` (the rows of its
    unfolding once the bond to its left is cut). With an int or no cap this is :func:`full_ranks` capped."""
    full = full_ranks(in_shape, out_shape)
    ranks = [1]
    for k, (f, cap) in enumerate(zip(full[1:-1], bond_caps(in_shape, out_shape, max_bond))):
        ranks.append(min(f if cap is None else cap, ranks[-1] * in_shape[k] * out_shape[k]))
    return ranks + [1]


def consistent_ranks(ranks: Sequence[int], in_shape: Sequence[int], out_shape: Sequence[int]) -> list[int]:
    """Shrink requested bonds to the smallest consistent ones (an allocation's rank vector); :func:`capped_ranks`
    is what a TT-SVD with caps produces.

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


def core_params(in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int]) -> int:
    """Number of core entries of an MPO with these modes and bonds ``ranks = [1, d_1, ..., d_{n-1}, 1]``."""
    return sum(ranks[k] * i * j * ranks[k + 1] for k, (i, j) in enumerate(zip(in_shape, out_shape)))
