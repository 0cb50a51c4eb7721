"""MPOBERT configuration: sizes, MPO shapes, sharing groups, adapters; presets and JSON I/O."""
from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
from dataclasses import dataclass, field
from typing import Any, Optional

from mpo_core.io import atomic_write
from mpo_core.shapes import check_int, factorize

__all__ = ["MPOBertConfig", "MATRICES", "ALIASES", "DEPTH_SCALINGS", "resolve_aliases"]

MATRICES = ("q", "k", "v", "attn_out", "ffn_in", "ffn_out")
"""Names of the six weight matrices of a transformer layer, in forward order."""

HIDDEN_ACTS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh"}
"""transformers' ``hidden_act`` names accepted here, mapped to :mod:`mpo_core.activation`'s vocabulary."""

ALIASES = {"num_hidden_layers": "num_layers", "num_attention_heads": "num_heads", "hidden_dropout_prob": "hidden_dropout",
           "attention_probs_dropout_prob": "attention_dropout", "classifier_dropout_prob": "classifier_dropout"}
"""transformers' field names accepted (constructor, :meth:`MPOBertConfig.from_dict`) and readable as
attributes, with the MPOBERT field each stands for."""

DEPTH_SCALINGS = ("algorithm1", "random")
"""Readings of the paper's deep-layer initialization (see ``MPOBertConfig.depth_scaling``)."""


