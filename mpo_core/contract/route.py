"""The one decision of how an MPO linear layer computes ``y = x @ W + b`` on a given call.

Considered in this order (:func:`choose_route`):

``step W``
    A dense ``W`` was built for the optimizer step (:func:`mpo_core.accumulate.weight_cache` set the
    layer's ``step_weight``): one GEMM with it; ``dL/dW`` reaches the cores when the block ends.
``cached W``
    No gradient is needed (inference, frozen cores), the layer may keep ``W`` (``cache_weight``,
    strategy ``auto``/``dense``) and one GEMM with a ready ``W`` is modelled no slower than the plan
    (:func:`gemm_beats_plan`): ``W`` is rebuilt once and kept until a core changes.
``dense`` | ``sequential`` | ``fused``
    The plan's strategy (:func:`mpo_core.contract.plan.make_plan`, priced by :mod:`mpo_core.cost`),
    run by :func:`mpo_core.contract.contract`.

The gemm-versus-plan answer is kept per token bucket, dtype, device type, autocast state and
device model in a dict the caller owns (the planner's checks cost more than a small GEMM).
:func:`explain_route` gives the same decision with the plan behind it (``print`` it).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Protocol, Sequence

import torch

from mpo_core.contract.plan import Plan, token_bucket
from mpo_core.contract.resolve import resolve
from mpo_core.cost import device_model, gemm_cost

__all__ = ["ROUTES", "MPOLayer", "Route", "choose_route", "explain_route", "gemm_beats_plan", "needs_grad"]

ROUTES = ("step W", "cached W", "planned")
"""What :func:`choose_route` answers; ``"planned"`` means the plan's strategy through ``contract``."""


def gemm_beats_plan(plan: Plan) -> bool:
    """With ``W`` ready, whether one GEMM is modelled at least as fast as the plan's choice: always when
    the plan rebuilds ``W`` anyway (``dense``), never against the fused kernel, and against
    ``sequential`` by modelled time."""
    if plan.strategy == "dense":
        return True
    if plan.strategy != "sequential":
        return False
    return _gemm_seconds(plan) <= plan.chosen.seconds


def _gemm_seconds(plan: Plan) -> float:
    gemm = gemm_cost(plan.tokens, math.prod(plan.in_shape), math.prod(plan.out_shape), plan.dtype.itemsize)
    return device_model(plan.device_type).seconds(gemm, plan.dtype)


class MPOLayer(Protocol):
    """What the route reads of a layer (:class:`mpo_core.nn.MPOLinear`)."""

    cores: Sequence[torch.Tensor]
    bias: torch.Tensor | None
    strategy: str
    in_features: int
    cache_weight: bool
    step_weight: torch.Tensor | None
    route_memo: dict
    weight_tensors: tuple[torch.Tensor, ...]  # what W is built from: the cores, then an attached update's U, D


def needs_grad(x: torch.Tensor, cores: Sequence[torch.Tensor], bias: torch.Tensor | None) -> bool:
    """Whether autograd needs this call's graph: grad mode on and ``x``, a core or the bias requires grad."""
    return torch.is_grad_enabled() and (
        x.requires_grad or any(c.requires_grad for c in cores) or (bias is not None and bias.requires_grad))


def choose_route(x: torch.Tensor, layer: MPOLayer, bias: torch.Tensor | None = None) -> str:
    """The route of ``layer``'s call on ``x`` (one of :data:`ROUTES`; module docstring); ``bias``: the one the
    call adds instead of the layer's own. Cheap on the hot path: the plan is resolved only when the
    cached-``W`` route is in question for a new key (kept in ``layer.route_memo``)."""
    if layer.step_weight is not None:
        return "step W"
    bias = layer.bias if bias is None else bias
    if layer.cache_weight and layer.strategy in ("auto", "dense") and not needs_grad(x, layer.weight_tensors, bias):
        dev = x.device.type
        key = (token_bucket(x.numel() // layer.in_features), x.dtype, dev, torch.is_autocast_enabled(dev),
               device_model(dev))
        choice = layer.route_memo.get(key)
        if choice is None:
            plan = resolve(x, list(layer.cores), bias, layer.strategy, None, None)[1]
            choice = layer.route_memo[key] = gemm_beats_plan(plan)
        if choice:
            return "cached W"
    return "planned"


@dataclass(frozen=True)
class Route:
    """The decision of one call with what it rests on; ``print`` it for the plan table.

    Attributes
    ----------
    route : str
        One of :data:`ROUTES`.
    plan : Plan or None
        The plan considered (``None`` for ``step W``, which considers none).
    gemm_seconds : float or None
        Modelled time of one GEMM with a ready ``W`` (when ``cached W`` was in question).
    """

    route: str
    plan: Plan | None
    gemm_seconds: float | None = None

    @property
    def strategy(self) -> str:
        """``"step W"``, ``"cached W"``, or the plan's strategy."""
        return self.plan.strategy if self.route == "planned" else self.route

    def __str__(self) -> str:
        if self.route == "step W":
            return ("route: step W (inside weight_cache: W built once for the optimizer step, one GEMM per "
                    "micro-batch; no plan considered)")
        if self.route == "cached W":
            head = (f"route: cached W (no gradient needed: W rebuilt once and kept, one GEMM, model "
                    f"{self.gemm_seconds * 1e3:.4f} ms, no slower than the plan's {self.plan.chosen.label})")
        else:
            why = ("" if self.gemm_seconds is None else
                   f"; a GEMM with a cached W would be {self.gemm_seconds * 1e3:.4f} ms" +
                   (" but the plan fuses" if self.plan.strategy == "fused" else ""))
            head = f"route: {self.plan.chosen.label} (the plan{why})"
        return head + "\n" + str(self.plan)


def explain_route(x: torch.Tensor | int, layer: MPOLayer, bias: torch.Tensor | None = None) -> Route:
    """The :class:`Route` :func:`choose_route` takes for ``x`` (a tensor, or a token count under the
    current grad mode) and ``bias``, with the plan behind it."""
    if layer.step_weight is not None:
        return Route("step W", None)
    bias = layer.bias if bias is None else bias
    plan = resolve(x, list(layer.cores), bias, layer.strategy, None, None)[1]
    grad = needs_grad(x if isinstance(x, torch.Tensor) else torch.empty(0), layer.weight_tensors, bias)
    if not (layer.cache_weight and layer.strategy in ("auto", "dense") and not grad):
        return Route("planned", plan)
    return Route("cached W" if gemm_beats_plan(plan) else "planned", plan, _gemm_seconds(plan))
