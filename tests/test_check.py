"""``python -m mpo_core.check``: the CPU subset passes at tiny sizes, a wrong kernel fails it, and
its benchmark runs report success and failure."""
from __future__ import annotations

import json
import math

import pytest
import torch

from mpo_core import check
from mpo_core.check import fused


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
    monkeypatch.setattr(fused, "NORM_OPS", ())
    monkeypatch.setattr(fused, "DTYPES", (torch.float32,))
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


# ----------------------------------------------------------------------------- the GPU paths, run on a CPU
def _rows(c, what):
    return [r for r in c.results if r.what == what]


def test_timed_path_runs_on_cpu_with_and_without_a_model():
    """The flow a GPU takes (time forward, then the backward again on the same graph) runs here."""
    for name, capability, has_model in (("NVIDIA A100-SXM4-80GB", (8, 0), True), ("NVIDIA H200", (9, 0), False)):
        c = check.Checker("cpu", timed=True, gpu_name=name, capability=capability, warmup=1, repeat=2)
        assert (c.model_gpu is not None) == has_model
        for op in ("residual_dropout_layer_norm", "bias_gelu"):
            check.check_fused_op(c, op, "triton", torch.float32, 8, 64)
        check.check_mpo_linear(c, 8, [((2, 4), (4, 2))], max_bond=4)
        assert c.results and all(r.ok for r in c.results), [r for r in c.results if not r.ok]
        timed = [r for r in c.results if r.measured_us is not None]
        assert {r.what for r in timed} == {"y", "dx", "y (inference)"}
        assert all(r.measured_us > 0 for r in timed)
        assert all((r.model_us is not None and r.model_us > 0) == has_model for r in timed)
        table = check.verdict_table(c.results)
        assert ("no model" in table) != has_model


def test_untimed_checker_times_nothing():
    c = check.Checker("cpu", timed=False)
    check.check_fused_op(c, "layer_norm", "triton", torch.float32, 4, 32)
    assert c.results and all(r.measured_us is None and r.model_us is None for r in c.results)


def test_a_missing_backend_on_ampere_or_newer_fails_with_its_fix(capsys):
    c = check.Checker("cpu", timed=False, gpu_name="NVIDIA H200", capability=(9, 0))
    c.unavailable("layer_norm", "cuda", torch.bfloat16, "mpo_core._C was built without CUDA")
    c.unavailable("mpo_linear", "triton", torch.float16, "Triton is not installed")
    assert [r.ok for r in c.results] == [False, False]
    assert check.INSTALL_LINES["cuda"] in c.results[0].note and "built without CUDA" in c.results[0].note
    assert check.INSTALL_LINES["triton"] in c.results[1].note
    c.unavailable("mpo_linear", "cuda", torch.float16, "mpo_core._C has no mpo_linear")  # no such kernel: not required
    c.unavailable("layer_norm", "cuda", torch.float64, "the CUDA kernels take float32/float16/bfloat16")
    assert len(c.results) == 2 and len(c.not_checked) == 2
    v100 = check.Checker("cpu", timed=False, gpu_name="Tesla V100-SXM2-16GB", capability=(7, 0))
    v100.unavailable("mpo_linear", "triton", torch.float16, "compute capability (7, 0) < (8, 0)")
    cpu = check.Checker("cpu", timed=False)
    cpu.unavailable("layer_norm", "triton", torch.float32, "Triton is not installed")
    assert not v100.results and not cpu.results and len(v100.not_checked) == len(cpu.not_checked) == 1
    with pytest.raises(ValueError, match="gpu_name and capability"):
        check.Checker("cpu", timed=False, gpu_name="NVIDIA A100-SXM4-80GB")
    with pytest.raises(ValueError, match="backend must be"):
        check.install_line("layer_norm", "cudnn", torch.float32, (8, 0))


