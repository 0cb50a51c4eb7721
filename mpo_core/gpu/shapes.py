"""The BERT / MPOBERT shapes the GPU tooling models and compiles for (``mpo_core`` never imports ``mpobert``)."""
from __future__ import annotations

from dataclasses import dataclass

from mpo_core.shapes import factorize

__all__ = ["BERT_TOKENS", "BertShape", "FFN", "HIDDEN", "LINEAR_SHAPES", "MPO_MODES", "OP_HIDDEN"]

BERT_TOKENS = 32 * 512
"""Rows of every modelled and registered launch: pre-training batch 32 x sequence 512."""
HIDDEN = (768, 1024)
"""Hidden sizes of BERT-base / BERT-large (LayerNorm rows)."""
FFN = (3072, 4096)
"""Feed-forward sizes of BERT-base / BERT-large (bias + GELU rows)."""
OP_HIDDEN = {"layer_norm": HIDDEN, "residual_layer_norm": HIDDEN, "residual_dropout_layer_norm": HIDDEN,
             "bias_gelu": FFN}
"""Row lengths of each fused op in BERT-base / BERT-large."""
MPO_MODES = {dim: factorize(dim, 5) for dim in (*HIDDEN, *FFN)}
"""MPOBERT's ``n = 5`` modes of each dimension (:func:`mpo_core.shapes.factorize`; 768: ``(4, 4, 4, 4, 3)``)."""
LINEAR_SHAPES = ((768, 768), (768, 3072), (3072, 768), (1024, 1024), (1024, 4096), (4096, 1024))
"""``(in, out)`` of every BERT-base/large weight matrix."""


@dataclass(frozen=True)
class BertShape:
    """What the MPOBERT training-step model (:func:`mpo_core.gpu.step.mpobert_step`) needs of a config."""

    layers: int = 12
    hidden: int = 768
    intermediate: int = 3072
    heads: int = 12
    vocab: int = 30000
    embedding: int = 128
    adapter_rank: int = 8
    adapter_matrices: int = 4
    hidden_dropout: bool = False
    params: int = 20_000_000
