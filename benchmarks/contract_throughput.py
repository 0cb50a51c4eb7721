"""Throughput of MPO contraction strategies against ``nn.Linear`` on BERT shapes.

For each weight shape (BERT-base/large: 768x768, 768x3072, 3072x768, 1024x1024, 1024x4096,
4096x1024, n = 5 with the MPOBERT factorizations), each bond setting (full rank, and a
uniform bond cap giving ~2x/4x/8x/16x fewer parameters than dense) and each token count, it
times forward and forward+backward of ``nn.Linear`` (dense, same dtype) and of
``mpo_core.contract.contract`` with every strategy (``dense``, ``sequential`` in its best
order, ``fused`` where available, ``auto``), plus the inference forward of ``MPOLinear``
(``torch.no_grad``: cached dense ``W``). All times are *measured* in this one run; the table
prints each one as a ratio to ``nn.Linear`` (lower is better, < 1 is faster), the planner's
throughput (tokens/s, TFLOP/s), which strategy ``auto`` picked and whether that pick was
within 10% of the fastest strategy measured. Where ``tntorch`` is installed, its TT-matrix
product (``tntorch.tt_multiply`` on a ``tntorch.TTMatrix`` holding the same cores, so the same
``W`` and ranks) is timed alongside, with its ratio to ours. A strategy whose modelled time is over ``--skip-factor`` times the
best candidate's is not run ("skip", the cost model's prediction is in the JSON, labelled model).

Without a GPU it first prints the GPU model table of :func:`mpo_core.gpu.tables.linear_rows`
(labelled "model", the same table as ``benchmarks/gpu_model.py``: each strategy's FLOPs,
HBM bytes and roofline time on A100-80GB / H100 SXM at BERT shapes, 16384 tokens, bf16).

Run ``python benchmarks/contract_throughput.py`` (CPU default: under 3 minutes on 2 cores),
``--quick`` for a smoke run, ``--full`` for every bond and token count 1-16384 (the GPU default);
``--no-skip`` measures every strategy (the planner statistic is over the contested cases: more
than one strategy measured); ``--calibrated`` plans with this machine's measured cost model
(:mod:`mpo_core.cost.calibration`); the last line is the worst ``MPOLinear`` inference ratio.
``--out PATH`` (alias ``--json``) for the JSON, ``--plot PATH`` for a figure (needs matplotlib).
"""
from __future__ import annotations

import argparse
import math
import os
import platform
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from mpo_core import gpu  # noqa: E402
from mpo_core.contract import contract, explain  # noqa: E402
from mpo_core.contract import fused as fused_mod  # noqa: E402
from mpo_core.nn import MPOLinear  # noqa: E402
from mpo_core.shapes import capped_ranks, core_params, factorize, full_ranks  # noqa: E402
from benchmarks._common import device_description, write_json  # noqa: E402
from mpo_core.gpu.timing import median_for, time_calls  # noqa: E402

try:
    import tntorch
except ImportError:  # optional comparison
    tntorch = None

