"""Cost of the fused Triton MPO linear (:mod:`mpo_core.kernels.mpo_matmul`) and which end core it keeps on chip.

The op cuts the MPO at its first or last bond ``D``: one end core is the small factor each
program keeps on chip (padded by :func:`~mpo_core.kernels.tiles.padded_small_shape`),
torch pre-contracts the other ``n - 1`` cores into the big factor, and the kernel rebuilds
each ``W`` tile on chip with a small tensor-core GEMM. The padding rule is the kernel's own
(:mod:`mpo_core.kernels.tiles`, no Triton needed). Every figure is a model, not a measurement.
"""
from __future__ import annotations

import math
from typing import Sequence

from mpo_core.activation import check_activation
from mpo_core.cost.chain import chain_cost, core_shapes, elementwise_flops
from mpo_core.cost.model import Cost
from mpo_core.kernels.tiles import padded_small_shape
from mpo_core.shapes import bond_list, check_int, core_params

__all__ = ["MODEL_BLOCK_M", "choose_split", "epilogue_flops", "fused_linear_cost", "kernel_flops", "mpo_linear_cost"]

#: Row-block size the model assumes for the on-chip rebuild (the GPU configs use 64..256).
MODEL_BLOCK_M = 128


def choose_split(in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int]) -> bool | None:
    """Which end core the fused kernel keeps on chip: ``True`` the first, ``False`` the last.

    Picks the end whose ``(d, i, j)`` the kernel takes (``padded_small_shape``, both
    ways, since ``dx`` runs on the transpose) with the least power-of-two padding of
    ``i*j`` (wasted GEMM work), then the smaller bond; ties go to the last core.

    Parameters
    ----------
    in_shape, out_shape : sequence of int
        Mode sizes, length ``n >= 2``.
    ranks : sequence of int
        ``[1, d_1, ..., d_{n-1}, 1]``.

    Returns
    -------
    bool or None
        ``small_left``; ``None`` when neither end core fits the kernel.
    """
    n = len(in_shape)
    best = None
    for small_left, end, d in ((False, n - 1, ranks[n - 1]), (True, 0, ranks[1])):
        i, j = in_shape[end], out_shape[end]
        fwd, bwd = padded_small_shape(d, i, j), padded_small_shape(d, j, i)
        if fwd is None or bwd is None:
            continue
        key = (fwd[1] * fwd[2] * bwd[1] * bwd[2] / (i * j) ** 2, fwd[0])
        if best is None or key < best[0]:
            best = (key, small_left)
    return None if best is None else best[1]


def kernel_flops(tokens: int, big_rows: int, big_cols: int, padded: tuple[int, int, int], block_m: int
                 ) -> tuple[int, int]:
    """Tensor-core FLOPs of one kernel launch: the padded GEMM and the on-chip rebuild of every ``W`` tile.

    With ``padded = (DP, ISP, JSP)``, ``Kp = big_rows * ISP``, ``Np = big_cols * JSP``:
    ``(2 M Kp Np, 2 DP Kp Np ceil(M / block_m))`` (each row block rebuilds every tile once).
    """
    dp, rp, cp = padded
    kp, np_ = big_rows * rp, big_cols * cp
    return 2 * tokens * kp * np_, 2 * dp * kp * np_ * math.ceil(tokens / block_m)


def epilogue_flops(tokens: int, cols: int, bias: bool, activation: bool) -> int:
    """FMA FLOPs of the kernel's epilogue: 1 per output for the bias, ~8 for GELU."""
    return tokens * cols * elementwise_flops(bias, activation)


def _check_cost_args(tokens: int, in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int],
                     dtype_bytes: int) -> list[int]:
    """Validate the arguments of :func:`mpo_linear_cost`; the full ranks list ``[1, d_1, ..., d_{n-1}, 1]``."""
    check_int("tokens", tokens, minimum=0)
    if len(in_shape) < 2 or len(in_shape) != len(out_shape):
        raise ValueError(f"in_shape/out_shape: expected equal lengths >= 2, got {in_shape} and {out_shape}")
    for k, (i, j) in enumerate(zip(in_shape, out_shape)):
        check_int(f"in_shape[{k}]", i)
        check_int(f"out_shape[{k}]", j)
    if dtype_bytes not in (1, 2, 4, 8):
        raise ValueError(f"dtype_bytes: expected 1, 2, 4 or 8, got {dtype_bytes!r}")
    return bond_list(ranks, len(in_shape))


