"""Fused MPO linear layer ``act(x @ W + b)``: autograd op, torch reference, dispatch, cost model.

``W`` (``prod(in_shape) x prod(out_shape)``, rows are input modes, C order) is given
as MPO cores ``T_k`` of shape ``(d_{k-1}, i_k, j_k, d_k)``; see DESIGN.md section 1.

Paths
-----
* **reference** (:func:`mpo_linear_reference`): rebuild the dense ``W`` with torch,
  ``F.linear``, activation. The one reference every test compares against; also the
  path on CPU and on GPUs below compute capability 8.0.
* **triton** (``backend="triton"``): cut the MPO at its first or last bond
  (:func:`choose_split`): one end core is the small factor each program keeps on
  chip, torch pre-contracts the other ``n-1`` cores into the big factor, and
  ``W = sum_s left[s] (x) right[s]`` (``left`` holds the leading modes). The kernel
  :mod:`mpo_core.kernels.mpo_matmul` rebuilds each ``W`` tile on chip with a small
  tensor-core GEMM (``(BI*BJ, D) @ (D, i*j)``, small modes padded to powers of two)
  and never writes ``W`` to global memory. The end core is chosen for the least
  padding (BERT's ``(4,4,4,4,3)``: the first core, ``4x4``, no padding); it must fit
  (``padded_small_shape``: padded ``i*j <= 64`` and ``D <= 64``, both ways for ``dx``):
  ``backend=None`` uses the reference otherwise, ``backend="triton"`` raises.
  Registered as the custom op ``mpo_core::mpo_kron_linear``
  (``torch.library.custom_op`` + ``register_fake`` + ``register_autograd``); the
  pre-contraction stays in plain torch autograd, so core gradients flow through it.

Backward (triton path), with ``g = dy * act'(pre)`` (``pre`` stored by the forward
epilogue when a gradient is needed):

* ``dx = g @ W^T``: the same fused kernel on the transposed factors
  (``left^T (D, JL, IL)``, ``right^T (D, JR, IR)``): ``2*M*K*N`` tensor FLOPs,
  as the dense path, and still no ``W`` in memory;
* ``dW = x^T @ g`` (torch GEMM, ``2*M*K*N`` FLOPs, as the dense path), then
  ``dleft[s] = sum dW * right[s]`` and ``dright[s] = sum dW * left[s]``
  (``2*D*K*N`` FLOPs each, independent of ``M``); the factored alternative
  (contracting ``x`` and ``g`` with the factors first) costs ``2*M*K*N*D/(JR or IR)``
  and is never cheaper once ``D >= IR, JR``, so materializing ``dW`` is the FLOP-optimal
  choice. Core gradients then follow by autograd through the pre-contraction.
* ``dbias = sum_rows g``.

So the backward costs ``4*M*K*N`` GEMM FLOPs like the dense path, plus terms
independent of ``M`` (``4*D*K*N`` and the pre-contraction's) and the ``dx`` kernel's
rebuild (``D_pad/BLOCK_M`` of its GEMM) and padding waste (odd last modes, e.g. 3 -> 4);
:func:`mpo_linear_cost` gives the numbers.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F

from mpo_core.mpo import validate_cores
from mpo_core.ops import _dispatch

ACTIVATIONS = (None, "gelu", "gelu_tanh")
BACKENDS = (None, "torch", "triton")
#: dtypes the reference accepts; the kernel takes the first three (fp32 accumulation).
_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_KERNEL_DTYPES = _DTYPES[:3]
#: Row-block size the cost model assumes for the on-chip rebuild (the GPU configs use 64..256).
MODEL_BLOCK_M = 128


# ----------------------------------------------------------------------------- validation
def _validate(
    x: torch.Tensor, cores: Sequence[torch.Tensor], bias: torch.Tensor | None, activation: str | None
) -> tuple[list[torch.Tensor], tuple[int, ...], tuple[int, ...]]:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"x: expected a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _DTYPES:
        raise TypeError(f"x: expected dtype float32, float16, bfloat16 or float64, got {x.dtype}")
    if x.dim() < 1:
        raise ValueError("x: expected shape (..., prod(in_shape)), got a 0-d tensor")
    cores = validate_cores(cores)
    if len(cores) < 2:
        raise ValueError(f"cores: expected at least 2 cores (a 1-core MPO is a dense matrix), got {len(cores)}")
    if cores[0].dtype != x.dtype:
        raise TypeError(f"cores: dtype {cores[0].dtype} does not match x.dtype {x.dtype}")
    if cores[0].device != x.device:
        raise ValueError(f"cores: device {cores[0].device} does not match x.device {x.device}")
    in_shape = tuple(int(c.shape[1]) for c in cores)
    out_shape = tuple(int(c.shape[2]) for c in cores)
    if x.shape[-1] != math.prod(in_shape):
        raise ValueError(
            f"x: last dim must equal prod(in_shape)={math.prod(in_shape)} for in_shape={in_shape}, got {x.shape[-1]}"
        )
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias: expected a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (math.prod(out_shape),):
            raise ValueError(f"bias: expected shape ({math.prod(out_shape)},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias: dtype {bias.dtype} does not match x.dtype {x.dtype}")
        if bias.device != x.device:
            raise ValueError(f"bias: device {bias.device} does not match x.device {x.device}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    return cores, in_shape, out_shape


# ----------------------------------------------------------------------------- torch helpers
def _contract(cores: Sequence[torch.Tensor]) -> torch.Tensor:
    """Contract consecutive cores into one ``(d_left, prod(in), prod(out), d_right)`` tensor (C order)."""
    t = cores[0]
    for c in cores[1:]:
        x0, a, b, _ = t.shape
        _, i, j, e = c.shape
        t = torch.einsum("xabd,dije->xaibje", t, c).reshape(x0, a * i, b * j, e)
    return t


def _apply_activation(z: torch.Tensor, activation: str | None) -> torch.Tensor:
    if activation is None:
        return z
    return F.gelu(z, approximate="tanh" if activation == "gelu_tanh" else "none")


def mpo_linear_reference(
    x: torch.Tensor,
    cores: Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
    activation: str | None = None,
) -> torch.Tensor:
    """The torch reference: rebuild dense ``W`` from the cores, ``F.linear``, activation.

    Parameters
    ----------
    x : Tensor
        ``(..., prod(in_shape))``, float32/float16/bfloat16/float64.
    cores : sequence of Tensor
        MPO cores ``(d_{k-1}, in_k, out_k, d_k)``, ``d_0 = d_n = 1``, dtype and device of ``x``.
    bias : Tensor, optional
        ``(prod(out_shape),)``.
    activation : {None, "gelu", "gelu_tanh"}
        ``"gelu"`` is the erf form, ``"gelu_tanh"`` the tanh approximation.

    Returns
    -------
    Tensor
        ``act(x @ W + bias)`` of shape ``(..., prod(out_shape))``, computed in ``x.dtype``
        with plain torch autograd.
    """
    cores, _, _ = _validate(x, cores, bias, activation)
    w = _contract(cores)[0, :, :, 0]
    return _apply_activation(F.linear(x, w.t(), bias), activation)


# ----------------------------------------------------------------------------- cost model
def choose_split(in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int]) -> bool | None:
    """Which end core the fused kernel keeps on chip: ``True`` the first, ``False`` the last.

    Picks the end whose ``(d, i, j)`` the kernel takes (:func:`padded_small_shape`, both
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
    from mpo_core.kernels.mpo_matmul import padded_small_shape

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


def _chain_flops(core_shapes: Sequence[tuple[int, int, int, int]]) -> int:
    """FLOPs of :func:`_contract` over cores of these ``(d_left, i, j, d_right)`` shapes."""
    flops, rows = 0, core_shapes[0][0] * core_shapes[0][1] * core_shapes[0][2]
    for d, i, j, e in core_shapes[1:]:
        flops += 2 * rows * d * i * j * e
        rows *= i * j
    return flops


def _check_cost_args(tokens: int, in_shape: Sequence[int], out_shape: Sequence[int], ranks: Sequence[int],
                     dtype_bytes: int) -> None:
    if not isinstance(tokens, int) or tokens < 0:
        raise ValueError(f"tokens: expected an int >= 0, got {tokens!r}")
    if len(in_shape) < 2 or len(in_shape) != len(out_shape):
        raise ValueError(f"in_shape/out_shape: expected equal lengths >= 2, got {in_shape} and {out_shape}")
    if any(int(s) < 1 for s in (*in_shape, *out_shape)):
        raise ValueError(f"in_shape/out_shape: every mode must be >= 1, got {in_shape} and {out_shape}")
    if len(ranks) != len(in_shape) + 1 or ranks[0] != 1 or ranks[-1] != 1 or min(ranks) < 1:
        raise ValueError(f"ranks: expected [1, d_1, ..., d_(n-1), 1] with n={len(in_shape)}, got {list(ranks)}")
    if dtype_bytes not in (1, 2, 4, 8):
        raise ValueError(f"dtype_bytes: expected 1, 2, 4 or 8, got {dtype_bytes!r}")


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
    """FLOPs and HBM bytes of the fused triton path (model numbers, not measurements).

    Requires Triton to be importable (the kernel module defines the padding).

    Parameters
    ----------
    tokens : int
        Rows ``M`` of ``x``.
    in_shape, out_shape : sequence of int
        MPO mode sizes (``K = prod(in_shape)``, ``N = prod(out_shape)``).
    ranks : sequence of int
        ``[1, d_1, ..., d_{n-1}, 1]``.
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
        ``flops`` / ``bytes``: forward totals (``inf`` when ``supported`` is False: the
        padded last core exceeds the kernel's limits). Breakdown: ``bond`` (``D``),
        ``padded`` (``(D_pad, IR_pad, JR_pad)``), ``flops_useful`` (``2*M*K*N``),
        ``flops_tensor`` (tensor cores: the padded GEMM ``flops_gemm`` plus the
        on-chip rebuild ``flops_rebuild = 2*D_pad*K_pad*N_pad*ceil(M/block_m)``),
        ``flops_fma`` (FMA units: the epilogue, plus the pre-contraction
        ``flops_precontract`` when ``dtype_bytes == 4``; in fp16/bf16 it runs on
        tensor cores and counts in ``flops_tensor``), ``factor_elems`` (``|left| + |right|``); backward
        ``flops_bwd`` (of which ``flops_bwd_tensor`` on tensor cores), ``bytes_bwd``;
        the dense path's GEMM FLOPs ``flops_dense_fwd = 2*M*K*N``, ``flops_dense_bwd = 4*M*K*N``.
        Bytes are compulsory HBM traffic: each tensor read or written once (tile
        re-reads are assumed to hit L2).
    """
    from mpo_core.kernels.mpo_matmul import padded_small_shape

    _check_cost_args(tokens, in_shape, out_shape, ranks, dtype_bytes)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation: expected one of {ACTIVATIONS}, got {activation!r}")
    m, b = tokens, dtype_bytes
    n_modes = len(in_shape)
    k_dim, n_dim = math.prod(in_shape), math.prod(out_shape)
    small_left = choose_split(in_shape, out_shape, ranks)
    end = 0 if small_left else n_modes - 1
    d, i_s, j_s = ranks[1] if small_left else ranks[n_modes - 1], in_shape[end], out_shape[end]
    ib, jb = k_dim // i_s, n_dim // j_s
    fwd_pad, bwd_pad = padded_small_shape(d, i_s, j_s), padded_small_shape(d, j_s, i_s)
    core_elems = sum(ranks[k] * in_shape[k] * out_shape[k] * ranks[k + 1] for k in range(n_modes))
    factor_elems = ib * jb * d + d * i_s * j_s
    big = range(1, n_modes) if small_left else range(0, n_modes - 1)
    pre_flops = _chain_flops([(ranks[k], in_shape[k], out_shape[k], ranks[k + 1]) for k in big])
    useful = 2 * m * k_dim * n_dim
    row_blocks = math.ceil(m / block_m)

    def kernel_tensor_flops(padded, rows_big, cols_big):  # padded GEMM, on-chip rebuild
        dp, rp, cp = padded
        kp, np_ = rows_big * rp, cols_big * cp
        return 2 * m * kp * np_, 2 * dp * kp * np_ * row_blocks

    epilogue = m * n_dim * ((1 if bias else 0) + (8 if activation else 0))
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
    out = dict(bond=d, small_left=small_left, padded=fwd_pad, factor_elems=factor_elems, flops_useful=useful, flops_precontract=pre_flops,
               flops_epilogue=epilogue, flops_dense_fwd=useful, flops_dense_bwd=2 * useful,
               supported=fwd_pad is not None and bwd_pad is not None)
    if not out["supported"]:
        return dict(out, flops=math.inf, bytes=math.inf, flops_bwd=math.inf, bytes_bwd=math.inf)
    gemm, rebuild = kernel_tensor_flops(fwd_pad, ib, jb)
    dx_gemm, dx_rebuild = kernel_tensor_flops(bwd_pad, jb, ib)
    low_precision = dtype_bytes < 4
    bwd_tensor = dx_gemm + dx_rebuild + useful + 4 * d * k_dim * n_dim + (2 * pre_flops if low_precision else 0)
    bwd_flops = dx_gemm + dx_rebuild + useful + 4 * d * k_dim * n_dim + 2 * pre_flops \
        + (m * n_dim if bias else 0) + (8 * m * n_dim if activation else 0)
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


# ----------------------------------------------------------------------------- custom op
@torch.library.custom_op("mpo_core::mpo_kron_linear", mutates_args=())
def _kron_linear_op(
    x: torch.Tensor, left: torch.Tensor, right: torch.Tensor, bias: Optional[torch.Tensor],
    activation: str, store_pre: bool, small_left: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    from mpo_core.kernels.mpo_matmul import mpo_matmul

    return mpo_matmul(x, left, right, bias, activation, store_pre, small_left)


@_kron_linear_op.register_fake
def _(x, left, right, bias, activation, store_pre, small_left):
    n = left.shape[2] * right.shape[2]
    y = x.new_empty((x.shape[0], n))
    return y, x.new_empty((x.shape[0], n) if store_pre else (0,))


def _setup_context(ctx, inputs, output):
    x, left, right, bias, activation, store_pre, small_left = inputs
    ctx.small_left = small_left
    ctx.activation = activation
    ctx.store_pre = store_pre
    ctx.has_bias = bias is not None
    ctx.save_for_backward(x, left, right, bias, output[1])


def _backward(ctx, grad_y, grad_pre):
    x, left, right, bias, pre = ctx.saved_tensors
    g = grad_y
    if ctx.activation != "none":
        if not ctx.store_pre:  # the caller chose not to keep it: recompute (one extra forward GEMM)
            pre = _kron_linear_op(x, left, right, bias, "none", False, ctx.small_left)[0]
        approximate = "tanh" if ctx.activation == "gelu_tanh" else "none"
        g = torch.ops.aten.gelu_backward(grad_y, pre, approximate=approximate)
    if ctx.store_pre and grad_pre is not None:
        g = g + grad_pre
    need_x, need_left, need_right, need_bias = ctx.needs_input_grad[:4]
    dx = dleft = dright = dbias = None
    if need_x:
        dx = _kron_linear_op(g, left.transpose(1, 2), right.transpose(1, 2), None, "none", False, ctx.small_left)[0]
    if need_left or need_right:
        _, il, jl = left.shape
        _, ir, jr = right.shape
        dw = (x.t() @ g).view(il, ir, jl, jr)
        if need_left:
            dleft = torch.einsum("aibj,sij->sab", dw, right)
        if need_right:
            dright = torch.einsum("aibj,sab->sij", dw, left)
    if need_bias and ctx.has_bias:
        dbias = g.sum(0)
    return dx, dleft, dright, dbias, None, None, None


_kron_linear_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------- dispatch
def _cuda_triton_ok(x: torch.Tensor) -> bool:
    """Whether ``backend=None`` picks the Triton kernel: ``x`` on CUDA where ``tl.dot`` kernels run
    (:func:`mpo_core.ops._dispatch.triton_supported`: compute capability >= 8.0)."""
    return x.is_cuda and _dispatch.triton_supported(x.device, uses_dot=True)


def _check_triton_forced(x: torch.Tensor) -> None:
    if _cuda_triton_ok(x):
        return
    reason = None
    if x.is_cuda:
        reason = (f"device {x.device} has compute capability {_dispatch.device_capability(x.device)}; "
                  f"tl.dot needs >= {_dispatch.TRITON_DOT_MIN_CAPABILITY} (use backend='torch')")
    elif x.device.type != "cpu":
        reason = f"x is on {x.device}, which Triton does not support here"
    else:
        try:
            from mpo_core.kernels import mpo_matmul as kernel_module
        except ImportError as exc:
            reason = f"Triton cannot be imported ({exc})"
        else:
            if not kernel_module.INTERPRETED:
                reason = ("x is on the CPU and the kernel was not built for Triton's interpreter: set "
                          "TRITON_INTERPRET=1 before mpo_core.kernels.mpo_matmul is first imported")
    if reason is not None:
        raise RuntimeError(f"backend='triton' requested but unavailable: {reason}")


def mpo_linear(
    x: torch.Tensor,
    cores: Sequence[torch.Tensor],
    bias: torch.Tensor | None = None,
    activation: str | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """``act(x @ W + bias)`` with ``W`` given as MPO cores, fused on GPU.

    Parameters
    ----------
    x : Tensor
        ``(..., prod(in_shape))``, float32/float16/bfloat16 (the kernel accumulates in
        fp32); float64 runs the reference.
    cores : sequence of Tensor
        ``n >= 2`` MPO cores ``(d_{k-1}, in_k, out_k, d_k)`` with ``d_0 = d_n = 1``, in
        ``x``'s dtype and device; ``W[(i1..in), (j1..jn)] = T1[0,i1,j1,:] @ ... @ Tn[:,in,jn,0]``
        (C order, rows are input modes, so this is ``MPOLinear``'s ``weight.T``).
    bias : Tensor, optional
        ``(prod(out_shape),)``.
    activation : {None, "gelu", "gelu_tanh"}
        Epilogue: exact (erf) GELU or its tanh approximation.
    backend : {None, "torch", "triton"}
        ``None``: the Triton kernel when ``x`` is fp32/fp16/bf16 on a CUDA GPU of
        compute capability >= 8.0, else the torch reference. ``"torch"``: the reference. ``"triton"``: the
        kernel (on CPU only under ``TRITON_INTERPRET=1``); raises ``RuntimeError`` if
        it cannot run.

    Returns
    -------
    Tensor
        ``(..., prod(out_shape))`` in ``x.dtype``; differentiable w.r.t. ``x``, every
        core and ``bias``.

    Raises
    ------
    TypeError
        Non-tensor arguments, unsupported dtype (float64 with ``backend="triton"``), or
        dtypes that differ from ``x.dtype``.
    ValueError
        Cores that do not chain, ``x.shape[-1] != prod(in_shape)``, bad bias shape,
        unknown activation or backend.
    RuntimeError
        ``backend="triton"`` where the kernel cannot run.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend: expected one of {BACKENDS}, got {backend!r}")
    cores, in_shape, out_shape = _validate(x, cores, bias, activation)
    ranks = [1] + [int(c.shape[3]) for c in cores]
    if backend is None:
        backend = "triton" if x.dtype in _KERNEL_DTYPES and _cuda_triton_ok(x) else "torch"
        if backend == "triton" and choose_split(in_shape, out_shape, ranks) is None:
            backend = "torch"
    if backend == "torch":
        return mpo_linear_reference(x, cores, bias, activation)
    if x.dtype not in _KERNEL_DTYPES:
        raise TypeError(f"x: backend='triton' takes float32, float16 or bfloat16, got {x.dtype}")
    _check_triton_forced(x)
    small_left = choose_split(in_shape, out_shape, ranks)
    if small_left is None:
        raise ValueError(
            f"cores: backend='triton' needs an end core (d, i, j) whose padded size fits the kernel "
            f"(mpo_core.kernels.mpo_matmul.padded_small_shape, both ways); first {tuple(cores[0].shape[1:])}, "
            f"last {tuple(cores[-1].shape[:3])}; use backend='torch'"
        )
    # The big factor is pre-contracted in the compute dtype (tensor cores, fp32 accumulation),
    # as the dense path's rebuild of W would be.
    if small_left:
        left, right = cores[0][0].permute(2, 0, 1), _contract(cores[1:])[..., 0]
    else:
        left, right = _contract(cores[:-1])[0].permute(2, 0, 1), cores[-1][..., 0]
    x2d = x.reshape(-1, x.shape[-1])
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(c.requires_grad for c in cores) or (bias is not None and bias.requires_grad)
    )
    y, _ = _kron_linear_op(x2d, left, right, bias, activation or "none", activation is not None and needs_grad,
                           small_left)
    return y.reshape(*x.shape[:-1], y.shape[-1])
