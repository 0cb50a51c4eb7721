"""Per-call cost of each ``mpo_core.ops`` entry point as MPOBERT calls it, against plain torch.

For every fused op MPOBERT uses (``layer_norm`` on the embeddings, ``residual_layer_norm``
after attention and the FFN, with and without dropout, ``bias_gelu`` in the FFN), at the
sizes MPOBERT uses (hidden 128/768/1024, intermediate 3072/4096) and token counts from 64 to
8192, it times, in one run with interleaved repeats and one timer:

* ``default``: the entry point with ``backend=None`` (what the model runs), inputs that
  require grad (training), so the autograd wrapper is part of the cost;
* each backend that can run here, forced (``backend="cpp"``, ``backend="torch"``, ...);
* ``eager``: plain torch with no mpo_core code (``F.layer_norm(x + r)``, ``F.gelu(x + b)``),
  the reference a user would write.

Forward alone and forward + backward, microseconds per call: the median over interleaved calls
of every contender, by the one timer (:func:`mpo_core.gpu.timing.median_for`: CUDA events on a
GPU, ``perf_counter`` or ``process_time`` on a CPU; at least ``--repeats`` rounds, more until
``--min-time`` per contender). The
``best`` column names the fastest backend per row: the CPU default per op and size should be
that one. Run ``python benchmarks/op_overhead.py`` (CPU: about 2 minutes on 2 cores),
``--quick`` for a smoke run; JSON under ``results/op_overhead.json``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))

from benchmarks._common import device_description, format_table, write_json  # noqa: E402
from mpo_core.gpu.timing import CLOCKS, median_for  # noqa: E402
from mpo_core import ops  # noqa: E402
from mpo_core.activation import gelu_approximate  # noqa: E402
from mpo_core.ops import BackendUnavailableError  # noqa: E402

BACKENDS = ("cpp", "cuda", "triton", "torch")
EPS = 1e-12  # MPOBERT's layer_norm_eps


def _inputs(op: str, rows: int, width: int, device: torch.device, dtype: torch.dtype) -> dict:
    g = torch.Generator(device="cpu").manual_seed(0)
    rnd = lambda *shape: torch.randn(*shape, generator=g).to(device, dtype).requires_grad_()  # noqa: E731
    if op == "bias_gelu":
        return {"x": rnd(rows, width), "bias": rnd(width)}
    out = {"x": rnd(rows, width), "weight": rnd(width), "bias": rnd(width)}
    if op != "layer_norm":
        out["residual"] = rnd(rows, width)
    return out


def ours(op: str, dropout: float, activation: str, backend: str | None) -> Callable[[dict], torch.Tensor]:
    """The entry point exactly as ``mpobert.layers`` calls it (``backend=None``) or with a forced backend."""
    if op == "layer_norm":
        return lambda t: ops.layer_norm(t["x"], t["weight"], t["bias"], EPS, backend=backend)
    if op == "residual_layer_norm":
        return lambda t: ops.residual_layer_norm(t["x"], t["residual"], t["weight"], t["bias"], EPS,
                                                 dropout_p=dropout, training=True, backend=backend)
    return lambda t: ops.bias_gelu(t["x"], t["bias"], activation=activation, backend=backend)


def eager(op: str, dropout: float, activation: str) -> Callable[[dict], torch.Tensor]:
    """Plain torch, no mpo_core code: what a user writes by hand."""
    if op == "layer_norm":
        return lambda t: F.layer_norm(t["x"], (t["x"].shape[-1],), t["weight"], t["bias"], EPS)
    if op == "residual_layer_norm":
        return lambda t: F.layer_norm(t["x"] + F.dropout(t["residual"], dropout, training=dropout > 0),
                                      (t["x"].shape[-1],), t["weight"], t["bias"], EPS)
    return lambda t: F.gelu(t["x"] + t["bias"], approximate=gelu_approximate(activation))


def runs_here(fn: Callable[[dict], torch.Tensor], tensors: dict) -> bool:
    try:
        fn(tensors)
    except BackendUnavailableError:
        return False
    return True


def cases(quick: bool) -> list[tuple[str, float, str, int, int]]:
    """``(op, dropout, activation, rows, width)`` at MPOBERT's sizes."""
    rows = [64, 1024] if quick else [64, 512, 2048, 8192]
    widths = {"layer_norm": [128], "residual_layer_norm": [768] if quick else [768, 1024],
              "bias_gelu": [3072] if quick else [3072, 4096]}
    out = []
    for op, ws in widths.items():
        variants = [(0.0, "gelu_tanh")]
        if op == "residual_layer_norm":
            variants.append((0.1, "gelu_tanh"))
        if op == "bias_gelu" and not quick:
            variants.append((0.0, "gelu"))
        out.extend((op, p, a, r, w) for p, a in variants for w in ws for r in rows)
    return out


