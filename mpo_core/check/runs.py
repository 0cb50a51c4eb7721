"""Each benchmark's quick run (GPU) and tiny run (CPU smoke), as the check runs them: it must exit 0 and
write its JSON."""
from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from mpo_core.check.verdict import Checker, Result

# Each benchmark's quick run (GPU) and tiny run (CPU smoke, also tests/test_benchmarks.py); {json}: report path.
BENCHMARK_RUNS: dict[str, tuple[list[str], list[str]]] = {
    "checkpoint_compress": (["--layers", "1", "--procs", "1", "--json", "{json}"],
                            ["--layers", "1", "--hidden", "128", "--intermediate", "256", "--vocab", "256",
                             "--max-bond", "8", "--json", "{json}"]),
    "contract_throughput": (["--quick", "--out", "{json}"],
                            ["--quick", "--tokens", "8", "--tntorch", "off", "--min-time", "0.001", "--out", "{json}"]),
    "cpp_residual_layernorm": (["--quick", "--json", "{json}"], ["--tiny", "--json", "{json}"]),
    "decompose_speed": (["--layers", "1", "--json", "{json}"], ["--layers", "1", "--max-bond", "8", "--json", "{json}"]),
    "fused_mpo_linear": (["--quick", "--json", "{json}"], ["--tiny", "--cpu-check", "--json", "{json}"]),
    "fused_ops": (["--quick", "--json", "{json}"], ["--tiny", "--json", "{json}"]),
    "gpu_model": (["--no-compile", "--json", "{json}"], ["--no-compile", "--json", "{json}"]),
    "lightweight_vs_lora": (
        ["--pretrain-steps", "50", "--epochs", "1", "--output", "{json}"],
        ["--hidden", "32", "--layers", "1", "--heads", "2", "--max-seq-len", "16", "--vocab-size", "200",
         "--pretrain-steps", "2", "--epochs", "1", "--batch", "8", "--lrs", "1e-3", "--output", "{json}"]),
    "methods_demo": (["--steps", "20", "--aux-steps", "10", "--output", "{json}"],
                     ["--steps", "2", "--aux-steps", "1", "--hidden", "32", "--layers", "1", "--intermediate", "64",
                      "--max-seq-len", "16", "--output", "{json}"]),
    "mpoe_upcycle": (["--quick", "--seeds", "0,1", "--output", "{json}"], ["--quick", "--output", "{json}"]),
    "op_overhead": (["--quick", "--out", "{json}"], ["--quick", "--repeats", "1", "--min-time", "0.001", "--out", "{json}"]),
    "real_checkpoint": (
        ["--checkpoint", "random-tiny", "--limit", "64", "--budgets", "0.5", "--seeds", "0", "--peft-epochs", "1",
         "--finetune-epochs", "1", "--output", "{json}"],
        ["--checkpoint", "random-tiny", "--limit", "32", "--budgets", "0.5", "--seeds", "0", "--head-lrs", "1e-3",
         "--lora-lrs", "1e-3", "--mpo-lrs", "1e-3", "--full-lrs", "1e-4", "--opf-lrs", "1e-4", "--peft-epochs", "1", "--finetune-epochs", "1",
         "--compress-contenders", "uncompressed,svd uniform,svd-llm,mpo5 uniform,mpo5+calib,auto+calib", "--sections",
         "compress,peft,heal,convert", "--heal-steps", "2", "--heal-contenders", "svd,mpo5+calib",
         "--convert-contenders", "svd+calib", "--output", "{json}"]),
    "train_step": (["--presets", "tiny", "--repeats", "3", "--out", "{json}"],
                   ["--presets", "tiny", "--tokens", "64", "--seq", "32", "--k", "1",  # every contender
                    "--optimizers", "adamw", "--repeats", "1", "--out", "{json}"]),
}
#: Benchmarks whose tiny CPU run goes through Triton's interpreter; the others run without it
#: (under it, every op with a Triton backend would be interpreted: minutes instead of seconds).
INTERPRETED_TINY_RUNS = ("fused_mpo_linear",)


def benchmarks_dir() -> Path | None:
    """``benchmarks/`` of the repository this package was imported from, if any."""
    path = Path(__file__).resolve().parents[2] / "benchmarks"
    return path if path.is_dir() else None


def run_benchmarks(c: Checker, names: Sequence[str], tiny: bool, out_dir: Path) -> None:
    where = benchmarks_dir()
    if where is None:
        c.skip("benchmarks", "benchmarks/ is not next to the package (run from a repository checkout)")
        return
    base_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    for name in names:
        env = dict(base_env, **({"TRITON_INTERPRET": "1"} if tiny and name in INTERPRETED_TINY_RUNS else {}))
        report = out_dir / f"{name}.json"
        args = [a.replace("{json}", str(report)) for a in BENCHMARK_RUNS[name][1 if tiny else 0]]
        start = time.perf_counter()
        proc = subprocess.run([sys.executable, str(where / f"{name}.py"), *args], cwd=out_dir, env=env,
                              capture_output=True, text=True)
        seconds = time.perf_counter() - start
        ok = proc.returncode == 0 and report.is_file()
        note = f"{seconds:.0f} s, {report}" if ok else f"exit {proc.returncode}: {(proc.stderr or proc.stdout)[-300:]!r}"
        c.add(Result("benchmark", name, "", "tiny" if tiny else "quick", "runs, writes its JSON", ok, note=note))
