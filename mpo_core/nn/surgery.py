"""Model surgery around :class:`~mpo_core.nn.linear.MPOLinear`: choose submodules by name, replace
them, factorize them (:func:`mpo_ify`) and merge them back (:func:`unmpo_ify`), freeze cores
(:func:`set_trainable`), count parameters. Used by the MPO methods (``compress``, ``opf``,
``lightweight``) on any model, transformers ones included.
"""
from __future__ import annotations

import fnmatch
import sys
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence, Union

import torch
from torch import nn

from mpo_core.nn.dense import dense_from_weight, is_linear, linear_weight
from mpo_core.nn.linear import MPOLinear
from mpo_core.shapes import BondSpec

__all__ = ["Include", "MPOifyReport", "dense_module", "mpo_ify", "name_matcher", "num_parameters", "progress_bar",
           "replace_module", "select_modules", "set_trainable", "shape_kwargs", "unmpo_ify"]


def _mpo_layers(module: nn.Module) -> Iterable[MPOLinear]:
    return (m for m in module.modules() if isinstance(m, MPOLinear))


def set_trainable(module: nn.Module, which: str, bias: bool | None = None) -> int:
    """Freeze/unfreeze the cores of every :class:`MPOLinear` in ``module``.

    Parameters
    ----------
    module : nn.Module
        Searched recursively; other parameters are left alone.
    which : {"all", "auxiliary", "central"}
        Which cores train: all of them; the auxiliaries only (central frozen: MPOP's
        lightweight fine-tuning); or the central only.
    bias : bool, optional
        Also set ``requires_grad`` of the MPO layers' biases (left unchanged when ``None``).

    Returns
    -------
    int
        Trainable parameter entries in ``module`` afterwards (shared parameters counted once).
    """
    if which not in ("all", "auxiliary", "central"):
        raise ValueError(f"which must be 'all', 'auxiliary' or 'central', got {which!r}")
    for layer in _mpo_layers(module):
        for k, core in enumerate(layer.cores):
            is_central = k == layer.central_index
            core.requires_grad_(which == "all" or (which == "central") == is_central)
        if bias is not None and layer.bias is not None:
            layer.bias.requires_grad_(bias)
    return num_parameters(module, trainable=True)


def dense_module(layer: MPOLinear) -> nn.Module:
    """``layer`` contracted back into the module type it came from (:attr:`MPOLinear.origin`).

    ``"conv1d"`` builds transformers' ``Conv1D`` (transformers is imported only then).
    """
    linear = layer.to_linear()
    if layer.origin == "linear":
        return linear
    return dense_from_weight(linear.weight.detach().T, linear.bias, "conv1d")


@dataclass
class MPOifyRow:
    name: str
    in_shape: tuple[int, ...]
    out_shape: tuple[int, ...]
    ranks: list[int]
    dense_params: int
    mpo_params: int
    error_bound: float
    relative_error: float
    seconds: float = 0.0
    """Time of this matrix's decomposition."""
    origin: str = "linear"


@dataclass
class MPOifyReport:
    """What :func:`mpo_ify` replaced; ``print`` it for a table."""

    params_before: int
    params_after: int
    layers: list[MPOifyRow] = field(default_factory=list)

    def __str__(self) -> str:
        head = (f"{'layer':<32}{'in_shape':<18}{'out_shape':<18}{'max bond':>9}{'dense':>11}{'mpo':>11}"
                f"{'err bound':>11}{'rel err':>10}{'time s':>8}")
        lines = [head, "-" * len(head)]
        for r in self.layers:
            lines.append(
                f"{r.name:<32}{str(r.in_shape):<18}{str(r.out_shape):<18}{max(r.ranks):>9}{r.dense_params:>11}"
                f"{r.mpo_params:>11}{r.error_bound:>11.3g}{r.relative_error:>10.2e}{r.seconds:>8.2f}"
            )
        lines.append(
            f"model parameters: {self.params_before} -> {self.params_after} "
            f"({self.params_after / max(self.params_before, 1):.3f}x), {len(self.layers)} layers replaced"
        )
        return "\n".join(lines)


