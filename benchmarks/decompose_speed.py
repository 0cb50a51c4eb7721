"""Time ``mpo_core.decompose`` against tensorly, tntorch and a plain numpy TT-SVD.

Default: the weight matrices of a BERT-base-shaped model, against tensorly's
``tensor_train_matrix`` and tntorch's ``TTMatrix`` (each when installed) with the same
shapes (n=5, MPOBERT modes) and the same bonds (the ranks ours picks in a first, untimed
call); the contenders are timed interleaved call by call by the one timer
(:mod:`mpo_core.gpu.timing`, median of ``--repeat`` rounds) with torch, BLAS and OpenMP
threads pinned to ``--threads`` (the run re-starts itself pinned); prints per-shape times,
the ratio to ours and the reconstruction errors, and writes JSON.

``--llm``: LLM-sized matrices (4096x4096, 4096x11008; 8192x28672 with ``--full``) at
``max_bond`` 64/256 and ``rel_tol`` 0.3/0.5. Every contender runs in its own subprocess
(``--threads`` threads) on the same seeded float64 matrix, repeats interleaved: ours with
``method`` auto, exact and randomized, then tensorly, tntorch and numpy at the ranks auto
chose. Reported per call: time (fastest of the repeats), relative error, our certified
bound, peak memory (the subprocess's RSS high-water mark ``VmHWM``, reset after the imports,
minus its RSS before the matrix was made, over the matrix's float64 size: the input matrix
counts as 1; torch's allocations are invisible to tracemalloc, RSS sees them), and the passes
over the matrix the randomized routes cost. The floor is one pass over the matrix,
measured in the same subprocesses: a copy and a GEMV (the faster is the floor).

    python benchmarks/decompose_speed.py            # 12 layers = 72 matrices
    python benchmarks/decompose_speed.py --layers 1 --max-bond 64
    python benchmarks/decompose_speed.py --llm --shapes 4096x11008 --bonds 64,256 --rel-tols none --repeat 2
    python benchmarks/decompose_speed.py --llm --full     # adds 8192x28672 (tens of minutes)
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from collections import defaultdict

import numpy as np
import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import device_description, format_table, write_json  # noqa: E402

from mpo_core.gpu.timing import median_seconds, time_calls  # noqa: E402

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


THREAD_VARS = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def pinned_env(threads: int) -> dict[str, str]:
    """This environment with every BLAS / OpenMP thread count set to ``threads`` (read when they load)."""
    return dict(os.environ, **{var: str(threads) for var in THREAD_VARS})


def threads_pinned(threads: int) -> bool:
    """Whether this process started with every BLAS / OpenMP thread count at ``threads``."""
    return all(os.environ.get(var) == str(threads) for var in THREAD_VARS)


def timed_interleaved(fns: dict, repeat: int) -> tuple[dict, dict]:
    """``(last result, median seconds)`` per contender: ``repeat`` rounds interleaved call by call by the
    one timer (:func:`mpo_core.gpu.timing.time_calls`, ``perf_counter`` on a CPU); each call includes
    the contender's reconstruction of ``W``."""
    results = {}

    def keep(name, fn):
        def go():
            results[name] = fn()
        return go

    seconds = median_seconds({name: keep(name, fn) for name, fn in fns.items()}, "cpu", warmup=0, repeat=repeat)
    return results, seconds


def available(module: str) -> bool:
    try:
        __import__(module)
        return True
    except ImportError:
        return False


# ------------------------------------------------------------------ --llm: one subprocess per call

LLM_SHAPES = ["4096x4096", "4096x11008"]
FULL_SHAPES = ["8192x28672"]
OURS = ("auto", "exact", "randomized")
OTHERS = ("tensorly", "tntorch", "numpy")


def numpy_tt_svd(w, in_shape, out_shape, ranks):
    """Plain numpy TT-SVD at fixed ``ranks`` (full SVD per split, then slice): the textbook baseline."""
    n = len(in_shape)
    rest = w.reshape(*in_shape, *out_shape).transpose([p for k in range(n) for p in (k, n + k)])
    cores = []
    for k in range(n - 1):
        u, s, vt = np.linalg.svd(rest.reshape(ranks[k] * in_shape[k] * out_shape[k], -1), full_matrices=False)
        r = ranks[k + 1]
        cores.append(u[:, :r].reshape(ranks[k], in_shape[k], out_shape[k], r))
        rest = s[:r, None] * vt[:r]
    cores.append(rest.reshape(ranks[-2], in_shape[-1], out_shape[-1], 1))
    return cores