def test_no_kernel_checked_is_a_failure():
    c = check.Checker("cpu", timed=False)
    c.skip("layer_norm [triton, float32]", "Triton is not installed")
    check.require_a_kernel(c)
    assert [r.ok for r in c.results] == [False]
    ok = check.Checker("cpu", timed=False)
    check.check_fused_op(ok, "layer_norm", "triton", torch.float32, 4, 32)
    check.require_a_kernel(ok)
    assert all(r.ok for r in ok.results)


def test_dropout_is_held_to_the_independent_philox_mask(monkeypatch):
    c = check.Checker("cpu", timed=False)
    check.check_fused_op(c, "residual_dropout_layer_norm", "triton", torch.float32, 8, 64)
    assert [r.ok for r in _rows(c, "backward mask = Philox(seed) reference")] == [True]
    real = check.dropout_reference_mask
    # a reference drawn from another seed: the kernel's mask (right for its own seed) must not match it
    monkeypatch.setattr(fused, "dropout_reference_mask", lambda b, m, n, p, seed: real(b, m, n, p, seed + 1))
    bad = check.Checker("cpu", timed=False)
    check.check_fused_op(bad, "residual_dropout_layer_norm", "triton", torch.float32, 8, 64)
    failed = {r.what for r in bad.results if not r.ok}
    assert {"backward mask = Philox(seed) reference", "y", "dresidual"} <= failed
    with pytest.raises(ValueError, match="backend must be one of"):
        real("cpp", 2, 2, 0.1, 0)


def test_tolerances_are_per_op_and_dtype():
    bf16, fp16, fp32 = torch.bfloat16, torch.float16, torch.float32
    assert check.tolerance("bias_gelu", "y", bf16) == 2 * 2.0**-7
    assert check.tolerance("residual_layer_norm", "dx", bf16) == 2 * check.tolerance("layer_norm", "dx", bf16)
    assert check.tolerance("layer_norm", "dweight", fp16) == 4 * 2.0**-10
    assert check.tolerance("layer_norm", "y", fp32) == check.FP32_FLOOR
    assert check.tolerance("mpo_linear", "dx", bf16) == 2 * check.tolerance("mpo_linear", "y", bf16)
    with pytest.raises(ValueError, match="no tolerance"):
        check.tolerance("layer_norm", "dresidual", bf16)
    with pytest.raises(ValueError, match="dtype must be"):
        check.tolerance("layer_norm", "y", torch.int8)


def test_gpus_the_tables_do_not_describe_get_no_model():
    from mpo_core.gpu.devices import A100, H100, model_for

    assert model_for("NVIDIA A100-SXM4-80GB", (8, 0)) is A100 and model_for("NVIDIA H100 80GB HBM3", (9, 0)) is H100
    for name, cap in (("NVIDIA H200", (9, 0)), ("NVIDIA GH200 480GB", (9, 0)), ("NVIDIA H100 PCIe", (9, 0)),
                      ("NVIDIA L4", (8, 9)), ("NVIDIA GeForce RTX 4090", (8, 9)), ("NVIDIA A100-SXM4-40GB", (8, 0)),
                      ("Tesla V100-SXM2-16GB", (7, 0)), ("NVIDIA A100-SXM4-80GB", (9, 0))):
        assert model_for(name, cap) is None, name
    with pytest.raises(ValueError, match="capability"):
        model_for("NVIDIA A100-SXM4-80GB", (8,))


def test_philox_reference_known_answers_and_arguments():
    from mpo_core.gpu import philox

    for counter, key, want in philox.KNOWN_ANSWERS:
        assert tuple(int(w) for w in philox.philox4x32_10(counter, key)) == want
    for mask in (philox.triton_keep_mask, philox.cuda_keep_mask):
        keep = mask(100, 400, 0.3, seed=5, offset=11)
        assert keep.shape == (100, 400) and abs(keep.double().mean().item() - 0.7) < 4 * (0.21 / 40000) ** 0.5
        assert mask(2, 8, 0.0, 1).all() and not mask(2, 8, 1.0, 1).any()
        assert not torch.equal(mask(4, 64, 0.5, 1), mask(4, 64, 0.5, 2))
        with pytest.raises(ValueError, match="p must be"):
            mask(2, 2, 1.5, 0)
        with pytest.raises(TypeError, match="seed must be"):
            mask(2, 2, 0.1, -1)
    with pytest.raises(ValueError, match="4 words"):
        philox.philox4x32_10((0, 0), (0, 0))


