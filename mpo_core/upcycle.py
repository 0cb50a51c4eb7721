"""Upcycle the feed-forward blocks of a transformers model into mixtures of experts, and merge them back.

:func:`mpoe_ify` turns each chosen FFN (GPT-2's ``Conv1D`` ``c_fc``/``c_proj``, T5's ``DenseReluDense``
``wi``/``wo``, BERT-family ``intermediate.dense``/``output.dense``, DistilBERT's ``lin1``/``lin2``) into

- ``experts="mpo"``: an :class:`~mpo_core.moe.MPOEFeedForward` (MPOE, Gao et al. 2022) whose experts all
  start as the exact MPO of the pretrained FFN: the shared centrals are the pretrained ones, every expert's
  auxiliaries and biases are copies of the pretrained ones (``noise_std > 0`` perturbs the auxiliaries,
  seeded, and gives up exactness);
- ``experts="dense"``: a :class:`~mpo_core.moe.SwitchFeedForward` whose ``E`` experts are copies of the
  dense FFN (Switch-style "sparse upcycling", the baseline at equal active parameters).

The gates default to ``"unit_sum"`` (:data:`mpo_core.moe.GATES`) and the capacity to unlimited, so at
initialisation the model computes what the dense model computed, whatever the (random) router decides.

Surgery: the mixture (an :class:`UpcycledFFN`, hidden -> hidden, the FFN's activation inside it) takes the
up-projection's place; the activation, a dropout between the two matrices (T5) and the down-projection
become identities (:class:`Passthrough`), so every family's own forward (residuals, norms, output dropout)
runs unchanged. :func:`unmpoe_ify` puts dense modules of the original types back.

The load-balancing loss reaches the model's loss through :func:`add_balance_loss`: a forward hook on the
model that adds ``coef * sum over MoE layers`` of the last forward's Switch loss to ``output.loss`` (and sets
``output.balance_loss``), so plain training loops and ``transformers.Trainer`` both train the routers::

    report = mpoe_ify(gpt2, num_experts=8, n=3)          # GPT2LMHeadModel
    add_balance_loss(gpt2, coef=0.01)
    out = gpt2(input_ids, labels=input_ids)               # out.loss includes 0.01 * balance loss
    unmpoe_ify(gpt2, merge="routed")                      # dense again; the report gives each FFN's error
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils.hooks import RemovableHandle

from mpo_core.moe import MoEFeedForward, MPOEFeedForward, SwitchFeedForward
from mpo_core.nn import dense_from_weight, is_linear, linear_weight, num_parameters
from mpo_core.nn.surgery import Include, progress_bar, replace_module, select_modules
from mpo_core.shapes import check_int, resolve_shapes

__all__ = ["FFNLayout", "HookHandles", "LAYOUTS", "MergeReport", "Passthrough", "UpcycleReport", "UpcycledFFN", "active_parameters",
           "add_balance_loss", "balance_loss", "moe_layers", "mpoe_ify", "reset_routing_stats", "set_moe_trainable",
           "unmpoe_ify"]


@dataclass(frozen=True)
class FFNLayout:
    """Where an FFN's parts sit inside its block (paths relative to the block module)."""

    family: str
    up: str
    act: str
    down: str
    hidden_dropout: str | None = None
    """A dropout between the activation and the down-projection (T5), kept inside the experts."""


LAYOUTS = (
    FFNLayout("gpt2", "c_fc", "act", "c_proj"),
    FFNLayout("t5", "wi", "act", "wo", "dropout"),
    FFNLayout("bert", "intermediate.dense", "intermediate.intermediate_act_fn", "output.dense"),
    FFNLayout("distilbert", "lin1", "activation", "lin2"),
)
"""The FFN layouts :func:`mpoe_ify` recognises. The block names ``include`` chooses among are GPT-2's
``transformer.h.0.mlp``, T5's ``...block.0.layer.1.DenseReluDense``, BERT's ``...encoder.layer.0``."""

