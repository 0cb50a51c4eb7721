"""Per-kernel traffic / FLOP models of the normalization and elementwise kernels and the fused MPO matmul (model).

Counting conventions (``M`` rows/tokens, ``N`` hidden, ``s`` element size, ``G`` partial rows
of a row-reducing backward = ``2 * SMs``): see each function's docstring. Each tensor crosses
HBM once (tile re-reads are assumed to hit L2); row statistics and partial sums are fp32.
"""
from __future__ import annotations

import dataclasses
import math

from mpo_core.cost import Cost, epilogue_flops, kernel_flops
from mpo_core.gpu.devices import H100, Gpu, roofline_seconds
from mpo_core.shapes import check_int

__all__ = ["FUSED_OPS", "KERNEL_FLOPS_PER_ELEMENT", "fused_op_cost", "fused_op_kernels", "kernel_cost",
           "kernel_fraction", "spec_model"]

KERNEL_FLOPS_PER_ELEMENT = {
    "layer_norm_fwd": 7, "residual_layer_norm_fwd": 8, "layer_norm_bwd": 12, "dropout": 2, "bias_gelu_fwd": 20,
    "bias_gelu_bwd": 31, "add": 1, "gelu_fwd": 19, "gelu_bwd": 30, "sum": 1,
}
"""FMA-unit FLOPs per element (erf / exp counted as ~10): LayerNorm forward = mean (1),
centre (1), square + sum (2), scale (1), affine (2); residual adds 1; dropout adds 2
(select, scale); LayerNorm backward ~12; GELU ~19 forward, ~30 backward. They only decide
compute- vs memory-bound, and these ops are memory-bound by two orders of magnitude."""


def kernel_cost(kernel: str, tokens: int, hidden: int, dtype_bytes: int = 2, *, dropout: bool = False,
                partials: int = 2 * 132) -> Cost:
    """HBM bytes and FLOPs of one normalization / elementwise kernel on ``(tokens, hidden)`` (model).

    With ``e = M N s`` (``M`` tokens, ``N`` hidden, ``s = dtype_bytes``), ``p = N s`` (one
    parameter vector), ``st = 8 M`` (fp32 mean and rstd), ``P = G N 4`` (fp32 partial rows of
    ``G = partials`` programs) and ``k = M N`` bytes of a bool dropout mask:

    ===========================  ==========================  ===================
    kernel                       read                        written
    ===========================  ==========================  ===================
    layer_norm_fwd (ours, torch) ``e + 2p``                  ``e + st``
    residual_layer_norm_fwd      ``2e + 2p``                 ``2e + st`` (y, h)
    layer_norm_bwd (ours)        ``2e + st + p``             ``e (+e dr) + 2P``
    column_sum (ours)            ``P``                       ``p``
    bias_gelu_fwd (ours)         ``e + p``                   ``e``
    bias_gelu_bwd (ours)         ``2e + p``                  ``e + P``
    torch add / bias add         ``2e`` / ``e + p``          ``e``
    torch dropout                ``e``                       ``e + k``
    torch dropout_bwd            ``e + k``                   ``e``
    torch gelu / gelu_bwd        ``e`` / ``2e``              ``e``
    torch layer_norm_bwd_dx      ``2e + st + p``             ``e``
    torch layer_norm_bwd_dw      ``2e + st``                 ``2p``
    torch sum (over rows)        ``e``                       ``p``
    ===========================  ==========================  ===================

    FMA FLOPs are :data:`KERNEL_FLOPS_PER_ELEMENT` times ``M N``.

    Parameters
    ----------
    kernel : str
        A row of the table (``"layer_norm_fwd"``, ..., ``"torch_add"``, ``"torch_bias_add"`` ...).
    tokens, hidden : int
        Rows and row length.
    dtype_bytes : int
        Element size of activations (2 for bf16).
    dropout : bool
        ``residual_layer_norm_fwd`` draws dropout / ``layer_norm_bwd`` also writes ``dr``.
    partials : int
        Partial rows ``G`` of the row-reducing backward kernels (``2 * SMs``).
    """
    for name, value in (("tokens", tokens), ("hidden", hidden), ("dtype_bytes", dtype_bytes), ("partials", partials)):
        check_int(name, value)
    m, n, s = tokens, hidden, dtype_bytes
    e, p, st, part, mask, mn = m * n * s, n * s, 8 * m, partials * n * 4, m * n, m * n
    f = KERNEL_FLOPS_PER_ELEMENT
    table = {
        "layer_norm_fwd": (e + 2 * p, e + st, f["layer_norm_fwd"]),
        "residual_layer_norm_fwd": (2 * e + 2 * p, 2 * e + st,
                                    f["residual_layer_norm_fwd"] + (f["dropout"] if dropout else 0)),
        "layer_norm_bwd": (2 * e + st + p, (2 if dropout else 1) * e + 2 * part,
                           f["layer_norm_bwd"] + (f["dropout"] if dropout else 0)),
        "column_sum": (part, p, partials / m),
        "bias_gelu_fwd": (e + p, e, f["bias_gelu_fwd"]),
        "bias_gelu_bwd": (2 * e + p, e + part, f["bias_gelu_bwd"]),
        "torch_add": (2 * e, e, f["add"]),
        "torch_bias_add": (e + p, e, f["add"]),
        "torch_dropout": (e, e + mask, f["dropout"]),
        "torch_dropout_bwd": (e + mask, e, f["dropout"]),
        "torch_gelu": (e, e, f["gelu_fwd"]),
        "torch_gelu_bwd": (2 * e, e, f["gelu_bwd"]),
        "torch_layer_norm_bwd_dx": (2 * e + st + p, e, f["layer_norm_bwd"]),
        "torch_layer_norm_bwd_dw": (2 * e + st, 2 * p, 3),
        "torch_sum": (e, p, f["sum"]),
    }
    if kernel not in table:
        raise ValueError(f"kernel must be one of {sorted(table)}, got {kernel!r}")
    read, written, per_element = table[kernel]
    return Cost(flops_fma=per_element * mn, bytes_read=read, bytes_written=written)


