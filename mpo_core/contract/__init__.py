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
import torch.nn.functional as F

from mpo_core.contract import fused as _fused
from mpo_core.contract.dense import rebuild
from mpo_core.contract.plan import STRATEGIES, Candidate, Plan, make_plan, token_bucket
from mpo_core.contract.sequential import check_order, named_orders, run_sequential
from mpo_core.mpo import MPO, validate_cores

__all__ = ["contract", "explain", "dense_weight", "Plan", "Candidate", "clear_plan_cache", "ACTIVATIONS"]

ACTIVATIONS = (None, "gelu", "gelu_tanh")
OrderSpec = Union[str, Sequence[int], None]


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
    rows, cols = math.prod(in_shape), math.prod(out_shape)
    if strategy not in STRATEGIES:
        raise ValueError(f"strategy must be one of {STRATEGIES}, got {strategy!r}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    device = cores[0].device
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            raise TypeError(f"x must have a floating dtype, got {x.dtype}")
        if x.dim() == 0 or x.shape[-1] != rows:
            raise ValueError(f"x must have shape (..., {rows}) (prod(in_shape) for in_shape={in_shape}), got {tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"x is on {x.device} but the cores are on {device}")
        dtype, autocast = _compute_dtype(x.dtype, device)
        if x.dtype != cores[0].dtype and not autocast:
            raise TypeError(f"x is {x.dtype} but the cores are {cores[0].dtype} (cast one, or use torch.autocast)")
        tokens = x.numel() // rows
    elif isinstance(x, int) and not isinstance(x, bool) and x >= 0:
        tokens = x
        dtype, autocast = _compute_dtype(cores[0].dtype, device)
    else:
        raise TypeError(f"x must be a tensor or a token count (int >= 0), got {x!r}")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or bias.shape != (cols,):
            raise ValueError(f"bias must be a tensor of shape ({cols},), got {getattr(bias, 'shape', type(bias).__name__)}")
        if bias.device != device:
            raise ValueError(f"bias is on {bias.device} but the cores are on {device}")
        if bias.dtype != cores[0].dtype and not autocast:
            raise TypeError(f"bias is {bias.dtype} but the cores are {cores[0].dtype}")
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
    fused_ok = strategy == "auto" and len(cores) >= 2 and _fused.fused_available(device)
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
    RuntimeError
        ``strategy="fused"`` where the fused op cannot run.
    """
    cores, plan = _resolve(x, mpo_or_cores, bias, strategy, activation, order)
    lead = x.shape[:-1]
    x2d = x.reshape(-1, x.shape[-1])
    chosen = plan.chosen
    if chosen.strategy == "fused":
        return _fused.run_fused(x2d, cores, bias, activation).reshape(*lead, _out_features(cores))
    if chosen.strategy == "dense":
        w = rebuild(cores, chosen.order)
        y = x2d @ w if bias is None else torch.addmm(bias, x2d, w)
    else:
        y = run_sequential(x2d, cores, chosen.steps)
        if bias is not None:
            y = y + bias.to(y.dtype)  # under autocast y is in the autocast dtype: no promotion back
    if activation is not None:
        y = F.gelu(y, approximate="tanh" if activation == "gelu_tanh" else "none")
    return y.reshape(*lead, _out_features(cores))


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
    cores = _cores_of(mpo_or_cores)
    plan = explain(0, cores, strategy="dense")
    return rebuild(cores, plan.chosen.order)


def clear_plan_cache() -> None:
    """Forget every cached plan (e.g. after changing the cost model)."""
    make_plan.cache_clear()
