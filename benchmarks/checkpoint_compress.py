"""Compress a synthetic LLaMA-2-7B-shaped checkpoint with ``python -m mpo_core.compress_checkpoint``.

Reports matrices/s, GB/s, peak RSS against the largest matrix, 1 vs 2 processes (``torchrun``, gloo, one
thread each), and extrapolates to the whole 7B and to 70B: on this CPU linearly from the measured layers,
and on one and eight GPUs from the repository's cost model (``mpo_core.cost``; labelled "model").

The checkpoint is generated lazily, one shard per layer (its q/k/v/o/gate/up/down weights and two norms;
LLaMA-2 7B: hidden 4096, intermediate 11008, 32 layers, random Gaussian weights in ``--dtype``), each
written just before it is needed. Only ``--layers`` of the 32 run (default 2, a few minutes on two
cores): the output says it is partial, and whole-model times are the measured per-layer time times 32
(70B: its 80 layers, each the measured layer time times the cost model's 70B-to-7B layer ratio), plus the
embeddings and LM head (32000 x 4096 each, copied through untouched: timed on their own shard, as
``compress_checkpoint``'s copy unit does it: written, then hashed). ``--one-shard``: the disk holds one
input shard at a time (each layer is its own checkpoint folder, compressed, then deleted before the next
is written; times summed). Random weights: the time at a fixed bond does not depend on the spectrum,
but the errors are not a real model's.

Cost model of one matrix (``m x N``, bond ``r``, sketch ``k = r + 10``, one power iteration, the
route ``decompose`` takes for ``--n 2``): GEMMs ``m N k`` (sketch), ``2 m N k`` (power iteration),
``m N k`` (Ritz), ``m N r`` (projection), ``m N r`` (the row-block rebuild that measures the error),
in float64; every pass (the norm, those five, the error) reads the matrix as stored and writes and
reads its float64 block; plus its copy to the GPU over PCIe (``PCIE_BYTES_PER_S``). Not modelled:
reading the shards from disk, hashing them, writing the cores.

Run (the lead's timing command, on a quiet machine):

    python benchmarks/checkpoint_compress.py                         # 2 layers, bf16, bond 64, 1 and 2 processes
    python benchmarks/checkpoint_compress.py --layers 32 --one-shard # the whole 7B, one shard on disk at a time
"""
from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, write_json  # noqa: E402

from mpo_core.compress_checkpoint.files import (checkpoint_tensors, file_sha256, read_header,  # noqa: E402
                                                tensor_bytes, write_safetensors)
from mpo_core.compress_checkpoint.plan import Unit, assign  # noqa: E402
from mpo_core.cost import Cost, device_model, gemm_cost  # noqa: E402
from mpo_core.gpu.devices import H100  # noqa: E402
from mpo_core.io import atomic_write  # noqa: E402
from mpo_core.randomized import OVERSAMPLE  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
PCIE_BYTES_PER_S = 25e9  # host -> GPU, PCIe 4.0 x16 as measured in practice (an assumption, stated in the output)


# LLaMA-2: (hidden, intermediate, layers, key/value width, vocabulary)
SHAPES = {"7B": (4096, 11008, 32, 4096, 32000), "70B": (8192, 28672, 80, 1024, 32000)}


def layer_matrices(hidden: int, inter: int, kv: int) -> dict[str, tuple[int, int]]:
    """One LLaMA layer's linear weights, ``nn.Linear``'s ``(out, in)``."""
    return {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
            "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
            "mlp.down_proj": (hidden, inter)}


