"""Build each MPO weight once per optimizer step, not once per micro-batch.

With gradient accumulation every micro-batch of one optimizer step sees the same cores, so
the dense ``W`` of each :class:`~mpo_core.nn.MPOLinear` is the same too. Inside
:func:`weight_cache`:

1. each layer's ``W`` is rebuilt once from its cores, with its autograd graph kept;
2. every forward uses a detached leaf copy ``W'`` of it (one GEMM, like ``nn.Linear``), and
   each micro-batch's backward accumulates ``dL/dW`` in ``W'.grad``;
3. when the context ends, ``dL/dW`` is propagated through the rebuild into the cores once
   (added to whatever ``.grad`` they hold), before gradient clipping and the optimizer.

The gradients equal those of rebuilding in every micro-batch (the rebuild is linear in each
core, so the sum over micro-batches can be taken before or after it); only the floating-point
summation order differs. Layers whose central core is one shared ``nn.Parameter``
(MPOBERT) are rebuilt together: the per-layer outer blocks are stacked and multiplied with
the central in one large GEMM and one batched GEMM, in the order the cost model prices
cheaper.

::

    with weight_cache(model):
        for batch in micro_batches:
            loss_fn(model(batch)).backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()

Data parallel: the cores' gradients appear only when the context ends, after the last
backward, so ``DistributedDataParallel`` cannot reduce them. Exclude the cores from DDP with
:func:`exclude_cores_from_ddp` before wrapping the model, and pass ``process_group`` (or
``True`` for the default group): the context then averages the cores' gradients over the
ranks itself, in one flat all-reduce. DDP reduces every other parameter as usual.

Without accumulation, :func:`forward_weights` builds every ``W`` of one forward the same batched way,
and the backward reaches the cores through autograd as usual (nothing deferred): a model calls it
around its layers (MPOBERT's encoder does), so a plain ``model(x)`` + ``loss.backward()`` loop gets
the batched rebuild with no context to remember.
"""
from __future__ import annotations

import math
from contextlib import contextmanager
from typing import Iterator, Sequence

import torch
import torch.distributed as dist
from torch import nn

from mpo_core.cost import device_model, gemm_cost
from mpo_core.nn import MPOLinear
from mpo_core.nn.linear import LOW_RANK_SCOPE, with_update
from mpo_core.rebuild import REBUILD_SCOPE, dense_matrix

__all__ = ["weight_cache", "forward_weights", "build_weight_blocks", "shared_central_weights", "exclude_cores_from_ddp", "mpo_core_names"]


def _layers(module: nn.Module) -> list[MPOLinear]:
    if isinstance(module, nn.parallel.DistributedDataParallel):
        module = module.module
    if not isinstance(module, nn.Module):
        raise TypeError(f"module must be an nn.Module, got {type(module).__name__}")
    return [m for m in module.modules() if isinstance(m, MPOLinear)]


def _central_order(left: int, rows: int, d_in: int, middle: int, d_out: int, right: int, layers: int,
                   dtype: torch.dtype, device_type: str) -> str:
    """``"left"`` to multiply the stacked left blocks with the central first, ``"right"`` for the right blocks.

    ``left``/``right``: modes of the outer blocks (``rows`` = ``left``); ``d_in``/``d_out``: the central's
    bonds; ``middle``: its modes. Priced by the cost model (FLOPs and bytes of the two products).
    """
    model, item = device_model(device_type), dtype.itemsize

    def seconds(m: int, k: int, n: int, batch: int) -> float:
        return model.seconds(gemm_cost(m, k, n, item, batch=batch), dtype)

    left_first = seconds(layers * left, d_in, middle * d_out, 1) + seconds(left * middle, d_out, right, layers)
    right_first = seconds(d_in * middle, d_out, layers * right, 1) + seconds(left, d_in, middle * right, layers)
    return "left" if left_first <= right_first else "right"


