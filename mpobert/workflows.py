"""MPOBERT's end-to-end workflows, each a function of one typed settings object.

* :func:`pretrain` (:class:`PretrainConfig`): MLM + SOP pretraining on text files (default: the bundled pydoc corpus)
* :func:`finetune` (:class:`FinetuneConfig`): one GLUE-format task, several at once (multitask), or SQuAD v1.1
* :func:`evaluate` (:class:`EvaluateConfig`): a fine-tuned model on a task's dev split, with the majority baseline
* :func:`convert` (:class:`ConvertConfig`): a local Hugging Face ALBERT/BERT/RoBERTa checkpoint to an MPOBERT directory
* :func:`params` (:class:`ParamsConfig`): the parameter table of a model directory or a config
* :func:`demo` (:class:`DemoConfig`): compress-and-heal of a classifier it trains on bundled data, calibrated vs
  plain SVD at one budget (defined in :mod:`mpobert.demo`)
* :func:`distill` (:class:`DistillConfig`): a Hugging Face BERT/ALBERT/RoBERTa teacher into its MPOBERT
  conversion (defined in :mod:`mpobert.distill.workflow` with the teacher-matching pieces it assembles)
* :func:`heal` (:class:`HealConfig`): a transformers checkpoint compressed (``mpo_core.compress``) and trained back
  toward the original through the same teacher-matching core (:mod:`mpobert.distill.heal`)

Each returns a JSON-able dict. The settings classes declare their fields with
:func:`mpobert.options.option`; ``python -m mpobert`` (:mod:`mpobert.cli`) generates its options
from them, so a new workflow is a settings class plus a function here and one line in
:data:`mpobert.cli.COMMANDS`. Training runs (:func:`pretrain`, :func:`finetune`) use the one
:class:`~mpobert.train.Trainer`; under ``torchrun`` each process trains one data-parallel rank.
"""
from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mpo_core.io import atomic_torch_save, atomic_write
from mpo_core.nn import num_parameters
from mpobert.config import MPOBertConfig
from mpobert.data import (
    ExampleBatches, MultiTaskBatches, PretrainingStream, StreamBatches, WordPieceTokenizer, encode_examples, few_shot,
    get_task, load_split, read_squad, squad_features, train_wordpiece, write_corpus, write_pydoc_topic_task,
)
from mpobert.data.corpus import pydoc_documents
from mpobert.demo import DemoConfig, demo
from mpobert.distill.heal import HealConfig, heal
from mpobert.distill.workflow import DistillConfig, distill
from mpobert.evaluation import evaluate_pretraining, evaluate_squad, evaluate_task, majority_baseline
from mpobert.heads import MPOBertForPreTraining, MPOBertForQuestionAnswering, MPOBertForSequenceClassification
from mpobert.model import MPOBertModel, MPOBertPreTrainedModel
from mpobert.multitask import MPOBertForMultiTask
from mpobert.options import nested, option
from mpobert.train import TrainConfig, Trainer, setup_distributed

__all__ = ["PRESETS", "TOKENIZER_FILE", "model_config", "PretrainConfig", "FinetuneConfig", "EvaluateConfig",
           "ConvertConfig", "ParamsConfig", "DemoConfig", "DistillConfig", "HealConfig", "pretrain", "finetune", "evaluate",
           "convert", "params", "demo", "distill", "heal"]

PRESETS = {"tiny": MPOBertConfig.tiny, "mpobert12": MPOBertConfig.mpobert12, "mpobert24": MPOBertConfig.mpobert24,
           "mpobert48": MPOBertConfig.mpobert48, "mpobert48_plus": MPOBertConfig.mpobert48_plus}
TOKENIZER_FILE = "tokenizer.json"
_PRESET_HELP = f"preset {sorted(PRESETS)} or a JSON config file"


