"""Throughput of MPO contraction strategies against ``nn.Linear`` on BERT shapes.

For each weight shape (BERT-base/large: 768x768, 768x3072, 3072x768, 1024x1024, 1024x4096,
4096x1024, n = 5 with the MPOBERT factorizations), each bond setting (full rank, and a
uniform bond cap giving ~2x/4x/8x/16x fewer parameters than dense) and each token count, it
times forward and forward+backward of ``nn.Linear`` (dense, same dtype) and of
``mpo_core.contract.contract`` with every strategy (``dense``, ``sequential`` in its best
order, ``fused`` where available, ``auto``), plus the inference forward of ``MPOLinear``
(``torch.no_grad``: cached dense ``W``). All times are *measured* in this one run; the table
prints each one as a ratio to ``nn.Linear`` (lower is better, < 1 is faster) and which
strategy ``auto`` picked. A strategy whose modelled time is over ``--skip-factor`` times the
best candidate's is not run ("skip", the cost model's prediction is in the JSON, labelled model).

Without a GPU it first prints the GPU model table of :func:`mpo_core.roofline.linear_rows`
(labelled "model", the same table as ``benchmarks/gpu_model.py``: each strategy's FLOPs,
HBM bytes and roofline time on A100-80GB / H100 SXM at BERT shapes, 16384 tokens, bf16).

Run ``python benchmarks/contract_throughput.py`` (CPU default finishes in a few minutes),
``--quick`` for a smoke run, ``--full`` for every bond and token count (the GPU default).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import time

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpo_core import roofline as rl  # noqa: E402
from mpo_core.contract import contract, explain  # noqa: E402
from mpo_core.contract import fused as fused_mod  # noqa: E402
from mpo_core.nn import MPOLinear, full_ranks  # noqa: E402

MPOBERT_SHAPES = {768: (4, 4, 4, 4, 3), 1024: (4, 4, 4, 4, 4), 3072: (4, 4, 8, 6, 4), 4096: (4, 4, 8, 8, 4)}
ALL_MATRICES = [(768, 768), (768, 3072), (3072, 768), (1024, 1024), (1024, 4096), (4096, 1024)]
ALL_BONDS = ["full", "2x", "4x", "8x", "16x"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def bond_cap(in_shape, out_shape, compression: float) -> int:
    """Largest uniform bond cap whose core count is <= dense / compression."""
    full = full_ranks(in_shape, out_shape)
    dense = math.prod(in_shape) * math.prod(out_shape)
    best = 1
    for cap in range(1, max(full) + 1):
        ranks = [min(r, cap) for r in full]
        params = sum(ranks[k] * i * j * ranks[k + 1] for k, (i, j) in enumerate(zip(in_shape, out_shape)))
        if params * compression <= dense:
            best = cap
    return best


def timer(device: torch.device, min_time: float, min_reps: int = 3, max_reps: int = 50):
    """``measure(variants) -> {name: ms}``: the minimum over interleaved repeats.

    Variants of one case run round-robin (so a burst of load hits them all alike) and each
    reports its fastest repeat: on a shared machine the minimum is the least noisy estimate.
    """
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    def measure(variants: dict) -> dict:
        best = {}
        for name, fn in variants.items():  # warm-up (plans, caches, allocator)
            fn()
            best[name] = math.inf
        sync()
        start, reps = time.perf_counter(), 0
        while reps < min_reps or (time.perf_counter() - start < min_time * len(variants) and reps < max_reps):
            for name, fn in variants.items():
                t0 = time.perf_counter()
                fn()
                sync()
                best[name] = min(best[name], time.perf_counter() - t0)
            reps += 1
        return {name: t * 1e3 for name, t in best.items()}

    return measure


def run_case(rows, cols, bond, tokens, mode, dtype, device, measure, skip_factor):
    in_shape, out_shape = MPOBERT_SHAPES[rows], MPOBERT_SHAPES[cols]
    cap = None if bond == "full" else bond_cap(in_shape, out_shape, float(bond[:-1]))
    torch.manual_seed(0)
    layer = MPOLinear(rows, cols, in_shape, out_shape, ranks=cap, device=device, dtype=dtype)
    cores, bias = list(layer.cores), layer.bias
    weight = layer.weight.detach().clone().requires_grad_()  # nn.Linear's (out, in) weight, same values
    lin_bias = bias.detach().clone().requires_grad_()
    x = torch.randn(tokens, rows, device=device, dtype=dtype, requires_grad=(mode == "fwd+bwd"))
    g = torch.randn(tokens, cols, device=device, dtype=dtype)

    def fwd_bwd(forward, inputs):
        if mode == "fwd":
            return lambda: forward()
        return lambda: torch.autograd.grad(forward(), inputs, g)

    variants = {"linear": fwd_bwd(lambda: F.linear(x, weight, lin_bias), [x, weight, lin_bias])}
    plan = explain(x, cores, bias)
    best_model = plan.chosen.seconds
    strategies = ["dense", "sequential"] + (["fused"] if fused_mod.fused_available(device) else [])
    model_ms, skipped = {}, []
    for s in strategies:
        sp = explain(x, cores, bias, strategy=s)
        model_ms[s] = sp.chosen.seconds * 1e3
        if sp.chosen.seconds > skip_factor * best_model:
            skipped.append(s)
            continue
        variants[s] = fwd_bwd(lambda s=s: contract(x, cores, bias, strategy=s), [x, *cores, bias])
    model_ms["auto"] = best_model * 1e3
    variants["auto"] = fwd_bwd(lambda: contract(x, cores, bias), [x, *cores, bias])
    if mode == "fwd":
        def inference():
            with torch.no_grad():
                return layer(x)
        variants["module(no_grad)"] = inference
    times = measure(variants)
    return {
        "shape": [rows, cols], "in_shape": list(in_shape), "out_shape": list(out_shape), "bond": bond,
        "ranks": [c.shape[0] for c in cores] + [1], "compression": round(layer.compression, 2),
        "tokens": tokens, "mode": mode, "measured_ms": times,
        "ratio_vs_linear": {k: v / times["linear"] for k, v in times.items() if k != "linear"},
        "auto_choice": plan.chosen.label, "skipped": skipped, "model_ms": model_ms,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 shapes, 1 token count")
    ap.add_argument("--full", action="store_true", help="every bond and token count (the GPU default)")
    ap.add_argument("--tokens", type=int, nargs="+", help="override the token counts")
    ap.add_argument("--bonds", nargs="+", choices=ALL_BONDS, help="override the bond settings")
    ap.add_argument("--skip-factor", type=float, default=8.0,
                    help="do not run a strategy modelled slower than this times the best (default 8)")
    ap.add_argument("--min-time", type=float, default=None, help="seconds of repeats per measurement")
    ap.add_argument("--json", default=os.path.join("results", "contract_throughput.json"))
    args = ap.parse_args(argv)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    on_cpu = device.type == "cpu"
    matrices = ALL_MATRICES
    bonds = ["full", "4x", "16x"]
    tokens = [128, 512] if on_cpu else [128, 512, 2048, 8192, 16384]
    if args.quick:
        matrices, tokens = [(768, 768), (1024, 4096)], [128]
    if args.full or not on_cpu:
        bonds, tokens = ALL_BONDS, [128, 512, 2048, 8192, 16384]
    bonds, tokens = args.bonds or bonds, args.tokens or tokens
    min_time = args.min_time if args.min_time is not None else (0.05 if on_cpu else 0.2)
    measure = timer(device, min_time)

    model_rows = []
    if not torch.cuda.is_available():
        model_rows = rl.linear_rows()
        print(f"# MODEL (not measured; mpo_core.roofline): MPO linear gelu(xW+b) per strategy on GPUs, full rank, "
              f"{rl.BERT_TOKENS} tokens, bf16 (dense = unfused torch; dense/this > 1: faster than unfused)")
        print(rl.format_rows(model_rows, rl.LINEAR_COLUMNS) + "\n")

    rows_out = []
    cols = ["dense", "sequential"] + (["fused"] if fused_mod.fused_available(device) else []) + ["auto", "module(no_grad)"]
    header = f"{'shape':>10} {'bond':>5} {'comp':>6} {'tokens':>6} {'mode':>8} {'linear ms':>10} " + \
        " ".join(f"{c:>15}" for c in cols) + "  auto picked"
    print(f"# contract_throughput: {device} ({platform.processor() or platform.machine()}), {args.dtype}, torch {torch.__version__}")
    print("# measured (min of interleaved repeats); columns after 'linear ms' are ratios to nn.Linear "
          "(lower is better); skip = not run, modelled > --skip-factor x best")
    print(header)
    print("-" * len(header))
    for r, c in matrices:
        for bond in bonds:
            for t in tokens:
                for mode in ("fwd", "fwd+bwd"):
                    res = run_case(r, c, bond, t, mode, dtype, device, measure, args.skip_factor)
                    rows_out.append(res)
                    cells = []
                    for name in cols:
                        ratio = res["ratio_vs_linear"].get(name)
                        cells.append(f"{ratio:>14.2f}x" if ratio is not None else f"{'skip' if name in res['skipped'] else '-':>15}")
                    print(f"{f'{r}x{c}':>10} {bond:>5} {res['compression']:>5.2f}x {t:>6} {mode:>8} "
                          f"{res['measured_ms']['linear']:>10.3f} " + " ".join(cells) + f"  {res['auto_choice']}", flush=True)

    summary = {}
    for bond in bonds:
        for mode in ("fwd", "fwd+bwd"):
            sel = [x["ratio_vs_linear"]["auto"] for x in rows_out if x["bond"] == bond and x["mode"] == mode]
            if sel:
                summary[f"{bond} {mode}"] = math.exp(sum(map(math.log, sel)) / len(sel))
    print("\n# geometric mean of auto / nn.Linear (measured):")
    for key, val in summary.items():
        print(f"#   {key:>14}: {val:.2f}x")
    out = {
        "device": str(device), "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor(),
        "dtype": args.dtype, "torch": torch.__version__, "threads": torch.get_num_threads(),
        "rows": rows_out, "summary_auto_vs_linear_geomean": summary, "gpu_model": model_rows,
    }
    os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
    with open(args.json, "w") as fh:
        json.dump(out, fh, indent=1)
    print(f"# wrote {args.json}")
    return out


if __name__ == "__main__":
    main()
