"""Apply an MPO to inputs: ``y = x @ W (+ bias)`` without (or with) rebuilding ``W``.

Strategies
----------
``dense``
    Rebuild ``W`` from the cores in the cheapest merge order, then one GEMM (``addmm`` with bias).
``sequential``
    Contract ``x`` through the cores one at a time in a chosen order (any order that grows a
    contiguous segment: left-to-right ``ltr``, right-to-left ``rtl``, middle first ``mid``, ...);
    ``W`` is never formed and the activation is never permuted (see
    :mod:`mpo_core.contract.sequential`).
``fused``
    The fused Triton kernel ``mpo_core.ops.mpo_linear.mpo_linear`` (CUDA, compute capability >= 8.0).
``auto``
    The candidate with the smallest modelled time (a roofline model per strategy and order, see
    :func:`explain`); the plan is cached per (shapes, ranks, power-of-two token bucket, device
    type, dtype).

An MPO layer decides each call between a step ``W``, a cached ``W`` and this plan in one place,
:mod:`mpo_core.contract.route`; ``explain(x, layer)`` shows that decision.

All reshapes are C (row-major) order: ``x[..., ravel((i1..in), in_shape)]``.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch

from mpo_core.activation import apply_activation
from mpo_core.contract import fused
from mpo_core.contract.plan import STRATEGIES, Candidate, Plan, make_plan
from mpo_core.contract.resolve import OrderSpec, check_strategy, cores_of, resolve
from mpo_core.contract.route import ROUTES, Route, choose_route, explain_route
from mpo_core.contract.sequential import run_sequential
from mpo_core.mpo import MPO
from mpo_core.rebuild import dense_matrix

__all__ = ["ROUTES", "STRATEGIES", "Candidate", "Plan", "Route", "check_strategy", "choose_route", "clear_plan_cache",
           "contract", "dense_weight", "explain", "explain_route"]

def contract(
    x: torch.Tensor,
    mpo_or_cores: MPO | Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
    strategy: str = "auto",
    activation: str | None = None,
    order: OrderSpec = None,
) -> torch.Tensor:
    """Compute ``activation(x @ W + bias)`` for the matrix ``W`` an MPO represents.

    Parameters
    ----------
    x : torch.Tensor
        Shape ``(..., prod(in_shape))``, same dtype and device as the cores (under
        ``torch.autocast`` the dtypes may differ).
    mpo_or_cores : MPO or list of torch.Tensor
        Core ``k`` of shape ``(d_{k-1}, in_shape[k], out_shape[k], d_k)``, ``d_0 = d_n = 1``.
    bias : torch.Tensor, optional
        Shape ``(prod(out_shape),)``.
    strategy : {"auto", "dense", "sequential", "fused"}
        See the module docstring; ``auto`` picks the cheapest by the cost model.
    activation : {None, "gelu", "gelu_tanh"}
        Applied after the bias.
    order : {"ltr", "rtl", "mid"} or sequence of int, optional
        Force the core order of ``strategy="sequential"``.

    Returns
    -------
    torch.Tensor
        Shape ``(..., prod(out_shape))``. Differentiable with respect to ``x``, every core and ``bias``.

    Raises
    ------
    TypeError
        Wrong argument types, or a dtype mismatch between ``x``, the cores and ``bias`` outside autocast.
    ValueError
        ``x.shape[-1] != prod(in_shape)``, device mismatch, bad bias shape, unknown strategy/activation/order.
    mpo_core.ops.BackendUnavailableError
        ``strategy="fused"`` where the fused op cannot run (a ``RuntimeError``; the message says why).
    """
    cores, plan = resolve(x, mpo_or_cores, bias, strategy, activation, order)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    chosen = plan.chosen
    if chosen.strategy == "fused":
        return fused.run_fused(x2d, cores, bias, activation).reshape(*lead, _out_features(cores))
    if chosen.strategy == "dense":
        w = dense_matrix(cores, chosen.order)
        y = x2d @ w if bias is None else torch.addmm(bias, x2d, w)
    else:
        y = run_sequential(x2d, cores, chosen.steps)
        if bias is not None:
            y = y + bias.to(y.dtype)  # under autocast y is in the autocast dtype: no promotion back
    return apply_activation(y, activation).reshape(*lead, _out_features(cores))


def _out_features(cores: Sequence[torch.Tensor]) -> int:
    """``prod(out_shape)`` of a list of cores."""
    return math.prod(c.shape[2] for c in cores)


def explain(
    x: torch.Tensor | int,
    mpo_or_cores: MPO | Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
    strategy: str = "auto",
    activation: str | None = None,
    order: OrderSpec = None,
) -> Plan:
    """The (cached) :class:`Plan` that :func:`contract` would use; ``print`` it for a table.

    ``x`` may be the input tensor or just a token count (dtype and device then come from the cores).
    The same arguments return the *same* plan object (cache hit). Given an MPO layer
    (:class:`~mpo_core.nn.MPOLinear`, alone), the :class:`Route` its forward would take: step ``W``,
    cached ``W`` or the plan (:mod:`mpo_core.contract.route`).
    """
    if isinstance(mpo_or_cores, torch.nn.Module) and callable(getattr(mpo_or_cores, "explain", None)):
        if (bias, strategy, activation, order) != (None, "auto", None, None):
            raise ValueError("explain(x, layer) takes the layer's own bias and strategy: pass no other argument")
        return mpo_or_cores.explain(x)
    return resolve(x, mpo_or_cores, bias, strategy, activation, order)[1]


def dense_weight(mpo_or_cores: MPO | Sequence[torch.Tensor]) -> torch.Tensor:
    """The dense ``(prod(in_shape), prod(out_shape))`` matrix (C order), merged in the cheapest order; differentiable."""
    return dense_matrix(cores_of(mpo_or_cores))


def clear_plan_cache() -> None:
    """Forget every cached plan (e.g. after changing the cost model)."""
    make_plan.cache_clear()
