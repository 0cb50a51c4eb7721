"""Traffic / FLOP model of every GPU kernel and of an MPOBERT training step (every figure is a *model*).

Devices
-------
:data:`DEVICES` holds the public peaks and SM limits of the A100-80GB (SXM) and the
H100 SXM: HBM bandwidth 2.0 / 3.35 TB/s, dense bf16 tensor-core 312 / 989 TFLOP/s,
fp32 FMA 19.5 / 67 TFLOP/s, 108 / 132 SMs, 64 K registers, 64 warps and 32 blocks per
SM, 164 / 228 KB shared memory per SM (163 / 227 KB per block, 1 KB reserved per block).

Roofline
--------
A :class:`Cost` counts tensor-core FLOPs ``F_tc``, other (FMA-unit) FLOPs ``F_fma``, and
compulsory HBM bytes read ``R`` and written ``W`` (each tensor crosses HBM once: tile
re-reads are assumed to hit L2). Its predicted time on a device is

    t = max((R + W) / BW, F_tc / P_tc + F_fma / P_fma)

(:func:`roofline_seconds`). Element sizes: ``s`` bytes per activation element (2 for
bf16), fp32 (4 bytes) for row statistics and partial sums.

Counting conventions (``M`` rows/tokens, ``N`` hidden, ``s`` element size, ``G`` partial rows
of a row-reducing backward = ``2 * SMs``): see each ``*_cost`` function's docstring.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

MODEL = "model"
"""The label of every figure this module produces (tables and JSON never mix it with measurements)."""


@dataclass(frozen=True)
class Device:
    """Peaks and per-SM limits of one GPU (public spec sheets; the latency is an assumption)."""

    name: str
    arch: int
    hbm_bw: float
    tc_flops: float
    fma_flops: float
    sm_count: int
    smem_per_sm: int
    smem_per_block: int
    regs_per_sm: int = 65536
    max_regs_per_thread: int = 255
    reg_alloc_unit: int = 256
    smem_reserved_per_block: int = 1024
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32
    hbm_latency_s: float = 600e-9


A100 = Device("A100-80GB", 80, hbm_bw=2.0e12, tc_flops=312e12, fma_flops=19.5e12, sm_count=108,
              smem_per_sm=164 * 1024, smem_per_block=163 * 1024)
H100 = Device("H100-SXM", 90, hbm_bw=3.35e12, tc_flops=989e12, fma_flops=67e12, sm_count=132,
              smem_per_sm=228 * 1024, smem_per_block=227 * 1024)
DEVICES = {d.name: d for d in (A100, H100)}
"""The modelled devices by name."""


@dataclass(frozen=True)
class Cost:
    """Modelled work of one kernel or a sequence of kernels.

    Attributes
    ----------
    flops_tensor, flops_fma : float
        FLOPs on tensor cores and on the FMA units.
    bytes_read, bytes_written : float
        Compulsory HBM traffic.
    launches : int
        Kernels (each is timed separately by :func:`sequence_seconds`).
    """

    flops_tensor: float = 0.0
    flops_fma: float = 0.0
    bytes_read: float = 0.0
    bytes_written: float = 0.0
    launches: int = 1

    @property
    def flops(self) -> float:
        """All FLOPs."""
        return self.flops_tensor + self.flops_fma

    @property
    def bytes(self) -> float:
        """HBM bytes read + written."""
        return self.bytes_read + self.bytes_written

    def __add__(self, other: "Cost") -> "Cost":
        return Cost(self.flops_tensor + other.flops_tensor, self.flops_fma + other.flops_fma,
                    self.bytes_read + other.bytes_read, self.bytes_written + other.bytes_written,
                    self.launches + other.launches)

    def __mul__(self, k: float) -> "Cost":
        return Cost(self.flops_tensor * k, self.flops_fma * k, self.bytes_read * k, self.bytes_written * k,
                    int(self.launches * k))

    __rmul__ = __mul__


def roofline_seconds(cost: Cost, device: Device) -> float:
    """``max((R + W) / BW, F_tc / P_tc + F_fma / P_fma)``: the roofline time of ``cost`` as one kernel (model)."""
    if not isinstance(cost, Cost) or not isinstance(device, Device):
        raise TypeError(f"cost must be a Cost and device a Device, got {type(cost).__name__}, {type(device).__name__}")
    return max(cost.bytes / device.hbm_bw, cost.flops_tensor / device.tc_flops + cost.flops_fma / device.fma_flops)


def sequence_seconds(costs: Sequence[Cost], device: Device) -> float:
    """Sum of the roofline times of kernels run one after another (model)."""
    return sum(roofline_seconds(c, device) for c in costs)


def _check_dims(**dims: int) -> None:
    for name, value in dims.items():
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an int >= 1, got {value!r}")


# ------------------------------------------------------------------------------------- kernels
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
    _check_dims(tokens=tokens, hidden=hidden, dtype_bytes=dtype_bytes, partials=partials)
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
    _check_dims(sm_count=sm_count)
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


# ------------------------------------------------------------------------------------- MPO linear
LINEAR_STRATEGIES = ("dense", "sequential", "fused")
"""``dense``: the unfused torch sequence (rebuild ``W``, ``F.linear``, bias add, GELU);
``sequential``: core-by-core contraction (:mod:`mpo_core.contract`); ``fused``: our kernel."""


def full_ranks(in_shape: Sequence[int], out_shape: Sequence[int]) -> list[int]:
    """Exact (untruncated) MPO bonds ``d_k = min(prod_{<=k} i j, prod_{>k} i j)``."""
    sizes = [i * j for i, j in zip(in_shape, out_shape)]
    return [1] + [min(math.prod(sizes[:k]), math.prod(sizes[k:])) for k in range(1, len(sizes))] + [1]


def dense_linear_cost(tokens: int, in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int],
                      dtype_bytes: int = 2, *, bias: bool = True, activation: bool = True) -> dict[str, Cost]:
    """The unfused torch sequence: rebuild ``W`` from the cores, ``F.linear``, bias add, GELU (model).

    Rebuild (left to right): FLOPs ``C = sum_q 2 R_q d_q i_q j_q d_{q+1}`` (``R_q`` rows so
    far), reads the cores and each intermediate once, writes each intermediate and ``W``.
    Forward: rebuild, GEMM (``2MKN`` tensor FLOPs; reads ``x``, ``W``, writes ``y``), bias add
    (reads ``y``, ``b``, writes), GELU (reads, writes; ~8 FLOPs each with the bias add 9 per
    output). Backward: GELU backward (reads ``dy``, ``pre``, writes ``g``), bias gradient (reads
    ``g``), ``dx = g W^T`` (reads ``g``, ``W``; writes ``dx``), ``dW = x^T g`` (reads ``x``,
    ``g``; writes ``dW``), rebuild backward (twice the rebuild's FLOPs and bytes).

    Returns
    -------
    dict
        ``{"fwd": Cost, "bwd": Cost}``.
    """
    _check_dims(tokens=tokens, dtype_bytes=dtype_bytes)
    m, k, n, b = tokens, math.prod(in_shape), math.prod(out_shape), dtype_bytes
    chain_flops, inter, rows = 0, 0, in_shape[0] * out_shape[0]
    for q in range(1, len(in_shape)):
        chain_flops += 2 * rows * ranks[q] * in_shape[q] * out_shape[q] * ranks[q + 1]
        rows *= in_shape[q] * out_shape[q]
        if q < len(in_shape) - 1:
            inter += rows * ranks[q + 1]
    cores = sum(ranks[q] * in_shape[q] * out_shape[q] * ranks[q + 1] for q in range(len(in_shape)))
    chain = Cost(flops_tensor=chain_flops, bytes_read=b * (cores + inter), bytes_written=b * (inter + k * n))
    epilogue = (1 if bias else 0) + (8 if activation else 0)
    mn = m * n
    fwd = chain + Cost(flops_tensor=2 * m * k * n, bytes_read=b * (m * k + k * n), bytes_written=b * mn)
    if bias:
        fwd = fwd + Cost(flops_fma=mn, bytes_read=b * (mn + n), bytes_written=b * mn)
    if activation:
        fwd = fwd + Cost(flops_fma=8 * mn, bytes_read=b * mn, bytes_written=b * mn)
    bwd = Cost(flops_tensor=4 * m * k * n, flops_fma=epilogue * mn, launches=2,
               bytes_read=b * (mn + k * n + m * k + mn), bytes_written=b * (m * k + k * n)) + 2 * chain
    if activation:
        bwd = bwd + Cost(bytes_read=2 * b * mn, bytes_written=b * mn)
    if bias:
        bwd = bwd + Cost(bytes_read=b * mn, bytes_written=b * n)
    return {"fwd": fwd, "bwd": bwd}


def linear_cost(strategy: str, tokens: int, in_shape: Sequence[int], out_shape: Sequence[int],
                ranks: Sequence[int] | None = None, dtype_bytes: int = 2, *, bias: bool = True,
                activation: bool = True, training: bool = True) -> dict[str, Cost]:
    """Forward and backward cost of one MPO linear layer ``act(x @ W + b)`` by ``strategy`` (model).

    * ``dense``: :func:`dense_linear_cost`.
    * ``fused``: :func:`mpo_core.ops.mpo_linear.mpo_linear_cost` (the op's own model:
      padded tensor-core GEMM + on-chip rebuild + pre-contraction); when ``training`` with an
      activation the forward also writes the pre-activation (``M N s``). Written bytes:
      forward the big factor and ``y``; backward ``dx``, ``dW``, the factor and core gradients
      (and ``g`` with an activation); the rest of the op's bytes are reads.
    * ``sequential``: the contraction planner's forward (:func:`mpo_core.contract.plan.make_plan`,
      best core order) with the bias + GELU epilogue of ``dense``; backward twice the
      forward (two GEMMs per step); intermediates are written once and read once, so bytes
      split evenly.

    ``ranks`` defaults to :func:`full_ranks`.
    """
    if strategy not in LINEAR_STRATEGIES:
        raise ValueError(f"strategy must be one of {LINEAR_STRATEGIES}, got {strategy!r}")
    ranks = list(ranks) if ranks is not None else full_ranks(in_shape, out_shape)
    m, k, n, b = tokens, math.prod(in_shape), math.prod(out_shape), dtype_bytes
    if strategy == "dense":
        return dense_linear_cost(tokens, in_shape, out_shape, ranks, dtype_bytes, bias=bias, activation=activation)
    if strategy == "fused":
        from mpo_core.ops.mpo_linear import mpo_linear_cost

        c = mpo_linear_cost(tokens, tuple(in_shape), tuple(out_shape), ranks, dtype_bytes, bias=bias,
                            activation="gelu" if activation else None)
        if not c["supported"]:
            raise ValueError(f"the fused kernel does not take in_shape={in_shape}, out_shape={out_shape}, "
                             f"ranks={ranks}")
        pre = b * m * n if training and activation else 0
        core_elems = sum(ranks[q] * in_shape[q] * out_shape[q] * ranks[q + 1] for q in range(len(in_shape)))
        written_fwd = b * (c["factor_elems"] + m * n) + pre
        written_bwd = b * (m * k + k * n + 2 * c["factor_elems"] + core_elems + (m * n if activation else 0))
        fwd = Cost(c["flops_tensor"], c["flops_fma"], c["bytes"] - (written_fwd - pre), written_fwd, launches=2)
        bwd = Cost(c["flops_bwd_tensor"], c["flops_bwd"] - c["flops_bwd_tensor"], c["bytes_bwd"] - written_bwd,
                   written_bwd, launches=4)
        return {"fwd": fwd, "bwd": bwd}
    import torch

    from mpo_core.contract.plan import make_plan

    dtype = {2: torch.bfloat16, 4: torch.float32, 8: torch.float64}[dtype_bytes]
    plan = make_plan(tuple(in_shape), tuple(out_shape), tuple(ranks), tokens, "cuda", dtype, "sequential", None,
                     False, None, False)
    chosen = plan.chosen
    fwd = Cost(flops_tensor=chosen.flops, bytes_read=chosen.bytes / 2, bytes_written=chosen.bytes / 2,
               launches=len(in_shape))
    if bias:
        fwd = fwd + Cost(flops_fma=m * n, bytes_read=b * (m * n + n), bytes_written=b * m * n)
    if activation:
        fwd = fwd + Cost(flops_fma=8 * m * n, bytes_read=b * m * n, bytes_written=b * m * n)
    return {"fwd": fwd, "bwd": 2 * fwd}


# ------------------------------------------------------------------------------------- per kernel
_ROW_INPUTS = {"layer_norm_fwd": 1, "residual_layer_norm_fwd": 2, "layer_norm_bwd": 2}
_TILE_INPUTS = {"bias_gelu_fwd": 1, "bias_gelu_bwd": 2}


def spec_model(spec, dtype_bytes: int = 2) -> tuple[Cost, Cost, float]:
    """``(executed, useful, bytes in flight per block)`` of one registered kernel launch (model).

    ``spec`` is a :class:`mpo_core.kernels.registry.KernelSpec` at its ``problem`` size.
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
    kp, np_ = a["IB"] * c["ISP"], a["JB"] * c["JSP"]
    gemm = 2 * m * kp * np_ + 2 * c["DP"] * kp * np_ * math.ceil(m / c["BLOCK_M"])
    epilogue = m * n * ((1 if c["HAS_BIAS"] else 0) + (8 if c["ACTIVATION"] else 0))
    read = s * (m * k + a["IB"] * a["JB"] * a["D"] + a["D"] * a["IS"] * a["JS"] + (n if c["HAS_BIAS"] else 0))
    written = s * m * n * (2 if c["STORE_PRE"] else 1)
    executed = Cost(gemm, epilogue, read, written)
    useful = Cost(2 * m * k * n, epilogue, read, written)
    bi, bj = c["BLOCK_K"] // c["ISP"], c["BLOCK_N"] // c["JSP"]
    flight = (spec.num_stages - 1) * (c["BLOCK_M"] * c["BLOCK_K"] + bi * bj * c["DP"]) * s
    return executed, useful, float(flight)


