"""MPOBERT from Hugging Face checkpoints: ALBERT (paper §3.3, Algorithm 1), BERT and RoBERTa, and the
:class:`InitReport` of how far the converted layers start from the source's.

* From ALBERT: each shared ALBERT matrix is MPO-decomposed once; every group's central takes its
  central core, every layer ``l <= 24`` its auxiliaries; embeddings, biases, LayerNorms and the
  pooler are copied. Layers beyond follow :mod:`mpobert.init`'s depth scaling.
* From BERT (layers not shared): the central of each group comes from one layer
  (``central_from="layer:K"``, 0-based, for every group) or from the mean of the group's layers
  (``"mean"``); biases and LayerNorms follow the same rule. Each layer's auxiliaries are then
  *fitted* to that layer's own weight with the central fixed (:func:`mpobert.fit.fit_auxiliaries`),
  so layer ``K`` with ``"layer:K"`` is exact.
* From RoBERTa: as from BERT (``roberta.`` keys; RoBERTa's positions start at ``pad_token_id + 1``,
  so the position table is copied from that row on).
* ``model.init_report`` (:class:`InitReport`) compares every layer's tensors with the source's:
  relative error and norm ratio of each weight, and the error of the shared biases and
  LayerNorms (which one group holds for all its layers).

Checkpoints are read without ``transformers`` (:mod:`mpobert.hf_checkpoint`).
"""
from __future__ import annotations

import os
from typing import Any, Callable

import torch
from torch import nn

from mpo_core import decompose
from mpo_core.rebuild import dense_matrix
from mpobert.config import MATRICES, MPOBertConfig
from mpobert.fit import fit_auxiliaries
from mpobert.hf_checkpoint import CheckpointState, hf_config, read_hf_checkpoint
from mpobert.init import depth_scale, xavier_auxiliaries

__all__ = ["from_albert", "from_bert", "InitReport"]

_NORMS = ("attn_ln.weight", "attn_ln.bias", "ffn_ln.weight", "ffn_ln.bias")


def _copy_embeddings(model: nn.Module, st: CheckpointState, word_key: str, ln_key: str, projection: str | None,
                     position_offset: int = 0) -> None:
    cfg, emb = model.config, model.embeddings
    e, h = cfg.embedding_size, cfg.hidden_size
    emb.word_embeddings.weight.copy_(st.get(word_key, (cfg.vocab_size, e)))
    positions = st.get("embeddings.position_embeddings.weight", (cfg.max_position_embeddings + position_offset, e))
    emb.position_embeddings.weight.copy_(positions[position_offset:])
    emb.token_type_embeddings.weight.copy_(st.get("embeddings.token_type_embeddings.weight", (cfg.type_vocab_size, e)))
    emb.ln_weight.copy_(st.get(ln_key + ".weight", (e,)))
    emb.ln_bias.copy_(st.get(ln_key + ".bias", (e,)))
    if projection is None:  # BERT: no factorized embedding, E = H, identity projection
        emb.projection.weight.copy_(torch.eye(h))
        emb.projection.bias.zero_()
    else:
        emb.projection.weight.copy_(st.get(projection + ".weight", (h, e)))
        emb.projection.bias.copy_(st.get(projection + ".bias", (h,)))


def _layer_tensors(st: CheckpointState, cfg: MPOBertConfig, keys: dict[str, str]) -> dict[str, torch.Tensor]:
    """``{matrix: W (in x out), matrix + '.bias': b, ln names: ...}`` of one source layer."""
    out = {}
    for m in MATRICES:
        fan_in, fan_out = cfg.matrix_dims(m)
        out[m] = st.get(keys[m] + ".weight", (fan_out, fan_in)).T
        out[m + ".bias"] = st.get(keys[m] + ".bias", (fan_out,))
    for ln in ("attn_ln", "ffn_ln"):
        for part in ("weight", "bias"):
            out[f"{ln}.{part}"] = st.get(f"{keys[ln]}.{part}", (cfg.hidden_size,))
    return out


def _set_group(group: nn.Module, src: dict[str, torch.Tensor], cfg: MPOBertConfig) -> dict[str, Any]:
    """Set a group's centrals (dense matrices) from one source layer; returns the MPOs of its MPO matrices."""
    mpos = {}
    for m in MATRICES:
        if m in group.central:
            fan_in, fan_out = cfg.matrix_dims(m)
            mpo = decompose(src[m], cfg.shape_for(fan_in), cfg.shape_for(fan_out), max_bond=cfg.max_bond)
            group.central[m].copy_(mpo.central)
            mpos[m] = mpo
        else:
            group.dense[m].copy_(src[m].T)
    return mpos


