"""Parameter reports: MPOBERT's parameters by role, each shared tensor counted once.

Roles: ``embeddings`` (word/position/type tables, their LayerNorm, the ``E -> H`` projection),
``central`` (shared central cores), ``auxiliary`` (layer-specific cores), ``adapters``
(``U(l)``, ``D(l)``), ``shared_other`` (biases, LayerNorms and dense matrices shared within a
group), ``pooler``, ``heads`` (everything outside the base model; a weight tied to the
embeddings is not counted again). ``dense_equivalent`` is the same model with every layer owning
dense matrices (``L x`` the six matrices, biases and LayerNorms: BERT with ALBERT's embeddings).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

from torch import nn

from mpo_core.nn import MPOLinear
from mpobert.config import MATRICES, MPOBertConfig

__all__ = ["ParameterReport", "parameter_report"]

ROLES = ("embeddings", "central", "auxiliary", "adapters", "shared_other", "pooler", "heads")


@dataclass
class ParameterReport:
    """Parameter counts by role (see the module docstring); ``print`` it for a table."""

    embeddings: int
    central: int
    auxiliary: int
    adapters: int
    shared_other: int
    pooler: int
    heads: int
    total: int
    dense_equivalent: int
    num_layers: int
    num_groups: int

    @property
    def auxiliary_per_layer(self) -> float:
        return self.auxiliary / self.num_layers

    @property
    def base_model(self) -> int:
        """Everything but the task heads (what ``AlbertModel`` counts, pooler included)."""
        return self.total - self.heads

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["auxiliary_per_layer"] = self.auxiliary_per_layer
        d["base_model"] = self.base_model
        return d

    def __str__(self) -> str:
        rows = [
            ("embeddings (V x E, pos, type, LN, E->H)", self.embeddings),
            (f"central cores (shared, {self.num_groups} group{'s' if self.num_groups > 1 else ''})", self.central),
            (f"auxiliary cores ({self.num_layers} layers, {self.auxiliary_per_layer:,.0f}/layer)", self.auxiliary),
            ("adapters U(l) D(l)", self.adapters),
            ("biases / LayerNorms / dense (per group, or per layer)", self.shared_other),
            ("pooler", self.pooler),
            ("task heads", self.heads),
        ]
        width = max(len(r[0]) for r in rows) + 2
        lines = [f"{'role':<{width}}{'params':>14}{'share':>9}", "-" * (width + 23)]
        for name, count in rows:
            lines.append(f"{name:<{width}}{count:>14,}{count / max(self.total, 1):>9.1%}")
        lines.append("-" * (width + 23))
        lines.append(f"{'total (shared tensors once)':<{width}}{self.total:>14,}{self.total / 1e6:>8.2f}M")
        lines.append(f"{'base model (total - heads)':<{width}}{self.base_model:>14,}{self.base_model / 1e6:>8.2f}M")
        lines.append(f"{'dense equivalent (per-layer dense)':<{width}}{self.dense_equivalent:>14,}"
                     f"{self.dense_equivalent / 1e6:>8.2f}M")
        return "\n".join(lines)


def parameter_report(model: nn.Module) -> ParameterReport:
    """Count ``model``'s parameters (an MPOBERT model or head model) by role, each tensor once."""
    base = model.base_model
    cfg: MPOBertConfig = model.config
    role: dict[int, tuple[str, int]] = {}

    def assign(params, name: str) -> None:
        for p in params:
            role.setdefault(id(p), (name, p.numel()))

    # most specific first: a parameter keeps the first role it gets
    for group in base.encoder.groups:
        assign(group.central.values(), "central")
    for layer in base.encoder.layers:
        for lin in layer.modules():
            if isinstance(lin, MPOLinear):
                assign(lin.auxiliary, "auxiliary")
        assign(layer.adapters.parameters(), "adapters")
    assign(base.encoder.parameters(), "shared_other")
    assign(base.embeddings.parameters(), "embeddings")
    assign(base.pooler.parameters(), "pooler")
    assign(model.parameters(), "heads")
    counts = dict.fromkeys(ROLES, 0)
    for name, n in role.values():
        counts[name] += n
    total = sum(counts.values())
    per_layer = sum(cfg.matrix_dims(m)[0] * cfg.matrix_dims(m)[1] + cfg.matrix_dims(m)[1] for m in MATRICES)
    per_layer += 4 * cfg.hidden_size  # two LayerNorms
    dense = counts["embeddings"] + counts["pooler"] + counts["heads"] + cfg.num_layers * per_layer
    return ParameterReport(**counts, total=total, dense_equivalent=dense,
                           num_layers=cfg.num_layers, num_groups=cfg.num_groups)
