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

All reshapes are C (row-major) order: ``x[..., ravel((i1..in), in_shape)]``.
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from mpo_core.activation import apply_activation, check_activation
from mpo_core.contract import fused
from mpo_core.contract.plan import STRATEGIES, Candidate, Plan, make_plan, token_bucket
from mpo_core.contract.sequential import check_order, named_orders, run_sequential
from mpo_core.mpo import MPO, validate_cores, validate_linear_inputs
from mpo_core.rebuild import dense_matrix

__all__ = ["STRATEGIES", "Candidate", "Plan", "check_strategy", "clear_plan_cache", "contract", "dense_weight", "explain"]

OrderSpec = Union[str, Sequence[int], None]


def check_strategy(strategy: object) -> str:
    """Return ``strategy`` if it is one of :data:`STRATEGIES`, else raise ``ValueError`` naming them."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return strategy


def _cores_of(mpo_or_cores: MPO | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    cores = mpo_or_cores.cores if isinstance(mpo_or_cores, MPO) else mpo_or_cores
    if isinstance(cores, torch.Tensor) or not isinstance(cores, (Sequence, torch.nn.ParameterList)) or len(cores) == 0:
        raise TypeError(f"mpo_or_cores must be an MPO or a non-empty list of 4-D tensors, got {type(mpo_or_cores).__name__}")
    return validate_cores(cores)


def _compute_dtype(tensor_dtype: torch.dtype, device: torch.device) -> tuple[torch.dtype, bool]:
    """The dtype the matmuls run in, and whether autocast is on for ``device``."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type), True
    return tensor_dtype, False


def _resolve(
    x: torch.Tensor | int, mpo_or_cores, bias, strategy: str, activation, order: OrderSpec
) -> tuple[list[torch.Tensor], Plan]:
    cores = _cores_of(mpo_or_cores)
    in_shape = tuple(c.shape[1] for c in cores)
    out_shape = tuple(c.shape[2] for c in cores)
    ranks = tuple(c.shape[0] for c in cores) + (1,)
    check_strategy(strategy)
    check_activation(activation)
    device = cores[0].device
    if isinstance(x, torch.Tensor):
        dtype, autocast = _compute_dtype(x.dtype, device)
        validate_linear_inputs(x, cores, bias, mixed_dtypes=autocast)
        tokens = x.numel() // math.prod(in_shape)
    elif isinstance(x, int) and not isinstance(x, bool) and x >= 0:
        tokens = x
        dtype, autocast = _compute_dtype(cores[0].dtype, device)
        if bias is not None:
            validate_linear_inputs(torch.empty(0, math.prod(in_shape), dtype=cores[0].dtype, device=device), cores,
                                   bias, mixed_dtypes=autocast)
    else:
        raise TypeError(f"x must be a tensor or a token count (int >= 0), got {x!r}")
    if order is not None:
        if strategy != "sequential":
            raise ValueError(f"order applies to strategy='sequential' only, got strategy={strategy!r}")
        if isinstance(order, str):
            names = named_orders(len(cores))
            if order not in names:
                raise ValueError(f"order must be one of {sorted(names)} or a sequence of core indices, got {order!r}")
            order = names[order]
        else:
            order = check_order(order, len(cores))
    if strategy == "fused" and len(cores) < 2:
        raise ValueError(f"strategy='fused' needs at least 2 cores, got {len(cores)}")
    fused_ok = strategy == "auto" and len(cores) >= 2 and fused.fused_available(device, dtype)
    plan = make_plan(in_shape, out_shape, ranks, token_bucket(tokens), device.type, dtype, strategy, order,
                     bias is not None, activation, fused_ok)
    return cores, plan


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
    cores, plan = _resolve(x, mpo_or_cores, bias, strategy, activation, order)
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
    The same arguments return the *same* plan object (cache hit).
    """
    return _resolve(x, mpo_or_cores, bias, strategy, activation, order)[1]


def dense_weight(mpo_or_cores: MPO | Sequence[torch.Tensor]) -> torch.Tensor:
    """The dense ``(prod(in_shape), prod(out_shape))`` matrix (C order), merged in the cheapest order; differentiable."""
    return dense_matrix(_cores_of(mpo_or_cores))


def clear_plan_cache() -> None:
    """Forget every cached plan (e.g. after changing the cost model)."""
    make_plan.cache_clear()