def _set_biases_norms(model: nn.Module, layer_sources: list[dict[str, torch.Tensor]],
                      group_sources: list[dict[str, torch.Tensor]]) -> None:
    """Biases and LayerNorms: each group's from its source, or (unshared) each layer's from its own."""
    shared = model.config.share_biases_norms
    targets = model.encoder.groups if shared else [layer.norms for layer in model.encoder.layers]
    for norms, src in zip(targets, group_sources if shared else layer_sources):
        for m in MATRICES:
            norms.bias[m].copy_(src[m + ".bias"])
        for name in _NORMS:
            ln, part = name.split(".")
            getattr(norms, f"{ln}_{part}").copy_(src[name])


def _set_auxiliaries(lin: nn.Module, cores: list[torch.Tensor]) -> None:
    for k, (core, src) in enumerate(zip(lin.cores, cores)):
        if k != lin.central_index:
            core.copy_(src)


def _init_layers(model: nn.Module, group_mpos: list[dict[str, Any]], fit: Callable[[int, str], list | None]) -> None:
    """Auxiliaries of every layer: ``fit(l, m)`` cores when it returns some, else the group source's
    auxiliaries below ``depth_scaling_after``; beyond, those times ``(2L)^(-1/4)`` per core
    (``depth_scaling="algorithm1"``) or depth-scaled Xavier ones (``"random"``)."""
    cfg = model.config
    for l, layer in enumerate(model.encoder.layers):
        for m, lin in layer.mpo.items():
            cores = fit(l, m)
            if cores is None:
                source = group_mpos[cfg.group_of(l)][m].cores
                if l < cfg.depth_scaling_after:
                    cores = source
                elif cfg.depth_scaling == "algorithm1":
                    cores = [c * depth_scale(l, cfg) for c in source]  # the central is not taken from these
            if cores is None:
                xavier_auxiliaries(model, l, m)
            else:
                _set_auxiliaries(lin, cores)


_ALBERT_LAYER = "encoder.albert_layer_groups.0.albert_layers.0."
_ALBERT_KEYS = {
    "q": "attention.query", "k": "attention.key", "v": "attention.value", "attn_out": "attention.dense",
    "ffn_in": "ffn", "ffn_out": "ffn_output", "attn_ln": "attention.LayerNorm", "ffn_ln": "full_layer_layer_norm",
}


def from_albert(cls: type, path: str | os.PathLike, **overrides: Any) -> nn.Module:
    """Build ``cls`` (an MPOBERT model class) from a local Hugging Face ALBERT checkpoint.

    Parameters
    ----------
    cls : type
        :class:`~mpobert.model.MPOBertModel` or a head class.
    path : str or os.PathLike
        Directory with ``config.json`` and ``model.safetensors`` or ``pytorch_model.bin``
        (``AlbertModel`` or ``AlbertFor*``; the ALBERT must share one layer: ``num_hidden_groups
        = inner_group_num = 1``).
    **overrides
        :class:`~mpobert.config.MPOBertConfig` fields that replace the checkpoint's, e.g.
        ``num_layers=48, num_groups=3, adapter_rank=8, max_bond=None``.

    Returns
    -------
    nn.Module
        With ``num_layers`` equal to ALBERT's, no adapters (``adapter_rank=0``) and no truncation,
        its forward equals ``transformers.AlbertModel``'s (float32, 1e-5). Head weights are copied
        where the checkpoint has them (MLM and SOP heads of ``AlbertForPreTraining``).
    """
    hf, raw = read_hf_checkpoint(path)
    if hf.get("num_hidden_groups", 1) != 1 or hf.get("inner_group_num", 1) != 1:
        raise ValueError("only ALBERT checkpoints with num_hidden_groups=1 and inner_group_num=1 (one shared layer) "
                         f"are supported, got {hf.get('num_hidden_groups')}/{hf.get('inner_group_num')}")
    config = hf_config(hf, "albert", overrides)
    st = CheckpointState(raw, "albert.")
    src = _layer_tensors(st, config, {k: _ALBERT_LAYER + v for k, v in _ALBERT_KEYS.items()})

    model = cls(config)
    base = model.base_model
    with torch.no_grad():
        _copy_embeddings(base, st, "embeddings.word_embeddings.weight", "embeddings.LayerNorm",
                         "encoder.embedding_hidden_mapping_in")
        _copy_pooler(base, st, "pooler")
        group_mpos = [_set_group(g, src, config) for g in base.encoder.groups]  # ALBERT's one layer, in every group
        _set_biases_norms(base, [src] * config.num_layers, [src] * config.num_groups)
        _init_layers(base, group_mpos, lambda l, m: None)
        model._load_albert_heads(raw)
    model.init_report = InitReport.measure(base, "albert", [src] * config.num_layers)
    return model


