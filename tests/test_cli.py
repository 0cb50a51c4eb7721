"""``python -m mpobert``: help, config files, every subcommand end to end on tiny settings."""
import argparse
import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mpobert import MPOBertForPreTraining
from mpobert.cli import COMMANDS, main, parse_args
from mpobert.options import add_options, flag_of
from mpobert.train import TrainConfig
from mpobert.data import load_split, write_pydoc_topic_task

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--max-seq-len", "32", "--progress", "none", "--log-every", "1"]


def _flags(settings) -> list[str]:
    """Every option flag generated from a settings class, nested settings included."""
    out = []
    for f in dataclasses.fields(settings):
        out += _flags(f.default_factory().__class__) if f.metadata.get("nested") else [flag_of(f)]
    return out


def test_every_option_of_every_subcommand_is_documented(capsys):
    assert set(COMMANDS) == {"pretrain", "finetune", "evaluate", "convert", "params", "demo", "distill", "heal"}
    for name, command in COMMANDS.items():
        assert command.run.__doc__, name
        for f in dataclasses.fields(command.settings):
            assert f.metadata["help"].strip(), f"{name} {f.name} has no help"
        with pytest.raises(SystemExit) as exc:
            main([name, "--help"])
        assert exc.value.code == 0
        out = capsys.readouterr().out
        assert "--config" in out
        for flag in _flags(command.settings):
            assert flag in out, f"{name} --help lacks {flag}"
    assert "--max-grad-norm" in _flags(COMMANDS["pretrain"].settings)  # TrainConfig's fields, generated


def test_settings_field_without_help_is_refused():
    @dataclasses.dataclass
    class Bad:
        x: int = 1

    with pytest.raises(TypeError, match="Bad.x"):
        add_options(argparse.ArgumentParser(), Bad)


