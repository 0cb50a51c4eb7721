"""Where one training step's time goes: the torch profiler's operators sorted into categories.

Every operator event of one profiled step is put in one category by the profiler scope it ran
under (the library names its rebuilds :data:`mpo_core.rebuild.REBUILD_SCOPE` and its low-rank updates,
MPOBERT's adapters, :data:`mpo_core.nn.linear.LOW_RANK_SCOPE`; a backward operator inherits the scope of the forward operator
whose autograd node runs it, matched by sequence number) or else by its name, and its *self* time
is summed there:

``rebuild fwd`` / ``rebuild bwd``
    Contracting cores into dense ``W`` (its products, permutes and copies) and its backward.
``adapters``
    The adapters' products (``U D`` where folded into ``W``, else ``x U`` and ``(x U) D``) and their backward.
``GEMMs``
    Every other product: the work a dense model does too.
``attention``, ``norms/GELU/dropout``, ``copies/reshapes``, ``elementwise``
    By operator name (elementwise: bias and adapter adds, gradient sums, fills, the rest).
``optimizer``
    Everything under the step's ``optimizer`` scope: clipping, the update, zeroing the gradients.
``autograd+Python``
    The step's wall time minus every operator's self time: the Python and autograd-engine work
    between operators (what the profiler adds is in here too, so it is an upper bound).

The rebuild's executed FLOPs are compared with its floor (:func:`rebuild_floor_flops`): the
cheapest merge tree of each chain, or with a central shared by ``L`` layers, the cheaper of that
and contracting the stacked outer blocks with the central (both sides priced).
"""
from __future__ import annotations

import math
import time
from collections import defaultdict
from typing import Callable, Iterable, Sequence

import torch

from mpo_core.nn.linear import LOW_RANK_SCOPE
from mpo_core.rebuild import REBUILD_SCOPE

CATEGORIES = ("GEMMs", "adapters", "rebuild fwd", "rebuild bwd", "attention", "norms/GELU/dropout",
              "copies/reshapes", "elementwise", "optimizer", "autograd+Python")
OPTIMIZER_SCOPE = "optimizer"
"""Name of the ``torch.profiler.record_function`` scope a step puts its clipping, update and zeroing in."""

_PRODUCTS = {"aten::mm", "aten::bmm", "aten::addmm", "aten::baddbmm", "aten::addbmm"}
_COPIES = ("copy_", "clone", "cat", "stack", "_to_copy", "contiguous", "permute", "transpose", "view", "reshape",
           "aten::t", "as_strided", "expand", "unsqueeze", "squeeze", "select", "slice", "unbind", "split")
_NORMS = ("layer_norm", "gelu", "dropout", "bernoulli")


def _ancestors(event) -> Iterable[str]:
    parent = event.cpu_parent
    while parent is not None:
        yield parent.name
        parent = parent.cpu_parent


def classify(name: str, scope: str | None, backward: bool, in_optimizer: bool) -> str:
    """The category of one operator event (module docstring); ``scope``: the library scope it ran under."""
    if in_optimizer:
        return "optimizer"
    if scope == REBUILD_SCOPE:
        return "rebuild bwd" if backward else "rebuild fwd"
    if scope == LOW_RANK_SCOPE:
        return "adapters"
    if "scaled_dot_product" in name or "attention" in name:
        return "attention"
    if any(key in name for key in _NORMS):
        return "norms/GELU/dropout"
    if name in _PRODUCTS:
        return "GEMMs"
    if any(key in name for key in _COPIES):
        return "copies/reshapes"
    return "elementwise"


_SCOPES = (REBUILD_SCOPE, LOW_RANK_SCOPE)
_BACKWARD = "autograd::engine::evaluate_function"


