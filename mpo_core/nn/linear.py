"""The MPO linear layer: :class:`MPOLinear`, ``y = x @ W + b`` with ``W`` held as MPO cores.

``MPOLinear`` stores ``W = linear.weight.T`` (``in_features x out_features``, rows are input
modes, C order) as MPO cores, so ``y = x @ W + b`` exactly like ``nn.Linear``. It is built from
a dense linear module (:meth:`MPOLinear.from_linear`, including transformers' ``Conv1D``, see
:mod:`mpo_core.nn.dense`) and remembers which (:attr:`MPOLinear.origin`).
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from mpo_core.contract import Route, check_strategy, choose_route, contract, dense_weight, explain, explain_route
from mpo_core.decompose import decompose
from mpo_core.mpo import MPO, validate_cores
from mpo_core.nn.dense import is_linear, linear_weight
from mpo_core.rebuild import dense_matrix
from mpo_core.shapes import BondSpec, capped_ranks, resolve_shapes

__all__ = ["LOW_RANK_SCOPE", "MPOLinear"]

LOW_RANK_SCOPE = "mpo_core::low_rank_update"
"""The ``torch.profiler.record_function`` scope of every product with an attached low-rank update
(:meth:`MPOLinear.attach_update`): ``U D`` where it is folded into ``W``, ``(x U) D`` where it is not."""


class MPOLinear(nn.Module):
    """A linear layer ``y = x @ W + b`` whose ``in_features x out_features`` weight is an MPO.

    Parameters
    ----------
    in_features, out_features : int
        As for ``nn.Linear``.
    in_shape, out_shape : sequence of int, optional
        Mode sizes (products ``in_features`` / ``out_features``). Or give ``n``.
    n : int, optional
        Number of cores, with the balanced :func:`~mpo_core.shapes.factorize`.
    max_bond : int or list of int, optional
        Caps the bonds as :func:`~mpo_core.decompose` does: an int caps every bond, a list
        ``[1, d_1, ..., d_{n-1}, 1]`` (or the ``n - 1`` inner bonds) each one; bonds never exceed
        the full rank (:func:`~mpo_core.shapes.capped_ranks`). Default full rank (exact capacity).
        Cores with other bonds (e.g. OPF's padded ones): :meth:`from_cores`.
    bias : bool, default True
    device, dtype : optional
        Of the parameters.
    strategy : {"auto", "dense", "sequential", "fused"}
        Passed to :func:`mpo_core.contract.contract`.
    cache_weight : bool, default True
        When no gradient is needed (``torch.no_grad``/inference, or frozen cores), keep the
        rebuilt dense ``W`` and reuse it until a core changes (tracked by version counters), so
        inference costs one GEMM like ``nn.Linear``. Costs one ``W`` of memory while cached.

    Attributes
    ----------
    cores : nn.ParameterList
        Core ``k`` of shape ``(d_{k-1}, in_shape[k], out_shape[k], d_k)``; any of them may be a
        ``nn.Parameter`` shared with other layers (:meth:`share_core`).
    error_bound : float or None
        ``||W_source - W||_F`` bound from :meth:`from_linear` (``None`` for a random init).
    origin : {"linear", "conv1d"}
        The dense module type :func:`dense_module` / :func:`unmpo_ify` rebuild (``"conv1d"``:
        transformers' ``Conv1D``, set by :meth:`from_linear`).
    step_weight : torch.Tensor or None
        Set only inside :func:`mpo_core.accumulate.weight_cache`: the dense weight built once for
        the optimizer step, ``(in_features, out_features)`` as the rebuild gives it; the forward then
        is one GEMM with it (``addmm`` with the bias).
    update : nn.Module or None
        A low-rank term of the weight, ``W = MPO + U D`` (:meth:`attach_update`).
    """

    def __init__(
        self,
        in_features: int,
        out_features: int,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        n: int | None = None,
        max_bond: BondSpec = None,
        bias: bool = True,
        device: torch.device | str | None = None,
        dtype: torch.dtype | None = None,
        strategy: str = "auto",
        cache_weight: bool = True,
    ) -> None:
        super().__init__()
        self.in_shape, self.out_shape = resolve_shapes(in_features, out_features, in_shape, out_shape, n)
        self.in_features, self.out_features = in_features, out_features
        ranks = capped_ranks(self.in_shape, self.out_shape, max_bond)
        self.strategy = check_strategy(strategy)
        self.cache_weight = cache_weight
        kw = dict(device=device, dtype=dtype)
        self.cores = nn.ParameterList(
            nn.Parameter(torch.empty(ranks[k], i, j, ranks[k + 1], **kw))
            for k, (i, j) in enumerate(zip(self.in_shape, self.out_shape))
        )
        self.bias = nn.Parameter(torch.empty(out_features, **kw)) if bias else None
        self.error_bound: float | None = None
        self.origin = "linear"
        self._cached: tuple[tuple, torch.Tensor] | None = None
        self.step_weight: torch.Tensor | None = None
        self.route_memo: dict[tuple, bool] = {}  # gemm-vs-plan answers of mpo_core.contract.route
        self._mpo_view: tuple[tuple, MPO] | None = None
        self._update: tuple[nn.Module, ...] = ()  # held by reference: its owner registers its parameters
        self.reset_parameters()

    # ------------------------------------------------------------------ structure
    @property
    def mpo(self) -> MPO:
        """The layer's chain as an :class:`~mpo_core.mpo.MPO` whose cores are this layer's parameters (no
        copy; shared cores included), with :attr:`error_bound` (0 for a layer not decomposed from a matrix).
        Shapes, ranks, central and auxiliary cores and counts are the MPO's."""
        # Cached per set of core objects (a cached MPO holds them, so their ids stay unique) and bound:
        # the structure properties below are read per layer and step (accumulate) and the MPO checks
        # its chain when built. Shapes and dtypes are read from the cores themselves on every access.
        bound = 0.0 if self.error_bound is None else self.error_bound
        key = (tuple(map(id, self.cores._parameters.values())), bound)
        view = getattr(self, "_mpo_view", None)
        if view is None or view[0] != key:
            view = self._mpo_view = (key, MPO(list(self.cores), self.in_shape, self.out_shape, error_bound=bound))
        return view[1]

    @property
    def n(self) -> int:
        return self.mpo.n

    @property
    def ranks(self) -> list[int]:
        """Bond dimensions ``[1, d_1, ..., d_{n-1}, 1]`` of the cores."""
        return self.mpo.ranks

    @property
    def central_index(self) -> int:
        return self.mpo.central_index

    @property
    def central(self) -> nn.Parameter:
        return self.mpo.central

    @property
    def auxiliary(self) -> list[nn.Parameter]:
        return self.mpo.auxiliary

    @property
    def num_params(self) -> int:
        """Entries in the cores and the bias (a shared core counts in full here)."""
        return self.mpo.num_params + (self.bias.numel() if self.bias is not None else 0)

    @property
    def compression(self) -> float:
        """Dense weight entries divided by core entries."""
        return self.mpo.compression

    @property
    def weight(self) -> torch.Tensor:
        """The dense ``(out_features, in_features)`` weight, as ``nn.Linear.weight`` (differentiable;
        the attached :attr:`update` included)."""
        return with_update(dense_weight(list(self.cores)), self.update).T

    @property
    def update(self) -> nn.Module | None:
        """The attached low-rank term ``U D`` of the weight (:meth:`attach_update`), or ``None``."""
        return self._update[0] if self._update else None

    @property
    def weight_tensors(self) -> tuple[torch.Tensor, ...]:
        """What ``W`` is built from: the cores, then the attached update's ``U`` and ``D``."""
        # ParameterList's own iteration costs ~7 us (an attribute lookup per index): read its dict.
        cores = tuple(self.cores._parameters.values())
        return (*cores, self._update[0].U, self._update[0].D) if self._update else cores

    def attach_update(self, update: nn.Module | None) -> None:
        """Make the weight ``W = MPO + U D``: ``update.U`` is ``(in_features, r)``, ``update.D`` is
        ``(r, out_features)``, both read at every call; ``None`` detaches it.

        The layer holds ``update`` by reference (its owner registers its parameters, as MPOBERT's
        layers own their adapters). Where ``W`` is dense (inside :func:`~mpo_core.accumulate.weight_cache`,
        the cached ``W``, the dense plan) ``U D`` is added to it once, so each call is one GEMM; the
        other plans add ``(x U) D`` to their output.
        """
        if update is None:
            self._update = ()
        else:
            u, d = getattr(update, "U", None), getattr(update, "D", None)
            if not isinstance(u, torch.Tensor) or not isinstance(d, torch.Tensor):
                raise TypeError(f"update must have tensors U and D, got {type(update).__name__}")
            if u.dim() != 2 or d.dim() != 2 or u.shape[0] != self.in_features or d.shape[1] != self.out_features \
                    or u.shape[1] != d.shape[0]:
                raise ValueError(f"update needs U ({self.in_features}, r) and D (r, {self.out_features}), "
                                 f"got U {tuple(u.shape)} and D {tuple(d.shape)}")
            first = self.cores[0]
            if u.dtype != first.dtype or d.dtype != first.dtype or u.device != first.device or d.device != first.device:
                raise ValueError(f"update's U and D must be {first.dtype} on {first.device} like the cores, got "
                                 f"{u.dtype}/{d.dtype} on {u.device}/{d.device}")
            self._update = (update,)
        self._cached = None

    def reset_parameters(self) -> None:
        """Random cores such that the dense ``W`` has ``nn.Linear``'s weight variance ``1 / (3 in_features)``.

        ``W`` entries are sums over ``prod(d_k)`` products of ``n`` independent core entries, so each
        core is drawn from ``N(0, s^2)`` with ``s^(2n) prod(d_k) = 1 / (3 in_features)``. The bias
        is ``U(-1/sqrt(in), 1/sqrt(in))`` as in ``nn.Linear``.
        """
        target = 1.0 / (3.0 * self.in_features)
        std = (target / math.prod(self.ranks)) ** (1.0 / (2 * self.n))
        with torch.no_grad():
            for core in self.cores:
                core.normal_(0.0, std)
            if self.bias is not None:
                bound = 1.0 / math.sqrt(self.in_features)
                self.bias.uniform_(-bound, bound)

    def share_core(self, index: int, param: nn.Parameter) -> None:
        """Use ``param`` (owned elsewhere, e.g. by another layer) as core ``index``; its values are kept."""
        if isinstance(index, bool) or not isinstance(index, int) or not -self.n <= index < self.n:
            raise ValueError(f"index must be an int in [-{self.n}, {self.n}), got {index!r}")
        if not isinstance(param, nn.Parameter):
            raise TypeError(f"param must be an nn.Parameter, got {type(param).__name__}")
        old = self.cores[index]
        if param.shape != old.shape or param.dtype != old.dtype or param.device != old.device:
            raise ValueError(
                f"param is {tuple(param.shape)} {param.dtype} on {param.device}; core {index} needs "
                f"{tuple(old.shape)} {old.dtype} on {old.device}"
            )
        self.cores[index] = param
        self._cached = None

    # ------------------------------------------------------------------ conversion
    @classmethod
    def from_cores(
        cls,
        cores: Sequence[torch.Tensor],
        bias: torch.Tensor | None = None,
        strategy: str = "auto",
        cache_weight: bool = True,
    ) -> "MPOLinear":
        """A layer holding copies of ``cores`` (any valid chain, bonds as given) and of ``bias``.

        The parameters take the cores' dtype and device; ``bias`` (``(prod(out_shape),)``) is
        cast to them.
        """
        cores = validate_cores(cores)
        in_shape = tuple(c.shape[1] for c in cores)
        out_shape = tuple(c.shape[2] for c in cores)
        first = cores[0]
        layer = cls(math.prod(in_shape), math.prod(out_shape), in_shape, out_shape, max_bond=1,
                    bias=bias is not None, device=first.device, dtype=first.dtype, strategy=strategy,
                    cache_weight=cache_weight)
        layer.cores = nn.ParameterList(nn.Parameter(c.detach().clone()) for c in cores)
        if bias is not None:
            if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (layer.out_features,):
                raise ValueError(f"bias must be a tensor of shape ({layer.out_features},), "
                                 f"got {getattr(bias, 'shape', type(bias).__name__)}")
            with torch.no_grad():
                layer.bias.copy_(bias)
        return layer

    @classmethod
    def from_mpo(cls, mpo: MPO, bias: torch.Tensor | None = None, strategy: str = "auto",
                 cache_weight: bool = True) -> "MPOLinear":
        """A layer holding copies of ``mpo``'s cores (and of ``bias``), keeping its :attr:`~MPO.error_bound`."""
        if not isinstance(mpo, MPO):
            raise TypeError(f"mpo must be an MPO, got {type(mpo).__name__}")
        layer = cls.from_cores(mpo.cores, bias, strategy=strategy, cache_weight=cache_weight)
        layer.error_bound = mpo.error_bound
        return layer

    @classmethod
    def from_linear(
        cls,
        linear: nn.Module,
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        n: int | None = None,
        max_bond: BondSpec = None,
        rel_tol: float | None = None,
        shared_central: nn.Parameter | None = None,
        strategy: str = "auto",
        decompose_kwargs: dict | None = None,
        balance: bool = False,
    ) -> "MPOLinear":
        """Decompose the ``in x out`` weight of a linear module (``nn.Linear``'s ``weight.T``, or a
        transformers ``Conv1D``'s ``weight``) by TT-SVD, see :func:`mpo_core.decompose`.

        ``max_bond``/``rel_tol`` truncate (exact when both are ``None``); :attr:`error_bound`
        keeps the decomposition's guaranteed ``||W - W_mpo||_F`` bound. ``shared_central``
        replaces the decomposed central core by that (shared) parameter, as in MPOBERT.
        ``decompose_kwargs`` go to :func:`~mpo_core.decompose` as they are (e.g. its SVD options).
        ``balance``: the cores in :meth:`~mpo_core.mpo.MPO.balanced` gauge (comparable entries for training)
        instead of the TT-SVD's left-canonical one.
        """
        if not is_linear(linear):
            raise TypeError(f"linear must be an nn.Linear or a transformers Conv1D, got {type(linear).__name__}")
        weight = linear_weight(linear)
        mpo = decompose(weight, in_shape, out_shape, max_bond, rel_tol, n=n, **(decompose_kwargs or {}))
        if balance:
            mpo = mpo.balanced()
        layer = cls.from_mpo(mpo.to(device=weight.device, dtype=weight.dtype), linear.bias, strategy=strategy)
        layer.origin = "linear" if isinstance(linear, nn.Linear) else "conv1d"
        if shared_central is not None:
            layer.share_core(layer.central_index, shared_central)
        return layer

    def to_linear(self) -> nn.Linear:
        """Contract back into an ``nn.Linear`` (rebuilt in float64, so exact to the dtype's rounding)."""
        with torch.no_grad():
            update = self.update
            w = dense_weight([c.double() for c in self.cores])
            if update is not None:
                w = w + update.U.double() @ update.D.double()
            first = self.cores[0]
            linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None,
                               device=first.device, dtype=first.dtype)
            linear.weight.copy_(w.T)
            if self.bias is not None:
                linear.bias.copy_(self.bias)
        return linear

    # ------------------------------------------------------------------ forward
    def _cached_weight(self) -> torch.Tensor:
        # A new dtype or device means new storage, so the pointer and version identify the values.
        key = tuple((t.data_ptr(), t._version) for t in self.weight_tensors)
        if self._cached is None or self._cached[0] != key:
            with torch.no_grad():
                self._cached = (key, with_update(dense_weight(list(self.cores)), self.update).T.contiguous())
        return self._cached[1]

    def forward(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W + b``; ``bias`` is added instead of the layer's own (for a bias held elsewhere, e.g. one
        shared by several layers), in the same GEMM."""
        b = self.bias if bias is None else bias
        update = self.update
        route = choose_route(x, self, b)
        if route == "step W":  # inside mpo_core.accumulate.weight_cache (the update is in the step weight)
            return _gemm_in_out(x, self.step_weight, b)
        if route == "cached W":  # nn.Linear's GEMM and (out, in) layout: (in, out) measured up to 1.27x
            return F.linear(x, self._cached_weight(), b)  # slower at 1-8 tokens on CPU
        self._cached = None
        cores = list(self.cores)
        if update is None:
            return contract(x, cores, b, strategy=self.strategy)
        plan = explain(x, cores, b, self.strategy)
        if plan.strategy == "dense":  # the update folded into the rebuilt W: one GEMM
            return _gemm_in_out(x, with_update(dense_matrix(cores, plan.chosen.order), update), b)
        with torch.profiler.record_function(LOW_RANK_SCOPE):
            low_rank = (x @ update.U) @ update.D
        return contract(x, cores, b, strategy=self.strategy) + low_rank

    def explain(self, x: torch.Tensor | int) -> Route:
        """How :meth:`forward` would compute ``x``'s output (a tensor, or a token count under the current
        grad mode): step ``W``, cached ``W`` or the plan, with the plan behind it; ``print`` it."""
        return explain_route(x, self)

    def extra_repr(self) -> str:
        return (
            f"in_features={self.in_features}, out_features={self.out_features}, in_shape={self.in_shape}, "
            f"out_shape={self.out_shape}, ranks={self.ranks}, "
            f"params={self.num_params}, compression={self.compression:.2f}x vs dense, "
            f"bias={self.bias is not None}, strategy={self.strategy!r}"
            + ("" if self.error_bound is None else f", error_bound={self.error_bound:.3g}")
        )


def with_update(w: torch.Tensor, update: nn.Module | None) -> torch.Tensor:
    """``w + U D`` for a dense ``(in, out)`` ``w`` and an update with ``U`` ``(in, r)``, ``D`` ``(r, out)``
    (:meth:`MPOLinear.attach_update`); ``w`` itself when ``update`` is ``None``."""
    if update is None:
        return w
    with torch.profiler.record_function(LOW_RANK_SCOPE):
        return torch.addmm(w, update.U, update.D)


def _gemm_in_out(x: torch.Tensor, w: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ w + bias`` for a dense ``(in, out)`` ``w``: one ``mm`` (``addmm`` with the bias) on ``x``'s rows."""
    x2d = x.reshape(-1, x.shape[-1])
    y = x2d @ w if bias is None else torch.addmm(bias, x2d, w)
    return y.reshape(*x.shape[:-1], w.shape[1])