def model_config(spec: str, **overrides: Any) -> MPOBertConfig:
    """A preset name (``tiny``, ``mpobert12``, ...) or a JSON config file, with overrides."""
    if spec in PRESETS:
        return PRESETS[spec](**overrides)
    if Path(spec).is_file():
        return MPOBertConfig.load(spec).replace(**overrides)
    raise ValueError(f"--model-config must be one of {sorted(PRESETS)} or a JSON file, got {spec!r}")


# ---------------------------------------------------------------------------- settings
@dataclass(kw_only=True)
class _RunConfig:
    """What pretraining and fine-tuning runs share besides the :class:`TrainConfig`."""

    model_config: str = option("tiny", f"{_PRESET_HELP} for a model from scratch")
    tokenizer: str | None = option(None, "vocab.txt or tokenizer.json (pretrain default: train a WordPiece vocab on the "
                                         "corpus; finetune default: the --model directory's)")
    batch_size: int = option(32, "per-device micro-batch size")
    max_seq_len: int = option(128, "tokens per sequence incl. specials")
    dropout: float = option(0.1, "hidden/attention/classifier dropout")


@dataclass(kw_only=True)
class PretrainConfig(_RunConfig):
    """Settings of :func:`pretrain`."""

    corpus: list[str] | None = option(None, "plain-text files: one sentence per line, blank line between documents "
                                            "(default: the bundled pydoc corpus)")
    eval_corpus: str | None = option(None, "held-out corpus file for MLM/SOP accuracy")
    eval_batches: int = option(8, "batches of the eval corpus to use")
    vocab_size: int = option(4000, "vocab size when training a tokenizer")
    init_from: str | None = option(None, "start from a model directory (save_pretrained / convert output)")
    mlm_probability: float = option(0.15, "fraction of tokens to predict")
    train: TrainConfig = nested(TrainConfig, "training", required=("output_dir",), max_steps=1000, lr=1e-2,
                                optimizer="lamb")


@dataclass(kw_only=True)
class FinetuneConfig(_RunConfig):
    """Settings of :func:`finetune`."""

    task: str = option(help="a GLUE task (cola, sst2, mrpc, stsb, qqp, mnli, qnli, rte), pydoc-topics, squad, "
                            "or several comma-separated for multitask")
    data_dir: list[str] | None = option(None, "task directory with train.tsv/dev.tsv, one per task "
                                              "(default for pydoc-topics: generated)")
    model: str | None = option(None, "pretrained model directory (pretrain's OUTPUT_DIR/model)")
    epochs: float | None = option(None, "train this many epochs (overrides --max-steps)")
    few_shot: int = option(0, "train on K examples per class (seeded), 0 = all")
    multitask_alpha: float = option(0.5, "task sampling proportional to size^alpha")
    eval_batch_size: int = option(64, "batch size of dev evaluation")
    doc_stride: int = option(128, "SQuAD window stride")
    train: TrainConfig = nested(TrainConfig, "training", required=("output_dir",), max_steps=300, lr=1e-4,
                                optimizer="adamw")


@dataclass(kw_only=True)
class EvaluateConfig:
    """Settings of :func:`evaluate`."""

    task: str = option(help="GLUE-format task name")
    model: str = option(help="fine-tuned model directory (finetune's OUTPUT_DIR/model)")
    data_dir: str | None = option(None, "task directory (default for pydoc-topics: next to the model)")
    tokenizer: str | None = option(None, "tokenizer file (default: the model directory's)")
    max_seq_len: int = option(128, "tokens per sequence incl. specials")
    eval_batch_size: int = option(64, "batch size of evaluation")
    output: str | None = option(None, "also write the metrics JSON here")


