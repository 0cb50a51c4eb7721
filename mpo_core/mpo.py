"""The :class:`MPO` container: cores plus shapes, dense reconstruction, canonical forms, save/load.

Core ``k`` has shape ``(d_{k-1}, in_shape[k], out_shape[k], d_k)`` with ``d_0 = d_n = 1``
(rows first, as tensorly's TT-matrix). The represented matrix is::

    W[(i1..in), (j1..jn)] = T1[:, i1, j1, :] @ T2[:, i2, j2, :] @ ... @ Tn[:, in, jn, :]

with row index ``ravel((i1..in), in_shape)`` and column index ``ravel((j1..jn), out_shape)``
in C (row-major) order.
"""
from __future__ import annotations

import math
import os
from typing import Any, Sequence

import torch

from mpo_core.io import atomic_torch_save, check_format, read_torch_file
from mpo_core.randomized import gemm_rounding_slack, orthogonality_loss
from mpo_core.rebuild import dense_matrix
from mpo_core.shapes import BondSpec, bond_limits
from mpo_core.truncation import split_threshold, truncated_svd_split

__all__ = ["MPO", "validate_cores", "validate_linear_inputs"]

_FORMAT = "mpo_core.MPO"
_VERSION = 1


class MPO:
    """A matrix product operator (tensor-train matrix).

    Parameters
    ----------
    cores : sequence of torch.Tensor
        ``n`` 4-D cores, core ``k`` of shape ``(d_{k-1}, i_k, j_k, d_k)`` with ``d_0 = d_n = 1``,
        all of one floating dtype and on one device. They are stored as given (no copy).
    in_shape, out_shape : sequence of int, optional
        Checked against the cores when given; inferred from them otherwise.
    error_bound : float, default 0.0
        A guaranteed bound on ``||W - to_dense()||_F`` for the matrix ``W`` this MPO
        approximates (0 when exact).
    norm : float, optional
        ``||W||_F`` of that matrix, when known (used for relative error reports).
    canonical_center : int, optional
        When set, cores left of it are left-orthogonal and cores right of it right-orthogonal.
    spectra : list of torch.Tensor, optional
        Singular values at each of the ``n - 1`` bonds (kept and discarded), when known.
    metadata : dict, optional
        Free-form, saved with the MPO.
    """

    def __init__(
        self,
        cores: Sequence[torch.Tensor],
        in_shape: Sequence[int] | None = None,
        out_shape: Sequence[int] | None = None,
        *,
        error_bound: float = 0.0,
        norm: float | None = None,
        canonical_center: int | None = None,
        spectra: Sequence[torch.Tensor] | None = None,
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self.cores = validate_cores(cores)
        n = len(self.cores)
        shapes = (tuple(c.shape[1] for c in self.cores), tuple(c.shape[2] for c in self.cores))
        for name, given, actual in (("in_shape", in_shape, shapes[0]), ("out_shape", out_shape, shapes[1])):
            if given is not None and tuple(given) != actual:
                raise ValueError(f"{name}={tuple(given)} does not match the cores' modes {actual}")
        self.in_shape, self.out_shape = shapes
        if not (isinstance(error_bound, (int, float)) and math.isfinite(error_bound) and error_bound >= 0):
            raise ValueError(f"error_bound must be a finite float >= 0, got {error_bound!r}")
        self.error_bound = float(error_bound)
        self.norm = None if norm is None else float(norm)
        if canonical_center is not None and not 0 <= canonical_center < n:
            raise ValueError(f"canonical_center must be in [0, {n}), got {canonical_center}")
        self.canonical_center = canonical_center
        self.spectra = None if spectra is None else list(spectra)
        self.metadata = dict(metadata or {})

    # ------------------------------------------------------------------ structure
    @property
    def n(self) -> int:
        """Number of cores."""
        return len(self.cores)

    @property
    def ranks(self) -> list[int]:
        """Bond dimensions ``[1, d_1, ..., d_{n-1}, 1]``."""
        return [1] + [c.shape[3] for c in self.cores]

    @property
    def shape(self) -> tuple[int, int]:
        """``(prod(in_shape), prod(out_shape))``: the shape of :meth:`to_dense`."""
        return math.prod(self.in_shape), math.prod(self.out_shape)

    @property
    def num_params(self) -> int:
        """Total number of entries in the cores."""
        return sum(c.numel() for c in self.cores)

    @property
    def compression(self) -> float:
        """Dense entries divided by core entries (> 1 means smaller than dense)."""
        rows, cols = self.shape
        return rows * cols / self.num_params

    @property
    def central_index(self) -> int:
        """Index of the central core, ``n // 2``."""
        return self.n // 2

    @property
    def central(self) -> torch.Tensor:
        """The central core (the one MPOBERT shares across layers)."""
        return self.cores[self.central_index]

    @property
    def auxiliary(self) -> list[torch.Tensor]:
        """All cores but the central one, in order."""
        return [c for k, c in enumerate(self.cores) if k != self.central_index]

    @property
    def dtype(self) -> torch.dtype:
        return self.cores[0].dtype

    @property
    def device(self) -> torch.device:
        return self.cores[0].device

    @property
    def relative_error_bound(self) -> float | None:
        """``error_bound / ||W||_F`` when the norm of the source matrix is known (0 for a zero matrix)."""
        if self.norm is None:
            return None
        return self.error_bound / self.norm if self.norm > 0 else 0.0

    def param_shares(self) -> list[float]:
        """Fraction of :attr:`num_params` held by each core."""
        total = self.num_params
        return [c.numel() / total for c in self.cores]

    # ------------------------------------------------------------------ math
    def to_dense(self) -> torch.Tensor:
        """Contract the cores into the ``(prod(in_shape), prod(out_shape))`` matrix (C order), in the
        cheapest merge order (:func:`mpo_core.rebuild.dense_matrix`)."""
        return dense_matrix(self.cores)

    def frobenius_norm(self) -> float:
        """``||to_dense()||_F`` computed from the cores (no dense matrix is formed)."""
        if self.canonical_center is not None:
            return float(torch.linalg.vector_norm(self.cores[self.canonical_center]))
        return float(torch.linalg.vector_norm(self.canonicalize(self.n - 1).cores[-1]))

    def relative_error(self, matrix: torch.Tensor) -> float:
        """Actual ``||matrix - to_dense()||_F / ||matrix||_F`` (0 when both are zero)."""
        matrix = torch.as_tensor(matrix).to(device=self.device)
        dense = self.to_dense().to(torch.float64)
        ref = matrix.to(torch.float64)
        num = float(torch.linalg.vector_norm(ref - dense))
        den = float(torch.linalg.vector_norm(ref))
        return num / den if den > 0 else num

    def canonicalize(self, center: int) -> "MPO":
        """Return an equal MPO in mixed-canonical form around core ``center``.

        Cores ``k < center`` become left-orthogonal (``sum_{a,i,j} T[a,i,j,b] T[a,i,j,b'] = δ_bb'``),
        cores ``k > center`` right-orthogonal (``sum_{i,j,b} T[a,i,j,b] T[a',i,j,b] = δ_aa'``), by QR
        sweeps; ``to_dense()`` is unchanged up to rounding. Bonds larger than the rank of their
        unfolding shrink to it. Computed in the cores' dtype (use float64 for 1e-12 accuracy).
        """
        center = _check_index(center, self.n, "center")
        cores = list(self.cores)
        for k in range(center):
            d0, i, j, d1 = cores[k].shape
            q, r = torch.linalg.qr(cores[k].reshape(d0 * i * j, d1))
            cores[k] = q.reshape(d0, i, j, q.shape[1])
            cores[k + 1] = torch.tensordot(r, cores[k + 1], dims=1)
        _right_orthogonalize(cores, center)
        return self._replace(cores, canonical_center=center)

    def balanced(self, sweeps: int = 8) -> "MPO":
        """Return an equal MPO whose bonds are balanced for training: for every bond ``k`` and index ``b``, core
        ``k``'s slice ``[..., b]`` and core ``k + 1``'s slice ``[b, ...]`` get the same root-mean-square entry.

        Only a diagonal gauge changes (slice ``b`` of one core times ``d_b``, of the next divided by it), so
        ``to_dense()`` is unchanged up to rounding and so are the bounds; the canonical form is given up. A
        TT-SVD puts the whole norm in its last core, and an input-whitened one (``decompose(input_cov=)``) makes
        the first core tiny and the last huge; an optimizer taking equal-size steps on every entry (Adam) then
        moves the small core by a large relative amount. Balancing makes the entries comparable. ``sweeps``
        left-to-right passes (a chain of ``n > 2`` cores converges geometrically; ``n = 2`` needs one).
        """
        if isinstance(sweeps, bool) or not isinstance(sweeps, int) or sweeps < 1:
            raise ValueError(f"sweeps must be an int >= 1, got {sweeps!r}")
        cores = [c.clone() for c in self.cores]
        for _ in range(sweeps if self.n > 2 else 1):
            for k in range(self.n - 1):
                left, right = cores[k], cores[k + 1]
                a = left.reshape(-1, left.shape[-1]).pow(2).mean(0).sqrt()
                b = right.reshape(right.shape[0], -1).pow(2).mean(1).sqrt()
                d = torch.where((a > 0) & (b > 0), (b / a.where(a > 0, torch.ones_like(a))).sqrt(), torch.ones_like(a))
                cores[k] = left * d
                cores[k + 1] = right / d.reshape(-1, 1, 1, 1)
        return self._replace(cores, canonical_center=None)

    def round(self, max_bond: BondSpec = None, rel_tol: float | None = None) -> "MPO":
        """TT-rounding (recompression) of this MPO.

        Right-orthogonalizes, then sweeps left to right with truncated SVDs. With ``rel_tol=ε``
        the result ``R`` obeys ``||self - R||_F <= ε ||self||_F`` (per-split threshold
        ``ε ||self||_F / sqrt(n - 1)``); ``max_bond`` caps each bond (int or per-bond list).
        The returned :attr:`error_bound` adds this rounding's discarded norm to the existing
        bound (triangle inequality), so it still bounds the distance to the original matrix,
        and the floating-point rounding of both sweeps in the cores' dtype (unit roundoff ``u``),
        as :func:`~mpo_core.decompose.decompose` adds its splits': each QR of the right-to-left
        sweep ``(γ_{m+k} sqrt(q) + ||QᵀQ - I||_2) ||M||_F`` for its unfolding ``M`` (``m`` rows, ``k``
        its smaller dimension, ``q`` the columns of ``Q``), and ``γ_k ||C||_F ||R||_F`` for ``R``
        multiplied into the core ``C`` on its left, both times a bound on the spectral norm of the (unchanged) cores further left (the product of their
        left unfoldings' spectral norms: 1 for a left-orthogonal chain such as ``decompose``'s);
        each SVD split of the left-to-right sweep ``(γ_{m+k} sqrt(r) + ||LᵀL - I||_2) ||M||_F``
        (``r`` kept, ``L`` its left factor) and ``γ_b ||R||_F ||C||_F`` for its right factor ``R``
        multiplied into the next core ``C`` over the bond's old size ``b``. With ``γ_p = p u / (1 - p u)``
        (Higham, §3.5); first order in ``u``.
        """
        unit_roundoff = float(torch.finfo(self.cores[0].dtype).eps) / 2
        cores = list(self.cores)
        rounding = _right_orthogonalize(cores, 0, unit_roundoff)
        norm = float(torch.linalg.vector_norm(cores[0]))
        spectra, discarded_sq = [], 0.0
        bonds = bond_limits(max_bond, self.n)
        delta = split_threshold(rel_tol, norm, self.n)
        for k in range(self.n - 1):
            d0, i, j, _ = cores[k].shape
            unfolding = cores[k].reshape(d0 * i * j, -1)
            left, right_part, s, disc = truncated_svd_split(unfolding, bonds[k], delta)
            rounding += (gemm_rounding_slack(unfolding.shape[0] + min(unfolding.shape), left.shape[1], unit_roundoff)
                         + orthogonality_loss(left)) * _fro(unfolding)
            rounding += gemm_rounding_slack(right_part.shape[1], 1, unit_roundoff) * _fro(right_part) * _fro(cores[k + 1])
            cores[k] = left.reshape(d0, i, j, left.shape[1])
            cores[k + 1] = torch.tensordot(right_part, cores[k + 1], dims=1)
            spectra.append(s)
            discarded_sq += disc
        return self._replace(
            cores,
            error_bound=self.error_bound + math.sqrt(discarded_sq) + rounding,
            canonical_center=self.n - 1,
            spectra=spectra,
        )

    # ------------------------------------------------------------------ conversion
    def to(self, *args: Any, **kwargs: Any) -> "MPO":
        """Move/cast every core like :meth:`torch.Tensor.to`; metadata is kept."""
        return self._replace([c.to(*args, **kwargs) for c in self.cores])

    def clone(self) -> "MPO":
        return self._replace([c.clone() for c in self.cores])

    def _replace(self, cores: list[torch.Tensor], **changes: Any) -> "MPO":
        fields = dict(
            error_bound=self.error_bound,
            norm=self.norm,
            canonical_center=self.canonical_center,
            spectra=self.spectra,
            metadata=self.metadata,
        )
        fields.update(changes)
        return MPO(cores, **fields)

    # ------------------------------------------------------------------ persistence
    def state(self) -> dict[str, Any]:
        """A plain dict (tensors, ints, floats) describing this MPO; inverse of :meth:`from_state`."""
        return {
            "format": _FORMAT,
            "version": _VERSION,
            "cores": [c.detach().cpu() for c in self.cores],
            "in_shape": list(self.in_shape),
            "out_shape": list(self.out_shape),
            "error_bound": self.error_bound,
            "norm": self.norm,
            "canonical_center": self.canonical_center,
            "spectra": None if self.spectra is None else [s.detach().cpu() for s in self.spectra],
            "metadata": self.metadata,
        }

    @classmethod
    def from_state(cls, state: dict[str, Any], map_location: str | torch.device | None = None) -> "MPO":
        """Rebuild an MPO from :meth:`state`; a malformed state raises ``ValueError``."""
        check_format(state, _FORMAT, _VERSION, "an mpo_core.MPO state")
        missing = {"cores", "in_shape", "out_shape", "error_bound"} - state.keys()
        if missing:
            raise ValueError(f"MPO state is missing fields {sorted(missing)}")
        cores = state["cores"]
        if map_location is not None:
            cores = [c.to(map_location) for c in cores]
        return cls(
            cores,
            state["in_shape"],
            state["out_shape"],
            error_bound=state["error_bound"],
            norm=state.get("norm"),
            canonical_center=state.get("canonical_center"),
            spectra=state.get("spectra"),
            metadata=state.get("metadata"),
        )

    def save(self, path: str | os.PathLike) -> None:
        """Write this MPO to ``path`` atomically (temporary file, then rename)."""
        atomic_torch_save(self.state(), path)

    @classmethod
    def load(cls, path: str | os.PathLike, map_location: str | torch.device | None = None) -> "MPO":
        """Read an MPO written by :meth:`save`; a corrupt or foreign file raises ``ValueError``."""
        return cls.from_state(read_torch_file(path, "an MPO"), map_location=map_location)

    def __repr__(self) -> str:
        rows, cols = self.shape
        return (
            f"MPO(shape=({rows}, {cols}), in_shape={self.in_shape}, out_shape={self.out_shape}, "
            f"ranks={self.ranks}, params={self.num_params}, compression={self.compression:.2f}x, "
            f"error_bound={self.error_bound:.3g}, dtype={self.dtype}, device={self.device})"
        )


def _check_index(value: int, n: int, name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if not 0 <= value < n:
        raise ValueError(f"{name} must be in [0, {n}), got {value}")
    return value


def validate_cores(cores: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """Check that ``cores`` form an MPO chain and return them as a list.

    Every core must be a 4-D floating tensor ``(d_left, in, out, d_right)`` with no empty
    dimension, all of one dtype (else ``TypeError``) and on one device (else ``ValueError``);
    adjacent bonds must agree and the two boundary bonds must be 1 (``ValueError``).
    """
    if isinstance(cores, torch.Tensor) or not isinstance(cores, (Sequence, torch.nn.ParameterList)):
        raise TypeError(f"cores must be a list of 4-D tensors, got {type(cores).__name__}")
    cores = list(cores)
    if not cores:
        raise ValueError("cores must not be empty")
    for k, core in enumerate(cores):
        if not isinstance(core, torch.Tensor):
            raise TypeError(f"cores[{k}] must be a torch.Tensor, got {type(core).__name__}")
        if core.dim() != 4:
            raise ValueError(f"cores[{k}] must be 4-D (d_left, in, out, d_right), got shape {tuple(core.shape)}")
        if min(core.shape) < 1:
            raise ValueError(f"cores[{k}] has an empty dimension: shape {tuple(core.shape)}")
        if not core.is_floating_point():
            raise TypeError(f"cores[{k}] must have a floating dtype, got {core.dtype}")
        if core.dtype != cores[0].dtype:
            raise TypeError(f"cores[{k}] is {core.dtype}, but cores[0] is {cores[0].dtype}")
        if core.device != cores[0].device:
            raise ValueError(f"cores[{k}] is on {core.device}, but cores[0] is on {cores[0].device}")
        if k > 0 and core.shape[0] != cores[k - 1].shape[3]:
            raise ValueError(
                f"cores do not chain: cores[{k - 1}] has right bond {cores[k - 1].shape[3]} "
                f"but cores[{k}] has left bond {core.shape[0]}"
            )
    if cores[0].shape[0] != 1 or cores[-1].shape[3] != 1:
        raise ValueError(
            f"boundary bonds must be 1, got d_0={cores[0].shape[0]} and d_n={cores[-1].shape[3]}"
        )
    return cores


def validate_linear_inputs(
    x: torch.Tensor, cores: Sequence[torch.Tensor], bias: torch.Tensor | None = None, *, mixed_dtypes: bool = False
) -> list[torch.Tensor]:
    """Check the arguments of ``x @ W + bias`` for ``W`` given as MPO cores; return the cores as a list.

    The one set of checks (and messages) of :func:`mpo_core.contract.contract` and
    :func:`mpo_core.ops.mpo_linear.mpo_linear`: the cores as :func:`validate_cores`; ``x`` a floating
    tensor ``(..., prod(in_shape))`` and ``bias`` ``None`` or ``(prod(out_shape),)``, both on the
    cores' device and (unless ``mixed_dtypes``, e.g. under autocast) of their dtype.
    """
    cores = validate_cores(cores)
    in_shape = tuple(c.shape[1] for c in cores)
    rows, cols = math.prod(in_shape), math.prod(c.shape[2] for c in cores)
    device, dtype = cores[0].device, cores[0].dtype
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must have a floating dtype, got {x.dtype}")
    if x.dim() == 0 or x.shape[-1] != rows:
        raise ValueError(f"x must have shape (..., {rows}) (prod(in_shape) for in_shape={in_shape}), got {tuple(x.shape)}")
    if x.device != device:
        raise ValueError(f"x is on {x.device} but the cores are on {device}")
    if x.dtype != dtype and not mixed_dtypes:
        raise TypeError(f"x is {x.dtype} but the cores are {dtype} (cast one, or use torch.autocast)")
    if bias is not None:
        if not isinstance(bias, torch.Tensor) or tuple(bias.shape) != (cols,):
            raise ValueError(f"bias must be a tensor of shape ({cols},), got {getattr(bias, 'shape', type(bias).__name__)}")
        if bias.device != device:
            raise ValueError(f"bias is on {bias.device} but the cores are on {device}")
        if bias.dtype != dtype and not mixed_dtypes:
            raise TypeError(f"bias is {bias.dtype} but the cores are {dtype}")
    return cores


def _fro(x: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(x, dtype=torch.float64))


def _right_orthogonalize(cores: list[torch.Tensor], center: int, unit_roundoff: float | None = None) -> float:
    """Make ``cores[center + 1:]`` right-orthogonal in place by a right-to-left QR sweep; with ``unit_roundoff``,
    return the bound on the change of the represented matrix by rounding that :meth:`MPO.round` documents."""
    rounding, left_norms = 0.0, [1.0]
    if unit_roundoff is not None:  # spectral-norm bounds of the chains cores[:k], which the sweep leaves unchanged
        for core in cores[:-1]:
            left_norms.append(left_norms[-1] * float(torch.linalg.matrix_norm(
                core.reshape(-1, core.shape[-1]).double(), ord=2)))
    for k in range(len(cores) - 1, center, -1):
        d0, i, j, d1 = cores[k].shape
        unfolding = cores[k].reshape(d0, i * j * d1).mT
        q, r = torch.linalg.qr(unfolding)
        if unit_roundoff is not None:
            rounding += left_norms[k] * (gemm_rounding_slack(unfolding.shape[0] + min(unfolding.shape), q.shape[1],
                                                             unit_roundoff)
                                         + orthogonality_loss(q)) * _fro(unfolding)
            rounding += left_norms[k - 1] * gemm_rounding_slack(d0, 1, unit_roundoff) * _fro(cores[k - 1]) * _fro(r)
        cores[k] = q.mT.reshape(q.shape[1], i, j, d1)
        cores[k - 1] = torch.tensordot(cores[k - 1], r.mT, dims=1)
    return rounding
