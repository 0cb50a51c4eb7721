"""Fused LayerNorm / residual + dropout + LayerNorm / bias + GELU: bytes, bandwidth, ratios.

With a GPU (measured): for BERT shapes (tokens x hidden), forward and backward of each
op through :mod:`mpo_core.ops` (backend ``None``: the CUDA extension or Triton; also
each of ``triton`` / ``cuda`` present), against torch eager (the unfused sequence:
``F.layer_norm(x + F.dropout(r))``, ``F.gelu(x + b)``) and ``torch.compile`` of it, in
one run: time, achieved GB/s (our kernel's bytes / time), % of a measured
device-to-device copy, and the ratio to eager.

Always (first): the model table of :func:`mpo_core.gpu.tables.fused_op_rows`, labelled
"model" (the same table as ``benchmarks/gpu_model.py``: bytes our kernels read and write
vs the unfused torch sequence, roofline time on A100-80GB and H100 SXM); without a GPU,
when ``mpo_core._C`` is built, a measured CPU comparison of torch eager vs the C++
residual + LayerNorm.

    python benchmarks/fused_ops.py --quick
    python benchmarks/fused_ops.py --json results/fused_ops.json
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_description, format_table, time_call, write_json  # noqa: E402

from mpo_core import backends, ops  # noqa: E402
from mpo_core import gpu  # noqa: E402

OPS = gpu.FUSED_OPS
DROPOUT_P = 0.1


def shapes(quick: bool) -> list[tuple[int, int]]:
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


def _time(fn: Callable[[], object], device: str) -> float:
    """Seconds per call: Triton's ``do_bench`` on GPU (L2 flushed), else the median wall time."""
    if device == "cuda":
        from triton.testing import do_bench

        return do_bench(fn, warmup=25, rep=100) * 1e-3
    return time_call(fn, warmup=3, repeat=15, device=device)


def _fwd_bwd_times(fn: Callable[..., torch.Tensor], inputs: list[torch.Tensor], device: str) -> tuple[float, float]:
    def forward():
        return fn(*inputs)

    y = forward()
    dy = torch.randn_like(y)
    t_fwd = _time(forward, device)
    t_bwd = _time(lambda: torch.autograd.grad(y, inputs, dy, retain_graph=True), device)
    return t_fwd, t_bwd


def copy_bandwidth(device: str) -> float:
    """Measured device-to-device copy bandwidth (bytes read + written per second)."""
    src = torch.empty(256 * 2**20, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    return 2 * src.numel() / _time(lambda: dst.copy_(src), device)


def measured_table(candidates: dict[str, Callable[[str], Callable[..., torch.Tensor]]], op_list, cases,
                   dtype: torch.dtype, device: str, copy_bw: float | None) -> list[dict]:
    """Time every candidate on every (op, tokens, hidden); ratios are to the first candidate."""
    s = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for op in op_list:
        for m, n in cases:
            inputs = _inputs(op, m, n, dtype, device)
            base = None
            for name, make in candidates.items():
                t_fwd, t_bwd = _fwd_bwd_times(make(op), inputs, device)
                base = base or (t_fwd, t_bwd)
                for direction, t, t0 in (("fwd", t_fwd, base[0]), ("bwd", t_bwd, base[1])):
                    gbs = fused_bytes(op, direction, m, n, s) / t / 1e9
                    row = {"kind": "measured", "op": op, "dir": direction, "tokens": m, "hidden": n, "impl": name,
                           "us": t * 1e6, "speedup_vs_" + next(iter(candidates)): t0 / t, "GB/s(fused bytes)": gbs}
                    if copy_bw:
                        row["%copy_bw"] = 100 * gbs * 1e9 / copy_bw
                    rows.append(row)
    return rows


def gpu_candidates(op_list) -> dict[str, Callable[[str], Callable[..., torch.Tensor]]]:
    cands: dict[str, Callable[[str], Callable[..., torch.Tensor]]] = {
        "torch_eager": _eager,
        "torch_compile": lambda op: torch.compile(_eager(op)),
        "ours(default)": lambda op: _ours(op, None),
        "ours(triton)": lambda op: _ours(op, "triton"),
    }
    if backends()["cuda"]:
        cands["ours(cuda)"] = lambda op: _ours(op, "cuda")
    return cands


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer shapes")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", default="results/fused_ops.json", help="where to write the JSON report")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    report: dict = {"dtype": args.dtype, "quick": args.quick, "dropout_p": DROPOUT_P, "backends": backends()}

    s = torch.tensor([], dtype=dtype).element_size()
    tokens = sorted({m for m, _ in shapes(args.quick)})
    model = [row for m in tokens for row in gpu.fused_op_rows(m, s)]
    print(f"MODEL (roofline, not measured; mpo_core.gpu): our fused kernels vs the unfused torch sequence, "
          f"{args.dtype}")
    print(gpu.format_rows(model, ("tokens",) + gpu.FUSED_OP_COLUMNS))
    report["model"] = model

    if torch.cuda.is_available():
        copy_bw = copy_bandwidth("cuda")
        print(f"\nMEASURED on {device_description('cuda')}: device-to-device copy {copy_bw / 1e9:.0f} GB/s")
        rows = measured_table(gpu_candidates(OPS), OPS, shapes(args.quick), dtype, "cuda", copy_bw)
        report.update(device=device_description("cuda"), copy_GBps=copy_bw / 1e9, measured=rows)
    elif backends()["cpp"]:
        print(f"\nMEASURED on {device_description('cpu')}: torch eager vs the C++ residual + LayerNorm (float32)")
        cases = [(m, n) for m in ((512, 2048) if args.quick else (512, 2048, 8192)) for n in (768, 1024)]
        cands = {"torch_eager": _eager, "ours(cpp)": lambda op: _ours(op, "cpp")}
        rows = measured_table(cands, ("layer_norm", "residual_layer_norm"), cases, torch.float32, "cpu", None)
        report.update(device=device_description("cpu"), measured=rows)
    else:
        rows = []
        print("\nno GPU and no mpo_core._C: nothing to measure (model table only)")
    if rows:
        cols = ["op", "dir", "tokens", "hidden", "impl", "us", next(k for k in rows[0] if k.startswith("speedup")),
                "GB/s(fused bytes)"] + (["%copy_bw"] if "%copy_bw" in rows[0] else [])
        print(format_table(rows, cols))
    write_json(args.json, report)
    print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
