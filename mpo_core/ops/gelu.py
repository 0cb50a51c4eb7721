"""Bias + GELU: autograd op, ``torch.library`` op, dispatch.

Same structure as :mod:`mpo_core.ops.norm`: a direct ``torch.autograd.Function`` in
eager mode, the custom ops ``mpo_core::bias_gelu_fwd`` / ``_bwd`` under
``torch.compile``, both over the same forward/backward implementations; the torch
backend is :func:`mpo_core.ops.reference.bias_gelu` with torch's autograd.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from mpo_core._backends import extension
from mpo_core.activation import GELUS, check_activation, gelu_approximate
from mpo_core.ops import reference
from mpo_core.ops._checks import check_input, check_like
from mpo_core.ops.dispatch import resolve_backend

Tensor = torch.Tensor


def _ext_bias(bias: Tensor | None, x: Tensor) -> Tensor:
    """The extension always takes a bias: zeros stand in for none."""
    return bias if bias is not None else x.new_zeros(x.shape[1])


def _forward(x: Tensor, bias: Tensor | None, approximate: str, backend: str) -> Tensor:
    """``gelu(x + bias)`` on 2-D contiguous ``x`` with the Triton kernel or the CUDA extension."""
    if backend == "triton":
        from mpo_core.kernels.bias_gelu import bias_gelu_fwd

        return bias_gelu_fwd(x, bias, approximate)
    return extension().bias_gelu_forward(x, _ext_bias(bias, x), approximate)


def _backward(dy: Tensor, x: Tensor, bias: Tensor | None, approximate: str, backend: str) -> tuple[Tensor, Tensor]:
    """``(dx, dbias)``; ``dbias`` is empty without bias."""
    if backend == "triton":
        from mpo_core.kernels.bias_gelu import bias_gelu_bwd

        dx, db = bias_gelu_bwd(dy, x, bias, approximate)
    else:
        dx, db = extension().bias_gelu_backward(dy, x, _ext_bias(bias, x), approximate)
    return dx, (db if bias is not None else x.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    x, bias, approximate, backend = inputs
    ctx.save_for_backward(x, bias)
    ctx.config = (approximate, backend)


def _autograd_backward(backward: Callable[..., tuple[Tensor, Tensor]]) -> Callable:
    """The autograd backward of the forward op, running the gradient kernel through ``backward``."""

    def run(ctx, dy: Tensor) -> tuple:
        x, bias = ctx.saved_tensors
        approximate, backend = ctx.config
        dx, db = backward(dy.contiguous(), x, bias, approximate, backend)
        return dx, (db if bias is not None else None), None, None

    return run


class _BiasGelu(torch.autograd.Function):
    """Eager path: the kernels called directly, without the ``torch.library`` boundary."""

    @staticmethod
    def forward(x, bias, approximate, backend):
        return _forward(x, bias, approximate, backend)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_autograd_backward(_backward))


@torch.library.custom_op("mpo_core::bias_gelu_fwd", mutates_args=())
def bias_gelu_fwd_op(x: Tensor, bias: Optional[Tensor], approximate: str, backend: str) -> Tensor:
    """``torch.library`` forward op on 2-D contiguous ``x``."""
    return _forward(x, bias, approximate, backend)


@bias_gelu_fwd_op.register_fake
def _(x, bias, approximate, backend):
    return torch.empty_like(x)


@torch.library.custom_op("mpo_core::bias_gelu_bwd", mutates_args=())
def bias_gelu_bwd_op(dy: Tensor, x: Tensor, bias: Optional[Tensor], approximate: str,
                     backend: str) -> tuple[Tensor, Tensor]:
    """``torch.library`` backward op: ``(dx, dbias or empty)``."""
    return _backward(dy, x, bias, approximate, backend)


@bias_gelu_bwd_op.register_fake
def _(dy, x, bias, approximate, backend):
    return torch.empty_like(x), (torch.empty_like(bias) if bias is not None else x.new_empty(0))


bias_gelu_fwd_op.register_autograd(_autograd_backward(bias_gelu_bwd_op), setup_context=_setup_context)


def bias_gelu(x: Tensor, bias: Tensor | None = None, activation: str = "gelu", backend: str | None = None) -> Tensor:
    """``gelu(x + bias)``, fused (one read and one write per element).

    Parameters
    ----------
    x : torch.Tensor
        Input ``(..., N)``, float32/float16/bfloat16 (float64 on the torch backend).
    bias : torch.Tensor or None
        Shape ``(N,)``, added before the GELU.
    activation : {"gelu", "gelu_tanh"}
        The exact erf GELU, or its tanh approximation (:mod:`mpo_core.activation`).
    backend : {None, "torch", "triton", "cuda"}
        ``None`` picks by device and availability (:func:`mpo_core.ops.dispatch.resolve_backend`).

    Returns
    -------
    torch.Tensor
        Same shape and dtype as ``x``; computed in float32 (float64 for float64).
    """
    x = check_input("x", x)
    bias = check_like("bias", bias, x, (x.shape[-1],))
    approximate = gelu_approximate(check_activation(activation, GELUS))
    chosen = resolve_backend("bias_gelu", x, backend)
    if chosen == "torch":
        return reference.bias_gelu(x, bias, activation)
    args = (x.reshape(-1, x.shape[-1]).contiguous(), None if bias is None else bias.contiguous(), approximate, chosen)
    y = bias_gelu_fwd_op(*args) if torch.compiler.is_compiling() else _BiasGelu.apply(*args)
    return y.view(x.shape)