GATED = ("wi_0", "wi_1")  # T5 v1.1 / Flan-T5: act(x W_0) * (x W_1)


def _get(module: nn.Module, path: str) -> Any:
    for part in path.split("."):
        module = getattr(module, part, None)
        if module is None:
            return None
    return module


def _set(module: nn.Module, path: str, value: nn.Module) -> None:
    parent, _, attr = path.rpartition(".")
    setattr(module.get_submodule(parent) if parent else module, attr, value)


def _layout(module: nn.Module) -> FFNLayout | None:
    for layout in LAYOUTS:
        up, down, act = _get(module, layout.up), _get(module, layout.down), _get(module, layout.act)
        if isinstance(up, nn.Module) and isinstance(down, nn.Module) and is_linear(up) and is_linear(down) and callable(act):
            return layout
    return None


def _is_ffn(module: nn.Module) -> bool:
    """An FFN block of :data:`LAYOUTS`, or a gated one (chosen, so that :func:`mpoe_ify` can refuse it by name)."""
    gated = hasattr(module, "wo") and all(isinstance(getattr(module, g, None), nn.Module) and is_linear(getattr(module, g))
                                          for g in GATED)
    return gated or _layout(module) is not None


class Passthrough(nn.Identity):
    """Stands in for an FFN's activation, dropout or down-projection once the mixture computes them.

    ``weight = None`` keeps forwards that inspect the down-projection's weight (T5's dtype cast) working."""

    weight = None


class UpcycledFFN(nn.Module):
    """The mixture in an FFN's up-projection slot (hidden -> hidden), with routing statistics.

    Attributes
    ----------
    moe : MoEFeedForward
    layout : FFNLayout
    origin : {"linear", "conv1d"}
        The dense module type :func:`unmpoe_ify` rebuilds.
    balance_loss : torch.Tensor or None
        The Switch loss of the last forward (with its graph), ``None`` before one.
    token_counts : torch.Tensor
        ``(E,)`` kept assignments per expert since the last :func:`reset_routing_stats` (a buffer).
    dropped, assignments : torch.Tensor
        Dropped (over capacity) and all assignments over the same span (scalar buffers).
    """

    def __init__(self, moe: MoEFeedForward, layout: FFNLayout, origin: str) -> None:
        super().__init__()
        self.moe, self.layout, self.origin = moe, layout, origin
        self.balance_loss: torch.Tensor | None = None
        self.register_buffer("token_counts", torch.zeros(moe.num_experts, dtype=torch.long))
        self.register_buffer("dropped", torch.zeros((), dtype=torch.long))
        self.register_buffer("assignments", torch.zeros((), dtype=torch.long))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.moe(x)
        self.balance_loss = out.balance_loss
        with torch.no_grad():
            self.token_counts += out.routing.counts(kept_only=True)
            self.dropped += out.routing.dropped
            self.assignments += out.routing.index.numel()
        return out.output


def moe_layers(model: nn.Module) -> list[tuple[str, UpcycledFFN]]:
    """The upcycled FFNs of ``model`` with their qualified names."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, UpcycledFFN)]


def balance_loss(model: nn.Module) -> torch.Tensor:
    """Sum over the upcycled FFNs of their last forward's Switch load-balancing loss (1 per layer when balanced)."""
    losses = [m.balance_loss for _, m in moe_layers(model) if m.balance_loss is not None]
    if not losses:
        raise ValueError("no upcycled FFN has run a forward yet (mpoe_ify, then call the model)")
    return torch.stack(losses).sum()