def _save(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """A safetensors file, written atomically (each tensor's bytes taken as it comes: one copy in memory)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_safetensors(str(path), [(name, *tensor_bytes(t)) for name, t in tensors.items()])


def write_layer(folder: Path, layer: int, hidden: int, inter: int, kv: int, dtype: torch.dtype, seed: int) -> Path:
    """Layer ``layer``'s shard (its matrices, Gaussian with std 0.02, and its two norms) in ``folder``."""
    gen = torch.Generator().manual_seed(seed * 1000 + layer)
    p = f"model.layers.{layer}."
    shards = [(p + name + ".weight", *tensor_bytes((torch.randn(rows, cols, generator=gen) * 0.02).to(dtype)))
              for name, (rows, cols) in layer_matrices(hidden, inter, kv).items()]
    shards += [(p + norm, *tensor_bytes(torch.ones(hidden, dtype=dtype)))
               for norm in ("input_layernorm.weight", "post_attention_layernorm.weight")]
    path = folder / f"layer-{layer:05d}.safetensors"
    folder.mkdir(parents=True, exist_ok=True)
    write_safetensors(str(path), shards)
    return path


def write_index(folder: Path, hidden: int, inter: int, kv: int, layers: int) -> None:
    """``model.safetensors.index.json`` over the folder's shards, and a LlamaConfig ``config.json``."""
    weight_map = {}
    for shard in sorted(folder.glob("*.safetensors")):
        weight_map.update({name: shard.name for name in read_header(str(shard))})
    atomic_write(str(folder / "model.safetensors.index.json"),
                 json.dumps({"metadata": {}, "weight_map": weight_map}).encode())
    config = {"model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": hidden,
              "intermediate_size": inter, "num_hidden_layers": layers, "num_attention_heads": hidden // 128,
              "num_key_value_heads": kv // 128, "vocab_size": SHAPES["7B"][4], "rms_norm_eps": 1e-5}
    atomic_write(str(folder / "config.json"), json.dumps(config).encode())


def time_embeddings_copy(work: Path, hidden: int, vocab: int, dtype: torch.dtype, seed: int) -> dict:
    """The embeddings, final norm and LM head written as one shard, then copied as ``compress_checkpoint``'s
    copy unit does (input hashed, tensors copied in chunks to a new file, that file hashed): seconds, bytes."""
    gen = torch.Generator().manual_seed(seed)
    folder = work / "embeddings"
    _save(folder / "model.safetensors", {
        "model.embed_tokens.weight": (torch.randn(vocab, hidden, generator=gen) * 0.02).to(dtype),
        "lm_head.weight": (torch.randn(vocab, hidden, generator=gen) * 0.02).to(dtype),
        "model.norm.weight": torch.ones(hidden, dtype=dtype)})
    entries, shards = checkpoint_tensors(str(folder))
    start = time.perf_counter()
    file_sha256(shards["model.safetensors"])
    out = str(work / "embeddings-copy.safetensors")
    size = write_safetensors(out, [(e.name, e.dtype, e.shape, e) for e in entries])
    file_sha256(out)
    seconds = time.perf_counter() - start
    shutil.rmtree(folder)
    os.remove(out)
    return {"seconds": seconds, "bytes": size}


def compress(in_dir: Path, out_dir: Path, procs: int, args: argparse.Namespace) -> dict:
    """One ``compress_checkpoint`` run in a subprocess (``torchrun`` for ``procs > 1``): its summary and wall time."""
    summary_path = out_dir.parent / f"{out_dir.name}.summary.json"
    launcher = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", str(procs)]
                if procs > 1 else [sys.executable])
    command = [*launcher, "-m", "mpo_core.compress_checkpoint", str(in_dir), str(out_dir),  # --n 2: the default
               "--max-bond", str(args.max_bond), "--threads", "1", "--device", args.device, "--progress", "none", "--json", str(summary_path)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    start = time.perf_counter()
    run = subprocess.run(command, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if run.returncode != 0:
        raise SystemExit(f"compress_checkpoint failed ({procs} process(es)):\n{(run.stdout + run.stderr)[-3000:]}")
    summary = json.loads(summary_path.read_text())
    summary_path.unlink()
    return {**summary, "wall_seconds": wall}


def run_procs(work: Path, procs: int, args: argparse.Namespace, shape: tuple[int, ...]) -> dict:
    """All ``--layers`` compressed by ``procs`` processes: one folder, or (``--one-shard``) one folder per layer."""
    hidden, inter, _, kv, _ = shape
    dtype = DTYPES[args.dtype]
    groups = [[i] for i in range(args.layers)] if args.one_shard else [list(range(args.layers))]
    totals = {"seconds": 0.0, "wall_seconds": 0.0, "matrices": 0, "bytes_read": 0, "peak_grew": 0, "largest": 0}
    for group in groups:
        in_dir, out_dir = work / f"in-{procs}", work / f"out-{procs}"
        for layer in group:
            write_layer(in_dir, layer, hidden, inter, kv, dtype, args.seed)
        write_index(in_dir, hidden, inter, kv, args.layers)
        summary = compress(in_dir, out_dir, procs, args)
        shutil.rmtree(in_dir)
        shutil.rmtree(out_dir)
        for key in ("seconds", "wall_seconds", "matrices", "bytes_read"):
            totals[key] += summary[key]
        totals["peak_grew"] = max(totals["peak_grew"], summary["peak_rss_bytes"] - summary["baseline_rss_bytes"])
        totals["largest"] = max(totals["largest"], summary["largest_matrix_entries"])
        totals["worst_rel_bound"] = max(totals.get("worst_rel_bound", 0.0), summary["worst_rel_bound"])
    return totals


def matrix_cost(rows: int, cols: int, bond: int, stored_bytes: int) -> tuple[Cost, float]:
    """Modelled work of one matrix (see the module docstring) and its PCIe seconds."""
    k = bond + OVERSAMPLE
    gemms = (gemm_cost(rows, cols, k, 8) + gemm_cost(cols, rows, k, 8) + gemm_cost(rows, cols, k, 8)
             + gemm_cost(k, rows, cols, 8) + gemm_cost(bond, rows, cols, 8) + gemm_cost(rows, bond, cols, 8))
    passes = 7  # the norm, sketch, two power-iteration products, Ritz, projection, error
    conversions = Cost(bytes_read=passes * rows * cols * (stored_bytes + 8), bytes_written=passes * rows * cols * 8,
                       launches=0)
    return gemms + conversions, rows * cols * stored_bytes / PCIE_BYTES_PER_S


def model_seconds(name: str, bond: int, stored_bytes: int, gpus: int) -> dict:
    """Modelled seconds of a whole model's matrices on ``gpus`` H100s (largest first onto the least loaded)."""
    hidden, inter, layers, kv, _ = SHAPES[name]
    units = []
    for layer in range(layers):
        for mat, (rows, cols) in layer_matrices(hidden, inter, kv).items():
            cost, pcie = matrix_cost(rows, cols, bond, stored_bytes)
            seconds = H100.model.seconds(cost, torch.float64) + pcie
            units.append(Unit(f"{layer:03d}.{mat}", "matrix", (), seconds))
    loads = [sum(u.cost for u in share) for share in assign(units, gpus)]
    return {"seconds": max(loads), "matrices": len(units)}


def layer_model_seconds(hidden: int, inter: int, kv: int, bond: int, stored_bytes: int) -> float:
    """Modelled seconds of one layer's matrices on the CPU entry of the cost model (only ratios are used)."""
    return sum(device_model("cpu").seconds(matrix_cost(r, c, bond, stored_bytes)[0], torch.float64)
               for r, c in layer_matrices(hidden, inter, kv).values())


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="layers of the 32 to generate and compress")
    parser.add_argument("--procs", default="1,2", help="process counts to compare (comma-separated)")
    parser.add_argument("--max-bond", type=int, default=64, help="bond of every matrix (--n 2: the truncated SVD)")
    parser.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPES), help="dtype of the checkpoint")
    parser.add_argument("--device", default="cpu", help="where decompose runs (cuda: each process its GPU)")
    parser.add_argument("--one-shard", action="store_true", help="keep one input shard on disk at a time")
    parser.add_argument("--hidden", type=int, default=SHAPES["7B"][0], help="hidden size (smaller: smoke runs)")
    parser.add_argument("--intermediate", type=int, default=SHAPES["7B"][1], help="MLP size (smaller: smoke runs)")
    parser.add_argument("--vocab", type=int, default=SHAPES["7B"][4], help="vocabulary (smaller: smoke runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--workdir", default=None, help="where the shards go (default: a temporary folder)")
    parser.add_argument("--json", default="results/checkpoint_compress.json")
    args = parser.parse_args(argv)
    procs = [int(p) for p in args.procs.split(",")]
    if not 1 <= args.layers <= SHAPES["7B"][2]:
        parser.error(f"--layers must be in 1..{SHAPES['7B'][2]}, got {args.layers}")
    if any(p < 1 for p in procs) or not procs:
        parser.error(f"--procs must list process counts >= 1, got {args.procs!r}")
    shape = (args.hidden, args.intermediate, SHAPES["7B"][2], args.hidden, args.vocab)
    full_shape = shape[:2] == SHAPES["7B"][:2] and args.vocab == SHAPES["7B"][4]
    stored = torch.finfo(DTYPES[args.dtype]).bits // 8
    load = os.getloadavg()[0]

    work = Path(args.workdir or tempfile.mkdtemp(prefix="checkpoint_compress_"))
    work.mkdir(parents=True, exist_ok=True)
    try:
        embeddings = time_embeddings_copy(work, args.hidden, args.vocab, DTYPES[args.dtype], args.seed)
        runs = {p: run_procs(work, p, args, shape) for p in procs}
    finally:
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)

    total_layers = SHAPES["7B"][2]
    partial = args.layers < total_layers
    rows = []
    for p, r in runs.items():
        rows.append({
            "processes": p, "layers": args.layers, "matrices": r["matrices"], "seconds": round(r["seconds"], 2),
            "wall_s": round(r["wall_seconds"], 2), "matrices/s": round(r["matrices"] / r["seconds"], 3),
            "GB/s": round(r["bytes_read"] / r["seconds"] / 1e9, 4),
            "peak_MiB": round(r["peak_grew"] / 2**20), "x_largest_fp32": round(r["peak_grew"] / (4 * r["largest"]), 2),
            "x_vs_1proc": round(runs[procs[0]]["seconds"] / r["seconds"], 2) if procs[0] == 1 else None,
            "worst_rel_bound": r["worst_rel_bound"],
        })
    measured_layer = layer_model_seconds(args.hidden, args.intermediate, args.hidden, args.max_bond, stored)
    extrapolation = {}
    for p, r in runs.items():
        per_layer = r["seconds"] / args.layers
        extrapolation[f"cpu_{p}proc"] = {}
        for name, (hidden, inter, layers, kv, vocab) in SHAPES.items():
            ratio = layer_model_seconds(hidden, inter, kv, args.max_bond, stored) / measured_layer
            copy = embeddings["seconds"] * (vocab * hidden) / (args.vocab * args.hidden)
            extrapolation[f"cpu_{p}proc"][f"{name}_s"] = per_layer * ratio * layers + copy
    how = ("measured seconds per layer x the cost model's ratio of that model's layer to the measured one (1 for "
           "7B shapes) x its layers, + the embeddings' copy scaled by bytes")
    gpu_model = {f"{name}_{g}gpu": model_seconds(name, args.max_bond, stored, g) for name in SHAPES for g in (1, 8)}

    title = (f"compress_checkpoint on a synthetic LLaMA-2-7B-shaped checkpoint ({args.dtype}, --n 2, bond "
             f"{args.max_bond}, {args.device}, 1 thread per process), hidden {args.hidden}, intermediate "
             f"{args.intermediate}" + (", one shard on disk at a time" if args.one_shard else ""))
    print(title)
    print(f"load average at start {load:.2f}" + (" (measured under load: not a target measurement)" if load >= 1.5 else ""))
    if partial:
        print(f"PARTIAL: {args.layers} of {total_layers} layers; whole-model times below are extrapolated linearly")
    if not full_shape:
        print("NOT 7B-SHAPED (--hidden/--intermediate/--vocab changed): the 7B/70B lines scale these shapes' times")
    print(format_table(rows, list(rows[0])))
    print(f"embeddings + LM head ({2 * args.vocab}x{args.hidden}, copied untouched): {embeddings['seconds']:.2f} s "
          f"({embeddings['bytes'] / 1e9:.3f} GB)")
    for key, e in extrapolation.items():
        print(f"extrapolated, {key.replace('_', ', ')}: 7B {e['7B_s'] / 60:.1f} min, 70B {e['70B_s'] / 60:.1f} min")
    print(f"  ({how})")
    print(f"model (H100 SXM, float64 GEMMs at {H100.model.matmul_rate(torch.float64) / 1e12:.0f} TFLOP/s, HBM "
          f"{H100.model.bandwidth / 1e12:.2f} TB/s, PCIe {PCIE_BYTES_PER_S / 1e9:.0f} GB/s; disk, hashing, writes "
          f"not modelled): " + ", ".join(f"{k} {v['seconds']:.1f} s" for k, v in gpu_model.items()))
    payload = {"benchmark": "checkpoint_compress", "args": vars(args), "load_average": load, "partial": partial,
               "seven_b_shaped": full_shape, "rows": rows, "embeddings_copy": embeddings,
               "extrapolated_cpu": {**extrapolation, "how": how},
               "model_gpu": {"device": H100.name, "pcie_bytes_per_s": PCIE_BYTES_PER_S, **gpu_model}}
    write_json(args.json, payload)
    return payload


if __name__ == "__main__":
    main()
