"""OPF (Gao et al., ACL 2023): over-parameterized fine-tuning through MPOs, merged back for inference.

A dense ``nn.Linear`` is replaced during fine-tuning by an :class:`~mpo_core.nn.MPOLinear` with *more*
parameters than the dense matrix: the exact (full-rank) decomposition, optionally with every
inner bond padded beyond its full rank. Padding keeps ``W`` exact: for bond ``k`` between cores
``k`` and ``k + 1`` the new slots of core ``k`` (its extra right-bond columns) get small noise and
the new slots of core ``k + 1`` (its extra left-bond rows) are zero, so nothing reaches the output
through them at initialization, yet the zero rows receive gradient at once (through the noise),
as LoRA's zero/random pair. After fine-tuning, :meth:`OverParameterization.merge` contracts every
MPO back into a dense ``nn.Linear``: the deployed model has the original architecture, so there is
no added latency.

Which matrices to over-parameterize: :func:`importance_scores` gives each candidate the first-order
(Taylor) importance ``||W ⊙ ∂L/∂W||_F`` on a few batches; :meth:`OverParameterization.select`
expands the top ``k`` once (static) or, called every ``N`` steps, swaps the set (dynamic: newly
selected matrices are expanded, dropped ones merged back). After a swap the optimizer must see
the new parameters: :func:`sync_optimizer` updates it in place and keeps the state of every
parameter that survived.
"""
from __future__ import annotations

import math
from typing import Any, Callable, Iterable, Sequence

import torch
from torch import nn

from mpo_core.decompose import decompose
from mpo_core.nn import Include, MPOLinear, dense_module, is_linear, linear_weight, replace_module, select_modules, shape_kwargs
from mpo_core.shapes import BondSpec, bond_list, check_int, full_ranks

__all__ = ["expand_linear", "importance_scores", "select_top", "OverParameterization", "sync_optimizer"]


def _padded_ranks(min_bond: BondSpec, full: list[int]) -> list[int]:
    """The full ranks with every inner bond raised to at least ``min_bond`` (int, or per-bond list >= full)."""
    if min_bond is None:
        return list(full)
    if isinstance(min_bond, (Sequence, torch.Tensor)):
        values = bond_list(min_bond, len(full) - 1, "min_bond")
        for k, (v, f) in enumerate(zip(values, full)):
            if v < f:
                raise ValueError(f"min_bond[{k}]={v!r} is below the full rank {f}: OPF over-parameterizes and never truncates")
        return values
    min_bond = check_int("min_bond", min_bond)
    return [1] + [max(f, min_bond) for f in full[1:-1]] + [1]


