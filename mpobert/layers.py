"""MPOBERT building blocks: embeddings, per-group shared tensors, the MPO transformer layer, the encoder.

Sharing (see docs/architecture.md): for every MPO-factorized matrix, the central core is one
``nn.Parameter`` per group (:class:`SharedGroup`), handed to each layer's
:class:`~mpo_core.nn.MPOLinear` with ``share_core``; the auxiliary cores belong to the layer.
Biases, LayerNorms and the dense (non-factorized) matrices are shared with the central cores,
i.e. one per group. Each layer holds a reference to its group, not a submodule: the encoder
owns the groups, so biases and LayerNorms are registered once (a central also sits in each
layer's ``MPOLinear.cores``; ``save_pretrained`` stores it once, the others as aliases). Each
layer may add a low-rank adapter ``U(l) D(l)`` to a matrix: ``W(l) = MPO(l) + U(l) D(l)``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from mpo_core.accumulate import forward_weights
from mpo_core.nn import MPOLinear
from mpo_core.nn.linear import LOW_RANK_SCOPE
from mpo_core.ops import bias_gelu, layer_norm, residual_layer_norm
from mpo_core.shapes import capped_ranks
from mpobert.config import MATRICES, MPOBertConfig

__all__ = ["LowRankAdapter", "SharedGroup", "LayerBiasesNorms", "MPOBertLayer", "MPOBertEncoder", "MPOBertEmbeddings", "attention_bool_mask",
           "central_shape"]


class LowRankAdapter(nn.Module):
    """``x -> (x @ U) @ D`` with ``U`` of shape ``(in, r)`` (zero at init) and ``D`` of shape ``(r, out)``.

    With ``U = 0`` the adapter adds nothing at initialization, yet ``U`` receives gradients
    (``dL/dU = x^T (dL/dy) D^T``), so it starts learning immediately.
    """

    def __init__(self, in_features: int, out_features: int, rank: int, init_std: float) -> None:
        super().__init__()
        self.init_std = init_std
        self.U = nn.Parameter(torch.empty(in_features, rank))
        self.D = nn.Parameter(torch.empty(rank, out_features))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            self.U.zero_()
            self.D.normal_(0.0, self.init_std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with torch.profiler.record_function(LOW_RANK_SCOPE):
            return (x @ self.U) @ self.D

    def extra_repr(self) -> str:
        return f"in_features={self.U.shape[0]}, out_features={self.D.shape[1]}, rank={self.U.shape[1]}"


class SharedGroup(nn.Module):
    """What the layers of one group share: central cores, dense matrices, biases, LayerNorms.

    The encoder owns the groups (``encoder.groups``); each :class:`MPOBertLayer` holds a
    reference to its group and reads every shared tensor from it, so each is registered once.

    Attributes
    ----------
    central : nn.ParameterDict
        For each MPO-factorized matrix, its central core ``(d_{c}, i_c, j_c, d_{c+1})``; every
        layer of the group plugs this very parameter into its :class:`~mpo_core.nn.MPOLinear`
        (:meth:`~mpo_core.nn.MPOLinear.share_core`).
    dense : nn.ParameterDict
        For each non-factorized matrix, its ``(out_features, in_features)`` weight.
    bias : nn.ParameterDict
        For every matrix, its ``(out_features,)`` bias.
    attn_ln_weight, attn_ln_bias, ffn_ln_weight, ffn_ln_bias : nn.Parameter
        The post-attention and post-FFN LayerNorms.

    The biases and LayerNorms are here only with ``config.share_biases_norms``; otherwise each
    layer holds its own (:class:`LayerBiasesNorms`).
    """

    def __init__(self, config: MPOBertConfig) -> None:
        super().__init__()
        self.central = nn.ParameterDict({m: nn.Parameter(torch.empty(central_shape(config, m))) for m in config.mpo_matrices})
        self.dense = nn.ParameterDict({
            m: nn.Parameter(torch.empty(config.matrix_dims(m)[::-1])) for m in MATRICES if m not in config.mpo_matrices
        })
        if config.share_biases_norms:
            _add_biases_norms(self, config)


def _add_biases_norms(module: nn.Module, config: MPOBertConfig) -> None:
    """Register the six matrices' biases (``module.bias``) and the two LayerNorms on ``module``."""
    h = config.hidden_size
    module.bias = nn.ParameterDict({m: nn.Parameter(torch.zeros(config.matrix_dims(m)[1])) for m in MATRICES})
    module.attn_ln_weight = nn.Parameter(torch.ones(h))
    module.attn_ln_bias = nn.Parameter(torch.zeros(h))
    module.ffn_ln_weight = nn.Parameter(torch.ones(h))
    module.ffn_ln_bias = nn.Parameter(torch.zeros(h))


class LayerBiasesNorms(nn.Module):
    """One layer's own biases and LayerNorms (``config.share_biases_norms = False``): the same
    attributes as a :class:`SharedGroup`'s (``bias``, ``attn_ln_weight``, ...)."""

    def __init__(self, config: MPOBertConfig) -> None:
        super().__init__()
        _add_biases_norms(self, config)


def central_shape(config: MPOBertConfig, name: str) -> torch.Size:
    """Shape of matrix ``name``'s central core: full-rank bonds capped at ``config.max_bond``."""
    in_shape, out_shape = config.shape_for(config.matrix_dims(name)[0]), config.shape_for(config.matrix_dims(name)[1])
    ranks = capped_ranks(in_shape, out_shape, config.max_bond)
    c = len(in_shape) // 2
    return torch.Size((ranks[c], in_shape[c], out_shape[c], ranks[c + 1]))


def _mpo_linear(config: MPOBertConfig, name: str) -> MPOLinear:
    fan_in, fan_out = config.matrix_dims(name)
    return MPOLinear(fan_in, fan_out, config.shape_for(fan_in), config.shape_for(fan_out),
                     max_bond=config.max_bond, bias=False)


class MPOBertLayer(nn.Module):
    """One post-LN transformer layer whose matrices are MPOs with a shared central core.

    Parameters
    ----------
    config : MPOBertConfig
    group : SharedGroup
        The group's shared tensors, held by reference (:attr:`group`; the encoder registers it):
        every MPO matrix of this layer takes its central core from ``group.central`` (one
        ``nn.Parameter``, the same object in all layers of the group), and the forward reads the
        group's biases, LayerNorms and dense matrices.
    """

    def __init__(self, config: MPOBertConfig, group: SharedGroup) -> None:
        super().__init__()
        if not isinstance(group, SharedGroup):
            raise TypeError(f"group must be a SharedGroup, got {type(group).__name__}")
        self.config = config
        self._group = (group,)  # a reference, not a submodule: the encoder registers each group once
        self.mpo = nn.ModuleDict()
        for name in config.mpo_matrices:
            layer = _mpo_linear(config, name)
            layer.share_core(layer.central_index, group.central[name])
            self.mpo[name] = layer
        self.own = None if config.share_biases_norms else LayerBiasesNorms(config)
        self.adapters = nn.ModuleDict()
        if config.adapter_rank > 0:
            for name in config.adapter_matrices:
                self.adapters[name] = LowRankAdapter(*config.matrix_dims(name), config.adapter_rank,
                                                     config.adapter_init_std)
                if name in self.mpo:  # W(l) = MPO(l) + U(l) D(l), folded into one GEMM where W is dense
                    self.mpo[name].attach_update(self.adapters[name])

    @property
    def group(self) -> SharedGroup:
        """The :class:`SharedGroup` this layer shares its central cores, biases and LayerNorms with."""
        return self._group[0]

    @property
    def norms(self) -> nn.Module:
        """Where this layer's biases and LayerNorms live: its group, or its own :class:`LayerBiasesNorms`."""
        return self.group if self.own is None else self.own

    def project(self, name: str, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """``x @ W(l) + bias`` for matrix ``name``: its MPO with the adapter attached (one GEMM wherever ``W``
        is dense: :meth:`~mpo_core.nn.MPOLinear.attach_update`), or the group's dense matrix plus the adapter."""
        if name in self.mpo:
            return self.mpo[name](x, bias)
        y = F.linear(x, self.group.dense[name], bias)
        if name in self.adapters:
            y = y + self.adapters[name](x)
        return y

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """``hidden``: ``(B, S, H)``; ``mask``: boolean ``(B, 1, 1, S)`` (True = attend) or ``None``."""
        cfg, group = self.config, self.norms  # biases and LayerNorms: the group's, or this layer's own
        b, s, h = hidden.shape
        heads = [
            self.project(m, hidden, group.bias[m]).view(b, s, cfg.num_heads, cfg.head_dim).transpose(1, 2)
            for m in ("q", "k", "v")
        ]
        ctx = F.scaled_dot_product_attention(*heads, attn_mask=mask,
                                             dropout_p=cfg.attention_dropout if self.training else 0.0)
        ctx = ctx.transpose(1, 2).reshape(b, s, h)
        attn = self.project("attn_out", ctx, group.bias["attn_out"])
        # under autocast the sublayer output may be in another dtype than the residual stream
        hidden = residual_layer_norm(hidden, attn.to(hidden.dtype), group.attn_ln_weight, group.attn_ln_bias, cfg.layer_norm_eps,
                                     dropout_p=cfg.hidden_dropout, training=self.training)
        inner = bias_gelu(self.project("ffn_in", hidden, group.bias["ffn_in"]), None, cfg.activation)
        out = self.project("ffn_out", inner, group.bias["ffn_out"])
        return residual_layer_norm(hidden, out.to(hidden.dtype), group.ffn_ln_weight, group.ffn_ln_bias, cfg.layer_norm_eps,
                                   dropout_p=cfg.hidden_dropout, training=self.training)


class MPOBertEncoder(nn.Module):
    """``G`` shared groups and ``L`` layers; layer ``l`` holds group ``config.group_of(l)``."""

    def __init__(self, config: MPOBertConfig) -> None:
        super().__init__()
        self.config = config
        self.groups = nn.ModuleList(SharedGroup(config) for _ in range(config.num_groups))
        self.layers = nn.ModuleList(MPOBertLayer(config, self.groups[config.group_of(l)])
                                    for l in range(config.num_layers))

    def forward(self, hidden: torch.Tensor, mask: torch.Tensor | None,
                output_hidden_states: bool = False) -> tuple[torch.Tensor, list[torch.Tensor] | None]:
        states = [hidden] if output_hidden_states else None
        with forward_weights(self):  # every W built once, batched per shared central (inside weight_cache: its)
            for layer in self.layers:
                hidden = layer(hidden, mask)
                if states is not None:
                    states.append(hidden)
        return hidden, states


class MPOBertEmbeddings(nn.Module):
    """ALBERT's factorized embeddings: ``V x E`` words + positions + token types, LayerNorm, dropout, ``E -> H``."""

    def __init__(self, config: MPOBertConfig) -> None:
        super().__init__()
        self.config = config
        e = config.embedding_size
        self.word_embeddings = nn.Embedding(config.vocab_size, e, padding_idx=config.pad_token_id)
        self.position_embeddings = nn.Embedding(config.max_position_embeddings, e)
        self.token_type_embeddings = nn.Embedding(config.type_vocab_size, e)
        self.ln_weight = nn.Parameter(torch.ones(e))
        self.ln_bias = nn.Parameter(torch.zeros(e))
        self.dropout = nn.Dropout(config.hidden_dropout)
        self.projection = nn.Linear(e, config.hidden_size)

    def forward(self, input_ids: torch.Tensor | None, token_type_ids: torch.Tensor | None,
                position_ids: torch.Tensor | None, inputs_embeds: torch.Tensor | None) -> torch.Tensor:
        embeds = self.word_embeddings(input_ids) if inputs_embeds is None else inputs_embeds
        b, s = embeds.shape[:2]
        if s > self.config.max_position_embeddings:
            raise ValueError(f"sequence length {s} exceeds max_position_embeddings={self.config.max_position_embeddings}")
        if position_ids is None:
            position_ids = torch.arange(s, device=embeds.device).expand(b, s)
        if token_type_ids is None:
            token_type_ids = torch.zeros((b, s), dtype=torch.long, device=embeds.device)
        x = embeds + self.token_type_embeddings(token_type_ids) + self.position_embeddings(position_ids)
        x = layer_norm(x, self.ln_weight, self.ln_bias, self.config.layer_norm_eps)
        return self.projection(self.dropout(x))


def attention_bool_mask(attention_mask: torch.Tensor | None, batch: int, seq: int,
                        device: torch.device) -> torch.Tensor | None:
    """Hugging Face padding mask ``(B, S)`` (1 = token, 0 = padding) -> boolean ``(B, 1, 1, S)`` for SDPA.

    ``None`` (or an all-ones mask) gives ``None``: no masking.
    """
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != (batch, seq):
        raise ValueError(f"attention_mask must be a tensor of shape {(batch, seq)}, "
                         f"got {getattr(attention_mask, 'shape', type(attention_mask).__name__)}")
    keep = attention_mask.to(device=device) != 0
    if bool(keep.all()):
        return None
    return keep[:, None, None, :]