ALL_MATRICES = [(768, 768), (768, 3072), (3072, 768), (1024, 1024), (1024, 4096), (4096, 1024)]
ALL_BONDS = ["full", "2x", "4x", "8x", "16x"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
ALL_TOKENS = [1, 8, 128, 512, 2048, 8192, 16384]
PICK_SLACK = 1.10  # the planner's pick counts as right when within 10% of the fastest measured strategy


def tntorch_forward(cores, in_shape, out_shape, mode: str):
    """``(forward, params)`` applying a ``tntorch.TTMatrix`` of the same cores with ``tntorch.tt_multiply``.

    The TTMatrix is built from our cores (tntorch takes cores of the same ``(r, i, j, r')`` layout), so it
    holds exactly the same ``W`` and ranks; a TT-SVD of ``W`` would give other cores of the same ranks and
    cost seconds per shape. Returns ``None`` (and the reason) where tntorch cannot apply a batch.
    """
    if tntorch is None:
        return None, "tntorch not installed"
    params = [c.detach().clone().requires_grad_() for c in cores]  # as ours: parameters
    try:
        tt = tntorch.TTMatrix(params, [c.shape[3] for c in params[:-1]], list(in_shape), list(out_shape))
        return (lambda x: tntorch.tt_multiply(tt, x)), params
    except Exception as exc:  # noqa: BLE001 - any failure of the optional library is reported, not fatal
        return None, f"tntorch cannot apply a batch: {type(exc).__name__}: {exc}"


def bond_cap(in_shape, out_shape, compression: float) -> int:
    """Largest uniform bond cap whose core count is <= dense / compression."""
    full = full_ranks(in_shape, out_shape)
    dense = math.prod(in_shape) * math.prod(out_shape)
    best = 1
    for cap in range(1, max(full) + 1):
        if core_params(in_shape, out_shape, capped_ranks(in_shape, out_shape, cap)) * compression <= dense:
            best = cap
    return best


def timer(device: torch.device, min_time: float, min_reps: int = 3, max_reps: int = 50):
    """``measure(variants) -> {name: ms}``: the median over interleaved repeats, by the one timer
    (:func:`mpo_core.gpu.timing.median_for`: CUDA events on a GPU, ``perf_counter`` on a CPU; one
    warm-up round, then enough rounds for ``min_time`` per variant within ``[min_reps, max_reps]``)."""
    def measure(variants: dict) -> dict:
        return {name: t * 1e3 for name, t in median_for(variants, device, min_time, min_reps=min_reps,
                                                         max_reps=max_reps).items()}

    return measure


SLOW_CALL_S = 0.1  # a variant whose warm-up call takes longer is timed by that one call (noise << its ratio)


def one_call(fn, device: torch.device) -> float:
    """Seconds of one call of ``fn`` (the one timer, no warm-up): the timer of a contender too slow for
    repeats, used for ours too whenever it is used for a peer."""
    return time_calls({"fn": fn}, device, warmup=0, repeat=1)["fn"][0]


def run_case(rows, cols, bond, tokens, mode, dtype, device, measure, skip_factor, with_tntorch=True):
    in_shape, out_shape = factorize(rows, 5), factorize(cols, 5)
    cap = None if bond == "full" else bond_cap(in_shape, out_shape, float(bond[:-1]))
    torch.manual_seed(0)
    layer = MPOLinear(rows, cols, in_shape, out_shape, max_bond=cap, device=device, dtype=dtype)
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
    strategies = ["dense", "sequential"] + (["fused"] if fused_mod.fused_available(device, dtype) else [])
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
    tnt, tnt_params = tntorch_forward(cores, in_shape, out_shape, mode) if with_tntorch else (None, None)
    tnt_note, single_call = None, {}
    if tnt is None:
        tnt_note = tnt_params
    else:  # tntorch has no bias: add ours, so both compute the same x @ W + b
        with torch.no_grad():
            err = (tnt(x) + bias - contract(x, cores, bias)).abs().max().item()
        scale = contract(x.detach(), [c.detach() for c in cores], bias.detach()).abs().max().item()
        if not err <= 1e-3 * max(scale, 1.0):
            tnt_note = f"tntorch result differs from ours by {err:.3g} (max |y| {scale:.3g}): not timed"
        else:
            fn = fwd_bwd(lambda: tnt(x) + bias, [x, *tnt_params, bias])
            seconds = one_call(fn, device)
            if seconds > SLOW_CALL_S:  # tntorch is often 10-100x slower: one call bounds the budget,
                # and ours is timed the same way (one call after one warm-up each) for the ratio
                one_call(variants["auto"], device)
                single_call["tntorch"] = seconds * 1e3
                single_call["auto (1 call)"] = one_call(variants["auto"], device) * 1e3
            else:
                variants["tntorch"] = fn
    if mode == "fwd":
        def inference():
            with torch.no_grad():
                return layer(x)
        variants["module(no_grad)"] = inference
    times = {**measure(variants), **single_call}
    measured = {s: times[s] for s in strategies if s in times}
    fastest = min(measured, key=measured.get)
    picked = plan.chosen.strategy
    pass_factor = 1 if mode == "fwd" else 3  # backward ~ 2 forward GEMM-equivalents
    dense_flops = pass_factor * 2 * tokens * rows * cols
    own_flops = {s: pass_factor * explain(x, cores, bias, strategy=s).chosen.flops for s in strategies}
    own_flops["auto"] = pass_factor * plan.chosen.flops
    return {
        "shape": [rows, cols], "in_shape": list(in_shape), "out_shape": list(out_shape), "bond": bond,
        "ranks": [c.shape[0] for c in cores] + [1], "compression": round(layer.compression, 2),
        "tokens": tokens, "mode": mode, "measured_ms": times,
        "ratio_vs_linear": {k: v / times["linear"] for k, v in times.items() if k != "linear"},
        "auto_choice": plan.chosen.label, "auto_strategy": picked, "fastest_measured": fastest,
        # the pick's own (forced-strategy) time against the fastest: auto's column adds only its dispatch
        "auto_within_10pct_of_fastest": bool(measured.get(picked, math.inf) <= PICK_SLACK * measured[fastest]),
        "strategies_measured": sorted(measured),
        "tokens_per_s": {k: tokens / (v * 1e-3) for k, v in times.items()},
        "tflops_dense_equivalent": {k: dense_flops / (v * 1e-3) / 1e12 for k, v in times.items()},
        "tflops_counted": {k: own_flops[k] / (times[k] * 1e-3) / 1e12 for k in own_flops if k in times},
        "tntorch_vs_auto": (times["tntorch"] / times["auto (1 call)"] if "auto (1 call)" in times
                            else times["tntorch"] / times["auto"] if "tntorch" in times else None),
        "tntorch_note": tnt_note, "single_call_ms": sorted(single_call),
        "skipped": skipped, "model_ms": model_ms,
    }


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=sorted(DTYPES), default="fp32")
    ap.add_argument("--quick", action="store_true", help="smoke run: 2 shapes, 1 and 128 tokens")
    ap.add_argument("--full", action="store_true", help="every bond and token count (the GPU default)")
    ap.add_argument("--tokens", type=int, nargs="+", help="override the token counts")
    ap.add_argument("--bonds", nargs="+", choices=ALL_BONDS, help="override the bond settings")
    ap.add_argument("--skip-factor", type=float, default=8.0,
                    help="do not run a strategy modelled slower than this times the best (default 8)")
    ap.add_argument("--no-skip", action="store_true",
                    help="measure every strategy whatever its modelled time (the planner statistic over all of them)")
    ap.add_argument("--calibrated", action="store_true",
                    help="plan with this machine's measured cost model (mpo_core.cost.calibration, cached)")
    ap.add_argument("--min-time", type=float, default=None, help="seconds of repeats per measurement")
    ap.add_argument("--out", "--json", dest="out", default=os.path.join("results", "contract_throughput.json"),
                    help="JSON report path (--json is an alias; default results/contract_throughput.json)")
    ap.add_argument("--tntorch", choices=["off", "fwd", "all"], default=None,
                    help="tntorch comparison: off, forward only at the smallest token count (CPU default), "
                         "forward and fwd+bwd at every token count (GPU/--full default)")
    ap.add_argument("--plot", default=None, help="also save a figure (PNG/PDF/SVG by extension; needs matplotlib)")
    args = ap.parse_args(argv)

    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    on_cpu = device.type == "cpu"
    matrices = ALL_MATRICES
    bonds = ["full", "4x", "16x"]
    tokens = [1, 8, 128, 512] if on_cpu else ALL_TOKENS
    if args.quick:
        matrices, tokens = [(768, 768), (1024, 4096)], [1, 128]
    if args.full or not on_cpu:
        bonds, tokens = ALL_BONDS, ALL_TOKENS
    bonds, tokens = args.bonds or bonds, args.tokens or tokens
    if args.no_skip:
        args.skip_factor = math.inf
    if args.calibrated:
        from mpo_core.cost.calibration import use_calibration

        print(f"# planning with the calibrated cost model: {use_calibration(device).name}")
    min_time = args.min_time if args.min_time is not None else (0.05 if on_cpu else 0.2)
    measure = timer(device, min_time, min_reps=2 if on_cpu and not args.full else 3)
    tnt_choice = args.tntorch or ("fwd" if on_cpu and not args.full else "all")
    tnt_modes = {"off": (), "fwd": ("fwd",), "all": ("fwd", "fwd+bwd")}[tnt_choice]
    tnt_tokens = tokens[:1] if tnt_choice == "fwd" else tokens

    model_rows = []
    if not torch.cuda.is_available():
        model_rows = gpu.linear_rows()
        print(f"# MODEL (not measured; mpo_core.gpu): MPO linear gelu(xW+b) per strategy on GPUs, full rank, "
              f"{gpu.BERT_TOKENS} tokens, bf16 (dense = unfused torch; dense/this > 1: faster than unfused)")
        print(gpu.format_rows(model_rows, gpu.LINEAR_COLUMNS) + "\n")

    rows_out = []
    if args.plot:
        check_plot_backend()
    cols = ["dense", "sequential"] + (["fused"] if fused_mod.fused_available(device, dtype) else []) + ["auto", "module(no_grad)"]
    cols += ["tntorch"] if tntorch is not None else []
    header = f"{'shape':>10} {'bond':>5} {'comp':>6} {'tokens':>6} {'mode':>8} {'linear ms':>10} " + \
        " ".join(f"{c:>15}" for c in cols) + f" {'tnt/auto':>8} {'auto tok/s':>11} {'auto TF/s':>9} {'pick ok':>7}  auto picked"
    print(f"# contract_throughput: {device_description(device)} ({platform.processor() or platform.machine()}), "
          f"{args.dtype}, torch {torch.__version__}")
    print("# measured (median of interleaved repeats, mpo_core.gpu.timing); columns after 'linear ms' are ratios to F.linear on the rebuilt W "
          "(lower is better); skip = not run, modelled > --skip-factor x best")
    print("# tnt/auto = tntorch.tt_multiply time / ours (> 1: ours faster); auto TF/s = the plan's counted FLOPs "
          "(x3 for fwd+bwd) per second; pick ok = the picked strategy within 10% of the fastest strategy measured")
    if tntorch is None:
        print("# tntorch not installed: its column is left out")
    else:
        print(f"# tntorch timed in modes {list(tnt_modes)} at tokens {tnt_tokens} (--tntorch); "
              f"a call over {SLOW_CALL_S} s is timed once")
    print(header)
    print("-" * len(header))
    for r, c in matrices:
        for bond in bonds:
            for t in tokens:
                for mode in ("fwd", "fwd+bwd"):
                    res = run_case(r, c, bond, t, mode, dtype, device, measure, args.skip_factor,
                                   mode in tnt_modes and t in tnt_tokens)
                    rows_out.append(res)
                    cells = []
                    for name in cols:
                        ratio = res["ratio_vs_linear"].get(name)
                        cells.append(f"{ratio:>14.2f}x" if ratio is not None else f"{'skip' if name in res['skipped'] else '-':>15}")
                    tnt = res["tntorch_vs_auto"]
                    print(f"{f'{r}x{c}':>10} {bond:>5} {res['compression']:>5.2f}x {t:>6} {mode:>8} "
                          f"{res['measured_ms']['linear']:>10.3f} " + " ".join(cells)
                          + f" {f'{tnt:.2f}x' if tnt is not None else '-':>8} {res['tokens_per_s']['auto']:>11.3g}"
                          f" {res['tflops_counted']['auto']:>9.3f} {str(res['auto_within_10pct_of_fastest']):>7}"
                          f"  {res['auto_choice']}", flush=True)
                    if res["tntorch_note"]:
                        print(f"#   note: {res['tntorch_note']}")

    summary = {}
    for bond in bonds:
        for mode in ("fwd", "fwd+bwd"):
            sel = [x["ratio_vs_linear"]["auto"] for x in rows_out if x["bond"] == bond and x["mode"] == mode]
            if sel:
                summary[f"{bond} {mode}"] = math.exp(sum(map(math.log, sel)) / len(sel))
    print("\n# geometric mean of auto / F.linear (measured):")
    for key, val in summary.items():
        print(f"#   {key:>14}: {val:.2f}x")
    tnt_ratios = [x["tntorch_vs_auto"] for x in rows_out if x["tntorch_vs_auto"] is not None]
    if tnt_ratios:
        print(f"# tntorch / ours (measured): geomean {math.exp(sum(map(math.log, tnt_ratios)) / len(tnt_ratios)):.2f}x, "
              f"min {min(tnt_ratios):.2f}x, ours faster on {sum(v > 1 for v in tnt_ratios)} of {len(tnt_ratios)} cases")
    contested = [x for x in rows_out if len(x["strategies_measured"]) > 1]
    good = sum(x["auto_within_10pct_of_fastest"] for x in contested)
    pick_line = (f"planner within 10% of the fastest measured on {good} of {len(contested)} contested cases "
                 f"(more than one strategy measured; {len(rows_out) - len(contested)} uncontested cases, where the "
                 f"others were modelled > --skip-factor slower, are not counted; --no-skip measures them all)")
    print(f"# {pick_line}")
    inference = [x["ratio_vs_linear"]["module(no_grad)"] for x in rows_out if "module(no_grad)" in x["ratio_vs_linear"]]
    if inference:
        worst = max(inference)
        print(f"# MPOLinear inference (no_grad) / F.linear (measured): max {worst:.2f}x over {len(inference)} cases, "
              f"{sum(v <= 1.05 for v in inference)} within 1.05x")
    out = {
        "device": str(device), "device_name": device_description(device), "processor": platform.processor(),
        "dtype": args.dtype, "threads": torch.get_num_threads(),
        "tntorch": "tntorch.tt_multiply(TTMatrix of the same cores)" if tntorch is not None else "not installed",
        "rows": rows_out, "summary_auto_vs_linear_geomean": summary, "planner_summary": pick_line,
        "planner_within_10pct_contested": [good, len(contested)], "gpu_model": model_rows,
    }
    write_json(args.out, out)
    print(f"# wrote {args.out}")
    if args.plot:
        plot(rows_out, args.plot)
        print(f"# wrote {args.plot}")
    return out


def check_plot_backend() -> None:
    """Fail early (before minutes of timing) when ``--plot`` is asked for without matplotlib."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        sys.exit("--plot needs matplotlib, which is not installed (pip install matplotlib); run without --plot")


def plot(rows: list, path: str) -> None:
    """One panel per mode: measured auto / F.linear against tokens, a line per (shape, bond)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = sorted({r["mode"] for r in rows})
    fig, axes = plt.subplots(1, len(modes), figsize=(6 * len(modes), 4.5), squeeze=False)
    for ax, mode in zip(axes[0], modes):
        series: dict = {}
        for r in rows:
            if r["mode"] == mode:
                series.setdefault(f"{r['shape'][0]}x{r['shape'][1]} {r['bond']}", []).append(
                    (r["tokens"], r["ratio_vs_linear"]["auto"]))
        for label, pts in series.items():
            ax.plot(*zip(*sorted(pts)), marker="o", label=label)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.set(xscale="log", yscale="log", xlabel="tokens", ylabel="auto / F.linear (measured)", title=mode)
    axes[0][0].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)


if __name__ == "__main__":
    main()