@dataclass(kw_only=True)
class ConvertConfig:
    """Settings of :func:`convert`."""

    source: str = option(help="source architecture (roberta: through the BERT conversion)",
                         choices=("albert", "bert", "roberta"), flag="--from")
    input: str = option(help="Hugging Face checkpoint directory (config.json + weights)")
    output: str = option(help="MPOBERT model directory to write")
    head: str = option("pretraining", "model class to build: with MLM+SOP heads, or the bare encoder",
                       choices=("pretraining", "base"))
    num_layers: int | None = option(None, "override L (layers beyond 24 get depth-scaled auxiliaries)")
    depth_scaling: str = option("algorithm1", "layers beyond 24: the source's auxiliaries x (2L)^-1/4 (algorithm1, the "
                                              "paper's appendix A.2) or Xavier ones x (2L)^-1/4 (random, its section 3.3)",
                                choices=("algorithm1", "random"))
    num_groups: int | None = option(None, "override G (MPOBERT+)")
    adapter_rank: int | None = option(None, "override the adapter rank")
    max_bond: int | None = option(None, "truncate MPO bonds")


@dataclass(kw_only=True)
class ParamsConfig:
    """Settings of :func:`params`."""

    model: str | None = option(None, "model directory")
    model_config: str = option("mpobert12", _PRESET_HELP)
    json: bool = option(False, "print JSON instead of the table")


# ---------------------------------------------------------------------------- helpers
def _say(rank: int, *msg: Any) -> None:
    if rank == 0:
        print(*msg, flush=True)


def _load_tokenizer(model_dir: str, explicit: str | None) -> WordPieceTokenizer:
    path = explicit or os.path.join(model_dir, TOKENIZER_FILE)
    if not os.path.exists(path):
        raise ValueError(f"no tokenizer at {path!r}: pass --tokenizer (vocab.txt or tokenizer.json)")
    return WordPieceTokenizer.from_file(path)


def _save_model(model: MPOBertPreTrainedModel, tok: WordPieceTokenizer, directory: Path) -> None:
    model.save_pretrained(directory)
    tok.save(directory / TOKENIZER_FILE)


# ---------------------------------------------------------------------------- pretrain
def _pretrain_tokenizer(cfg: PretrainConfig, corpus: list[str], out: Path, rank: int, world: int) -> WordPieceTokenizer:
    """The given tokenizer, the one a previous run saved in ``out``, or one trained on ``corpus`` by rank 0."""
    if cfg.tokenizer:
        return WordPieceTokenizer.from_file(cfg.tokenizer)
    saved = out / TOKENIZER_FILE
    if not saved.exists() and rank == 0:
        lines = (ln for f in corpus for ln in open(f, encoding="utf-8") if ln.strip())
        train_wordpiece(lines, vocab_size=cfg.vocab_size).save(saved)
    if world > 1:
        torch.distributed.barrier()  # rank 0 wrote the corpus and tokenizer
    return WordPieceTokenizer.from_file(saved)


