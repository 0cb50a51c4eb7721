"""The per-layer auxiliary fit of a conversion: auxiliary cores that reproduce a layer's own weight
around a fixed (shared) central core, by alternating least squares on ``W ≈ P · C · Q``.

The chains ``P`` and ``Q`` are contracted by :func:`mpo_core.rebuild.rebuild` (interleaved modes) and
split back into cores by :func:`mpo_core.truncation.truncated_svd_split`.
"""
from __future__ import annotations

import math

import torch

from mpo_core.rebuild import rebuild
from mpo_core.truncation import truncated_svd_split

__all__ = ["fit_auxiliaries", "ALS_SWEEPS"]

ALS_SWEEPS = 4
"""Alternating least-squares sweeps of :func:`fit_auxiliaries`."""


def _merge(cores: list[torch.Tensor]) -> torch.Tensor:
    """Consecutive cores contracted into ``(d_left, prod(i_k j_k), d_right)`` (interleaved modes, C order)."""
    return rebuild(cores, interleaved=True)


def _split(block: torch.Tensor, templates: list[torch.Tensor], from_left: bool) -> list[torch.Tensor]:
    """Split ``(d_left, prod modes, d_right)`` into cores shaped like ``templates`` by sequential SVDs
    (truncated to the template bonds; the fixed outer bond is the central's)."""
    cores = []
    if from_left:
        rest, left = block, block.shape[0]
        for t in templates[:-1]:
            d0, i, j, d1 = t.shape
            u, rest, _, _ = truncated_svd_split(rest.reshape(left * i * j, -1), d1, None)
            cores.append(u.reshape(d0, i, j, d1))
            left = d1
        cores.append(rest.reshape(templates[-1].shape))
        return cores
    flipped = [t.permute(3, 1, 2, 0) for t in reversed(templates)]
    out = _split(_reverse_block(block, templates), flipped, from_left=True)
    return [c.permute(3, 1, 2, 0) for c in reversed(out)]


def _reverse_block(block: torch.Tensor, templates: list[torch.Tensor]) -> torch.Tensor:
    """Reverse the mode order of a ``(d_left, modes, d_right)`` block: ``(d_right, reversed modes, d_left)``."""
    sizes = [t.shape[1] * t.shape[2] for t in templates]
    t = block.reshape(block.shape[0], *[x for t in templates for x in (t.shape[1], t.shape[2])], block.shape[-1])
    n = len(templates)
    perm = [2 * n + 1] + [p for k in reversed(range(n)) for p in (1 + 2 * k, 2 + 2 * k)] + [0]
    return t.permute(perm).reshape(block.shape[-1], math.prod(sizes), block.shape[0])


def fit_auxiliaries(weight: torch.Tensor, cores: list[torch.Tensor], center: int,
                    sweeps: int = ALS_SWEEPS) -> tuple[list[torch.Tensor], float]:
    """Auxiliary cores approximating ``weight`` with the central core ``cores[center]`` held fixed.

    Writes ``W ≈ P · C · Q`` (``P`` the merged left cores, ``Q`` the merged right ones), starts
    from ``cores`` and alternates exact least-squares updates of ``P`` and ``Q`` (each never
    increases the error), then splits ``P`` and ``Q`` back into cores of the same shapes by SVD.

    Returns
    -------
    (list of torch.Tensor, float)
        The cores (central unchanged, float64) and ``||W - W_mpo||_F / ||W||_F``.
    """
    cores = [c.to(torch.float64) for c in cores]
    in_shape = [c.shape[1] for c in cores]
    out_shape = [c.shape[2] for c in cores]
    n = len(cores)
    perm = [p for k in range(n) for p in (k, n + k)]
    target = weight.to(torch.float64).reshape(*in_shape, *out_shape).permute(perm)
    central = cores[center]
    a, m, b = central.shape[0], central.shape[1] * central.shape[2], central.shape[3]
    c3 = central.reshape(a, m, b)
    left = _merge(cores[:center])[0] if center > 0 else torch.ones(1, 1, dtype=torch.float64)  # (P, a)
    right = _merge(cores[center + 1:])[..., 0] if center < n - 1 else torch.ones(1, 1, dtype=torch.float64)  # (b, Q)
    p_size, q_size = left.shape[0], right.shape[1]
    t3 = target.reshape(p_size, m, q_size)
    for _ in range(sweeps):
        if center > 0:
            ml = torch.einsum("amb,bq->amq", c3, right).reshape(a, m * q_size)
            left = torch.linalg.lstsq(ml.T, t3.reshape(p_size, -1).T).solution.T
        if center < n - 1:
            mr = torch.einsum("pa,amb->pmb", left, c3).reshape(p_size * m, b)
            right = torch.linalg.lstsq(mr, t3.reshape(p_size * m, q_size)).solution
    new = list(cores)
    if center > 0:
        new[:center] = _split(left.reshape(1, p_size, a), cores[:center], from_left=True)
    if center < n - 1:
        new[center + 1:] = _split(right.reshape(b, q_size, 1), cores[center + 1:], from_left=False)
    approx = torch.einsum("pa,amb,bq->pmq", _merge(new[:center])[0] if center > 0 else left,
                          c3, _merge(new[center + 1:])[..., 0] if center < n - 1 else right)
    err = float(torch.linalg.vector_norm(approx - t3) / torch.linalg.vector_norm(t3).clamp_min(1e-300))
    return new, err
