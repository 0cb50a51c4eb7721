"""The BERT / MPOBERT shapes the GPU tooling models and compiles for (``mpo_core`` never imports ``mpobert``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

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
LINEAR_SHAPES = tuple(shape for h, f in zip(HIDDEN, FFN) for shape in ((h, h), (h, f), (f, h)))
"""``(in, out)`` of every BERT-base/large weight matrix."""


@dataclass(frozen=True)
class BertShape:
    """What the MPOBERT training-step model (:func:`mpo_core.gpu.step.mpobert_step`) needs of a config.

    No sizes live here: build it from an MPOBERT config with :meth:`from_config`.
    """

    layers: int
    hidden: int
    intermediate: int
    heads: int
    vocab: int
    embedding: int
    adapter_rank: int
    adapter_matrices: int
    params: int
    """Trainable parameters (the optimizer's traffic)."""
    hidden_dropout: bool = False

    @classmethod
    def from_config(cls, config: Any, params: int, hidden_dropout: bool = False) -> "BertShape":
        """The shape of an ``mpobert.MPOBertConfig`` (read by attribute: ``mpo_core`` never imports ``mpobert``)
        whose model has ``params`` parameters."""
        return cls(layers=config.num_layers, hidden=config.hidden_size, intermediate=config.intermediate_size,
                   heads=config.num_heads, vocab=config.vocab_size, embedding=config.embedding_size,
                   adapter_rank=config.adapter_rank, adapter_matrices=len(config.adapter_matrices), params=params,
                   hidden_dropout=hidden_dropout)
