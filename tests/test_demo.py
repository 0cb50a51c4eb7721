"""``python -m mpobert demo``: compress-and-heal of a classifier it trains, calibrated vs plain SVD (tiny settings)."""
import json

import pytest

from mpobert.cli import main
from mpobert.data import load_split
from mpobert.demo import verdict

transformers = pytest.importorskip("transformers")

TINY = ["--quick", "--hidden-size", "32", "--vocab-size", "200", "--max-seq-len", "32", "--batch-size", "16",
        "--budget", "0.2"]


def _run(cal_err, cal_cos, cal_acc, plain_err=0.3, plain_cos=0.95, plain_acc=0.6, before=None):
    def side(err, cos, acc, err_before):
        return {"compressed": {"heldout_error": err_before, "heldout_cosine": cos, "dev_accuracy": acc},
                "healed": {"heldout_error": err, "heldout_cosine": cos, "dev_accuracy": acc}}
    return side(cal_err, cal_cos, cal_acc, before if before is not None else cal_err), side(plain_err, plain_cos, plain_acc, plain_err)


@pytest.mark.parametrize("numbers, holds, reason", [
    ((0.05, 0.999, 0.60), True, "calibration gains"),
    ((0.05, 0.999, 0.58), True, "calibration gains"),                  # accuracy within the tolerance
    ((0.25, 0.999, 0.60), False, "healed error 0.250 > 0.8 x 0.300"),
    ((0.05, 0.940, 0.60), False, "healed cosine"),
    ((0.05, 0.999, 0.55), False, "healed dev accuracy 0.550 < 0.600 - 0.03"),
])
def test_verdict_is_computed_from_the_numbers(numbers, holds, reason):
    got, text = verdict(*_run(*numbers), max_error_ratio=0.8, accuracy_tolerance=0.03)
    assert got is holds and reason in text
    assert text.startswith("calibration gains") == holds


def test_verdict_needs_the_gain_before_healing_too():
    got, text = verdict(*_run(0.05, 0.999, 0.6, before=0.29), max_error_ratio=0.8, accuracy_tolerance=0.03)
    assert not got and "compressed error 0.290" in text


def test_demo_quick(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--output-dir", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    summary = json.loads((out / "demo_metrics.json").read_text())
    # both contenders: the same call at the same budget, only the calibration differs
    for name in ("calibrated", "plain"):
        side = summary[name]
        assert 0 < side["entries"] <= 0.2 * side["dense_entries"]
        for stage in ("compressed", "healed"):
            assert set(side[stage]) == {"heldout_error", "heldout_cosine", "dev_accuracy"}
            assert 0.0 <= side[stage]["dev_accuracy"] <= 1.0 and side[stage]["heldout_error"] >= 0.0
        assert side["heal"]["steps"] == 5
    assert summary["calibrated"]["calibration_sequences"] == 32 and summary["plain"]["calibration_sequences"] == 0
    # the printed verdict is the computed one
    holds, says = verdict(summary["calibrated"], summary["plain"], 0.8, 0.03)
    assert summary["gain_holds"] is holds and summary["verdict"] == says and f"=> {says}" in text
    assert ("calibration gains on this run" in text) != ("no gain from calibration on this run" in text)
    for words in ("trained a BERT classifier", "calibrated", "plain", "dev accuracy", "20% of their"):
        assert words in text
    # the held-out text is the dev split's, none of it trained or calibrated on
    dev = [e.text_a for e in load_split("pydoc-topics", out / "data" / "pydoc-topics", "dev")]
    corpus = (out / "corpus.txt").read_text()
    assert not any(p in corpus for p in dev[:50] if len(p) > 80)
    # the trained model is a transformers checkpoint that `python -m mpobert heal --teacher` takes
    model = transformers.AutoModelForSequenceClassification.from_pretrained(out / "model")
    assert model.config.hidden_size == 32 and model.config.num_labels == 5
    assert transformers.AutoTokenizer.from_pretrained(out / "model").mask_token == "[MASK]"


def test_demo_rejects_a_bad_budget(tmp_path):
    assert main(["demo", "--output-dir", str(tmp_path / "demo"), "--budget", "1.5"]) == 2
    assert not (tmp_path / "demo").exists()