class _GradMul(torch.autograd.Function):
    """Identity forward; backward multiplies the gradient by ``factor`` (broadcast to the input's shape)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(factor)
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (factor,) = ctx.saved_tensors
        return grad * factor.to(grad.dtype), None


def _flat_gemm(a: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
    """``(L, m, k) @ (k, n) -> (L, m, n)`` as one ``(L m, k) @ (k, n)`` GEMM."""
    return (a.reshape(-1, a.shape[2]) @ c).view(a.shape[0], a.shape[1], c.shape[1])


class _SharedGemm(torch.autograd.Function):
    """``a[l] @ c`` for every ``l`` in one GEMM; ``c``'s gradient sums ``scale[l] * a[l]^T g[l]`` (one GEMM)."""

    @staticmethod
    def forward(ctx, a: torch.Tensor, c: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(a, c, scale)
        return _flat_gemm(a, c)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        a, c, scale = ctx.saved_tensors
        g = grad.reshape(-1, c.shape[1])
        grad_a = (g @ c.T).view(a.shape) if ctx.needs_input_grad[0] else None
        grad_c = None
        if ctx.needs_input_grad[1]:
            grad_c = (a * scale.to(a.dtype)[:, None, None]).reshape(-1, a.shape[2]).T @ g
        return grad_a, grad_c, None


def _shared_gemm(a: torch.Tensor, c: torch.Tensor, scale: torch.Tensor | None) -> torch.Tensor:
    """``(L, m, k) @ (k, n) -> (L, m, n)`` as one GEMM, ``scale`` (``(L,)``) weighting each ``l`` in ``c``'s gradient."""
    return _flat_gemm(a, c) if scale is None else _SharedGemm.apply(a, c, scale)


def _stacked_block(chains: Sequence[Sequence[torch.Tensor]], indices: range) -> torch.Tensor:
    """Cores ``indices`` of every chain merged left to right, all chains at once: ``(L, d_left, I, J, d_right)``
    (modes in C order), one batched contraction per core instead of one rebuild per chain."""
    acc = torch.stack([ch[indices[0]] for ch in chains])
    for k in indices[1:]:
        core = torch.stack([ch[k] for ch in chains])
        layers, d_left, rows, cols, _ = acc.shape
        acc = torch.einsum("laIJd,ldijb->laIiJjb", acc, core).reshape(
            layers, d_left, rows * core.shape[2], cols * core.shape[3], core.shape[4])
    return acc


def shared_central_weights(chains: Sequence[Sequence[torch.Tensor]], center: int, side: str | None = None,
                           central_grad_scale: torch.Tensor | None = None) -> torch.Tensor:
    """Dense matrices of several MPOs that share core ``center`` (the same tensor), built together.

    Parameters
    ----------
    chains : sequence of sequences of torch.Tensor
        ``L`` core lists of identical shapes; ``chains[l][center]`` is the same tensor for every ``l``.
    center : int
        Index of the shared core (``0 < center < n - 1``).
    side : {None, "left", "right"}
        Which stacked outer blocks meet the shared core first; ``None``: the cheaper by the cost model.
    central_grad_scale : torch.Tensor, optional
        Shapes the shared core's gradient (the forward and the other cores' gradients are unchanged):
        ``(L,)`` multiplies chain ``l``'s contribution by ``central_grad_scale[l]``; a tensor of the core's
        shape multiplies its whole gradient entry by entry (a mask). MPOE balances its shared centrals so.

    Returns
    -------
    torch.Tensor
        ``(L, prod(in_shape), prod(out_shape))``, C order, differentiable with respect to every core.
        Per layer the left cores ``0..center-1`` and the right cores ``center+1..n-1`` are merged
        into one block each (all layers in one batched contraction per core); the stacked blocks then meet the
        shared core in one GEMM and one batched GEMM, whichever side first the cost model prices cheaper.
    """
    n = len(chains[0])
    if side not in (None, "left", "right"):
        raise ValueError(f"side must be None, 'left' or 'right', got {side!r}")
    if not 0 < center < n - 1:
        raise ValueError(f"center must be an inner core index in (0, {n - 1}), got {center}")
    central = chains[0][center]
    d_in, ic, jc, d_out = central.shape
    in_shape = [int(c.shape[1]) for c in chains[0]]
    out_shape = [int(c.shape[2]) for c in chains[0]]
    layers = len(chains)
    # (L, I_left * J_left, d_in) and (L, d_out, I_right * J_right), modes in C order within each block
    lefts = _stacked_block(chains, range(center)).reshape(layers, -1, d_in)
    rights = _stacked_block(chains, range(center + 1, n)).reshape(layers, d_out, -1)
    left, right, middle = lefts.shape[1], rights.shape[2], ic * jc
    side = side or _central_order(left, left, d_in, middle, d_out, right, layers, central.dtype, central.device.type)
    per_chain = None
    if central_grad_scale is not None and central_grad_scale.shape == central.shape:  # one mask for every chain
        central = _GradMul.apply(central, central_grad_scale)
    elif central_grad_scale is not None:
        per_chain = central_grad_scale.reshape(layers)
    if side == "left":
        t = _shared_gemm(lefts, central.reshape(d_in, middle * d_out), per_chain)
        w = torch.bmm(t.view(layers, left * middle, d_out), rights)
    else:  # (rights_l^T C^T)^T = C rights_l, the shared core on the right of the product
        t = _shared_gemm(rights.transpose(1, 2), central.reshape(d_in * middle, d_out).T, per_chain)
        w = torch.bmm(lefts, t.transpose(1, 2).reshape(layers, d_in, middle * right))
    il, jl = math.prod(in_shape[:center]), math.prod(out_shape[:center])
    ir, jr = math.prod(in_shape[center + 1:]), math.prod(out_shape[center + 1:])
    w = w.view(layers, il, jl, ic, jc, ir, jr).permute(0, 1, 3, 5, 2, 4, 6)
    return w.reshape(layers, il * ic * ir, jl * jc * jr)


def _group_key(layer: MPOLinear) -> tuple:
    cores = list(layer.cores)
    return (id(cores[layer.central_index]), layer.central_index, tuple(tuple(c.shape) for c in cores),
            cores[0].dtype, cores[0].device)


def _stacked_updates(stacked: torch.Tensor, updates: list) -> torch.Tensor:
    """``stacked[l] + U_l D_l`` for each layer ``l`` with an update (:meth:`MPOLinear.attach_update`)."""
    if all(u is None for u in updates):
        return stacked
    if all(u is not None for u in updates):
        with torch.profiler.record_function(LOW_RANK_SCOPE):
            return torch.baddbmm(stacked, torch.stack([u.U for u in updates]), torch.stack([u.D for u in updates]))
    return torch.stack([with_update(w, u) for w, u in zip(stacked, updates)])


def build_weight_blocks(layers: list[MPOLinear]) -> list[tuple[torch.Tensor, list[int]]]:
    """The layers' dense weights (attached updates included) in the ``(in, out)`` layout the rebuild
    gives (no transposed copy: measured 0.5 s of a 1.2 s MPOBERT-12 rebuild on one CPU thread), with
    graph, as blocks ``(weights (G, in, out), indices of the G layers)``: layers sharing a central are
    built together, and their block is back-propagated as one tensor (no per-layer slicing in the backward)."""
    groups: dict[tuple, list[int]] = {}
    for i, layer in enumerate(layers):
        groups.setdefault(_group_key(layer), []).append(i)
    blocks = []
    with torch.profiler.record_function(REBUILD_SCOPE):
        for idx in groups.values():
            c = layers[idx[0]].central_index
            if len(idx) > 1 and 0 < c < layers[idx[0]].n - 1:
                stacked = shared_central_weights([list(layers[i].cores) for i in idx], c)
                stacked = _stacked_updates(stacked, [layers[i].update for i in idx])
                blocks.append((stacked, idx))
            else:
                blocks.extend((with_update(dense_matrix(list(layers[i].cores)), layers[i].update)[None], [i])
                              for i in idx)
    return blocks


def _versions(layers: list[MPOLinear]) -> list[tuple[int, ...]]:
    return [tuple(t._version for t in layer.weight_tensors) for layer in layers]


def _all_reduce_mean(grads: list[torch.Tensor], group) -> None:
    """Average ``grads`` over the ranks of ``group`` in place, as one flat all-reduce."""
    if not grads:
        return
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat, group=group)
    flat /= dist.get_world_size(group)
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