def add_balance_loss(model: nn.Module, coef: float = 0.01) -> "HookHandles":
    """Register hooks on ``model`` so that each training forward's ``output.loss`` includes ``coef * balance_loss(model)``.

    A pre-hook clears the layers' last losses (a layer the forward skips adds nothing stale); the forward
    hook adds the sum to ``output.loss`` when the model computed one and is in training mode (in eval mode
    ``loss`` stays the task's loss, e.g. for perplexity), and always sets ``output.balance_loss``
    (outputs must be transformers ``ModelOutput``s or dicts: ``return_dict=False`` tuples are a TypeError).
    Returns a handle whose ``remove()`` removes both hooks.
    """
    if not moe_layers(model):
        raise ValueError("model has no upcycled FFN (call mpoe_ify first)")
    if isinstance(coef, bool) or not isinstance(coef, (int, float)) or not coef >= 0:
        raise ValueError(f"coef must be a float >= 0, got {coef!r}")

    def clear(module: nn.Module, args: tuple) -> None:
        for _, layer in moe_layers(module):
            layer.balance_loss = None

    def add(module: nn.Module, args: tuple, output: Any) -> Any:
        if not isinstance(output, dict):
            raise TypeError(f"add_balance_loss needs dict-like outputs (return_dict=True), got {type(output).__name__}")
        aux = balance_loss(module)
        if module.training and output.get("loss") is not None:
            output["loss"] = output["loss"] + coef * aux
        output["balance_loss"] = aux
        return output

    return HookHandles(model.register_forward_pre_hook(clear), model.register_forward_hook(add))


class HookHandles:
    """What :func:`add_balance_loss` returns: ``remove()`` removes its pre-hook and its hook."""

    def __init__(self, *handles: RemovableHandle) -> None:
        self.handles = handles

    def remove(self) -> None:
        for h in self.handles:
            h.remove()


def reset_routing_stats(model: nn.Module) -> None:
    """Zero every upcycled FFN's token counts, dropped and assignment counters."""
    for _, layer in moe_layers(model):
        for buf in (layer.token_counts, layer.dropped, layer.assignments):
            buf.zero_()


def active_parameters(model: nn.Module) -> int:
    """Parameters one token uses: every parameter of ``model`` except, in each mixture, the ``E - k`` experts
    it is not routed to (an MPOE token uses the shared centrals and ``k`` experts' auxiliaries and biases)."""
    unused = sum((m.moe.num_experts - m.moe.top_k) * m.moe.per_expert_parameters() for _, m in moe_layers(model))
    return num_parameters(model) - unused


def set_moe_trainable(model: nn.Module, mode: str) -> int:
    """``"all"``: every parameter trains; ``"auxiliary"``: only the MPOE experts' auxiliary cores and biases
    and the routers (centrals and the rest of the model frozen). Returns the trainable count."""
    if mode not in ("all", "auxiliary"):
        raise ValueError(f"mode must be 'all' or 'auxiliary', got {mode!r}")
    layers = moe_layers(model)
    if mode == "auxiliary" and not any(isinstance(m.moe, MPOEFeedForward) for _, m in layers):
        raise ValueError("mode='auxiliary' needs MPO experts (mpoe_ify(experts='mpo'))")
    for p in model.parameters():
        p.requires_grad_(mode == "all")
    for _, m in layers:
        if mode == "auxiliary" and isinstance(m.moe, MPOEFeedForward):
            m.moe.router.weight.requires_grad_(True)
            for expert in (*m.moe.experts_in, *m.moe.experts_out):
                for p in (*expert.auxiliary, expert.bias):
                    if p is not None:
                        p.requires_grad_(True)
    return num_parameters(model, trainable=True)


@dataclass
class UpcycleRow:
    name: str
    family: str
    hidden: int
    intermediate: int
    dense_params: int
    moe_params: int
    init_error: float
    """max over experts and matrices of ``||W_e - W||_F / ||W||_F`` at initialisation (0 up to rounding)."""


