"""Acceptance check: run it first on any machine. ``python -m mpo_core.check [--tiny] [--json PATH]``

Runs every kernel this machine can run against its torch reference and prints a verdict
table (pass/fail, max error vs tolerance, and on a GPU the measured time beside the
roofline model of that GPU), writes it as JSON, and exits non-zero on any failure.

* **Fused ops** (:mod:`mpo_core.ops`: LayerNorm, residual + LayerNorm, residual + dropout +
  LayerNorm, bias + GELU) on every backend available here (``triton``, ``cuda``, ``cpp``;
  :func:`mpo_core.ops.dispatch.why_unavailable` says why one is not), every dtype it takes,
  forward and backward (input and parameter gradients) against :mod:`mpo_core.ops.reference`
  run in float64 on the same inputs. On a GPU at BERT shapes: hidden 768/1024 (norms) and
  FFN 3072/4096 (bias + GELU), 512 to 16384 tokens.
* **Dropout**: the mask is the one the seed defines, regenerated apart from the kernels by the
  numpy Philox4x32-10 of :mod:`mpo_core.gpu.philox` (checked on Random123's known answers): the
  forward and every gradient equal the reference run with that mask, and the residual gradient
  is nonzero exactly where it keeps. The same seed gives the same output and gradients bit for
  bit, another seed another mask, the keep fraction is ``1 - p``.
* **Tolerances** are per op and returned tensor, in ULPs of the dtype (:data:`ROUNDINGS`, each
  entry with its reasoning; :func:`tolerance`).
* **Missing kernels**: on a GPU of compute capability >= 8.0 a missing Triton or CUDA extension
  is a failure with the command that fixes it (:func:`install_line`); a check that compared no
  kernel at all fails.
* **Fused MPO linear** (:mod:`mpo_core.ops.mpo_linear`, Triton) at *every* tile config the
  autotuner may pick (:func:`mpo_core.kernels.mpo_matmul.launch_configs`, each forced):
  inference forward, ``dx`` and the training forward (pre-activation stored), BERT
  768 -> 3072 and 3072 -> 768 on a GPU; below compute capability 8.0 (V100) it says so and
  checks the dense path ``mpo_linear`` takes there.
* **Benchmarks**: each one's quick mode (``--tiny``: its smoke run), when ``benchmarks/`` is
  next to the package (a repository checkout): it must exit 0 and write its JSON.

Without a GPU it runs the CPU subset (Triton under ``TRITON_INTERPRET=1``, set here by
re-running itself, and the C++ extension) at small sizes and lists what it could not check.
``--tiny`` shrinks every size further (CI runs it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from mpo_core.check.fused import check_fused_ops
from mpo_core.check.linear import check_mpo_linear
from mpo_core.check.runs import BENCHMARK_RUNS, run_benchmarks
from mpo_core.check.verdict import Checker, Result, verdict_table


def sizes(gpu: bool, tiny: bool) -> tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...], int, list]:
    """``(tokens, hidden, ffn, mpo_tokens, mpo_shapes)`` the check runs at: BERT sizes on a GPU, small ones
    on a CPU (Triton's interpreter); ``tiny`` shrinks both."""
    from mpo_core.gpu.shapes import MPO_MODES
    from mpo_core.shapes import factorize

    if gpu:
        tokens, hidden, ffn = ((512,), (768,), (3072,)) if tiny else ((512, 4096, 16384), (768, 1024), (3072, 4096))
        return tokens, hidden, ffn, 512, [(MPO_MODES[768], MPO_MODES[3072]), (MPO_MODES[3072], MPO_MODES[768])]
    tokens, hidden, ffn = ((16,), (768,), (3072,)) if tiny else ((128,), (768, 1024), (3072,))
    return tokens, hidden, ffn, 40, [(factorize(64, 5), factorize(96, 5))]


def not_checked_here(c: Checker, device_name: str, tokens: Sequence[int]) -> list[str]:
    """What the check cannot check where ``c`` runs: on a GPU without a roofline model, the model times;
    without a GPU, the CUDA kernels, GPU code generation and BERT sizes."""
    if c.device == "cuda" or c.capability is not None:
        if c.model_gpu is None:
            return [f"model times: no roofline model for {device_name} (A100-80GB, H100 SXM only): "
                    "'no model' beside its measured times"]
        return []
    return [
        "CUDA extension kernels: no GPU (tests/test_cpp_ext.py -k emulated runs them under host emulation)",
        "GPU code generation, speed and the roofline comparison: no GPU",
        f"BERT sizes (512-16384 tokens): the CPU subset runs {tokens} tokens",
        "mpo_linear in bfloat16: the interpreter's bfloat16 tl.dot is wrong (float32 and float16 run here)",
    ]


KERNEL_BACKENDS = ("triton", "cuda", "cpp")


def require_a_kernel(c: Checker) -> None:
    """A check that compared no kernel (every backend missing) is a failure, never a PASS of the references."""
    if not any(r.backend in KERNEL_BACKENDS for r in c.results):
        c.add(Result("kernels", "-", "", "", "at least one kernel checked", False,
                     note="no Triton, CUDA or C++ kernel could run here: see NOT CHECKED"))



def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mpo_core.check", description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    parser.add_argument("--tiny", action="store_true", help="smallest sizes and benchmark smoke runs (CI)")
    parser.add_argument("--only", nargs="+", choices=["ops", "mpo_linear", "benchmarks"],
                        help="run only these parts (default: all)")
    parser.add_argument("--benchmarks", nargs="+", choices=sorted(BENCHMARK_RUNS), default=sorted(BENCHMARK_RUNS),
                        help="which benchmarks to run (default: all)")
    parser.add_argument("--timed", action="store_true",
                        help="time every kernel also without a GPU (perf_counter; always on with a GPU)")
    parser.add_argument("--json", default=os.path.join("results", "check.json"), help="where to write the verdicts")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)

    cuda = torch.cuda.is_available()
    if not cuda and os.environ.get("TRITON_INTERPRET") != "1" and argv is None:
        # Triton's interpreter must be chosen before the kernels are first imported: run again with it.
        os.execve(sys.executable, [sys.executable, "-m", "mpo_core.check", *sys.argv[1:]],
                  {**os.environ, "TRITON_INTERPRET": "1"})
    from mpo_core import backends
    from mpo_core.gpu.timing import device_info

    device = "cuda" if cuda else "cpu"
    info = device_info(device)
    parts = set(args.only or ("ops", "mpo_linear", "benchmarks"))
    print(f"mpo_core acceptance check on {info['device']} ({'GPU' if cuda else 'CPU subset'}), backends {backends()}")
    # without a GPU the times only show that the timed path runs: 1 warm-up + 2 calls
    c = Checker(device, timed=cuda or args.timed, warmup=3 if cuda else 1, repeat=10 if cuda else 2)
    tokens, hidden, ffn, mpo_tokens, mpo_shapes = sizes(cuda, args.tiny)
    c.not_checked += not_checked_here(c, info["device"], tokens)
    if "ops" in parts:
        print("fused ops vs the float64 torch reference:")
        check_fused_ops(c, tokens, hidden, ffn)
    if "mpo_linear" in parts:
        print("fused MPO linear at every tile config the autotuner may pick:")
        check_mpo_linear(c, mpo_tokens, mpo_shapes, max_bond=64)
    if "benchmarks" in parts:
        print("benchmarks (quick mode):" if not args.tiny else "benchmarks (smoke runs):")
        with tempfile.TemporaryDirectory(prefix="mpo_check_") as tmp:
            run_benchmarks(c, args.benchmarks, args.tiny or not cuda, Path(tmp))

    if parts & {"ops", "mpo_linear"}:
        require_a_kernel(c)
    failed = [r for r in c.results if not r.ok]
    clock = "CUDA events" if cuda else "perf_counter"
    print(f"\nVERDICT TABLE (measured_us: {clock}, median; model_us: roofline of this GPU, a model)")
    print(verdict_table(c.results))
    if c.not_checked:
        print("\nNOT CHECKED here:")
        for line in c.not_checked:
            print(f"  - {line}")
    verdict = "FAIL" if failed else "PASS"
    print(f"\n{verdict}: {len(c.results) - len(failed)}/{len(c.results)} checks passed on {info['device']}")
    Path(args.json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.json).write_text(json.dumps({"verdict": verdict, "device_info": info, "backends": backends(),
                                           "results": [dataclasses.asdict(r) for r in c.results],
                                           "not_checked": c.not_checked}, indent=2, default=str))
    print(f"wrote {args.json}")
    return 1 if failed else 0
