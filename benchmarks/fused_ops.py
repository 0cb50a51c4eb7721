"""Fused LayerNorm / residual + dropout + LayerNorm / bias + GELU: bytes, bandwidth, ratios.

With a GPU (measured): for BERT shapes (tokens x hidden), forward and backward of each
op through :mod:`mpo_core.ops` (backend ``None``: the CUDA extension or Triton; also
each of ``triton`` / ``cuda`` present), against torch eager (the unfused sequence:
``F.layer_norm(x + F.dropout(r))``, ``F.gelu(x + b)``) and ``torch.compile`` of it, in
one run: time, achieved GB/s (our kernel's bytes / time), % of a measured
device-to-device copy, the ratio to eager, and beside each measured time the roofline
time of :mod:`mpo_core.gpu` for that device (labelled "model"; A100/H100 only).
Every contender is timed by the one timer of ``benchmarks/_common.py`` (CUDA events after
warm-up on a GPU, ``perf_counter`` on CPU), interleaved, with the same repeat count.

Always (first): the model table of :func:`mpo_core.gpu.tables.fused_op_rows`, labelled
"model" (the same table as ``benchmarks/gpu_model.py``: bytes our kernels read and write
vs the unfused torch sequence, roofline time on A100-80GB and H100 SXM); without a GPU,
when ``mpo_core._C`` is built, a measured CPU comparison of torch eager vs the C++
residual + LayerNorm.

    python benchmarks/fused_ops.py --quick
    python benchmarks/fused_ops.py --tiny          # seconds: smoke test / acceptance check on CPU
    python benchmarks/fused_ops.py --json results/fused_ops.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_info, format_table, time_calls, write_json  # noqa: E402

from mpo_core import backends, ops  # noqa: E402
from mpo_core import gpu  # noqa: E402

OPS = gpu.FUSED_OPS
DROPOUT_P = 0.1


def shapes(quick: bool, tiny: bool = False) -> list[tuple[int, int]]:
    if tiny:
        return [(64, 768)]
    tokens = (4096, 16384) if quick else (4096, 16384, 65536)
    hidden = (768, 4096) if quick else (768, 1024, 3072, 4096)
    return [(m, n) for m in tokens for n in hidden]


def fused_bytes(op: str, direction: str, m: int, n: int, s: int) -> float:
    """HBM bytes of our fused kernels for one op (model, :func:`mpo_core.gpu.kernel_model.fused_op_cost`)."""
    return gpu.fused_op_cost(op, direction, m, n, s).bytes


def _inputs(op: str, m: int, n: int, dtype: torch.dtype, device: str) -> list[torch.Tensor]:
    g = torch.Generator(device=device).manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=g, device=device, dtype=dtype).requires_grad_()

    if op == "layer_norm":
        return [rand(m, n), rand(n), rand(n)]
    if op == "bias_gelu":
        return [rand(m, n), rand(n)]
    return [rand(m, n), rand(m, n), rand(n), rand(n)]


def _eager(op: str) -> Callable[..., torch.Tensor]:
    """The unfused torch sequence each op replaces."""
    if op == "layer_norm":
        return lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b)
    if op == "residual_layer_norm":
        return lambda x, r, w, b: F.layer_norm(x + r, (x.shape[-1],), w, b)
    if op == "residual_dropout_layer_norm":
        return lambda x, r, w, b: F.layer_norm(x + F.dropout(r, DROPOUT_P), (x.shape[-1],), w, b)
    return lambda x, b: F.gelu(x + b)


def _ours(op: str, backend: str | None) -> Callable[..., torch.Tensor]:
    if op == "layer_norm":
        return lambda x, w, b: ops.layer_norm(x, w, b, backend=backend)
    if op == "residual_layer_norm":
        return lambda x, r, w, b: ops.residual_layer_norm(x, r, w, b, backend=backend)
    if op == "residual_dropout_layer_norm":
        return lambda x, r, w, b: ops.residual_layer_norm(x, r, w, b, dropout_p=DROPOUT_P, seed=1, backend=backend)
    return lambda x, b: ops.bias_gelu(x, b, backend=backend)


def _fwd_bwd(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor]) -> tuple[Callable, Callable]:
    """The forward call, and the backward of one retained forward graph."""
    y = fn(*inputs)
    dy = torch.randn_like(y)
    return (lambda: fn(*inputs)), (lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True))


def _fwd_bwd_times(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], device: str,
                   repeat: int = 15) -> tuple[float, float]:
    """Median forward and backward seconds of one implementation."""
    times = time_calls(dict(zip(("fwd", "bwd"), _fwd_bwd(fn, inputs))), device, repeat=repeat)
    return statistics.median(times["fwd"]), statistics.median(times["bwd"])


def copy_bandwidth(device: str, nbytes: int = 256 * 2**20) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second) of an ``nbytes`` copy."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / statistics.median(time_calls({"copy": lambda: dst.copy_(src)}, device)["copy"])


def model_gpu(device: str) -> gpu.Gpu | None:
    """The modelled GPU this device is (by name and compute capability), or ``None`` (CPU, or no model for it)."""
    return gpu.devices.model_of_device(device)


def measured_table(candidates: dict[str, Callable[[str], Callable[..., torch.Tensor]]], op_list, cases,
                   dtype: torch.dtype, device: str, copy_bw: float | None, repeat: int = 15) -> list[dict]:
    """Time every candidate on every (op, tokens, hidden), interleaved; ratios are to the first candidate.

    Beside each time, where :func:`model_gpu` knows the device: the roofline time of the
    kernels that implementation runs (ours: ``fused``, the others: ``torch``), labelled model.
    """
    s = torch.tensor([], dtype=dtype).element_size()
    model = model_gpu(device)
    first = next(iter(candidates))
    rows = []
    for op in op_list:
        for m, n in cases:
            inputs = _inputs(op, m, n, dtype, device)
            calls = {name: _fwd_bwd(make(op), inputs) for name, make in candidates.items()}
            for k, direction in enumerate(("fwd", "bwd")):
                times = time_calls({name: pair[k] for name, pair in calls.items()}, device, repeat=repeat)
                t0 = statistics.median(times[first])
                for name in candidates:
                    t = statistics.median(times[name])
                    gbs = fused_bytes(op, direction, m, n, s) / t / 1e9
                    row = {"kind": "measured", "op": op, "dir": direction, "tokens": m, "hidden": n, "impl": name,
                           "us": t * 1e6, "speedup_vs_" + first: t0 / t, "GB/s(fused bytes)": gbs}
                    if copy_bw:
                        row["%copy_bw"] = 100 * gbs * 1e9 / copy_bw
                    if model is not None:
                        impl = "fused" if name.startswith("ours") else "torch"
                        row["model_us"] = gpu.roofline_seconds(gpu.fused_op_cost(op, direction, m, n, s, impl,
                                                                                 model.sm_count), model) * 1e6
                        row["measured/model"] = row["us"] / row["model_us"]
                    rows.append(row)
    return rows


def gpu_candidates(op_list, device: str = "cuda", dtype: torch.dtype = torch.bfloat16, compile_: bool = True
                   ) -> dict[str, Callable[[str], Callable[..., torch.Tensor]]]:
    """The GPU run's contenders: torch eager and ``torch.compile`` (``compile_``), ours by default and per
    backend that runs ``op_list`` on ``device`` in ``dtype`` (on a CPU: the same flow, without
    ``torch.compile``, whose C++ code generation takes minutes there)."""
    from mpo_core.ops.dispatch import why_unavailable

    cands: dict[str, Callable[[str], Callable[..., torch.Tensor]]] = {"torch_eager": _eager}
    if compile_ and torch.device(device).type == "cuda":
        cands["torch_compile"] = lambda op: torch.compile(_eager(op))
    cands["ours(default)"] = lambda op: _ours(op, None)
    for backend in ("triton", "cuda"):
        if all(why_unavailable(op, backend, torch.device(device), dtype) is None for op in op_list):
            cands[f"ours({backend})"] = lambda op, b=backend: _ours(op, b)
    return cands


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="fewer shapes")
    size.add_argument("--tiny", action="store_true", help="one small shape, few repeats (smoke test; seconds on CPU)")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", default="results/fused_ops.json", help="where to write the JSON report")
    parser.add_argument("--no-torch-compile", action="store_true",
                        help="leave torch.compile out of the contenders (its compiles take a minute or more)")
    parser.add_argument("--gpu-flow-on-cpu", action="store_true",
                        help="run the GPU measurement on the CPU (CI: every line of it runs without a GPU)")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    repeat = 3 if args.tiny else 15
    report: dict = {"dtype": args.dtype, "quick": args.quick, "tiny": args.tiny, "dropout_p": DROPOUT_P,
                    "backends": backends(), "repeat": repeat}

    s = torch.tensor([], dtype=dtype).element_size()
    tokens = sorted({m for m, _ in shapes(args.quick, args.tiny)})
    model = [row for m in tokens for row in gpu.fused_op_rows(m, s)]
    print(f"MODEL (roofline, not measured; mpo_core.gpu): our fused kernels vs the unfused torch sequence, "
          f"{args.dtype}")
    print(gpu.format_rows(model, ("tokens",) + gpu.FUSED_OP_COLUMNS))
    report["model"] = model

    if torch.cuda.is_available() or args.gpu_flow_on_cpu:
        device = "cuda" if torch.cuda.is_available() else "cpu"
        info = device_info(device)
        copy_bw = copy_bandwidth(device, 256 * 2**20 if device == "cuda" else 2**20)
        print(f"\nMEASURED on {info['device']} (sm_clock_MHz {info.get('sm_clock_MHz', 'n/a')}): copy "
              f"{copy_bw / 1e9:.1f} GB/s; model = roofline of {getattr(model_gpu(device), 'name', 'no modelled GPU')}")
        rows = measured_table(gpu_candidates(OPS, device, dtype, not args.no_torch_compile), OPS, shapes(args.quick, args.tiny), dtype, device,
                              copy_bw, repeat)
        report.update(device=info["device"], device_info=info, copy_GBps=copy_bw / 1e9, measured=rows)
    elif backends()["cpp"]:
        info = device_info("cpu")
        print(f"\nMEASURED on {info['device']}: torch eager vs the C++ residual + LayerNorm (float32)")
        if args.tiny:
            cases = [(64, 768)]
        else:
            cases = [(m, n) for m in ((512, 2048) if args.quick else (512, 2048, 8192)) for n in (768, 1024)]
        cands = {"torch_eager": _eager, "ours(cpp)": lambda op: _ours(op, "cpp")}
        rows = measured_table(cands, ("layer_norm", "residual_layer_norm"), cases, torch.float32, "cpu", None, repeat)
        report.update(device=info["device"], device_info=info, measured=rows)
    else:
        rows = []
        print("\nno GPU and no mpo_core._C: nothing to measure (model table only)")
    if rows:
        cols = ["op", "dir", "tokens", "hidden", "impl", "us", next(k for k in rows[0] if k.startswith("speedup")),
                "GB/s(fused bytes)"] + [k for k in ("%copy_bw", "model_us", "measured/model") if k in rows[0]]
        print(format_table(rows, cols))
    write_json(args.json, report)
    print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