@dataclass
class UpcycleReport:
    """What :func:`mpoe_ify` replaced; ``print`` it for a table."""

    experts: str
    num_experts: int
    top_k: int
    params_before: int
    params_after: int = 0
    active_after: int = 0
    layers: list[UpcycleRow] = field(default_factory=list)

    def __str__(self) -> str:
        head = f"{'FFN':<40}{'family':>10}{'hidden':>8}{'interm.':>8}{'dense':>10}{'mixture':>10}{'init err':>10}"
        lines = [head, "-" * len(head)]
        lines += [f"{r.name:<40}{r.family:>10}{r.hidden:>8}{r.intermediate:>8}{r.dense_params:>10}{r.moe_params:>10}"
                  f"{r.init_error:>10.1e}" for r in self.layers]
        lines.append(f"{self.experts} experts, E={self.num_experts}, top-{self.top_k}: parameters {self.params_before} -> "
                     f"{self.params_after} ({self.params_after / max(self.params_before, 1):.3f}x), "
                     f"active per token {self.active_after}")
        return "\n".join(lines)


def _relative_errors(w: torch.Tensor, ref: torch.Tensor) -> float:
    diff = torch.linalg.vector_norm((w.detach().double() - ref.double()).flatten(1), dim=1)
    return float((diff / torch.linalg.vector_norm(ref.double()).clamp_min(1e-300)).max())