def num_parameters(model: nn.Module, trainable: bool = False) -> int:
    """Parameters of ``model``, each tensor once (shared and tied ones are not counted again);
    ``trainable``: only those with ``requires_grad``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable)


Include = Union[str, Sequence[str], Callable[[str, nn.Module], bool], None]
"""Which submodules: a qualified name, a suffix of one (``"query"``, as peft's ``target_modules``) or a
glob pattern, a list of them, a predicate ``(name, module) -> bool``, or ``None`` (all)."""


def _patterns(include: Include, arg: str) -> list[str] | None:
    if include is None or callable(include):
        return None
    patterns = [include] if isinstance(include, str) else list(include)
    if not all(isinstance(p, str) for p in patterns):
        raise TypeError(f"{arg} must be a name/glob pattern, a list of them, or a predicate (name, module) -> bool")
    return patterns


def _name_matches(name: str, pattern: str) -> bool:
    return name == pattern or name.endswith("." + pattern) or fnmatch.fnmatchcase(name, pattern)


def name_matcher(include: Include, arg: str = "include") -> Callable[[str, nn.Module], bool]:
    """The predicate ``(name, module) -> bool`` that ``include`` describes (``arg`` names it in errors).

    A pattern matches a qualified name equal to it, ending in ``"." + pattern``, or matching it as a glob.
    """
    if include is None:
        return lambda name, mod: True
    if callable(include):
        return include
    patterns = _patterns(include, arg)
    return lambda name, mod: any(_name_matches(name, p) for p in patterns)


def select_modules(
    model: nn.Module, include: Include, arg: str = "include", kind: Callable[[nn.Module], bool] = is_linear,
    what: str = "linear module",
) -> list[tuple[str, nn.Module]]:
    """The submodules of ``model`` of ``kind`` that ``include`` chooses, in ``named_modules`` order.

    Raises
    ------
    ValueError
        Nothing chosen, or a pattern of ``include`` that matches none of the candidates: the message
        names the pattern and lists a few candidate names.
    """
    candidates = [(name, mod) for name, mod in model.named_modules() if name and kind(mod)]
    match = name_matcher(include, arg)
    chosen = [(name, mod) for name, mod in candidates if match(name, mod)]
    patterns = _patterns(include, arg) or []
    unmatched = [p for p in patterns if not any(_name_matches(name, p) for name, _ in candidates)]
    if unmatched or not chosen:
        names = [name for name, _ in candidates]
        shown = ", ".join(names[:8]) + (f", ... ({len(names)} in all)" if len(names) > 8 else "")
        which = f"pattern {unmatched[0]!r}" if unmatched else repr(include)
        raise ValueError(f"{arg} {which} matched no {what} of the model; {what}s: {shown or 'none'}")
    return chosen


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    """Put ``module`` in place of ``model``'s submodule ``name`` (a qualified name such as ``"encoder.0.fc"``)."""
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent), attr, module)


def progress_bar(items: Sequence, desc: str, progress: bool | None):
    """``items`` wrapped in a tqdm bar when ``progress`` is True, or when ``None`` and the run is long
    (8+ items) and stderr is a terminal; tqdm is optional (no bar without it)."""
    if progress is False or (progress is None and (len(items) < 8 or not sys.stderr.isatty())):
        return items
    try:
        from tqdm.auto import tqdm
    except ImportError:
        if progress:
            raise ImportError("progress=True needs tqdm (pip install tqdm)") from None
        return items
    return tqdm(items, desc=desc, unit="matrix")


def shape_kwargs(n: int | Callable[[int, int], tuple[Sequence[int], Sequence[int]]], in_features: int,
                 out_features: int) -> dict:
    """``decompose``'s shape arguments from ``n``: a core count, or ``fn(in, out) -> (in_shape, out_shape)``."""
    if callable(n):
        in_shape, out_shape = n(in_features, out_features)
        return dict(in_shape=in_shape, out_shape=out_shape)
    return dict(n=n)