def mpo_linear_cost(
    tokens: int,
    in_shape: Sequence[int],
    out_shape: Sequence[int],
    ranks: Sequence[int],
    dtype_bytes: int,
    *,
    bias: bool = True,
    activation: str | None = None,
    block_m: int = MODEL_BLOCK_M,
) -> dict:
    """FLOPs and HBM bytes of the fused triton path, forward and backward (model numbers).

    Parameters
    ----------
    tokens : int
        Rows ``M`` of ``x``.
    in_shape, out_shape : sequence of int
        MPO mode sizes (``K = prod(in_shape)``, ``N = prod(out_shape)``).
    ranks : sequence of int
        ``[1, d_1, ..., d_{n-1}, 1]`` or the ``n - 1`` inner bonds (:func:`mpo_core.shapes.bond_list`).
    dtype_bytes : int
        Bytes per element of ``x``, ``W`` and ``y`` (2 for fp16/bf16, 4 for fp32).
    bias : bool
        Whether a bias is added.
    activation : {None, "gelu", "gelu_tanh"}
        Epilogue activation (its FLOPs are counted as ~8 per output).
    block_m : int
        Row block of the kernel: each block rebuilds every ``W`` tile once.

    Returns
    -------
    dict
        ``flops`` / ``bytes``: forward totals (``inf`` when ``supported`` is False: neither
        end core fits the kernel). Breakdown: ``bond`` (``D``), ``small_left``,
        ``padded`` (``(D_pad, IS_pad, JS_pad)``), ``flops_useful`` (``2*M*K*N``),
        ``flops_tensor`` (tensor cores: the padded GEMM ``flops_gemm`` plus the
        on-chip rebuild ``flops_rebuild = 2*D_pad*K_pad*N_pad*ceil(M/block_m)``),
        ``flops_fma`` (FMA units: the epilogue ``flops_epilogue``, plus the pre-contraction
        ``flops_precontract`` when ``dtype_bytes == 4``; in fp16/bf16 it runs on
        tensor cores and counts in ``flops_tensor``), ``factor_elems`` (``|left| + |right|``); backward
        ``flops_bwd`` (of which ``flops_bwd_tensor`` on tensor cores), ``bytes_bwd``;
        the dense path's GEMM FLOPs ``flops_dense_fwd = 2*M*K*N``, ``flops_dense_bwd = 4*M*K*N``.
        Bytes are compulsory HBM traffic: each tensor read or written once (tile
        re-reads are assumed to hit L2).

    Backward: ``g = dy * act'(pre)``; ``dx = g @ W^T`` is the same kernel on the transposed
    factors; ``dW = x^T @ g`` (a GEMM), then ``dleft``/``dright`` (``2*D*K*N`` FLOPs each);
    core gradients by autograd through the pre-contraction (twice its forward).
    """
    ranks = _check_cost_args(tokens, in_shape, out_shape, ranks, dtype_bytes)
    check_activation(activation)
    m, b = tokens, dtype_bytes
    n_modes = len(in_shape)
    k_dim, n_dim = math.prod(in_shape), math.prod(out_shape)
    small_left = choose_split(in_shape, out_shape, ranks)
    end = 0 if small_left else n_modes - 1
    d, i_s, j_s = ranks[1] if small_left else ranks[n_modes - 1], in_shape[end], out_shape[end]
    ib, jb = k_dim // i_s, n_dim // j_s
    fwd_pad, bwd_pad = padded_small_shape(d, i_s, j_s), padded_small_shape(d, j_s, i_s)
    core_elems = core_params(in_shape, out_shape, ranks)
    factor_elems = ib * jb * d + d * i_s * j_s
    cores = core_shapes(in_shape, out_shape, ranks)
    pre_flops = chain_cost(cores[1:] if small_left else cores[:-1], b).flops_tensor
    useful = 2 * m * k_dim * n_dim
    epilogue = epilogue_flops(m, n_dim, bias, activation is not None)
    fwd_bytes = b * (core_elems + 2 * factor_elems + m * k_dim + m * n_dim + (n_dim if bias else 0))
    # Backward: act' (reads dy, pre; writes g), dx kernel (reads g, factors; writes dx),
    # dW GEMM (reads x, g; writes dW), dleft/dright (read dW, factors; write them), dbias,
    # pre-contraction backward (~2x its forward), core grads written.
    bwd_bytes = b * (
        (3 * m * n_dim if activation else 0)
        + m * n_dim + factor_elems + m * k_dim
        + m * k_dim + m * n_dim + k_dim * n_dim
        + k_dim * n_dim + 2 * factor_elems
        + (m * n_dim if bias else 0)
        + 2 * factor_elems + 2 * core_elems
    )
    out = dict(bond=d, small_left=small_left, padded=fwd_pad, factor_elems=factor_elems, flops_useful=useful,
               flops_precontract=pre_flops, flops_epilogue=epilogue, flops_dense_fwd=useful,
               flops_dense_bwd=2 * useful, supported=fwd_pad is not None and bwd_pad is not None)
    if not out["supported"]:
        return dict(out, flops=math.inf, bytes=math.inf, flops_bwd=math.inf, bytes_bwd=math.inf)
    gemm, rebuild = kernel_flops(m, ib, jb, fwd_pad, block_m)
    dx_gemm, dx_rebuild = kernel_flops(m, jb, ib, bwd_pad, block_m)
    low_precision = dtype_bytes < 4
    bwd_tensor = dx_gemm + dx_rebuild + useful + 4 * d * k_dim * n_dim + (2 * pre_flops if low_precision else 0)
    bwd_flops = dx_gemm + dx_rebuild + useful + 4 * d * k_dim * n_dim + 2 * pre_flops \
        + epilogue_flops(m, n_dim, bias, activation is not None)
    return dict(
        out,
        flops=gemm + rebuild + pre_flops + epilogue,
        bytes=fwd_bytes,
        flops_gemm=gemm,
        flops_rebuild=rebuild,
        flops_tensor=gemm + rebuild + (pre_flops if low_precision else 0),
        flops_fma=epilogue + (0 if low_precision else pre_flops),
        flops_bwd=bwd_flops,
        flops_bwd_tensor=bwd_tensor,
        bytes_bwd=bwd_bytes,
    )