def _check_arguments(num_experts: int, top_k: int, experts: str, n: int) -> None:
    if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 2:
        raise ValueError(f"num_experts must be an int >= 2, got {num_experts!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= num_experts:
        raise ValueError(f"top_k must be an int in [1, num_experts={num_experts}], got {top_k!r}")
    if experts not in ("mpo", "dense"):
        raise ValueError(f"experts must be 'mpo' (MPOE) or 'dense' (Switch upcycling), got {experts!r}")
    check_int("n", n, minimum=3)
    if n % 2 == 0:
        raise ValueError(f"n must be odd (an inner central core), got {n}")


def mpoe_ify(
    model: nn.Module,
    num_experts: int,
    top_k: int = 1,
    include: Include = None,
    experts: str = "mpo",
    n: int = 3,
    capacity_factor: float | None = None,
    central_grad: str = "inverse_frequency",
    mask_prob: float = 0.5,
    gate: str = "unit_sum",
    noise_std: float = 0.0,
    seed: int = 0,
    train: str = "all",
    progress: bool | None = None,
) -> UpcycleReport:
    """Upcycle the chosen FFN blocks of ``model`` (in place) into mixtures of ``num_experts`` experts.

    Parameters
    ----------
    model : nn.Module
        A transformers GPT-2, T5 (non-gated), BERT-family or DistilBERT model (:data:`LAYOUTS`), or any
        model whose FFN blocks follow one of those layouts.
    num_experts : int
        ``E >= 2``.
    top_k : int, default 1
        Experts per token, ``<= E``.
    include : str, list of str, or callable, optional
        FFN block names, suffixes or globs (:data:`LAYOUTS` names them); default every FFN block.
    experts : {"mpo", "dense"}
        MPOE (shared-central MPO experts) or Switch-style dense copies.
    n : int, default 3
        MPO cores per matrix (odd, >= 3; balanced factorization of hidden and intermediate sizes).
    capacity_factor : float, optional
        Per-expert capacity (default unlimited: nothing dropped, exact at init).
    central_grad, mask_prob : MPOE's central-gradient rule (:mod:`mpo_core.moe`).
    gate : {"unit_sum", "switch"}
        :data:`mpo_core.moe.GATES`; ``"switch"`` scales top-1 outputs by the router probability (not exact at init).
    noise_std, seed : float, int
        ``seed`` draws the routers (``N(0, 0.02^2)``, the same for MPO and dense experts) and the perturbation
        of each MPO expert's auxiliaries (``noise_std``, relative to each core's RMS; 0: exact copies).
    train : {"all", "auxiliary"}
        :func:`set_moe_trainable` afterwards.
    progress : bool, optional
        A tqdm bar (default: on long runs at a terminal).

    Returns
    -------
    UpcycleReport
        Per FFN: sizes, parameters before/after, the experts' measured weight error at init.

    Raises
    ------
    ValueError
        ``num_experts < 2``, ``top_k`` outside ``[1, E]``, an ``include`` matching no FFN block, an FFN whose
        sizes cannot be factored into ``n`` cores, or another bad argument: all before the model changes.
    TypeError
        A gated FFN (T5 v1.1 ``wi_0``/``wi_1``): not supported.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    _check_arguments(num_experts, top_k, experts, n)
    if train not in ("all", "auxiliary") or (train == "auxiliary" and experts != "mpo"):
        raise ValueError(f"train must be 'all' or (with experts='mpo') 'auxiliary', got {train!r}")
    blocks = select_modules(model, include, "include", kind=_is_ffn, what="FFN block")
    plans = []
    for name, block in blocks:
        layout = _layout(block)
        if layout is None:
            raise TypeError(f"FFN block {name!r} is gated ({GATED[0]}/{GATED[1]}, T5 v1.1 / Flan-T5): mpoe_ify "
                            "supports non-gated FFNs only (GPT-2, T5 v1.0, BERT-family)")
        up, down = _get(block, layout.up), _get(block, layout.down)
        hidden, intermediate = linear_weight(up).shape
        if linear_weight(down).shape != (intermediate, hidden):
            raise ValueError(f"FFN block {name!r}: {layout.down} is not {intermediate} -> {hidden}")
        if (up.bias is None) != (down.bias is None):
            raise ValueError(f"FFN block {name!r}: {layout.up} and {layout.down} must both have a bias or neither")
        if experts == "mpo":
            try:
                resolve_shapes(hidden, intermediate, n=n)
            except ValueError as exc:
                raise ValueError(f"n={n}: FFN block {name!r} ({hidden} x {intermediate}) cannot be factored into "
                                 f"{n} cores: {exc}") from exc
        plans.append((name, block, layout, up, down))
    kwargs = dict(capacity_factor=capacity_factor, gate=gate)
    if experts == "mpo":
        kwargs.update(central_grad=central_grad, mask_prob=mask_prob)
    report = UpcycleReport(experts, num_experts, top_k, num_parameters(model))
    generator, routers = torch.Generator().manual_seed(seed), torch.Generator().manual_seed(seed)
    built = []
    for name, block, layout, up, down in progress_bar(plans, "mpoe_ify", progress):
        act = _get(block, layout.act)
        if layout.hidden_dropout is not None:
            act = nn.Sequential(act, _get(block, layout.hidden_dropout))
        if experts == "mpo":
            moe = MPOEFeedForward.from_dense(up, down, num_experts, top_k, n=n, noise_std=noise_std,
                                             generator=generator, activation=act, **kwargs)
        else:
            moe = SwitchFeedForward.from_dense(up, down, num_experts, top_k, activation=act, **kwargs)
        moe.train(block.training)
        with torch.no_grad():  # routers from the seed alone: MPO and dense experts of one seed route alike
            moe.router.weight.copy_(torch.randn(moe.router.weight.shape, generator=routers) * 0.02)
            w_in, _, w_out, _ = moe.expert_weights()
        error = max(_relative_errors(w_in, linear_weight(up)), _relative_errors(w_out, linear_weight(down)))
        dense = sum(p.numel() for m in (up, down) for p in m.parameters())
        report.layers.append(UpcycleRow(name, layout.family, w_in.shape[1], w_in.shape[2], dense, num_parameters(moe), error))
        built.append((block, layout, UpcycledFFN(moe, layout, "linear" if isinstance(up, nn.Linear) else "conv1d")))
    for block, layout, layer in built:
        _set(block, layout.up, layer)
        for path in (layout.act, layout.hidden_dropout, layout.down):
            if path is not None:
                _set(block, path, Passthrough())
    set_moe_trainable(model, train)
    report.params_after, report.active_after = num_parameters(model), active_parameters(model)
    return report


@dataclass
class MergeReport:
    """What :func:`unmpoe_ify` merged: per FFN, the merge weights and the relative error (see there)."""

    merge: str
    layers: dict[str, dict[str, Any]] = field(default_factory=dict)

    @property
    def max_error(self) -> float:
        return max((r["error"] for r in self.layers.values()), default=0.0)


def _merge_weights(layer: UpcycledFFN, merge: str, name: str) -> torch.Tensor:
    if merge == "average":
        return torch.full((layer.moe.num_experts,), 1.0 / layer.moe.num_experts, dtype=torch.float64)
    counts = layer.token_counts.double()
    if counts.sum() == 0:
        raise ValueError(f"merge='routed' needs routing statistics, but {name!r} has routed no token since its last "
                         "reset: run the model on data first, or use merge='average'")
    return counts / counts.sum()


def unmpoe_ify(model: nn.Module, merge: str = "average", include: Include = None) -> MergeReport:
    """Merge every chosen :class:`UpcycledFFN` of ``model`` back into the dense FFN modules it replaced.

    Each matrix and bias becomes the weighted mean of the experts' (``merge="average"``: equal weights;
    ``"routed"``: each expert's share of the tokens it processed since the last :func:`reset_routing_stats`).
    The router is dropped. The reported ``error`` per FFN is, over its two matrices, the largest
    ``sqrt(sum_e w_e ||W_e - W_merged||^2 / sum_e w_e ||W_e||^2)``: how far the experts sit from their
    merge, weighted as merged (0 when the experts are equal, as right after :func:`mpoe_ify`). The merged
    model equals the mixture only when that error is 0; the FFN output error on data is not measured here.

    ``include`` chooses among the upcycled FFNs' names (``...mlp.c_fc``: the up-projection slot they occupy).
    Returns a :class:`MergeReport` (empty when nothing is upcycled).
    """
    if merge not in ("average", "routed"):
        raise ValueError(f"merge must be 'average' or 'routed', got {merge!r}")
    chosen = moe_layers(model) if include is None else [
        (name, m) for name, m in select_modules(model, include, kind=lambda m: isinstance(m, UpcycledFFN), what="upcycled FFN")]
    weights = {name: _merge_weights(layer, merge, name) for name, layer in chosen}  # every check before any change
    report = MergeReport(merge)
    for name, layer in chosen:
        wts, moe, layout = weights[name], layer.moe, layer.layout
        block_name = name[: len(name) - len(layout.up)].rstrip(".")
        block = model.get_submodule(block_name)
        row: dict[str, Any] = {"weights": wts.tolist(), "error": 0.0}
        with torch.no_grad():
            w_in, b_in, w_out, b_out = moe.expert_weights()
            merged = []
            for w, b in ((w_in, b_in), (w_out, b_out)):
                wd = w.double()
                mean = torch.einsum("e,eij->ij", wts.to(wd), wd)
                spread = torch.einsum("e,e->", wts.to(wd), (wd - mean).pow(2).sum((1, 2)))
                scale = torch.einsum("e,e->", wts.to(wd), wd.pow(2).sum((1, 2)))
                row["error"] = max(row["error"], math.sqrt(float(spread / scale.clamp_min(1e-300))))
                bias = None if b is None else torch.einsum("e,ej->j", wts.to(wd), b.double()).to(b.dtype)
                merged.append(dense_from_weight(mean.to(w.dtype), bias, layer.origin))
        act = moe.activation
        _set(block, layout.up, merged[0])
        _set(block, layout.down, merged[1])
        if layout.hidden_dropout is not None:
            _set(block, layout.hidden_dropout, act[1])
            act = act[0]
        _set(block, layout.act, act)
        for m in merged:
            m.train(layer.training)
        report.layers[block_name] = row
    return report