def _status_bytes(field: str) -> int:
    with open("/proc/self/status") as f:
        line = next(line for line in f if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak() -> None:
    """Reset the RSS high-water mark (Linux: writing 5 to clear_refs), so imports do not count."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _worker(spec: dict) -> dict:
    """Run one contender on one seeded matrix; time, peak RSS, error (after the peak is read)."""
    torch.set_num_threads(spec["threads"])
    rows, cols = spec["rows"], spec["cols"]
    in_shape, out_shape, ranks = spec["in_shape"], spec["out_shape"], spec["ranks"]
    _reset_peak()
    base = _status_bytes("VmRSS")
    w = torch.randn(rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(spec["seed"]))
    x = torch.randn(cols, dtype=torch.float64)
    # one pass over the matrix, two ways (the faster is the floor), by the same timer as the contender
    floor = {name: ts[0] for name, ts in time_calls({"copy": w.clone, "gemv": lambda: w @ x}, "cpu", warmup=0,
                                                    repeat=1).items()}
    lib, out, made = spec["contender"], {}, {}
    if lib in OURS:
        def call():
            made["mpo"] = decompose(w, in_shape, out_shape, max_bond=spec["max_bond"], rel_tol=spec["rel_tol"],
                                    method=lib, seed=spec["seed"])
    elif lib == "tensorly":
        from tensorly.decomposition import tensor_train_matrix
        from tensorly.tt_matrix import tt_matrix_to_tensor

        def call():
            made["tt"] = tensor_train_matrix(w.numpy().reshape(*in_shape, *out_shape), ranks)
    elif lib == "tntorch":
        import tntorch

        def call():
            made["tt"] = tntorch.TTMatrix(w, ranks[1:-1], list(in_shape), list(out_shape))
    else:
        def call():
            made["cores"] = numpy_tt_svd(w.numpy(), in_shape, out_shape, ranks)
    seconds = time_calls({lib: call}, "cpu", warmup=0, repeat=1)[lib][0]  # the decomposition alone
    peak = _status_bytes("VmHWM")
    if lib in OURS:
        mpo = made["mpo"]
        dense = mpo.to_dense()
        out = {"ranks": mpo.ranks, "bound": mpo.error_bound / mpo.norm, "routes": mpo.metadata["routes"],
               "passes": mpo.metadata["passes_over_matrix"] if lib != "exact" else None}
    elif lib == "tensorly":
        dense = torch.from_numpy(tt_matrix_to_tensor(made["tt"]).reshape(rows, cols))
    elif lib == "tntorch":
        dense = made["tt"].torch().reshape(rows, cols)
    else:
        from mpo_core import MPO

        dense = MPO([torch.from_numpy(np.ascontiguousarray(c)) for c in made["cores"]]).to_dense()
    out.update(seconds=seconds, floor_s=min(floor.values()), copy_s=floor["copy"], gemv_s=floor["gemv"],
               err=_rel_err(dense, w), peak_x=(peak - base) / (rows * cols * 8))
    return out


def _run_worker(spec: dict) -> dict:
    env = pinned_env(spec["threads"])
    proc = subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", json.dumps(spec)],
                          capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise RuntimeError(f"worker {spec['contender']} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _parse_list(text: str, kind) -> list:
    return [None if t == "none" else kind(t) for t in text.split(",") if t]


def llm(args) -> dict:
    """The ``--llm`` run: configs x contenders, repeats interleaved, ratios to ``auto`` from the same run."""
    shapes = _parse_list(args.shapes, str) if args.shapes else LLM_SHAPES + (FULL_SHAPES if args.full else [])
    configs = [("max_bond", b) for b in _parse_list(args.bonds, int) if b is not None]
    configs += [("rel_tol", t) for t in _parse_list(args.rel_tols, float) if t is not None]
    contenders = [c for c in args.contenders.split(",") if c in OURS or available(c) or c == "numpy"]
    rows_out = []
    for shape in shapes:
        rows, cols = (int(v) for v in shape.split("x"))
        in_shape, out_shape = factorize(rows, args.n), factorize(cols, args.n)
        for kind, value in configs:
            base = {"rows": rows, "cols": cols, "in_shape": list(in_shape), "out_shape": list(out_shape),
                    "seed": args.seed, "threads": args.threads, "max_bond": None, "rel_tol": None, "ranks": None}
            base[kind] = value
            results: dict[str, list[dict]] = defaultdict(list)
            ranks = None
            for rep in range(args.repeat):
                for lib in contenders:
                    spec = dict(base, contender=lib, ranks=ranks)
                    if lib in OTHERS and ranks is None:
                        results[lib].append(_run_worker(dict(spec, contender="auto")))  # ranks first
                        ranks = results[lib].pop()["ranks"]
                        spec["ranks"] = ranks
                    res = _run_worker(spec)
                    results[lib].append(res)
                    if lib == "auto":
                        ranks = res["ranks"]
                    print(f"{shape} {kind}={value} rep {rep + 1}/{args.repeat} {lib}: {res['seconds']:.2f} s "
                          f"err {res['err']:.5f}", file=sys.stderr, flush=True)
            exact_err = min(r["err"] for r in results["exact"]) if "exact" in results else None
            for lib, runs in results.items():
                best = min(runs, key=lambda r: r["seconds"])
                row = {"shape": shape, "config": f"{kind}={value}", "contender": lib,
                       "ranks": str(best.get("ranks", ranks)), "seconds": best["seconds"],
                       "floor_s": min(r["floor_s"] for r in runs), "err": best["err"], "bound": best.get("bound"),
                       "peak_x": max(r["peak_x"] for r in runs), "passes": best.get("passes"),
                       "routes": ",".join(best.get("routes", []))}
                row["time/floor"] = row["seconds"] / row["floor_s"]
                if exact_err:
                    row["err/exact"] = row["err"] / exact_err
                # same-run ratio: this contender's time over auto's, repeat by repeat, best kept
                if "auto" in results and lib != "auto":
                    row["x_vs_auto"] = min(r["seconds"] for r in runs) / min(r["seconds"] for r in results["auto"])
                rows_out.append(row)
    columns = ["shape", "config", "contender", "ranks", "seconds", "x_vs_auto", "err", "err/exact", "bound",
               "peak_x", "passes", "floor_s", "time/floor", "routes"]
    print(f"\ndecompose at LLM scale (n={args.n}, float64, {args.threads} threads, fastest of {args.repeat} "
          f"interleaved repeats; x_vs_auto = contender time / auto time; peak_x = peak RSS / matrix float64 size)")
    print(format_table(rows_out, columns))
    payload = {"benchmark": "decompose_speed_llm", "args": vars(args), "rows": rows_out}
    write_json(args.json, payload)
    print(f"wrote {args.json}")
    return payload


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    parser.add_argument("--llm", action="store_true", help="LLM-sized matrices, one subprocess per call")
    parser.add_argument("--full", action="store_true", help="with --llm: add 8192x28672")
    parser.add_argument("--shapes", default=None, help="with --llm: comma-separated ROWSxCOLS (default 4096x4096,4096x11008)")
    parser.add_argument("--bonds", default="64,256", help="with --llm: max_bond values ('none' for none)")
    parser.add_argument("--rel-tols", default="0.3,0.5", help="with --llm: rel_tol values ('none' for none)")
    parser.add_argument("--contenders", default=",".join(OURS + OTHERS), help="with --llm: which to run")
    parser.add_argument("--threads", type=int, default=2,
                        help="torch/BLAS/OpenMP threads (--llm: per subprocess; default mode: the run re-starts "
                             "itself with them pinned when the environment does not already pin them)")
    parser.add_argument("--n", type=int, default=5, help="with --llm: number of cores")
    parser.add_argument("--layers", type=int, default=12, help="number of BERT-base layers (6 matrices each)")
    parser.add_argument("--max-bond", type=int, default=None, help="bond cap (default: exact, full rank)")
    parser.add_argument("--repeat", type=int, default=1,
                        help="rounds per contender (default mode: interleaved, median; --llm: fastest)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", default=None, help="default results/decompose_speed[_llm].json")
    args = parser.parse_args(argv)
    if args.worker:
        print(json.dumps(_worker(json.loads(args.worker))))
        return {}
    if args.llm:
        args.json = args.json or "results/decompose_speed_llm.json"
        return llm(args)
    args.json = args.json or "results/decompose_speed.json"
    if args.threads < 1 or args.repeat < 1:
        raise SystemExit("--threads and --repeat must be >= 1")
    if not threads_pinned(args.threads):  # BLAS reads its thread count when it loads: start again pinned
        proc = subprocess.run([sys.executable, os.path.abspath(__file__), *(sys.argv[1:] if argv is None else argv)],
                              env=pinned_env(args.threads))
        if proc.returncode != 0:
            raise SystemExit(proc.returncode)
        with open(args.json) as f:
            return json.load(f)
    torch.set_num_threads(args.threads)

    torch.manual_seed(args.seed)
    libs = ["mpo_core"] + [name for name in ("tensorly", "tntorch") if available(name)]
    totals = defaultdict(float)
    per_shape: dict[tuple, dict] = {}
    num = 0
    for layer in range(args.layers):
        for kind, rows, cols in LAYER_SHAPES:
            in_shape, out_shape = factorize(rows, 5), factorize(cols, 5)
            w = torch.randn(rows, cols, dtype=torch.float64) * 0.02
            # the ranks ours chooses (a first, untimed call), then every contender at them, interleaved
            ranks = run_ours(w, in_shape, out_shape, args.max_bond)[0]
            fns = {"mpo_core": lambda: run_ours(w, in_shape, out_shape, args.max_bond)}
            for lib, fn in (("tensorly", run_tensorly), ("tntorch", run_tntorch)):
                if lib in libs:
                    fns[lib] = lambda fn=fn: fn(w, in_shape, out_shape, ranks)
            out, t = timed_interleaved(fns, args.repeat)
            _, _, bound = out["mpo_core"]
            errs = {lib: _rel_err(out[lib][1] if lib == "mpo_core" else out[lib], w) for lib in out}
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
          f"{'exact' if args.max_bond is None else f'max_bond={args.max_bond}'}), {device_description('cpu')}, "
          f"BLAS/OpenMP threads pinned to {args.threads}; median of {args.repeat} interleaved rounds")
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
