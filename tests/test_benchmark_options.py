"""The benchmarks' options beyond their smoke runs (``--plot``, ``--pairs``, ``--threads``, the tntorch
comparison, ...), their argument errors and the fallbacks a machine without a GPU, glibc or an
optional library takes: executed here so that ``bash scripts/coverage.sh`` leaves only the GPU-only
lines of docs/gpu.md. Timings mean nothing (tiny shapes)."""
from __future__ import annotations

import argparse
import importlib.util
import sys

import pytest
import torch
from test_benchmarks import _load  # benchmarks/<name>.py as a module


def _exits(main, argv, message, capsys=None):
    """``main(argv)`` stops with ``message`` (SystemExit's text, or argparse's on stderr)."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    text = str(exit_info.value.code) + (capsys.readouterr().err if capsys else "")
    assert message in text, text


#: matplotlib is optional (not installed by the test setup; scripts/coverage.sh installs it so the plotting
#: lines run there); without it the --plot runs below go without --plot, and the missing-matplotlib errors
#: have their own tests
HAVE_MATPLOTLIB = importlib.util.find_spec("matplotlib") is not None


def _plot_args(path) -> list[str]:
    return ["--plot", str(path)] if HAVE_MATPLOTLIB else []


# ----------------------------------------------------------------------------- train_step
TINY_STEP = ["--presets", "tiny", "--seq", "32", "--repeats", "1", "--variants", "mpobert", "bert"]


def test_train_step_pairs_threads_and_plot(tmp_path):
    ts = _load("train_step")
    before = torch.get_num_threads()
    try:
        ts.main([*TINY_STEP, "--pairs", "1x64", "2x32", "--threads", "1", "--out", str(tmp_path / "a.json"),
                 *_plot_args(tmp_path / "a.png")])
    finally:
        torch.set_num_threads(before)
    assert (tmp_path / "a.json").is_file()
    assert not HAVE_MATPLOTLIB or (tmp_path / "a.png").stat().st_size > 1000


def test_train_step_plot_without_matplotlib_fails_before_measuring(tmp_path, monkeypatch, capsys):
    ts = _load("train_step")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    with pytest.raises(SystemExit):
        ts.main([*TINY_STEP, "--out", str(tmp_path / "a.json"), "--plot", str(tmp_path / "a.png")])
    assert "--plot needs matplotlib" in capsys.readouterr().err and not (tmp_path / "a.json").exists()


def test_train_step_arguments(capsys):
    ts = _load("train_step")
    assert ts.parse_pair("4x1024") == (4, 1024)
    for text, message in (("4by1024", "expected KxTOKENS such as 4x1024"), ("0x64", "k and tokens must be >= 1")):
        with pytest.raises(argparse.ArgumentTypeError, match=message):
            ts.parse_pair(text)
    _exits(ts.main, [*TINY_STEP, "--tokens", "48", "--k", "1"], "48 tokens per micro-batch is not a multiple of --seq 32")
    _exits(ts.main, [*TINY_STEP, "--tokens", "64", "--k", "0"], "--k, --tokens and --repeats must be >= 1")
    _exits(ts.main, [*TINY_STEP, "--device", "cuda", "--clock", "cpu"], "--clock cpu is for CPU runs")
    cfg = ts.PRESETS["tiny"]()
    with pytest.raises(ValueError, match="unknown variant 'gpt'"):
        ts.build_variant("gpt", cfg, None)
    with pytest.raises(ValueError, match="unknown optimizer 'sgd'"):
        ts.make_optimizer("sgd", torch.nn.Linear(2, 2))


def test_naive_mpobert_needs_one_group_and_keeps_dense_matrices_dense():
    from benchmarks._naive import NaiveMPOBert
    from mpobert import MPOBertModel

    ts = _load("train_step")
    with pytest.raises(ValueError, match="the naive model is written for one group"):
        NaiveMPOBert(MPOBertModel(ts.PRESETS["tiny"](num_groups=2)))
    cfg = ts.PRESETS["tiny"](hidden_dropout=0.0, attention_dropout=0.0, mpo_matrices=("ffn_in", "ffn_out"))
    mpobert = MPOBertModel(cfg)
    naive = NaiveMPOBert(mpobert)
    assert "q" not in naive.aux[0] and ts.check_naive(mpobert, naive, cfg.vocab_size) <= ts.NAIVE_TOL


def test_peak_memory_without_glibc_or_proc(monkeypatch):
    from benchmarks import _memory

    monkeypatch.setattr(_memory.ctypes, "CDLL", lambda name: (_ for _ in ()).throw(OSError(name)))
    assert _memory._heap_probe() is None
    heap = _memory.PeakHeap()
    assert heap.probe == heap.rss and heap.rss() > 0  # the resident set instead
    with heap:
        big = torch.ones(1 << 22)  # 16 MiB, touched
        big += 1
    assert heap.growth >= 0
    monkeypatch.setattr(_memory.os.path, "exists", lambda path: False)  # not Linux: no /proc/self/statm
    sink: list[int] = []
    with _memory.peak_memory(torch.device("cpu"), sink):
        pass
    assert sink == [0]


# ----------------------------------------------------------------------------- contract_throughput
def test_contract_throughput_tntorch_calibrated_full_and_plot(tmp_path, monkeypatch, capsys):
    from mpo_core.cost import calibration
    from mpo_core.cost.devices import device_model

    ct = _load("contract_throughput")
    monkeypatch.setattr(calibration, "use_calibration", lambda device: device_model("cpu"))  # not re-measured here
    out = ct.main(["--quick", "--full", "--bonds", "16x", "--tokens", "1", "--tntorch", "fwd", "--min-time", "0.001",
                   "--skip-factor", "1.01", "--calibrated", "--out", str(tmp_path / "ct.json"), *_plot_args(tmp_path / "ct.png")])
    printed = capsys.readouterr().out
    assert "planning with the calibrated cost model" in printed and "tntorch / ours (measured)" in printed
    assert not HAVE_MATPLOTLIB or (tmp_path / "ct.png").stat().st_size > 1000
    fwd = [r for r in out["rows"] if r["mode"] == "fwd"]
    assert fwd and all(r["tntorch_vs_auto"] is not None for r in fwd)  # timed, repeated or once when slow
    assert any(r["skipped"] for r in out["rows"])  # a strategy modelled > 1.01x the best is not run
    ct.main(["--quick", "--bonds", "16x", "--tokens", "1", "--tntorch", "off", "--no-skip", "--min-time", "0.001",
             "--out", str(tmp_path / "all.json")])


def test_contract_throughput_when_tntorch_is_missing_fails_or_differs(tmp_path, monkeypatch, capsys):
    ct = _load("contract_throughput")
    from mpo_core.nn import MPOLinear

    layer = MPOLinear(16, 16, (2, 2, 4), (4, 2, 2))
    cores = list(layer.cores)
    measure = ct.timer(torch.device("cpu"), 0.001, min_reps=1)
    monkeypatch.setattr(ct, "SLOW_CALL_S", 0.0)  # every tntorch call "slow": both timed by one call each
    res = ct.run_case(32, 32, "full", 4, "fwd", torch.float32, torch.device("cpu"), measure, 8.0)
    assert res["single_call_ms"] == ["auto (1 call)", "tntorch"] and res["tntorch_vs_auto"] > 0
    broken = type("Broken", (), {"TTMatrix": staticmethod(lambda *a: (_ for _ in ()).throw(RuntimeError("no batch")))})
    monkeypatch.setattr(ct, "tntorch", broken)
    assert ct.tntorch_forward(cores, (2, 2, 4), (4, 2, 2), "fwd") == \
        (None, "tntorch cannot apply a batch: RuntimeError: no batch")
    monkeypatch.setattr(ct, "tntorch_forward", lambda *a: ((lambda x: x * 0), []))  # a wrong answer
    res = ct.run_case(32, 32, "full", 4, "fwd", torch.float32, torch.device("cpu"), measure, 8.0)
    assert res["tntorch_note"].startswith("tntorch result differs from ours")  # a wrong answer is not timed
    monkeypatch.setitem(sys.modules, "tntorch", None)  # not installed
    missing = _load("contract_throughput")
    assert missing.tntorch is None and missing.tntorch_forward(cores, (2, 2, 4), (4, 2, 2), "fwd") == \
        (None, "tntorch not installed")
    missing.main(["--quick", "--bonds", "16x", "--tokens", "1", "--min-time", "0.001", "--out", str(tmp_path / "ct.json")])
    assert "tntorch not installed: its column is left out" in capsys.readouterr().out
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with pytest.raises(SystemExit, match="--plot needs matplotlib"):
        missing.check_plot_backend()


# ----------------------------------------------------------------------------- gpu_model
def test_gpu_model_kernel_table_with_a_compile_error(tmp_path, monkeypatch, capsys):
    from mpo_core.gpu import aot, registry

    gm = _load("gpu_model")
    spec = next(s for s in registry.kernel_specs() if not s.uses_dot)  # one small kernel: seconds
    monkeypatch.setattr(registry, "kernel_specs", lambda: [spec])
    real = aot.compile_all

    def sm90_fails(specs, archs, jobs):
        results = real(specs, archs, jobs)
        for r in results:
            if r.arch == 90:
                r.error = "ptxas error (made up here)"
        return results

    monkeypatch.setattr(aot, "compile_all", sm90_fails)
    report = gm.main(["--jobs", "1", "--json", str(tmp_path / "gm.json")])
    (row,) = report["kernels"]
    assert row["kernel"] == spec.name and row["regs_sm90"] == "compile error" and row["regs_sm80"] > 0
    assert "3. per kernel" in capsys.readouterr().out


def test_gpu_model_measured_beside_the_model_of_a_known_gpu(tmp_path, monkeypatch, capsys):
    """The CUDA branch of gpu_model on an A100 (its name and model), its kernels timed on this CPU."""
    import importlib

    gm = _load("gpu_model")
    fused_ops = importlib.import_module("fused_ops")  # benchmarks/ is on sys.path once a benchmark is loaded
    monkeypatch.setattr(fused_ops, "model_gpu", lambda device: gm.gpu.A100)
    rows = [r for r in gm.gpu.fused_op_rows(64, 4) if r["op"] == "layer_norm"]
    measured = gm.measured_fused_ops(rows, torch.float32, on="cpu")
    assert all(r["model_us"] > 0 and r["measured/model"] > 0 for r in measured)
    real = gm.measured_fused_ops
    monkeypatch.setattr(gm, "measured_fused_ops", lambda ops, dtype: real(rows, torch.float32, on="cpu"))
    monkeypatch.setattr(gm, "device_info", lambda device: {"device": "NVIDIA A100-SXM4-80GB", "sm_clock_MHz": 1410})
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    report = gm.main(["--no-compile", "--json", str(tmp_path / "gm.json")])
    assert report["device"] == "NVIDIA A100-SXM4-80GB" and report["measured_fused_ops"]
    assert all("model_us" in r for r in report["measured_fused_ops"])
    assert "beside the model of A100" in capsys.readouterr().out


# ----------------------------------------------------------------------------- fused_ops
def test_fused_ops_gpu_sizes_contenders_and_model(monkeypatch):
    from mpo_core.ops import dispatch

    fo = _load("fused_ops")
    assert fo.shapes(quick=True) == [(m, n) for m in (4096, 16384) for n in (768, 4096)]
    assert len(fo.shapes(quick=False)) == 12 and fo.shapes(False, tiny=True) == [(64, 768)]
    monkeypatch.setattr(dispatch, "device_capability", lambda device: (8, 0))  # an A100, seen from here
    cands = fo.gpu_candidates(fo.OPS, "cuda", torch.bfloat16)
    assert {"torch_eager", "torch_compile", "ours(default)", "ours(triton)"} <= set(cands)
    assert "torch_compile" not in fo.gpu_candidates(fo.OPS, "cuda", torch.bfloat16, compile_=False)
    monkeypatch.setattr(fo, "model_gpu", lambda device: fo.gpu.A100)  # its roofline beside times taken here
    rows = fo.measured_table({"torch_eager": fo._eager, "ours(cpp)": lambda op: fo._ours(op, "cpp")},
                             ("layer_norm",), [(16, 64)], torch.float32, "cpu", None, repeat=2)
    assert rows and all(r["model_us"] > 0 and r["measured/model"] == r["us"] / r["model_us"] for r in rows)


def test_fused_ops_cpu_cases_and_nothing_to_measure(tmp_path, monkeypatch, capsys):
    fo = _load("fused_ops")
    seen = []
    monkeypatch.setattr(fo, "measured_table", lambda cands, ops, cases, *a: seen.append(cases) or [])
    fo.main(["--quick", "--json", str(tmp_path / "a.json")])
    assert seen == [[(m, n) for m in (512, 2048) for n in (768, 1024)]]
    monkeypatch.setattr(fo, "backends", lambda: {"cpp": False, "cuda": False, "triton": False})
    report = fo.main(["--quick", "--json", str(tmp_path / "b.json")])
    assert "measured" not in report and "nothing to measure" in capsys.readouterr().out


# ----------------------------------------------------------------------------- fused_mpo_linear
def test_fused_mpo_linear_beside_a_model_and_without_the_interpreter(tmp_path, monkeypatch, capsys):
    fml = _load("fused_mpo_linear")
    monkeypatch.setattr(fml, "model_of_device", lambda device: fml.A100)  # its roofline beside times taken here
    rows = fml.measured_table([8], 4, torch.float32, "cpu", 1, 0, [(64, 96)])
    assert rows and all(r["model_us_fused"] > 0 and r["measured/model_dense"] > 0 for r in rows)
    fml.main(["--tiny", "--json", str(tmp_path / "a.json")])
    assert "no GPU: nothing measured" in capsys.readouterr().out
    monkeypatch.delenv("TRITON_INTERPRET")
    _exits(fml.main, ["--tiny", "--cpu-check"], "--cpu-check needs TRITON_INTERPRET=1", capsys)


def test_fused_mpo_linear_on_a_v100_prints_the_model_only(tmp_path, monkeypatch, capsys):
    fml = _load("fused_mpo_linear")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (7, 0))
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Tesla V100-SXM2-16GB")
    report = fml.main(["--tiny", "--json", str(tmp_path / "a.json")])
    assert "measured" not in report
    assert "Tesla V100-SXM2-16GB has compute capability (7, 0): the fused kernel needs >= 8.0" in capsys.readouterr().out


# ----------------------------------------------------------------------------- decompose_speed
def test_decompose_speed_llm_against_tntorch_and_exact(tmp_path):
    dsp = _load("decompose_speed")
    report = dsp.main(["--llm", "--shapes", "64x128", "--bonds", "4", "--rel-tols", "none", "--contenders",
                       "exact,tntorch", "--threads", "1", "--json", str(tmp_path / "llm.json")])
    rows = {r["contender"]: r for r in report["rows"]}
    assert set(rows) == {"exact", "tntorch"} and rows["exact"]["err/exact"] == 1.0
    assert rows["tntorch"]["err/exact"] >= 1.0 - 1e-6  # TT-SVD at the same ranks: no better than exact truncation


def test_decompose_speed_errors(monkeypatch):
    import subprocess

    dsp = _load("decompose_speed")
    assert dsp.available("no_such_module_here") is False
    with pytest.raises(RuntimeError, match="worker nope failed"):
        dsp._run_worker({"contender": "nope", "threads": 1})
    _exits(dsp.main, ["--threads", "0"], "--threads and --repeat must be >= 1")
    monkeypatch.setattr(dsp, "threads_pinned", lambda threads: False)
    monkeypatch.setattr(dsp.subprocess, "run", lambda *a, **k: subprocess.CompletedProcess(a, 3))  # the pinned re-run fails
    _exits(dsp.main, ["--layers", "1"], "3")


# ----------------------------------------------------------------------------- small benchmarks' options and errors
def test_cpp_residual_layernorm_arguments_and_no_extension(monkeypatch, capsys):
    crl = _load("cpp_residual_layernorm")
    _exits(crl.main, ["--tiny", "--repeat", "0"], "--repeat must be >= 1, got 0", capsys)
    _exits(crl.main, ["--tiny", "--threads", "0"], "--threads must be >= 1, got 0", capsys)
    monkeypatch.setattr(crl, "extension", lambda: None)
    before = torch.get_num_threads()
    try:
        assert crl.main(["--tiny", "--threads", "1"]) == 1
    finally:
        torch.set_num_threads(before)
    assert "mpo_core._C is not built" in capsys.readouterr().err


def test_op_overhead_cases_arguments_and_gpu_columns(tmp_path, monkeypatch, capsys):
    oo = _load("op_overhead")
    full = oo.cases(quick=False)
    assert ("bias_gelu", 0.0, "gelu", 64, 3072) in full and all(c[2] == "gelu_tanh" for c in oo.cases(quick=True))
    _exits(oo.main, ["--repeats", "0"], "--repeats must be >= 1 and --min-time > 0")
    _exits(oo.main, ["--clock", "cpu", "--device", "cuda"], "--clock cpu is for CPU runs")
    # a GPU run's table: the CUDA extension's columns in place of the C++ ones (measurement replaced)
    monkeypatch.setattr(oo, "measure", lambda args: [{"op": "layer_norm", "cuda_fwd_us": 1.5}])
    monkeypatch.setattr(oo, "device_description", lambda device: "NVIDIA A100-SXM4-80GB")
    before = torch.get_num_threads()
    try:
        oo.main(["--device", "cuda", "--threads", "1", "--out", str(tmp_path / "oo.json")])
    finally:
        torch.set_num_threads(before)
    printed = capsys.readouterr().out
    assert "cuda_fwd_us" in printed and "cpp_fwd_us" not in printed


def test_lightweight_vs_lora_arguments_and_one_contender(tmp_path, capsys):
    from mpo_core.check import BENCHMARK_RUNS

    lvl = _load("lightweight_vs_lora")
    tiny = [a.replace("{json}", str(tmp_path / "lvl.json")) for a in BENCHMARK_RUNS["lightweight_vs_lora"][1]]
    report = lvl.main([*tiny, "--contenders", "head", "--mpop-rounds", "0"])
    assert {r["contender"] for r in report["summary"]} == {"head only"} and report["mpop_rounds"] in (None, [], {})
    _exits(lvl.main, ["--contenders", "head,adapter"], "--contenders: unknown ['adapter']", capsys)
    _exits(lvl.main, ["--contenders", "head,mpo", "--mpop-rounds", "1"], "--mpop-rounds needs the 'full' contender",
           capsys)


# ----------------------------------------------------------------------------- real_checkpoint
def test_real_checkpoint_arguments(tmp_path, capsys):
    rc = _load("real_checkpoint")
    base = ["--checkpoint", "random-tiny", "--output", str(tmp_path / "rc.json")]
    _exits(rc.main, [*base, "--compress-contenders", "svd-llm,tucker"], "unknown compress contender 'tucker'", capsys)
    _exits(rc.main, [*base, "--peft-contenders", "lora,ia3"], "unknown PEFT contender 'ia3'", capsys)
    _exits(rc.main, ["--checkpoint", str(tmp_path), "--output", str(tmp_path / "rc.json")],
           "is not a transformers checkpoint directory (no config.json)", capsys)
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    (gpt2 / "config.json").write_text('{"model_type": "gpt2"}')
    before = torch.get_num_threads()
    try:
        _exits(rc.main, ["--checkpoint", str(gpt2), "--limit", "8", "--threads", "1", "--output",
                         str(tmp_path / "rc.json")], "--checkpoint is a 'gpt2' model")
    finally:
        torch.set_num_threads(before)


def test_real_checkpoint_resume_keeps_only_runs_of_the_same_settings(tmp_path):
    import json
    from types import SimpleNamespace

    rc = _load("real_checkpoint")
    out = tmp_path / "rc.json"
    settings = {k: f"value of {k}" for keys in rc.RUN_SETTINGS.values() for k in keys}
    args = SimpleNamespace(resume=True, output=str(out), source="/ckpt", peft_contenders=["lora"], **settings)
    assert rc.earlier_runs(args) == []  # nothing written yet
    runs = [{"contender": "lora", "lr": 1e-3, "seed": 0}, {"contender": "full", "lr": 1e-4, "seed": 0}]
    out.write_text(json.dumps({"checkpoint": "/ckpt", "settings": settings, "peft_runs": runs}))
    assert rc.earlier_runs(args) == runs[:1]  # only the contenders asked for
    args.peft_epochs = "another count"  # a PEFT setting: the compress section's runs stay valid
    with pytest.raises(SystemExit, match="was made with other peft_epochs; use another --output"):
        rc.earlier_runs(args)
    assert rc.earlier_runs(args, "compress") == []
    args.limit, args.source = "another limit", "/other"
    with pytest.raises(SystemExit, match="was made with other limit, checkpoint; use another --output"):
        rc.earlier_runs(args, "compress")


def test_real_checkpoint_uniform_compression_keeps_small_matrices_dense_and_refuses_a_tiny_budget():
    rc = _load("real_checkpoint")
    encoder = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.Linear(64, 2))
    targets = list(encoder.named_children())
    with pytest.raises(ValueError, match="budget 100 is below every matrix at bond 1 \\(n=2\\)"):
        rc.compress_uniform(encoder, targets, 2, budget=100)  # bond 1: 128 + 66 entries
    bond = rc.compress_uniform(encoder, targets, 2, budget=2048 + 128)
    assert bond >= 2 and isinstance(encoder[0], rc.MPOLinear)
    assert type(encoder[1]) is torch.nn.Linear  # 64 x 2 at bond 2: 132 entries >= its 128, kept dense


def test_real_checkpoint_peft_model_and_plot_fallbacks(tmp_path, monkeypatch):
    import transformers

    rc = _load("real_checkpoint")
    config = transformers.BertConfig(vocab_size=50, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                     intermediate_size=32)
    base = transformers.BertForSequenceClassification(config)
    with pytest.raises(ValueError, match="unknown PEFT contender 'adapter'"):
        rc.peft_model("adapter", base, 1, ["query"], 3)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # not installed
    assert rc.plot([{"contender": "svd", "budget": 0.5, "cosine": 0.9}], str(tmp_path / "p.png")) is None
    assert not (tmp_path / "p.png").exists()


def test_real_checkpoint_tasks_and_heal_arguments(tmp_path, capsys):
    rc = _load("real_checkpoint")
    finetune = sys.modules[rc.load_task.__module__]
    spec, train_ex, dev_ex = finetune.load_task("stdlib-docs", None, seed=0)  # bundled: shipped with the package
    assert spec.name == "stdlib-docs" and train_ex and dev_ex
    with pytest.raises(ValueError, match="--data-dir is required for task 'rte' \\(bundled: pydoc-topics, stdlib-docs\\)"):
        finetune.load_task("rte", None, seed=0)
    _exits(rc.main, ["--checkpoint", "random-tiny", "--heal-contenders", "svd,lora", "--output", str(tmp_path / "o.json")],
           "unknown heal contender 'lora'", capsys)


def test_real_checkpoint_convert_heals_contenders_at_the_conversions_size(monkeypatch):
    """run_convert's orchestration (the distillation and the healing replaced): the conversion's parameter count
    gives the per-matrix budget, and every --convert-contenders is healed at it at every --heal-lrs."""
    from types import SimpleNamespace

    rc = _load("real_checkpoint")
    heal_mod = sys.modules[rc.run_convert.__module__]
    assert heal_mod.matched_budget(700, 1000, 600) == 0.5  # 700 = (1000 - 600) dense outside + 0.5 * 600
    with pytest.raises(ValueError, match="no per-matrix budget matches 1,100 parameters"):
        heal_mod.matched_budget(1100, 1000, 600)
    stats = {"sentence_cosine": 0.9, "layer_rel_error": [0.1]}
    report = {"student": {"params": 700}, "teacher": {"params": 1000}, "before": stats, "after": stats,
              "train": {"steps": 2, "train_time_s": 0.0}}
    monkeypatch.setattr(heal_mod, "distill", lambda cfg: report)
    healed = []
    monkeypatch.setattr(heal_mod, "heal_contender", lambda args, c, budget, lr: healed.append((c, budget, lr))
                        or {"contender": c, "budget": budget, "lr": lr, "section": "heal"})
    args = SimpleNamespace(distill_lrs=[1e-3], heal_optimizer="adamw", heal_steps=2, heal_teacher_input_steps=0,
                           work_dir="/nonexistent", checkpoint="ckpt", threads=1, convert_contenders=["svd", "mpo5"],
                           heal_lrs=[1e-4, 3e-4])
    rows = heal_mod.run_convert(args, dense_entries=600)
    assert healed == [("svd", 0.5, 1e-4), ("svd", 0.5, 3e-4), ("mpo5", 0.5, 1e-4), ("mpo5", 0.5, 3e-4)]
    assert [r["section"] for r in rows] == ["convert"] * 5 and rows[0]["contender"] == "mpobert conversion"


TINY_PEFT = ["--checkpoint", "random-tiny", "--sections", "peft", "--limit", "16", "--seeds", "0", "--peft-epochs", "1"]


def test_real_checkpoint_resume_runs_only_the_missing_peft_runs(tmp_path, capsys):
    import json

    rc = _load("real_checkpoint")
    out = tmp_path / "rc.json"
    settings = {"task": "pydoc-topics", "data_dir": None, "peft_targets": ["query", "value"], "mpo_n": 5,
                "peft_epochs": 1, "batch_size": 16, "max_len": 64, "limit": 16}
    kept = {"contender": "head only", "lr": 1e-3, "seed": 0, "accuracy": 0.125, "trainable": 1, "train_s": 0.0}
    out.write_text(json.dumps({"checkpoint": "random-tiny", "settings": settings, "peft_runs": [kept]}))
    payload = rc.main([*TINY_PEFT, "--peft-contenders", "head only", "--head-lrs", "1e-3,3e-3", "--resume",
                       "--output", str(out)])
    assert "--resume: 1 runs kept from" in capsys.readouterr().out
    assert [(r["lr"], r["accuracy"] == 0.125) for r in payload["peft_runs"]] == [(1e-3, True), (3e-3, False)]


def test_real_checkpoint_compress_sweeps_lrs_and_resumes_its_finetuning_runs(tmp_path, capsys):
    import json

    rc = _load("real_checkpoint")
    out = tmp_path / "rc.json"
    common = ["--checkpoint", "random-tiny", "--sections", "compress", "--limit", "16", "--seeds", "0",
              "--budgets", "0.5,0.3", "--finetune-epochs", "1", "--compress-contenders", "uncompressed,svd uniform",
              "--output", str(out)]
    first = rc.main([*common, "--compress-lrs", "1e-3"])
    assert [(r["contender"], r["budget"]) for r in first["compress"]] == [
        ("uncompressed", 1.0), ("svd uniform", 0.5), ("svd uniform", 0.3)]  # the original once, at every budget
    assert len(first["compress_runs"]) == 3 and all(r["per_lr"].keys() == {"0.001"} for r in first["compress"])
    data = json.loads(out.read_text())
    for run in data["compress_runs"]:
        run["accuracy"] = 0.125  # a marker: kept runs are not retrained
    out.write_text(json.dumps(data))
    second = rc.main([*common, "--compress-lrs", "1e-3,1e-2", "--resume"])
    kept = [r for r in second["compress_runs"] if r["lr"] == 1e-3]
    assert len(second["compress_runs"]) == 6 and [r["accuracy"] for r in kept] == [0.125] * 3
    assert all(set(r["per_lr"]) == {"0.001", "0.01"} for r in second["compress"])
    assert second["compress"][0]["per_lr"]["0.001"] == 0.125


def test_real_checkpoint_heal_students_are_the_compression_before_healing_and_the_healed_model(tmp_path):
    """heal_students rebuilds the compression a heal run started from: with an lr too small to move anything, the
    healed model equals it; a run whose report disagrees is refused."""
    import json
    import os
    from types import SimpleNamespace

    rc = _load("real_checkpoint")
    heal_mod = sys.modules[rc.run_heal.__module__]
    finetune = sys.modules[rc.load_task.__module__]
    ckpt = finetune.random_tiny_checkpoint(str(tmp_path / "ckpt"), ["the module defines a class", "open a file"])
    args = SimpleNamespace(checkpoint=ckpt, work_dir=str(tmp_path / "runs"), heal_steps=2, heal_optimizer="adamw",
                           heal_teacher_input_steps=0, threads=1)
    row = heal_mod.heal_contender(args, "svd+calib", 0.5, 1e-30)
    compressed, healed = heal_mod.heal_students(args, row)
    mpos = {n: m for n, m in compressed.named_modules() if isinstance(m, rc.MPOLinear)}
    assert mpos and {n for n, m in healed.named_modules() if isinstance(m, rc.MPOLinear)} == set(mpos)
    for name, tensor in compressed.state_dict().items():
        torch.testing.assert_close(healed.state_dict()[name], tensor, rtol=1e-6, atol=1e-20, msg=name)  # lr 1e-30
    report_path = tmp_path / "runs" / os.path.basename(row["run_dir"]) / "heal_report.json"
    report = json.loads(report_path.read_text())
    report["compression"]["matrices"][0]["ranks"][1] += 1
    report_path.write_text(json.dumps(report))
    with pytest.raises(RuntimeError, match="the rebuilt compression differs from the healed run's"):
        heal_mod.heal_students(args, row)


def test_real_checkpoint_refuses_an_opf_merge_that_changes_the_architecture(tmp_path, monkeypatch):
    from mpo_core.opf import OverParameterization

    rc = _load("real_checkpoint")
    monkeypatch.setattr(OverParameterization, "merge", lambda self: None)  # a merge that leaves the MPO modules
    with pytest.raises(RuntimeError, match="OPF's merged model does not have the original architecture"):
        rc.main([*TINY_PEFT, "--peft-contenders", "opf", "--opf-lrs", "1e-4", "--output", str(tmp_path / "o.json")])
