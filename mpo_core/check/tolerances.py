"""The check's dtypes and tolerances: per op and returned tensor, in ULPs of the dtype, each entry
with its reasoning (:data:`ROUNDINGS`, :data:`MPO_ROUNDINGS`; :func:`tolerance` turns them into a bound)."""
from __future__ import annotations

import torch

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
NORM_OPS = ("layer_norm", "residual_layer_norm", "residual_dropout_layer_norm")

ULP = {torch.float32: 2.0**-23, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
"""Spacing of the dtype at 1 (one unit in the last place): a result computed in float32 and
converted once to the dtype is off by at most 1/2 ULP relative (round to nearest, as on a GPU)
and by at most 1 ULP when the conversion truncates (Triton's CPU interpreter: measured 0.7 ULP)."""

FP32_FLOOR = 2e-5
"""Least tolerance of every row: the kernels compute in float32 (reductions over up to 16384
rows or 4096 columns, and their own erf/exp/rsqrt), the reference in float64; measured
< 2.1e-7 on the CPU subset, the floor leaves room for the larger GPU sizes."""

ROUNDINGS: dict[tuple[str, str], float] = {
    # Relative error, in ULPs of the dtype, of each tensor a fused op returns (inputs exactly in
    # the dtype, the reference in float64 on those inputs), x2 for the float32 arithmetic between
    # the roundings. Measured on the CPU subset in bf16 / fp16 (ULP units): in the comments.
    ("*", "y"): 2.0,          # fp32 math, one conversion of y: <= 1 ULP (max seen 0.73)
    ("bias_gelu", "dx"): 2.0,  # dy * gelu'(x + b) in fp32, one conversion (0.89)
    ("layer_norm", "dx"): 2.0,  # h is x itself (exact); xhat recomputed in fp32; one conversion (0.85)
    # residual variants: h = x + r is stored in the dtype (one rounding, relative to |h|) and the
    # backward's xhat is recomputed from it, then dx is converted once: 2 roundings (0.64)
    ("residual_layer_norm", "dx"): 4.0, ("residual_layer_norm", "dresidual"): 4.0,
    ("residual_dropout_layer_norm", "dx"): 4.0, ("residual_dropout_layer_norm", "dresidual"): 4.0,
    # dweight / dbias: per-row terms from the rounded h (errors of random sign: their sum over the
    # rows stays ~1 rounding relative to the sum), fp32 partial sums, one conversion: 2 roundings (0.86)
    ("*", "dweight"): 4.0, ("*", "dbias"): 4.0,
}
"""ULPs of the dtype allowed per (op, returned tensor); :func:`tolerance` turns them into a bound."""

MPO_ROUNDINGS = {"y": 4.0, "dx": 8.0}
"""ULPs allowed for the fused MPO linear. ``y``: the big factor is pre-contracted in the dtype
(1 rounding per entry), the on-chip ``W`` tile is converted to the dtype for ``tl.dot`` (1 more);
the fp32 accumulation over ``K`` products carries those entry errors with random signs (about
one rounding of ``y`` each, relative to ``max |y|``); the epilogue's store (1 more): 3 roundings,
and 1 for the float32 epilogue (bias, GELU). ``dx``: the same chain transposed, from the stored
pre-activation (itself rounded once) through GELU's derivative: x2."""
MPO_FP32_FLOOR = 1e-4
"""float32 ``tl.dot`` is run with ``input_precision="ieee"``; K = 3072 fp32 products in blocks."""


def tolerance(op: str, what: str, dtype: torch.dtype) -> float:
    """Tolerance of ``rel_err`` for tensor ``what`` (``"y"``, ``"dx"``, ...) of ``op`` in ``dtype``.

    ``max(FP32_FLOOR, ROUNDINGS[op, what] * ULP[dtype])`` (``MPO_ROUNDINGS`` and
    ``MPO_FP32_FLOOR`` for ``op == "mpo_linear"``); each entry's reasoning is in the table.
    """
    if dtype not in ULP:
        raise ValueError(f"dtype must be one of {sorted(map(str, ULP))}, got {dtype}")
    if op == "mpo_linear":
        if what not in MPO_ROUNDINGS:
            raise ValueError(f"what must be one of {sorted(MPO_ROUNDINGS)} for mpo_linear, got {what!r}")
        return max(MPO_FP32_FLOOR, MPO_ROUNDINGS[what] * ULP[dtype])
    k = ROUNDINGS.get((op, what), ROUNDINGS.get(("*", what)))
    if k is None:
        raise ValueError(f"no tolerance for {what!r} of {op!r}")
    return max(FP32_FLOOR, k * ULP[dtype])
