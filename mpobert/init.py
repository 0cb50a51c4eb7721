"""MPOBERT initialization rules and the random initialization from scratch.

Rules
-----
* Cores are "Xavier" in the MPO sense: every core ``~ N(0, s²)`` with ``s`` chosen so that the
  dense ``W`` they multiply out to has Xavier's variance ``2 / (in + out)``
  (:func:`xavier_core_std`).
* Depth scaling: the auxiliary cores of layers with 1-based index ``l > depth_scaling_after``
  (24: ALBERT gives 24 layers' worth of initialization) are multiplied by ``(2L)^(-1/4)``:
  the source's own auxiliaries (``config.depth_scaling = "algorithm1"``, the paper's Algorithm 1,
  the default) or Xavier ones (``"random"``, §3.3's text; always so from scratch).

Conversions from ALBERT, BERT and RoBERTa checkpoints (which follow the same rules) are in
:mod:`mpobert.convert`; the per-layer auxiliary fit in :mod:`mpobert.fit`.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from mpobert.config import MPOBertConfig

__all__ = ["xavier_core_std", "depth_scale", "xavier_auxiliaries", "init_model"]


def xavier_core_std(in_features: int, out_features: int, ranks: list[int]) -> float:
    """Std ``s`` of i.i.d. ``N(0, s²)`` cores whose dense product has variance ``2 / (in + out)``.

    An entry of ``W`` is a sum of ``prod(ranks)`` products of ``n`` independent cores' entries,
    so ``Var W = s^(2n) prod(ranks)``.
    """
    n = len(ranks) - 1
    return (2.0 / (in_features + out_features) / math.prod(ranks)) ** (1.0 / (2 * n))


def depth_scale(layer: int, config: MPOBertConfig) -> float:
    """``(2L)^(-1/4)`` for 0-based ``layer >= depth_scaling_after``, else 1."""
    return (2.0 * config.num_layers) ** -0.25 if layer >= config.depth_scaling_after else 1.0


def xavier_auxiliaries(model: nn.Module, layer: int, name: str, generator: torch.Generator | None = None) -> None:
    """Xavier-initialize layer ``layer``'s auxiliary cores of matrix ``name``, depth-scaled."""
    cfg = model.config
    lin = model.encoder.layers[layer].mpo[name]
    std = xavier_core_std(lin.in_features, lin.out_features, lin.ranks) * depth_scale(layer, cfg)
    for k, core in enumerate(lin.cores):
        if k != lin.central_index:
            core.normal_(0.0, std, generator=generator)


@torch.no_grad()
def init_model(model: nn.Module) -> None:
    """Random initialization of an :class:`~mpobert.model.MPOBertModel` (module docstring's rules).

    Embeddings and the pooler/projection weights ``N(0, initializer_range²)`` (padding row 0),
    biases 0, LayerNorms 1/0, dense (non-MPO) matrices Xavier normal, adapters ``U = 0``,
    ``D ~ N(0, adapter_init_std²)``.
    """
    cfg = model.config
    std = cfg.initializer_range
    emb = model.embeddings
    for table in (emb.word_embeddings, emb.position_embeddings, emb.token_type_embeddings):
        table.weight.normal_(0.0, std)
    emb.word_embeddings.weight[cfg.pad_token_id].zero_()
    emb.ln_weight.fill_(1.0)
    emb.ln_bias.zero_()
    for lin in (emb.projection, model.pooler):
        lin.weight.normal_(0.0, std)
        lin.bias.zero_()
    first = model.encoder.layers[0]
    for group in model.encoder.groups:
        for name, central in group.central.items():
            lin = first.mpo[name]
            central.normal_(0.0, xavier_core_std(lin.in_features, lin.out_features, lin.ranks))
        for weight in group.dense.values():
            nn.init.xavier_normal_(weight)
    for norms in {id(layer.norms): layer.norms for layer in model.encoder.layers}.values():
        for bias in norms.bias.values():
            bias.zero_()
        for ln_w, ln_b in ((norms.attn_ln_weight, norms.attn_ln_bias), (norms.ffn_ln_weight, norms.ffn_ln_bias)):
            ln_w.fill_(1.0)
            ln_b.zero_()
    for l, layer in enumerate(model.encoder.layers):
        for name in layer.mpo:
            xavier_auxiliaries(model, l, name)
        for adapter in layer.adapters.values():
            adapter.reset_parameters()
