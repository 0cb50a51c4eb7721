"""Acceptance check: run it first on any machine. ``python -m mpo_core.check [--tiny] [--json PATH]``

Runs every kernel this machine can run against its torch reference and prints a verdict
table (pass/fail, max error vs tolerance, and on a GPU the measured time beside the
roofline model of that GPU), writes it as JSON, and exits non-zero on any failure.

* **Fused ops** (:mod:`mpo_core.ops`: LayerNorm, residual + LayerNorm, residual + dropout +
  LayerNorm, bias + GELU) on every backend available here (``triton``, ``cuda``, ``cpp``;
  :func:`mpo_core.ops.dispatch.why_unavailable` says why one is not), every dtype it takes,
  forward and backward (input and parameter gradients) against :mod:`mpo_core.ops.reference`
  run in float64 on the same inputs. On a GPU at BERT shapes: hidden 768/1024 (norms) and
  FFN 3072/4096 (bias + GELU), 512 to 16384 tokens.
* **Dropout**: the mask is the one the seed defines, regenerated apart from the kernels by the
  numpy Philox4x32-10 of :mod:`mpo_core.gpu.philox` (checked on Random123's known answers): the
  forward and every gradient equal the reference run with that mask, and the residual gradient
  is nonzero exactly where it keeps. The same seed gives the same output and gradients bit for
  bit, another seed another mask, the keep fraction is ``1 - p``.
* **Tolerances** are per op and returned tensor, in ULPs of the dtype (:data:`ROUNDINGS`, each
  entry with its reasoning; :func:`tolerance`).
* **Missing kernels**: on a GPU of compute capability >= 8.0 a missing Triton or CUDA extension
  is a failure with the command that fixes it (:func:`install_line`); a check that compared no
  kernel at all fails.
* **Fused MPO linear** (:mod:`mpo_core.ops.mpo_linear`, Triton) at *every* tile config the
  autotuner may pick (:func:`mpo_core.kernels.mpo_matmul.launch_configs`, each forced):
  inference forward, ``dx`` and the training forward (pre-activation stored), BERT
  768 -> 3072 and 3072 -> 768 on a GPU; below compute capability 8.0 (V100) it says so and
  checks the dense path ``mpo_linear`` takes there.
* **Benchmarks**: each one's quick mode (``--tiny``: its smoke run), when ``benchmarks/`` is
  next to the package (a repository checkout): it must exit 0 and write its JSON.

Without a GPU it runs the CPU subset (Triton under ``TRITON_INTERPRET=1``, set here by
re-running itself, and the C++ extension) at small sizes and lists what it could not check.
``--tiny`` shrinks every size further (CI runs it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path

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


DROPOUT_P = 0.1
DROPOUT_SEED = 1

# Each benchmark's quick run (GPU) and tiny run (CPU smoke, also tests/test_benchmarks.py); {json}: report path.
BENCHMARK_RUNS: dict[str, tuple[list[str], list[str]]] = {
    "contract_throughput": (["--quick", "--out", "{json}"],
                            ["--quick", "--tokens", "8", "--tntorch", "off", "--min-time", "0.001", "--out", "{json}"]),
    "cpp_residual_layernorm": (["--quick", "--json", "{json}"], ["--tiny", "--json", "{json}"]),
    "decompose_speed": (["--layers", "1", "--json", "{json}"], ["--layers", "1", "--max-bond", "8", "--json", "{json}"]),
    "fused_mpo_linear": (["--quick", "--json", "{json}"], ["--tiny", "--cpu-check", "--json", "{json}"]),
    "fused_ops": (["--quick", "--json", "{json}"], ["--tiny", "--json", "{json}"]),
    "gpu_model": (["--no-compile", "--json", "{json}"], ["--no-compile", "--json", "{json}"]),
    "lightweight_vs_lora": (
        ["--pretrain-steps", "50", "--epochs", "1", "--output", "{json}"],
        ["--hidden", "32", "--layers", "1", "--heads", "2", "--max-seq-len", "16", "--vocab-size", "200",
         "--pretrain-steps", "2", "--epochs", "1", "--batch", "8", "--lrs", "1e-3", "--output", "{json}"]),
    "methods_demo": (["--steps", "20", "--aux-steps", "10", "--output", "{json}"],
                     ["--steps", "2", "--aux-steps", "1", "--hidden", "32", "--layers", "1", "--intermediate", "64",
                      "--max-seq-len", "16", "--output", "{json}"]),
    "op_overhead": (["--quick", "--out", "{json}"], ["--quick", "--repeats", "1", "--min-time", "0.001", "--out", "{json}"]),
    "real_checkpoint": (
        ["--checkpoint", "random-tiny", "--limit", "64", "--budgets", "0.5", "--seeds", "0", "--peft-epochs", "1",
         "--finetune-epochs", "1", "--output", "{json}"],
        ["--checkpoint", "random-tiny", "--limit", "32", "--budgets", "0.5", "--seeds", "0", "--head-lrs", "1e-3",
         "--lora-lrs", "1e-3", "--mpo-lrs", "1e-3", "--full-lrs", "1e-4", "--opf-lrs", "1e-4", "--peft-epochs", "1", "--finetune-epochs", "1",
         "--compress-contenders", "svd uniform,svd-llm,mpo5 uniform,auto+calib", "--sections",
         "compress,peft,heal,convert", "--heal-steps", "2", "--heal-contenders", "svd,mpo5+calib",
         "--convert-contenders", "svd+calib", "--output", "{json}"]),
    "train_step": (["--presets", "tiny", "--repeats", "3", "--out", "{json}"],
                   ["--presets", "tiny", "--tokens", "64", "--seq", "32", "--k", "1",  # every contender
                    "--optimizers", "adamw", "--repeats", "1", "--out", "{json}"]),
}
#: Benchmarks whose tiny CPU run goes through Triton's interpreter; the others run without it
#: (under it, every op with a Triton backend would be interpreted: minutes instead of seconds).
INTERPRETED_TINY_RUNS = ("fused_mpo_linear",)


@dataclasses.dataclass
class Result:
    """One row of the verdict table."""

    check: str
    backend: str
    dtype: str
    shape: str
    what: str
    ok: bool
    error: float | None = None
    tol: float | None = None
    measured_us: float | None = None
    model_us: float | None = None
    note: str = ""


def rel_err(a: torch.Tensor, ref: torch.Tensor) -> float:
    """``max |a - ref| / max |ref|`` in float64 (NaN anywhere in ``a`` gives inf)."""
    a, ref = a.detach().double().cpu(), ref.detach().double().cpu()
    if not torch.isfinite(a).all():
        return math.inf
    return float((a - ref).abs().max() / ref.abs().max().clamp_min(1e-30)) if ref.numel() else 0.0


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


INSTALL_LINES = {
    "triton": "pip install triton (the version your torch wheel pins: pip show torch lists it)",
    "cuda": "put a CUDA toolkit's nvcc on PATH (or set CUDA_HOME) and rebuild: pip install -e . "
            "(README: Install without the set-up scripts)",
}
"""What to run when a backend a GPU of compute capability >= 8.0 must have is missing."""
KERNEL_MIN_CAPABILITY = (8, 0)
"""From this compute capability on, every Triton kernel (``tl.dot`` included) and the CUDA extension
must run: a missing one fails the check instead of being listed as not checked."""


def install_line(op: str, backend: str, dtype: torch.dtype, capability: tuple[int, int] | None) -> str | None:
    """The command that fixes ``backend`` not running ``op`` in ``dtype`` on a GPU of ``capability``, or
    ``None`` when its absence is not a failure there (no GPU, below cc 8.0, a dtype or op it does not take)."""
    if backend not in ("triton", "cuda", "cpp", "torch"):
        raise ValueError(f"backend must be one of triton, cuda, cpp, torch, got {backend!r}")
    if capability is None or tuple(capability) < KERNEL_MIN_CAPABILITY or dtype not in DTYPES:
        return None
    if backend == "triton" or (backend == "cuda" and op != "mpo_linear"):
        return INSTALL_LINES[backend]
    return None


class Checker:
    """Collects results; ``compare`` adds one row per tensor pair.

    ``gpu_name`` and ``capability`` describe the GPU the check judges for: read from the device
    when ``device`` is ``"cuda"``; given explicitly, they run the GPU policy (its roofline model,
    missing backends as failures) on any device, which is how CI executes it without a GPU.
    """

    def __init__(self, device: str, timed: bool, gpu_name: str | None = None,
                 capability: tuple[int, int] | None = None, warmup: int = 3, repeat: int = 10):
        if device not in ("cpu", "cuda"):
            raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
        if warmup < 0 or repeat < 1:
            raise ValueError(f"warmup must be >= 0 and repeat >= 1, got {warmup} and {repeat}")
        self.device, self.timed, self.warmup, self.repeat = device, timed, warmup, repeat
        self.results: list[Result] = []
        self.not_checked: list[str] = []
        from mpo_core.gpu.devices import model_for

        if device == "cuda":
            gpu_name = torch.cuda.get_device_name() if gpu_name is None else gpu_name
            capability = torch.cuda.get_device_capability() if capability is None else capability
        if (gpu_name is None) != (capability is None):
            raise ValueError("gpu_name and capability go together (both or neither)")
        self.gpu_name, self.capability = gpu_name, None if capability is None else tuple(capability)
        self.model_gpu = None if capability is None else model_for(gpu_name, self.capability)

    def unavailable(self, op: str, backend: str, dtype: torch.dtype, reason: str) -> None:
        """``backend`` cannot run ``op`` in ``dtype`` here: a failure with its fix on a GPU that must have it,
        else a line of what was not checked."""
        line = install_line(op, backend, dtype, self.capability)
        if line is None:
            self.skip(f"{op} [{backend}, {_dtype_name(dtype)}]", reason)
            return
        self.add(Result(op, backend, _dtype_name(dtype), "", f"runs on this GPU (cc {self.capability})", False,
                        note=f"{reason}; fix: {line}"))

    def add(self, result: Result) -> None:
        self.results.append(result)
        status = "ok  " if result.ok else "FAIL"
        err = "" if result.error is None else f" err {result.error:.2e} (tol {result.tol:.0e})"
        print(f"  {status} {result.check} [{result.backend}, {result.dtype}, {result.shape}] {result.what}{err} "
              f"{result.note}", flush=True)

    def compare(self, check: str, backend: str, dtype: torch.dtype, shape: str, pairs: Sequence[tuple[str, torch.Tensor,
                torch.Tensor, float]], times: dict[str, tuple[float, float | None]] | None = None) -> None:
        for what, ours, ref, tol in pairs:
            err = rel_err(ours, ref)
            t = (times or {}).get(what, (None, None))
            self.add(Result(check, backend, _dtype_name(dtype), shape, what, err <= tol, err, tol,
                            None if t[0] is None else t[0] * 1e6, None if t[1] is None else t[1] * 1e6))

    def skip(self, what: str, reason: str) -> None:
        self.not_checked.append(f"{what}: {reason}")
        print(f"  --   {what}: not checked ({reason})", flush=True)

    def time(self, fn: Callable[[], object]) -> float | None:
        if not self.timed:
            return None
        from mpo_core.gpu.timing import time_call

        return time_call(fn, self.device, warmup=self.warmup, repeat=self.repeat)

    def model(self, cost) -> float | None:
        from mpo_core.gpu.devices import roofline_seconds

        return None if self.model_gpu is None else roofline_seconds(cost, self.model_gpu)


# ----------------------------------------------------------------------------- fused ops
def _op_inputs(op: str, m: int, n: int, dtype: torch.dtype, device: str, seed: int = 0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g, dtype=torch.float64) * scale).to(device, dtype).requires_grad_()

    if op == "bias_gelu":
        return [rand(m, n, scale=2.0), rand(n)]
    if op == "layer_norm":
        return [rand(m, n, scale=2.0), rand(n), rand(n)]
    return [rand(m, n, scale=2.0), rand(m, n), rand(n), rand(n)]


def _ours(op: str, backend: str, seed: int = DROPOUT_SEED) -> Callable[..., torch.Tensor]:
    from mpo_core import ops

    if op == "layer_norm":
        return lambda x, w, b: ops.layer_norm(x, w, b, backend=backend)
    if op == "residual_layer_norm":
        return lambda x, r, w, b: ops.residual_layer_norm(x, r, w, b, backend=backend)
    if op == "residual_dropout_layer_norm":
        return lambda x, r, w, b: ops.residual_layer_norm(x, r, w, b, dropout_p=DROPOUT_P, seed=seed, backend=backend)
    return lambda x, b: ops.bias_gelu(x, b, backend=backend)


def dropout_reference_mask(backend: str, m: int, n: int, p: float, seed: int) -> torch.Tensor:
    """The keep mask ``backend``'s dropout must draw for ``seed`` (offset 0, as :mod:`mpo_core.ops` calls it),
    regenerated by the independent Philox of :mod:`mpo_core.gpu.philox`."""
    from mpo_core.gpu import philox

    masks = {"triton": philox.triton_keep_mask, "cuda": philox.cuda_keep_mask}
    if backend not in masks:
        raise ValueError(f"backend must be one of {sorted(masks)} (the backends with dropout), got {backend!r}")
    return masks[backend](m, n, p, seed)


def _reference(op: str, keep: torch.Tensor | None = None) -> Callable[..., torch.Tensor]:
    from mpo_core.ops import reference

    if op == "layer_norm":
        return lambda x, w, b: reference.layer_norm(x, w, b)
    if op == "residual_layer_norm":
        return lambda x, r, w, b: reference.residual_layer_norm(x, r, w, b)
    if op == "residual_dropout_layer_norm":
        return lambda x, r, w, b: reference.residual_layer_norm(x, r, w, b, keep_mask=keep, dropout_p=DROPOUT_P)
    return lambda x, b: reference.bias_gelu(x, b)


def _grad_names(op: str) -> list[str]:
    return {"bias_gelu": ["dx", "dbias"], "layer_norm": ["dx", "dweight", "dbias"]}.get(
        op, ["dx", "dresidual", "dweight", "dbias"])


def check_fused_op(c: Checker, op: str, backend: str, dtype: torch.dtype, m: int, n: int) -> None:
    """Forward and backward of one op on one backend against the float64 reference."""
    inputs = _op_inputs(op, m, n, dtype, c.device, seed=m + n)
    fn = _ours(op, backend)
    y = fn(*inputs)
    dy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64).to(c.device, dtype)
    # The timed path re-runs the backward on this graph: keep it.
    grads = torch.autograd.grad(y, inputs, dy, retain_graph=c.timed)
    keep = None
    if op == "residual_dropout_layer_norm":  # the mask the seed defines, regenerated apart from the kernel
        keep = dropout_reference_mask(backend, m, n, DROPOUT_P, DROPOUT_SEED).to(c.device)
    ref_in = [t.detach().double().requires_grad_() for t in inputs]
    ref_y = _reference(op, keep)(*ref_in)
    ref_grads = torch.autograd.grad(ref_y, ref_in, dy.double())
    times = {}
    if c.timed:
        from mpo_core.gpu.kernel_model import fused_op_cost

        s = torch.tensor([], dtype=dtype).element_size()
        sm = c.model_gpu.sm_count if c.model_gpu is not None else 132
        t_fwd = c.time(lambda: fn(*inputs))
        t_bwd = c.time(lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True))
        times["y"] = (t_fwd, c.model(fused_op_cost(op, "fwd", m, n, s, "fused", sm)))
        times["dx"] = (t_bwd, c.model(fused_op_cost(op, "bwd", m, n, s, "fused", sm)))
    pairs = [("y", y, ref_y, tolerance(op, "y", dtype))] + [
        (name, g, r, tolerance(op, name, dtype)) for name, g, r in zip(_grad_names(op), grads, ref_grads)]
    if keep is not None:
        shape = f"{m}x{n}"
        # dresidual is zero exactly where the backward dropped the residual: that mask must be the seed's
        mismatched = int(((grads[1] != 0) != keep).sum())
        c.add(Result(op, backend, _dtype_name(dtype), shape, "backward mask = Philox(seed) reference", mismatched == 0,
                     float(mismatched), 0.0, note=f"{mismatched} of {keep.numel()} elements differ"))
        frac = keep.double().mean().item()
        sigma = math.sqrt(DROPOUT_P * (1 - DROPOUT_P) / keep.numel())
        c.add(Result(op, backend, _dtype_name(dtype), shape, "keep fraction", abs(frac - (1 - DROPOUT_P)) < 6 * sigma,
                     abs(frac - (1 - DROPOUT_P)), 6 * sigma, note=f"kept {frac:.4f}"))
    c.compare(op, backend, dtype, f"{m}x{n}", pairs, times)


def check_dropout_determinism(c: Checker, backend: str, dtype: torch.dtype, m: int, n: int) -> None:
    """Same seed: bitwise the same output and gradients; another seed: another mask."""
    op = "residual_dropout_layer_norm"
    inputs = _op_inputs(op, m, n, dtype, c.device, seed=3)
    dy = torch.randn(m, n, generator=torch.Generator().manual_seed(9)).to(c.device, dtype)
    runs = []
    for seed in (5, 5, 6):
        y = _ours(op, backend, seed)(*inputs)
        runs.append([y, *torch.autograd.grad(y, inputs, dy)])
    same = all(torch.equal(a, b) for a, b in zip(runs[0], runs[1]))
    differs = not torch.equal(runs[0][2] != 0, runs[2][2] != 0)
    c.add(Result("dropout determinism", backend, _dtype_name(dtype), f"{m}x{n}", "same seed: bitwise equal y and grads",
                 same))
    c.add(Result("dropout determinism", backend, _dtype_name(dtype), f"{m}x{n}", "other seed: other mask", differs))


def check_fused_ops(c: Checker, tokens: Sequence[int], hidden: Sequence[int], ffn: Sequence[int]) -> None:
    from mpo_core.ops.dispatch import why_unavailable

    dev = torch.device(c.device)
    backends = ("triton", "cuda") if c.device == "cuda" else ("triton", "cpp")
    for op in (*NORM_OPS, "bias_gelu"):
        for backend in backends:
            for dtype in DTYPES:
                reason = why_unavailable(op, backend, dev, dtype)
                if reason is not None:
                    c.unavailable(op, backend, dtype, reason)
                    continue
                for m in tokens:
                    for n in (ffn if op == "bias_gelu" else hidden):
                        check_fused_op(c, op, backend, dtype, m, n)
                if op == "residual_dropout_layer_norm":
                    check_dropout_determinism(c, backend, dtype, tokens[0], hidden[0])


# ----------------------------------------------------------------------------- fused MPO linear
def _mpo_cores(in_shape, out_shape, ranks, dtype, device, seed=0) -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(ranks[q], i, j, ranks[q + 1], generator=g, dtype=torch.float64) / math.sqrt(ranks[q] * i))
            .to(device, dtype) for q, (i, j) in enumerate(zip(in_shape, out_shape))]


def check_mpo_linear(c: Checker, tokens: int, shapes: Sequence[tuple[tuple[int, ...], tuple[int, ...]]],
                     max_bond: int) -> None:
    """Every tile config the autotuner may pick, forced: inference forward, dx, training forward."""
    from mpo_core.ops.dispatch import why_unavailable
    from mpo_core.ops.mpo_linear import mpo_linear, mpo_linear_reference
    from mpo_core.shapes import capped_ranks

    dev = torch.device(c.device)
    dtypes = DTYPES if c.device == "cuda" else (torch.float32, torch.float16)
    for in_shape, out_shape in shapes:
        ranks = capped_ranks(in_shape, out_shape, max_bond)
        shape = f"{tokens}x{math.prod(in_shape)}->{math.prod(out_shape)}"
        for dtype in dtypes:
            reason = why_unavailable("mpo_linear", "triton", dev, dtype)
            cores = _mpo_cores(in_shape, out_shape, ranks, dtype, c.device)
            g = torch.Generator().manual_seed(1)
            x = torch.randn(tokens, math.prod(in_shape), generator=g).to(c.device, dtype)
            bias = torch.randn(math.prod(out_shape), generator=g).to(c.device, dtype)
            gy = torch.randn(tokens, math.prod(out_shape), generator=g).to(c.device, dtype)
            f64 = [t.double() for t in cores]
            ref_y = mpo_linear_reference(x.double(), f64, bias.double(), "gelu")
            xr = x.double().requires_grad_()
            (ref_dx,) = torch.autograd.grad(mpo_linear_reference(xr, f64, None, None), xr, gy.double())
            tol, tol_dx = tolerance("mpo_linear", "y", dtype), tolerance("mpo_linear", "dx", dtype)
            if reason is not None:
                c.unavailable("mpo_linear", "triton", dtype, reason)
                y = mpo_linear(x, cores, bias, "gelu")  # the path this device takes instead (torch reference)
                c.compare("mpo_linear (default path)", "torch", dtype, shape, [("y", y, ref_y, tol)])
                continue
            from mpo_core.kernels import mpo_matmul as kernel

            for store_pre in (False, True):
                for config in kernel.launch_configs(store_pre):
                    name = "M{BLOCK_M}N{BLOCK_N}K{BLOCK_K}G{GROUP_M}".format(**config.kwargs) + \
                        f"w{config.num_warps}s{config.num_stages}"
                    with kernel.forced_config(config):
                        if store_pre:  # the training forward: GELU with the pre-activation stored, then dx from it
                            xg = x.clone().requires_grad_()
                            y = mpo_linear(xg, cores, bias, "gelu", backend="triton")
                            (dx,) = torch.autograd.grad(y, xg, gy)
                            xr2 = x.double().requires_grad_()
                            ref_y2 = mpo_linear_reference(xr2, f64, bias.double(), "gelu")
                            (ref_dx2,) = torch.autograd.grad(ref_y2, xr2, gy.double())
                            pairs = [("y (training fwd)", y, ref_y2, tol), ("dx (from stored pre)", dx, ref_dx2,
                                                                             tol_dx)]
                            c.compare(f"mpo_linear {name}", "triton", dtype, shape, pairs)
                            continue
                        with torch.no_grad():
                            y = mpo_linear(x, cores, bias, "gelu", backend="triton")
                            t_fwd = c.time(lambda: mpo_linear(x, cores, bias, "gelu", backend="triton"))
                        xg = x.clone().requires_grad_()
                        (dx,) = torch.autograd.grad(mpo_linear(xg, cores, None, None, backend="triton"), xg, gy)
                    model = None
                    if c.timed:
                        from mpo_core.gpu.linear import linear_cost

                        b = torch.tensor([], dtype=dtype).element_size()
                        model = c.model(linear_cost("fused", tokens, in_shape, out_shape, ranks, b, training=False)["fwd"])
                    c.compare(f"mpo_linear {name}", "triton", dtype, shape,
                              [("y (inference)", y, ref_y, tol), ("dx", dx, ref_dx, tol_dx)],
                              {"y (inference)": (t_fwd, model)})


# ----------------------------------------------------------------------------- benchmarks
def benchmarks_dir() -> Path | None:
    """``benchmarks/`` of the repository this package was imported from, if any."""
    path = Path(__file__).resolve().parent.parent / "benchmarks"
    return path if path.is_dir() else None


def run_benchmarks(c: Checker, names: Sequence[str], tiny: bool, out_dir: Path) -> None:
    where = benchmarks_dir()
    if where is None:
        c.skip("benchmarks", "benchmarks/ is not next to the package (run from a repository checkout)")
        return
    base_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for name in names:
        env = dict(base_env, **({"TRITON_INTERPRET": "1"} if tiny and name in INTERPRETED_TINY_RUNS else {}))
        report = out_dir / f"{name}.json"
        args = [a.replace("{json}", str(report)) for a in BENCHMARK_RUNS[name][1 if tiny else 0]]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(where / f"{name}.py"), *args], cwd=out_dir, env=env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        ok = proc.returncode == 0 and report.is_file()
        note = f"{seconds:.0f} s, {report}" if ok else f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-300:]!r}"
        c.add(Result("benchmark", name, "", "tiny" if tiny else "quick", "runs, writes its JSON", ok, note=note))


# ----------------------------------------------------------------------------- main
def sizes(gpu: bool, tiny: bool) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int, list]:
    """``(tokens, hidden, ffn, mpo_tokens, mpo_shapes)`` the check runs at: BERT sizes on a GPU, small ones
    on a CPU (Triton's interpreter); ``tiny`` shrinks both."""
    from mpo_core.gpu.shapes import MPO_MODES
    from mpo_core.shapes import factorize

    if gpu:
        tokens, hidden, ffn = ((512,), (768,), (3072,)) if tiny else ((512, 4096, 16384), (768, 1024), (3072, 4096))
        return tokens, hidden, ffn, 512, [(MPO_MODES[768], MPO_MODES[3072]), (MPO_MODES[3072], MPO_MODES[768])]
    tokens, hidden, ffn = ((16,), (768,), (3072,)) if tiny else ((128,), (768, 1024), (3072,))
    return tokens, hidden, ffn, 40, [(factorize(64, 5), factorize(96, 5))]


def not_checked_here(c: Checker, device_name: str, tokens: Sequence[int]) -> list[str]:
    """What the check cannot check where ``c`` runs: on a GPU without a roofline model, the model times;
    without a GPU, the CUDA kernels, GPU code generation and BERT sizes."""
    if c.device == "cuda" or c.capability is not None:
        if c.model_gpu is None:
            return [f"model times: no roofline model for {device_name} (A100-80GB, H100 SXM only): "
                    "'no model' beside its measured times"]
        return []
    return [
        "CUDA extension kernels: no GPU (tests/test_cpp_ext.py -k emulated runs them under host emulation)",
        "GPU code generation, speed and the roofline comparison: no GPU",
        f"BERT sizes (512-16384 tokens): the CPU subset runs {tokens} tokens",
        "mpo_linear in bfloat16: the interpreter's bfloat16 tl.dot is wrong (float32 and float16 run here)",
    ]


KERNEL_BACKENDS = ("triton", "cuda", "cpp")


def require_a_kernel(c: Checker) -> None:
    """A check that compared no kernel (every backend missing) is a failure, never a PASS of the references."""
    if not any(r.backend in KERNEL_BACKENDS for r in c.results):
        c.add(Result("kernels", "-", "", "", "at least one kernel checked", False,
                     note="no Triton, CUDA or C++ kernel could run here: see NOT CHECKED"))


def _table(results: Sequence[Result]) -> str:
    cols = ["check", "backend", "dtype", "shape", "what", "ok", "error", "tol", "measured_us", "model_us"]

    def cell(v):
        if v is None:
            return ""
        if isinstance(v, bool):
            return "pass" if v else "FAIL"
        if isinstance(v, float):
            return f"{v:.3g}"
        return str(v)

    def row(r: Result) -> list[str]:
        cells = [cell(getattr(r, k)) for k in cols]
        if r.measured_us is not None and r.model_us is None:
            cells[-1] = "no model"  # a GPU (or a CPU) the roofline tables do not describe
        return cells

    rows = [row(r) for r in results]
    widths = [max([len(k)] + [len(row[i]) for row in rows]) for i, k in enumerate(cols)]
    fmt = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([fmt(cols), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpo_core.check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--tiny", action="store_true", help="smallest sizes and benchmark smoke runs (CI)")
    parser.add_argument("--only", nargs="+", choices=["ops", "mpo_linear", "benchmarks"],
                        help="run only these parts (default: all)")
    parser.add_argument("--benchmarks", nargs="+", choices=sorted(BENCHMARK_RUNS), default=sorted(BENCHMARK_RUNS),
                        help="which benchmarks to run (default: all)")
    parser.add_argument("--timed", action="store_true",
                        help="time every kernel also without a GPU (perf_counter; always on with a GPU)")
    parser.add_argument("--json", default=os.path.join("results", "check.json"), help="where to write the verdicts")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1" and argv is None:
        # Triton's interpreter must be chosen before the kernels are first imported: run again with it.
        os.execve(sys.executable, [sys.executable, "-m", "mpo_core.check", *sys.argv[1:]],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    from mpo_core import backends
    from mpo_core.gpu.timing import device_info

    device = "cuda" if cuda else "cpu"
    info = device_info(device)
    parts = set(args.only or ("ops", "mpo_linear", "benchmarks"))
    print(f"mpo_core acceptance check on {info['device']} ({'GPU' if cuda else 'CPU subset'}), backends {backends()}")
    # without a GPU the times only show that the timed path runs: 1 warm-up + 2 calls
    c = Checker(device, timed=cuda or args.timed, warmup=3 if cuda else 1, repeat=10 if cuda else 2)
    tokens, hidden, ffn, mpo_tokens, mpo_shapes = sizes(cuda, args.tiny)
    c.not_checked += not_checked_here(c, info["device"], tokens)
    if "ops" in parts:
        print("fused ops vs the float64 torch reference:")
        check_fused_ops(c, tokens, hidden, ffn)
    if "mpo_linear" in parts:
        print("fused MPO linear at every tile config the autotuner may pick:")
        check_mpo_linear(c, mpo_tokens, mpo_shapes, max_bond=64)
    if "benchmarks" in parts:
        print("benchmarks (quick mode):" if not args.tiny else "benchmarks (smoke runs):")
        with tempfile.TemporaryDirectory(prefix="mpo_check_") as tmp:
            run_benchmarks(c, args.benchmarks, args.tiny or not cuda, Path(tmp))

    if parts & {"ops", "mpo_linear"}:
        require_a_kernel(c)
    failed = [r for r in c.results if not r.ok]
    clock = "CUDA events" if cuda else "perf_counter"
    print(f"\nVERDICT TABLE (measured_us: {clock}, median; model_us: roofline of this GPU, a model)")
    print(_table(c.results))
    if c.not_checked:
        print("\nNOT CHECKED here:")
        for line in c.not_checked:
            print(f"  - {line}")
    verdict = "FAIL" if failed else "PASS"
    print(f"\n{verdict}: {len(c.results) - len(failed)}/{len(c.results)} checks passed on {info['device']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"verdict": verdict, "device_info": info, "backends": backends(),
                                           "results": [dataclasses.asdict(r) for r in c.results],
                                           "not_checked": c.not_checked}, indent=2, default=str))
    print(f"wrote {args.json}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