def kernel_fraction(executed: Cost, useful: Cost, bytes_in_flight_per_block: float, blocks_per_sm: int,
                    device: Device) -> dict:
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
    needed = device.hbm_bw * device.hbm_latency_s
    bw_fraction = min(1.0, blocks_per_sm * device.sm_count * bytes_in_flight_per_block / needed)
    t_mem = executed.bytes / (device.hbm_bw * bw_fraction) if bw_fraction > 0 else math.inf
    t_compute = executed.flops_tensor / device.tc_flops + executed.flops_fma / device.fma_flops
    t_model = max(t_mem, t_compute)
    t_ideal = roofline_seconds(useful, device)
    return dict(fraction=t_ideal / t_model if t_model > 0 else 0.0, bw_fraction=bw_fraction, t_model_s=t_model,
                t_roofline_s=t_ideal, bound="memory" if t_mem >= t_compute else "compute")


# ------------------------------------------------------------------------------------- MPOBERT step
@dataclass(frozen=True)
class BertShape:
    """What the MPOBERT training-step model needs of a config (``mpo_core`` never imports ``mpobert``)."""

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


def _gemm(m: int, k: int, n: int, s: int, bias: bool = False) -> Cost:
    return Cost(flops_tensor=2 * m * k * n, bytes_read=s * (m * k + k * n + (n if bias else 0)), bytes_written=s * m * n)


