"""``scripts/gpu_check.sh``: the first GPU run's one command, run here with ``--cpu`` (the same flow
at smoke sizes), and its per-step timeouts."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("gpu_check", ROOT / "scripts" / "gpu_check.py")
gpu_check = importlib.util.module_from_spec(spec)
sys.modules[spec.name] = gpu_check
spec.loader.exec_module(gpu_check)


@pytest.mark.slow
def test_cpu_flow_runs_every_step_and_prints_one_summary(tmp_path):
    """~35 s on 2 cores: the check (ops, timed), the four benchmark/decompose steps, the summary."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(["bash", str(ROOT / "scripts" / "gpu_check.sh"), "--cpu", "--out", str(tmp_path)],
                          env=dict(env, GPU_CHECK_NO_SETUP="1"), capture_output=True, text=True, timeout=400)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "summary.json").read_text())
    names = [s["step"] for s in report["steps"]]
    assert len(names) == 5 and all(s["status"] == "ok" for s in report["steps"]), report["steps"]
    for name in ("check", "contract_throughput", "fused_ops", "train_step", "decompose"):
        assert (tmp_path / f"{name}.json").is_file(), name
    sources = {r["source"] for r in report["ops"]}
    assert {"check", "contract", "fused_ops", "decompose"} <= sources
    assert "STEPS" in proc.stdout and "OPS" in proc.stdout and "no model" in proc.stdout  # a CPU has no roofline
    checked = [r for r in report["ops"] if r["source"] == "check"]
    assert checked and all(r["verdict"] == "pass" and r["measured_us"] > 0 for r in checked)


def test_a_hanging_or_failing_step_costs_only_that_step(tmp_path):
    py = sys.executable
    hang = gpu_check.run_step(gpu_check.Step("hang", [py, "-c", "import time; time.sleep(60)"], timeout_s=1))
    assert hang["status"] == "TIMEOUT" and hang["seconds"] < 30
    fail = gpu_check.run_step(gpu_check.Step("fail", [py, "-c", "raise SystemExit('broken here')"], timeout_s=30))
    assert fail["status"] == "FAIL" and fail["rc"] == 1 and "broken here" in fail["tail"]
    no_json = gpu_check.run_step(gpu_check.Step("quiet", [py, "-c", "pass"], 30, json=tmp_path / "none.json"))
    assert no_json["status"] == "FAIL"
    text = gpu_check.summary([hang, fail, no_json], tmp_path)
    assert "TIMEOUT" in text and "broken here" in text and "(none)" in text


def test_the_gpu_plan_fits_ten_minutes(tmp_path):
    steps = gpu_check.plan("cuda", tmp_path, build=False)
    assert sum(s.timeout_s for s in steps) == gpu_check.BUDGET_S  # the check gets what the others leave
    check_step = next(s for s in steps if s.name.startswith("mpo_core.check"))
    assert check_step.timeout_s >= 180 and "--tiny" in check_step.argv
    assert "--no-torch-compile" in next(s for s in steps if s.name.startswith("fused_ops")).argv
    assert {s.json.name for s in steps if s.json} == {"check.json", "contract_throughput.json", "fused_ops.json",
                                                       "train_step.json", "decompose.json"}
    assert all(s.json.parent == tmp_path for s in steps if s.json)  # every JSON under one folder
    decompose = next(s for s in steps if s.name.startswith("decompose"))
    assert "4096x11008" in decompose.argv and "cuda" in decompose.argv
    with pytest.raises(ValueError, match="device must be"):
        gpu_check.plan("tpu", tmp_path, build=False)


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="the no-GPU message needs a machine without one")
def test_without_a_gpu_it_says_so_and_points_to_cpu(tmp_path, capsys):
    assert gpu_check.main(["--out", str(tmp_path)]) == 2
    assert "--cpu" in capsys.readouterr().err