def _check_float(name: str, value: Any, low: float, high: float, high_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite float, got {value!r}")
    if value < low or value > high or (high_open and value == high):
        raise ValueError(f"{name} must be in [{low}, {high}{')' if high_open else ']'}, got {value}")


@dataclass
class _ConfigFields:
    """The fields, checks and methods of :class:`MPOBertConfig` (whose constructor also takes transformers' names)."""

    vocab_size: int = 30000
    embedding_size: int = 128
    hidden_size: int = 768
    num_layers: int = 12
    num_heads: int = 12
    intermediate_size: int = 3072
    hidden_act: str = "gelu_new"
    hidden_dropout: float = 0.0
    attention_dropout: float = 0.0
    max_position_embeddings: int = 512
    type_vocab_size: int = 2
    layer_norm_eps: float = 1e-12
    pad_token_id: int = 0
    initializer_range: float = 0.02
    mpo_n: int = 5
    mpo_shapes: dict[int, tuple[int, ...]] = field(default_factory=dict)
    max_bond: Optional[int] = None
    mpo_matrices: tuple[str, ...] = MATRICES
    num_groups: int = 1
    adapter_rank: int = 8
    adapter_init_std: float = 0.02
    adapter_matrices: tuple[str, ...] = ("q", "k", "v", "attn_out")
    num_labels: int = 2
    classifier_dropout: float = 0.1
    depth_scaling_after: int = 24
    depth_scaling: str = "algorithm1"
    share_biases_norms: bool = True

    def __post_init__(self) -> None:
        self.mpo_shapes = {int(k): tuple(int(s) for s in v) for k, v in dict(self.mpo_shapes).items()}
        self.mpo_matrices = tuple(self.mpo_matrices)
        self.adapter_matrices = tuple(self.adapter_matrices)
        self.validate()

    # ------------------------------------------------------------------ validation
    def validate(self) -> None:
        """Raise ``ValueError``/``TypeError`` naming the first invalid field."""
        for name in ("vocab_size", "embedding_size", "hidden_size", "num_layers", "num_heads", "intermediate_size",
                     "max_position_embeddings", "type_vocab_size", "num_groups", "num_labels"):
            check_int(name, getattr(self, name), 1)
        for name in ("adapter_rank", "pad_token_id", "depth_scaling_after"):
            check_int(name, getattr(self, name), 0)
        check_int("mpo_n", self.mpo_n, 1)
        if self.mpo_n % 2 == 0:
            raise ValueError(f"mpo_n must be odd (a central core at index n // 2), got {self.mpo_n}")
        if self.max_bond is not None:
            check_int("max_bond", self.max_bond, 1)
        for name in ("hidden_dropout", "attention_dropout", "classifier_dropout"):
            _check_float(name, getattr(self, name), 0.0, 1.0, high_open=True)
        _check_float("layer_norm_eps", self.layer_norm_eps, 0.0, math.inf)
        if self.layer_norm_eps <= 0:
            raise ValueError(f"layer_norm_eps must be > 0, got {self.layer_norm_eps}")
        _check_float("initializer_range", self.initializer_range, 0.0, math.inf)
        _check_float("adapter_init_std", self.adapter_init_std, 0.0, math.inf)
        if self.pad_token_id >= self.vocab_size:
            raise ValueError(f"pad_token_id must be < vocab_size={self.vocab_size}, got {self.pad_token_id}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size={self.hidden_size} must be divisible by num_heads={self.num_heads}")
        if self.num_layers % self.num_groups:
            raise ValueError(f"num_layers={self.num_layers} must be divisible by num_groups={self.num_groups}")
        if not isinstance(self.share_biases_norms, bool):
            raise TypeError(f"share_biases_norms must be a bool, got {self.share_biases_norms!r}")
        if self.depth_scaling not in DEPTH_SCALINGS:
            raise ValueError(f"depth_scaling must be one of {list(DEPTH_SCALINGS)}, got {self.depth_scaling!r}")
        if self.hidden_act not in HIDDEN_ACTS:
            raise ValueError(f"hidden_act must be one of {sorted(HIDDEN_ACTS)}, got {self.hidden_act!r}")
        for name in ("mpo_matrices", "adapter_matrices"):
            unknown = [m for m in getattr(self, name) if m not in MATRICES]
            if unknown:
                raise ValueError(f"{name} has unknown matrix names {unknown}; known: {list(MATRICES)}")
            if len(set(getattr(self, name))) != len(getattr(self, name)):
                raise ValueError(f"{name} has duplicates: {list(getattr(self, name))}")
        for dim, shape in self.mpo_shapes.items():
            if len(shape) != self.mpo_n or any(s < 1 for s in shape):
                raise ValueError(f"mpo_shapes[{dim}]={shape} must have mpo_n={self.mpo_n} positive modes")
            if math.prod(shape) != dim:
                raise ValueError(f"mpo_shapes[{dim}]={shape} has product {math.prod(shape)}, expected {dim}")
        for dim in {self.hidden_size, self.intermediate_size}:
            try:
                self.shape_for(dim)
            except ValueError as exc:
                raise ValueError(f"mpo_shapes: no {self.mpo_n}-mode factorization for dimension {dim} ({exc}); "
                                 f"give one in mpo_shapes") from None

    # ------------------------------------------------------------------ derived
    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def layers_per_group(self) -> int:
        return self.num_layers // self.num_groups

    def group_of(self, layer: int) -> int:
        """Group index of 0-based ``layer`` (consecutive blocks of :attr:`layers_per_group`)."""
        return layer // self.layers_per_group

    def shape_for(self, dim: int) -> tuple[int, ...]:
        """Mode sizes used for dimension ``dim`` (an ``mpo_shapes`` override, else the balanced factorization)."""
        if dim in self.mpo_shapes:
            return self.mpo_shapes[dim]
        return factorize(dim, self.mpo_n)

    def matrix_dims(self, name: str) -> tuple[int, int]:
        """``(in_features, out_features)`` of matrix ``name``."""
        h, i = self.hidden_size, self.intermediate_size
        return {"ffn_in": (h, i), "ffn_out": (i, h)}.get(name, (h, h))

    @property
    def activation(self) -> str:
        """``hidden_act`` in :mod:`mpo_core.activation`'s vocabulary: ``"gelu"`` or ``"gelu_tanh"``."""
        return HIDDEN_ACTS[self.hidden_act]

    # ------------------------------------------------------------------ transformers' names
    num_hidden_layers = property(lambda self: self.num_layers, doc="Alias of :attr:`num_layers` (transformers' name).")
    num_attention_heads = property(lambda self: self.num_heads, doc="Alias of :attr:`num_heads` (transformers' name).")
    hidden_dropout_prob = property(lambda self: self.hidden_dropout, doc="Alias of :attr:`hidden_dropout`.")
    attention_probs_dropout_prob = property(lambda self: self.attention_dropout, doc="Alias of :attr:`attention_dropout`.")
    classifier_dropout_prob = property(lambda self: self.classifier_dropout, doc="Alias of :attr:`classifier_dropout`.")

    # ------------------------------------------------------------------ I/O
    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["mpo_shapes"] = {str(k): list(v) for k, v in self.mpo_shapes.items()}
        d["mpo_matrices"] = list(self.mpo_matrices)
        d["adapter_matrices"] = list(self.adapter_matrices)
        return d

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "MPOBertConfig":
        if not isinstance(data, dict):
            raise TypeError(f"config data must be a dict, got {type(data).__name__}")
        known = {f.name for f in dataclasses.fields(cls)} | set(ALIASES)
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"unknown MPOBertConfig fields {unknown}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "MPOBertConfig":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"config is not valid JSON: {exc}") from exc
        return cls.from_dict(data)

    def save(self, path: str | os.PathLike) -> None:
        """Write the JSON to ``path`` atomically (temporary file, then rename)."""
        atomic_write(path, self.to_json().encode())

    @classmethod
    def load(cls, path: str | os.PathLike) -> "MPOBertConfig":
        with open(path, encoding="utf-8") as fh:
            return cls.from_json(fh.read())

    def replace(self, **changes: Any) -> "MPOBertConfig":
        """A validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)

    # ------------------------------------------------------------------ presets
    @classmethod
    def mpobert12(cls, **overrides: Any) -> "MPOBertConfig":
        """MPOBERT12: L=12, H=768, A=12 (paper: 20M parameters)."""
        return cls(**{**dict(num_layers=12, hidden_size=768, num_heads=12, intermediate_size=3072), **overrides})

    @classmethod
    def mpobert24(cls, **overrides: Any) -> "MPOBertConfig":
        """MPOBERT24: L=24, H=1024, A=16 (paper: 46M)."""
        return cls(**{**dict(num_layers=24, hidden_size=1024, num_heads=16, intermediate_size=4096), **overrides})

    @classmethod
    def mpobert48(cls, **overrides: Any) -> "MPOBertConfig":
        """MPOBERT48: L=48, H=1024, A=16 (paper: 75M)."""
        return cls.mpobert24(**{"num_layers": 48, **overrides})

    @classmethod
    def mpobert48_plus(cls, **overrides: Any) -> "MPOBertConfig":
        """MPOBERT48+: MPOBERT48 with 3 groups of 16 layers, one central each (paper: 102M)."""
        return cls.mpobert48(**{"num_groups": 3, **overrides})

    @classmethod
    def tiny(cls, **overrides: Any) -> "MPOBertConfig":
        """A tiny model for tests and CPU demos (V=100, E=16, H=32, L=4, A=4, rank-2 adapters)."""
        base = dict(vocab_size=100, embedding_size=16, hidden_size=32, num_layers=4, num_heads=4,
                    intermediate_size=64, max_position_embeddings=64, mpo_n=5, num_groups=1, adapter_rank=2,
                    layer_norm_eps=1e-12)
        return cls(**{**base, **overrides})


def resolve_aliases(values: dict[str, Any]) -> dict[str, Any]:
    """``values`` with transformers' names (:data:`ALIASES`) replaced by MPOBERT's; a name given
    both ways with different values is a ``ValueError``."""
    out = dict(values)
    for alias, name in ALIASES.items():
        if alias in out:
            value = out.pop(alias)
            if name in out and out[name] != value:
                raise ValueError(f"{name}={out[name]!r} and its alias {alias}={value!r} disagree")
            out[name] = value
    return out


class MPOBertConfig(_ConfigFields):
    """Configuration of an MPOBERT model.

    Parameters
    ----------
    vocab_size, embedding_size, hidden_size, num_layers, num_heads, intermediate_size : int
        Vocabulary size ``V``; ALBERT's factorized embedding size ``E`` (``V x E`` table, then an
        ``E -> H`` projection); hidden size ``H``; layers ``L``; attention heads ``A`` (``H % A == 0``);
        feed-forward size.
    hidden_act : {"gelu", "gelu_new"}
        Exact erf GELU (BERT) or the tanh approximation (ALBERT's ``gelu_new``).
    hidden_dropout, attention_dropout : float
        Dropout on sublayer outputs / embeddings, and on attention probabilities.
    max_position_embeddings, type_vocab_size, pad_token_id : int
    layer_norm_eps : float
    initializer_range : float
        Std of the embedding (and head) initialization.
    mpo_n : int
        Number of MPO cores per matrix (odd, so that a central core exists; MPOBERT uses 5).
    mpo_shapes : dict, optional
        ``{dim: shape}`` overrides of the mode factorization of a dimension; otherwise
        :func:`mpo_core.shapes.factorize` (with ``mpo_n == 5`` it gives the published MPOBERT
        shapes, e.g. 768 -> (4, 4, 4, 4, 3), 3072 -> (4, 4, 8, 6, 4)).
    max_bond : int, optional
        Bond truncation of every MPO (``None`` = exact, full rank, as the paper).
    mpo_matrices : tuple of str
        Which of :data:`MATRICES` are MPO-factorized (central shared, auxiliaries per layer). The
        others stay dense and are shared by all layers of a group, as in ALBERT.
    num_groups : int
        ``1`` = MPOBERT (one central per matrix for all layers); ``G > 1`` = MPOBERT+ (one central
        per group of ``L / G`` consecutive layers).
    adapter_rank : int
        Rank ``r`` of the per-layer adapter ``U(l) D(l)`` (``0`` = none).
    adapter_init_std : float
        ``σ`` of ``D ~ N(0, σ²)`` (``U`` starts at zero).
    adapter_matrices : tuple of str
        Which matrices carry adapters. Default: the four attention matrices, the choice whose
        count reproduces the paper's adapter ablation (see ``tests/test_mpobert_model.py``).
    num_labels : int
        Outputs of the sequence-classification head (``1`` = regression).
    classifier_dropout : float
        Dropout before the classification / SOP heads.
    depth_scaling_after : int
        Layers with 1-based index above this get depth-scaled auxiliaries (paper: ALBERT provides
        24 layers' worth of initialization).
    share_biases_norms : bool
        ``True`` (the paper): the biases and LayerNorms are shared by a group's layers with the
        central cores; ``False``: every layer has its own (``L x`` (6 biases + 2 LayerNorms), e.g.
        30k parameters at L=6, H=384), which a conversion from BERT then copies exactly.
    depth_scaling : {"algorithm1", "random"}
        How those layers' auxiliary cores start when converting a checkpoint: ``"algorithm1"``
        (the paper's appendix A.2): the source's own auxiliaries, each core multiplied by
        ``(2L)^(-1/4)``; ``"random"`` (§3.3's text): Xavier cores times ``(2L)^(-1/4)``. A model
        from scratch has no source: Xavier times ``(2L)^(-1/4)`` either way.

    transformers' names are accepted as aliases (:data:`ALIASES`: ``num_hidden_layers``,
    ``num_attention_heads``, ``hidden_dropout_prob``, ``attention_probs_dropout_prob``,
    ``classifier_dropout_prob``), as constructor keywords, in :meth:`from_dict` and as attributes.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **resolve_aliases(kwargs))

    __init__.__signature__ = inspect.signature(_ConfigFields.__init__)  # type: ignore[attr-defined]
