"""GPU performance model of every kernel, op and the MPOBERT-12 training step (labelled "model").

Every figure here comes from :mod:`mpo_core.gpu` over :mod:`mpo_core.cost` (formulas in their
docstrings) and, for the per-kernel table, from the cubins Triton builds for sm_80 / sm_90 on this
machine (:mod:`mpo_core.gpu.aot`: registers, spills, shared memory as reported by
``cuobjdump``; occupancy and roofline fraction are models). Tables:

1. fused ops (LayerNorm, residual (+ dropout) + LayerNorm, bias + GELU) at BERT-base/large
   shapes, forward and backward: FLOPs, HBM bytes read / written by our kernels, bytes of
   the unfused torch sequence, roofline time on A100-80GB and H100 SXM;
2. one MPO linear ``gelu(x W + b)`` per strategy (dense = the unfused torch sequence,
   sequential, fused) at every BERT-base/large weight shape;
3. per registered kernel: registers, spills, shared memory, occupancy and the modelled
   fraction of the roofline on A100 (sm_80 cubin) and H100 (sm_90 cubin);
4. one MPOBERT-12 training step (batch 32 x 512, bf16, forward + backward + LAMB): HBM
   bytes and FLOPs fused vs unfused, predicted step time on both devices, bytes saved.

With a GPU, table 1 is also measured (ours and torch eager, the one timer of
``benchmarks/_common.py``: CUDA events after warm-up) and printed in its own table beside
the model of that GPU (A100/H100), with the ratio measured / model.

    python benchmarks/gpu_model.py                    # everything (compiles ~100 cubins: 20 s warm, 2 min cold)
    python benchmarks/gpu_model.py --no-compile       # tables 1, 2, 4 only
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
from _common import device_info, write_json  # noqa: E402

from mpo_core import gpu  # noqa: E402

KERNEL_COLUMNS = ("kernel", "regs_sm80", "regs_sm90", "spill_B", "smem_B_sm90", "occupancy_A100", "occupancy_H100",
                  "roofline_frac_A100", "roofline_frac_H100", "bound_H100")
STEP_COLUMNS = ("variant", "GB", "GB_read", "GB_written", "TFLOP", "kernels", "ms_A100-80GB", "ms_H100-SXM")


def kernel_rows(jobs: int | None = None) -> list[dict]:
    """Compile the registry for sm_80 and sm_90; resources (ptxas) with modelled occupancy and roofline fraction."""
    from mpo_core.gpu import aot
    from mpo_core.gpu.compiled import problems
    from mpo_core.gpu.registry import kernel_specs

    specs = kernel_specs()
    results = {(r.name, r.arch): r for r in aot.compile_all(specs, aot.ARCHS, jobs)}
    rows = []
    for spec in specs:
        executed, useful, flight = gpu.spec_model(spec)
        row = {"kind": "ptxas resources + model", "kernel": spec.name}
        for arch, device in ((80, gpu.A100), (90, gpu.H100)):
            r = results[spec.name, arch]
            if r.error:
                row[f"regs_sm{arch}"] = "compile error"
                continue
            occ = gpu.occupancy(r.registers, r.smem, r.num_warps, device)
            frac = gpu.kernel_fraction(executed, useful, flight, occ["blocks_per_sm"], device)
            short = device.name.split("-")[0]
            row.update({f"regs_sm{arch}": r.registers, f"smem_B_sm{arch}": r.smem,
                        "spill_B": max(row.get("spill_B", 0), r.spills),
                        f"occupancy_{short}": occ["occupancy"], f"roofline_frac_{short}": frac["fraction"],
                        f"bound_{short}": frac["bound"], f"problems_sm{arch}": "; ".join(problems(r)) or "ok"})
        rows.append(row)
    return rows


def mpobert12_params() -> int:
    """Parameters of MPOBERT-12 for pre-training, counted on a model built on the meta device (no memory)."""
    from mpobert import MPOBertForPreTraining
    from mpobert.config import MPOBertConfig

    with torch.device("meta"):
        return sum(p.numel() for p in MPOBertForPreTraining(MPOBertConfig.mpobert12()).parameters())


def step_rows(dropout: bool) -> tuple[list[dict], dict]:
    """MPOBERT-12 (its config's sizes) fused vs unfused; and the bytes saved per step."""
    from mpobert.config import MPOBertConfig

    cfg = MPOBertConfig.mpobert12()
    shape = gpu.BertShape.from_config(cfg, mpobert12_params(), hidden_dropout=dropout)
    rows = []
    for fused in (True, False):
        rows.append({"variant": "fused" if fused else "unfused (torch eager)",
                     **gpu.step_summary(gpu.mpobert_step(shape, batch=32, seq=512, dtype_bytes=2, fused=fused))})
    saved = {"kind": gpu.MODEL, "GB_saved_per_step": rows[1]["GB"] - rows[0]["GB"],
             "fraction_of_unfused_bytes": 1 - rows[0]["GB"] / rows[1]["GB"],
             **{f"ms_saved_{d.name}": rows[1][f"ms_{d.name}"] - rows[0][f"ms_{d.name}"] for d in (gpu.A100, gpu.H100)}}
    return rows, saved


def measured_fused_ops(model_rows: list[dict], dtype: torch.dtype, on: str = "cuda") -> list[dict]:
    """On a GPU: time ours and torch eager (the one timer of benchmarks/_common.py, interleaved) for
    every row of the fused-op model table; beside it the model of this GPU when there is one
    (``on="cpu"`` runs the same code on the CPU, without a model: CI)."""
    from fused_ops import _eager, _fwd_bwd_times, _inputs, _ours, model_gpu

    device = model_gpu(on)
    rows = []
    for row in model_rows:
        if row["dir"] != "fwd":
            continue
        op, m, n = row["op"], row["tokens"], row["hidden"]
        inputs = _inputs(op, m, n, dtype, on)
        for impl, make in (("fused", lambda: _ours(op, None)), ("torch", lambda: _eager(op))):
            t_fwd, t_bwd = _fwd_bwd_times(make(), inputs, on)
            for direction, t in (("fwd", t_fwd), ("bwd", t_bwd)):
                out = {"kind": "measured", "op": op, "dir": direction, "hidden": n, "impl": impl, "measured_us": t * 1e6}
                if device is not None:
                    model = next(r for r in model_rows if r["op"] == op and r["hidden"] == n and r["dir"] == direction)
                    out["model_us"] = model[f"us_{impl}_{device.name}"]
                    out["measured/model"] = t * 1e6 / out["model_us"]
                rows.append(out)
    return rows


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--no-compile", action="store_true", help="skip the per-kernel table (no Triton compile)")
    ap.add_argument("--jobs", type=int, default=None, help="compile workers (default: CPU count)")
    ap.add_argument("--dropout", action="store_true", help="model the step with hidden dropout (BERT's 0.1; "
                    "MPOBERT's ALBERT config has none)")
    ap.add_argument("--json", default=os.path.join("results", "gpu_model.json"))
    args = ap.parse_args(argv)
    report: dict = {"devices": {d.name: dataclasses.asdict(d) for d in (gpu.A100, gpu.H100)}, "tokens": gpu.BERT_TOKENS}

    ops = gpu.fused_op_rows()
    print(f"1. MODEL: fused ops vs the unfused torch sequence, {gpu.BERT_TOKENS} tokens, bf16 (HBM bytes, roofline us)")
    print(gpu.format_rows(ops, gpu.FUSED_OP_COLUMNS))
    lin = gpu.linear_rows()
    print(f"\n2. MODEL: MPO linear gelu(xW+b) per strategy, full rank, {gpu.BERT_TOKENS} tokens, bf16 "
          "(dense = unfused torch; dense/this > 1: faster than unfused)")
    print(gpu.format_rows(lin, gpu.LINEAR_COLUMNS))
    report.update(model_fused_ops=ops, model_linear=lin)

    if not args.no_compile:
        kernels = kernel_rows(args.jobs)
        print("\n3. per kernel: registers / spills / shared memory from ptxas (cuobjdump); occupancy and "
              "roofline fraction are MODEL")
        print(gpu.format_rows(kernels, KERNEL_COLUMNS))
        report["kernels"] = kernels

    steps, saved = step_rows(args.dropout)
    print(f"\n4. MODEL: one MPOBERT-12 training step, batch 32 x 512, bf16, hidden dropout "
          f"{'on' if args.dropout else 'off'} (forward + backward + LAMB)")
    print(gpu.format_rows(steps, STEP_COLUMNS))
    print(f"   fusion saves {saved['GB_saved_per_step']:.2f} GB of HBM traffic per step "
          f"({100 * saved['fraction_of_unfused_bytes']:.1f}%), model: "
          f"{saved['ms_saved_A100-80GB']:.2f} ms on A100-80GB, {saved['ms_saved_H100-SXM']:.2f} ms on H100 SXM")
    report.update(model_step=steps, model_step_saved=saved)

    if torch.cuda.is_available():
        from fused_ops import model_gpu

        measured = measured_fused_ops(ops, torch.bfloat16)
        info = device_info("cuda")
        modelled = getattr(model_gpu("cuda"), "name", None)
        print(f"\nMEASURED on {info['device']} (sm_clock_MHz {info['sm_clock_MHz']}) beside the model of "
              f"{modelled or 'no modelled GPU (A100/H100 only): measured only'}")
        cols = ["op", "dir", "hidden", "impl", "measured_us"] + (["model_us", "measured/model"] if modelled else [])
        print(gpu.format_rows(measured, cols))
        report.update(device=info["device"], device_info=info, measured_fused_ops=measured)
    write_json(args.json, report)
    print(f"\nwrote {args.json}")
    return report


if __name__ == "__main__":
    main()
