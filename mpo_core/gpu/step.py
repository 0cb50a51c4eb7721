"""Model of one MPOBERT training step: every kernel, fused or unfused, and its totals per GPU (model)."""
from __future__ import annotations

from typing import Sequence

from mpo_core.cost import Cost, gemm_cost
from mpo_core.gpu.devices import A100, H100, Gpu, sequence_seconds
from mpo_core.gpu.kernel_model import fused_op_kernels, kernel_cost
from mpo_core.gpu.linear import linear_cost
from mpo_core.gpu.shapes import MPO_MODES, BertShape
from mpo_core.shapes import check_int

__all__ = ["MODEL", "mpobert_step", "step_summary"]

MODEL = "model"
"""The label of every modelled figure (tables and JSON never mix it with measurements)."""


def _gemm_bwd(m: int, k: int, n: int, s: int, bias: bool = False) -> Cost:
    """dX = dY W^T and dW = X^T dY (and the bias gradient's row sum)."""
    c = gemm_cost(m, n, k, s) + gemm_cost(k, m, n, s)
    return c + Cost(flops_fma=m * n, bytes_read=s * m * n, bytes_written=s * n) if bias else c


def mpobert_step(shape: BertShape, batch: int = 32, seq: int = 512, dtype_bytes: int = 2,
                 fused: bool = True, sm_count: int = H100.sm_count) -> list[tuple[str, Cost]]:
    """Every kernel of one MPOBERT training step (forward + backward + LAMB), fused or unfused (model).

    Per layer, as :class:`mpobert.layers.MPOBertLayer` runs it on ``M = batch * seq`` tokens:
    q, k, v, attn_out, ffn_in, ffn_out projections at full rank (``fused``: the fused MPO
    kernel, :func:`linear_cost` ``"fused"``; unfused: rebuild ``W`` + GEMM, ``"dense"``), no
    bias or activation inside them; the bias adds (torch, both variants); low-rank adapters
    (two GEMMs + add) on ``adapter_matrices`` matrices; attention as one flash kernel
    (``4 M S H`` tensor FLOPs forward, 2.5x that backward; reads q, k, v, writes o; backward
    reads q, k, v, o, do, writes dq, dk, dv), the same in both variants; the residual
    (+ dropout) + LayerNorm and bias + GELU as our fused ops or the torch sequences
    (:func:`fused_op_kernels`). Embeddings (gather + adds, LayerNorm at ``E``, ``E -> H``
    projection), the MLM head over every token (``H -> E`` GEMM, bias + GELU, LayerNorm,
    ``E -> V`` decoder, log-softmax cross-entropy) and LAMB (fp32 parameter, gradient and
    two moments read, three written: ``28 P`` bytes) are the same in both. The SOP head
    (``batch`` rows) is left out.

    Returns
    -------
    list of (str, Cost)
        Kernel (or kernel group) names and costs, in execution order.
    """
    for name, value in (("batch", batch), ("seq", seq), ("dtype_bytes", dtype_bytes)):
        check_int(name, value)
    m, s, h, f, e, v = batch * seq, dtype_bytes, shape.hidden, shape.intermediate, shape.embedding, shape.vocab
    impl = "fused" if fused else "torch"
    strategy = "fused" if fused else "dense"
    drop = shape.hidden_dropout
    res_op = "residual_dropout_layer_norm" if drop else "residual_layer_norm"
    out: list[tuple[str, Cost]] = []

    def op(name: str, op_name: str, direction: str, hidden: int, impl_: str = impl) -> None:
        for k, c in enumerate(fused_op_kernels(op_name, direction, m, hidden, s, impl_, sm_count)):
            out.append((f"{name}[{k}]", c))

    def linear(name: str, k_dim: int, n_dim: int, direction: str) -> None:
        c = linear_cost(strategy, m, MPO_MODES[k_dim], MPO_MODES[n_dim], None, s, bias=False, activation=False)
        out.append((f"{name}.{strategy}", c[direction]))

    def bias_add(name: str, n: int, direction: str) -> None:
        out.append((name, kernel_cost("torch_bias_add" if direction == "fwd" else "torch_sum", m, n, s)))

    adapter = (gemm_cost(m, h, shape.adapter_rank, s) + gemm_cost(m, shape.adapter_rank, h, s)
               + kernel_cost("torch_add", m, h, s))
    adapter_bwd = _gemm_bwd(m, h, shape.adapter_rank, s) + _gemm_bwd(m, shape.adapter_rank, h, s)
    attention = Cost(flops_tensor=4 * m * seq * h, flops_fma=5 * m * seq * shape.heads,
                     bytes_read=3 * m * h * s, bytes_written=m * h * s + 4 * m * shape.heads)
    attention_bwd = Cost(flops_tensor=10 * m * seq * h, flops_fma=10 * m * seq * shape.heads,
                         bytes_read=5 * m * h * s + 4 * m * shape.heads, bytes_written=3 * m * h * s)
    adapted = ("q", "k", "v", "attn_out")[: shape.adapter_matrices]

    # forward
    out.append(("embeddings.gather+add", Cost(bytes_read=3 * m * e * s, bytes_written=m * e * s, flops_fma=2 * m * e)))
    op("embeddings.layer_norm", "layer_norm", "fwd", e)
    out.append(("embeddings.projection", gemm_cost(m, e, h, s, bias=True)))
    for layer in range(shape.layers):
        p = f"layer{layer}."
        for name in ("q", "k", "v"):
            linear(p + name, h, h, "fwd")
            if name in adapted:
                out.append((p + name + ".adapter", adapter))
            bias_add(p + name + ".bias", h, "fwd")
        out.append((p + "attention", attention))
        linear(p + "attn_out", h, h, "fwd")
        if "attn_out" in adapted:
            out.append((p + "attn_out.adapter", adapter))
        bias_add(p + "attn_out.bias", h, "fwd")
        op(p + "attn_ln", res_op, "fwd", h)
        linear(p + "ffn_in", h, f, "fwd")
        op(p + "bias_gelu", "bias_gelu", "fwd", f)
        linear(p + "ffn_out", f, h, "fwd")
        bias_add(p + "ffn_out.bias", h, "fwd")
        op(p + "ffn_ln", res_op, "fwd", h)
    out.append(("mlm.dense", gemm_cost(m, h, e, s)))
    op("mlm.bias_gelu", "bias_gelu", "fwd", e)
    op("mlm.layer_norm", "layer_norm", "fwd", e)
    out.append(("mlm.decoder", gemm_cost(m, e, v, s, bias=True)))
    out.append(("mlm.cross_entropy", Cost(flops_fma=5 * m * v, bytes_read=m * v * s, bytes_written=m * v * s)))
    # backward, in reverse
    out.append(("mlm.cross_entropy.bwd", Cost(flops_fma=3 * m * v, bytes_read=2 * m * v * s, bytes_written=m * v * s)))
    out.append(("mlm.decoder.bwd", _gemm_bwd(m, e, v, s, bias=True)))
    op("mlm.layer_norm.bwd", "layer_norm", "bwd", e)
    op("mlm.bias_gelu.bwd", "bias_gelu", "bwd", e)
    out.append(("mlm.dense.bwd", _gemm_bwd(m, h, e, s)))
    for layer in reversed(range(shape.layers)):
        p = f"layer{layer}."
        op(p + "ffn_ln.bwd", res_op, "bwd", h)
        bias_add(p + "ffn_out.bias.bwd", h, "bwd")
        linear(p + "ffn_out.bwd", f, h, "bwd")
        op(p + "bias_gelu.bwd", "bias_gelu", "bwd", f)
        linear(p + "ffn_in.bwd", h, f, "bwd")
        op(p + "attn_ln.bwd", res_op, "bwd", h)
        bias_add(p + "attn_out.bias.bwd", h, "bwd")
        linear(p + "attn_out.bwd", h, h, "bwd")
        if "attn_out" in adapted:
            out.append((p + "attn_out.adapter.bwd", adapter_bwd))
        out.append((p + "attention.bwd", attention_bwd))
        for name in ("v", "k", "q"):
            bias_add(p + name + ".bias.bwd", h, "bwd")
            linear(p + name + ".bwd", h, h, "bwd")
            if name in adapted:
                out.append((p + name + ".adapter.bwd", adapter_bwd))
    out.append(("embeddings.projection.bwd", _gemm_bwd(m, e, h, s, bias=True)))
    op("embeddings.layer_norm.bwd", "layer_norm", "bwd", e)
    out.append(("embeddings.scatter", Cost(bytes_read=m * e * s, bytes_written=m * e * 4, flops_fma=m * e)))
    out.append(("lamb", Cost(flops_fma=15 * shape.params, bytes_read=16 * shape.params,
                             bytes_written=12 * shape.params)))
    return out


def step_summary(kernels: Sequence[tuple[str, Cost]], devices: Sequence[Gpu] = (A100, H100)) -> dict:
    """Totals of :func:`mpobert_step`: HBM bytes, FLOPs, kernels and the predicted step time per device.

    The step time is the sum of each kernel's roofline time (kernels run one after another).
    """
    total = sum((c for _, c in kernels[1:]), kernels[0][1])
    out = {"kind": MODEL, "GB": total.bytes / 1e9, "GB_read": total.bytes_read / 1e9,
           "GB_written": total.bytes_written / 1e9, "TFLOP": total.flops / 1e12,
           "TFLOP_tensor": total.flops_tensor / 1e12, "kernels": total.launches}
    for d in devices:
        out[f"ms_{d.name}"] = sequence_seconds([c for _, c in kernels], d) * 1e3
    return out

