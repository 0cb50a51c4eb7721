"""Time ``mpo_core.decompose`` on the weight matrices of a BERT-base-shaped model.

Compares, in one run and on the same float64 inputs, against tensorly's
``tensor_train_matrix`` and tntorch's ``TTMatrix`` (each when installed) with the same
shapes (n=5, MPOBERT modes) and the same bonds; prints per-shape times, the ratio to
ours and the reconstruction errors, and writes JSON.

    python benchmarks/decompose_speed.py            # 12 layers = 72 matrices
    python benchmarks/decompose_speed.py --layers 1 --max-bond 64
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from collections import defaultdict

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_description, format_table, write_json  # noqa: E402

from mpo_core import decompose, factorize  # noqa: E402

HIDDEN, INTERMEDIATE = 768, 3072
LAYER_SHAPES = [("attn", HIDDEN, HIDDEN)] * 4 + [("ffn_in", HIDDEN, INTERMEDIATE), ("ffn_out", INTERMEDIATE, HIDDEN)]


def _rel_err(dense: torch.Tensor, w: torch.Tensor) -> float:
    return float(torch.linalg.vector_norm(dense - w) / torch.linalg.vector_norm(w))


def run_ours(w, in_shape, out_shape, max_bond):
    mpo = decompose(w, in_shape, out_shape, max_bond=max_bond)
    return mpo.ranks, mpo.to_dense(), mpo.error_bound


def run_tensorly(w, in_shape, out_shape, ranks):
    from tensorly.decomposition import tensor_train_matrix
    from tensorly.tt_matrix import tt_matrix_to_tensor

    tt = tensor_train_matrix(w.numpy().reshape(*in_shape, *out_shape), ranks)
    return torch.from_numpy(tt_matrix_to_tensor(tt).reshape(w.shape))


def run_tntorch(w, in_shape, out_shape, ranks):
    import tntorch

    tt = tntorch.TTMatrix(w, ranks[1:-1], list(in_shape), list(out_shape))
    return tt.torch().reshape(w.shape)


def fastest(fn, repeat: int):
    """``(result, seconds)`` of the fastest of ``repeat`` calls of ``fn`` (each includes the reconstruction)."""
    best, result = float("inf"), None
    for _ in range(max(repeat, 1)):
        start = time.perf_counter()
        result = fn()
        best = min(best, time.perf_counter() - start)
    return result, best


def available(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=12, help="number of BERT-base layers (6 matrices each)")
    parser.add_argument("--max-bond", type=int, default=None, help="bond cap (default: exact, full rank)")
    parser.add_argument("--repeat", type=int, default=1, help="time each call this many times, keep the fastest")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default="results/decompose_speed.json")
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    libs = ["mpo_core"] + [name for name in ("tensorly", "tntorch") if available(name)]
    totals = defaultdict(float)
    per_shape: dict[tuple, dict] = {}
    num = 0
    for layer in range(args.layers):
        for kind, rows, cols in LAYER_SHAPES:
            in_shape, out_shape = factorize(rows, 5), factorize(cols, 5)
            w = torch.randn(rows, cols, dtype=torch.float64) * 0.02
            t, errs = {}, {}
            (ranks, dense, bound), t["mpo_core"] = fastest(lambda: run_ours(w, in_shape, out_shape, args.max_bond),
                                                          args.repeat)
            errs["mpo_core"] = _rel_err(dense, w)
            for lib, fn in (("tensorly", run_tensorly), ("tntorch", run_tntorch)):
                if lib in libs:
                    dense_lib, t[lib] = fastest(lambda: fn(w, in_shape, out_shape, ranks), args.repeat)
                    errs[lib] = _rel_err(dense_lib, w)
            key = (kind, rows, cols)
            entry = per_shape.setdefault(
                key, {"shape": f"{rows}x{cols}", "ranks": str(ranks), "count": 0, "bound_rel": bound / float(w.norm())}
            )
            entry["count"] += 1
            for lib in t:
                entry[f"{lib}_s"] = entry.get(f"{lib}_s", 0.0) + t[lib]
                entry[f"{lib}_err"] = max(entry.get(f"{lib}_err", 0.0), errs[lib])
                totals[lib] += t[lib]
            num += 1
        print(f"layer {layer + 1}/{args.layers} done ({num} matrices)", file=sys.stderr, flush=True)

    rows_out = []
    for entry in per_shape.values():
        row = dict(entry)
        for lib in libs[1:]:
            row[f"{lib}/ours"] = entry[f"{lib}_s"] / entry["mpo_core_s"]
        rows_out.append(row)
    columns = ["shape", "count", "ranks", "mpo_core_s", "mpo_core_err", "bound_rel"]
    for lib in libs[1:]:
        columns += [f"{lib}_s", f"{lib}_err", f"{lib}/ours"]
    print(f"\ndecompose on {num} BERT-base-shaped matrices (n=5, "
          f"{'exact' if args.max_bond is None else f'max_bond={args.max_bond}'}), {device_description('cpu')}")
    print(format_table(rows_out, columns))
    summary = {lib: totals[lib] for lib in libs}
    ratios = {f"{lib}/ours": totals[lib] / totals["mpo_core"] for lib in libs[1:]}
    print("\ntotal seconds:", {k: round(v, 3) for k, v in summary.items()}, " ratios:",
          {k: round(v, 2) for k, v in ratios.items()})
    payload = {"benchmark": "decompose_speed", "args": vars(args), "per_shape": rows_out,
               "total_seconds": summary, "ratios": ratios}
    write_json(args.json, payload)
    print(f"wrote {args.json}")
    return payload


if __name__ == "__main__":
    main()