def fused_linear_cost(tokens: int, in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int],
                      dtype_bytes: int = 2, *, bias: bool = True, activation: bool = True,
                      training: bool = True) -> dict[str, Cost]:
    """:func:`mpo_linear_cost` as ``{"fwd": Cost, "bwd": Cost}`` with read and written bytes apart.

    With ``training`` and an activation the forward also writes the pre-activation
    (``M N s``). Written bytes: forward the big factor and ``y``; backward ``dx``, ``dW``, the
    factor and core gradients (and ``g`` with an activation); the rest are reads. Forward:
    2 ops (pre-contraction, kernel); backward 4.
    """
    c = mpo_linear_cost(tokens, tuple(in_shape), tuple(out_shape), ranks, dtype_bytes, bias=bias,
                        activation="gelu" if activation else None)
    if not c["supported"]:
        raise ValueError(f"the fused kernel does not take in_shape={in_shape}, out_shape={out_shape}, ranks={ranks}")
    m, k, n, b = tokens, math.prod(in_shape), math.prod(out_shape), dtype_bytes
    pre = b * m * n if training and activation else 0
    written_fwd = b * (c["factor_elems"] + m * n) + pre
    written_bwd = b * (m * k + k * n + 2 * c["factor_elems"] + core_params(in_shape, out_shape, ranks)
                       + (m * n if activation else 0))
    fwd = Cost(c["flops_tensor"], c["flops_fma"], c["bytes"] - (written_fwd - pre), written_fwd, launches=2)
    bwd = Cost(c["flops_bwd_tensor"], c["flops_bwd"] - c["flops_bwd_tensor"], c["bytes_bwd"] - written_bwd,
               written_bwd, launches=4)
    return {"fwd": fwd, "bwd": bwd}
