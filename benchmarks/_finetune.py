"""Data, metrics and fine-tuning shared by the real-checkpoint benchmark: GLUE-style tasks tokenized by the
checkpoint's own tokenizer, sentence embeddings, accuracy, one AdamW loop, and a tiny random checkpoint for
smoke runs."""
from __future__ import annotations

import copy
import math
import random
import statistics
import tempfile
import time
from pathlib import Path
from typing import Callable

import torch

from mpobert.data import get_task, load_split, write_pydoc_topic_task
from mpobert.data.glue import BUNDLED_TASKS

__all__ = ["accuracy", "best_lr", "collate", "cosine", "encode", "finetune_sweep", "load_task", "random_tiny_checkpoint",
           "sentence_embeddings", "text_batches", "train"]


def load_task(task: str, data_dir: str | None, seed: int):
    spec = get_task(task)
    if data_dir is None and spec.name in BUNDLED_TASKS:
        data_dir = str(BUNDLED_TASKS[spec.name])
    if data_dir is None:
        if spec.name != "pydoc-topics":
            raise ValueError(f"--data-dir is required for task {task!r} (bundled: pydoc-topics, "
                             f"{', '.join(BUNDLED_TASKS)})")
        with tempfile.TemporaryDirectory() as tmp:
            folder = write_pydoc_topic_task(Path(tmp) / "task", seed=seed)
            return spec, load_split(spec, folder, "train"), load_split(spec, folder, "dev")
    return spec, load_split(spec, data_dir, "train"), load_split(spec, data_dir, "dev")


def encode(tokenizer, examples, max_len: int, with_labels: bool = True) -> list[dict[str, torch.Tensor]]:
    out = []
    for e in examples:
        item = tokenizer(e.text_a, e.text_b, truncation=True, max_length=max_len)
        row = {k: torch.tensor(v) for k, v in item.items()}
        if with_labels:
            row["labels"] = torch.tensor(e.label)
        out.append(row)
    return out


def collate(rows: list[dict[str, torch.Tensor]], pad_id: int) -> dict[str, torch.Tensor]:
    longest = max(r["input_ids"].shape[0] for r in rows)
    feed: dict[str, torch.Tensor] = {}
    for key in rows[0]:
        if key == "labels":
            feed[key] = torch.stack([r[key] for r in rows])
            continue
        fill = pad_id if key == "input_ids" else 0
        feed[key] = torch.stack([torch.nn.functional.pad(r[key], (0, longest - r[key].shape[0]), value=fill)
                                 for r in rows])
    return feed


def text_batches(rows, pad_id: int, size: int = 32) -> list[dict[str, torch.Tensor]]:
    return [collate([{k: v for k, v in r.items() if k != "labels"} for r in rows[i:i + size]], pad_id)
            for i in range(0, len(rows), size)]


def sentence_embeddings(encoder: torch.nn.Module, batches) -> torch.Tensor:
    encoder.eval()
    out = []
    with torch.no_grad():
        for feed in batches:
            hidden = encoder(**feed).last_hidden_state
            mask = feed["attention_mask"].unsqueeze(-1).to(hidden.dtype)
            out.append((hidden * mask).sum(1) / mask.sum(1))
    return torch.cat(out)


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    return float(torch.nn.functional.cosine_similarity(a, b, dim=-1).mean())


def accuracy(model, rows, pad_id: int) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for i in range(0, len(rows), 64):
            feed = collate(rows[i:i + 64], pad_id)
            labels = feed.pop("labels")
            right += int((model(**feed).logits.argmax(-1) == labels).sum())
    return right / len(rows)


def train(model, rows, pad_id: int, lr: float, epochs: int, batch: int, seed: int) -> float:
    """AdamW over the parameters that require grad; returns seconds."""
    rng = random.Random(seed)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    total = epochs * math.ceil(len(rows) / batch)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: min(1.0, (s + 1) / max(1, total // 10))
                                              * max(0.0, (total - s) / total))
    model.train()
    start = time.perf_counter()
    for _ in range(epochs):
        order = list(range(len(rows)))
        rng.shuffle(order)
        for i in range(0, len(order), batch):
            loss = model(**collate([rows[j] for j in order[i:i + batch]], pad_id)).loss
            opt.zero_grad()
            loss.backward()
            opt.step()
            sched.step()
    return time.perf_counter() - start


def finetune_sweep(model, train_rows, dev_rows, pad_id: int, lrs, seeds, epochs: int, batch: int,
                   done: Callable[[float, int], dict | None] = lambda lr, seed: None, on_run=None) -> list[dict]:
    """Fine-tune a copy of ``model`` (a sequence classifier; every parameter) at every lr and seed, its classifier
    re-initialised from the seed: one ``{"lr", "seed", "accuracy", "train_s"}`` per pair. ``done(lr, seed)`` returns
    an earlier run to keep instead (``--resume``); ``on_run(run)`` follows each new one."""
    runs = []
    for lr in lrs:
        for seed in seeds:
            kept = done(lr, seed)
            if kept is not None:
                runs.append(kept)
                continue
            tuned = copy.deepcopy(model)
            torch.manual_seed(seed)
            tuned.classifier.reset_parameters()
            seconds = train(tuned, train_rows, pad_id, lr, epochs, batch, seed)
            runs.append({"lr": lr, "seed": seed, "accuracy": accuracy(tuned, dev_rows, pad_id), "train_s": seconds})
            if on_run is not None:
                on_run(runs[-1])
    return runs


def best_lr(runs: list[dict]) -> dict:
    """The lr whose mean accuracy over seeds is highest: ``best_lr``, ``acc_mean``, ``acc_std``, ``accs``, ``seeds``
    and ``per_lr`` (the mean at every lr, so a reader sees whether the best is interior)."""
    per_lr: dict[float, list[float]] = {}
    for r in runs:
        per_lr.setdefault(r["lr"], []).append(r["accuracy"])
    lr, accs = max(per_lr.items(), key=lambda kv: statistics.mean(kv[1]))
    return {"best_lr": lr, "acc_mean": statistics.mean(accs), "acc_std": statistics.pstdev(accs), "accs": accs,
            "seeds": len(accs), "per_lr": {str(k): statistics.mean(v) for k, v in per_lr.items()}}


def random_tiny_checkpoint(folder: str, texts: list[str]) -> str:
    """A tiny random ``BertModel`` and a WordPiece tokenizer of ``texts``' words, saved to ``folder`` (smoke runs)."""
    import transformers

    words = sorted({w for t in texts for w in transformers.BasicTokenizer(do_lower_case=True).tokenize(t)})[:2000]
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    tok = transformers.BertTokenizer(vocab={t: i for i, t in enumerate(vocab)}, do_lower_case=True)
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=128)
    transformers.BertModel(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder
