"""C++ fused residual + LayerNorm (``mpo_core._C``) vs torch eager on CPU, side by side.

For BERT shapes (rows 512..8192 x hidden 768/1024), in the same run and on the same threads:

* **fwd**: ``C.residual_layernorm_forward(x, r, w, b)`` vs ``F.layer_norm(x + r, ...)``.
* **bwd**: ``C.residual_layernorm_backward(dy, h, w, mean, rstd)`` vs the kernel torch's
  autograd runs for it, ``aten.native_layer_norm_backward`` (the add's backward is free).
* **fwd+bwd**: the fused pair vs autograd through ``F.layer_norm(x + r)`` with x, r, w, b
  requiring grad (``torch.autograd.grad``), the way a training step pays for it.

``ratio = torch / C++`` (> 1: the C++ path is faster), from ``--repeat`` timings of each,
interleaved call by call by the one timer of ``benchmarks/_common.py`` (median, and min as
the low-noise estimate on a shared machine).

    python benchmarks/cpp_residual_layernorm.py --quick
    python benchmarks/cpp_residual_layernorm.py --dtype bfloat16 --json results/cpp_residual_layernorm_bf16.json
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_info, format_table, time_calls, write_json  # noqa: E402

from mpo_core import extension  # noqa: E402

EPS = 1e-12  # BERT's LayerNorm eps
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def bench_shape(C, rows: int, hidden: int, dtype: torch.dtype, repeat: int) -> list[dict]:
    """Time the three phases of both paths for one shape; one result row per phase."""
    g = torch.Generator().manual_seed(rows * hidden)
    x, r, dy = (torch.randn(rows, hidden, generator=g).to(dtype) for _ in range(3))
    w = torch.randn(hidden, generator=g).to(dtype)
    b = torch.randn(hidden, generator=g).to(dtype)
    y, h, mean, rstd = C.residual_layernorm_forward(x, r, w, b, EPS)
    # torch's saved statistics for its own backward (shape (rows, 1), like autograd saves them)
    _, t_mean, t_rstd = torch.ops.aten.native_layer_norm(h, [hidden], w, b, EPS)
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, r, w, b)]

    def torch_fwd():
        return F.layer_norm(x + r, (hidden,), w, b, EPS)

    def cpp_fwd():
        return C.residual_layernorm_forward(x, r, w, b, EPS)

    def torch_bwd():
        return torch.ops.aten.native_layer_norm_backward(dy, h, [hidden], t_mean, t_rstd, w, b, [True, True, True])

    def cpp_bwd():
        return C.residual_layernorm_backward(dy, h, w, mean, rstd)

    def torch_step():
        xl, rl, wl, bl = leaves
        out = F.layer_norm(xl + rl, (hidden,), wl, bl, EPS)
        return torch.autograd.grad(out, leaves, dy)

    def cpp_step():
        _, hh, m, s = C.residual_layernorm_forward(x, r, w, b, EPS)
        return C.residual_layernorm_backward(dy, hh, w, m, s)

    out = []
    for phase, tf, cf in (("fwd", torch_fwd, cpp_fwd), ("bwd", torch_bwd, cpp_bwd), ("fwd+bwd", torch_step, cpp_step)):
        times = time_calls({"torch": tf, "cpp": cf}, "cpu", warmup=2, repeat=repeat)
        ta, tb = times["torch"], times["cpp"]
        t_torch, t_cpp = statistics.median(ta), statistics.median(tb)
        out.append({
            "rows": rows, "hidden": hidden, "dtype": str(dtype).removeprefix("torch."), "phase": phase,
            "torch_ms": t_torch * 1e3, "cpp_ms": t_cpp * 1e3, "ratio": t_torch / t_cpp,
            "torch_min_ms": min(ta) * 1e3, "cpp_min_ms": min(tb) * 1e3, "ratio_min": min(ta) / min(tb),
        })
    return out


def main(argv: list[str] | None = None) -> int:
    """Run the benchmark, print the table and write the JSON report; returns the exit status."""
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    size = ap.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="rows 512/2048, hidden 768 only")
    size.add_argument("--tiny", action="store_true", help="64 rows x 768, 3 timings (smoke test)")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="float32")
    ap.add_argument("--repeat", type=int, default=None, help="timings per median (default 21, --quick 11)")
    ap.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (default: unchanged)")
    ap.add_argument("--json", default=os.path.join("results", "cpp_residual_layernorm.json"))
    args = ap.parse_args(argv)
    repeat = args.repeat if args.repeat is not None else (3 if args.tiny else 11 if args.quick else 21)
    if repeat < 1:
        ap.error(f"--repeat must be >= 1, got {repeat}")
    if args.threads is not None:
        if args.threads < 1:
            ap.error(f"--threads must be >= 1, got {args.threads}")
        torch.set_num_threads(args.threads)
    C = extension()
    if C is None:
        print("mpo_core._C is not built: pip install --no-build-isolation -e .", file=sys.stderr)
        return 1

    shapes = [(64, 768)] if args.tiny else [(512, 768), (2048, 768)] if args.quick else [(rows, hidden) for hidden in (768, 1024)
                                                          for rows in (512, 2048, 8192)]
    dtype = DTYPES[args.dtype]
    rows_out = []
    for rows, hidden in shapes:
        rows_out += bench_shape(C, rows, hidden, dtype, repeat)
    info = device_info("cpu")
    device = info["device"]
    print(f"residual + LayerNorm on {device}, {args.dtype}, {repeat} interleaved timings each (median and min); "
          "ratio = torch / C++ (> 1: C++ faster)")
    print(format_table(rows_out, ["rows", "hidden", "dtype", "phase", "torch_ms", "cpp_ms", "ratio",
                                  "torch_min_ms", "cpp_min_ms", "ratio_min"]))
    for phase in ("fwd", "bwd", "fwd+bwd"):
        ratios = [r["ratio"] for r in rows_out if r["phase"] == phase]
        geo = float(torch.tensor(ratios).log().mean().exp())
        print(f"geometric-mean ratio {phase}: {geo:.2f}")
    write_json(args.json, {
        "benchmark": "cpp_residual_layernorm",
        "device": device,
        "device_info": info,
        "threads": torch.get_num_threads(),
        "dtype": args.dtype,
        "repeat": repeat,
        "eps": EPS,
        "measured": rows_out,
    })
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