@contextmanager
def forward_weights(module: nn.Module) -> Iterator[None]:
    """Build every :class:`~mpo_core.nn.MPOLinear` weight of ``module`` once for the enclosed forward.

    Layers sharing a central are built together (:func:`build_weight_blocks`), with graph, and each
    layer's calls inside are one GEMM with its ``W``; the backward reaches the cores through autograd,
    as when each layer rebuilds its own ``W``. Under ``torch.autocast`` the build runs in the autocast
    dtype like every other product of the forward (the GEMM would cast ``W`` to it anyway); the
    gradient reaching the cores is float32 as for any autocast weight. Does nothing inside
    :func:`weight_cache` (its step weights are in place, built in the cores' dtype) and where no
    weight needs a gradient (inference keeps its cached ``W``).
    A model wraps its layer loop in it: MPOBERT's encoder does.
    """
    layers = _layers(module) if torch.is_grad_enabled() else []  # inference: not even the module walk
    busy = any(layer.step_weight is not None for layer in layers)
    track = [] if busy else [layer for layer in layers if any(t.requires_grad for t in layer.weight_tensors)]
    if not track:
        yield
        return
    blocks = build_weight_blocks(track)  # under the caller's autocast: in its dtype, as the GEMMs run
    for block, idx in blocks:
        for i, w in zip(idx, block.unbind(0)):  # one UnbindBackward: the block's gradient stacked once
            track[i].step_weight = w
    try:
        yield
    finally:
        for layer in track:
            layer.step_weight = None