FUSED_OPS = ("layer_norm", "residual_layer_norm", "residual_dropout_layer_norm", "bias_gelu")
"""The fused ops of :mod:`mpo_core.ops`."""

_OP_KERNELS = {  # (op, direction, impl) -> kernels run, in order (name, dropout flag)
    ("layer_norm", "fwd", "fused"): [("layer_norm_fwd", False)],
    ("layer_norm", "bwd", "fused"): [("layer_norm_bwd", False), ("column_sum", False), ("column_sum", False)],
    ("layer_norm", "fwd", "torch"): [("layer_norm_fwd", False)],
    ("layer_norm", "bwd", "torch"): [("torch_layer_norm_bwd_dx", False), ("torch_layer_norm_bwd_dw", False)],
    ("residual_layer_norm", "fwd", "fused"): [("residual_layer_norm_fwd", False)],
    ("residual_layer_norm", "bwd", "fused"): [("layer_norm_bwd", False), ("column_sum", False),
                                              ("column_sum", False)],
    ("residual_layer_norm", "fwd", "torch"): [("torch_add", False), ("layer_norm_fwd", False)],
    ("residual_layer_norm", "bwd", "torch"): [("torch_layer_norm_bwd_dx", False), ("torch_layer_norm_bwd_dw", False)],
    ("residual_dropout_layer_norm", "fwd", "fused"): [("residual_layer_norm_fwd", True)],
    ("residual_dropout_layer_norm", "bwd", "fused"): [("layer_norm_bwd", True), ("column_sum", False),
                                                      ("column_sum", False)],
    ("residual_dropout_layer_norm", "fwd", "torch"): [("torch_dropout", False), ("torch_add", False),
                                                      ("layer_norm_fwd", False)],
    ("residual_dropout_layer_norm", "bwd", "torch"): [("torch_layer_norm_bwd_dx", False),
                                                      ("torch_layer_norm_bwd_dw", False),
                                                      ("torch_dropout_bwd", False)],
    ("bias_gelu", "fwd", "fused"): [("bias_gelu_fwd", False)],
    ("bias_gelu", "bwd", "fused"): [("bias_gelu_bwd", False), ("column_sum", False)],
    ("bias_gelu", "fwd", "torch"): [("torch_bias_add", False), ("torch_gelu", False)],
    ("bias_gelu", "bwd", "torch"): [("torch_gelu_bwd", False), ("torch_sum", False)],
}


