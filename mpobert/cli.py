"""Command line of MPOBERT: ``python -m mpobert {pretrain,finetune,evaluate,convert,params,demo,mpop,opf,mpoe}``
(``mpop``/``opf``/``mpoe``: the MPO method family, from :mod:`mpobert.methods`).

Every subcommand takes ``--config FILE`` (JSON, or YAML when PyYAML is installed): its keys
are the subcommand's long options (``max_steps`` or ``max-steps``) and become defaults that
explicit command-line options override. Run ``python -m mpobert <command> --help`` for the
options of each. Under ``torchrun`` (``pretrain``/``finetune``) each process trains one
data-parallel rank (NCCL on GPU, gloo on CPU).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from . import MPOBertConfig, MPOBertForPreTraining, MPOBertForQuestionAnswering, MPOBertForSequenceClassification, MPOBertModel
from .data import (
    ExampleBatches, MultiTaskBatches, PretrainingStream, StreamBatches, WordPieceTokenizer, encode_examples, few_shot,
    get_task, load_split, read_squad, split_sentences, squad_features, train_wordpiece, write_corpus, write_pydoc_topic_task,
)
from .data.corpus import pydoc_documents
from .evaluation import evaluate_pretraining, evaluate_squad, evaluate_task, majority_baseline
from .multitask import MPOBertForMultiTask
from .train import NonFiniteLossError, TrainConfig, Trainer, read_metrics, setup_distributed

PRESETS = {"tiny": MPOBertConfig.tiny, "mpobert12": MPOBertConfig.mpobert12, "mpobert24": MPOBertConfig.mpobert24,
           "mpobert48": MPOBertConfig.mpobert48, "mpobert48_plus": MPOBertConfig.mpobert48_plus}
TOKENIZER_FILE = "tokenizer.json"


# ---------------------------------------------------------------------------- helpers
def load_config_file(path: str) -> dict[str, Any]:
    """Options from a JSON (or, with PyYAML, YAML) file as a flat dict."""
    p = Path(path)
    if not p.is_file():
        raise ValueError(f"--config file {path!r} does not exist")
    text = p.read_text(encoding="utf-8")
    if p.suffix in (".yaml", ".yml"):
        try:
            import yaml
        except ImportError:
            raise ValueError(f"--config {path!r} is YAML but PyYAML is not installed (use JSON)") from None
        data = yaml.safe_load(text)
    else:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"--config {path!r} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError(f"--config {path!r} must hold a mapping of option names to values")
    return data


def model_config(spec: str, **overrides: Any) -> MPOBertConfig:
    """A preset name (``tiny``, ``mpobert12``, ...) or a JSON config file, with overrides."""
    if spec in PRESETS:
        return PRESETS[spec](**overrides)
    if Path(spec).is_file():
        return MPOBertConfig.load(spec).replace(**overrides)
    raise ValueError(f"--model-config must be one of {sorted(PRESETS)} or a JSON file, got {spec!r}")


def _train_config(args: argparse.Namespace) -> TrainConfig:
    return TrainConfig(
        output_dir=args.output_dir, max_steps=args.max_steps, optimizer=args.optimizer, lr=args.lr,
        weight_decay=args.weight_decay, warmup_steps=args.warmup_steps, grad_accum=args.grad_accum,
        max_grad_norm=args.max_grad_norm, precision=args.precision, seed=args.seed, log_every=args.log_every,
        eval_every=args.eval_every, save_every=args.save_every, max_nonfinite=args.max_nonfinite,
        resume=args.resume, progress=args.progress, device=args.device,
    )


def _say(rank: int, *msg: Any) -> None:
    if rank == 0:
        print(*msg, flush=True)


def _load_tokenizer(model_dir: str, explicit: str | None) -> WordPieceTokenizer:
    path = explicit or os.path.join(model_dir, TOKENIZER_FILE)
    if not os.path.exists(path):
        raise ValueError(f"no tokenizer at {path!r}: pass --tokenizer (vocab.txt or tokenizer.json)")
    return WordPieceTokenizer.from_file(path)


def _save_model(model: torch.nn.Module, tok: WordPieceTokenizer, directory: Path) -> None:
    model.save_pretrained(directory)
    tok.save(directory / TOKENIZER_FILE)


def loss_curve_summary(metrics_path: str | os.PathLike, points: int = 5) -> list[tuple[int, float]]:
    """``points`` evenly spaced ``(step, loss)`` records of a ``metrics.jsonl`` log (first and last included)."""
    recs = [r for r in read_metrics(metrics_path) if "loss" in r and isinstance(r["loss"], float)]
    if not recs:
        return []
    idx = sorted({round(i * (len(recs) - 1) / max(points - 1, 1)) for i in range(points)})
    return [(recs[i]["step"], recs[i]["loss"]) for i in idx]


# ---------------------------------------------------------------------------- subcommands
def cmd_pretrain(args: argparse.Namespace) -> dict[str, Any]:
    """MLM + SOP pretraining on plain-text corpus files (default: the bundled pydoc corpus)."""
    rank, world, _ = setup_distributed()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = args.corpus
    if not corpus:
        corpus = [str(out / "corpus.txt")]
        if rank == 0 and not os.path.exists(corpus[0]):
            write_corpus(pydoc_documents(), corpus[0])
    if args.tokenizer:
        tok = WordPieceTokenizer.from_file(args.tokenizer)
    elif os.path.exists(out / TOKENIZER_FILE):
        tok = WordPieceTokenizer.from_file(out / TOKENIZER_FILE)
    else:
        if rank == 0:
            lines = (ln for f in corpus for ln in open(f, encoding="utf-8") if ln.strip())
            train_wordpiece(lines, vocab_size=args.vocab_size).save(out / TOKENIZER_FILE)
        tok = None
    if world > 1:
        torch.distributed.barrier()  # rank 0 wrote the corpus and tokenizer
    if tok is None:
        tok = WordPieceTokenizer.from_file(out / TOKENIZER_FILE)
    torch.manual_seed(args.seed)
    if args.init_from:
        model = MPOBertForPreTraining.from_pretrained(args.init_from, strict=False)
    else:
        cfg = model_config(args.model_config, vocab_size=tok.vocab_size,
                           max_position_embeddings=max(args.max_seq_len, 64), hidden_dropout=args.dropout,
                           attention_dropout=args.dropout, classifier_dropout=args.dropout)
        model = MPOBertForPreTraining(cfg)
    if model.config.vocab_size != tok.vocab_size:
        raise ValueError(f"model vocab_size {model.config.vocab_size} != tokenizer vocab size {tok.vocab_size}")
    stream = PretrainingStream(corpus, tok, args.max_seq_len, args.mlm_probability, seed=args.seed)
    batches = StreamBatches(stream, args.batch_size, rank, world, tok.pad_id)
    eval_fn = None
    if args.eval_corpus:
        eval_stream = PretrainingStream(args.eval_corpus, tok, args.max_seq_len, args.mlm_probability, seed=args.seed, loop=False)
        eval_batches = list(StreamBatches(eval_stream, args.batch_size, 0, 1, tok.pad_id))[: args.eval_batches]
        if not eval_batches:
            raise ValueError(f"--eval-corpus {args.eval_corpus} yields less than one batch of {args.batch_size}")
        eval_fn = lambda m: evaluate_pretraining(m, eval_batches)  # noqa: E731
    fingerprint = {"model": model.config.to_dict(), "batch_size": args.batch_size, "max_seq_len": args.max_seq_len}
    trainer = Trainer(model, batches, _train_config(args), eval_fn=eval_fn, fingerprint=fingerprint)
    _say(rank, f"[pretrain] {sum(p.numel() for p in model.parameters()):,} parameters, vocab {tok.vocab_size}, "
               f"global batch {args.batch_size * args.grad_accum * world}, {args.max_steps} steps on {trainer.device}")
    final = trainer.train()
    if rank == 0:
        _save_model(model, tok, out / "model")
        final["loss_curve"] = loss_curve_summary(out / "metrics.jsonl")
        (out / "final_metrics.json").write_text(json.dumps(final, indent=2), encoding="utf-8")
        _say(rank, f"[pretrain] model and tokenizer saved to {out / 'model'}")
    return final


def _task_data(task: str, data_dir: str | None, out: Path, rank: int, world: int) -> str:
    if data_dir:
        return data_dir
    if get_task(task).name != "pydoc-topics":
        raise ValueError(f"--data-dir is required for task {task!r} (only pydoc-topics is bundled)")
    path = out / "data" / "pydoc-topics"
    if rank == 0 and not (path / "dev.tsv").exists():
        write_pydoc_topic_task(path)
    if world > 1:
        torch.distributed.barrier()
    return str(path)


def _load_encoder(args: argparse.Namespace, tok: WordPieceTokenizer) -> MPOBertModel:
    if args.model:
        return MPOBertModel.from_pretrained(args.model, strict=False)
    cfg = model_config(args.model_config, vocab_size=tok.vocab_size, max_position_embeddings=max(args.max_seq_len, 64))
    return MPOBertModel(cfg)


def cmd_finetune(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune on one GLUE-format task, several at once (multitask), or SQuAD v1.1."""
    rank, world, _ = setup_distributed()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not args.model and not args.tokenizer:
        raise ValueError("give --model (a pretrained model directory) or --tokenizer for a model from scratch")
    tok = _load_tokenizer(args.model, args.tokenizer) if args.model else WordPieceTokenizer.from_file(args.tokenizer)
    tasks = [t.strip() for t in args.task.split(",") if t.strip()]
    data_dirs = args.data_dir or []
    if data_dirs and len(data_dirs) != len(tasks):
        raise ValueError(f"give one --data-dir per task: {len(tasks)} tasks, {len(data_dirs)} directories")
    torch.manual_seed(args.seed)
    encoder = _load_encoder(args, tok)
    cfg = encoder.config.replace(classifier_dropout=args.dropout)
    if tasks == ["squad"]:
        return _finetune_squad(args, tok, encoder, cfg, data_dirs, out, rank, world)
    specs = [get_task(t) for t in tasks]
    train_sets, dev_sets, baselines = {}, {}, {}
    for spec, t in zip(specs, tasks):
        ddir = _task_data(t, data_dirs[tasks.index(t)] if data_dirs else None, out, rank, world)
        train = load_split(spec, ddir, "train")
        if args.few_shot:
            train = few_shot(train, args.few_shot, seed=args.seed)
        dev = load_split(spec, ddir, "dev")
        train_sets[spec.name] = encode_examples(train, tok, args.max_seq_len)
        dev_sets[spec.name] = encode_examples(dev, tok, args.max_seq_len)
        if not spec.is_regression:
            baselines[spec.name] = majority_baseline([e.label for e in train], [e.label for e in dev], spec)
    sources = {n: ExampleBatches(f, args.batch_size, rank, world, seed=args.seed, pad_id=tok.pad_id) for n, f in train_sets.items()}
    if len(specs) == 1:
        spec = specs[0]
        model = MPOBertForSequenceClassification(cfg.replace(num_labels=spec.num_labels))
        model.mpobert.load_state_dict(encoder.state_dict())
        batches: Any = sources[spec.name]
        eval_fn = lambda m: evaluate_task(m, dev_sets[spec.name], spec, args.eval_batch_size, tok.pad_id)  # noqa: E731
    else:
        encoder.config = cfg
        model = MPOBertForMultiTask(encoder, {s.name: s.num_labels for s in specs}, dropout=args.dropout)
        batches = MultiTaskBatches(sources, alpha=args.multitask_alpha, seed=args.seed)

        def eval_fn(m: torch.nn.Module) -> dict[str, float]:
            return {f"{s.name}/{k}": v for s in specs
                    for k, v in evaluate_task(m, dev_sets[s.name], s, args.eval_batch_size, tok.pad_id, task=s.name).items()}
    if args.epochs:
        steps_per_epoch = sum(s.steps_per_epoch for s in sources.values()) // args.grad_accum
        args.max_steps = max(1, int(args.epochs * steps_per_epoch))
    fingerprint = {"model": cfg.to_dict(), "tasks": tasks, "batch_size": args.batch_size, "few_shot": args.few_shot}
    trainer = Trainer(model, batches, _train_config(args), eval_fn=eval_fn, fingerprint=fingerprint,
                      find_unused_parameters=len(specs) > 1)  # a step uses one task's head
    _say(rank, f"[finetune] tasks {tasks}: {sum(len(v) for v in train_sets.values())} train / "
               f"{sum(len(v) for v in dev_sets.values())} dev examples, {args.max_steps} steps on {trainer.device}")
    final = trainer.train()
    final["majority_baseline"] = baselines
    if rank == 0:
        if len(specs) == 1:
            _save_model(model, tok, out / "model")
        else:
            torch.save(model.state_dict(), out / "multitask_model.pt")
        (out / "final_metrics.json").write_text(json.dumps(final, indent=2), encoding="utf-8")
    return final


