"""The first GPU run, in one command: ``bash scripts/gpu_check.sh [--cpu] [--out DIR]``.

On a machine with one GPU, in under 10 minutes of wall time, it

1. uses the extension, or builds it (``pip install --no-build-isolation -e .`` for this GPU's
   architecture only) when ``mpo_core._C`` is missing;
2. runs the acceptance check ``python -m mpo_core.check --tiny``;
3. runs ``contract_throughput.py --quick``, ``fused_ops.py --quick``, a ``train_step.py`` quick
   pair (MPOBERT vs BERT, one setting) and ``decompose`` of a 4096x11008 matrix at bond 64 on the
   GPU against the same call on the CPU (relative errors, certified bound, times);

every step in its own subprocess with its own timeout (a hang costs that step, not the run),
every JSON under one folder (``--out``, default ``results/gpu_check``), then one summary: each
step's status and time, and each op's measured time beside its model (the roofline of this GPU
in the check and ``fused_ops``, the planner's cost model in ``contract_throughput``; "no model"
for a GPU the tables do not describe) with its pass/fail. Exit status 1 when any step failed.

``--cpu`` runs the same flow on the CPU at smoke sizes (CI runs it): every line of this script
runs without a GPU.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "benchmarks"
BUDGET_S = 600
"""The whole run's wall time on a GPU: the step timeouts add up to at most this."""
BUILD_S = 180
"""The extension's build when it is missing (nvcc for this GPU's architecture only)."""


@dataclasses.dataclass
class Step:
    """One subprocess of the run: its command, timeout and the JSON it writes (``None``: none)."""

    name: str
    argv: list[str]
    timeout_s: float
    json: Path | None = None
    env: dict[str, str] | None = None


def _bench(name: str, *args: str) -> list[str]:
    return [sys.executable, str(BENCH / f"{name}.py"), *args]


def plan(device: str, out: Path, build: bool) -> list[Step]:
    """The steps for ``device`` (``"cuda"``: the real sizes; ``"cpu"``: smoke sizes), JSON under ``out``."""
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    gpu = device == "cuda"
    no_interp = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    steps = []
    if build:
        env = dict(os.environ)
        if gpu:  # this GPU's architecture only: minutes less of nvcc
            import torch

            env["TORCH_CUDA_ARCH_LIST"] = "{}.{}".format(*torch.cuda.get_device_capability())
        steps.append(Step("build extension", [sys.executable, "-m", "pip", "install", "-q", "--no-build-isolation",
                                              "-e", str(ROOT)], BUILD_S, env=env))
    # The benchmarks run as steps of their own here, at sizes that fit the budget (the check's own
    # benchmark part would run every benchmark again).
    parts = ["ops", "mpo_linear"] if gpu else ["ops", "--timed"]  # CPU: the timed path, in ~20 s
    steps.append(Step("mpo_core.check --tiny", [sys.executable, "-m", "mpo_core.check", "--tiny", "--only", *parts,
                                                "--json", str(out / "check.json")], 0, out / "check.json"))
    contract = ["--quick", "--device", device, "--tntorch", "off", "--out", str(out / "contract_throughput.json")]
    contract += ["--tokens", "128", "4096", "--bonds", "full", "4x", "--min-time", "0.05"] if gpu else \
        ["--tokens", "8", "--bonds", "16x", "--min-time", "0.001"]
    steps.append(Step("contract_throughput --quick", _bench("contract_throughput", *contract), 70,
                      out / "contract_throughput.json", no_interp))
    fused = ["--quick", "--no-torch-compile"] if gpu else ["--tiny", "--gpu-flow-on-cpu"]
    steps.append(Step("fused_ops --quick", _bench("fused_ops", *fused, "--json", str(out / "fused_ops.json")), 50,
                      out / "fused_ops.json", no_interp))
    pair = (["--presets", "mpobert12", "--pairs", "1x4096", "--repeats", "3", "--precision", "bf16"] if gpu else
            ["--presets", "tiny", "--tokens", "64", "--seq", "32", "--k", "1", "--repeats", "1", "--precision", "bf16"])
    steps.append(Step("train_step quick pair", _bench("train_step", "--device", device, *pair, "--variants", "mpobert",
                                                      "bert", "--optimizers", "adamw", "--out",
                                                      str(out / "train_step.json")), 70, out / "train_step.json",
                      no_interp))
    shape, bond = ("4096x11008", "64") if gpu else ("256x512", "8")
    steps.append(Step(f"decompose {shape} bond {bond}", [sys.executable, str(Path(__file__).resolve()), "--decompose",
                                                         "--device", device, "--shape", shape, "--bond", bond,
                                                         "--out", str(out)], 50, out / "decompose.json", no_interp))
    # the check (Triton compiles every kernel and tile config on a fresh machine) gets what is left
    check_step = next(s for s in steps if s.name.startswith("mpo_core.check"))
    check_step.timeout_s = BUDGET_S - sum(s.timeout_s for s in steps) if gpu else 120
    total = sum(s.timeout_s for s in steps)
    if total > BUDGET_S:
        raise AssertionError(f"step timeouts add up to {total} s > {BUDGET_S} s")
    return steps