def measure(args: argparse.Namespace) -> list[dict]:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    results = []
    for op, p, act, rows, width in cases(args.quick):
        tensors = _inputs(op, rows, width, device, dtype)
        fns = {"default": ours(op, p, act, None)}
        for b in BACKENDS:
            fn = ours(op, p, act, b)
            if runs_here(fn, tensors):
                fns[b] = fn
        fns["eager"] = eager(op, p, act)
        dy = torch.randn(rows, width, device=device, dtype=dtype)

        def fwd(fn):
            return lambda: fn(tensors)

        def fwd_bwd(fn):
            def go():
                fn(tensors).backward(dy)
                for t in tensors.values():
                    t.grad = None
            return go

        calls = {f"{name}|{kind}": wrap(fn) for name, fn in fns.items()
                 for kind, wrap in (("fwd", fwd), ("fwd_bwd", fwd_bwd))}
        seconds = median_for(calls, device, args.min_time, min_reps=args.repeats, max_reps=max(args.repeats, 200),
                             clock=args.clock)
        med = {tuple(key.split("|")): v * 1e6 for key, v in seconds.items()}
        label = op + (f" p={p}" if op == "residual_layer_norm" else "") + (f" {act}" if op == "bias_gelu" else "")
        row = {"op": label, "rows": rows, "width": width}
        for kind in ("fwd", "fwd_bwd"):
            for name in fns:
                row[f"{name}_{kind}_us"] = med[(name, kind)]
            row[f"default_vs_eager_{kind}"] = med[("default", kind)] / med[("eager", kind)]
            backends = [b for b in fns if b not in ("default",)]
            row[f"best_{kind}"] = min(backends, key=lambda b: med[(b, kind)])
        row["backends"] = [b for b in fns if b != "default"]
        results.append(row)
        print(f"{label:<28} {rows:>5}x{width:<5} default {med[('default', 'fwd')]:8.1f} us fwd "
              f"{med[('default', 'fwd_bwd')]:8.1f} us fwd+bwd; eager {med[('eager', 'fwd')]:8.1f} / "
              f"{med[('eager', 'fwd_bwd')]:8.1f}; best {row['best_fwd']} / {row['best_fwd_bwd']}", flush=True)
    return results


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", choices=["float32", "bfloat16"], default="float32")
    ap.add_argument("--quick", action="store_true", help="smoke run: a few sizes")
    ap.add_argument("--repeats", type=int, default=3, help="least interleaved rounds (median)")
    ap.add_argument("--min-time", type=float, default=0.05, help="seconds of calls per contender (more rounds, up to 200)")
    ap.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                    help="wall (perf_counter) or cpu (process_time: use with --threads 1 on a loaded machine)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    ap.add_argument("--out", default=os.path.join("results", "op_overhead.json"))
    args = ap.parse_args(argv)
    if args.repeats < 1 or args.min_time <= 0:
        raise SystemExit("--repeats must be >= 1 and --min-time > 0")
    if args.clock == "cpu" and args.device != "cpu":
        raise SystemExit("--clock cpu is for CPU runs")
    if args.threads:
        torch.set_num_threads(args.threads)
    print(f"device: {device_description(args.device)}, {args.dtype}; microseconds per call, measured ({args.clock} clock), "
          f"median of {args.repeats} interleaved repeats; inputs require grad")
    rows = measure(args)
    print()
    cols = ["op", "rows", "width"] + [f"{n}_fwd_us" for n in ("default", "cpp", "torch", "eager")] + \
        ["default_vs_eager_fwd", "best_fwd"] + [f"{n}_fwd_bwd_us" for n in ("default", "cpp", "torch", "eager")] + \
        ["default_vs_eager_fwd_bwd", "best_fwd_bwd"]
    if args.device != "cpu":
        cols = [c.replace("cpp_", "cuda_") for c in cols]
    print(format_table(rows, cols))
    write_json(args.out, {"benchmark": "op_overhead", "device": device_description(args.device),
                          "dtype": args.dtype, "rows": rows})
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
