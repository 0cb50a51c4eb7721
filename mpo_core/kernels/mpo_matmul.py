"""Fused MPO matmul: ``act(x @ W + b)`` with ``W`` rebuilt tile by tile on chip.

Design (the cost model lives in :func:`mpo_core.cost.mpo_linear_cost`)
---------------------------------------------------------------------------------
``ops`` cuts the MPO at its first or last bond ``D`` into a *small* factor (one end
core) and a *big* one (the other ``n-1`` cores, pre-contracted by torch), so that

    W = sum_s left[s] (x) right[s]        left (D, IL, JL): leading modes, right (D, IR, JR): trailing

(C order: row ``k = iL*IR + iR``, column ``n = jL*JR + jR``); ``small_left`` says which
of the two is the small one. ``W`` never reaches global memory. Each program owns a
``BLOCK_M x BLOCK_N`` output tile made of ``BJ`` big columns times all ``JS`` small
columns (padded to a power of two ``JSP``), and each K step covers ``BI`` big rows
times all ``IS`` small rows (padded to ``ISP``). The weight tile is a small
tensor-core GEMM plus an on-chip reorder:

    w[(a, b), (r, c)] = sum_s big[s, i0+a, j0+b] * small[s, r, c]      (BI*BJ, DP) @ (DP, ISP*JSP)
    W_tile[(a, r), (b, c)] = w[(a, b), (r, c)]                          reshape/permute/reshape

and the ``x`` columns / output columns of the tile are ``k = ib*IS + is`` (small
right) or ``k = is*IB + ib`` (small left), likewise for ``n``. ``small``
(``DP x ISP*JSP``, zero-padded) is loaded once per program; each K step loads only
the distinct ``big`` entries of its tile (``BK*BN*D/(IS*JS)`` elements: at full rank
``D = IS*JS``, exactly a GEMM's ``W`` tile). The ``x`` tile and the rebuilt ``W`` tile
(cast to the input dtype) go to ``tl.dot`` with fp32 accumulation. The epilogue adds
the bias, optionally stores the pre-activation (for backward), applies GELU (erf
form, or tanh form written as ``z * sigmoid(2u)`` = ``0.5 z (1 + tanh u)`` since the
interpreter has no ``tanh``) and stores ``y``.

Per call with ``M`` rows, ``K = IB*IS``, ``N = JB*JS``, ``Kp = IB*ISP``, ``Np = JB*JSP``:

* tensor-core FLOPs ``2*M*Kp*Np`` (the dense GEMM's ``2*M*K*N`` when the small
  modes are powers of two, as BERT's 4x4 end cores) plus the rebuild
  ``2*DP*Kp*Np*ceil(M/BLOCK_M)`` (``DP/BLOCK_M`` of the GEMM: 1/8 at ``DP = 16``,
  ``BLOCK_M = 128``);
* compulsory HBM bytes ``(M*K + M*N [+ M*N pre] + N + |big| + |small|) * b``;
  ``big`` tiles are re-read per row block from L2 like a GEMM's ``W`` tiles.

Nothing here decides when this kernel runs, on which factors or dtype: that policy is
in :mod:`mpo_core.ops.mpo_linear`.
"""
from __future__ import annotations

import contextlib
import contextvars
from collections.abc import Iterator

import torch
import triton
import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction

from mpo_core.kernels.tiles import MAX_BOND, MAX_SMALL_BLOCK, padded_small_shape  # noqa: F401 (re-exported)

#: Activation names accepted by :func:`mpo_matmul` and their kernel codes.
ACTIVATION_CODES = {"none": 0, "gelu": 1, "gelu_tanh": 2}

_SQRT1_2 = tl.constexpr(0.7071067811865476)
_SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)


