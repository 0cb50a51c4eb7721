"""The command line of checkpoint compression (parsing only)::

    python -m mpo_core.compress_checkpoint IN_DIR OUT_DIR --max-bond 64            # n=2: truncated SVD
    python -m mpo_core.compress_checkpoint IN_DIR OUT_DIR --n auto --budget 0.25   # per matrix, the family's member
    torchrun --nproc-per-node 2 -m mpo_core.compress_checkpoint IN_DIR OUT_DIR --rel-tol 0.3
    python -m mpo_core.compress_checkpoint --merge OUT_DIR DENSE_DIR --reference IN_DIR
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from mpo_core.compress_checkpoint.merge import merge_checkpoint
from mpo_core.compress_checkpoint.plan import OUT_DTYPES, Settings
from mpo_core.compress_checkpoint.report import format_summary, return_freed_memory
from mpo_core.compress_checkpoint.run import compress_checkpoint

__all__ = ["parser", "main"]


def _cores(text: str) -> int | str:
    """``--n``: an int >= 2 or ``auto``."""
    if text == "auto":
        return text
    try:
        n = int(text)
    except ValueError:
        n = 0
    if n < 2:
        raise argparse.ArgumentTypeError(f"must be an int >= 2 or auto, got {text!r}")
    return n


def parser() -> argparse.ArgumentParser:
    defaults = Settings(max_bond=1)
    p = argparse.ArgumentParser(prog="python -m mpo_core.compress_checkpoint", description=(
        "Compress every linear weight of a safetensors checkpoint folder into MPO cores, one matrix at a time; "
        "rerun the same command to resume; run under torchrun to split the matrices across processes."))
    p.add_argument("in_dir", help="transformers checkpoint folder (model.safetensors, or shards + index); "
                                  "with --merge: a compress_checkpoint output")
    p.add_argument("out_dir", help="new or empty folder, or the unfinished run to resume; with --merge: the dense output")
    p.add_argument("--n", type=_cores, default=defaults.n,
                   help="cores per matrix (2: truncated SVD, the default), or auto: per matrix, the family's member "
                        "under that matrix's own --budget / --max-bond (as entries) or --rel-tol")
    p.add_argument("--cores", type=int, nargs="+", default=list(defaults.cores),
                   help="with --n auto: the numbers of cores considered (2: truncated SVD)")
    p.add_argument("--max-bond", type=int, help="cap on every bond")
    p.add_argument("--rel-tol", type=float, help="relative error tolerance per matrix (decompose's rel_tol)")
    p.add_argument("--budget", type=float, help="fraction of each matrix's entries its cores may hold")
    p.add_argument("--include", nargs="+", default=list(defaults.include), help="tensors to decompose (names, suffixes, globs)")
    p.add_argument("--exclude", nargs="*", default=list(defaults.exclude), help="tensors to leave dense")
    p.add_argument("--dtype", default=None, choices=list(OUT_DTYPES),
                   help="dtype of the cores (default: each matrix's own); with --merge, of the dense weights")
    p.add_argument("--device", default=defaults.device, help="where decompose runs (cuda: each rank its LOCAL_RANK GPU)")
    p.add_argument("--threads", type=int, default=defaults.threads, help="torch threads per process (pinned)")
    p.add_argument("--progress", default="auto", choices=["auto", "bar", "lines", "none"])
    p.add_argument("--json", help="also write the summary (or the merge report) to this JSON file")
    p.add_argument("--merge", action="store_true", help="merge IN_DIR (an MPO checkpoint) back to a dense OUT_DIR")
    p.add_argument("--reference", help="with --merge: the original checkpoint, to measure the merged error")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    return_freed_memory()
    try:
        if args.merge:
            report = merge_checkpoint(args.in_dir, args.out_dir, args.reference, args.dtype, args.progress)
            text = f"merged {len(report['matrices'])} matrices: worst relative bound {report['worst_rel_bound']:.4g}"
            if report["worst_rel_error"] is not None:
                text += f", worst measured relative error {report['worst_rel_error']:.4g}"
            print(text, flush=True)
        else:
            settings = Settings(n=args.n, cores=tuple(args.cores), max_bond=args.max_bond, rel_tol=args.rel_tol, budget=args.budget,
                                include=tuple(args.include), exclude=tuple(args.exclude), dtype=args.dtype or "input",
                                device=args.device, threads=args.threads)
            report = compress_checkpoint(args.in_dir, args.out_dir, settings, progress=args.progress)
            if "matrices" in report:
                print(format_summary(report), flush=True)
    except (ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if args.json and "matrices" in report:
        from mpo_core.io import atomic_write

        atomic_write(os.path.abspath(args.json), (json.dumps(report, indent=2) + "\n").encode())
    return 0