def run_step(step: Step) -> dict:
    """Run one step: ``status`` is ``ok``, ``FAIL`` (non-zero exit or no JSON) or ``TIMEOUT``."""
    start = time.perf_counter()
    try:
        proc = subprocess.run(step.argv, cwd=ROOT, env=step.env, capture_output=True, text=True,
                              timeout=step.timeout_s)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-400:]
        tail = tail.decode(errors="replace") if isinstance(tail, bytes) else tail
        return {"step": step.name, "status": "TIMEOUT", "seconds": time.perf_counter() - start, "rc": None,
                "json": None, "tail": f"killed after {step.timeout_s:.0f} s; {tail}"}
    seconds = time.perf_counter() - start
    wrote = step.json is None or step.json.is_file()
    status = "ok" if proc.returncode == 0 and wrote else "FAIL"
    tail = (proc.stdout + proc.stderr)[-600:]
    return {"step": step.name, "status": status, "seconds": seconds, "rc": proc.returncode,
            "json": None if step.json is None else str(step.json), "tail": tail if status != "ok" else ""}


# ----------------------------------------------------------------------------- decompose on the device vs the CPU
def decompose_step(device: str, shape: str, bond: int, out: Path) -> dict:
    """``decompose`` of one seeded float64 matrix on ``device`` and on the CPU: errors, bounds, times.

    Passes when the device's relative error is within 1% (relative) of the CPU's and below its own
    certified bound (the two draw different random sketches, so they need not agree bit for bit).
    """
    import torch

    from mpo_core import decompose, factorize
    from mpo_core.gpu.timing import time_calls

    rows, cols = (int(v) for v in shape.lower().split("x"))
    w = torch.randn(rows, cols, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    in_shape, out_shape = factorize(rows, 5), factorize(cols, 5)
    report = {"shape": shape, "bond": bond, "device": device, "runs": {}}
    for where in dict.fromkeys(["cpu", device]):
        x = w.to(where)
        made = {}
        seconds = time_calls({"decompose": lambda: made.setdefault("mpo", decompose(
            x, in_shape, out_shape, max_bond=bond))}, where, warmup=0, repeat=1)["decompose"][0]
        mpo = made["mpo"]
        err = float(torch.linalg.norm(mpo.to_dense().double() - x) / torch.linalg.norm(x))
        report["runs"][where] = {"seconds": seconds, "rel_err": err, "bound": mpo.error_bound / mpo.norm,
                                 "ranks": list(mpo.ranks), "routes": mpo.metadata.get("routes")}
    cpu, dev = report["runs"]["cpu"], report["runs"][device]
    report["ok"] = bool(abs(dev["rel_err"] - cpu["rel_err"]) <= 0.01 * cpu["rel_err"] + 1e-12
                        and dev["rel_err"] <= dev["bound"] * (1 + 1e-9))
    (out / "decompose.json").write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    return report


# ----------------------------------------------------------------------------- the summary
def op_rows(out: Path) -> list[dict]:
    """Each op's measured time beside its model, from the JSON the steps wrote (missing files: none)."""
    rows = []

    def load(name):
        path = out / name
        return json.loads(path.read_text()) if path.is_file() else None

    check = load("check.json")
    for r in (check or {}).get("results", []):
        if r.get("measured_us") is not None:
            rows.append({"source": "check", "op": f"{r['check']} [{r['backend']}, {r['dtype']}, {r['shape']}] {r['what']}",
                         "measured_us": r["measured_us"], "model_us": r["model_us"], "model": "roofline",
                         "verdict": "pass" if r["ok"] else "FAIL"})
    fused = load("fused_ops.json")
    for m in (fused or {}).get("measured", []):
        if m.get("impl", "").startswith("ours"):  # fused_ops puts this GPU's roofline beside each row it models
            rows.append({"source": "fused_ops", "op": f"{m['op']} {m['dir']} {m['tokens']}x{m['hidden']} {m['impl']}",
                         "measured_us": m["us"], "model_us": m.get("model_us"), "model": "roofline", "verdict": ""})
    contract = load("contract_throughput.json")
    for r in (contract or {}).get("rows", []):
        if r["mode"] == "fwd" and "auto" in r.get("measured_ms", {}):  # the planner models the forward
            rows.append({"source": "contract", "op": f"{r['shape'][0]}x{r['shape'][1]} {r['bond']} {r['tokens']} tok "
                                                     f"{r['mode']} auto={r['auto_strategy']}",
                         "measured_us": r["measured_ms"]["auto"] * 1e3, "model_us": r["model_ms"]["auto"] * 1e3,
                         "model": "planner", "verdict": ""})
    dec = load("decompose.json")
    if dec:
        for where, run in dec["runs"].items():
            rows.append({"source": "decompose", "op": f"{dec['shape']} bond {dec['bond']} on {where}: rel err "
                                                      f"{run['rel_err']:.4f} (bound {run['bound']:.4f})",
                         "measured_us": run["seconds"] * 1e6, "model_us": None, "model": "",
                         "verdict": "pass" if dec["ok"] else "FAIL"})
    return rows


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.3g}"
    return str(v)


