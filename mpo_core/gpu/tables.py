"""The model tables the benchmarks print: fused ops vs torch, MPO linear strategies; and the table formatter."""
from __future__ import annotations

from typing import Sequence

from mpo_core.gpu.devices import A100, H100, Gpu, roofline_seconds, sequence_seconds
from mpo_core.gpu.kernel_model import fused_op_kernels
from mpo_core.gpu.linear import LINEAR_STRATEGIES, linear_cost
from mpo_core.gpu.shapes import BERT_TOKENS, LINEAR_SHAPES, MPO_MODES, OP_HIDDEN
from mpo_core.gpu.step import MODEL
from mpo_core.shapes import capped_ranks

__all__ = ["FUSED_OP_COLUMNS", "LINEAR_COLUMNS", "format_rows", "fused_op_rows", "linear_rows"]


def format_rows(rows: Sequence[dict], columns: Sequence[str]) -> str:
    """A fixed-width text table (first column left-aligned, numbers to 3 significant digits)."""
    def cell(v) -> str:
        if isinstance(v, bool) or not isinstance(v, float):
            return str(v)
        return f"{v:.3g}" if abs(v) < 1e5 else f"{v:.3e}"

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[k]) for row in cells]) for k, c in enumerate(columns)]
    fmt = lambda vals: "  ".join(v.ljust(w) if k == 0 else v.rjust(w) for k, (v, w) in enumerate(zip(vals, widths)))  # noqa: E731
    return "\n".join([fmt(list(columns)), fmt(["-" * w for w in widths])] + [fmt(r) for r in cells])



def fused_op_rows(tokens: int = BERT_TOKENS, dtype_bytes: int = 2, devices: Sequence[Gpu] = (A100, H100),
                  hidden: dict[str, Sequence[int]] | None = None) -> list[dict]:
    """The model table of the fused ops: ours vs the torch sequence, per op, direction and row length.

    Columns: FLOPs, MB read / written by our kernels, MB of torch's sequence, their ratio, and
    the roofline time of each (sum over its kernels) per device. Every row has ``kind="model"``.
    """
    rows = []
    for op, sizes in (hidden or OP_HIDDEN).items():
        for n in sizes:
            for direction in ("fwd", "bwd"):
                ours = fused_op_kernels(op, direction, tokens, n, dtype_bytes)
                theirs = fused_op_kernels(op, direction, tokens, n, dtype_bytes, "torch")
                o, t = sum(ours[1:], ours[0]), sum(theirs[1:], theirs[0])
                row = {"kind": MODEL, "op": op, "dir": direction, "tokens": tokens, "hidden": n,
                       "MFLOP": o.flops / 1e6, "MB_read": o.bytes_read / 1e6, "MB_written": o.bytes_written / 1e6,
                       "MB_fused": o.bytes / 1e6, "MB_torch": t.bytes / 1e6, "torch/fused_bytes": t.bytes / o.bytes}
                for d in devices:
                    row[f"us_fused_{d.name}"] = sequence_seconds(ours, d) * 1e6
                    row[f"us_torch_{d.name}"] = sequence_seconds(theirs, d) * 1e6
                rows.append(row)
    return rows


def linear_rows(tokens: int = BERT_TOKENS, shapes: Sequence[tuple[int, int]] | None = None, dtype_bytes: int = 2,
                devices: Sequence[Gpu] = (A100, H100), strategies: Sequence[str] = LINEAR_STRATEGIES,
                max_bond: int | None = None) -> list[dict]:
    """The model table of one MPO linear ``gelu(x W + b)`` per strategy at BERT shapes (``n = 5`` MPOBERT modes).

    ``max_bond`` caps every bond (``None``: full rank, as MPOBERT). Columns: GFLOP, MB read /
    written, roofline time per device, and the time of ``dense`` (the unfused torch sequence)
    over this strategy's (> 1: faster than unfused). Every row has ``kind="model"``.
    """
    rows = []
    for k, n in shapes or LINEAR_SHAPES:
        in_shape, out_shape = MPO_MODES[k], MPO_MODES[n]
        ranks = capped_ranks(in_shape, out_shape, max_bond)
        costs = {s: linear_cost(s, tokens, in_shape, out_shape, ranks, dtype_bytes) for s in strategies}
        dense = linear_cost("dense", tokens, in_shape, out_shape, ranks, dtype_bytes)
        for direction in ("fwd", "bwd"):
            for strategy, cost in costs.items():
                c = cost[direction]
                row = {"kind": MODEL, "shape": f"{k}x{n}", "bonds": "full" if max_bond is None else f"<={max_bond}",
                       "strategy": strategy, "dir": direction, "tokens": tokens, "GFLOP": c.flops / 1e9,
                       "MB_read": c.bytes_read / 1e6, "MB_written": c.bytes_written / 1e6}
                for d in devices:
                    t = roofline_seconds(c, d)
                    row[f"us_{d.name}"] = t * 1e6
                    row[f"dense/this_{d.name}"] = roofline_seconds(dense[direction], d) / t
                rows.append(row)
    return rows


FUSED_OP_COLUMNS = ("op", "dir", "hidden", "MFLOP", "MB_read", "MB_written", "MB_torch", "torch/fused_bytes",
                    "us_fused_A100-80GB", "us_torch_A100-80GB", "us_fused_H100-SXM", "us_torch_H100-SXM")
LINEAR_COLUMNS = ("shape", "strategy", "dir", "GFLOP", "MB_read", "MB_written", "us_A100-80GB",
                  "dense/this_A100-80GB", "us_H100-SXM", "dense/this_H100-SXM")