@contextmanager
def weight_cache(module: nn.Module, process_group: object = None, dtype: torch.dtype | None = None) -> Iterator[None]:
    """Rebuild every :class:`~mpo_core.nn.MPOLinear` weight of ``module`` once for the enclosed micro-batches.

    Parameters
    ----------
    module : nn.Module
        Searched recursively (a ``DistributedDataParallel`` wrapper is looked through).
    process_group : ProcessGroup, True or None
        Data parallel: average the cores' gradients over this group (``True``: the default
        group) when the context ends. The cores must be excluded from DDP
        (:func:`exclude_cores_from_ddp`). ``None``: no communication.
    dtype : torch.dtype, optional
        Run the rebuild's products in this dtype (the autocast dtype of the micro-batches, e.g.
        ``torch.bfloat16``: its GEMMs would cast ``W`` to it anyway). The step weights are kept in
        the cores' dtype, so ``dL/dW`` accumulates there over the micro-batches. Default: the cores' dtype.

    Notes
    -----
    The weights are built when the context is entered, in the cores' dtype with autocast off, or
    with ``dtype`` under autocast in that dtype (under ``torch.autocast`` the forward's GEMM casts
    ``W'`` as it would cast an ``nn.Linear`` weight). The cores must not change inside the context (the optimizer step
    belongs after it): a changed core raises ``RuntimeError`` at the end, and so does a
    nested ``weight_cache`` over the same layer. If the block raises, nothing is propagated.
    """
    layers = _layers(module)
    if process_group is not None and not dist.is_initialized():
        raise ValueError("process_group was given but torch.distributed is not initialized")
    if process_group is True:
        process_group = dist.group.WORLD
    if any(layer.step_weight is not None for layer in layers):
        raise RuntimeError("weight_cache is already active on a layer of this module (nested weight_cache)")
    grad = torch.is_grad_enabled()
    track = [layer for layer in layers if grad and any(t.requires_grad for t in layer.weight_tensors)]
    frozen = [layer for layer in layers if layer not in track]
    if dtype is not None and not (isinstance(dtype, torch.dtype) and dtype.is_floating_point):
        raise TypeError(f"dtype must be a floating torch.dtype or None, got {dtype!r}")
    device_type = layers[0].cores[0].device.type if layers else "cpu"
    if layers and dtype == layers[0].cores[0].dtype:
        dtype = None
    with torch.autocast(device_type, dtype=dtype, enabled=dtype is not None):
        built = build_weight_blocks(track) if track else []
        with torch.no_grad():
            frozen_blocks = build_weight_blocks(frozen) if frozen else []
    if dtype is not None:  # kept in the cores' dtype: the micro-batches' dL/dW accumulate there
        built = [(block.to(track[idx[0]].cores[0].dtype), idx) for block, idx in built]
        frozen_blocks = [(block.to(frozen[idx[0]].cores[0].dtype), idx) for block, idx in frozen_blocks]
    leaves: list[torch.Tensor | None] = [None] * len(track)
    for block, idx in built:
        data = block.detach()
        for pos, i in enumerate(idx):
            leaves[i] = data[pos].requires_grad_()
    versions = _versions(track)
    for layer, w in zip(track, leaves):
        layer.step_weight = w
    for block, idx in frozen_blocks:
        for pos, i in enumerate(idx):
            frozen[i].step_weight = block[pos]
    try:
        yield
    finally:
        for layer in layers:
            layer.step_weight = None
    if _versions(track) != versions:
        raise RuntimeError("a core changed inside weight_cache (step the optimizer after the context ends)")
    outs, grads = [], []
    for block, idx in built:
        got = [leaves[i].grad for i in idx]
        if all(g is None for g in got):
            continue
        outs.append(block)
        grads.append(torch.stack([g if g is not None else torch.zeros_like(leaves[i]) for g, i in zip(got, idx)]))
    if outs:
        torch.autograd.backward(outs, grads)
    if process_group is not None:
        cores = {id(c): c for layer in track for c in layer.weight_tensors if c.requires_grad}
        present = [c.grad for c in cores.values() if c.grad is not None]
        _all_reduce_mean(present, process_group)


def mpo_core_names(module: nn.Module) -> list[str]:
    """Qualified names of every MPO core of ``module``'s layers (and of their attached updates' ``U`` and
    ``D``, whose gradients also arrive when :func:`weight_cache` ends), each alias of a shared core included
    (a shared central is reachable under one name per layer and one in its owner)."""
    ids = {id(c) for layer in _layers(module) for c in layer.weight_tensors}
    return [name for name, p in module.named_parameters(remove_duplicate=False) if id(p) in ids]


def exclude_cores_from_ddp(module: nn.Module, broadcast: bool = True) -> list[str]:
    """Make ``DistributedDataParallel`` (constructed afterwards) skip the MPO cores of ``module``.

    Their gradients come from :func:`weight_cache` (with ``process_group``) instead. With
    ``broadcast`` and an initialized process group the cores are broadcast from rank 0, as DDP
    does for the parameters it keeps. Returns the excluded names.
    """
    names = mpo_core_names(module)
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(module, names)
    if broadcast and dist.is_initialized():
        cores = {id(c): c for layer in _layers(module) for c in layer.weight_tensors}
        with torch.no_grad():
            for core in cores.values():
                dist.broadcast(core.data, src=0)
    return names
