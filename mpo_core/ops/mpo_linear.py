"""Fused MPO linear layer ``act(x @ W + b)``: autograd op, torch reference, dispatch (its cost model: :mod:`mpo_core.cost.fused`).

``W`` (``prod(in_shape) x prod(out_shape)``, rows are input modes, C order) is given
as MPO cores ``T_k`` of shape ``(d_{k-1}, i_k, j_k, d_k)``; see docs/architecture.md.

Paths
-----
* **reference** (:func:`mpo_linear_reference`): rebuild the dense ``W`` with torch,
  ``F.linear``, activation. The one reference every test compares against; also the
  path on CPU and on GPUs below compute capability 8.0.
* **triton** (``backend="triton"``): cut the MPO at its first or last bond
  (:func:`mpo_core.cost.choose_split`): one end core is the small factor each program keeps on
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
:func:`mpo_core.cost.mpo_linear_cost` gives the numbers.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import Optional

import torch
import torch.nn.functional as F

from mpo_core.activation import apply_activation, check_activation, epilogue_name, gelu_approximate
from mpo_core.cost import choose_split
from mpo_core.mpo import validate_linear_inputs
from mpo_core.ops.dispatch import BackendUnavailableError, resolve_backend
from mpo_core.rebuild import dense_matrix, left_to_right, rebuild

BACKENDS = (None, "torch", "triton")
"""What ``backend=`` accepts (the CUDA/C++ extension has no MPO linear)."""


def _check(x: torch.Tensor, cores: Sequence[torch.Tensor], bias: torch.Tensor | None,
           activation: str | None) -> list[torch.Tensor]:
    cores = validate_linear_inputs(x, cores, bias)
    if len(cores) < 2:
        raise ValueError(f"cores must hold at least 2 cores (a 1-core MPO is a dense matrix), got {len(cores)}")
    check_activation(activation)
    return cores


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
    cores = _check(x, cores, bias, activation)
    return apply_activation(F.linear(x, dense_matrix(cores).t(), bias), activation)


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
        g = torch.ops.aten.gelu_backward(grad_y, pre, approximate=gelu_approximate(ctx.activation))
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
        ``None``: the Triton kernel where :func:`mpo_core.ops.dispatch.resolve_backend` picks it
        (fp32/fp16/bf16 on a CUDA GPU of compute capability >= 8.0) and an end core fits it, else
        the torch reference. ``"torch"``: the reference. ``"triton"``: the kernel (on CPU only
        under ``TRITON_INTERPRET=1``).

    Returns
    -------
    Tensor
        ``(..., prod(out_shape))`` in ``x.dtype``; differentiable w.r.t. ``x``, every
        core and ``bias``.

    Raises
    ------
    TypeError
        Non-tensor arguments, a non-floating ``x``, or dtypes that differ from the cores'.
    ValueError
        Cores that do not chain, ``x.shape[-1] != prod(in_shape)``, bad bias shape,
        unknown activation or backend.
    BackendUnavailableError
        ``backend="triton"`` where the kernel cannot run (device, dtype, installation, or
        no end core that fits it); the message says why.
    """
    if backend not in BACKENDS:
        raise ValueError(f"backend must be None or one of {BACKENDS[1:]}, got {backend!r}")
    cores = _check(x, cores, bias, activation)
    in_shape = tuple(int(c.shape[1]) for c in cores)
    out_shape = tuple(int(c.shape[2]) for c in cores)
    ranks = [1] + [int(c.shape[3]) for c in cores]
    chosen = resolve_backend("mpo_linear", x, backend)
    small_left = choose_split(in_shape, out_shape, ranks) if chosen == "triton" else None
    if chosen == "triton" and small_left is None:
        if backend is not None:
            raise BackendUnavailableError(
                f"backend 'triton' cannot run mpo_linear here: no end core (d, i, j) whose padded size fits the kernel "
                f"(mpo_core.kernels.tiles.padded_small_shape, both ways); first {tuple(cores[0].shape[1:])}, "
                f"last {tuple(cores[-1].shape[:3])}; use backend='torch'"
            )
        chosen = "torch"
    if chosen == "torch":
        return mpo_linear_reference(x, cores, bias, activation)
    # The big factor is pre-contracted in the compute dtype (tensor cores, fp32 accumulation), left to
    # right as mpo_core.cost prices it.
    if small_left:
        left, right = cores[0][0].permute(2, 0, 1), rebuild(cores[1:], left_to_right(len(cores) - 1))[..., 0]
    else:
        left, right = rebuild(cores[:-1], left_to_right(len(cores) - 1))[0].permute(2, 0, 1), cores[-1][..., 0]
    x2d = x.reshape(-1, x.shape[-1])
    needs_grad = torch.is_grad_enabled() and (
        x.requires_grad or any(c.requires_grad for c in cores) or (bias is not None and bias.requires_grad)
    )
    y, _ = _kron_linear_op(x2d, left, right, bias, epilogue_name(activation), activation is not None and needs_grad,
                           small_left)
    return y.reshape(*x.shape[:-1], y.shape[-1])