def table(rows: list[dict], cols: list[str]) -> str:
    cells = [[_fmt(r.get(c)) for c in cols] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(cols)]
    line = lambda vals: "  ".join(v.ljust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(cols), line(["-" * w for w in widths])] + [line(r) for r in cells])


def summary(results: list[dict], out: Path) -> str:
    ops = op_rows(out)
    for r in ops:
        if r["model_us"]:
            r["measured/model"] = r["measured_us"] / r["model_us"]
        elif r["source"] != "decompose":
            r["model_us"] = "no model"
    text = ["STEPS", table(results, ["step", "status", "seconds", "json"]), "",
            "OPS (measured_us: this run; model_us: a model, never measured)",
            table(ops, ["source", "op", "measured_us", "model_us", "measured/model", "verdict"]) if ops else "(none)"]
    for r in results:
        if r["status"] != "ok":
            text += ["", f"{r['step']}: {r['status']} (exit {r['rc']})", r["tail"]]
    return "\n".join(text)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], epilog=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cpu", action="store_true", help="run the flow on the CPU at smoke sizes (CI)")
    ap.add_argument("--out", default=str(ROOT / "results" / "gpu_check"), help="folder of every JSON")
    ap.add_argument("--decompose", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--device", default="cuda", help=argparse.SUPPRESS)
    ap.add_argument("--shape", default="4096x11008", help=argparse.SUPPRESS)
    ap.add_argument("--bond", type=int, default=64, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    out = Path(args.out).resolve()
    out.mkdir(parents=True, exist_ok=True)
    if args.decompose:
        return 0 if decompose_step(args.device, args.shape, args.bond, out)["ok"] else 1

    import torch

    if not args.cpu and not torch.cuda.is_available():
        print("gpu_check: no CUDA GPU visible to torch (torch.cuda.is_available() is False); "
              "run with --cpu for the CPU smoke flow", file=sys.stderr)
        return 2
    device = "cpu" if args.cpu else "cuda"
    from mpo_core import backends

    build = not backends()["cpp"] and os.environ.get("MPO_CORE_NO_EXT") != "1"
    where = "CPU (smoke sizes)" if args.cpu else torch.cuda.get_device_name()
    print(f"gpu_check on {where}; backends {backends()}; JSON under {out}", flush=True)
    results = []
    for step in plan(device, out, build):
        print(f"[gpu_check] {step.name} (timeout {step.timeout_s:.0f} s) ...", flush=True)
        results.append(run_step(step))
        print(f"[gpu_check]   {results[-1]['status']} in {results[-1]['seconds']:.1f} s", flush=True)
    from mpo_core.gpu.devices import model_of_device

    model = model_of_device(device)
    gpu = None if model is None else model.name
    text = summary(results, out)
    print("\n" + text)
    (out / "summary.json").write_text(json.dumps({"device": where, "model": gpu, "steps": results,
                                                  "ops": op_rows(out)}, indent=2,
                                                 default=lambda v: None if isinstance(v, float) and math.isnan(v) else v))
    print(f"\nwrote {out / 'summary.json'}")
    return 0 if all(r["status"] == "ok" for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