def fused_op_kernels(op: str, direction: str, tokens: int, hidden: int, dtype_bytes: int = 2,
                     impl: str = "fused", sm_count: int = H100.sm_count) -> list[Cost]:
    """The kernels one fused op (``impl="fused"``) or the torch eager sequence it replaces
    (``impl="torch"``) runs, each as a :func:`kernel_cost` (model).

    Ours: forward one kernel; backward the row kernel plus :func:`column_sum` per
    parameter gradient (``G = 2 * sm_count`` partial rows; bias + GELU's backward uses
    ``min(G, ceil(M / BLOCK_M))`` with ``BLOCK_M = 4096 / min(2^ceil(log2 N), 1024)``).
    torch: ``x + r`` then ``F.layer_norm`` (one kernel), whose backward is a dX kernel and a
    separate dgamma/dbeta kernel that reads ``dy`` and ``x`` again; dropout writes a bool
    mask; ``F.gelu(x + b)`` is a bias add and a GELU, its backward a GELU backward and the
    bias gradient's row sum.
    """
    if op not in FUSED_OPS:
        raise ValueError(f"op must be one of {FUSED_OPS}, got {op!r}")
    if direction not in ("fwd", "bwd"):
        raise ValueError(f"direction must be 'fwd' or 'bwd', got {direction!r}")
    if impl not in ("fused", "torch"):
        raise ValueError(f"impl must be 'fused' or 'torch', got {impl!r}")
    check_int("sm_count", sm_count)
    g = 2 * sm_count
    if op == "bias_gelu":
        block_n = min(1 << (hidden - 1).bit_length(), 1024)
        g = max(1, min(math.ceil(tokens / max(1, 4096 // block_n)), g))
    return [kernel_cost(name, tokens, hidden, dtype_bytes, dropout=drop, partials=g)
            for name, drop in _OP_KERNELS[op, direction, impl]]


def fused_op_cost(op: str, direction: str, tokens: int, hidden: int, dtype_bytes: int = 2, impl: str = "fused",
                  sm_count: int = H100.sm_count) -> Cost:
    """Sum of :func:`fused_op_kernels` (model)."""
    costs = fused_op_kernels(op, direction, tokens, hidden, dtype_bytes, impl, sm_count)
    return sum(costs[1:], costs[0])


_ROW_INPUTS = {"layer_norm_fwd": 1, "residual_layer_norm_fwd": 2, "layer_norm_bwd": 2}
_TILE_INPUTS = {"bias_gelu_fwd": 1, "bias_gelu_bwd": 2}


def spec_model(spec, dtype_bytes: int = 2) -> tuple[Cost, Cost, float]:
    """``(executed, useful, bytes in flight per block)`` of one registered kernel launch (model).

    ``spec`` is a :class:`mpo_core.gpu.registry.KernelSpec` at its ``problem`` size.
    Normalization / elementwise kernels: :func:`kernel_cost` (executed = useful); in flight
    per block, the loads one program issues before it can reduce or store: one row of each
    row input (``N s``), or one ``BLOCK_M x BLOCK_N`` tile of each input.
    The MPO matmul (``M`` rows, ``K = IB*IS``, ``N = JB*JS``, padded ``Kp = IB*ISP``,
    ``Np = JB*JSP``): executed tensor FLOPs ``2 M Kp Np + 2 DP Kp Np ceil(M / BLOCK_M)``
    (padded GEMM + on-chip rebuild), useful ``2 M K N``; bytes read
    ``s (M K + IB JB D + D IS JS [+ N bias])``, written ``s M N`` (twice with the stored
    pre-activation); in flight, ``num_stages - 1`` pipelined tiles of ``x`` and ``big``.
    """
    s, c, a = dtype_bytes, spec.constexprs, spec.args
    if spec.family in _ROW_INPUTS or spec.family in _TILE_INPUTS or spec.family == "column_sum":
        rows, n = spec.problem
        if spec.family == "column_sum":  # rows = G partial rows
            cost = kernel_cost("column_sum", 1, n, s, partials=rows)
            flight = c["BLOCK_G"] * c["BLOCK_N"] * 4
        else:
            partials = math.ceil(a["M"] / a["rows_per_program"]) if "rows_per_program" in a else 1
            cost = kernel_cost(spec.family, rows, n, s, dropout=bool(c.get("HAS_DROPOUT", False)), partials=partials)
            if spec.family in _ROW_INPUTS:
                flight = _ROW_INPUTS[spec.family] * n * s
            else:
                flight = _TILE_INPUTS[spec.family] * c["BLOCK_M"] * min(c["BLOCK_N"], n) * s
        return cost, cost, float(flight)
    if spec.family != "mpo_matmul":
        raise ValueError(f"no model for kernel family {spec.family!r}")
    m, k, n = spec.problem
    gemm, rebuild = kernel_flops(m, a["IB"], a["JB"], (c["DP"], c["ISP"], c["JSP"]), c["BLOCK_M"])
    epilogue = epilogue_flops(m, n, c["HAS_BIAS"], bool(c["ACTIVATION"]))
    read = s * (m * k + a["IB"] * a["JB"] * a["D"] + a["D"] * a["IS"] * a["JS"] + (n if c["HAS_BIAS"] else 0))
    written = s * m * n * (2 if c["STORE_PRE"] else 1)
    executed = Cost(gemm + rebuild, epilogue, read, written)
    useful = Cost(2 * m * k * n, epilogue, read, written)
    bi, bj = c["BLOCK_K"] // c["ISP"], c["BLOCK_N"] // c["JSP"]
    flight = (spec.num_stages - 1) * (c["BLOCK_M"] * c["BLOCK_K"] + bi * bj * c["DP"]) * s
    return executed, useful, float(flight)


def kernel_fraction(executed: Cost, useful: Cost, bytes_in_flight_per_block: float, blocks_per_sm: int,
                    device: Gpu) -> dict:
    """Modelled fraction of the roofline one kernel reaches (model).

    Latency (Little's law): HBM bandwidth needs ``BW * latency`` bytes in flight; resident
    blocks supply ``blocks_per_sm * SMs * bytes_in_flight_per_block``, so the achievable
    bandwidth is ``BW * min(1, supplied / needed)``. Then

        t_model = max(bytes / achievable BW, F_tc / P_tc + F_fma / P_fma)   (executed work)
        fraction = roofline_seconds(useful) / t_model

    (``useful``: the FLOPs and bytes the op needs, e.g. the unpadded GEMM).

    Returns
    -------
    dict
        ``fraction``, ``bw_fraction`` (achievable / peak), ``t_model_s``, ``t_roofline_s``, ``bound``.
    """
    if blocks_per_sm < 0 or bytes_in_flight_per_block < 0:
        raise ValueError(f"blocks_per_sm and bytes_in_flight_per_block must be >= 0, got {blocks_per_sm}, "
                         f"{bytes_in_flight_per_block}")
    bandwidth = device.model.bandwidth
    needed = bandwidth * device.hbm_latency_s
    bw_fraction = min(1.0, blocks_per_sm * device.sm_count * bytes_in_flight_per_block / needed)
    t_mem = executed.bytes / (bandwidth * bw_fraction) if bw_fraction > 0 else math.inf
    t_compute = roofline_seconds(dataclasses.replace(executed, bytes_read=0, bytes_written=0, launches=0), device)
    t_model = max(t_mem, t_compute)
    t_ideal = roofline_seconds(useful, device)
    return dict(fraction=t_ideal / t_model if t_model > 0 else 0.0, bw_fraction=bw_fraction, t_model_s=t_model,
                t_roofline_s=t_ideal, bound="memory" if t_mem >= t_compute else "compute")

