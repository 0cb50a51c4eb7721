"""MPOE upcycling on real (small) models: a pretrained GPT-2 and T5, continued as dense, Switch-upcycled and MPOE.

The MPOE paper (Gao et al., COLING 2022) claims far fewer total parameters than Switch Transformers for
better quality. Here, on the bundled pydoc corpus (CPython's reference manual; every 10th paragraph held out):

1. a small GPT-2 (causal LM) and a small T5 (span corruption: 15% of the tokens in spans of 3, each span a
   sentinel id above the tokenizer's vocabulary) are built and pretrained briefly, or loaded from local
   checkpoint folders (``--gpt2-checkpoint`` / ``--t5-checkpoint``: a transformers model and its tokenizer;
   ``--save-pretrained DIR`` writes the pretrained ones that way);
2. each is continued for the same steps on the same batches as
   ``dense`` (itself), ``switch`` (``E`` dense copies of every FFN, top-1: Switch-style sparse upcycling, equal
   active parameters), ``mpoe`` (``mpoe_ify``: shared-central MPO experts, central rule ``inverse_frequency``),
   ``mpoe-bernoulli`` / ``mpoe-none`` (the other central-gradient rules) and ``mpoe-aux`` (auxiliary cores,
   biases and routers only), every mixture with Switch's balance loss (``--balance-coef`` per layer) and
   capacity ``--capacity-factor``;
3. reported per contender, mean +- std over ``--seeds`` (the seed sets the routers and the data order): held-out
   loss and perplexity before and after, total and active parameters, training tokens/s (labelled "under load"
   when the 1-minute load average exceeded ``--max-load`` at the start), the fraction of assignments dropped,
   the balance loss per layer, the largest expert's token share, and per ``--log-every`` steps every expert's
   token share (JSON; ``--plot`` draws it, needs matplotlib).

    python benchmarks/mpoe_upcycle.py --output results/mpoe_upcycle.json       # ~10 minutes on 2 CPU cores
    python benchmarks/mpoe_upcycle.py --quick                                    # seconds
"""
from __future__ import annotations

import argparse
import copy
import math
import os
import random
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, write_json  # noqa: E402

from mpo_core.gpu.timing import median_seconds  # noqa: E402
from mpo_core.nn import num_parameters  # noqa: E402
from mpo_core.upcycle import (  # noqa: E402
    active_parameters, add_balance_loss, moe_layers, mpoe_ify, reset_routing_stats,
)
from mpobert.data import pydoc_paragraphs, train_wordpiece  # noqa: E402

CONTENDERS = {
    "dense": None,
    "switch": dict(experts="dense"),
    "mpoe": dict(experts="mpo", central_grad="inverse_frequency"),
    "mpoe-bernoulli": dict(experts="mpo", central_grad="bernoulli"),
    "mpoe-none": dict(experts="mpo", central_grad="none"),
    "mpoe-aux": dict(experts="mpo", central_grad="inverse_frequency", train="auxiliary"),
}
SENTINELS = 32
SPAN, RATE = 3, 0.15


# ----------------------------------------------------------------------------- data
def corpus_ids(tokenizer, holdout_every: int = 10) -> tuple[list[int], list[int]]:
    """Token ids of the bundled corpus, train and held-out paragraphs each concatenated (with [SEP]/EOS between)."""
    paragraphs = [p for _, p in pydoc_paragraphs()]
    sep = tokenizer.sep_token_id if tokenizer.sep_token_id is not None else tokenizer.eos_token_id
    splits: tuple[list[int], list[int]] = ([], [])
    for k, ids in enumerate(tokenizer(paragraphs, add_special_tokens=False)["input_ids"]):
        splits[k % holdout_every == 0].extend(ids + [sep])
    return splits


def sentinel_ids(tokenizer) -> list[int]:
    """T5's ``<extra_id_j>`` when the tokenizer has them, else the ids right above its vocabulary."""
    found = tokenizer.convert_tokens_to_ids([f"<extra_id_{j}>" for j in range(SENTINELS)])
    if all(i is not None and i != tokenizer.unk_token_id for i in found):
        return found
    return [len(tokenizer) + j for j in range(SENTINELS)]


