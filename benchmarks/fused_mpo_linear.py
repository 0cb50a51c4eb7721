"""Fused MPO linear ``gelu(x @ W + b)`` vs cuBLAS ``F.linear`` on the rebuilt ``W`` + separate bias + GELU.

BERT shapes (768x3072, 3072x768, 1024x4096, 4096x1024; n=5 modes 768->(4,4,4,4,3),
1024->(4,4,4,4,4), 3072->(4,4,8,6,4), 4096->(4,4,8,8,4)), full-rank and truncated bonds
(``--max-bond``), tokens 4096..65536, forward and forward+backward.

* **model** (always printed, labelled "model", never mixed with measurements): FLOPs
  and compulsory HBM bytes of both paths from :func:`mpo_core.gpu.linear.linear_cost`
  (``"fused"``: the op's own :func:`~mpo_core.cost.mpo_linear_cost`; ``"dense"``:
  the unfused sequence below), and the roofline time of :mod:`mpo_core.gpu.devices` on
  A100-80GB and H100 SXM (forward + backward: the sum of the two). Ratio ``dense/fused``
  > 1 means fused is faster.
* **measured** (only with a CUDA GPU whose compute capability the fused kernel supports,
  >= 8.0): both paths timed in the same run, interleaved, by the one timer of
  ``benchmarks/_common.py`` (CUDA events after warm-up); ratio ``dense/fused`` per row, and
  beside it the model time on this GPU where it is modelled (A100/H100). Without such a
  GPU, ``--cpu-check`` times both on the CPU under Triton's interpreter at one tiny shape
  (a check that the measured path runs, not a performance figure).

Dense sequence: rebuild ``W`` from the cores (:func:`mpo_core.rebuild.dense_matrix`), ``y = F.linear(x, W.T)``,
``y = y + b``, ``y = F.gelu(y)``; autograd for backward.

    python benchmarks/fused_mpo_linear.py --quick
    python benchmarks/fused_mpo_linear.py --tiny --cpu-check    # seconds: smoke test on CPU
    python benchmarks/fused_mpo_linear.py --json results/fused_mpo_linear.json
"""
from __future__ import annotations

import argparse
import math
import os
import statistics
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_info, format_table, time_calls, write_json  # noqa: E402

from mpo_core.gpu import A100, H100, linear_cost, sequence_seconds  # noqa: E402
from mpo_core.gpu.devices import model_of_device  # noqa: E402
from mpo_core.gpu.shapes import MPO_MODES as MODES  # noqa: E402
from mpo_core.ops.mpo_linear import mpo_linear  # noqa: E402
from mpo_core.rebuild import dense_matrix  # noqa: E402
from mpo_core.shapes import capped_ranks, factorize, full_ranks  # noqa: E402

CASES = [(768, 3072), (3072, 768), (1024, 4096), (4096, 1024)]
TINY_CASES = [(64, 96)]  # --tiny: modes (2, 2, 4, 2, 2) -> (2, 2, 4, 3, 2), seconds under the interpreter
MODES = {**MODES, **{dim: factorize(dim, 5) for dim in TINY_CASES[0]}}
GPUS = (A100, H100)


def bond_sets(in_shape, out_shape, max_bond: int) -> dict[str, list[int]]:
    return {"full": full_ranks(in_shape, out_shape), f"max_bond={max_bond}": capped_ranks(in_shape, out_shape, max_bond)}


def model_table(tokens_list, max_bond: int, b: int) -> list[dict]:
    rows = []
    for k_dim, n_dim in CASES:
        in_shape, out_shape = MODES[k_dim], MODES[n_dim]
        for label, ranks in bond_sets(in_shape, out_shape, max_bond).items():
            for m in tokens_list:
                costs = {path: linear_cost(path, m, in_shape, out_shape, ranks, b) for path in ("fused", "dense")}
                for direction, parts in (("fwd", ("fwd",)), ("fwd+bwd", ("fwd", "bwd"))):
                    seq = {path: [c[p] for p in parts] for path, c in costs.items()}
                    row = {"kind": "model", "shape": f"{k_dim}x{n_dim}", "bonds": label, "tokens": m,
                           "dir": direction,
                           "GFLOP_fused": sum(c.flops for c in seq["fused"]) / 1e9,
                           "GFLOP_dense": sum(c.flops for c in seq["dense"]) / 1e9,
                           "MB_fused": sum(c.bytes for c in seq["fused"]) / 1e6,
                           "MB_dense": sum(c.bytes for c in seq["dense"]) / 1e6}
                    for gpu in GPUS:
                        tf, td = sequence_seconds(seq["fused"], gpu), sequence_seconds(seq["dense"], gpu)
                        row[f"us_fused_{gpu.name}"] = tf * 1e6
                        row[f"us_dense_{gpu.name}"] = td * 1e6
                        row[f"dense/fused_{gpu.name}"] = td / tf
                    rows.append(row)
    return rows


