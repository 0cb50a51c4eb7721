"""MPOP, OPF and MPOE end to end on the bundled pydoc-topics task (examples/mpo_methods.py: tiny BERT-like
model, the mpobert Trainer, CPU, seconds each)."""
import argparse
import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

_PATH = Path(__file__).resolve().parents[1] / "examples" / "mpo_methods.py"
_spec = importlib.util.spec_from_file_location("mpo_methods", _PATH)
methods = importlib.util.module_from_spec(_spec)
sys.modules["mpo_methods"] = methods
_spec.loader.exec_module(methods)
BertLikeClassifier, add_subparsers, main = methods.BertLikeClassifier, methods.add_subparsers, methods.main
prepare_task, run_mpoe, run_mpop, run_opf = methods.prepare_task, methods.run_mpoe, methods.run_mpop, methods.run_opf

SIZES = dict(hidden=32, intermediate=64)


@pytest.fixture(scope="module")
def data():
    return prepare_task(max_seq_len=32, vocab_size=1000)


def _show(capsys, title, result):
    with capsys.disabled():
        print(f"\n{title}: accuracy {json.dumps(result['accuracy'])}")
        print(f"{title}: params {json.dumps({k: v for k, v in result['params'].items() if not isinstance(v, dict)})}")


def test_mpop_compress_then_auxiliary_finetune(data, capsys):
    r = run_mpop(data, steps=150, aux_steps=80, budget=0.3, n=3, **SIZES)
    _show(capsys, "MPOP", r)
    acc, params = r["accuracy"], r["params"]
    assert params["encoder_matrices_compressed"] <= 0.3 * params["encoder_matrices_dense"]
    assert params["compressed_model"] < params["dense_model"]
    assert params["trainable_fraction"] < 0.05  # auxiliaries + classifier only
    assert acc["full_finetune"] > acc["majority"] + 0.15
    assert acc["auxiliary_finetune"] >= acc["truncated"]  # lightweight fine-tuning recovers accuracy
    assert acc["auxiliary_finetune"] > acc["majority"] + 0.15
    for row in r["compression"]["matrices"]:
        assert row["error_bound"] <= row["allocation_bound"] * (1 + 1e-9) + 1e-9


def test_opf_overparameterize_then_merge(data, capsys):
    """Static selection before training, then dynamic re-selection every 40 steps, then the merge."""
    r = run_opf(data, steps=150, k=0.5, dynamic_every=40, n=5, **SIZES)
    _show(capsys, "OPF (static start, dynamic every 40)", r)
    with capsys.disabled():
        print(f"OPF: merge changed dev logits by at most {r['merge_max_abs_logit_diff']:.2e}; swaps {r['swaps']}")
    params = r["params"]
    assert params["opf_training"] > params["dense_model"]
    assert params["opf_merged"] == params["dense_model"] and r["merged_is_dense"]
    assert r["merge_max_abs_logit_diff"] < 1e-5
    assert r["accuracy"]["opf_merged"] == r["accuracy"]["opf_before_merge"]
    assert r["accuracy"]["opf_merged"] > r["accuracy"]["majority"] + 0.15
    assert len(r["expanded_at_end"]) == 6  # half of the 12 encoder matrices
    assert r["swaps"] and all(s["added"] and s["dropped"] for s in r["swaps"])


def test_mpoe_on_task(data, capsys):
    r = run_mpoe(data, steps=150, num_experts=4, top_k=1, n=3, **SIZES)
    _show(capsys, "MPOE", r)
    with capsys.disabled():
        print(f"MPOE: dev expert load per layer {[[round(x, 3) for x in layer] for layer in r['dev_expert_load']]}")
    params = r["params"]
    assert params["mpoe_model"] < params["plain_moe_model"]
    assert params["per_layer"]["mpoe"] < 0.5 * params["per_layer"]["plain_moe"]
    assert r["accuracy"]["mpoe"] > r["accuracy"]["majority"] + 0.15
    for load in r["dev_expert_load"]:
        assert sum(load) == pytest.approx(1.0) and min(load) > 0.05  # the balancing loss keeps every expert in use


def test_model_validation_and_mpoe_once():
    with pytest.raises(ValueError, match="divisible"):
        BertLikeClassifier(100, 2, hidden=30, heads=4)
    model = BertLikeClassifier(100, 3, hidden=16, intermediate=32, max_len=8)
    model.use_mpoe(2, n=3)
    out = model(torch.randint(0, 100, (2, 8)), labels=torch.tensor([0, 2]))
    assert out.logits.shape == (2, 3) and out.loss.dim() == 0
    with pytest.raises(ValueError, match="already"):
        model.use_mpoe(2, n=3)
    with pytest.raises(ValueError, match="regression"):
        prepare_task(task="stsb", data_dir=".")


def test_cli_subcommands(tmp_path, capsys):
    out = tmp_path / "opf.json"
    assert main(["opf", "--steps", "4", "--hidden", "16", "--intermediate", "32", "--layers", "1", "--max-seq-len", "16",
                 "--vocab-size", "200", "--k", "2", "--n", "3", "--output", str(out)]) == 0
    result = json.loads(out.read_text())
    assert result["params"]["opf_merged"] == result["params"]["dense_model"] and len(result["expanded_at_end"]) == 2
    assert "OPF" in capsys.readouterr().out
    # the subcommands plug into another parser with one call
    parser = argparse.ArgumentParser()
    add_subparsers(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["mpop", "--budget", "5000", "--output", str(tmp_path / "m.json")])
    assert args.func.__name__ == "cmd_mpop" and args.budget == "5000"
    args = parser.parse_args(["mpoe", "--experts", "2", "--central-grad", "bernoulli"])
    assert args.func.__name__ == "cmd_mpoe" and args.experts == 2
