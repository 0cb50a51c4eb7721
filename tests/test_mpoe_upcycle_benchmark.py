"""benchmarks/mpoe_upcycle.py beyond its smoke run: a saved checkpoint folder goes back in, the upcycled
contenders start where the dense model is, the report has every column, --plot is refused without matplotlib,
and T5's span corruption keeps every token exactly once."""
from __future__ import annotations

import importlib.util
import random
import sys
from pathlib import Path

import pytest

pytest.importorskip("transformers")

BENCH = Path(__file__).resolve().parent.parent / "benchmarks" / "mpoe_upcycle.py"


def _load():
    spec = importlib.util.spec_from_file_location("benchmark_mpoe_upcycle", BENCH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


def test_checkpoint_round_trip_and_report(tmp_path):
    mu = _load()
    first = mu.main(["--quick", "--models", "gpt2,t5", "--contenders", "dense", "--save-pretrained", str(tmp_path / "ckpt"),
                     "--output", str(tmp_path / "a.json")])
    assert [m["saved"] for m in first["models"]] == [str(tmp_path / "ckpt" / k) for k in ("gpt2", "t5")]
    report = mu.main(["--quick", "--models", "gpt2,t5", "--gpt2-checkpoint", str(tmp_path / "ckpt" / "gpt2"),
                      "--t5-checkpoint", str(tmp_path / "ckpt" / "t5"), "--contenders", "dense,switch,mpoe,mpoe-aux",
                      "--output", str(tmp_path / "b.json")])
    assert [m["checkpoint"] for m in report["models"]] == [str(tmp_path / "ckpt" / k) for k in ("gpt2", "t5")]
    for kind in ("gpt2", "t5"):
        rows = {r["contender"]: r for r in report["runs"] if r["model"] == kind}
        dense = rows["dense"]
        for name in ("switch", "mpoe", "mpoe-aux"):  # exact at init: the same held-out loss before training
            assert rows[name]["heldout_before"] == pytest.approx(dense["heldout_before"], rel=1e-5)
            assert rows[name]["log"][-1]["expert_share"] and 0 <= rows[name]["dropped"] <= 1
        assert rows["mpoe"]["total_params"] < rows["switch"]["total_params"]
        assert rows["mpoe-aux"]["trainable_params"] < rows["mpoe"]["trainable_params"]
    line = next(t for t in report["table"] if t["contender"] == "mpoe")
    assert {"vs switch %", "time / switch", "FFN params / switch", "balance", "max share", "dropped %"} <= set(line)


def test_arguments_and_span_corruption(capsys):
    mu = _load()
    for argv, message in ((["--models", "llama"], "unknown model"), (["--contenders", "moe"], "unknown contender")):
        with pytest.raises(SystemExit):
            mu.parse(argv)
        assert message in capsys.readouterr().err
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit):
            mu.parse(["--plot", "x.png"])
        assert "--plot needs matplotlib" in capsys.readouterr().err
    ids = list(range(100, 164))
    inp, tgt = mu.span_corrupt(ids, random.Random(0), list(range(10)))
    spans = round(64 * mu.RATE / mu.SPAN)
    assert len(tgt) == spans * (mu.SPAN + 1) and len(inp) == 64 - spans * mu.SPAN + spans
    restored, t = [], iter(tgt)
    fill = {}
    while True:
        s = next(t, None)
        if s is None:
            break
        fill[s] = [next(t) for _ in range(mu.SPAN)]
    for tok in inp:
        restored += fill.get(tok, [tok])
    assert restored == ids