@triton.jit
def _mpo_matmul_kernel(
    x_ptr, big_ptr, small_ptr, bias_ptr, y_ptr, pre_ptr,
    M, N, K, IB, JB, IS, JS, D,
    stride_xm, stride_xk,
    HAS_BIAS: tl.constexpr, ACTIVATION: tl.constexpr, STORE_PRE: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SMALL_FIRST: tl.constexpr,
    ISP: tl.constexpr, JSP: tl.constexpr, DP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr,
):
    # W = sum_s big[s] (x) small[s] (SMALL_FIRST=False: k = ib*IS + is, n = jb*JS + js) or
    # sum_s small[s] (x) big[s] (SMALL_FIRST=True: k = is*IB + ib, n = js*JB + jb).
    # A (BLOCK_K x BLOCK_N) weight tile spans BI big rows x ISP small rows and BJ big columns
    # x JSP small columns (small modes padded to powers of two, padding masked to 0).
    BI: tl.constexpr = BLOCK_K // ISP
    BJ: tl.constexpr = BLOCK_N // JSP
    # Grouped program order (Triton matmul tutorial): GROUP_M row blocks share column blocks in L2.
    pid = tl.program_id(0)
    num_pid_m = tl.cdiv(M, BLOCK_M)
    num_pid_n = tl.cdiv(JB, BJ)
    group_size = GROUP_M * num_pid_n
    first_m = (pid // group_size) * GROUP_M
    group_m = min(num_pid_m - first_m, GROUP_M)
    pid_m = first_m + (pid % group_size) % group_m
    pid_n = (pid % group_size) // group_m

    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    m_mask = offs_m < M
    # Output columns of the tile: big column jb in [pid_n*BJ, +BJ), small column js < JS.
    cols = tl.arange(0, BLOCK_N)
    jb_c = pid_n * BJ + cols // JSP
    js_c = cols % JSP
    if SMALL_FIRST:
        offs_n = js_c * JB + jb_c
    else:
        offs_n = jb_c * JS + js_c
    n_mask = (jb_c < JB) & (js_c < JS)

    # small as a (DP, ISP*JSP) matrix, constant over the K loop: small[s, r, c] at column r*JSP + c.
    sd = tl.arange(0, DP)
    rc = tl.arange(0, ISP * JSP)
    s_r = rc // JSP
    s_c = rc % JSP
    small = tl.load(
        small_ptr + sd[:, None] * (IS * JS) + (s_r * JS + s_c)[None, :],
        mask=(sd < D)[:, None] & ((s_r < IS) & (s_c < JS))[None, :], other=0.0,
    )
    # big rows of the rebuild GEMM: (a, b) -> big[:, i0 + a, pid_n*BJ + b], a < BI, b < BJ.
    ab = tl.arange(0, BI * BJ)
    b_a = ab // BJ
    b_jb = pid_n * BJ + ab % BJ
    # x columns of the tile: (a, r) -> big row i0 + a, small row r.
    ks = tl.arange(0, BLOCK_K)
    k_a = ks // ISP
    k_r = ks % ISP

    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for i0 in range(0, IB, BI):
        b_ib = i0 + b_a
        big = tl.load(
            big_ptr + sd[None, :] * (IB * JB) + (b_ib * JB + b_jb)[:, None],
            mask=((b_ib < IB) & (b_jb < JB))[:, None] & (sd < D)[None, :], other=0.0,
        )
        # Rebuild on the tensor cores: w[(a,b),(r,c)] = sum_s big[s,i0+a,jb_b] small[s,r,c] ...
        w = tl.dot(big, small, input_precision=DOT_PRECISION)
        # ... then reorder (a, b, r, c) -> rows (a, r), columns (b, c) of the W tile.
        w = tl.reshape(tl.permute(tl.reshape(w, (BI, BJ, ISP, JSP)), (0, 2, 1, 3)), (BLOCK_K, BLOCK_N))
        k_ib = i0 + k_a
        if SMALL_FIRST:
            offs_k = k_r * IB + k_ib
        else:
            offs_k = k_ib * IS + k_r
        x_tile = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :] * stride_xk,
            mask=m_mask[:, None] & ((k_ib < IB) & (k_r < IS))[None, :], other=0.0,
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
# :func:`padded_small_shape` rely on (tile holds whole padded right modes; rebuild GEMM has >= 16 rows).
# ptxas (Triton 3.9, bf16, 4x4 end core, D 16; `python -m mpo_core.gpu.aot`, tests/test_aot_compile.py):
# no spills on sm_80/sm_90 without the pre-activation store; with it (training) the 128-row tiles
# spill 96-152 B/thread in the epilogue, so STORE_PRE launches autotune over the 64-row tiles only.
# 256-row tiles and BLOCK_K=64 spilled: left out. Every config emits wgmma on sm_90.
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
#: Largest ``BLOCK_M`` of a config that also stores the pre-activation (larger ones spill).
STORE_PRE_MAX_BLOCK_M = 64