def test_gpu_sizes_and_what_is_not_checked():
    tokens, hidden, ffn, mpo_tokens, mpo_shapes = check.sizes(gpu=True, tiny=False)
    assert tokens == (512, 4096, 16384) and hidden == (768, 1024) and ffn == (3072, 4096) and mpo_tokens == 512
    assert [(math.prod(i), math.prod(o)) for i, o in mpo_shapes] == [(768, 3072), (3072, 768)]
    assert check.sizes(gpu=True, tiny=True)[:3] == ((512,), (768,), (3072,))
    assert check.sizes(gpu=False, tiny=True)[0] == (16,)
    h200 = check.Checker("cpu", timed=False, gpu_name="NVIDIA H200", capability=(9, 0))
    a100 = check.Checker("cpu", timed=False, gpu_name="NVIDIA A100-SXM4-80GB", capability=(8, 0))
    assert "no roofline model for NVIDIA H200" in check.not_checked_here(h200, "NVIDIA H200", (512,))[0]
    assert check.not_checked_here(a100, "NVIDIA A100-SXM4-80GB", (512,)) == []
    assert any("CUDA extension" in line for line in check.not_checked_here(check.Checker("cpu", False), "CPU", (16,)))


# ----------------------------------------------------------------------------- the rest of the check, run here
def test_checker_arguments_and_a_nan_result():
    with pytest.raises(ValueError, match="device must be 'cpu' or 'cuda', got 'tpu'"):
        check.Checker("tpu", timed=False)
    with pytest.raises(ValueError, match="warmup must be >= 0 and repeat >= 1, got 1 and 0"):
        check.Checker("cpu", timed=True, warmup=1, repeat=0)
    with pytest.raises(ValueError, match="what must be one of \\['dx', 'y'\\] for mpo_linear, got 'dbias'"):
        check.tolerance("mpo_linear", "dbias", torch.float32)
    assert check.rel_err(torch.tensor([1.0, math.nan]), torch.ones(2)) == math.inf


def test_mpo_linear_on_a_gpu_without_the_triton_matmul(monkeypatch):
    """Below compute capability 8.0 (V100) dispatch refuses Triton's tl.dot kernel: the check says so and
    compares the path mpo_linear takes there instead."""
    from mpo_core.ops import dispatch

    real = dispatch.why_unavailable
    monkeypatch.setattr(dispatch, "why_unavailable", lambda op, backend, device, dtype: (
        "compute capability (7, 0) < (8, 0)" if op == "mpo_linear" and backend == "triton"
        else real(op, backend, device, dtype)))
    c = check.Checker("cpu", timed=False, gpu_name="Tesla V100-SXM2-16GB", capability=(7, 0))
    check.check_mpo_linear(c, 8, [((2, 4), (4, 2))], max_bond=4)
    assert {r.check for r in c.results} == {"mpo_linear (default path)"} and all(r.ok for r in c.results)
    assert len(c.not_checked) == 2 and all("compute capability (7, 0)" in line for line in c.not_checked)


def test_benchmark_part_of_main_and_a_package_without_benchmarks(tmp_path, monkeypatch):
    out = tmp_path / "check.json"
    assert check.main(["--tiny", "--only", "benchmarks", "--benchmarks", "gpu_model", "--json", str(out)]) == 0
    assert [(r["backend"], r["ok"]) for r in json.loads(out.read_text())["results"]] == [("gpu_model", True)]
    from mpo_core.check import runs

    monkeypatch.setattr(runs, "benchmarks_dir", lambda: None)  # an installed package: no benchmarks/ beside it
    c = check.Checker("cpu", timed=False)
    check.run_benchmarks(c, ["gpu_model"], tiny=True, out_dir=tmp_path)
    assert not c.results and "benchmarks/ is not next to the package" in c.not_checked[0]
