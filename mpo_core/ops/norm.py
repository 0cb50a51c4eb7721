"""LayerNorm and residual-add + dropout + LayerNorm: autograd op, ``torch.library`` op, dispatch.

Both public functions run one op, ``y = LN(x + dropout(residual, p))`` (``layer_norm``
is the case without residual). Non-torch backends are reached two ways that share the
forward/backward implementations and the autograd wiring below:

* eager: a direct ``torch.autograd.Function`` (no ``torch.library`` dispatch, which
  costs tens of microseconds per call);
* under ``torch.compile``: the custom ops ``mpo_core::residual_layer_norm_fwd`` /
  ``_bwd`` (``torch.library.custom_op`` with ``register_fake`` and
  ``register_autograd``), so the graph is traced through without a break.

The forward op returns ``(y, h, mean, rstd)``: ``h = x + dropout(residual)`` (an empty
tensor without residual; the input ``x`` is then saved instead) and the fp32 row
statistics; only ``y`` is differentiable. The dropout mask is never stored: the
backward recomputes it from ``seed``. The torch backend is the reference of
:mod:`mpo_core.ops.reference` with torch's own autograd.
"""
from __future__ import annotations

from typing import Callable, Optional

import torch

from mpo_core._backends import extension
from mpo_core.ops import reference
from mpo_core.ops._checks import check_eps, check_input, check_like, check_probability
from mpo_core.ops.dispatch import resolve_backend

Tensor = torch.Tensor


def _ext_weight(weight: Tensor | None, bias: Tensor | None, n: int) -> Tensor | None:
    """The extension takes no bias without weight: give it unit weight then."""
    if weight is None and bias is not None:
        return torch.ones(n, dtype=bias.dtype, device=bias.device)
    return weight


