"""Resolving a contraction request: the checked cores, the compute dtype (autocast) and the cached
:class:`~mpo_core.contract.plan.Plan` for ``x`` (a tensor or a token count). Shared by
:func:`mpo_core.contract.contract`, :func:`mpo_core.contract.explain` and the per-call route
(:mod:`mpo_core.contract.route`).
"""
from __future__ import annotations

import math
from typing import Sequence, Union

import torch

from mpo_core.activation import check_activation
from mpo_core.contract import fused
from mpo_core.contract.plan import STRATEGIES, Plan, make_plan, token_bucket
from mpo_core.contract.sequential import check_order, named_orders
from mpo_core.mpo import MPO, validate_cores, validate_linear_inputs

__all__ = ["OrderSpec", "check_strategy", "cores_of", "compute_dtype", "resolve"]

OrderSpec = Union[str, Sequence[int], None]


def check_strategy(strategy: object) -> str:
    """Return ``strategy`` if it is one of :data:`STRATEGIES`, else raise ``ValueError`` naming them."""
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    return strategy


def cores_of(mpo_or_cores: MPO | Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """The checked cores of an MPO or of a list of cores (:func:`~mpo_core.mpo.validate_cores`)."""
    cores = mpo_or_cores.cores if isinstance(mpo_or_cores, MPO) else mpo_or_cores
    if isinstance(cores, torch.Tensor) or not isinstance(cores, (Sequence, torch.nn.ParameterList)) or len(cores) == 0:
        raise TypeError(f"mpo_or_cores must be an MPO or a non-empty list of 4-D tensors, got {type(mpo_or_cores).__name__}")
    return validate_cores(cores)


def compute_dtype(tensor_dtype: torch.dtype, device: torch.device) -> tuple[torch.dtype, bool]:
    """The dtype the matmuls run in, and whether autocast is on for ``device``."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type), True
    return tensor_dtype, False


def resolve(
    x: torch.Tensor | int, mpo_or_cores, bias, strategy: str, activation, order: OrderSpec
) -> tuple[list[torch.Tensor], Plan]:
    """Check the arguments of ``contract``/``explain`` and return the cores and the (cached) plan."""
    cores = cores_of(mpo_or_cores)
    in_shape = tuple(c.shape[1] for c in cores)
    out_shape = tuple(c.shape[2] for c in cores)
    ranks = tuple(c.shape[0] for c in cores) + (1,)
    check_strategy(strategy)
    check_activation(activation)
    device = cores[0].device
    if isinstance(x, torch.Tensor):
        dtype, autocast = compute_dtype(x.dtype, device)
        validate_linear_inputs(x, cores, bias, mixed_dtypes=autocast)
        tokens = x.numel() // math.prod(in_shape)
    elif isinstance(x, int) and not isinstance(x, bool) and x >= 0:
        tokens = x
        dtype, autocast = compute_dtype(cores[0].dtype, device)
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