def _copy_pooler(model: nn.Module, st: CheckpointState, key: str) -> None:
    h = model.config.hidden_size
    if key + ".weight" in st.base:
        model.pooler.weight.copy_(st.get(key + ".weight", (h, h)))
        model.pooler.bias.copy_(st.get(key + ".bias", (h,)))


def _bert_keys(i: int) -> dict[str, str]:
    p = f"encoder.layer.{i}."
    return {"q": p + "attention.self.query", "k": p + "attention.self.key", "v": p + "attention.self.value",
            "attn_out": p + "attention.output.dense", "ffn_in": p + "intermediate.dense", "ffn_out": p + "output.dense",
            "attn_ln": p + "attention.output.LayerNorm", "ffn_ln": p + "output.LayerNorm"}


def from_bert(cls: type, path: str | os.PathLike, central_from: str = "mean", **overrides: Any) -> nn.Module:
    """Build ``cls`` from a local Hugging Face BERT or RoBERTa checkpoint (layers not shared).

    Parameters
    ----------
    cls : type
        :class:`~mpobert.model.MPOBertModel` or a head class.
    path : str or os.PathLike
        ``BertModel``/``BertFor*`` checkpoint directory.
    central_from : str
        ``"mean"``: each group's central (and its shared biases/LayerNorms) comes from the mean of
        the group's BERT layers; ``"layer:K"``: from BERT layer ``K`` (0-based) for every group.
        ``"mean"`` is the default: it favours no layer, and the per-layer auxiliary fit then
        recovers each layer's own weight as well as the shared central allows.
    **overrides
        Config fields (``num_layers``, ``num_groups``, ``adapter_rank``, ...). ``embedding_size``
        is BERT's hidden size (the ``E -> H`` projection starts as the identity).

    Returns
    -------
    nn.Module
        ``model.init_report[(layer, matrix)]`` is the relative Frobenius error of that layer's
        MPO weight against the BERT layer's weight.
    """
    hf, raw = read_hf_checkpoint(path)
    family = hf.get("model_type", "bert")
    if family not in ("bert", "roberta"):
        raise ValueError(f"expected a bert or roberta checkpoint, config.json says model_type={family!r}")
    if overrides.get("embedding_size", hf.get("hidden_size")) != hf.get("hidden_size"):
        raise ValueError("embedding_size must equal BERT's hidden_size (BERT has no factorized embedding)")
    offset = (hf.get("pad_token_id") or 0) + 1 if family == "roberta" else 0  # RoBERTa: positions from pad + 1
    if offset:
        overrides = {"max_position_embeddings": hf.get("max_position_embeddings", 514) - offset, **overrides}
    config = hf_config(hf, family, overrides)
    n_bert = hf["num_hidden_layers"]
    if not isinstance(central_from, str) or not (central_from == "mean" or central_from.startswith("layer:")):
        raise ValueError(f"central_from must be 'mean' or 'layer:K', got {central_from!r}")
    if central_from != "mean":
        k = central_from[len("layer:"):]
        if not k.isdigit() or int(k) >= n_bert:
            raise ValueError(f"central_from={central_from!r}: K must be an int in [0, {n_bert})")
    st = CheckpointState(raw, family + ".")
    layers = [_layer_tensors(st, config, _bert_keys(i)) for i in range(n_bert)]
    cfg = config

    def source(g: int) -> dict[str, torch.Tensor]:
        if central_from != "mean":
            return layers[int(central_from[len("layer:"):])]
        members = [layers[l] for l in range(cfg.num_layers) if cfg.group_of(l) == g and l < n_bert] or layers
        return {key: torch.stack([m[key] for m in members]).mean(0) for key in members[0]}

    model = cls(config)
    base = model.base_model
    with torch.no_grad():
        _copy_embeddings(base, st, "embeddings.word_embeddings.weight", "embeddings.LayerNorm", None, offset)
        _copy_pooler(base, st, "pooler.dense")
        sources = [source(i) for i in range(cfg.num_groups)]
        group_mpos = [_set_group(g, src, cfg) for g, src in zip(base.encoder.groups, sources)]

        def fit(l: int, m: str) -> list[torch.Tensor] | None:
            if l >= n_bert:
                return None
            mpo = group_mpos[cfg.group_of(l)][m]
            return fit_auxiliaries(layers[l][m], mpo.cores, mpo.central_index)[0]

        _init_layers(base, group_mpos, fit)
        # layers beyond BERT's depth take (and are compared with) their group's source
        per_layer = [layers[l] if l < n_bert else sources[cfg.group_of(l)] for l in range(cfg.num_layers)]
        _set_biases_norms(base, per_layer, sources)
    model.init_report = InitReport.measure(base, family, per_layer)
    return model


