"""MPOE (Gao et al., COLING 2022): a feed-forward mixture of experts whose experts share MPO central tensors.

Each expert is an FFN ``x -> act(x @ W_in(e) + b_in(e)) @ W_out(e) + b_out(e)`` whose two matrices are
MPOs (``act``: GELU by default, or any callable, e.g. a transformers model's own activation module). For
each matrix, the central core is one parameter shared by all ``E`` experts; every expert keeps its own
auxiliary cores and biases. At full rank the central holds (almost) as many entries as
the dense matrix, so ``E`` experts cost one dense FFN plus ``E`` small sets of auxiliaries, instead of
``E`` dense FFNs (:meth:`MPOEFeedForward.parameter_report`).

Routing is Switch/GShard style: a linear router, softmax probabilities, top-``k`` experts per token (gates
renormalized over the chosen ``k`` when ``k > 1``, the raw probability for ``k = 1``; see :data:`GATES`),
optionally a per-expert capacity ``ceil(capacity_factor * tokens * k / E)`` filled first-choice-first,
token order within a choice (overflowing assignments are dropped: they add nothing, the caller's
residual carries the token). The load-balancing loss is Switch's ``E * sum_e f_e P_e`` with ``f_e`` the
fraction of the ``tokens * k`` assignments routed to ``e`` (before capacity) and ``P_e`` the mean
router probability of ``e``: 1 for perfectly balanced routing, up to ``E`` when collapsed.

The shared central receives the gradients of all experts, so an expert that gets most tokens
dominates its updates. ``central_grad`` chooses the counter-measure (applied in training only):

``"inverse_frequency"`` (default, our choice)
    Expert ``e``'s contribution to the central's gradient is scaled by ``1 / (E f'_e)``, with ``f'_e``
    the fraction of the kept assignments it processed in this batch: every active expert then
    weighs as if routing were balanced (factors are 1 when it is). Auxiliaries, biases, the router
    and the input gradient are untouched.
``"bernoulli"``
    Each entry of the central's gradient is dropped with probability ``mask_prob`` (a fresh mask per
    forward, not rescaled), slowing the shared tensor's updates relative to the auxiliaries, in the
    spirit of the MPOE paper's gradient mask (its exact rule may differ).
``"none"``
    Plain summed gradients.

Evaluation is batched: all ``E`` experts' dense matrices are rebuilt together per forward (the shared
central meets the stacked auxiliary blocks in batched GEMMs, :func:`mpo_core.accumulate.shared_central_weights`,
which also applies the central-gradient rule), then the tokens, sorted by expert, go through one GEMM pair
per expert. :class:`SwitchFeedForward` is the same router and dispatch over ``E`` dense experts (Switch
Transformer; "sparse upcycling" when every expert copies one FFN): the baseline MPOE is measured against.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Sequence, Union

import torch
from torch import nn

from mpo_core.accumulate import shared_central_weights
from mpo_core.activation import ACTIVATIONS, apply_activation
from mpo_core.nn import MPOLinear, num_parameters
from mpo_core.nn.dense import linear_weight
from mpo_core.shapes import check_int, resolve_shapes

__all__ = ["GATES", "Routing", "route", "load_balancing_loss", "MoEOutput", "MoEFeedForward", "MPOEFeedForward",
           "SwitchFeedForward"]

CENTRAL_GRAD_MODES = ("inverse_frequency", "bernoulli", "none")
GATES = ("switch", "unit_sum")
"""Combine weights: ``"switch"`` the top-1 probability (renormalized over the ``k`` chosen when ``k > 1``);
``"unit_sum"`` renormalized over the ``k`` chosen for every ``k`` with the normalizer detached (top-1: the
value 1, the gradient ``dp / p``), so ``E`` identical experts are exactly the FFN they copy (upcycling)."""


@dataclass
class Routing:
    """Top-``k`` routing of ``T`` tokens to ``E`` experts.

    Attributes
    ----------
    probs : torch.Tensor
        ``(T, E)`` router softmax (float32).
    index : torch.Tensor
        ``(T, k)`` chosen experts, best first.
    gates : torch.Tensor
        ``(T, k)`` combine weights (renormalized over the ``k`` chosen when ``k > 1``).
    keep : torch.Tensor
        ``(T, k)`` bool, False where an assignment overflowed its expert's capacity.
    capacity : int or None
        Per-expert capacity, ``None`` when unlimited.
    """

    probs: torch.Tensor
    index: torch.Tensor
    gates: torch.Tensor
    keep: torch.Tensor
    capacity: int | None

    @property
    def num_experts(self) -> int:
        return self.probs.shape[1]

    def counts(self, kept_only: bool = False) -> torch.Tensor:
        """``(E,)`` assignments per expert (all, or only those within capacity)."""
        idx = self.index[self.keep] if kept_only else self.index.reshape(-1)
        return torch.bincount(idx, minlength=self.num_experts)

    @property
    def dropped(self) -> int:
        """Assignments dropped by the capacity limit."""
        return int((~self.keep).sum())


def route(logits: torch.Tensor, k: int = 1, capacity_factor: float | None = None, gate: str = "switch") -> Routing:
    """Top-``k`` routing from router ``logits`` of shape ``(T, E)``; see the module docstring (``gate``: :data:`GATES`)."""
    if not isinstance(logits, torch.Tensor) or logits.dim() != 2 or not logits.is_floating_point():
        raise ValueError(f"logits must be a floating (tokens, experts) tensor, got {getattr(logits, 'shape', type(logits).__name__)}")
    tokens, experts = logits.shape
    if isinstance(k, bool) or not isinstance(k, int) or not 1 <= k <= experts:
        raise ValueError(f"k must be an int in [1, {experts}], got {k!r}")
    if gate not in GATES:
        raise ValueError(f"gate must be one of {GATES}, got {gate!r}")
    probs = torch.softmax(logits.float(), dim=-1)
    top, index = probs.topk(k, dim=-1)
    if gate == "unit_sum":
        gates = top / top.sum(-1, keepdim=True).detach()
    else:
        gates = top / top.sum(-1, keepdim=True) if k > 1 else top
    capacity = None
    keep = torch.ones_like(index, dtype=torch.bool)
    if capacity_factor is not None:
        if isinstance(capacity_factor, bool) or not isinstance(capacity_factor, (int, float)) or not capacity_factor > 0:
            raise ValueError(f"capacity_factor must be a float > 0 or None, got {capacity_factor!r}")
        capacity = max(1, math.ceil(capacity_factor * tokens * k / experts))
        order = index.T.reshape(-1)  # choice-major: every token's first choice before any second choice
        onehot = torch.nn.functional.one_hot(order, experts)
        position = (onehot.cumsum(0) * onehot).sum(-1) - 1  # place in its expert's queue
        keep = (position < capacity).reshape(k, tokens).T
    return Routing(probs, index, gates, keep, capacity)


def load_balancing_loss(routing: Routing) -> torch.Tensor:
    """Switch Transformer's auxiliary loss ``E * sum_e f_e * P_e`` (1 when balanced, ``E`` when collapsed).

    ``f_e`` is the fraction of all ``T * k`` assignments that chose expert ``e`` (not differentiable),
    ``P_e`` the mean router probability of ``e`` (differentiable: the loss pushes probability away
    from overloaded experts).
    """
    tokens, k = routing.index.shape
    fractions = routing.counts().to(routing.probs.dtype) / (tokens * k)
    return routing.num_experts * (fractions * routing.probs.mean(0)).sum()


@dataclass
class MoEOutput:
    """``output`` (same shape as the input), the ``balance_loss`` to add (times a coefficient) to the
    training loss, and the :class:`Routing`."""

    output: torch.Tensor
    balance_loss: torch.Tensor
    routing: Routing


Activation = Union[str, None, Callable[[torch.Tensor], torch.Tensor]]
"""An expert's activation: one of :data:`mpo_core.activation.ACTIVATIONS` or any callable (an ``nn.Module``
is registered as a submodule, so its train/eval mode follows the layer's)."""