def mpo_ify(
    model: nn.Module,
    include: Include = None,
    n: int | Callable[[int, int], tuple[Sequence[int], Sequence[int]]] = 5,
    max_bond: BondSpec = None,
    rel_tol: float | None = None,
    strategy: str = "auto",
    decompose_kwargs: dict | None = None,
    progress: bool | None = None,
    balance: bool = False,
) -> MPOifyReport:
    """Replace chosen linear modules (``nn.Linear``, transformers ``Conv1D``) of ``model`` in place by
    :meth:`MPOLinear.from_linear`.

    Parameters
    ----------
    model : nn.Module
    include : str, list of str, or callable, optional
        Qualified module names, suffixes (``"query"``) or glob patterns (``"encoder.*.ffn.*"``), or a
        predicate ``(name, module) -> bool``; default every linear module. Each pattern must match one.
    n : int or callable
        Number of cores (balanced factorization), or ``fn(in_features, out_features) -> (in_shape, out_shape)``.
    max_bond, rel_tol : optional
        Truncation, as in :func:`mpo_core.decompose`.
    strategy : str
        Contraction strategy of the new layers.
    decompose_kwargs : dict, optional
        Further arguments of :func:`mpo_core.decompose` (e.g. its SVD options).
    progress : bool, optional
        A tqdm progress bar (default: on long runs at a terminal).
    balance : bool, default False
        Cores in the :meth:`~mpo_core.mpo.MPO.balanced` gauge (for training) instead of the TT-SVD's.

    Returns
    -------
    MPOifyReport
        Parameter counts before/after and, per layer, shapes, ranks, the guaranteed error bound,
        the measured relative error ``||W - W_mpo||_F / ||W||_F`` and the decomposition time.
        Matrices are decomposed one at a time; each one's float64 working copies are freed before the next.

    Raises
    ------
    ValueError
        A pattern matching no linear module (named, with a few available names), or a matrix that
        cannot be decomposed as asked. The model is unchanged when a pattern matches nothing.
    """
    targets = select_modules(model, include)
    before = num_parameters(model)
    report = MPOifyReport(before, before)
    for name, linear in progress_bar(targets, "mpo_ify", progress):
        weight = linear_weight(linear)
        start = time.perf_counter()
        try:
            layer = MPOLinear.from_linear(linear, max_bond=max_bond, rel_tol=rel_tol, strategy=strategy,
                                          decompose_kwargs=decompose_kwargs, balance=balance,
                                          **shape_kwargs(n, *weight.shape))
        except ValueError as exc:
            raise ValueError(f"cannot decompose layer {name!r} ({weight.shape[0]}x{weight.shape[1]}): {exc}") from exc
        seconds = time.perf_counter() - start
        layer.train(linear.training)
        replace_module(model, name, layer)
        with torch.no_grad():
            ref = weight.double()
            diff = float(torch.linalg.vector_norm(layer.weight.T.double() - ref))
            norm = float(torch.linalg.vector_norm(ref))
            del ref
        report.layers.append(MPOifyRow(
            name, layer.in_shape, layer.out_shape, layer.ranks,
            weight.numel() + (linear.bias.numel() if linear.bias is not None else 0),
            layer.num_params, float(layer.error_bound), diff / norm if norm > 0 else diff, seconds, layer.origin,
        ))
    report.params_after = num_parameters(model)
    return report


def unmpo_ify(model: nn.Module, include: Include = None) -> list[str]:
    """Contract the chosen :class:`MPOLinear` modules of ``model`` back, in place, into the dense module
    type each came from (``nn.Linear`` or transformers' ``Conv1D``): the merge back, no added latency.

    Returns
    -------
    list of str
        The names replaced (none is an empty list, not an error, so merging twice is harmless).
    """
    match = name_matcher(include)
    targets = [(name, mod) for name, mod in model.named_modules() if isinstance(mod, MPOLinear) and match(name, mod)]
    for name, layer in targets:
        dense = dense_module(layer)
        dense.train(layer.training)
        replace_module(model, name, dense)
    return [name for name, _ in targets]
