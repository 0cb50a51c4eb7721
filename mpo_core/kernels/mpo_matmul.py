"""Fused MPO matmul: ``act(x @ W + b)`` with ``W`` rebuilt tile by tile on chip.

Design (the cost model lives in :func:`mpo_core.ops.mpo_linear.mpo_linear_cost`)
---------------------------------------------------------------------------------
``ops`` cuts the MPO at its last bond into two factors (torch pre-contracts the
first ``n-1`` cores):

    left [s, iL, jL] = (T1 ... T_{n-1})[iL, jL, s]   shape (D, IL, JL)
    right[s, iR, jR] = Tn[s, iR, jR, 0]              shape (D, IR, JR)   (small)

so that ``W[(iL, iR), (jL, jR)] = sum_s left[s, iL, jL] * right[s, iR, jR]``
(C order: row ``k = iL*IR + iR``, column ``n = jL*JR + jR``). ``W`` never reaches
global memory. Each program owns a ``BLOCK_M x BLOCK_N`` output tile made of ``BJ``
left columns times all ``JR`` right columns (padded to a power of two ``JRP``), and
each K step covers ``BI`` left rows times all ``IR`` (padded to ``IRP``). The weight
tile is then a small tensor-core GEMM plus an on-chip reorder:

    w[(a, b), (r, c)] = sum_s left[s, i0+a, j0+b] * right[s, r, c]     (BI*BJ, DP) @ (DP, IRP*JRP)
    W_tile[(a, r), (b, c)] = w[(a, b), (r, c)]                          reshape/permute/reshape

``right`` (``DP x IRP*JRP``, zero-padded) is loaded once per program; each K step
loads only the distinct ``left`` entries of its tile (``BI*BJ*D``, i.e. ``BK*BN*D/(IR*JR)``
elements: at full rank ``D = IR*JR``, exactly a GEMM's ``W`` tile). The ``x`` tile and
the rebuilt ``W`` tile (cast to the input dtype) go to ``tl.dot`` with fp32
accumulation. The epilogue adds the bias, optionally stores the pre-activation (for
backward), applies GELU (erf form, or tanh form written as ``z * sigmoid(2u)`` =
``0.5 z (1 + tanh u)`` since the interpreter has no ``tanh``) and stores ``y``.

Per call with ``M`` rows, ``K = IL*IR``, ``N = JL*JR``, ``Kp = IL*IRP``, ``Np = JL*JRP``:

* tensor-core FLOPs ``2*M*Kp*Np`` (the dense GEMM's ``2*M*K*N`` when ``IR``, ``JR``
  are powers of two; 4/3 more per odd mode 3) plus the rebuild ``2*DP*Kp*Np*ceil(M/BLOCK_M)``
  (``DP/BLOCK_M`` of the GEMM: 1/8 at ``DP = 16``, ``BLOCK_M = 128``);
* compulsory HBM bytes ``(M*K + M*N [+ M*N pre] + N + |left| + |right|) * b``;
  ``left`` tiles are re-read per row block from L2 like a GEMM's ``W`` tiles.

Nothing here decides when this kernel runs, on which factors or dtype: that policy is
in :mod:`mpo_core.ops.mpo_linear`.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

#: Activation names accepted by :func:`mpo_matmul` and their kernel codes.
ACTIVATION_CODES = {"none": 0, "gelu": 1, "gelu_tanh": 2}

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


@triton.jit
def _mpo_matmul_kernel(
    x_ptr, left_ptr, right_ptr, bias_ptr, y_ptr, pre_ptr,
    M, N, K, IL, JL, IR, JR, D,
    stride_xm, stride_xk,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, IRP: tl.constexpr, JRP: tl.constexpr, DP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # A (BLOCK_K x BLOCK_N) weight tile spans BI left rows x IRP right rows and BJ left
    # columns x JRP right columns (right modes padded to powers of two, padding masked to 0).
    BI: tl.constexpr = BLOCK_K // IRP
    BJ: tl.constexpr = BLOCK_N // JRP
    # Grouped program order (Triton matmul tutorial): GROUP_M row blocks share column blocks in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(JL, BJ)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_mask = offs_m < M
    # Output columns of the tile: n = jl*JR + jr for jl in [pid_n*BJ, +BJ), jr < JR.
    cols = tl.arange(0, BLOCK_N)
    jl_c = pid_n * BJ + cols // JRP
    jr_c = cols % JRP
    offs_n = jl_c * JR + jr_c
    n_mask = (jl_c < JL) & (jr_c < JR)

    # right as a (DP, IRP*JRP) matrix, constant over the K loop: right[s, r, c] at column r*JRP + c.
    sd = tl.arange(0, DP)
    rc = tl.arange(0, IRP * JRP)
    r_r = rc // JRP
    r_c = rc % JRP
    right = tl.load(
        right_ptr + sd[:, None] * (IR * JR) + (r_r * JR + r_c)[None, :],
        mask=(sd < D)[:, None] & ((r_r < IR) & (r_c < JR))[None, :], other=0.0,
    )
    # left rows of the rebuild GEMM: (a, b) -> left[:, i0 + a, pid_n*BJ + b], a < BI, b < BJ.
    ab = tl.arange(0, BI * BJ)
    l_a = ab // BJ
    l_jl = pid_n * BJ + ab % BJ
    # x columns of the tile: (a, r) -> k = (i0 + a)*IR + r.
    ks = tl.arange(0, BLOCK_K)
    k_a = ks // IRP
    k_r = ks % IRP

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i0 in range(0, IL, BI):
        l_il = i0 + l_a
        left = tl.load(
            left_ptr + sd[None, :] * (IL * JL) + (l_il * JL + l_jl)[:, None],
            mask=((l_il < IL) & (l_jl < JL))[:, None] & (sd < D)[None, :], other=0.0,
        )
        # Rebuild on the tensor cores: w[(a,b),(r,c)] = sum_s left[s,i0+a,jl_b] right[s,r,c] ...
        w = tl.dot(left, right, input_precision=DOT_PRECISION)
        # ... then reorder (a, b, r, c) -> rows (a, r), columns (b, c) of the W tile.
        w = tl.reshape(tl.permute(tl.reshape(w, (BI, BJ, IRP, JRP)), (0, 2, 1, 3)), (BLOCK_K, BLOCK_N))
        k_il = i0 + k_a
        x_tile = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + (k_il * IR + k_r)[None, :] * stride_xk,
            mask=m_mask[:, None] & ((k_il < IL) & (k_r < IR))[None, :], other=0.0,
        )
        acc = tl.dot(x_tile, w.to(x_tile.dtype), acc, input_precision=DOT_PRECISION)

    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    # Outputs: 64-bit row-block base, 32-bit offsets inside the block (BLOCK_M * N < 2**31).
    out_off = tl.arange(0, BLOCK_M)[:, None] * N + offs_n[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    row0 = (pid_m * BLOCK_M).to(tl.int64) * N
    if STORE_PRE:
        tl.store(pre_ptr + row0 + out_off, acc.to(pre_ptr.dtype.element_ty), mask=out_mask)
    if ACTIVATION == 1:
        acc = 0.5 * acc * (1.0 + tl.erf(acc * _SQRT1_2))
    elif ACTIVATION == 2:
        u = _SQRT_2_OVER_PI * (acc + 0.044715 * acc * acc * acc)
        acc = acc * tl.sigmoid(2.0 * u)
    tl.store(y_ptr + row0 + out_off, acc.to(y_ptr.dtype.element_ty), mask=out_mask)

# Every config has BLOCK_K, BLOCK_N >= 32 and BLOCK_K * BLOCK_N >= 16 * 64, which the limits in
# :func:`padded_right_shape` rely on (tile holds whole padded right modes; rebuild GEMM has >= 16 rows).
# ptxas (sm_80, sm_90; bf16/fp16, right block 4x4, D 16): no spills without the pre-activation
# store; with it (training), the 128- and 64x128 tiles spill 64-152 B/thread once, in the
# epilogue (checked in tests/test_mpo_matmul.py). 256-row tiles and BLOCK_K=64 spilled: left out.
_GPU_CONFIGS = [
    triton.Config({"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "GROUP_M": 8}, num_warps=w, num_stages=st)
    for bm, bn, bk, w, st in [
        (128, 128, 32, 8, 3),
        (128, 128, 32, 8, 4),
        (128, 64, 32, 4, 3),
        (64, 128, 32, 4, 3),
        (64, 64, 32, 4, 4),
    ]
]
_autotuned_kernel = triton.autotune(configs=_GPU_CONFIGS, key=["M", "N", "K", "D", "IRP", "JRP", "STORE_PRE", "ACTIVATION"])(_mpo_matmul_kernel)

#: Whether the kernel runs on Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import).
INTERPRETED: bool = isinstance(_mpo_matmul_kernel, InterpretedFunction)
# The interpreter runs programs one after another: one fixed, small tiling.
_INTERPRETER_META = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
#: Largest padded right block ``IRP*JRP`` and padded bond ``DP`` the kernel takes.
MAX_RIGHT_BLOCK = 64
MAX_BOND = 64


def padded_right_shape(d: int, ir: int, jr: int) -> tuple[int, int, int] | None:
    """Padded ``(DP, IRP, JRP)`` the kernel uses for a right factor ``(d, ir, jr)``, or ``None`` if unsupported.

    ``IRP``/``JRP`` are powers of two (``IRP*JRP >= 16`` for ``tl.dot``), ``DP >= 16``;
    supported when ``IRP*JRP <= MAX_RIGHT_BLOCK``, ``IRP, JRP <= 32`` and ``DP <= MAX_BOND``.
    """
    irp = triton.next_power_of_2(ir)
    jrp = max(triton.next_power_of_2(jr), triton.cdiv(16, irp))
    dp = max(16, triton.next_power_of_2(d))
    if irp * jrp > MAX_RIGHT_BLOCK or irp > 32 or jrp > 32 or dp > MAX_BOND:
        return None
    return dp, irp, jrp


def mpo_matmul(
    x: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    store_pre: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused kernel: ``act(x @ W + bias)`` with ``W = sum_s left[s] (x) right[s]``.

    Parameters
    ----------
    x : Tensor
        ``(M, K)`` input, fp32/fp16/bf16, any strides.
    left : Tensor
        ``(D, IL, JL)`` left factor, same dtype and device as ``x``.
    right : Tensor
        ``(D, IR, JR)`` right factor, same dtype and device; ``K == IL*IR`` and
        :func:`padded_right_shape` must accept ``(D, IR, JR)``.
    bias : Tensor, optional
        ``(N,)`` with ``N = JL*JR``, same dtype.
    activation : {"none", "gelu", "gelu_tanh"}
        Epilogue activation.
    store_pre : bool
        Also return the pre-activation ``x @ W + bias`` (for the backward pass).

    Returns
    -------
    tuple of Tensor
        ``y`` of shape ``(M, N)`` in ``x.dtype``, and the pre-activation of the same
        shape when ``store_pre`` else an empty ``(0,)`` tensor.

    Notes
    -----
    Shapes are checked by the caller (:mod:`mpo_core.ops.mpo_linear`); this helper
    only asserts the invariants the kernel's indexing relies on.
    """
    d, il, jl = left.shape
    d_r, ir, jr = right.shape
    m, k = x.shape
    n = jl * jr
    assert d == d_r and k == il * ir, "left/right factors do not match x"
    assert activation in ACTIVATION_CODES, activation
    padded = padded_right_shape(d, ir, jr)
    assert padded is not None, f"right factor {(d, ir, jr)} exceeds the kernel's limits"
    dp, irp, jrp = padded
    left = left.contiguous()
    right = right.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    pre = torch.empty((m, n) if store_pre else (0,), dtype=x.dtype, device=x.device)
    if m == 0:
        return y, pre
    args = (x, left, right, bias if bias is not None else y, y, pre if store_pre else y,
            m, n, k, il, jl, ir, jr, d, x.stride(0), x.stride(1))
    flags = dict(
        HAS_BIAS=bias is not None,
        ACTIVATION=ACTIVATION_CODES[activation],
        STORE_PRE=store_pre,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",
        IRP=irp, JRP=jrp, DP=dp,
    )

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(jl, meta["BLOCK_N"] // jrp),)

    if INTERPRETED:
        _mpo_matmul_kernel[grid(_INTERPRETER_META)](*args, **flags, **_INTERPRETER_META)
    else:
        _autotuned_kernel[grid](*args, **flags)
    return y, pre