def test_module_entry_point_runs():
    res = subprocess.run([sys.executable, "-m", "mpobert", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0 and "pretrain" in res.stdout and "demo" in res.stdout


def test_config_file_sets_defaults_and_command_line_wins(tmp_path):
    cfg = tmp_path / "c.json"
    cfg.write_text(json.dumps({"max_steps": 7, "lr": 0.5, "output-dir": "x", "optimizer": "adamw"}))
    command, settings = parse_args(["pretrain", "--config", str(cfg), "--lr", "0.25"])
    assert command is COMMANDS["pretrain"] and isinstance(settings.train, TrainConfig)
    t = settings.train
    assert (t.max_steps, t.lr, t.output_dir, t.optimizer, t.warmup_steps) == (7, 0.25, "x", "adamw", 0)
    assert parse_args(["finetune", "--task", "rte", "--output-dir", "y"])[1].train.optimizer == "adamw"  # finetune's default
    yaml_cfg = tmp_path / "c.yaml"
    yaml_cfg.write_text("max_steps: 9\noutput_dir: y\n")
    if importlib.util.find_spec("yaml"):
        assert parse_args(["pretrain", "--config", str(yaml_cfg)])[1].train.max_steps == 9
    else:
        with pytest.raises(ValueError, match="PyYAML is not installed"):
            parse_args(["pretrain", "--config", str(yaml_cfg)])
    cfg.write_text(json.dumps({"max_step": 7}))
    with pytest.raises(ValueError, match=r"unknown options for pretrain: \['max_step'\]"):
        parse_args(["pretrain", "--config", str(cfg), "--output-dir", "x"])
    with pytest.raises(ValueError, match="--output-dir is required"):
        parse_args(["pretrain"])
    cfg.write_text("[1, 2]")
    with pytest.raises(ValueError, match="mapping"):
        parse_args(["pretrain", "--config", str(cfg), "--output-dir", "x"])


def test_errors_exit_with_a_message(tmp_path, capsys):
    assert main(["finetune", "--task", "rte", "--output-dir", str(tmp_path), "--tokenizer", str(tmp_path / "none.json")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["params", "--model-config", "huge"]) == 2
    assert "--model-config" in capsys.readouterr().err


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    out = tmp_path_factory.mktemp("pre")
    assert main(["pretrain", "--output-dir", str(out), "--max-steps", "4", "--batch-size", "8", "--vocab-size", "300",
                 "--save-every", "2", *FAST]) == 0
    return out


def test_pretrain_writes_model_tokenizer_and_metrics(pretrained, tmp_path):
    assert (pretrained / "corpus.txt").stat().st_size > 100_000  # the bundled pydoc corpus
    final = json.loads((pretrained / "final_metrics.json").read_text())
    assert final["steps"] == 4 and len(final["loss_curve"]) >= 2
    model = MPOBertForPreTraining.from_pretrained(pretrained / "model")
    assert model.config.vocab_size == 300 and (pretrained / "model" / "tokenizer.json").exists()
    # --resume from the final checkpoint is a no-op run that keeps the weights
    before = {k: v.clone() for k, v in model.state_dict().items()}
    assert main(["pretrain", "--output-dir", str(pretrained), "--max-steps", "4", "--batch-size", "8", "--vocab-size", "300",
                 "--save-every", "2", "--resume", *FAST]) == 0
    after = MPOBertForPreTraining.from_pretrained(pretrained / "model").state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_finetune_then_evaluate_agree(pretrained, tmp_path):
    out = tmp_path / "ft"
    assert main(["finetune", "--task", "pydoc-topics", "--model", str(pretrained / "model"), "--output-dir", str(out),
                 "--max-steps", "3", "--batch-size", "16", *FAST]) == 0
    final = json.loads((out / "final_metrics.json").read_text())
    dev = load_split("pydoc-topics", out / "data" / "pydoc-topics", "dev")
    assert set(final["eval"]) == {"accuracy", "matthews_corrcoef"}
    base = final["majority_baseline"]["pydoc-topics"]["accuracy"]
    assert base == pytest.approx(max(sum(e.label == c for e in dev) for c in range(5)) / len(dev), abs=0.02)
    report = tmp_path / "eval.json"
    assert main(["evaluate", "--task", "pydoc-topics", "--model", str(out / "model"), "--data-dir",
                 str(out / "data" / "pydoc-topics"), "--max-seq-len", "32", "--output", str(report)]) == 0
    ev = json.loads(report.read_text())
    assert ev["examples"] == len(dev)
    assert ev["metrics"]["accuracy"] == pytest.approx(final["eval"]["accuracy"], abs=1e-9)


def _sst2_dir(path: Path) -> Path:
    path.mkdir(parents=True)
    rows = ["sentence\tlabel"] + [f"{w} statement about {w}\t{i % 2}" for i, w in enumerate(["good", "bad", "fine", "poor"] * 6)]
    (path / "train.tsv").write_text("\n".join(rows) + "\n")
    (path / "dev.tsv").write_text("\n".join(rows[:9]) + "\n")
    return path


def test_multitask_and_few_shot_finetune(pretrained, tmp_path):
    topics = write_pydoc_topic_task(tmp_path / "topics")
    sst = _sst2_dir(tmp_path / "sst")
    out = tmp_path / "mt"
    assert main(["finetune", "--task", "pydoc-topics,sst2", "--data-dir", str(topics), str(sst), "--model",
                 str(pretrained / "model"), "--output-dir", str(out), "--max-steps", "4", "--batch-size", "4",
                 "--few-shot", "4", *FAST]) == 0
    final = json.loads((out / "final_metrics.json").read_text())
    assert set(final["eval"]) == {"pydoc-topics/accuracy", "pydoc-topics/matthews_corrcoef", "sst2/accuracy"}
    assert (out / "multitask_model.pt").exists()
    assert main(["finetune", "--task", "pydoc-topics,sst2", "--data-dir", str(topics), "--model", str(pretrained / "model"),
                 "--output-dir", str(out)]) == 2  # one --data-dir per task


def test_finetune_squad(pretrained, tmp_path):
    ctx = "The Denver Broncos defeated the Carolina Panthers in Super Bowl 50. The game was played in 2016."
    qas = [{"id": f"q{i}", "question": q, "answers": [{"text": a, "answer_start": ctx.index(a)}]}
           for i, (q, a) in enumerate([("Who won?", "Denver Broncos"), ("When was it played?", "2016"),
                                       ("Who lost?", "Carolina Panthers"), ("Which game?", "Super Bowl 50")])]
    data = {"data": [{"title": "sb", "paragraphs": [{"context": ctx, "qas": qas}]}]}
    d = tmp_path / "squad"
    d.mkdir()
    for name in ("train-v1.1.json", "dev-v1.1.json"):
        (d / name).write_text(json.dumps(data))
    out = tmp_path / "qa"
    assert main(["finetune", "--task", "squad", "--data-dir", str(d), "--model", str(pretrained / "model"),
                 "--output-dir", str(out), "--max-steps", "2", "--batch-size", "2", "--doc-stride", "8", *FAST]) == 0
    final = json.loads((out / "final_metrics.json").read_text())
    assert set(final["eval"]) == {"exact_match", "f1"} and 0 <= final["eval"]["f1"] <= 100


def test_params_table(pretrained, capsys):
    assert main(["params", "--model-config", "mpobert12"]) == 0
    out = capsys.readouterr().out
    assert "central cores" in out and "auxiliary cores" in out
    assert main(["params", "--model", str(pretrained / "model"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["total"] == sum(p.numel() for p in MPOBertForPreTraining.from_pretrained(pretrained / "model").parameters())


def _fake_albert(path: Path, v=40, e=8, h=32, i=64, p=32) -> Path:
    """A tiny ALBERT checkpoint directory in Hugging Face's layout (random weights)."""
    path.mkdir()
    cfg = {"model_type": "albert", "vocab_size": v, "embedding_size": e, "hidden_size": h, "num_hidden_layers": 2,
           "num_attention_heads": 4, "intermediate_size": i, "max_position_embeddings": p, "hidden_act": "gelu_new",
           "num_hidden_groups": 1, "inner_group_num": 1}
    (path / "config.json").write_text(json.dumps(cfg))
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g) * 0.02  # noqa: E731
    st = {"albert.embeddings.word_embeddings.weight": r(v, e), "albert.embeddings.position_embeddings.weight": r(p, e),
          "albert.embeddings.token_type_embeddings.weight": r(2, e), "albert.embeddings.LayerNorm.weight": torch.ones(e),
          "albert.embeddings.LayerNorm.bias": torch.zeros(e), "albert.encoder.embedding_hidden_mapping_in.weight": r(h, e),
          "albert.encoder.embedding_hidden_mapping_in.bias": r(h), "albert.pooler.weight": r(h, h), "albert.pooler.bias": r(h)}
    layer = "albert.encoder.albert_layer_groups.0.albert_layers.0."
    for name, (o, n) in {"attention.query": (h, h), "attention.key": (h, h), "attention.value": (h, h),
                         "attention.dense": (h, h), "ffn": (i, h), "ffn_output": (h, i)}.items():
        st[layer + name + ".weight"], st[layer + name + ".bias"] = r(o, n), r(o)
    for ln in ("attention.LayerNorm", "full_layer_layer_norm"):
        st[layer + ln + ".weight"], st[layer + ln + ".bias"] = torch.ones(h), torch.zeros(h)
    torch.save(st, path / "pytorch_model.bin")
    (path / "vocab.txt").write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{k}" for k in range(v - 5)]))
    return path


def test_convert_albert(tmp_path, capsys):
    src = _fake_albert(tmp_path / "albert")
    out = tmp_path / "mpo"
    assert main(["convert", "--from", "albert", "--input", str(src), "--output", str(out), "--num-layers", "4"]) == 0
    assert "central cores" in capsys.readouterr().out
    model = MPOBertForPreTraining.from_pretrained(out)
    assert model.config.num_layers == 4 and (out / "tokenizer.json").exists()
    assert main(["convert", "--from", "albert", "--input", str(tmp_path / "missing"), "--output", str(out)]) == 2


def test_diverging_run_exits_with_a_message(pretrained, tmp_path, capsys):
    # an absurd learning rate makes the loss non-finite; the CLI stops after --max-nonfinite steps in a row
    code = main(["finetune", "--task", "pydoc-topics", "--model", str(pretrained / "model"), "--output-dir", str(tmp_path),
                 "--max-steps", "20", "--batch-size", "8", "--lr", "1e30", "--max-grad-norm", "0", "--max-nonfinite", "2", *FAST])
    err = capsys.readouterr().err
    assert code == 3 and "2 consecutive steps with a non-finite loss" in err