ExpertWeights = tuple[torch.Tensor, Union[torch.Tensor, None], torch.Tensor, Union[torch.Tensor, None]]
"""``(w_in (E, hidden, intermediate), b_in (E, intermediate) or None, w_out (E, intermediate, hidden), b_out)``."""


def _affine(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
    return x @ w if b is None else torch.addmm(b, x, w)


class MoEFeedForward(nn.Module):
    """Router and top-``k`` dispatch of a feed-forward mixture of experts; subclasses hold the experts.

    Subclasses implement :meth:`expert_weights`: every expert's dense matrices and biases, stacked.
    The forward routes the tokens, sorts them by expert and runs one GEMM pair per expert that has tokens.

    Parameters
    ----------
    hidden_size, intermediate_size, num_experts : int
    top_k : int, default 1
    capacity_factor : float, optional
        Per-expert capacity factor (default: unlimited).
    activation : str, None or callable, default "gelu"
        :data:`Activation`.
    gate : {"switch", "unit_sum"}
        :data:`GATES`.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int = 1,
                 capacity_factor: float | None = None, activation: Activation = "gelu", gate: str = "switch") -> None:
        super().__init__()
        for name, value in (("hidden_size", hidden_size), ("intermediate_size", intermediate_size), ("num_experts", num_experts)):
            check_int(name, value)
        if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
        if not callable(activation) and activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS} or a callable, got {activation!r}")
        route(torch.zeros(1, num_experts), top_k, capacity_factor, gate)  # validates capacity_factor and gate
        self.hidden_size, self.intermediate_size = hidden_size, intermediate_size
        self.num_experts, self.top_k, self.capacity_factor, self.gate = num_experts, top_k, capacity_factor, gate
        self.activation = activation
        self.router = nn.Linear(hidden_size, num_experts, bias=False)
        nn.init.normal_(self.router.weight, 0.0, 0.02)

    def expert_weights(self, routing: Routing | None = None) -> ExpertWeights:
        """Every expert's matrices (``x @ w`` layout) and biases, stacked; ``routing`` (in training) lets a
        subclass shape their gradients (MPOE's central rule); ``None``: plain values (merging, reports)."""
        raise NotImplementedError(f"{type(self).__name__} must implement expert_weights")

    def per_expert_parameters(self) -> int:
        """Parameter entries that belong to one expert alone (what a token not routed to it leaves unused)."""
        raise NotImplementedError(f"{type(self).__name__} must implement per_expert_parameters")

    def _activate(self, h: torch.Tensor) -> torch.Tensor:
        return self.activation(h) if callable(self.activation) else apply_activation(h, self.activation)

    def forward(self, x: torch.Tensor) -> MoEOutput:
        """Route every token of ``x`` (``(..., hidden_size)``) to its top-``k`` experts and combine."""
        if not isinstance(x, torch.Tensor) or x.shape[-1] != self.hidden_size:
            raise ValueError(f"x must have last dimension hidden_size={self.hidden_size}, got {getattr(x, 'shape', None)}")
        x2d = x.reshape(-1, self.hidden_size)
        routing = route(self.router(x2d), self.top_k, self.capacity_factor, self.gate)
        # unbind: one backward for all experts (indexing w[e] would scatter into a zero (E, ...) tensor per expert)
        w_in, b_in, w_out, b_out = (None if t is None else t.unbind(0) for t in self.expert_weights(routing))
        token = torch.arange(x2d.shape[0], device=x.device)[:, None].expand_as(routing.index)[routing.keep]
        expert = routing.index[routing.keep]
        order = torch.argsort(expert, stable=True)
        token, gate = token[order], routing.gates[routing.keep][order]
        counts = torch.bincount(expert, minlength=self.num_experts).tolist()
        pieces = []
        for e, xe in enumerate(x2d[token].split(counts)):
            if counts[e]:
                h = self._activate(_affine(xe, w_in[e], None if b_in is None else b_in[e]))
                pieces.append(_affine(h, w_out[e], None if b_out is None else b_out[e]))
        out = torch.zeros_like(x2d)
        if pieces:
            y = torch.cat(pieces)
            out = out.index_add(0, token, (y * gate[:, None].to(y.dtype)).to(out.dtype))
        return MoEOutput(out.reshape(x.shape), load_balancing_loss(routing), routing)

    def extra_repr(self) -> str:
        return (f"hidden_size={self.hidden_size}, intermediate_size={self.intermediate_size}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, capacity_factor={self.capacity_factor}, gate={self.gate!r}")


class MPOEFeedForward(MoEFeedForward):
    """MPOE feed-forward layer: ``E`` MPO experts sharing the central core of each matrix.

    Parameters
    ----------
    hidden_size, intermediate_size : int
        ``x`` is ``(..., hidden_size)``; each expert maps it through ``intermediate_size``.
    num_experts : int
    top_k : int, default 1
    n : int, optional
        Cores per matrix (balanced factorization; odd, >= 3, so that an inner central core exists). Or
        give ``hidden_shape`` and ``intermediate_shape``.
    hidden_shape, intermediate_shape : sequence of int, optional
        Mode sizes of the two dimensions.
    max_bond : int, optional
        Caps every bond (default: full rank).
    capacity_factor : float, optional
        Per-expert capacity factor (default: unlimited).
    central_grad : {"inverse_frequency", "bernoulli", "none"}
        How the shared centrals' gradients are balanced (module docstring).
    mask_prob : float, default 0.5
        Drop probability of the ``"bernoulli"`` mask.
    activation : str, None or callable, default "gelu"
    bias : bool, default True
        Per-expert biases of both matrices.
    gate : {"switch", "unit_sum"}

    Attributes
    ----------
    router : nn.Linear
        ``hidden_size -> num_experts``, no bias.
    experts_in, experts_out : nn.ModuleList of MPOLinear
        Expert ``e``'s two matrices; ``experts_in[e].central is experts_in[0].central`` for all ``e``.
    """

    def __init__(
        self,
        hidden_size: int,
        intermediate_size: int,
        num_experts: int,
        top_k: int = 1,
        n: int | None = 5,
        hidden_shape: Sequence[int] | None = None,
        intermediate_shape: Sequence[int] | None = None,
        max_bond: int | None = None,
        capacity_factor: float | None = None,
        central_grad: str = "inverse_frequency",
        mask_prob: float = 0.5,
        activation: Activation = "gelu",
        bias: bool = True,
        gate: str = "switch",
    ) -> None:
        super().__init__(hidden_size, intermediate_size, num_experts, top_k, capacity_factor, activation, gate)
        if central_grad not in CENTRAL_GRAD_MODES:
            raise ValueError(f"central_grad must be one of {CENTRAL_GRAD_MODES}, got {central_grad!r}")
        if not (isinstance(mask_prob, (int, float)) and 0.0 <= mask_prob < 1.0):
            raise ValueError(f"mask_prob must be in [0, 1), got {mask_prob!r}")
        h_shape, i_shape = resolve_shapes(hidden_size, intermediate_size, hidden_shape, intermediate_shape,
                                          None if hidden_shape is not None else n)
        if len(h_shape) % 2 == 0 or len(h_shape) < 3:
            raise ValueError(f"the number of cores must be odd and >= 3 (an inner central core at n // 2), got {len(h_shape)}")
        self.central_grad, self.mask_prob = central_grad, float(mask_prob)

        def build(fan_in: int, fan_out: int, s_in, s_out) -> nn.ModuleList:
            experts = nn.ModuleList(MPOLinear(fan_in, fan_out, s_in, s_out, max_bond=max_bond, bias=bias)
                                    for _ in range(num_experts))
            for layer in experts[1:]:
                layer.share_core(layer.central_index, experts[0].central)
            return experts

        self.experts_in = build(hidden_size, intermediate_size, h_shape, i_shape)
        self.experts_out = build(intermediate_size, hidden_size, i_shape, h_shape)

    # ------------------------------------------------------------------ construction
    @classmethod
    def from_mpo(cls, mpo_in: MPOLinear, mpo_out: MPOLinear, num_experts: int, top_k: int = 1,
                 noise_std: float = 0.0, generator: torch.Generator | None = None, **kwargs) -> "MPOEFeedForward":
        """Experts initialized from one MPO FFN (``mpo_in``, the activation, ``mpo_out``), as MPOE does from a PLM.

        Every expert gets the FFN's cores and biases (both layers have a bias, or neither); the central is
        shared. ``noise_std > 0`` adds ``N(0, (noise_std * rms(core))^2)`` to each expert's auxiliaries to
        break the symmetry between experts (the experts then no longer equal the FFN). ``kwargs`` go to the
        constructor (``capacity_factor``, ``central_grad``, ``activation``, ``gate``, ...).
        """
        for name, layer in (("mpo_in", mpo_in), ("mpo_out", mpo_out)):
            if not isinstance(layer, MPOLinear):
                raise TypeError(f"{name} must be an MPOLinear, got {type(layer).__name__}")
        if (mpo_in.bias is None) != (mpo_out.bias is None):
            raise ValueError("mpo_in and mpo_out must both have a bias or both have none")
        if mpo_in.out_features != mpo_out.in_features or mpo_in.in_features != mpo_out.out_features:
            raise ValueError(f"mpo_in ({mpo_in.in_features}->{mpo_in.out_features}) and mpo_out "
                             f"({mpo_out.in_features}->{mpo_out.out_features}) do not form an FFN")
        if mpo_in.in_shape != mpo_out.out_shape or mpo_in.out_shape != mpo_out.in_shape:
            raise ValueError("mpo_in and mpo_out must use the same mode shapes (hidden and intermediate)")
        layer = cls(mpo_in.in_features, mpo_in.out_features, num_experts, top_k, hidden_shape=mpo_in.in_shape,
                    intermediate_shape=mpo_in.out_shape, bias=mpo_in.bias is not None, **kwargs)
        first = mpo_in.cores[0]
        layer.to(device=first.device, dtype=first.dtype)
        for experts, source in ((layer.experts_in, mpo_in), (layer.experts_out, mpo_out)):
            if [tuple(c.shape) for c in experts[0].cores] != [tuple(c.shape) for c in source.cores]:
                raise ValueError(f"source cores {[tuple(c.shape) for c in source.cores]} do not match the layer's "
                                 f"{[tuple(c.shape) for c in experts[0].cores]} (max_bond?)")
            with torch.no_grad():
                for expert in experts:
                    for k, (core, src) in enumerate(zip(expert.cores, source.cores)):
                        core.copy_(src)
                        if k != expert.central_index and noise_std > 0:
                            rms = float(src.pow(2).mean().sqrt())
                            core.add_(torch.randn(src.shape, generator=generator).to(core) * (noise_std * rms))
                    if source.bias is not None:
                        expert.bias.copy_(source.bias)
        return layer

    @classmethod
    def from_dense(cls, ffn_in: nn.Module, ffn_out: nn.Module, num_experts: int, top_k: int = 1, n: int = 5,
                   noise_std: float = 0.0, generator: torch.Generator | None = None, **kwargs) -> "MPOEFeedForward":
        """Decompose a dense FFN (``nn.Linear`` or transformers ``Conv1D``) exactly (``n`` cores) and build
        experts from it (:meth:`from_mpo`)."""
        mpo_in = MPOLinear.from_linear(ffn_in, n=n)
        mpo_out = MPOLinear.from_linear(ffn_out, in_shape=mpo_in.out_shape, out_shape=mpo_in.in_shape)
        return cls.from_mpo(mpo_in, mpo_out, num_experts, top_k, noise_std, generator, **kwargs)

    # ------------------------------------------------------------------ forward
    def _central_scales(self, routing: Routing | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The gradient factors of the two shared centrals (``shared_central_weights``' ``central_grad_scale``)."""
        if routing is None or not (self.training and torch.is_grad_enabled()) or self.central_grad == "none":
            return None, None
        if self.central_grad == "bernoulli":
            return tuple(torch.rand(c.shape, device=c.device) >= self.mask_prob
                         for c in (self.experts_in[0].central, self.experts_out[0].central))
        kept = routing.counts(kept_only=True).float()
        total = kept.sum().clamp_min(1.0)
        factors = torch.where(kept > 0, total / (self.num_experts * kept.clamp_min(1.0)), torch.zeros_like(kept))
        return factors, factors

    def expert_weights(self, routing: Routing | None = None) -> ExpertWeights:
        """All experts' dense matrices rebuilt together (shared central once), with the central-gradient rule."""
        stacked = []
        for experts, scale in zip((self.experts_in, self.experts_out), self._central_scales(routing)):
            w = shared_central_weights([list(e.cores) for e in experts], experts[0].central_index,
                                       central_grad_scale=scale)
            b = None if experts[0].bias is None else torch.stack([e.bias for e in experts])
            stacked += [w, b]
        return stacked[0], stacked[1], stacked[2], stacked[3]

    # ------------------------------------------------------------------ reports
    def per_expert_parameters(self) -> int:
        """Expert 0's auxiliary cores and biases (the centrals are shared)."""
        own = [p for layer in (self.experts_in[0], self.experts_out[0]) for p in (*layer.auxiliary, layer.bias)]
        return sum(p.numel() for p in own if p is not None)

    def parameter_report(self) -> dict[str, int]:
        """Parameter counts: this layer (shared centrals once), a plain MoE of ``E`` dense experts, one dense FFN."""
        h, i, e = self.hidden_size, self.intermediate_size, self.num_experts
        dense_ffn = 2 * h * i + (h + i if self.experts_in[0].bias is not None else 0)
        central = self.experts_in[0].central.numel() + self.experts_out[0].central.numel()
        auxiliary = sum(a.numel() for experts in (self.experts_in, self.experts_out) for a in experts[0].auxiliary)
        router = self.router.weight.numel()
        return {
            "mpoe": num_parameters(self),
            "plain_moe": e * dense_ffn + router,
            "dense_ffn": dense_ffn,
            "shared_central": central,
            "auxiliary_per_expert": auxiliary,
            "router": router,
        }

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, central_grad={self.central_grad!r}"


class SwitchFeedForward(MoEFeedForward):
    """Switch-Transformer feed-forward layer: ``E`` dense experts (the baseline of MPOE).

    Same arguments as :class:`MoEFeedForward` plus ``bias``. Parameters ``w_in (E, hidden, intermediate)``,
    ``b_in``, ``w_out (E, intermediate, hidden)``, ``b_out``, each expert initialized as ``nn.Linear`` is.
    """

    def __init__(self, hidden_size: int, intermediate_size: int, num_experts: int, top_k: int = 1,
                 capacity_factor: float | None = None, activation: Activation = "gelu", bias: bool = True,
                 gate: str = "switch") -> None:
        super().__init__(hidden_size, intermediate_size, num_experts, top_k, capacity_factor, activation, gate)
        self.w_in = nn.Parameter(torch.empty(num_experts, hidden_size, intermediate_size))
        self.w_out = nn.Parameter(torch.empty(num_experts, intermediate_size, hidden_size))
        self.b_in = nn.Parameter(torch.empty(num_experts, intermediate_size)) if bias else None
        self.b_out = nn.Parameter(torch.empty(num_experts, hidden_size)) if bias else None
        for w, b in ((self.w_in, self.b_in), (self.w_out, self.b_out)):
            bound = 1.0 / math.sqrt(w.shape[1])  # nn.Linear's default init
            nn.init.uniform_(w, -bound, bound)
            if b is not None:
                nn.init.uniform_(b, -bound, bound)

    @classmethod
    def from_dense(cls, ffn_in: nn.Module, ffn_out: nn.Module, num_experts: int, top_k: int = 1,
                   **kwargs) -> "SwitchFeedForward":
        """Sparse upcycling: every expert a copy of the dense FFN (``nn.Linear`` or transformers ``Conv1D``,
        both with a bias or neither). ``kwargs`` go to the constructor."""
        w_in, w_out = linear_weight(ffn_in), linear_weight(ffn_out)
        if w_in.shape[::-1] != w_out.shape:
            raise ValueError(f"ffn_in ({tuple(w_in.shape)}) and ffn_out ({tuple(w_out.shape)}) do not form an FFN")
        if (ffn_in.bias is None) != (ffn_out.bias is None):
            raise ValueError("ffn_in and ffn_out must both have a bias or both have none")
        layer = cls(w_in.shape[0], w_in.shape[1], num_experts, top_k, bias=ffn_in.bias is not None, **kwargs)
        layer.to(device=w_in.device, dtype=w_in.dtype)
        with torch.no_grad():
            for param, src in ((layer.w_in, w_in), (layer.w_out, w_out), (layer.b_in, ffn_in.bias), (layer.b_out, ffn_out.bias)):
                if param is not None:
                    param.copy_(src.detach().expand_as(param))
        return layer

    def per_expert_parameters(self) -> int:
        """One expert's two matrices and biases."""
        return sum(p[0].numel() for p in (self.w_in, self.b_in, self.w_out, self.b_out) if p is not None)

    def expert_weights(self, routing: Routing | None = None) -> ExpertWeights:
        """The parameters themselves."""
        return self.w_in, self.b_in, self.w_out, self.b_out