def expand_linear(
    linear: nn.Linear,
    n: int | None = 5,
    in_shape: Sequence[int] | None = None,
    out_shape: Sequence[int] | None = None,
    min_bond: BondSpec = None,
    noise_std: float = 1e-3,
    generator: torch.Generator | None = None,
    strategy: str = "auto",
) -> MPOLinear:
    """Over-parameterize ``linear`` as an exact :class:`MPOLinear` with full or padded bonds.

    Parameters
    ----------
    linear : nn.Linear
        Its ``weight.T`` is decomposed exactly (TT-SVD in float64, cores in the
        :meth:`~mpo_core.mpo.MPO.balanced` gauge), the bias copied.
    n, in_shape, out_shape : optional
        Cores and mode sizes, as :func:`mpo_core.decompose` (shapes win over ``n``).
    min_bond : int or list of int, optional
        Bonds to pad to: ``None`` = the full ranks (already more entries than the dense matrix for
        ``n >= 3`` on most shapes); an int = every inner bond at least that; a list ``[1, d_1, ...,
        d_{n-1}, 1]`` (or the inner bonds) with every ``d_k`` at least the full rank.
    noise_std : float, default 1e-3
        Std of the padding noise, relative to the RMS of the core it is added to.
    generator : torch.Generator, optional
        For the noise (CPU generator; the noise is moved to the weight's device).
    strategy : str
        Contraction strategy of the new layer.

    Returns
    -------
    MPOLinear
        ``to_linear()`` equals ``linear`` up to float rounding; ``error_bound`` is the (zero, up
        to rounding) discarded norm.
    """
    if not is_linear(linear):
        raise TypeError(f"linear must be an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
    if isinstance(noise_std, bool) or not isinstance(noise_std, (int, float)) or not (noise_std >= 0 and math.isfinite(noise_std)):
        raise ValueError(f"noise_std must be a finite float >= 0, got {noise_std!r}")
    weight = linear_weight(linear)
    # balanced gauge: the TT-SVD's orthonormal cores have entries far smaller than its last core's, and Adam's
    # equal-size steps would move them by a large relative amount
    mpo = decompose(weight.double(), in_shape, out_shape, n=n if in_shape is None else None).balanced()
    target = _padded_ranks(min_bond, full_ranks(mpo.in_shape, mpo.out_shape))
    cores = []
    for k, src in enumerate(mpo.cores):
        a, i, j, b = src.shape
        padded = torch.zeros(target[k], i, j, target[k + 1], dtype=torch.float64, device=src.device)
        padded[:a, :, :, :b] = src
        if target[k + 1] > b:  # new right-bond columns of the original left rows: noise
            rms = float(src.pow(2).mean().sqrt())
            noise = torch.randn(a, i, j, target[k + 1] - b, generator=generator, dtype=torch.float64)
            padded[:a, :, :, b:] = noise.to(src.device) * (noise_std * rms)
        cores.append(padded.to(device=weight.device, dtype=weight.dtype))
    layer = MPOLinear.from_cores(cores, linear.bias, strategy=strategy)
    layer.error_bound = mpo.error_bound
    layer.origin = "linear" if isinstance(linear, nn.Linear) else "conv1d"
    return layer


def _dense_in_out(module: nn.Module) -> torch.Tensor:
    """``W`` as ``(in_features, out_features)`` for a linear module or an :class:`MPOLinear`."""
    return module.weight.detach().T if isinstance(module, MPOLinear) else linear_weight(module)


def importance_scores(
    model: nn.Module,
    batches: Iterable[Any],
    loss_fn: Callable[[nn.Module, Any], torch.Tensor],
    include: Include = None,
) -> dict[str, float]:
    """First-order importance ``||W ⊙ ∂L/∂W||_F`` of every matching linear layer.

    Parameters
    ----------
    model : nn.Module
        Its ``nn.Linear`` and :class:`MPOLinear` modules matching ``include`` are scored alike: the
        gradient of the dense ``W`` (``in x out``) is ``x^T g`` from each call's input ``x`` and
        output gradient ``g`` (captured by hooks), summed over all calls and batches, so an
        expanded layer scores as its dense matrix would.
    batches : iterable
        A few batches; each is passed to ``loss_fn``.
    loss_fn : callable
        ``loss_fn(model, batch) -> scalar loss``.
    include : str, list of str, or callable, optional
        Module names / glob patterns / predicate (as :func:`mpo_core.nn.mpo_ify`); default all.

    Returns
    -------
    dict of str to float
        Score per module name. No parameter's ``.grad`` is touched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    if not callable(loss_fn):
        raise TypeError(f"loss_fn must be callable (model, batch) -> loss, got {type(loss_fn).__name__}")
    targets = dict(select_modules(model, include, kind=lambda m: is_linear(m) or isinstance(m, MPOLinear)))
    grads = {name: torch.zeros_like(_dense_in_out(mod), dtype=torch.float64) for name, mod in targets.items()}
    calls: list[tuple[str, torch.Tensor, torch.Tensor]] = []

    def hook(name: str):
        def record(_mod: nn.Module, args: tuple, output: torch.Tensor) -> None:
            calls.append((name, args[0].detach(), output))
        return record

    handles = [mod.register_forward_hook(hook(name)) for name, mod in targets.items()]
    seen = 0
    try:
        for batch in batches:
            seen += 1
            calls.clear()
            loss = loss_fn(model, batch)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise ValueError("loss_fn must return a scalar tensor")
            outs = [out for _, _, out in calls]
            gouts = torch.autograd.grad(loss, outs, allow_unused=True) if outs else []
            for (name, x, _), g in zip(calls, gouts):
                if g is not None:
                    grads[name] += x.reshape(-1, x.shape[-1]).double().T @ g.reshape(-1, g.shape[-1]).double()
    finally:
        for h in handles:
            h.remove()
        calls.clear()
    if seen == 0:
        raise ValueError("batches must hold at least one batch")
    return {name: float(torch.linalg.vector_norm(_dense_in_out(targets[name]).double() * grads[name])) for name in targets}


def select_top(scores: dict[str, float], k: int | float) -> list[str]:
    """Names of the ``k`` highest scores (an int, or a fraction in ``(0, 1]`` of the candidates),
    ties broken by name; returned in descending score order."""
    if not isinstance(scores, dict) or not scores:
        raise ValueError("scores must be a non-empty dict of name -> score")
    if isinstance(k, bool) or not isinstance(k, (int, float)):
        raise TypeError(f"k must be an int or a float fraction, got {type(k).__name__}")
    if isinstance(k, float):
        if not 0.0 < k <= 1.0:
            raise ValueError(f"a float k is a fraction of the candidates and must be in (0, 1], got {k}")
        k = max(1, round(k * len(scores)))
    if not 0 <= k <= len(scores):
        raise ValueError(f"k must be in [0, {len(scores)}], got {k}")
    return sorted(scores, key=lambda name: (-scores[name], name))[:k]


class OverParameterization:
    """Which linear layers of a model are currently over-parameterized MPOs; expand, merge, swap.

    Parameters
    ----------
    model : nn.Module
        Modified in place.
    include : str, list of str, or callable, optional
        The candidate ``nn.Linear`` modules (names / globs / predicate); default all.
    n, min_bond, noise_std, strategy :
        Passed to :func:`expand_linear` (``n`` may be a callable ``(in, out) -> (in_shape, out_shape)``).
    seed : int
        Seeds the padding noise (one generator for the controller's lifetime).

    Attributes
    ----------
    candidates : list of str
        Names of the candidate layers (fixed at construction).
    expanded : set of str
        Names currently held as :class:`MPOLinear`.
    """

    def __init__(
        self,
        model: nn.Module,
        include: Include = None,
        n: int | Callable[[int, int], tuple[Sequence[int], Sequence[int]]] = 5,
        min_bond: BondSpec = None,
        noise_std: float = 1e-3,
        seed: int = 0,
        strategy: str = "auto",
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        self.model = model
        self.candidates = [name for name, _ in select_modules(model, include)]
        self.n, self.min_bond, self.noise_std, self.strategy = n, min_bond, noise_std, strategy
        self.generator = torch.Generator().manual_seed(seed)
        self.expanded: set[str] = set()

    def _check(self, names: Iterable[str]) -> list[str]:
        names = list(names)
        unknown = [x for x in names if x not in self.candidates]
        if unknown:
            raise ValueError(f"not candidate layers: {unknown}; candidates are {self.candidates}")
        return names

    def expand(self, names: Iterable[str]) -> list[str]:
        """Over-parameterize the named (dense) candidates; returns those newly expanded."""
        done = []
        for name in self._check(names):
            if name in self.expanded:
                continue
            linear = self.model.get_submodule(name)
            rows, cols = linear_weight(linear).shape
            shape_kw = shape_kwargs(self.n, rows, cols)
            if "in_shape" in shape_kw:
                shape_kw["n"] = None
            try:
                layer = expand_linear(linear, min_bond=self.min_bond, noise_std=self.noise_std, generator=self.generator,
                                      strategy=self.strategy, **shape_kw)
            except ValueError as exc:
                raise ValueError(f"cannot expand layer {name!r} ({rows}x{cols}): {exc}") from exc
            layer.train(linear.training)
            replace_module(self.model, name, layer)
            self.expanded.add(name)
            done.append(name)
        return done

    def merge(self, names: Iterable[str] | None = None) -> list[str]:
        """Contract the named expanded layers (default: all) back into their dense module type
        (``nn.Linear`` or transformers ``Conv1D``); returns them."""
        names = sorted(self.expanded) if names is None else self._check(names)
        done = []
        for name in names:
            if name not in self.expanded:
                continue
            layer = self.model.get_submodule(name)
            linear = dense_module(layer)
            linear.train(layer.training)
            replace_module(self.model, name, linear)
            self.expanded.discard(name)
            done.append(name)
        return done

    def select(self, scores: dict[str, float], k: int | float) -> tuple[list[str], list[str]]:
        """Make the top-``k`` candidates by ``scores`` the expanded set.

        Returns ``(added, dropped)``: the layers newly expanded and those merged back. Either being
        non-empty means the model's parameters changed (see :func:`sync_optimizer`).
        """
        missing = [c for c in self.candidates if c not in scores]
        if missing:
            raise ValueError(f"scores lack candidate layers {missing}")
        target = select_top({c: scores[c] for c in self.candidates}, k)
        dropped = self.merge(sorted(self.expanded - set(target)))
        added = self.expand(target)
        return added, dropped

    def rescore(self, batches: Iterable[Any], loss_fn: Callable[[nn.Module, Any], torch.Tensor],
                k: int | float) -> tuple[list[str], list[str]]:
        """:func:`importance_scores` of the candidates on ``batches``, then :meth:`select`."""
        scores = importance_scores(self.model, batches, loss_fn, include=lambda name, mod: name in self.candidates)
        return self.select(scores, k)

    def extra_params(self) -> int:
        """Core entries of the expanded layers minus their dense weight entries (> 0: over-parameterized)."""
        total = 0
        for name in self.expanded:
            layer = self.model.get_submodule(name)
            total += sum(c.numel() for c in layer.cores) - layer.in_features * layer.out_features
        return total


def sync_optimizer(optimizer: torch.optim.Optimizer, params: Iterable[nn.Parameter]) -> torch.optim.Optimizer:
    """Make ``optimizer`` hold exactly the trainable ``params``, in place, after layers were swapped.

    Parameters it holds that are not in ``params`` (merged-away cores, replaced dense weights) are
    removed with their state; parameters it already holds keep their groups and state (e.g. Adam
    moments and step); new ones join the first parameter group and start fresh. Schedulers stay
    attached. Use after :meth:`OverParameterization.select` changed the model.

    Returns
    -------
    torch.optim.Optimizer
        The same object.
    """
    if not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"optimizer must be a torch.optim.Optimizer, got {type(optimizer).__name__}")
    wanted = [p for p in params if p.requires_grad]
    keep = {id(p) for p in wanted}
    for group in optimizer.param_groups:
        group["params"] = [p for p in group["params"] if id(p) in keep]
    held = {id(p) for group in optimizer.param_groups for p in group["params"]}
    optimizer.param_groups[0]["params"].extend(p for p in wanted if id(p) not in held)
    for p in [p for p in optimizer.state if id(p) not in keep]:
        del optimizer.state[p]
    return optimizer
