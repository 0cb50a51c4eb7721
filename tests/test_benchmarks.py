"""Every benchmark runs: it imports, ``--help`` works, and a tiny CPU run writes its JSON report.

A benchmark added to ``benchmarks/`` without a smoke run here fails ``test_every_benchmark_has_a_smoke_run``.
Timings of these runs mean nothing (tiny shapes, one or a few calls); only that the code path runs.
"""
from __future__ import annotations

import importlib.util
import json
import statistics
import sys
from pathlib import Path

import pytest
import torch

from mpo_core.check import BENCHMARK_RUNS, Checker, run_benchmarks

BENCH = Path(__file__).resolve().parent.parent / "benchmarks"
# Each benchmark's tiny run ({json} is the report path), shared with ``python -m mpo_core.check --tiny``.
SMOKE = {name: runs[1] for name, runs in BENCHMARK_RUNS.items()}
SLOW = {"decompose_speed", "lightweight_vs_lora", "methods_demo", "train_step", "contract_throughput", "op_overhead"}


def _load(name: str):
    """Import ``benchmarks/<name>.py`` as a module (it puts benchmarks/ on sys.path itself)."""
    spec = importlib.util.spec_from_file_location(f"benchmark_{name}", BENCH / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_every_benchmark_has_a_smoke_run():
    found = {p.stem for p in BENCH.glob("*.py") if not p.stem.startswith("_")}
    assert found == set(SMOKE), f"benchmarks without a smoke run: {sorted(found - set(SMOKE))}; " \
                                f"smoke runs without a benchmark: {sorted(set(SMOKE) - found)}"


@pytest.mark.parametrize("name", sorted(SMOKE), ids=str)
def test_help(name, capsys):
    module = _load(name)
    with pytest.raises(SystemExit) as exit_info:
        module.main(["--help"])
    assert exit_info.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize("name", [pytest.param(n, marks=pytest.mark.slow) if n in SLOW else n for n in sorted(SMOKE)],
                         ids=str)
def test_tiny_run_writes_json(name, tmp_path):
    """The tiny run in a subprocess, as ``python -m mpo_core.check --tiny`` runs it: exit 0 and a JSON report."""
    c = Checker("cpu", timed=False)
    run_benchmarks(c, [name], tiny=True, out_dir=tmp_path)
    assert [r.ok for r in c.results] == [True], c.results[0].note
    report = json.loads((tmp_path / f"{name}.json").read_text())
    assert isinstance(report, dict) and report, f"{name} wrote an empty report"
    if name == "train_step":  # every contender ran, and naive passed its start-up equivalence check
        assert {r["variant"] for r in report["rows"]} == set(_load("train_step").VARIANTS)
        assert report["naive_check_max_abs_diff"]["tiny"] <= _load("train_step").NAIVE_TOL


# ----------------------------------------------------------------------------- train_step's contenders
def test_train_step_dense_baselines_run_mpobert_activation_through_torch_gelu():
    """BERT and ALBERT compute MPOBERT's GELU with torch's fused op, not transformers' Python gelu_new."""
    import torch.nn.functional as F
    from transformers.activations import ACT2FN

    from mpo_core.activation import gelu_approximate
    from mpobert import MPOBertModel

    ts = _load("train_step")
    x = torch.randn(4096, dtype=torch.float32) * 3
    for hidden_act in ("gelu_new", "gelu"):
        cfg = ts.PRESETS["tiny"](hidden_dropout=0.0, attention_dropout=0.0, hidden_act=hidden_act)
        mpobert = MPOBertModel(cfg)
        want = F.gelu(x, approximate=gelu_approximate(cfg.activation))  # what MPOBERT's fused GELU computes
        bert, albert = ts.build_variant("bert", cfg, mpobert), ts.build_variant("albert", cfg, mpobert)
        acts = [bert.encoder.layer[0].intermediate.intermediate_act_fn,
                albert.encoder.albert_layer_groups[0].albert_layers[0].activation]
        for act in acts:
            assert torch.equal(act(x), want), type(act).__name__
    assert not torch.equal(ACT2FN["gelu_new"](x), F.gelu(x, approximate="tanh"))  # the test can tell them apart


def test_train_step_naive_check_has_a_tolerance():
    from mpobert import MPOBertModel

    ts = _load("train_step")
    cfg = ts.PRESETS["tiny"](hidden_dropout=0.0, attention_dropout=0.0)
    mpobert = MPOBertModel(cfg)
    naive = ts.NaiveMPOBert(mpobert)
    assert ts.check_naive(mpobert, naive, cfg.vocab_size) <= ts.NAIVE_TOL
    with torch.no_grad():
        next(iter(naive.central.values())).mul_(1.01)  # a naive model off by 1% in one shared core
    with pytest.raises(RuntimeError, match="naive and mpobert differ"):
        ts.check_naive(mpobert, naive, cfg.vocab_size)


# ----------------------------------------------------------------------------- the shared timer
sys.path.insert(0, str(BENCH))
import _common  # noqa: E402


def test_time_calls_interleaves_and_measures():
    order = []
    fns = {"a": lambda: order.append("a"), "b": lambda: order.append("b")}
    times = _common.time_calls(fns, "cpu", warmup=1, repeat=3)
    assert order == ["a", "b"] * 4  # one warm-up round, then three timed rounds, interleaved
    assert set(times) == {"a", "b"} and all(len(t) == 3 and min(t) >= 0 for t in times.values())
    slow = _common.time_call(lambda: sum(range(200_000)), "cpu", warmup=0, repeat=3)
    fast = _common.time_call(lambda: None, "cpu", warmup=0, repeat=3)
    assert slow > fast
    with pytest.raises(ValueError, match="repeat >= 1"):
        _common.time_calls(fns, "cpu", repeat=0)


def test_time_calls_clock_and_around():
    from mpo_core.gpu.timing import time_calls

    entered = []

    class Probe:
        def __init__(self, name):
            self.name = name

        def __enter__(self):
            entered.append(self.name)

        def __exit__(self, *exc):
            entered.append("/" + self.name)

    sleep = {"sleep": lambda: __import__("time").sleep(0.02)}
    wall = time_calls(sleep, "cpu", warmup=0, repeat=2)["sleep"]
    cpu = time_calls(sleep, "cpu", warmup=0, repeat=2, clock="cpu", around=Probe)["sleep"]
    assert min(wall) >= 0.02 and max(cpu) < 0.01  # process_time does not count a sleep
    assert entered == ["sleep", "/sleep"] * 2  # around each timed call only, not the warm-up
    with pytest.raises(ValueError, match="clock must be one of"):
        time_calls(sleep, "cpu", clock="gpu")
    with pytest.raises(ValueError, match="is for CPU runs"):
        time_calls(sleep, "cuda", clock="cpu")


def test_median_for_sizes_the_rounds():
    from mpo_core.gpu.timing import median_for

    calls = {"a": 0, "b": 0}

    def count(name):
        def go():
            calls[name] += 1
        return go

    med = median_for({"a": count("a"), "b": count("b")}, "cpu", 0.0, min_reps=3, max_reps=5)
    assert set(med) == {"a", "b"} and calls == {"a": 4, "b": 4}  # one sizing round + min_reps
    calls.update(a=0, b=0)
    median_for({"a": count("a"), "b": count("b")}, "cpu", 10.0, min_reps=2, max_reps=5)
    assert calls == {"a": 6, "b": 6}  # capped at max_reps
    with pytest.raises(ValueError, match="min_reps <= max_reps"):
        median_for({"a": count("a")}, "cpu", 0.1, min_reps=3, max_reps=2)


def test_device_info_cpu():
    info = _common.device_info("cpu")
    assert info["type"] == "cpu" and info["threads"] == torch.get_num_threads() and "CPU" in info["device"]


@pytest.mark.cuda
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_time_calls_cuda_events():
    x = torch.randn(2048, 2048, device="cuda")
    times = _common.time_calls({"mm": lambda: x @ x}, "cuda", repeat=5)["mm"]
    assert statistics.median(times) > 0
    assert "capability" in _common.device_info("cuda")


# ----------------------------------------------------------------------------- the GPU flows, run on the CPU
def test_fused_ops_gpu_flow_runs_on_cpu(tmp_path):
    report = _load("fused_ops").main(["--tiny", "--gpu-flow-on-cpu", "--json", str(tmp_path / "f.json")])
    impls = {r["impl"] for r in report["measured"]}
    assert {"torch_eager", "ours(default)"} <= impls and "torch_compile" not in impls  # no inductor on CPU
    assert report["copy_GBps"] > 0 and all(r["us"] > 0 and "model_us" not in r for r in report["measured"])


def test_gpu_model_measurement_runs_on_cpu():
    gm = _load("gpu_model")
    rows = [r for r in gm.gpu.fused_op_rows(64, 4) if r["op"] == "layer_norm"]
    measured = gm.measured_fused_ops(rows, torch.float32, on="cpu")
    assert {(r["impl"], r["dir"]) for r in measured} == {(i, d) for i in ("fused", "torch") for d in ("fwd", "bwd")}
    assert all(r["measured_us"] > 0 and "model_us" not in r for r in measured)  # a CPU has no roofline


# ----------------------------------------------------------------------------- modes beyond the smoke runs
TINY_STEP = ["--presets", "tiny", "--tokens", "64", "--seq", "32", "--k", "1", "--repeats", "1"]


def test_train_step_inference_lamb_bf16_rebuild_and_profile(tmp_path, capsys):
    ts = _load("train_step")
    ts.main([*TINY_STEP, "--variants", "mpobert", "bert", "--optimizers", "lamb", "--precision", "bf16", "--inference",
             "--out", str(tmp_path / "a.json")])
    rows = json.loads((tmp_path / "a.json").read_text())["rows"]
    assert {(r["inference"], r["precision"], r["optimizer"]) for r in rows} == {(False, "bf16", "lamb"),
                                                                               (True, "bf16", "none")}
    ts.main([*TINY_STEP, "--variants", "mpobert", "--rebuild", "--out", str(tmp_path / "b.json")])
    rebuild = json.loads((tmp_path / "b.json").read_text())["rebuild"]
    (rrows,) = rebuild.values()
    assert {r["what"] for r in rrows} == {"rebuild batched", "rebuild per layer", "dense GEMMs (64 tokens)"}
    ts.main([*TINY_STEP, "--variants", "mpobert", "mpobert_plain", "bert", "--profile", "--profile-rows", "3",
             "--out", str(tmp_path / "c.json")])
    out = capsys.readouterr().out
    assert "profile of one step" in out and "top operators of one step" in out
    (rows,) = json.loads((tmp_path / "c.json").read_text())["profile"].values()
    by = {r["category"]: r for r in rows}
    assert list(by) == [*_load("_profile").CATEGORIES, "total"]
    for name in ("mpobert", "mpobert_plain", "bert"):
        parts = sum(r[name] for r in rows if r["category"] != "total")
        assert all(r[name] >= 0 for r in rows) and parts == pytest.approx(by["total"][name], rel=1e-6)
        assert by["GEMMs"][name] > 0 and by["optimizer"][name] > 0
    assert by["rebuild fwd"]["bert"] == by["rebuild bwd"]["bert"] == by["adapters"]["bert"] == 0
    for name in ("mpobert", "mpobert_plain"):  # MPOBERT rebuilds its W (forward and backward) and has adapters
        assert by["rebuild fwd"][name] > 0 and by["rebuild bwd"][name] > 0 and by["adapters"][name] > 0
        assert by["total"][f"{name} over bert"] == pytest.approx((by["total"][name] - by["total"]["bert"]) / by["total"]["bert"])


def test_contract_throughput_bf16(tmp_path):
    report = _load("contract_throughput").main(["--quick", "--tokens", "8", "--bonds", "16x", "--tntorch", "off",
                                                "--min-time", "0.001", "--dtype", "bf16", "--out",
                                                str(tmp_path / "c.json")])
    assert report["dtype"] == "bf16" and report["rows"]


def test_decompose_speed_llm_mode(tmp_path):
    report = _load("decompose_speed").main(["--llm", "--shapes", "64x128", "--bonds", "4", "--rel-tols", "none",
                                            "--contenders", "auto,randomized,tensorly,numpy", "--threads", "1",
                                            "--json", str(tmp_path / "d.json")])
    rows = {r["contender"]: r for r in report["rows"]}
    assert set(rows) == {"auto", "randomized", "tensorly", "numpy"}
    assert all(r["seconds"] > 0 and r["err"] <= 1 for r in rows.values()) and "x_vs_auto" in rows["numpy"]


def test_checkpoint_compress_one_shard_and_extrapolation(tmp_path):
    report = _load("checkpoint_compress").main(["--layers", "2", "--procs", "1", "--one-shard", "--hidden", "128",
                                                "--intermediate", "256", "--vocab", "256", "--max-bond", "8",
                                                "--workdir", str(tmp_path / "work"), "--json", str(tmp_path / "c.json")])
    (row,) = report["rows"]
    assert report["partial"] and not report["seven_b_shaped"] and row["matrices"] == 14 and row["layers"] == 2
    assert row["matrices/s"] > 0 and row["GB/s"] > 0 and row["x_largest_fp32"] > 0
    assert not any((tmp_path / "work").iterdir())  # every shard deleted after its run
    cpu = report["extrapolated_cpu"]["cpu_1proc"]
    assert cpu["70B_s"] > cpu["7B_s"] > row["seconds"]
    gpu = report["model_gpu"]
    assert gpu["7B_1gpu"]["matrices"] == 32 * 7 and gpu["70B_1gpu"]["matrices"] == 80 * 7
    assert gpu["7B_8gpu"]["seconds"] < gpu["7B_1gpu"]["seconds"] < gpu["70B_1gpu"]["seconds"]

