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
* **measured** (only with a CUDA GPU): both paths timed in the same run with Triton's
  ``do_bench``; ratio ``dense/fused`` per row.

Dense sequence: rebuild ``W`` from the cores (:func:`mpo_core.rebuild.dense_matrix`), ``y = F.linear(x, W.T)``,
``y = y + b``, ``y = F.gelu(y)``; autograd for backward.

    python benchmarks/fused_mpo_linear.py --quick
    python benchmarks/fused_mpo_linear.py --json results/fused_mpo_linear.json
"""
from __future__ import annotations

import argparse
import math
import os
import sys

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_description, format_table, write_json  # noqa: E402

from mpo_core.gpu import A100, H100, linear_cost, sequence_seconds  # noqa: E402
from mpo_core.gpu.shapes import MPO_MODES as MODES  # noqa: E402
from mpo_core.ops.mpo_linear import mpo_linear  # noqa: E402
from mpo_core.rebuild import dense_matrix  # noqa: E402
from mpo_core.shapes import capped_ranks, full_ranks  # noqa: E402

CASES = [(768, 3072), (3072, 768), (1024, 4096), (4096, 1024)]
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


def measured_table(tokens_list, max_bond: int, dtype: torch.dtype) -> list[dict]:
    from triton.testing import do_bench

    rows = []
    for k_dim, n_dim in CASES:
        in_shape, out_shape = MODES[k_dim], MODES[n_dim]
        for label, ranks in bond_sets(in_shape, out_shape, max_bond).items():
            cores = _random_cores(in_shape, out_shape, ranks, dtype, "cuda")
            bias = torch.randn(n_dim, device="cuda", dtype=dtype, requires_grad=True)
            for m in tokens_list:
                x = torch.randn(m, k_dim, device="cuda", dtype=dtype, requires_grad=True)
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
                times = {}
                for name, fn in (("fused", fused), ("dense", dense)):
                    with torch.no_grad():
                        times[name, "fwd"] = do_bench(fn, warmup=25, rep=100) * 1e-3
                    times[name, "fwd+bwd"] = do_bench(lambda fn=fn: fn().backward(dy), warmup=25, rep=100,
                                                      grad_to_none=params) * 1e-3
                for direction in ("fwd", "fwd+bwd"):
                    tf, td = times["fused", direction], times["dense", direction]
                    rows.append({"kind": "measured", "shape": f"{k_dim}x{n_dim}", "bonds": label, "tokens": m,
                                 "dir": direction, "us_fused": tf * 1e6, "us_dense": td * 1e6, "dense/fused": td / tf,
                                 "TFLOP/s_fused(useful)": (2 if direction == "fwd" else 6) * m * k_dim * n_dim / tf / 1e12,
                                 "max_rel_err_vs_dense": err})
                del x
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tokens 4096 only")
    parser.add_argument("--tokens", type=int, nargs="+", default=[4096, 16384, 65536])
    parser.add_argument("--max-bond", type=int, default=64, help="bond cap of the truncated rows")
    parser.add_argument("--dtype", default="bfloat16", choices=["float32", "float16", "bfloat16"])
    parser.add_argument("--json", default="results/fused_mpo_linear.json", help="where to write the JSON report")
    args = parser.parse_args(argv)
    dtype = getattr(torch, args.dtype)
    tokens = [4096] if args.quick else args.tokens
    b = torch.tensor([], dtype=dtype).element_size()
    report: dict = {"dtype": args.dtype, "tokens": tokens, "max_bond": args.max_bond,
                    "gpus_model": {g.name: vars(g) for g in GPUS}}

    model = model_table(tokens, args.max_bond, b)
    print(f"MODEL (roofline, not measured): fused MPO linear vs dense rebuild + F.linear + bias + GELU, {args.dtype}")
    cols = ["shape", "bonds", "tokens", "dir", "GFLOP_fused", "GFLOP_dense", "MB_fused", "MB_dense"] + \
        [f"{k}_{gpu.name}" for gpu in GPUS for k in ("us_fused", "us_dense", "dense/fused")]
    print(format_table(model, cols))
    report["model"] = model

    if torch.cuda.is_available():
        print(f"\nMEASURED on {device_description('cuda')} ({args.dtype}); dense/fused > 1: fused faster")
        rows = measured_table(tokens, args.max_bond, dtype)
        print(format_table(rows, ["shape", "bonds", "tokens", "dir", "us_fused", "us_dense", "dense/fused",
                                  "TFLOP/s_fused(useful)", "max_rel_err_vs_dense"]))
        report.update(device=device_description("cuda"), measured=rows)
    else:
        print("\nno GPU: nothing measured (model table only)")
    write_json(args.json, report)
    print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