def pretrain(cfg: PretrainConfig) -> dict[str, Any]:
    """MLM + SOP pretraining on plain-text corpus files (default: the bundled pydoc corpus)."""
    rank, world, _ = setup_distributed()
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    corpus = cfg.corpus
    if not corpus:
        corpus = [str(out / "corpus.txt")]
        if rank == 0 and not os.path.exists(corpus[0]):
            write_corpus(pydoc_documents(), corpus[0])
    tok = _pretrain_tokenizer(cfg, corpus, out, rank, world)
    torch.manual_seed(cfg.train.seed)
    if cfg.init_from:
        model = MPOBertForPreTraining.from_pretrained(cfg.init_from, strict=False)
    else:
        model = MPOBertForPreTraining(model_config(
            cfg.model_config, vocab_size=tok.vocab_size, max_position_embeddings=max(cfg.max_seq_len, 64),
            hidden_dropout=cfg.dropout, attention_dropout=cfg.dropout, classifier_dropout=cfg.dropout))
    if model.config.vocab_size != tok.vocab_size:
        raise ValueError(f"model vocab_size {model.config.vocab_size} != tokenizer vocab size {tok.vocab_size}")
    seed = cfg.train.seed
    stream = PretrainingStream(corpus, tok, cfg.max_seq_len, cfg.mlm_probability, seed=seed)
    batches = StreamBatches(stream, cfg.batch_size, rank, world, tok.pad_id)
    eval_fn = None
    if cfg.eval_corpus:
        eval_stream = PretrainingStream(cfg.eval_corpus, tok, cfg.max_seq_len, cfg.mlm_probability, seed=seed, loop=False)
        eval_batches = list(StreamBatches(eval_stream, cfg.batch_size, 0, 1, tok.pad_id))[: cfg.eval_batches]
        if not eval_batches:
            raise ValueError(f"--eval-corpus {cfg.eval_corpus} yields less than one batch of {cfg.batch_size}")
        eval_fn = lambda m: evaluate_pretraining(m, eval_batches)  # noqa: E731
    fingerprint = {"model": model.config.to_dict(), "batch_size": cfg.batch_size, "max_seq_len": cfg.max_seq_len}
    trainer = Trainer(model, batches, cfg.train, eval_fn=eval_fn, fingerprint=fingerprint)
    _say(rank, f"[pretrain] {num_parameters(model):,} parameters, vocab {tok.vocab_size}, global batch "
               f"{cfg.batch_size * cfg.train.grad_accum * world}, {cfg.train.max_steps} steps on {trainer.device}")
    final = trainer.train()
    if rank == 0:
        _save_model(model, tok, out / "model")
        _say(rank, f"[pretrain] model and tokenizer saved to {out / 'model'}")
    return final


# ---------------------------------------------------------------------------- finetune
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


def _with_epochs(cfg: FinetuneConfig, steps_per_epoch: int) -> TrainConfig:
    """``cfg.train`` with ``max_steps`` from ``--epochs`` when given."""
    if not cfg.epochs:
        return cfg.train
    return dataclasses.replace(cfg.train, max_steps=max(1, int(cfg.epochs * steps_per_epoch / cfg.train.grad_accum)))