def _finetune_squad(args, tok, encoder, cfg, data_dirs, out, rank, world) -> dict[str, Any]:
    if not data_dirs:
        raise ValueError("--data-dir is required for squad (a directory with train-v1.1.json and dev-v1.1.json)")
    train_ex = read_squad(Path(data_dirs[0]) / "train-v1.1.json")
    dev_ex = read_squad(Path(data_dirs[0]) / "dev-v1.1.json")
    query_len = min(64, args.max_seq_len // 2)
    train_f = [{k: f[k] for k in ("input_ids", "token_type_ids", "start_positions", "end_positions")}
               for f in squad_features(train_ex, tok, args.max_seq_len, args.doc_stride, query_len)]
    dev_f = squad_features(dev_ex, tok, args.max_seq_len, args.doc_stride, query_len)
    model = MPOBertForQuestionAnswering(cfg)
    model.mpobert.load_state_dict(encoder.state_dict())
    batches = ExampleBatches(train_f, args.batch_size, rank, world, seed=args.seed, pad_id=tok.pad_id)
    if args.epochs:
        args.max_steps = max(1, int(args.epochs * batches.steps_per_epoch // args.grad_accum))
    trainer = Trainer(model, batches, _train_config(args),
                      eval_fn=lambda m: evaluate_squad(m, dev_ex, dev_f, args.eval_batch_size, tok.pad_id),
                      fingerprint={"model": cfg.to_dict(), "tasks": ["squad"], "batch_size": args.batch_size})
    final = trainer.train()
    if rank == 0:
        _save_model(model, tok, out / "model")
    return final


def cmd_evaluate(args: argparse.Namespace) -> dict[str, Any]:
    """Evaluate a fine-tuned model directory on a task's dev split (and the majority baseline)."""
    spec = get_task(args.task)
    tok = _load_tokenizer(args.model, args.tokenizer)
    model = MPOBertForSequenceClassification.from_pretrained(args.model)
    if model.config.num_labels != spec.num_labels:
        raise ValueError(f"model has {model.config.num_labels} labels, task {spec.name} has {spec.num_labels}")
    ddir = _task_data(spec.name, args.data_dir, Path(args.model).parent, 0, 1)
    dev = load_split(spec, ddir, "dev")
    metrics = evaluate_task(model, encode_examples(dev, tok, args.max_seq_len), spec, args.eval_batch_size, tok.pad_id)
    result = {"task": spec.name, "examples": len(dev), "metrics": metrics}
    if not spec.is_regression:
        train = load_split(spec, ddir, "train")
        result["majority_baseline"] = majority_baseline([e.label for e in train], [e.label for e in dev], spec)
    print(json.dumps(result, indent=2))
    if args.output:
        Path(args.output).write_text(json.dumps(result, indent=2), encoding="utf-8")
    return result


def cmd_convert(args: argparse.Namespace) -> dict[str, Any]:
    """Convert a local Hugging Face ALBERT/BERT checkpoint directory to an MPOBERT model directory."""
    cls = {"pretraining": MPOBertForPreTraining, "base": MPOBertModel}[args.head]
    overrides = {k: v for k, v in (("num_layers", args.num_layers), ("num_groups", args.num_groups),
                                   ("adapter_rank", args.adapter_rank), ("max_bond", args.max_bond)) if v is not None}
    model = cls.from_albert(args.input, **overrides) if args.source == "albert" else cls.from_bert(args.input, **overrides)
    model.save_pretrained(args.output)
    for name in ("vocab.txt", "tokenizer.json"):
        if (Path(args.input) / name).is_file():
            WordPieceTokenizer.from_file(Path(args.input) / name).save(Path(args.output) / TOKENIZER_FILE)
            break
    report = model.parameter_report()
    print(report)
    print(f"[convert] saved to {args.output}")
    return report.to_dict()


def cmd_params(args: argparse.Namespace) -> dict[str, Any]:
    """Print the parameter table of a model directory or a config (preset name or JSON file)."""
    if args.model:
        report = MPOBertForPreTraining.from_pretrained(args.model, strict=False).parameter_report()
    else:
        report = MPOBertForPreTraining(model_config(args.model_config)).parameter_report()
    print(json.dumps(report.to_dict(), indent=2) if args.json else report)
    return report.to_dict()


def cmd_demo(args: argparse.Namespace) -> dict[str, Any]:
    """End to end on bundled data: tokenizer, MLM+SOP pretraining, fine-tuning on pydoc-topics."""
    t0 = time.perf_counter()
    if args.quick:  # a smoke run for tests and first contact: ~1/6 of the work
        args.pretrain_steps, args.finetune_epochs, args.compare_scratch = 100, 2.0, False
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    task_dir = write_pydoc_topic_task(out / "data" / "pydoc-topics", seed=args.seed)
    spec = get_task("pydoc-topics")
    # Pretrain on the train paragraphs only; the dev paragraphs are held out (MLM/SOP eval corpus).
    write_corpus([split_sentences(e.text_a) for e in load_split(spec, task_dir, "train")], out / "pretrain" / "corpus.txt")
    write_corpus([split_sentences(e.text_a) for e in load_split(spec, task_dir, "dev")], out / "heldout.txt")
    common = ["--seed", str(args.seed), "--progress", args.progress, "--device", args.device, "--max-seq-len", str(args.max_seq_len)]
    parser = build_parser()
    pre = cmd_pretrain(parser.parse_args([
        "pretrain", "--output-dir", str(out / "pretrain"), "--corpus", str(out / "pretrain" / "corpus.txt"),
        "--eval-corpus", str(out / "heldout.txt"), "--vocab-size", str(args.vocab_size), "--model-config", args.model_config,
        "--max-steps", str(args.pretrain_steps), "--batch-size", str(args.batch_size), "--lr", str(args.pretrain_lr),
        "--optimizer", args.optimizer, "--warmup-steps", str(max(1, args.pretrain_steps // 10)),
        "--log-every", str(max(1, args.pretrain_steps // 20)), "--dropout", str(args.dropout), *common]))
    finetune = ["finetune", "--task", "pydoc-topics", "--data-dir", str(task_dir), "--epochs", str(args.finetune_epochs),
                "--batch-size", str(args.batch_size), "--lr", str(args.finetune_lr), "--optimizer", "adamw", "--log-every", "10",
                "--dropout", str(args.dropout), *common]
    fine = cmd_finetune(parser.parse_args([*finetune, "--model", str(out / "pretrain" / "model"), "--output-dir", str(out / "finetune")]))
    scratch = None
    if args.compare_scratch:  # the same fine-tuning from a randomly initialized model of the same config
        scratch = cmd_finetune(parser.parse_args([
            *finetune, "--model-config", str(out / "pretrain" / "model" / "config.json"),
            "--tokenizer", str(out / "pretrain" / "model" / "tokenizer.json"), "--output-dir", str(out / "finetune_scratch")]))
    report = MPOBertForSequenceClassification.from_pretrained(out / "finetune" / "model").parameter_report()
    summary = {
        "parameters": report.to_dict(),
        "pretrain": {"steps": pre["steps"], "loss_curve": pre["loss_curve"], "heldout": pre["eval"],
                     "tokens_per_s": pre["tokens_per_s"], "train_time_s": pre["train_time_s"]},
        "finetune": {"steps": fine["steps"], "dev": fine["eval"], "majority_baseline": fine["majority_baseline"]["pydoc-topics"],
                     "train_time_s": fine["train_time_s"]},
        "finetune_from_scratch": None if scratch is None else {"steps": scratch["steps"], "dev": scratch["eval"]},
        "total_time_s": time.perf_counter() - t0,
    }
    (out / "demo_metrics.json").write_text(json.dumps(summary, indent=2), encoding="utf-8")
    print("\n== MPOBERT demo (bundled pydoc corpus, CPU-sized) ==")
    print(report)
    print("\npretraining loss (MLM + SOP), step: loss")
    print("  " + ", ".join(f"{s}: {l:.3f}" for s, l in pre["loss_curve"]))
    print(f"held-out MLM accuracy {pre['eval']['mlm_accuracy']:.3f}, SOP accuracy {pre['eval']['sop_accuracy']:.3f}")
    acc, base = fine["eval"]["accuracy"], fine["majority_baseline"]["pydoc-topics"]["accuracy"]
    print(f"pydoc-topics dev accuracy {acc:.3f} vs majority-class baseline {base:.3f} "
          f"(Matthews corr. {fine['eval']['matthews_corrcoef']:.3f})")
    if scratch is not None:
        print(f"same fine-tuning from a random init: dev accuracy {scratch['eval']['accuracy']:.3f} "
              f"(Matthews corr. {scratch['eval']['matthews_corrcoef']:.3f})")
    print(f"total time {summary['total_time_s']:.0f} s; metrics written to {out / 'demo_metrics.json'}")
    return summary


# ---------------------------------------------------------------------------- parser
def _add_train_options(p: argparse.ArgumentParser, steps: int, lr: float, optimizer: str, batch: int) -> None:
    g = p.add_argument_group("training")
    g.add_argument("--output-dir", required=True, help="directory for checkpoint, metrics.jsonl, final_metrics.json, model")
    g.add_argument("--max-steps", type=int, default=steps, help="optimizer steps (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=batch, help="per-device micro-batch size (default %(default)s)")
    g.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step (default %(default)s)")
    g.add_argument("--optimizer", choices=("lamb", "adamw"), default=optimizer, help="optimizer (default %(default)s)")
    g.add_argument("--lr", type=float, default=lr, help="peak learning rate (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=0.01, help="decoupled, not on biases/norms (default %(default)s)")
    g.add_argument("--warmup-steps", type=int, default=0, help="linear warmup, then linear decay (default %(default)s)")
    g.add_argument("--max-grad-norm", type=float, default=1.0, help="clip the global grad norm; 0 = off (default %(default)s)")
    g.add_argument("--precision", choices=("fp32", "bf16", "fp16"), default="fp32", help="fp16 uses a GradScaler, GPU only (default %(default)s)")
    g.add_argument("--dropout", type=float, default=0.1, help="hidden/attention/classifier dropout (default %(default)s)")
    g.add_argument("--seed", type=int, default=0, help="seed of init, data order and dropout (default %(default)s)")
    g.add_argument("--log-every", type=int, default=10, help="steps between log records (default %(default)s)")
    g.add_argument("--eval-every", type=int, default=0, help="steps between evaluations, 0 = only at the end (default %(default)s)")
    g.add_argument("--save-every", type=int, default=0, help="steps between checkpoints, 0 = only at the end (default %(default)s)")
    g.add_argument("--max-nonfinite", type=int, default=5, help="stop after this many consecutive NaN/inf steps (default %(default)s)")
    g.add_argument("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint.pt if present")
    g.add_argument("--progress", choices=("auto", "tqdm", "plain", "none"), default="auto",
                   help="tqdm bar (auto: on a terminal, when installed), plain lines, or none (default %(default)s)")
    g.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda:0', ... (default %(default)s)")
    g.add_argument("--max-seq-len", type=int, default=128, help="tokens per sequence incl. specials (default %(default)s)")


def build_parser() -> argparse.ArgumentParser:
    """The ``python -m mpobert`` argument parser."""
    parser = argparse.ArgumentParser(prog="mpobert", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="command")

    def add(name: str, func: Any) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=func.__doc__.splitlines()[0], description=func.__doc__)
        p.add_argument("--config", help="JSON (or YAML) file of option defaults, e.g. {\"max_steps\": 300}")
        p.set_defaults(func=func)
        return p

    p = add("pretrain", cmd_pretrain)
    p.add_argument("--corpus", nargs="+", help="plain-text files: one sentence per line, blank line between documents "
                                               "(default: the bundled pydoc corpus)")
    p.add_argument("--eval-corpus", help="held-out corpus file for MLM/SOP accuracy")
    p.add_argument("--eval-batches", type=int, default=8, help="batches of the eval corpus to use (default %(default)s)")
    p.add_argument("--tokenizer", help="vocab.txt or tokenizer.json (default: train a WordPiece vocab on the corpus)")
    p.add_argument("--vocab-size", type=int, default=4000, help="vocab size when training one (default %(default)s)")
    p.add_argument("--model-config", default="tiny", help=f"preset {sorted(PRESETS)} or a JSON config (default %(default)s)")
    p.add_argument("--init-from", help="start from a model directory (save_pretrained / convert output)")
    p.add_argument("--mlm-probability", type=float, default=0.15, help="fraction of tokens to predict (default %(default)s)")
    _add_train_options(p, steps=1000, lr=1e-2, optimizer="lamb", batch=32)

    p = add("finetune", cmd_finetune)
    p.add_argument("--task", required=True, help="a GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte), "
                                                 "pydoc-topics, squad, or several comma-separated for multitask")
    p.add_argument("--data-dir", nargs="+", help="task directory with train.tsv/dev.tsv (one per task; "
                                                 "default for pydoc-topics: generated)")
    p.add_argument("--model", help="pretrained model directory (pretrain's OUTPUT_DIR/model)")
    p.add_argument("--model-config", default="tiny", help="config for a model from scratch when --model is absent")
    p.add_argument("--tokenizer", help="tokenizer file (default: the model directory's)")
    p.add_argument("--epochs", type=float, help="train this many epochs (overrides --max-steps)")
    p.add_argument("--few-shot", type=int, default=0, help="train on K examples per class (seeded), 0 = all")
    p.add_argument("--multitask-alpha", type=float, default=0.5, help="task sampling ∝ size^alpha (default %(default)s)")
    p.add_argument("--eval-batch-size", type=int, default=64, help="batch size of dev evaluation (default %(default)s)")
    p.add_argument("--doc-stride", type=int, default=128, help="SQuAD window stride (default %(default)s)")
    _add_train_options(p, steps=300, lr=1e-4, optimizer="adamw", batch=32)

    p = add("evaluate", cmd_evaluate)
    p.add_argument("--task", required=True, help="GLUE-format task name")
    p.add_argument("--model", required=True, help="fine-tuned model directory (finetune's OUTPUT_DIR/model)")
    p.add_argument("--data-dir", help="task directory (default for pydoc-topics: next to the model)")
    p.add_argument("--tokenizer", help="tokenizer file (default: the model directory's)")
    p.add_argument("--max-seq-len", type=int, default=128, help="tokens per sequence incl. specials (default %(default)s)")
    p.add_argument("--eval-batch-size", type=int, default=64, help="batch size of evaluation (default %(default)s)")
    p.add_argument("--output", help="also write the metrics JSON here")

    p = add("convert", cmd_convert)
    p.add_argument("--from", dest="source", choices=("albert", "bert"), required=True, help="source architecture")
    p.add_argument("--input", required=True, help="Hugging Face checkpoint directory (config.json + weights)")
    p.add_argument("--output", required=True, help="MPOBERT model directory to write")
    p.add_argument("--head", choices=("pretraining", "base"), default="pretraining", help="model class to build: with MLM+SOP heads, or the bare encoder (default %(default)s)")
    p.add_argument("--num-layers", type=int, help="override L (layers beyond 24 get scaled Xavier auxiliaries)")
    p.add_argument("--num-groups", type=int, help="override G (MPOBERT+)")
    p.add_argument("--adapter-rank", type=int, help="override the adapter rank")
    p.add_argument("--max-bond", type=int, help="truncate MPO bonds")

    p = add("params", cmd_params)
    p.add_argument("--model", help="model directory")
    p.add_argument("--model-config", default="mpobert12", help=f"preset {sorted(PRESETS)} or JSON (default %(default)s)")
    p.add_argument("--json", action="store_true", help="print JSON instead of the table")

    p = add("demo", cmd_demo)
    p.add_argument("--output-dir", default="results/demo", help="where data, runs and demo_metrics.json go (default %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help="smoke run (100 pretraining steps, 2 fine-tuning epochs, no from-scratch comparison)")
    p.add_argument("--pretrain-steps", type=int, default=600, help="MLM+SOP pretraining steps (default %(default)s)")
    p.add_argument("--pretrain-lr", type=float, default=2e-3, help="pretraining peak learning rate (default %(default)s)")
    p.add_argument("--optimizer", choices=("lamb", "adamw"), default="adamw", help="pretraining optimizer (default %(default)s)")
    p.add_argument("--compare-scratch", action=argparse.BooleanOptionalAction, default=True,
                   help="also fine-tune a randomly initialized model the same way, to show what pretraining adds "
                        "(default: on)")
    p.add_argument("--finetune-epochs", type=float, default=5.0, help="fine-tuning epochs over pydoc-topics train (default %(default)s)")
    p.add_argument("--finetune-lr", type=float, default=2e-3, help="fine-tuning peak learning rate, AdamW (default %(default)s)")
    p.add_argument("--batch-size", type=int, default=32, help="batch size of both stages (default %(default)s)")
    p.add_argument("--dropout", type=float, default=0.0,
                   help="hidden/attention/classifier dropout; a model this small underfits, so none (default %(default)s)")
    p.add_argument("--max-seq-len", type=int, default=64, help="tokens per sequence, both stages (default %(default)s)")
    p.add_argument("--vocab-size", type=int, default=2000, help="WordPiece vocabulary trained on the corpus (default %(default)s)")
    p.add_argument("--model-config", default="tiny", help=f"preset {sorted(PRESETS)} or a JSON config (default %(default)s)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data split, init and training (default %(default)s)")
    p.add_argument("--progress", choices=("auto", "tqdm", "plain", "none"), default="plain", help="progress display (default %(default)s)")
    p.add_argument("--device", default="auto", help="'auto' (CUDA if available), 'cpu', 'cuda:0', ... (default %(default)s)")

    from .methods import add_subparsers as add_method_subcommands

    add_method_subcommands(sub)  # mpop, opf, mpoe: the MPO method family (mpobert.methods)
    return parser


def _config_option(argv: list[str]) -> str | None:
    for i, a in enumerate(argv):
        if a == "--config" and i + 1 < len(argv):
            return argv[i + 1]
        if a.startswith("--config="):
            return a.split("=", 1)[1]
    return None


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Parse ``argv``, taking option defaults from ``--config`` when given (command line wins)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = build_parser()
    config = _config_option(argv)
    subs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
    if config and argv and argv[0] in subs:
        sub = subs[argv[0]]
        known = {a.dest for a in sub._actions}
        values = {str(k).replace("-", "_"): v for k, v in load_config_file(config).items()}
        unknown = sorted(set(values) - known - {"config"})
        if unknown:
            raise ValueError(f"--config {config!r}: unknown options for {argv[0]}: {unknown}")
        sub.set_defaults(**values)
        for action in sub._actions:  # options the file gives are no longer required on the command line
            if action.dest in values:
                action.required = False
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of ``python -m mpobert`` and the ``mpobert`` console script."""
    try:
        args = parse_args(argv)
        args.func(args)
    except ValueError as exc:
        print(f"mpobert: error: {exc}", file=sys.stderr)
        return 2
    except NonFiniteLossError as exc:
        print(f"mpobert: training stopped: {exc}", file=sys.stderr)
        return 3
    finally:
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.destroy_process_group()
    return 0
