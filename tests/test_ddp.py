"""Data-parallel training on 2 CPU processes (gloo): ranks stay identical and match one process
with the same global batch.

Tolerance: the data-parallel gradient is the mean of two half-batch mean-losses' gradients, equal
in exact arithmetic to the full-batch one; in fp32 the summation order differs, so losses agree to
a relative 1e-5 and weights to an absolute 1e-5, except the attention key bias, whose true gradient
is exactly zero (softmax ignores a per-query constant) so AdamW turns its rounding noise into
full-size updates.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from mpobert import MPOBertConfig, MPOBertForSequenceClassification
from mpobert.data import ExampleBatches, train_wordpiece, write_pydoc_topic_task
from mpobert.train import TrainConfig, Trainer, read_metrics

ROOT = Path(__file__).resolve().parents[1]
STEPS = 4


def _features(n=64):
    g = torch.Generator().manual_seed(0)
    out = []
    for i in range(n):
        length = int(torch.randint(4, 12, (1,), generator=g))
        label = i % 3
        ids = (5 + label * 10 + torch.randint(0, 10, (length,), generator=g)).tolist()
        out.append({"input_ids": [2, *ids, 3], "token_type_ids": [0] * (length + 2), "labels": label})
    return out


def _train(out_dir: str, batch_size: int, rank: int = 0, world: int = 1) -> MPOBertForSequenceClassification:
    torch.manual_seed(0)
    model = MPOBertForSequenceClassification(MPOBertConfig.tiny(vocab_size=60, num_labels=3, classifier_dropout=0.0))
    batches = ExampleBatches(_features(), batch_size, rank=rank, world_size=world, seed=1)
    cfg = TrainConfig(output_dir=out_dir, max_steps=STEPS, optimizer="adamw", lr=3e-3, warmup_steps=1, log_every=1,
                      save_every=2, progress="none")
    Trainer(model, batches, cfg).train()
    return model


def _worker(rank: int, world: int, init_file: str, out_dir: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = _train(out_dir, batch_size=4, rank=rank, world=world)
        torch.save(model.state_dict(), os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


def _assert_close_states(a: dict, b: dict, atol: float = 1e-5) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if not k.endswith("bias.k"):
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=atol, msg=k)


def _losses(path: Path) -> list[float]:
    return [r["loss"] for r in read_metrics(path) if "loss" in r]


def test_two_gloo_ranks_match_single_process(tmp_path):
    ddp_dir = tmp_path / "ddp"
    ddp_dir.mkdir()
    mp.spawn(_worker, args=(2, str(tmp_path / "init"), str(ddp_dir)), nprocs=2, join=True)
    r0 = torch.load(ddp_dir / "rank0.pt", weights_only=True)
    r1 = torch.load(ddp_dir / "rank1.pt", weights_only=True)
    assert all(torch.equal(r0[k], r1[k]) for k in r0)  # DDP keeps the replicas bitwise identical
    single = _train(str(tmp_path / "single"), batch_size=8).state_dict()
    _assert_close_states(r0, single)
    assert _losses(ddp_dir / "metrics.jsonl") == pytest.approx(_losses(tmp_path / "single" / "metrics.jsonl"), rel=1e-5)
    ckpt = torch.load(ddp_dir / "checkpoint.pt", weights_only=True)
    assert ckpt["fingerprint"]["world_size"] == 2 and len(ckpt["rng"]) == 2  # every rank's RNG state is saved


@pytest.mark.parametrize("multitask", [False, True])
def test_torchrun_cli_finetune_matches_single_process(tmp_path, multitask):
    data = write_pydoc_topic_task(tmp_path / "data")
    texts = [ln.split("\t")[0] for ln in (data / "train.tsv").read_text().splitlines()[1:]]
    train_wordpiece(texts, vocab_size=300).save(tmp_path / "tok.json")
    tasks, dirs = ["pydoc-topics"], [str(data)]
    if multitask:  # a second task: the other head gets no gradient in a step (find_unused_parameters)
        sst = tmp_path / "sst"
        sst.mkdir()
        rows = "sentence\tlabel\n" + "".join(f"{w} is {w}\t{i % 2}\n" for i, w in enumerate(["good", "bad", "ok", "poor"] * 8))
        (sst / "train.tsv").write_text(rows)
        (sst / "dev.tsv").write_text(rows)
        tasks, dirs = tasks + ["sst2"], dirs + [str(sst)]
    common = ["finetune", "--task", ",".join(tasks), "--data-dir", *dirs, "--tokenizer", str(tmp_path / "tok.json"),
              "--model-config", "tiny", "--max-steps", "3", "--max-seq-len", "32", "--dropout", "0", "--log-every", "1",
              "--progress", "none", "--eval-batch-size", "128", "--lr", "3e-3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    ddp = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                          "-m", "mpobert", *common, "--batch-size", "4", "--output-dir", str(tmp_path / "ddp")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert ddp.returncode == 0, ddp.stdout + ddp.stderr
    single = subprocess.run([sys.executable, "-m", "mpobert", *common, "--batch-size", "8", "--output-dir", str(tmp_path / "one")],
                            cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert single.returncode == 0, single.stdout + single.stderr
    final = json.loads((tmp_path / "ddp" / "final_metrics.json").read_text())
    assert final["world_size"] == 2
    assert _losses(tmp_path / "ddp" / "metrics.jsonl") == pytest.approx(_losses(tmp_path / "one" / "metrics.jsonl"), rel=1e-5)
    if multitask:
        a = torch.load(tmp_path / "ddp" / "multitask_model.pt", weights_only=True)
        b = torch.load(tmp_path / "one" / "multitask_model.pt", weights_only=True)
    else:
        a = MPOBertForSequenceClassification.from_pretrained(tmp_path / "ddp" / "model").state_dict()
        b = MPOBertForSequenceClassification.from_pretrained(tmp_path / "one" / "model").state_dict()
    # Separate processes (torchrun vs one process) sum gradients in a different order; AdamW divides
    # by sqrt(v), so fp32 rounding noise in near-zero gradient entries grows to ~1e-5..1e-4 after 3
    # steps at lr 3e-3 (seen in CI on a busy machine). A sharding or averaging bug moves weights by
    # ~lr = 3e-3 and the per-step losses (checked to 1e-5 above) apart.
    _assert_close_states(a, b, atol=3e-4)