def finetune(cfg: FinetuneConfig) -> dict[str, Any]:
    """Fine-tune on one GLUE-format task, several at once (multitask), or SQuAD v1.1."""
    rank, world, _ = setup_distributed()
    out = Path(cfg.train.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    if not cfg.model and not cfg.tokenizer:
        raise ValueError("give --model (a pretrained model directory) or --tokenizer for a model from scratch")
    tok = _load_tokenizer(cfg.model, cfg.tokenizer) if cfg.model else WordPieceTokenizer.from_file(cfg.tokenizer)
    tasks = [t.strip() for t in cfg.task.split(",") if t.strip()]
    data_dirs = cfg.data_dir or []
    if data_dirs and len(data_dirs) != len(tasks):
        raise ValueError(f"give one --data-dir per task: {len(tasks)} tasks, {len(data_dirs)} directories")
    torch.manual_seed(cfg.train.seed)
    if cfg.model:
        encoder = MPOBertModel.from_pretrained(cfg.model, strict=False)
    else:
        encoder = MPOBertModel(model_config(cfg.model_config, vocab_size=tok.vocab_size,
                                            max_position_embeddings=max(cfg.max_seq_len, 64)))
    model_cfg = encoder.config.replace(classifier_dropout=cfg.dropout)
    if tasks == ["squad"]:
        return _finetune_squad(cfg, tok, encoder, model_cfg, data_dirs, out, rank, world)
    specs = [get_task(t) for t in tasks]
    seed = cfg.train.seed
    train_sets, dev_sets, baselines = {}, {}, {}
    for i, spec in enumerate(specs):
        ddir = _task_data(tasks[i], data_dirs[i] if data_dirs else None, out, rank, world)
        train = load_split(spec, ddir, "train")
        if cfg.few_shot:
            train = few_shot(train, cfg.few_shot, seed=seed)
        dev = load_split(spec, ddir, "dev")
        train_sets[spec.name] = encode_examples(train, tok, cfg.max_seq_len)
        dev_sets[spec.name] = encode_examples(dev, tok, cfg.max_seq_len)
        if not spec.is_regression:
            baselines[spec.name] = majority_baseline([e.label for e in train], [e.label for e in dev], spec)
    sources = {n: ExampleBatches(f, cfg.batch_size, rank, world, seed=seed, pad_id=tok.pad_id) for n, f in train_sets.items()}

    def eval_fn(m: torch.nn.Module) -> dict[str, float]:
        if len(specs) == 1:
            return evaluate_task(m, dev_sets[specs[0].name], specs[0], cfg.eval_batch_size, tok.pad_id)
        return {f"{s.name}/{k}": v for s in specs
                for k, v in evaluate_task(m, dev_sets[s.name], s, cfg.eval_batch_size, tok.pad_id, task=s.name).items()}

    if len(specs) == 1:
        model: torch.nn.Module = MPOBertForSequenceClassification(model_cfg.replace(num_labels=specs[0].num_labels))
        model.mpobert.load_state_dict(encoder.state_dict())
        batches: Any = sources[specs[0].name]
    else:
        encoder.config = model_cfg
        model = MPOBertForMultiTask(encoder, {s.name: s.num_labels for s in specs}, dropout=cfg.dropout)
        batches = MultiTaskBatches(sources, alpha=cfg.multitask_alpha, seed=seed)
    train_cfg = _with_epochs(cfg, sum(s.steps_per_epoch for s in sources.values()))
    fingerprint = {"model": model_cfg.to_dict(), "tasks": tasks, "batch_size": cfg.batch_size, "few_shot": cfg.few_shot}
    trainer = Trainer(model, batches, train_cfg, eval_fn=eval_fn, fingerprint=fingerprint,
                      find_unused_parameters=len(specs) > 1)  # a step uses one task's head
    _say(rank, f"[finetune] tasks {tasks}: {sum(len(v) for v in train_sets.values())} train / "
               f"{sum(len(v) for v in dev_sets.values())} dev examples, {train_cfg.max_steps} steps on {trainer.device}")
    final = trainer.train(extra_metrics={"majority_baseline": baselines})
    if rank == 0:
        if len(specs) == 1:
            _save_model(model, tok, out / "model")
        else:
            atomic_torch_save(model.state_dict(), out / "multitask_model.pt")
    return final


def _finetune_squad(cfg: FinetuneConfig, tok: WordPieceTokenizer, encoder: MPOBertModel, model_cfg: MPOBertConfig,
                    data_dirs: list[str], out: Path, rank: int, world: int) -> dict[str, Any]:
    if not data_dirs:
        raise ValueError("--data-dir is required for squad (a directory with train-v1.1.json and dev-v1.1.json)")
    train_ex = read_squad(Path(data_dirs[0]) / "train-v1.1.json")
    dev_ex = read_squad(Path(data_dirs[0]) / "dev-v1.1.json")
    query_len = min(64, cfg.max_seq_len // 2)
    train_f = [{k: f[k] for k in ("input_ids", "token_type_ids", "start_positions", "end_positions")}
               for f in squad_features(train_ex, tok, cfg.max_seq_len, cfg.doc_stride, query_len)]
    dev_f = squad_features(dev_ex, tok, cfg.max_seq_len, cfg.doc_stride, query_len)
    model = MPOBertForQuestionAnswering(model_cfg)
    model.mpobert.load_state_dict(encoder.state_dict())
    batches = ExampleBatches(train_f, cfg.batch_size, rank, world, seed=cfg.train.seed, pad_id=tok.pad_id)
    trainer = Trainer(model, batches, _with_epochs(cfg, batches.steps_per_epoch),
                      eval_fn=lambda m: evaluate_squad(m, dev_ex, dev_f, cfg.eval_batch_size, tok.pad_id),
                      fingerprint={"model": model_cfg.to_dict(), "tasks": ["squad"], "batch_size": cfg.batch_size})
    final = trainer.train()
    if rank == 0:
        _save_model(model, tok, out / "model")
    return final


# ---------------------------------------------------------------------------- evaluate, convert, params
def evaluate(cfg: EvaluateConfig) -> dict[str, Any]:
    """Evaluate a fine-tuned model directory on a task's dev split (and the majority baseline)."""
    spec = get_task(cfg.task)
    tok = _load_tokenizer(cfg.model, cfg.tokenizer)
    model = MPOBertForSequenceClassification.from_pretrained(cfg.model)
    if model.config.num_labels != spec.num_labels:
        raise ValueError(f"model has {model.config.num_labels} labels, task {spec.name} has {spec.num_labels}")
    ddir = _task_data(spec.name, cfg.data_dir, Path(cfg.model).parent, 0, 1)
    dev = load_split(spec, ddir, "dev")
    metrics = evaluate_task(model, encode_examples(dev, tok, cfg.max_seq_len), spec, cfg.eval_batch_size, tok.pad_id)
    result = {"task": spec.name, "examples": len(dev), "metrics": metrics}
    if not spec.is_regression:
        train = load_split(spec, ddir, "train")
        result["majority_baseline"] = majority_baseline([e.label for e in train], [e.label for e in dev], spec)
    print(json.dumps(result, indent=2))
    if cfg.output:
        atomic_write(cfg.output, json.dumps(result, indent=2).encode("utf-8"))
    return result


def convert(cfg: ConvertConfig) -> dict[str, Any]:
    """Convert a local Hugging Face ALBERT/BERT/RoBERTa checkpoint directory to an MPOBERT model directory.

    Prints the parameter table and the initialization errors per layer and matrix (with the
    shared biases and LayerNorms); writes the model, ``init_report.json`` and, for a WordPiece
    vocabulary, ``tokenizer.json`` into ``--output``.
    """
    cls = {"pretraining": MPOBertForPreTraining, "base": MPOBertModel}[cfg.head]
    overrides = {k: getattr(cfg, k) for k in ("num_layers", "num_groups", "adapter_rank", "max_bond")
                 if getattr(cfg, k) is not None}
    overrides["depth_scaling"] = cfg.depth_scaling
    model = cls.from_albert(cfg.input, **overrides) if cfg.source == "albert" else cls.from_bert(cfg.input, **overrides)
    if cfg.source != "albert" and model.init_report.source != cfg.source:
        raise ValueError(f"--from {cfg.source}: {cfg.input!r} is a {model.init_report.source} checkpoint")
    vocab = [Path(cfg.input) / n for n in ("vocab.txt", "tokenizer.json") if (Path(cfg.input) / n).is_file()]
    tok = WordPieceTokenizer.from_file(vocab[0]) if vocab and cfg.source != "roberta" else None
    model.save_pretrained(cfg.output)
    atomic_write(Path(cfg.output) / "init_report.json", (json.dumps(model.init_report.to_dict(), indent=2) + "\n").encode())
    if tok is not None:
        tok.save(Path(cfg.output) / TOKENIZER_FILE)
    report = model.parameter_report()
    print(report)
    print(model.init_report.table())
    print(f"[convert] saved to {cfg.output} (init errors: {Path(cfg.output) / 'init_report.json'})")
    return {**report.to_dict(), "init_report": model.init_report.to_dict()}


def params(cfg: ParamsConfig) -> dict[str, Any]:
    """Print the parameter table of a model directory or a config (preset name or JSON file)."""
    if cfg.model:
        report = MPOBertForPreTraining.from_pretrained(cfg.model, strict=False).parameter_report()
    else:
        report = MPOBertForPreTraining(model_config(cfg.model_config)).parameter_report()
    print(json.dumps(report.to_dict(), indent=2) if cfg.json else report)
    return report.to_dict()