def _prune_configs(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
    """The autotuner's early prune: only the non-spilling tiles when the epilogue also stores ``pre``."""
    store_pre = kwargs.get("STORE_PRE", named_args.get("STORE_PRE", False))
    return [c for c in configs if not store_pre or c.kwargs["BLOCK_M"] <= STORE_PRE_MAX_BLOCK_M]


_autotuned_kernel = triton.autotune(configs=_GPU_CONFIGS, key=["M", "N", "K", "D", "ISP", "JSP", "SMALL_FIRST", "STORE_PRE", "ACTIVATION"],
                                    prune_configs_by={"early_config_prune": _prune_configs})(_mpo_matmul_kernel)


def launch_configs(store_pre: bool) -> list[triton.Config]:
    """The tile configs the autotuner may pick for a launch with this ``STORE_PRE`` (its own prune applied)."""
    return _autotuned_kernel.early_config_prune(list(_autotuned_kernel.configs), {}, STORE_PRE=store_pre)


_FORCED_CONFIG: contextvars.ContextVar[triton.Config | None] = contextvars.ContextVar("mpo_matmul_forced_config", default=None)


@contextlib.contextmanager
def forced_config(config: triton.Config) -> Iterator[None]:
    """Launch :func:`mpo_matmul` with this one tile config inside the block, instead of
    autotuning (on a GPU) or the interpreter's fixed tile (on CPU).

    For tests and the acceptance check, which run every config the autotuner may pick;
    a launch whose :func:`launch_configs` excludes ``config`` raises ``ValueError``.
    """
    if not isinstance(config, triton.Config) or not {"BLOCK_M", "BLOCK_N", "BLOCK_K", "GROUP_M"} <= set(config.kwargs):
        raise TypeError(f"config: expected a triton.Config with BLOCK_M/BLOCK_N/BLOCK_K/GROUP_M, got {config!r}")
    token = _FORCED_CONFIG.set(config)
    try:
        yield
    finally:
        _FORCED_CONFIG.reset(token)


#: Whether the kernel runs on Triton's CPU interpreter (``TRITON_INTERPRET=1`` at import).
INTERPRETED: bool = isinstance(_mpo_matmul_kernel, InterpretedFunction)
# The interpreter runs programs one after another: one fixed, small tiling.
_INTERPRETER_META = {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}
# The on-chip tile rule (MAX_SMALL_BLOCK, MAX_BOND, padded_small_shape) lives in mpo_core.kernels.tiles,
# where the cost model reads it without Triton; imported above.


def launch_constexprs(dtype: torch.dtype, has_bias: bool, activation: str, store_pre: bool, small_left: bool,
                      padded: tuple[int, int, int]) -> dict:
    """The kernel's non-tiling ``tl.constexpr`` arguments for one launch (``padded`` = ``(DP, ISP, JSP)``)."""
    dp, isp, jsp = padded
    return dict(HAS_BIAS=has_bias, ACTIVATION=ACTIVATION_CODES[activation], STORE_PRE=store_pre,
                DOT_PRECISION="ieee" if dtype == torch.float32 else "tf32", SMALL_FIRST=small_left,
                ISP=isp, JSP=jsp, DP=dp)


def mpo_matmul(
    x: torch.Tensor,
    left: torch.Tensor,
    right: torch.Tensor,
    bias: torch.Tensor | None = None,
    activation: str = "none",
    store_pre: bool = False,
    small_left: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Launch the fused kernel: ``act(x @ W + bias)`` with ``W = sum_s left[s] (x) right[s]``.

    Parameters
    ----------
    x : Tensor
        ``(M, K)`` input, fp32/fp16/bf16, any strides.
    left : Tensor
        ``(D, IL, JL)`` factor of the slow (leading) modes, same dtype and device as ``x``.
    right : Tensor
        ``(D, IR, JR)`` factor of the fast (trailing) modes, same dtype and device;
        ``K == IL*IR``.
    bias : Tensor, optional
        ``(N,)`` with ``N = JL*JR``, same dtype.
    activation : {"none", "gelu", "gelu_tanh"}
        Epilogue activation.
    store_pre : bool
        Also return the pre-activation ``x @ W + bias`` (for the backward pass).
    small_left : bool
        Which factor each program keeps whole on chip: ``right`` (default) or ``left``;
        :func:`padded_small_shape` must accept it.

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
    big, small = (right, left) if small_left else (left, right)
    _, ib, jb = big.shape
    _, i_s, j_s = small.shape
    padded = padded_small_shape(d, i_s, j_s)
    assert padded is not None, f"on-chip factor {(d, i_s, j_s)} exceeds the kernel's limits"
    jsp = padded[2]
    big = big.contiguous()
    small = small.contiguous()
    y = torch.empty((m, n), dtype=x.dtype, device=x.device)
    pre = torch.empty((m, n) if store_pre else (0,), dtype=x.dtype, device=x.device)
    if m == 0:
        return y, pre
    args = (x, big, small, bias if bias is not None else y, y, pre if store_pre else y,
            m, n, k, ib, jb, i_s, j_s, d, x.stride(0), x.stride(1))
    flags = launch_constexprs(x.dtype, bias is not None, activation, store_pre, small_left, padded)

    def grid(meta):
        return (triton.cdiv(m, meta["BLOCK_M"]) * triton.cdiv(jb, meta["BLOCK_N"] // jsp),)

    forced = _FORCED_CONFIG.get()
    if forced is not None:
        if not any(forced.all_kwargs() == c.all_kwargs() for c in launch_configs(store_pre)):
            raise ValueError(f"forced_config: {forced} is not a config the autotuner may pick for store_pre={store_pre}")
        _mpo_matmul_kernel[grid(forced.kwargs)](*args, **flags, **forced.all_kwargs())
    elif INTERPRETED:
        _mpo_matmul_kernel[grid(_INTERPRETER_META)](*args, **flags, **_INTERPRETER_META)
    else:
        _autotuned_kernel[grid](*args, **flags)
    return y, pre