def _gemm_bwd(m: int, k: int, n: int, s: int, bias: bool = False) -> Cost:
    """dX = dY W^T and dW = X^T dY (and the bias gradient's row sum)."""
    c = _gemm(m, n, k, s) + _gemm(k, m, n, s)
    return c + Cost(flops_fma=m * n, bytes_read=s * m * n, bytes_written=s * n) if bias else c


def mpobert_step(shape: BertShape = BertShape(), batch: int = 32, seq: int = 512, dtype_bytes: int = 2,
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
    from mpo_core.kernels.registry import MPO_MODES

    _check_dims(batch=batch, seq=seq, dtype_bytes=dtype_bytes)
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

    adapter = _gemm(m, h, shape.adapter_rank, s) + _gemm(m, shape.adapter_rank, h, s) + kernel_cost("torch_add", m, h, s)
    adapter_bwd = _gemm_bwd(m, h, shape.adapter_rank, s) + _gemm_bwd(m, shape.adapter_rank, h, s)
    attention = Cost(flops_tensor=4 * m * seq * h, flops_fma=5 * m * seq * shape.heads,
                     bytes_read=3 * m * h * s, bytes_written=m * h * s + 4 * m * shape.heads)
    attention_bwd = Cost(flops_tensor=10 * m * seq * h, flops_fma=10 * m * seq * shape.heads,
                         bytes_read=5 * m * h * s + 4 * m * shape.heads, bytes_written=3 * m * h * s)
    adapted = ("q", "k", "v", "attn_out")[: shape.adapter_matrices]

    # forward
    out.append(("embeddings.gather+add", Cost(bytes_read=3 * m * e * s, bytes_written=m * e * s, flops_fma=2 * m * e)))
    op("embeddings.layer_norm", "layer_norm", "fwd", e)
    out.append(("embeddings.projection", _gemm(m, e, h, s, bias=True)))
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
    out.append(("mlm.dense", _gemm(m, h, e, s)))
    op("mlm.bias_gelu", "bias_gelu", "fwd", e)
    op("mlm.layer_norm", "layer_norm", "fwd", e)
    out.append(("mlm.decoder", _gemm(m, e, v, s, bias=True)))
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


def step_summary(kernels: Sequence[tuple[str, Cost]], devices: Sequence[Device] = (A100, H100)) -> dict:
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


def format_rows(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A fixed-width text table (first column left-aligned, numbers to 3 significant digits)."""
    def cell(v) -> str:
        if isinstance(v, bool) or not isinstance(v, float):
            return str(v)
        return f"{v:.3g}" if abs(v) < 1e5 else f"{v:.3e}"

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[k]) for row in cells]) for k, c in enumerate(columns)]
    fmt = lambda vals: "  ".join(v.ljust(w) if k == 0 else v.rjust(w) for k, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
    return "\n".join([fmt(list(columns)), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells])


# ------------------------------------------------------------------------------------- tables
BERT_TOKENS = 32 * 512
"""Tokens of the modelled launches: batch 32 x sequence 512."""
OP_HIDDEN = {"layer_norm": (768, 1024), "residual_layer_norm": (768, 1024), "residual_dropout_layer_norm": (768, 1024),
             "bias_gelu": (3072, 4096)}
"""Row lengths of each fused op in BERT-base / BERT-large."""


def fused_op_rows(tokens: int = BERT_TOKENS, dtype_bytes: int = 2, devices: Sequence[Device] = (A100, H100),
                  hidden: dict[str, Sequence[int]] | None = None) -> list[dict]:
    """The model table of the fused ops: ours vs the torch sequence, per op, direction and row length.

    Columns: FLOPs, MB read / written by our kernels, MB of torch's sequence, their ratio, and
    the roofline time of each (sum over its kernels) per device. Every row has ``kind="model"``.
    """
    rows = []
    for op, sizes in (hidden or OP_HIDDEN).items():
        for n in sizes:
            for direction in ("fwd", "bwd"):
                ours = fused_op_kernels(op, direction, tokens, n, dtype_bytes)
                theirs = fused_op_kernels(op, direction, tokens, n, dtype_bytes, "torch")
                o, t = sum(ours[1:], ours[0]), sum(theirs[1:], theirs[0])
                row = {"kind": MODEL, "op": op, "dir": direction, "tokens": tokens, "hidden": n,
                       "MFLOP": o.flops / 1e6, "MB_read": o.bytes_read / 1e6, "MB_written": o.bytes_written / 1e6,
                       "MB_fused": o.bytes / 1e6, "MB_torch": t.bytes / 1e6, "torch/fused_bytes": t.bytes / o.bytes}
                for d in devices:
                    row[f"us_fused_{d.name}"] = sequence_seconds(ours, d) * 1e6
                    row[f"us_torch_{d.name}"] = sequence_seconds(theirs, d) * 1e6
                rows.append(row)
    return rows


def linear_rows(tokens: int = BERT_TOKENS, shapes: Sequence[tuple[int, int]] | None = None, dtype_bytes: int = 2,
                devices: Sequence[Device] = (A100, H100), strategies: Sequence[str] = LINEAR_STRATEGIES,
                max_bond: int | None = None) -> list[dict]:
    """The model table of one MPO linear ``gelu(x W + b)`` per strategy at BERT shapes (``n = 5`` MPOBERT modes).

    ``max_bond`` caps every bond (``None``: full rank, as MPOBERT). Columns: GFLOP, MB read /
    written, roofline time per device, and the time of ``dense`` (the unfused torch sequence)
    over this strategy's (> 1: faster than unfused). Every row has ``kind="model"``.
    """
    from mpo_core.kernels.registry import LINEAR_SHAPES, MPO_MODES

    rows = []
    for k, n in shapes or LINEAR_SHAPES:
        in_shape, out_shape = MPO_MODES[k], MPO_MODES[n]
        ranks = [r if max_bond is None else min(r, max_bond) for r in full_ranks(in_shape, out_shape)]
        costs = {s: linear_cost(s, tokens, in_shape, out_shape, ranks, dtype_bytes) for s in strategies}
        dense = linear_cost("dense", tokens, in_shape, out_shape, ranks, dtype_bytes)
        for direction in ("fwd", "bwd"):
            for strategy, cost in costs.items():
                c = cost[direction]
                row = {"kind": MODEL, "shape": f"{k}x{n}", "bonds": "full" if max_bond is None else f"<={max_bond}",
                       "strategy": strategy, "dir": direction, "tokens": tokens, "GFLOP": c.flops / 1e9,
                       "MB_read": c.bytes_read / 1e6, "MB_written": c.bytes_written / 1e6}
                for d in devices:
                    t = roofline_seconds(c, d)
                    row[f"us_{d.name}"] = t * 1e6
                    row[f"dense/this_{d.name}"] = roofline_seconds(dense[direction], d) / t
                rows.append(row)
    return rows


FUSED_OP_COLUMNS = ("op", "dir", "hidden", "MFLOP", "MB_read", "MB_written", "MB_torch", "torch/fused_bytes",
                    "us_fused_A100-80GB", "us_torch_A100-80GB", "us_fused_H100-SXM", "us_torch_H100-SXM")
LINEAR_COLUMNS = ("shape", "strategy", "dir", "GFLOP", "MB_read", "MB_written", "us_A100-80GB",
                  "dense/this_A100-80GB", "us_H100-SXM", "dense/this_H100-SXM")