def _random_cores(in_shape, out_shape, ranks, dtype, device, seed: int = 0) -> list[torch.Tensor]:
    """Random cores whose product W has entries of order 1/sqrt(K) (unit-variance x -> unit-variance y)."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    cores = []
    for q, (i, j) in enumerate(zip(in_shape, out_shape)):
        c = torch.randn(ranks[q], i, j, ranks[q + 1], generator=g) / math.sqrt(ranks[q] * i)
        cores.append(c.to(device=device, dtype=dtype).requires_grad_())
    return cores


def measured_table(tokens_list, max_bond: int, dtype: torch.dtype, device: str, repeat: int, warmup: int = 3,
                   cases=CASES) -> list[dict]:
    """Time the fused and the dense path, interleaved, on every (shape, bonds, tokens); with the model
    time of this GPU beside them when :func:`mpo_core.gpu.devices.model_of_device` knows it."""
    model_gpu = model_of_device(device)
    b = torch.tensor([], dtype=dtype).element_size()
    rows = []
    for k_dim, n_dim in cases:
        in_shape, out_shape = MODES[k_dim], MODES[n_dim]
        for label, ranks in bond_sets(in_shape, out_shape, max_bond).items():
            cores = _random_cores(in_shape, out_shape, ranks, dtype, device)
            bias = torch.randn(n_dim, device=device, dtype=dtype, requires_grad=True)
            for m in tokens_list:
                x = torch.randn(m, k_dim, device=device, dtype=dtype, requires_grad=True)
                params = [x, bias, *cores]

                def fused():
                    return mpo_linear(x, cores, bias, "gelu", backend="triton")

                def dense():
                    w = dense_matrix(cores)
                    return F.gelu(F.linear(x, w.t()) + bias)

                with torch.no_grad():
                    y_f, y_d = fused(), dense()
                    err = ((y_f.float() - y_d.float()).abs().max() / y_d.float().abs().max()).item()
                dy = torch.randn_like(y_d)
                with torch.no_grad():
                    fwd = time_calls({"fused": fused, "dense": dense}, device, warmup=warmup, repeat=repeat)
                step = time_calls({name: (lambda fn=fn: torch.autograd.grad(fn(), params, dy))
                                   for name, fn in (("fused", fused), ("dense", dense))}, device, warmup=warmup, repeat=repeat)
                costs = {path: linear_cost(path, m, in_shape, out_shape, ranks, b) for path in ("fused", "dense")}
                for direction, times, parts in (("fwd", fwd, ("fwd",)), ("fwd+bwd", step, ("fwd", "bwd"))):
                    tf, td = statistics.median(times["fused"]), statistics.median(times["dense"])
                    row = {"kind": "measured", "shape": f"{k_dim}x{n_dim}", "bonds": label, "tokens": m,
                           "dir": direction, "us_fused": tf * 1e6, "us_dense": td * 1e6, "dense/fused": td / tf,
                           "TFLOP/s_fused(useful)": (2 if direction == "fwd" else 6) * m * k_dim * n_dim / tf / 1e12,
                           "max_rel_err_vs_dense": err}
                    if model_gpu is not None:
                        for path, t in (("fused", tf), ("dense", td)):
                            model_us = sequence_seconds([costs[path][p] for p in parts], model_gpu) * 1e6
                            row[f"model_us_{path}"] = model_us
                            row[f"measured/model_{path}"] = t * 1e6 / model_us
                    rows.append(row)
                del x
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    size = parser.add_mutually_exclusive_group()
    size.add_argument("--quick", action="store_true", help="tokens 4096 only")
    size.add_argument("--tiny", action="store_true", help="one small shape (64x96), 16 tokens, bond cap 4, one timed call (smoke test)")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--max-bond", type=int, default=64, help="bond cap of the truncated rows")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--cpu-check", action="store_true",
                        help="without a capable GPU, run the measured path on the CPU under TRITON_INTERPRET=1 "
                             "(float32, slow: use with --tiny)")
    parser.add_argument("--json", default="results/fused_mpo_linear.json", help="where to write the JSON report")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    tokens = [16] if args.tiny else [4096] if args.quick else args.tokens
    max_bond = 4 if args.tiny else args.max_bond
    repeat, warmup = (1, 1) if args.tiny else (15, 3)
    cases = TINY_CASES if args.tiny else CASES
    b = torch.tensor([], dtype=dtype).element_size()
    report: dict = {"dtype": args.dtype, "tokens": tokens, "max_bond": max_bond, "repeat": repeat,
                    "gpus_model": {g.name: vars(g) for g in GPUS}}

    model = model_table(tokens, max_bond, b)
    print(f"MODEL (roofline, not measured): fused MPO linear vs dense rebuild + F.linear + bias + GELU, {args.dtype}")
    cols = ["shape", "bonds", "tokens", "dir", "GFLOP_fused", "GFLOP_dense", "MB_fused", "MB_dense"] + \
        [f"{k}_{gpu.name}" for gpu in GPUS for k in ("us_fused", "us_dense", "dense/fused")]
    print(format_table(model, cols))
    report["model"] = model

    capable = torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 0)
    device = "cuda" if capable else "cpu"
    if capable or args.cpu_check:
        if not capable:
            if os.environ.get("TRITON_INTERPRET") != "1":
                parser.error("--cpu-check needs TRITON_INTERPRET=1 in the environment (set before Python starts)")
            dtype = torch.float32  # the interpreter's half-precision tl.dot is not trustworthy
        info = device_info(device)
        print(f"\nMEASURED on {info['device']} ({str(dtype).removeprefix('torch.')}); dense/fused > 1: fused faster"
              + ("" if capable else " -- CPU interpreter: a check that the path runs, not a performance figure"))
        rows = measured_table(tokens, max_bond, dtype, device, repeat, warmup, cases)
        extra = [k for k in ("model_us_fused", "measured/model_fused", "model_us_dense", "measured/model_dense")
                 if k in rows[0]]
        print(format_table(rows, ["shape", "bonds", "tokens", "dir", "us_fused", "us_dense", "dense/fused",
                                  "TFLOP/s_fused(useful)", "max_rel_err_vs_dense"] + extra))
        report.update(device=info["device"], device_info=info, measured=rows)
    elif torch.cuda.is_available():
        print(f"\n{torch.cuda.get_device_name()} has compute capability {torch.cuda.get_device_capability()}: "
              "the fused kernel needs >= 8.0 (mpo_linear runs the dense path there); model table only")
    else:
        print("\nno GPU: nothing measured (model table only; --tiny --cpu-check runs the path on the CPU)")
    write_json(args.json, report)
    print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
