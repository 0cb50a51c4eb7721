"""``python -m mpo_core.check``: the CPU subset passes at tiny sizes, a wrong kernel fails it, and
its benchmark runs report success and failure."""
from __future__ import annotations

import json

import pytest
import torch

from mpo_core import check


@pytest.mark.slow
def test_cpu_subset_passes_and_says_what_it_could_not_check(tmp_path, capsys):
    out = tmp_path / "check.json"
    assert check.main(["--tiny", "--only", "ops", "mpo_linear", "--json", str(out)]) == 0
    report = json.loads(out.read_text())
    assert report["verdict"] == "PASS" and all(r["ok"] for r in report["results"])
    checked = {r["check"] for r in report["results"]}
    assert {"layer_norm", "residual_layer_norm", "residual_dropout_layer_norm", "bias_gelu",
            "dropout determinism"} <= checked
    configs = {r["check"] for r in report["results"] if r["check"].startswith("mpo_linear M")}
    from mpo_core.kernels.mpo_matmul import launch_configs

    assert len(configs) == len({id(c) for c in launch_configs(False)})  # every GPU tile config, forced
    assert any("CUDA extension kernels" in line for line in report["not_checked"])
    assert "NOT CHECKED here" in capsys.readouterr().out


def test_a_wrong_kernel_fails_the_check(tmp_path, monkeypatch):
    from mpo_core.ops import reference

    real = reference.bias_gelu
    monkeypatch.setattr(check, "NORM_OPS", ())
    monkeypatch.setattr(check, "DTYPES", (torch.float32,))
    # The reference is what the kernel is held to: shifting it makes the kernel "wrong".
    monkeypatch.setattr(reference, "bias_gelu", lambda x, b, activation="gelu": real(x, b, activation) * 1.001)
    out = tmp_path / "check.json"
    assert check.main(["--tiny", "--only", "ops", "--json", str(out)]) == 1
    report = json.loads(out.read_text())
    assert report["verdict"] == "FAIL" and any(not r["ok"] and r["check"] == "bias_gelu" for r in report["results"])


def test_benchmark_runs_pass_and_fail(tmp_path, monkeypatch):
    c = check.Checker("cpu", timed=False)
    check.run_benchmarks(c, ["gpu_model"], tiny=True, out_dir=tmp_path)
    assert [r.ok for r in c.results] == [True]
    monkeypatch.setitem(check.BENCHMARK_RUNS, "gpu_model", ([], ["--no-such-flag"]))
    check.run_benchmarks(c, ["gpu_model"], tiny=True, out_dir=tmp_path)
    assert [r.ok for r in c.results] == [True, False] and "exit 2" in c.results[1].note