def span_corrupt(ids: list[int], rng: random.Random, sentinels: list[int]) -> tuple[list[int], list[int]]:
    """T5 span corruption at a fixed rate: ``RATE`` of the tokens in spans of ``SPAN`` on a grid of ``SPAN``,
    each replaced by a sentinel in the input, the target the sentinels each followed by their span."""
    n_spans = max(1, min(len(sentinels), round(len(ids) * RATE / SPAN)))
    starts = sorted(rng.sample(range(0, len(ids) - SPAN + 1, SPAN), n_spans))
    inp, tgt, prev = [], [], 0
    for j, s in enumerate(starts):
        inp += ids[prev:s] + [sentinels[j]]
        tgt += [sentinels[j]] + ids[s:s + SPAN]
        prev = s + SPAN
    return inp + ids[prev:], tgt


def make_batches(ids: list[int], kind: str, seq: int, batch: int, count: int, rng: random.Random,
                 sentinels: list[int]) -> list[dict[str, torch.Tensor]]:
    """``count`` batches of random windows of ``seq`` tokens: LM for GPT-2, span corruption for T5."""
    out = []
    for _ in range(count):
        windows = [ids[s:s + seq] for s in (rng.randrange(len(ids) - seq) for _ in range(batch))]
        if kind == "gpt2":
            t = torch.tensor(windows)
            out.append({"input_ids": t, "labels": t})
        else:
            pairs = [span_corrupt(w, rng, sentinels) for w in windows]
            out.append({"input_ids": torch.tensor([p[0] for p in pairs]), "labels": torch.tensor([p[1] for p in pairs])})
    return out


# ----------------------------------------------------------------------------- models
def build(kind: str, vocab: int, args) -> torch.nn.Module:
    import transformers

    if kind == "gpt2":
        cfg = transformers.GPT2Config(vocab_size=vocab, n_positions=args.seq, n_embd=args.hidden, n_layer=args.layers,
                                      n_head=args.heads, n_inner=args.intermediate, resid_pdrop=0.0, embd_pdrop=0.0,
                                      attn_pdrop=0.0)
        return transformers.GPT2LMHeadModel(cfg)
    cfg = transformers.T5Config(vocab_size=vocab, d_model=args.hidden, d_kv=args.hidden // args.heads,
                                d_ff=args.intermediate, num_layers=args.layers, num_decoder_layers=args.layers,
                                num_heads=args.heads, dropout_rate=0.0, feed_forward_proj="relu",
                                decoder_start_token_id=0, pad_token_id=0)
    return transformers.T5ForConditionalGeneration(cfg)


def load(kind: str, folder: str):
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(folder)
    cls = transformers.AutoModelForCausalLM if kind == "gpt2" else transformers.AutoModelForSeq2SeqLM
    return cls.from_pretrained(folder), tokenizer


@torch.no_grad()
def heldout_loss(model, batches, capacity_factor: float | None = None) -> float:
    """Mean loss over ``batches`` in eval mode, every mixture at the evaluation ``capacity_factor``."""
    layers = [m.moe for _, m in moe_layers(model)]
    train_capacity = [m.capacity_factor for m in layers]
    for m in layers:
        m.capacity_factor = capacity_factor
    model.eval()
    losses = [float(model(**b).loss) for b in batches]
    model.train()
    for m, c in zip(layers, train_capacity):
        m.capacity_factor = c
    return statistics.fmean(losses)


def optimizer(model, lr: float) -> torch.optim.Optimizer:
    """AdamW over the trainable parameters (multi-tensor: MPO experts hold many small tensors)."""
    return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr, weight_decay=0.0, foreach=True)


def train_step(model, opt: torch.optim.Optimizer, batch: dict):
    out = model(**batch)
    opt.zero_grad(set_to_none=True)
    out.loss.backward()
    torch.nn.utils.clip_grad_norm_([p for g in opt.param_groups for p in g["params"]], 1.0, foreach=True)
    opt.step()
    return out


