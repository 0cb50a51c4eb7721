"""MPOP's lightweight (auxiliary-only) fine-tuning vs peft LoRA at an equal trainable-parameter count.

One run, one task, one starting point: a tiny transformers BERT is MLM-pretrained on the bundled
pydoc corpus, then fine-tuned on the bundled ``pydoc-topics`` classification task by

- ``head only``: the pooler and classifier train (both adapter runs train them too);
- ``MPO auxiliary``: the target matrices become exact MPOs (``mpo_core.lightweight``), their
  auxiliary cores train, the central cores stay frozen;
- ``LoRA``: ``peft`` LoRA on the same matrices, its rank chosen so that its trainable count is
  the closest to the auxiliaries';
- ``full``: every parameter trains (reference).

Then MPOP on the fully fine-tuned model (``--mpop-rounds``, 0 to skip): ``compress_in_rounds`` to
``--mpop-budget`` of the target matrices' entries, one epoch of auxiliary (+ head) fine-tuning per
round, dev accuracy per round; against one-shot truncation to the same budget, before and after
the same number of fine-tuning epochs.

Same data order, steps and learning rates for every contender, one timer (``time.perf_counter``)
around each training loop; dev accuracy after the last epoch (best over ``--lrs`` per contender,
every run listed in the JSON). ``saved KiB`` is the size of what each method's ``save_pretrained``
writes for the trained tensors.

    python benchmarks/lightweight_vs_lora.py --output results/lightweight_vs_lora.json
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, write_json  # noqa: E402

from mpo_core.compress import compress, compress_in_rounds  # noqa: E402
from mpo_core.lightweight import LightweightConfig, get_lightweight_model  # noqa: E402
from mpo_core.nn import set_trainable  # noqa: E402
from mpobert.data import (  # noqa: E402
    encode_examples, load_split, mask_tokens, pad_collate, pydoc_paragraphs, train_wordpiece, write_pydoc_topic_task,
)

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
HEAD = ["classifier", "pooler"]


def prepare(max_seq_len: int, vocab_size: int, seed: int):
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_pydoc_topic_task(Path(tmp) / "task", seed=seed)
        train, dev = load_split("pydoc-topics", folder, "train"), load_split("pydoc-topics", folder, "dev")
    dev_texts = {e.text_a for e in dev}
    corpus = [p for _, p in pydoc_paragraphs() if p not in dev_texts]   # no dev text in pretraining
    tok = train_wordpiece(corpus, vocab_size=vocab_size)
    return tok, corpus, encode_examples(train, tok, max_seq_len), encode_examples(dev, tok, max_seq_len)


def pretrain(config, tok, corpus: list[str], steps: int, batch: int, max_seq_len: int, seed: int):
    import transformers

    torch.manual_seed(seed)
    rng = random.Random(seed)
    model = transformers.BertForMaskedLM(config)
    encoded = [tok.build_pair(ids, None, max_seq_len)[0] for ids in tok.encode_batch(corpus)]
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    model.train()
    for step in range(steps):
        items = []
        for ids in rng.sample(encoded, batch):
            masked, labels = mask_tokens(ids, tok.special_ids, tok.vocab_size, rng, mask_id=tok.mask_id)
            items.append({"input_ids": masked, "labels": labels})
        loss = model(**pad_collate(items, tok.pad_id)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model, loss.item()


def batches(examples: list[dict], size: int, epochs: int, seed: int):
    rng = random.Random(seed)
    for _ in range(epochs):
        order = list(range(len(examples)))
        rng.shuffle(order)
        for start in range(0, len(order), size):
            yield pad_collate([examples[i] for i in order[start:start + size]])


def evaluate(model, dev: list[dict]) -> float:
    model.eval()
    right = 0
    with torch.no_grad():
        for start in range(0, len(dev), 64):
            feed = pad_collate(dev[start:start + 64])
            labels = feed.pop("labels")
            right += int((model(**feed).logits.argmax(-1) == labels).sum())
    return right / len(dev)


def finetune(model, train: list[dict], dev: list[dict], lr: float, epochs: int, batch: int, seed: int) -> dict:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    model.train()
    steps = 0
    start = time.perf_counter()
    for feed in batches(train, batch, epochs, seed):
        loss = model(**feed).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        steps += 1
    seconds = time.perf_counter() - start
    return {"lr": lr, "accuracy": evaluate(model, dev), "train_s": seconds, "ms_per_step": 1e3 * seconds / steps,
            "final_loss": loss.item(), "steps": steps}


def _saved_kib(save) -> float:
    with tempfile.TemporaryDirectory() as tmp:
        save(tmp)
        return sum(f.stat().st_size for f in Path(tmp).rglob("*.safetensors")) / 1024


def contenders(base, n: int):
    """name -> (build(), trainable count of the adapted matrices only)."""
    import peft

    def head_only():
        model = copy.deepcopy(base)
        for name, p in model.named_parameters():
            p.requires_grad_(_is_head(name))
        return model, None

    def full():
        return copy.deepcopy(base), None

    def mpo():
        wrapped = get_lightweight_model(copy.deepcopy(base), LightweightConfig(target_modules=TARGETS, n=n, modules_to_save=HEAD))
        return wrapped, wrapped.save_pretrained

    probe, _ = mpo()
    head = sum(p.numel() for name, p in base.named_parameters() if _is_head(name))
    aux = probe.get_nb_trainable_parameters()[0] - head
    per_rank = sum(m.in_features + m.out_features for name, m in base.named_modules()
                   if isinstance(m, torch.nn.Linear) and any(name == t or name.endswith("." + t) for t in TARGETS))
    rank = max(1, round(aux / per_rank))

    def lora():
        config = peft.LoraConfig(r=rank, lora_alpha=2 * rank, lora_dropout=0.0, target_modules=TARGETS, modules_to_save=HEAD)
        model = peft.get_peft_model(copy.deepcopy(base), config)
        return model, model.save_pretrained

    return {"head only": head_only, "MPO auxiliary": mpo, f"LoRA r={rank}": lora, "full": full}, aux, rank * per_rank, head


def _is_head(name: str) -> bool:
    return any(name.startswith(h) or f".{h}." in name for h in HEAD)


def mpop(model, train: list[dict], dev: list[dict], budget: float, rounds: int, n: int, lr: float, batch: int,
         seed: int) -> tuple[list[dict], dict]:
    """MPOP in rounds vs one-shot on a fine-tuned model: per-round rows and the one-shot numbers."""

    def aux_and_head(m, r: int, epochs: int = 1) -> None:
        for name, p in m.named_parameters():
            if ".cores." not in name:        # cores: set_trainable(model, "auxiliary") already chose
                p.requires_grad_(_is_head(name))
        finetune(m, train, dev, lr, epochs, batch, seed + r)

    shot = copy.deepcopy(model)
    report = compress(shot, budget=budget, include=TARGETS, n=n)
    before_ft = evaluate(shot, dev)
    set_trainable(shot, "auxiliary")
    aux_and_head(shot, 0, epochs=rounds)
    one_shot = {"entries_vs_dense": report.params / report.dense_params, "kept_dense": sum(m.kept_dense for m in report.matrices),
                "acc_no_finetune": before_ft, "acc_after_finetune": evaluate(shot, dev), "finetune_epochs": rounds}
    rounds_report = compress_in_rounds(copy.deepcopy(model), budget, aux_and_head, lambda m: evaluate(m, dev),
                                       rounds=rounds, include=TARGETS, n=n)
    rows = [{"round": r.round, "budget": r.budget, "entries vs dense": r.params / r.dense_params, "kept dense": r.kept_dense,
             "sum rel err^2": r.total_relative_sq_error, "dev acc": r.metric, "ft s": r.finetune_seconds}
            for r in rounds_report.rounds]
    return rows, one_shot


def main(argv: list[str] | None = None) -> dict:
    import transformers

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--hidden", type=int, default=64, help="default %(default)s")
    parser.add_argument("--layers", type=int, default=2, help="default %(default)s")
    parser.add_argument("--heads", type=int, default=4, help="default %(default)s")
    parser.add_argument("--n", type=int, default=5, help="cores per MPO (default %(default)s)")
    parser.add_argument("--max-seq-len", type=int, default=48, help="default %(default)s")
    parser.add_argument("--vocab-size", type=int, default=2000, help="default %(default)s")
    parser.add_argument("--pretrain-steps", type=int, default=200, help="MLM steps before fine-tuning (default %(default)s)")
    parser.add_argument("--epochs", type=int, default=3, help="fine-tuning epochs of every contender (default %(default)s)")
    parser.add_argument("--batch", type=int, default=32, help="default %(default)s")
    parser.add_argument("--lrs", default="3e-3", help="learning rates tried for the adapters and the head (default %(default)s)")
    parser.add_argument("--full-lr", type=float, default=1e-3, help="learning rate of full fine-tuning (default %(default)s)")
    parser.add_argument("--mpop-budget", type=float, default=0.5,
                        help="MPOP budget, fraction of the target matrices' entries (default %(default)s)")
    parser.add_argument("--mpop-rounds", type=int, default=3, help="MPOP truncate/fine-tune rounds, 0 skips (default %(default)s)")
    parser.add_argument("--contenders", default="head,mpo,lora,full", help="which of head,mpo,lora,full run (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="default %(default)s")
    parser.add_argument("--output", default="results/lightweight_vs_lora.json", help="default %(default)s")
    args = parser.parse_args(argv)
    chosen = {"head": "head only", "mpo": "MPO auxiliary", "lora": "LoRA", "full": "full"}
    unknown = [c for c in args.contenders.split(",") if c not in chosen]
    if unknown:
        parser.error(f"--contenders: unknown {unknown}; choose from {sorted(chosen)}")
    wanted = [chosen[c] for c in args.contenders.split(",")]
    if args.mpop_rounds > 0 and "full" not in wanted:
        parser.error("--mpop-rounds needs the 'full' contender (MPOP starts from the fully fine-tuned model)")
    lrs = [float(v) for v in args.lrs.split(",")]
    transformers.logging.set_verbosity_error()

    tok, corpus, train, dev = prepare(args.max_seq_len, args.vocab_size, args.seed)
    labels = sorted({e["labels"] for e in train})
    config = transformers.BertConfig(vocab_size=tok.vocab_size, hidden_size=args.hidden, num_hidden_layers=args.layers,
                                     num_attention_heads=args.heads, intermediate_size=4 * args.hidden,
                                     max_position_embeddings=max(64, args.max_seq_len), hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, pad_token_id=tok.pad_id, num_labels=len(labels))
    start = time.perf_counter()
    mlm, mlm_loss = pretrain(config, tok, corpus, args.pretrain_steps, args.batch, args.max_seq_len, args.seed)
    pretrain_s = time.perf_counter() - start
    torch.manual_seed(args.seed)
    base = transformers.BertForSequenceClassification(config)
    missing = base.bert.load_state_dict(mlm.bert.state_dict(), strict=False).missing_keys
    assert all(k.startswith("pooler") for k in missing), missing

    builders, aux, lora_params, head = contenders(base, args.n)
    runs, rows = [], []
    tuned_full = None
    for name, build in builders.items():
        if not any(name.startswith(w) for w in wanted):
            continue
        best = None
        for lr in ([args.full_lr] if name == "full" else lrs):
            model, save = build()
            result = finetune(model, train, dev, lr, args.epochs, args.batch, args.seed)
            if name == "full":
                tuned_full = model
            trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
            result.update(contender=name, trainable=trainable, adapted_matrices_trainable=trainable - head
                          if name != "full" else trainable, saved_kib=_saved_kib(save) if save else None)
            runs.append(result)
            if best is None or result["accuracy"] > best["accuracy"]:
                best = result
        rows.append({"contender": name, "trainable": best["trainable"], "adapter params": best["adapted_matrices_trainable"],
                     "lr": best["lr"], "dev acc": best["accuracy"], "train s": best["train_s"],
                     "ms/step": best["ms_per_step"], "saved KiB": best["saved_kib"] if best["saved_kib"] else ""})
    majority = max(sum(e["labels"] == c for e in dev) for c in labels) / len(dev)
    print(f"pydoc-topics: {len(train)} train / {len(dev)} dev, {len(labels)} classes, majority {majority:.3f}; "
          f"MLM pretraining {args.pretrain_steps} steps ({pretrain_s:.0f} s, final loss {mlm_loss:.2f})")
    print(f"equal trainable count: MPO auxiliaries {aux} vs LoRA {lora_params} (+ head {head} for both)")
    print(format_table(rows, ["contender", "trainable", "adapter params", "lr", "dev acc", "train s", "ms/step", "saved KiB"]))
    mpop_rows, one_shot = [], None
    if args.mpop_rounds > 0:
        mpop_rows, one_shot = mpop(tuned_full, train, dev, args.mpop_budget, args.mpop_rounds, args.n, lrs[0], args.batch,
                                   args.seed)
        print(f"MPOP on the fully fine-tuned model (dev acc {rows[-1]['dev acc']:.3f}), budget {args.mpop_budget} of the "
              f"target matrices, {args.mpop_rounds} rounds of truncation + 1 epoch auxiliary/head fine-tuning:")
        print(format_table(mpop_rows, ["round", "budget", "entries vs dense", "kept dense", "sum rel err^2", "dev acc", "ft s"]))
        print(f"one-shot to the same budget: dev acc {one_shot['acc_no_finetune']:.3f} without fine-tuning, "
              f"{one_shot['acc_after_finetune']:.3f} after {args.mpop_rounds} epochs of auxiliary/head fine-tuning")
    payload = {"args": vars(args), "mpop_rounds": mpop_rows, "mpop_one_shot": one_shot, "task": {"train": len(train), "dev": len(dev), "classes": len(labels), "majority": majority},
               "pretrain": {"steps": args.pretrain_steps, "seconds": pretrain_s, "final_loss": mlm_loss},
               "equal_count": {"mpo_auxiliary": aux, "lora": lora_params, "head": head}, "summary": rows, "runs": runs}
    write_json(args.output, payload)
    return payload


if __name__ == "__main__":
    main()
