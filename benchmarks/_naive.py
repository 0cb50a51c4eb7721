"""``train_step``'s ``naive`` contender: MPOBERT as the public MPOBERT code runs it (every forward
rebuilds each dense ``W`` from its cores, unfused LayerNorm and GELU, no caching)."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from mpo_core.activation import gelu_approximate
from mpobert import MPOBertModel


def naive_rebuild(cores: list[torch.Tensor]) -> torch.Tensor:
    """Dense ``(in, out)`` matrix from MPO cores, as the public MPOBERT code does it: float32, left to right."""
    t = cores[0].float()
    for core in cores[1:]:
        t = torch.tensordot(t, core.float(), dims=([t.dim() - 1], [0]))
    n = len(cores)
    t = t.reshape([s for c in cores for s in c.shape[1:3]])  # (i1, j1, ..., in, jn)
    t = t.permute(list(range(0, 2 * n, 2)) + list(range(1, 2 * n, 2)))
    return t.reshape(math.prod(c.shape[1] for c in cores), math.prod(c.shape[2] for c in cores))


class NaiveMPOBert(nn.Module):
    """The public-code MPOBERT: rebuild every ``W`` each forward, unfused LayerNorm and GELU.

    Built from an :class:`mpobert.MPOBertModel` (one group), whose tensors it copies.
    """

    def __init__(self, source: MPOBertModel) -> None:
        super().__init__()
        cfg = source.config
        if cfg.num_groups != 1:
            raise ValueError("the naive model is written for one group (MPOBERT, not MPOBERT+)")
        self.config = cfg
        emb = source.embeddings
        copy = lambda t: nn.Parameter(t.detach().clone())  # noqa: E731
        self.word = nn.Embedding.from_pretrained(emb.word_embeddings.weight.detach().clone(), freeze=False)
        self.pos = nn.Embedding.from_pretrained(emb.position_embeddings.weight.detach().clone(), freeze=False)
        self.types = nn.Embedding.from_pretrained(emb.token_type_embeddings.weight.detach().clone(), freeze=False)
        self.emb_ln = nn.LayerNorm(cfg.embedding_size, eps=cfg.layer_norm_eps)
        self.emb_ln.weight, self.emb_ln.bias = copy(emb.ln_weight), copy(emb.ln_bias)
        self.proj = nn.Linear(cfg.embedding_size, cfg.hidden_size)
        self.proj.weight, self.proj.bias = copy(emb.projection.weight), copy(emb.projection.bias)
        shared = source.encoder.groups[0]
        self.central = nn.ParameterDict({m: copy(p) for m, p in shared.central.items()})
        self.dense = nn.ParameterDict({m: copy(p) for m, p in shared.dense.items()})
        self.bias = nn.ParameterDict({m: copy(p) for m, p in shared.bias.items()})
        self.ln = nn.ModuleList(nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps) for _ in range(2))
        self.ln[0].weight, self.ln[0].bias = copy(shared.attn_ln_weight), copy(shared.attn_ln_bias)
        self.ln[1].weight, self.ln[1].bias = copy(shared.ffn_ln_weight), copy(shared.ffn_ln_bias)
        self.aux = nn.ModuleList()
        self.adapters = nn.ModuleList()
        for layer in source.encoder.layers:
            self.aux.append(nn.ModuleDict({
                m: nn.ParameterList(copy(c) if k != lin.central_index else nn.Parameter(torch.empty(0))
                                    for k, c in enumerate(lin.cores))
                for m, lin in layer.mpo.items()
            }))
            self.adapters.append(nn.ModuleDict({
                m: nn.ParameterList([copy(a.U), copy(a.D)]) for m, a in layer.adapters.items()
            }))
        self.gelu = nn.GELU(approximate=gelu_approximate(cfg.activation))
        self.pooler = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.pooler.weight, self.pooler.bias = copy(source.pooler.weight), copy(source.pooler.bias)

    def _weight(self, l: int, m: str) -> torch.Tensor:
        if m not in self.aux[l]:
            return self.dense[m].T
        cores = list(self.aux[l][m])
        c = len(cores) // 2
        cores[c] = self.central[m]
        return naive_rebuild(cores)

    def _project(self, l: int, m: str, x: torch.Tensor) -> torch.Tensor:
        y = x @ self._weight(l, m) + self.bias[m]
        if m in self.adapters[l]:
            u, d = self.adapters[l][m]
            y = y + (x @ u) @ d
        return y

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        cfg = self.config
        b, s = input_ids.shape
        pos = torch.arange(s, device=input_ids.device).expand(b, s)
        x = self.word(input_ids) + self.pos(pos) + self.types(torch.zeros_like(input_ids))
        h = self.proj(self.emb_ln(x))
        for l in range(cfg.num_layers):
            q, k, v = (self._project(l, m, h).view(b, s, cfg.num_heads, cfg.head_dim).transpose(1, 2) for m in "qkv")
            ctx = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, cfg.hidden_size)
            h = self.ln[0](h + self._project(l, "attn_out", ctx))
            h = self.ln[1](h + self._project(l, "ffn_out", self.gelu(self._project(l, "ffn_in", h))))
        return h, torch.tanh(self.pooler(h[:, 0]))