# ---------------------------------------------------------------------- report
def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(a.double() - b.double()) / torch.linalg.vector_norm(b.double()).clamp_min(1e-300))


class InitReport:
    """How far a converted model's layers start from the source checkpoint's.

    One row per layer and tensor (``"q"`` ... ``"ffn_out"``, ``"q.bias"`` ..., ``"attn_ln.weight"``
    ...): ``rel_error`` ``||T_model - T_source||_F / ||T_source||_F`` and ``norm_ratio``
    ``||T_model||_F / ||T_source||_F``. A weight's model value includes its adapter; biases and
    LayerNorms are the group's shared ones, so their error is what sharing merges away (zero with
    ``share_biases_norms=False``, where each layer keeps its own). The
    source of layer ``l`` is ALBERT's one layer, or BERT's layer ``l`` (beyond BERT's depth: the
    group's source). ``report[(layer, tensor)]`` is the ``rel_error``.
    """

    def __init__(self, source: str, rows: list[dict[str, Any]]) -> None:
        self.source = source
        self.rows = rows
        self._by_key = {(r["layer"], r["tensor"]): r for r in rows}

    @classmethod
    @torch.no_grad()
    def measure(cls, model: nn.Module, source: str, sources: list[dict[str, torch.Tensor]]) -> "InitReport":
        """Compare every layer of the MPOBERT base ``model`` with ``sources[l]`` (:func:`_layer_tensors` dicts)."""
        rows = []
        for l, (layer, src) in enumerate(zip(model.encoder.layers, sources)):
            group = layer.norms
            for m in MATRICES:
                w = dense_matrix(list(layer.mpo[m].cores)) if m in layer.mpo else layer.group.dense[m].T
                if m in layer.adapters:
                    w = w + layer.adapters[m].U @ layer.adapters[m].D
                rows.append({"layer": l, "tensor": m, "rel_error": _rel(w, src[m]),
                             "norm_ratio": float(w.double().norm() / src[m].double().norm().clamp_min(1e-300))})
                rows.append({"layer": l, "tensor": m + ".bias", "rel_error": _rel(group.bias[m], src[m + ".bias"])})
            for name in _NORMS:
                ln, part = name.split(".")
                rows.append({"layer": l, "tensor": name, "rel_error": _rel(getattr(group, f"{ln}_{part}"), src[name])})
        return cls(source, rows)

    def __getitem__(self, key: tuple[int, str]) -> float:
        return self._by_key[key]["rel_error"]

    def __contains__(self, key: object) -> bool:
        return key in self._by_key

    def norm_ratio(self, layer: int, tensor: str) -> float:
        """``||W_model|| / ||W_source||`` of weight ``tensor`` (one of :data:`~mpobert.config.MATRICES`) in ``layer``."""
        return self._by_key[(layer, tensor)]["norm_ratio"]

    def to_dict(self) -> dict[str, Any]:
        return {"source": self.source, "rows": list(self.rows)}

    def table(self) -> str:
        """Per layer: each weight's relative error, the worst shared bias and LayerNorm error, and the
        range of the weights' norm ratios."""
        layers = sorted({r["layer"] for r in self.rows})
        head = f"{'layer':>5}" + "".join(f"{m:>9}" for m in MATRICES) + f"{'biases':>9}{'LNs':>9}{'|W|/|src|':>14}"
        lines = [f"initialization vs the {self.source} checkpoint: relative Frobenius errors "
                 "(biases, LNs: worst of the shared ones)", head, "-" * len(head)]
        for l in layers:
            bias = max(self._by_key[(l, m + ".bias")]["rel_error"] for m in MATRICES)
            norms = max(self._by_key[(l, n)]["rel_error"] for n in _NORMS)
            ratios = [self._by_key[(l, m)]["norm_ratio"] for m in MATRICES]
            lines.append(f"{l:>5}" + "".join(f"{self[(l, m)]:>9.3f}" for m in MATRICES)
                         + f"{bias:>9.3f}{norms:>9.3f}{min(ratios):>7.3f}-{max(ratios):.3f}")
        return "\n".join(lines)