def profile_shares(step: Callable[[], None]) -> dict:
    """Profile one call of ``step`` (run it once before, to warm up) and sort its time into :data:`CATEGORIES`.

    ``step`` is one optimizer step, its clipping, update and zeroing inside a ``record_function``
    scope named :data:`OPTIMIZER_SCOPE`. Returns ``seconds`` per category, ``total`` (the step's wall
    time under the profiler) and ``rebuild_flops`` (the rebuild products' FLOPs, forward and backward).
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], with_flops=True) as prof:
        start = time.perf_counter()
        step()
        total = time.perf_counter() - start
    events = list(prof.events())
    scope_of_seq: dict[int, str] = {}  # forward ops' autograd sequence numbers -> their library scope
    for event in events:
        if event.sequence_nr >= 0:
            scope = next((n for n in _ancestors(event) if n in _SCOPES), None)
            if scope is not None and not any(n.startswith(_BACKWARD) for n in _ancestors(event)):
                scope_of_seq[event.sequence_nr] = scope
    seconds: dict[str, float] = defaultdict(float)
    flops = {"rebuild fwd": 0, "rebuild bwd": 0}
    for event in events:
        if event.name in (OPTIMIZER_SCOPE, *_SCOPES) or event.name.startswith(_BACKWARD) or event.name.endswith("Backward0"):
            continue  # scopes; autograd-engine wrappers (their self time is engine overhead: autograd+Python)
        chain = [event.cpu_parent]
        while chain[-1] is not None:
            chain.append(chain[-1].cpu_parent)
        parents = chain[:-1]
        node = next((p for p in parents if p.name.startswith(_BACKWARD)), None)
        if node is not None:
            scope = scope_of_seq.get(node.sequence_nr)
        else:
            scope = next((p.name for p in parents if p.name in _SCOPES), None)
        cat = classify(event.name, scope, node is not None, any(p.name == OPTIMIZER_SCOPE for p in parents))
        seconds[cat] += event.self_cpu_time_total / 1e6
        if cat in flops and event.name in _PRODUCTS:
            flops[cat] += int(event.flops or 0)
    seconds["autograd+Python"] = max(0.0, total - sum(v for k, v in seconds.items() if k != "autograd+Python"))
    return {"seconds": {c: seconds.get(c, 0.0) for c in CATEGORIES}, "total": total, "rebuild_flops": flops}


def rebuild_floor_flops(groups: Sequence[Sequence[Sequence[int]]], in_shapes: Sequence[Sequence[int]],
                        out_shapes: Sequence[Sequence[int]], centers: Sequence[int]) -> int:
    """Forward FLOPs of the cheapest rebuild of every matrix (see the module docstring).

    ``groups[g]``: the ``L`` chains' bonds ``[1, d_1, ..., 1]`` of matrix ``g`` (one central shared by
    them); ``in_shapes[g]``/``out_shapes[g]``/``centers[g]``: its modes and central index.
    """
    from mpo_core.cost import device_model
    from mpo_core.rebuild import plan_merge

    model = device_model("cpu")
    total = 0
    for ranks_list, ins, outs, c in zip(groups, in_shapes, out_shapes, centers):
        per_chain = sum(plan_merge(ins, outs, r, 4, model, torch.float32)[1] for r in ranks_list)
        shared = per_chain
        if len(ranks_list) > 1:
            shared = 0
            for r in ranks_list:  # each layer's left and right blocks, merged alone
                shared += plan_merge(ins[:c], outs[:c], r[:c + 1], 4, model, torch.float32)[1] if c > 1 else 0
                shared += plan_merge(ins[c + 1:], outs[c + 1:], r[c + 1:], 4, model, torch.float32)[1] \
                    if len(ins) - c - 1 > 1 else 0
            r = ranks_list[0]
            left = math.prod(i * j for i, j in zip(ins[:c], outs[:c]))
            right = math.prod(i * j for i, j in zip(ins[c + 1:], outs[c + 1:]))
            middle, d_in, d_out, layers = ins[c] * outs[c], r[c], r[c + 1], len(ranks_list)
            left_first = 2 * layers * left * d_in * middle * d_out + 2 * layers * left * middle * d_out * right
            right_first = 2 * d_in * middle * d_out * layers * right + 2 * layers * left * d_in * middle * right
            shared += min(left_first, right_first)
        total += min(per_chain, shared)
    return total