def _forward(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float,
             dropout_p: float, seed: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Run the forward on 2-D contiguous inputs; returns ``(y, h or empty, mean, rstd)``."""
    if backend == "triton":
        if residual is None:
            from mpo_core.kernels.layer_norm import layer_norm_fwd

            y, mean, rstd = layer_norm_fwd(x, weight, bias, eps)
            return y, x.new_empty(0), mean, rstd
        from mpo_core.kernels.residual_layer_norm import residual_layer_norm_fwd

        return residual_layer_norm_fwd(x, residual, weight, bias, eps, dropout_p, seed)
    ext = extension()
    w = _ext_weight(weight, bias, x.shape[1])
    if dropout_p > 0:
        y, h, mean, rstd = ext.residual_dropout_layernorm_forward(x, residual, w, bias, dropout_p, seed, 0, eps)
    else:
        y, h, mean, rstd = ext.residual_layernorm_forward(x, residual, w, bias, eps)
    return y, (h if residual is not None else x.new_empty(0)), mean, rstd


def _backward(dy: Tensor, h: Tensor, weight: Tensor | None, bias: Tensor | None, mean: Tensor, rstd: Tensor,
              dropout_p: float, seed: int, backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Gradients ``(dh, dresidual, dweight, dbias)``; absent ones (no dropout/weight/bias) are empty."""
    if backend == "triton":
        from mpo_core.kernels.layer_norm import layer_norm_bwd

        dr = torch.empty_like(h) if dropout_p > 0 else None
        dh, dw, db = layer_norm_bwd(dy, h, weight, bias, mean, rstd, dr=dr, p=dropout_p, seed=seed)
    else:
        ext = extension()
        w = _ext_weight(weight, bias, h.shape[1])
        if dropout_p > 0:
            dh, dr, dw, db = ext.residual_dropout_layernorm_backward(dy, h, w, mean, rstd, dropout_p, seed, 0)
        else:
            dr = None
            dh, dw, db = ext.residual_layernorm_backward(dy, h, w, mean, rstd)
    # each absent gradient is its own empty tensor: op outputs must not alias each other
    return (dh, h.new_empty(0) if dr is None else dr, dw if weight is not None else h.new_empty(0),
            db if bias is not None else h.new_empty(0))


def _setup_context(ctx, inputs, output) -> None:
    x, residual, weight, bias, _eps, dropout_p, seed, backend = inputs
    _y, h, mean, rstd = output
    ctx.mark_non_differentiable(h, mean, rstd)
    ctx.save_for_backward(x if residual is None else h, weight, bias, mean, rstd)
    ctx.config = (residual is not None, dropout_p, seed, backend)


def _autograd_backward(backward: Callable[..., tuple[Tensor, Tensor, Tensor, Tensor]]) -> Callable:
    """The autograd backward of the forward op, running the gradient kernels through ``backward``."""

    def run(ctx, dy: Tensor, _dh: Tensor, _dmean: Tensor, _drstd: Tensor) -> tuple:
        h, weight, bias, mean, rstd = ctx.saved_tensors
        has_residual, dropout_p, seed, backend = ctx.config
        dh, dr, dw, db = backward(dy.contiguous(), h, weight, bias, mean, rstd, dropout_p, seed, backend)
        dresidual = (dr if dropout_p > 0 else dh) if has_residual else None
        return (dh, dresidual, dw if weight is not None else None, db if bias is not None else None,
                None, None, None, None)

    return run


class _ResidualLayerNorm(torch.autograd.Function):
    """Eager path: the kernels called directly, without the ``torch.library`` boundary."""

    @staticmethod
    def forward(x, residual, weight, bias, eps, dropout_p, seed, backend):
        return _forward(x, residual, weight, bias, eps, dropout_p, seed, backend)

    setup_context = staticmethod(_setup_context)
    backward = staticmethod(_autograd_backward(_backward))


@torch.library.custom_op("mpo_core::residual_layer_norm_fwd", mutates_args=())
def residual_layer_norm_fwd_op(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                               bias: Optional[Tensor], eps: float, dropout_p: float, seed: int,
                               backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``torch.library`` forward op on 2-D contiguous inputs: ``(y, h or empty, mean, rstd)``."""
    return _forward(x, residual, weight, bias, eps, dropout_p, seed, backend)


@residual_layer_norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps, dropout_p, seed, backend):
    stats = reference.accumulation_dtype(x.dtype)
    h = torch.empty_like(x) if residual is not None else x.new_empty(0)
    return torch.empty_like(x), h, x.new_empty(x.shape[0], dtype=stats), x.new_empty(x.shape[0], dtype=stats)


@torch.library.custom_op("mpo_core::residual_layer_norm_bwd", mutates_args=())
def residual_layer_norm_bwd_op(dy: Tensor, h: Tensor, weight: Optional[Tensor], bias: Optional[Tensor],
                               mean: Tensor, rstd: Tensor, dropout_p: float, seed: int,
                               backend: str) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """``torch.library`` backward op: ``(dh, dresidual or empty, dweight or empty, dbias or empty)``."""
    return _backward(dy, h, weight, bias, mean, rstd, dropout_p, seed, backend)


@residual_layer_norm_bwd_op.register_fake
def _(dy, h, weight, bias, mean, rstd, dropout_p, seed, backend):
    return (torch.empty_like(h), torch.empty_like(h) if dropout_p > 0 else h.new_empty(0),
            torch.empty_like(weight) if weight is not None else h.new_empty(0),
            torch.empty_like(bias) if bias is not None else h.new_empty(0))


residual_layer_norm_fwd_op.register_autograd(_autograd_backward(residual_layer_norm_bwd_op),
                                             setup_context=_setup_context)


def draw_seed(generator: torch.Generator | None) -> int:
    """A dropout seed in ``[0, 2**31 - 1)`` from ``generator`` (torch's default generator when ``None``)."""
    device = generator.device if generator is not None else "cpu"
    return int(torch.randint(0, 2**31 - 1, (), generator=generator, device=device))


def _run(x: Tensor, residual: Tensor | None, weight: Tensor | None, bias: Tensor | None, eps: float,
         dropout_p: float, seed: int | None, generator: torch.Generator | None, backend: str | None) -> Tensor:
    """Shared body of the public functions (arguments already checked)."""
    op = "layer_norm" if residual is None else ("residual_dropout_layer_norm" if dropout_p > 0 else
                                                "residual_layer_norm")
    chosen = resolve_backend(op, x, backend)
    if chosen == "torch":
        keep = None
        if dropout_p > 0:
            gen = torch.Generator(device=x.device).manual_seed(seed) if seed is not None else generator
            keep = torch.rand(residual.shape, generator=gen, device=x.device) >= dropout_p
        return reference.residual_layer_norm(x, residual, weight, bias, eps, keep, dropout_p)
    if dropout_p > 0 and seed is None:
        seed = draw_seed(generator)
    n = x.shape[-1]
    args = (x.reshape(-1, n).contiguous(), None if residual is None else residual.reshape(-1, n).contiguous(),
            None if weight is None else weight.contiguous(), None if bias is None else bias.contiguous(),
            eps, dropout_p, seed if dropout_p > 0 else 0, chosen)
    if torch.compiler.is_compiling():
        y = residual_layer_norm_fwd_op(*args)[0]
    else:
        y = _ResidualLayerNorm.apply(*args)[0]
    return y.view(x.shape)


def layer_norm(x: Tensor, weight: Tensor | None = None, bias: Tensor | None = None, eps: float = 1e-5,
               backend: str | None = None) -> Tensor:
    """LayerNorm over the last dim, fused (one read, one write per element).

    Parameters
    ----------
    x : torch.Tensor
        Input ``(..., N)``, float32/float16/bfloat16 (float64 on the torch and cpp backends).
    weight, bias : torch.Tensor or None
        Affine parameters of shape ``(N,)``; ``None`` leaves that part out.
    eps : float
        Added to the variance.
    backend : {None, "torch", "triton", "cuda", "cpp"}
        ``None`` picks by device and availability (:func:`mpo_core.ops.dispatch.resolve_backend`).

    Returns
    -------
    torch.Tensor
        Same shape and dtype as ``x``. Statistics are computed in float32 (float64 for float64).
    """
    x = check_input("x", x)
    n = x.shape[-1]
    return _run(x, None, check_like("weight", weight, x, (n,)), check_like("bias", bias, x, (n,)),
                check_eps(eps), 0.0, None, None, backend)


def residual_layer_norm(x: Tensor, residual: Tensor, weight: Tensor | None = None, bias: Tensor | None = None,
                        eps: float = 1e-5, dropout_p: float = 0.0, training: bool = True, seed: int | None = None,
                        generator: torch.Generator | None = None, backend: str | None = None) -> Tensor:
    """``LayerNorm(x + dropout(residual, dropout_p))`` over the last dim, fused.

    Parameters
    ----------
    x : torch.Tensor
        Input ``(..., N)``, float32/float16/bfloat16 (float64 on the torch and cpp backends).
    residual : torch.Tensor
        Same shape and dtype as ``x``; dropout applies to it (BERT: the sublayer output).
    weight, bias : torch.Tensor or None
        Affine parameters of shape ``(N,)``.
    eps : float
        Added to the variance.
    dropout_p : float
        Drop probability in ``[0, 1]``; kept elements are scaled by ``1 / (1 - dropout_p)``.
        ``0`` (or ``training=False``) is exactly residual add + LayerNorm.
    training : bool
        Dropout only applies when ``True``.
    seed : int or None
        Dropout seed in ``[0, 2**31 - 1)``: the same seed gives the same mask on a given
        backend (the torch, Triton and CUDA backends draw different streams). ``None``
        draws one from ``generator``.
    generator : torch.Generator or None
        Source of the seed (torch backend: of the mask); ``None`` is torch's default.
    backend : {None, "torch", "triton", "cuda", "cpp"}
        ``None`` picks by device and availability; ``"cpp"`` has no dropout.

    Returns
    -------
    torch.Tensor
        Same shape and dtype as ``x``.
    """
    x = check_input("x", x)
    n = x.shape[-1]
    residual = check_like("residual", residual, x, tuple(x.shape))
    if residual is None:
        raise TypeError("residual must be a torch.Tensor, got None (use layer_norm without a residual)")
    if residual.dtype != x.dtype:
        raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype}")
    p = check_probability("dropout_p", dropout_p)
    if not training:
        p = 0.0
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**31 - 1):
        raise ValueError(f"seed must be None or an int in [0, 2**31 - 1), got {seed!r}")
    return _run(x, residual, check_like("weight", weight, x, (n,)), check_like("bias", bias, x, (n,)),
                check_eps(eps), p, seed, generator, backend)