def train(model, batches, lr: float, log_every: int) -> dict:
    """AdamW over ``batches``; per ``log_every`` steps the train loss and every expert's token share."""
    opt = optimizer(model, lr)
    model.train()
    layers = moe_layers(model)
    reset_routing_stats(model)
    log, balance, seconds, dropped, assigned = [], [], 0.0, 0, 0
    for step, b in enumerate(batches, 1):
        start = time.perf_counter()
        out = train_step(model, opt, b)
        seconds += time.perf_counter() - start
        if layers:
            balance.append(float(out.balance_loss.detach()) / len(layers))
        if step % log_every == 0 or step == len(batches):
            entry = {"step": step, "train_loss": float(out.loss.detach())}
            if layers:
                counts = sum(m.token_counts.double() for _, m in layers)
                entry["expert_share"] = (counts / counts.sum()).tolist()
                dropped += sum(int(m.dropped) for _, m in layers)
                assigned += sum(int(m.assignments) for _, m in layers)
                reset_routing_stats(model)
            log.append(entry)
    tokens = sum(b["input_ids"].numel() for b in batches)
    result = {"train_s": seconds, "train_tokens_per_s": tokens / seconds, "log": log}
    if layers:
        tail = balance[len(balance) // 2:]
        result.update(dropped=dropped / max(assigned, 1), balance_loss=statistics.fmean(tail),
                      max_expert_share=statistics.fmean(max(e["expert_share"]) for e in log))
    return result


def contender(name: str, base, seed: int, args):
    """``base`` copied and (for a mixture) upcycled with the balance loss hooked in; with its learning rate."""
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    spec = CONTENDERS[name]
    if spec is None:
        return model, args.lr
    mpoe_ify(model, num_experts=args.experts, top_k=1, n=args.n, capacity_factor=args.capacity_factor, seed=seed, **spec)
    add_balance_loss(model, coef=args.balance_coef)
    return model, args.aux_lr if spec.get("train") == "auxiliary" else args.lr


def run_contender(name: str, base, data: dict, seed: int, args) -> dict:
    model, lr = contender(name, base, seed, args)
    spec = CONTENDERS[name]
    row = {"contender": name, "seed": seed, "total_params": num_parameters(model),
           "mixture_params": sum(num_parameters(m) for _, m in moe_layers(model)),
           "active_params": active_parameters(model) if spec else num_parameters(model),
           "trainable_params": num_parameters(model, trainable=True), "lr": lr,
           "heldout_before": heldout_loss(model, data["heldout"], args.eval_capacity_factor)}
    row.update(train(model, data["train"][seed], lr, args.log_every))
    row["heldout_loss"] = heldout_loss(model, data["heldout"], args.eval_capacity_factor)
    row["heldout_ppl"] = math.exp(row["heldout_loss"])
    return row


def speed(base, batch: dict, args) -> dict[str, float]:
    """Training tokens/s of every contender, one step each in turn (interleaved: load hits all alike), median."""
    steps = {}
    for name in args.contenders:
        model, lr = contender(name, base, 0, args)
        opt = optimizer(model, lr)
        steps[name] = lambda model=model, opt=opt: train_step(model, opt, batch)
    seconds = median_seconds(steps, "cpu", warmup=2, repeat=args.speed_repeats, clock=args.clock)
    return {name: batch["input_ids"].numel() / s for name, s in seconds.items()}


def prepare(kind: str, args) -> tuple[torch.nn.Module, dict, dict]:
    """The pretrained dense model (built and pretrained, or loaded) and its train/held-out batches."""
    checkpoint = getattr(args, f"{kind}_checkpoint")
    info = {"model": kind}
    if checkpoint:
        model, tokenizer = load(kind, checkpoint)
        info["checkpoint"] = checkpoint
    else:
        wordpiece = train_wordpiece([p for k, (_, p) in enumerate(pydoc_paragraphs()) if k % 10], vocab_size=args.vocab_size)
        tokenizer = wordpiece.to_transformers()
        torch.manual_seed(1000)
        model = build(kind, len(tokenizer) + (SENTINELS if kind == "t5" else 0), args)
    train_ids, held_ids = corpus_ids(tokenizer)
    sentinels = sentinel_ids(tokenizer)
    rng = random.Random(1000)
    data = {"heldout": make_batches(held_ids, kind, args.seq, args.batch, args.eval_batches, rng, sentinels),
            "train": {s: make_batches(train_ids, kind, args.seq, args.batch, args.steps, random.Random(s), sentinels)
                      for s in args.seeds}}
    if not checkpoint:
        start = time.perf_counter()
        pre = make_batches(train_ids, kind, args.seq, args.batch, args.pretrain_steps, rng, sentinels)
        info["pretrain"] = {"steps": args.pretrain_steps, "heldout_before": heldout_loss(model, data["heldout"])}
        train(model, pre, args.pretrain_lr, max(args.pretrain_steps, 1))
        info["pretrain"].update(heldout_after=heldout_loss(model, data["heldout"]), seconds=time.perf_counter() - start)
        if args.save_pretrained:
            folder = os.path.join(args.save_pretrained, kind)
            model.save_pretrained(folder)
            tokenizer.save_pretrained(folder)
            info["saved"] = folder
    info["params"] = num_parameters(model)
    return model, data, info


def summarize(rows: list[dict]) -> list[dict]:
    """One line per model and contender: means (and std of the held-out loss) over seeds, vs Switch."""
    table = []
    for kind in dict.fromkeys(r["model"] for r in rows):
        mine = [r for r in rows if r["model"] == kind]
        switch = [r["heldout_loss"] for r in mine if r["contender"] == "switch"]
        for name in dict.fromkeys(r["contender"] for r in mine):
            rs = [r for r in mine if r["contender"] == name]
            loss = [r["heldout_loss"] for r in rs]
            line = {"model": kind, "contender": name, "total": rs[0]["total_params"], "active": rs[0]["active_params"],
                    "trainable": rs[0]["trainable_params"], "loss before": statistics.fmean(r["heldout_before"] for r in rs),
                    "loss after": statistics.fmean(loss), "std": statistics.pstdev(loss),
                    "ppl": statistics.fmean(r["heldout_ppl"] for r in rs),
                    "tok/s": rs[0]["tokens_per_s"]}
            if switch:
                ref = next(r for r in mine if r["contender"] == "switch")
                line["vs switch %"] = 100 * (line["loss after"] / statistics.fmean(switch) - 1)
                line["time / switch"] = ref["tokens_per_s"] / line["tok/s"]
                line["params / switch"] = line["total"] / ref["total_params"]
                if rs[0]["mixture_params"]:
                    line["FFN params / switch"] = rs[0]["mixture_params"] / ref["mixture_params"]
            if "dropped" in rs[0]:
                line.update({"dropped %": 100 * statistics.fmean(r["dropped"] for r in rs),
                             "balance": statistics.fmean(r["balance_loss"] for r in rs),
                             "max share": statistics.fmean(r["max_expert_share"] for r in rs)})
            table.append(line)
    return table


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    moe = [r for r in rows if "dropped" in r and r["seed"] == rows[0]["seed"]]
    fig, axes = plt.subplots(1, len(moe), figsize=(3 * len(moe), 3), squeeze=False)
    for ax, r in zip(axes[0], moe):
        steps = [e["step"] for e in r["log"]]
        for e, share in enumerate(zip(*(e["expert_share"] for e in r["log"]))):
            ax.plot(steps, share, label=f"expert {e}")
        ax.set_title(f"{r['model']} {r['contender']}", fontsize=8)
        ax.set_xlabel("step")
    axes[0][0].set_ylabel("token share")
    fig.tight_layout()
    fig.savefig(path)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="gpt2,t5", help="comma-separated: gpt2, t5 (default %(default)s)")
    ap.add_argument("--contenders", default=",".join(CONTENDERS), help="default %(default)s")
    ap.add_argument("--gpt2-checkpoint", default=None, help="local GPT-2 folder (model + tokenizer) instead of building one")
    ap.add_argument("--t5-checkpoint", default=None, help="local T5 folder (model + tokenizer) instead of building one")
    ap.add_argument("--save-pretrained", default=None, help="write the pretrained models to DIR/gpt2, DIR/t5")
    ap.add_argument("--hidden", type=int, default=64, help="default %(default)s")
    ap.add_argument("--intermediate", type=int, default=256, help="default %(default)s")
    ap.add_argument("--layers", type=int, default=2, help="default %(default)s")
    ap.add_argument("--heads", type=int, default=4, help="default %(default)s")
    ap.add_argument("--vocab-size", type=int, default=2000, help="WordPiece vocabulary of built models (default %(default)s)")
    ap.add_argument("--seq", type=int, default=64, help="tokens per sequence (default %(default)s)")
    ap.add_argument("--batch", type=int, default=16, help="default %(default)s")
    ap.add_argument("--pretrain-steps", type=int, default=400, help="default %(default)s")
    ap.add_argument("--pretrain-lr", type=float, default=3e-3, help="default %(default)s")
    ap.add_argument("--steps", type=int, default=300, help="continued-training steps per contender (default %(default)s)")
    ap.add_argument("--lr", type=float, default=1e-3, help="default %(default)s")
    ap.add_argument("--aux-lr", type=float, default=3e-3, help="lr of mpoe-aux (default %(default)s)")
    ap.add_argument("--experts", type=int, default=8, help="E (default %(default)s)")
    ap.add_argument("--n", type=int, default=3, help="MPO cores per matrix (default %(default)s)")
    ap.add_argument("--capacity-factor", type=float, default=1.5, help="default %(default)s")
    ap.add_argument("--eval-capacity-factor", type=float, default=None,
                    help="capacity at evaluation (default: unlimited, nothing dropped)")
    ap.add_argument("--balance-coef", type=float, default=0.01, help="per layer (default %(default)s)")
    ap.add_argument("--seeds", default="0,1", help="default %(default)s")
    ap.add_argument("--eval-batches", type=int, default=8, help="held-out batches (default %(default)s)")
    ap.add_argument("--log-every", type=int, default=25, help="expert shares logged every N steps (default %(default)s)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    ap.add_argument("--speed-repeats", type=int, default=20, help="interleaved timed steps per contender (default %(default)s)")
    ap.add_argument("--clock", default="wall", choices=["wall", "cpu"], help="timer of the speed section (default %(default)s)")
    ap.add_argument("--max-load", type=float, default=1.5, help="load average above which tokens/s is labelled (default %(default)s)")
    ap.add_argument("--quick", action="store_true", help="a tiny run in seconds (smoke test)")
    ap.add_argument("--plot", default=None, help="also draw the expert shares over time (needs matplotlib)")
    ap.add_argument("--output", default="results/mpoe_upcycle.json", help="default %(default)s")
    args = ap.parse_args(argv)
    if args.quick:
        args.hidden, args.intermediate, args.layers, args.heads, args.vocab_size = 16, 32, 1, 2, 200
        args.seq, args.batch, args.pretrain_steps, args.steps, args.eval_batches, args.log_every = 24, 4, 2, 3, 1, 2
        args.experts, args.n, args.seeds, args.speed_repeats = 2, 3, "0", 1
    args.models = [m for m in args.models.split(",") if m]
    args.contenders = [c for c in args.contenders.split(",") if c]
    args.seeds = [int(s) for s in args.seeds.split(",")]
    for m in args.models:
        if m not in ("gpt2", "t5"):
            ap.error(f"--models: unknown model {m!r} (gpt2, t5)")
    for c in args.contenders:
        if c not in CONTENDERS:
            ap.error(f"--contenders: unknown contender {c!r} ({', '.join(CONTENDERS)})")
    if args.plot:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            ap.error("--plot needs matplotlib, which is not installed; run without --plot")
    return args


def main(argv: list[str] | None = None) -> dict:
    args = parse(argv)
    torch.set_num_threads(args.threads)
    rows, models = [], []
    for kind in args.models:
        base, data, info = prepare(kind, args)
        models.append(info)
        info["load_average"] = os.getloadavg()[0]
        info["tokens_per_s"] = speed(base, data["train"][args.seeds[0]][0], args)
        for seed in args.seeds:
            for name in args.contenders:
                row = run_contender(name, base, data, seed, args)
                rows.append({"model": kind, "tokens_per_s": info["tokens_per_s"][name], **row})
                print(f"{kind} {name} seed {seed}: held-out {row['heldout_before']:.3f} -> {row['heldout_loss']:.3f}",
                      flush=True)
    table = summarize(rows)
    columns = ["model", "contender", "total", "active", "params / switch", "FFN params / switch", "loss before", "loss after", "std", "ppl",
               "vs switch %", "tok/s", "time / switch", "dropped %", "balance", "max share"]
    print(format_table(table, columns))
    for info in models:
        info["under_load"] = info["load_average"] > args.max_load
        print(f"{info['model']}: tokens/s measured (interleaved, median of {args.speed_repeats}) at 1-min load "
              f"{info['load_average']:.2f}" + (" (under load)" if info["under_load"] else ""))
    payload = {"settings": {k: v for k, v in vars(args).items()},
               "models": models, "table": table, "runs": rows}
    write_json(args.output, payload)
    if args.plot:
        plot(rows, args.plot)
    return payload


if __name__ == "__main__":
    main()
