"""The MPO method family on a small dense BERT-like classifier: MPOP, OPF and MPOE end to end.

A script over the public APIs of ``mpo_core`` (``compress``, ``opf``, ``moe``) and ``mpobert``
(data, evaluation, the :class:`~mpobert.train.Trainer`); not part of either package. The
methods start from a dense model as in the papers, so the subject here is
:class:`BertLikeClassifier` (plain ``nn.Linear`` attention/FFN matrices), not MPOBERT, whose
matrices are MPOs from the start. Every fine-tuning runs on the one ``mpobert`` Trainer
(AdamW, linear decay, grad-norm clip 1.0). Each ``run_*`` returns a JSON-able dict of measured numbers:

* :func:`run_mpop` (Liu et al., ACL 2021): fine-tune fully, compress the encoder matrices to a global
  budget (:func:`mpo_core.compress.compress`), evaluate the truncated model, then fine-tune only the
  auxiliary cores (centrals frozen) and the classifier; reports the three accuracies and the
  trainable-parameter fraction.
* :func:`run_opf` (Gao et al., ACL 2023): fine-tune the dense model, and the same initialization with
  the most important matrices over-parameterized as MPOs (static selection, or dynamic re-selection
  every ``N`` steps), then merge back; reports both accuracies, the parameter counts during training
  and after the merge, and the largest logit change the merge caused.
* :func:`run_mpoe` (Gao et al., COLING 2022): the dense model against the same initialization with every
  FFN turned into an MPOE layer (:class:`mpo_core.moe.MPOEFeedForward`); reports accuracies, parameters
  against a plain MoE, and the experts' load.

Run one method on the bundled ``pydoc-topics`` task (prints a table, writes JSON)::

    python examples/mpo_methods.py {mpop,opf,mpoe} --help

``benchmarks/methods_demo.py`` runs all three side by side.
"""
from __future__ import annotations

import argparse
import copy
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mpo_core import set_trainable
from mpo_core.compress import compress
from mpo_core.io import atomic_write
from mpo_core.moe import MPOEFeedForward
from mpo_core.nn import num_parameters
from mpo_core.opf import OverParameterization, sync_optimizer
from mpobert import SequenceClassifierOutput
from mpobert.data import (
    ExampleBatches, TaskSpec, WordPieceTokenizer, encode_examples, get_task, load_split, train_wordpiece, write_pydoc_topic_task,
)
from mpobert.evaluation import evaluate_task, majority_baseline, predict_logits
from mpobert.train import TrainConfig, Trainer

ENCODER_MATRICES = "blocks.*"
"""Glob of the encoder's linear layers (attention and FFN) in :class:`BertLikeClassifier`."""


@dataclass
class TaskData:
    """An encoded GLUE-format task: spec, tokenizer, train/dev features and the majority-class baseline."""

    spec: TaskSpec
    tokenizer: WordPieceTokenizer
    train: list[dict[str, Any]]
    dev: list[dict[str, Any]]
    majority: dict[str, float]


def prepare_task(data_dir: str | Path | None = None, task: str = "pydoc-topics", max_seq_len: int = 64,
                 vocab_size: int = 1000, seed: int = 0) -> TaskData:
    """Load (or, for ``pydoc-topics`` without ``data_dir``, generate) a task and train a WordPiece vocab on its train split."""
    spec = get_task(task)
    if spec.is_regression:
        raise ValueError(f"task {spec.name!r} is a regression task; the method runs need class labels")
    with tempfile.TemporaryDirectory() as tmp:
        if data_dir is None:
            if spec.name != "pydoc-topics":
                raise ValueError(f"data_dir is required for task {task!r} (only pydoc-topics is bundled)")
            data_dir = write_pydoc_topic_task(Path(tmp) / "pydoc-topics", seed=seed)
        train, dev = load_split(spec, data_dir, "train"), load_split(spec, data_dir, "dev")
    tok = train_wordpiece([e.text_a for e in train] + [e.text_b for e in train if e.text_b], vocab_size=vocab_size)
    return TaskData(spec, tok, encode_examples(train, tok, max_seq_len), encode_examples(dev, tok, max_seq_len),
                    majority_baseline([e.label for e in train], [e.label for e in dev], spec))


class _Block(nn.Module):
    """Post-LN transformer layer with plain ``nn.Linear`` matrices ``q k v o ffn_in ffn_out`` (or an MPOE FFN)."""

    def __init__(self, hidden: int, heads: int, intermediate: int, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.q, self.k, self.v, self.o = (nn.Linear(hidden, hidden) for _ in range(4))
        self.ffn_in, self.ffn_out = nn.Linear(hidden, intermediate), nn.Linear(intermediate, hidden)
        self.moe: MPOEFeedForward | None = None
        self.ln1, self.ln2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
        b, s, h = x.shape
        q, k, v = (m(x).view(b, s, self.heads, h // self.heads).transpose(1, 2) for m in (self.q, self.k, self.v))
        ctx = F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).reshape(b, s, h)
        x = self.ln1(x + self.dropout(self.o(ctx)))
        if self.moe is not None:
            out = self.moe(x)
            return self.ln2(x + self.dropout(out.output)), out.balance_loss
        return self.ln2(x + self.dropout(self.ffn_out(F.gelu(self.ffn_in(x))))), None


class BertLikeClassifier(nn.Module):
    """A tiny BERT-like sequence classifier whose encoder matrices are plain ``nn.Linear``.

    Token + position embeddings, LayerNorm, ``layers`` post-LN blocks (:data:`ENCODER_MATRICES`:
    ``blocks.{l}.q/k/v/o/ffn_in/ffn_out``), masked mean pooling, a linear ``classifier``. The output
    and the inputs follow :class:`mpobert.MPOBertForSequenceClassification`, so
    :func:`mpobert.evaluation.evaluate_task` evaluates it.

    Parameters
    ----------
    vocab_size, num_labels : int
    hidden, layers, heads, intermediate, max_len : int
        Sizes (``hidden % heads == 0``).
    dropout : float
    balance_coef : float
        Weight of the MPOE load-balancing losses in ``loss`` (used once :meth:`use_mpoe` was called).
    """

    def __init__(self, vocab_size: int, num_labels: int, hidden: int = 64, layers: int = 2, heads: int = 4,
                 intermediate: int = 128, max_len: int = 128, dropout: float = 0.1, balance_coef: float = 0.01) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"hidden={hidden} must be divisible by heads={heads}")
        self.embed = nn.Embedding(vocab_size, hidden)
        self.position = nn.Embedding(max_len, hidden)
        self.ln = nn.LayerNorm(hidden)
        self.blocks = nn.ModuleList(_Block(hidden, heads, intermediate, dropout) for _ in range(layers))
        self.classifier = nn.Linear(hidden, num_labels)
        self.balance_coef = balance_coef

    def use_mpoe(self, num_experts: int, top_k: int = 1, n: int = 3, noise_std: float = 1e-2, seed: int = 0,
                 **kwargs: Any) -> list[dict[str, int]]:
        """Turn every block's FFN into an MPOE layer built from it (:meth:`MPOEFeedForward.from_dense`).

        Returns each layer's :meth:`~MPOEFeedForward.parameter_report`. ``kwargs`` go to the MPOE
        constructor (``capacity_factor``, ``central_grad``, ``max_bond``, ...).
        """
        g = torch.Generator().manual_seed(seed)
        reports = []
        for block in self.blocks:
            if block.moe is not None:
                raise ValueError("use_mpoe was already applied")
            block.moe = MPOEFeedForward.from_dense(block.ffn_in, block.ffn_out, num_experts, top_k, n=n,
                                                   noise_std=noise_std, generator=g, **kwargs)
            del block.ffn_in, block.ffn_out
            reports.append(block.moe.parameter_report())
        return reports

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None) -> SequenceClassifierOutput:
        b, s = input_ids.shape
        x = self.ln(self.embed(input_ids) + self.position(torch.arange(s, device=input_ids.device)))
        keep = torch.ones(b, s, dtype=torch.bool, device=x.device) if attention_mask is None else attention_mask != 0
        mask = keep[:, None, None, :]
        balance = []
        for block in self.blocks:
            x, aux = block(x, mask)
            if aux is not None:
                balance.append(aux)
        pooled = (x * keep[..., None]).sum(1) / keep.sum(1, keepdim=True).clamp_min(1)
        logits = self.classifier(pooled)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(logits, labels)
            if balance:
                loss = loss + self.balance_coef * torch.stack(balance).mean()
        return SequenceClassifierOutput(logits, loss)


def _batches(data: TaskData, batch_size: int, seed: int) -> ExampleBatches:
    return ExampleBatches(data.train, batch_size, seed=seed, pad_id=data.tokenizer.pad_id)


def _loss(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    return model(**batch).loss


def fine_tune(model: nn.Module, data: TaskData, steps: int, lr: float = 2e-3, batch_size: int = 32, seed: int = 0,
              on_step: Callable[[Trainer], None] | None = None) -> dict[str, Any]:
    """Train ``model``'s trainable parameters for ``steps`` batches with the ``mpobert`` Trainer (AdamW,
    linear decay, clip 1.0, CPU); returns its final metrics (``loss_first``, ``loss_last``, ...).

    ``on_step(trainer)`` runs after every optimizer step (dynamic OPF swaps layers there).
    """
    with tempfile.TemporaryDirectory() as tmp:
        config = TrainConfig(output_dir=tmp, max_steps=steps, optimizer="adamw", lr=lr, seed=seed, log_every=0,
                             progress="none", device="cpu")
        return Trainer(model, _batches(data, batch_size, seed), config, on_step=on_step).train()


def _evaluate(model: nn.Module, data: TaskData) -> dict[str, float]:
    return evaluate_task(model, data.dev, data.spec, 128, data.tokenizer.pad_id)


def _model(data: TaskData, seed: int, **sizes: Any) -> BertLikeClassifier:
    torch.manual_seed(seed)
    width = max(len(f["input_ids"]) for f in data.train + data.dev)
    return BertLikeClassifier(data.tokenizer.vocab_size, data.spec.num_labels, max_len=width, **sizes)


def run_mpop(data: TaskData, steps: int = 300, aux_steps: int = 150, budget: float | int = 0.3, n: int = 3,
             lr: float = 2e-3, seed: int = 0, **sizes: Any) -> dict[str, Any]:
    """MPOP: full fine-tuning, compression to ``budget`` of the encoder matrices, auxiliary-only fine-tuning.

    Returns accuracies (``full``, ``truncated``, ``auxiliary``), parameter counts, the trainable
    fraction of the lightweight fine-tuning and the :class:`~mpo_core.compress.CompressionReport`.
    """
    model = _model(data, seed, **sizes)
    full_run = fine_tune(model, data, steps, lr=lr, seed=seed)
    full = _evaluate(model, data)
    small = copy.deepcopy(model)
    report = compress(small, budget=budget, include=ENCODER_MATRICES, n=n)
    truncated = _evaluate(small, data)
    small.requires_grad_(False)
    set_trainable(small, "auxiliary")
    small.classifier.requires_grad_(True)
    trainable, total = num_parameters(small, trainable=True), num_parameters(small)
    aux_run = fine_tune(small, data, aux_steps, lr=lr, seed=seed + 1)
    return {
        "method": "mpop", "steps": steps, "aux_steps": aux_steps, "budget": budget,
        "accuracy": {"full_finetune": full["accuracy"], "truncated": truncated["accuracy"],
                     "auxiliary_finetune": _evaluate(small, data)["accuracy"], "majority": data.majority["accuracy"]},
        "params": {"dense_model": num_parameters(model), "compressed_model": total, "trainable_auxiliary_finetune": trainable,
                   "trainable_full_finetune": num_parameters(model), "trainable_fraction": trainable / total,
                   "encoder_matrices_dense": report.dense_params, "encoder_matrices_compressed": report.params},
        "final_loss": {"full_finetune": full_run["loss_last"], "auxiliary_finetune": aux_run["loss_last"]},
        "compression": report.to_dict(),
    }


def run_opf(data: TaskData, steps: int = 300, k: int | float = 0.5, dynamic_every: int | None = None, n: int = 5,
            min_bond: int | None = None, lr: float = 2e-3, seed: int = 0, score_batches: int = 2,
            **sizes: Any) -> dict[str, Any]:
    """OPF: dense fine-tuning vs over-parameterized fine-tuning of the top-``k`` matrices, merged back.

    Matrices are chosen by :func:`mpo_core.opf.importance_scores` on ``score_batches`` batches before
    training (static), and again every ``dynamic_every`` steps when given (dynamic: the optimizer is
    synced in place after each swap).
    """
    init = _model(data, seed, **sizes)
    dense = copy.deepcopy(init)
    fine_tune(dense, data, steps, lr=lr, seed=seed)
    dense_acc = _evaluate(dense, data)["accuracy"]
    model = copy.deepcopy(init)
    opf = OverParameterization(model, include=ENCODER_MATRICES, n=n, min_bond=min_bond, seed=seed)
    scoring = iter(_batches(data, 32, seed + 100))

    def rescore() -> tuple[list[str], list[str]]:
        return opf.rescore([next(scoring) for _ in range(score_batches)], _loss, k)

    rescore()
    train_params = num_parameters(model)
    swaps: list[dict[str, Any]] = []

    def reselect(trainer: Trainer) -> None:
        if dynamic_every and trainer.step % dynamic_every == 0 and trainer.step < steps:
            added, dropped = rescore()
            if added or dropped:
                sync_optimizer(trainer.optimizer, trainer.model.parameters())
                swaps.append({"step": trainer.step, "added": added, "dropped": dropped})

    fine_tune(model, data, steps, lr=lr, seed=seed, on_step=reselect)
    expanded = sorted(opf.expanded)
    (before,) = predict_logits(model, data.dev, 128, data.tokenizer.pad_id)
    opf_acc = _evaluate(model, data)["accuracy"]
    opf.merge()
    (after,) = predict_logits(model, data.dev, 128, data.tokenizer.pad_id)
    return {
        "method": "opf", "steps": steps, "k": k, "dynamic_every": dynamic_every,
        "accuracy": {"dense_finetune": dense_acc, "opf_before_merge": opf_acc,
                     "opf_merged": _evaluate(model, data)["accuracy"], "majority": data.majority["accuracy"]},
        "params": {"dense_model": num_parameters(dense), "opf_training": train_params, "opf_merged": num_parameters(model)},
        "merge_max_abs_logit_diff": float(np.abs(before - after).max()),
        "expanded_at_end": expanded, "swaps": swaps,
        "merged_is_dense": all(type(mod) is nn.Linear for name, mod in model.named_modules()
                               if name.startswith("blocks.") and isinstance(mod, nn.Linear)),
    }


def run_mpoe(data: TaskData, steps: int = 300, num_experts: int = 4, top_k: int = 1, n: int = 3,
             central_grad: str = "inverse_frequency", balance_coef: float = 0.01, lr: float = 2e-3, seed: int = 0,
             **sizes: Any) -> dict[str, Any]:
    """MPOE: the dense model vs the same initialization with MPOE FFNs (experts from the dense FFN)."""
    init = _model(data, seed, balance_coef=balance_coef, **sizes)
    dense = copy.deepcopy(init)
    fine_tune(dense, data, steps, lr=lr, seed=seed)
    moe = copy.deepcopy(init)
    layer_reports = moe.use_mpoe(num_experts, top_k, n=n, seed=seed, central_grad=central_grad)
    fine_tune(moe, data, steps, lr=lr, seed=seed)
    counts = [torch.zeros(num_experts, dtype=torch.long) for _ in moe.blocks]

    def tally(c: torch.Tensor) -> Callable:
        def hook(_m: nn.Module, _args: tuple, out: Any) -> None:
            c.add_(out.routing.counts())
        return hook

    hooks = [block.moe.register_forward_hook(tally(c)) for block, c in zip(moe.blocks, counts)]
    try:
        acc = _evaluate(moe, data)["accuracy"]
    finally:
        for h in hooks:
            h.remove()
    dense_ffn = sum(r["dense_ffn"] for r in layer_reports)
    return {
        "method": "mpoe", "steps": steps, "num_experts": num_experts, "top_k": top_k, "central_grad": central_grad,
        "accuracy": {"dense_finetune": _evaluate(dense, data)["accuracy"], "mpoe": acc, "majority": data.majority["accuracy"]},
        "params": {"dense_model": num_parameters(dense), "mpoe_model": num_parameters(moe),
                   "plain_moe_model": num_parameters(dense) - dense_ffn + sum(r["plain_moe"] for r in layer_reports),
                   "per_layer": layer_reports[0]},
        "dev_expert_load": [(c.double() / c.sum()).tolist() for c in counts],
    }


# ---------------------------------------------------------------------------- command line
def _print_table(title: str, rows: list[tuple[str, Any]]) -> None:
    print(f"\n== {title} ==")
    width = max(len(k) for k, _ in rows)
    for key, value in rows:
        print(f"  {key:<{width}}  {value:.4f}" if isinstance(value, float) else f"  {key:<{width}}  {value}")


def _finish(args: argparse.Namespace, result: dict[str, Any], title: str, started: float) -> dict[str, Any]:
    result["time_s"] = time.perf_counter() - started
    rows = [(f"accuracy/{k}", v) for k, v in result["accuracy"].items()]
    rows += [(f"params/{k}", v) for k, v in result["params"].items() if not isinstance(v, dict)]
    rows += [(k, v) for k, v in result.items() if k in ("merge_max_abs_logit_diff", "dev_expert_load", "swaps")]
    rows.append(("time_s", result["time_s"]))
    _print_table(title, rows)
    out = Path(args.output)
    atomic_write(out, json.dumps(result, indent=2).encode())
    print(f"  written to {out}")
    return result


def model_sizes(args: argparse.Namespace) -> dict[str, int]:
    """The :class:`BertLikeClassifier` sizes of :func:`add_model_options`."""
    return dict(hidden=args.hidden, layers=args.layers, intermediate=args.intermediate)


def cmd_mpop(args: argparse.Namespace) -> dict[str, Any]:
    """MPOP: compress to a parameter budget, then fine-tune only the auxiliary tensors (bundled task)."""
    t0 = time.perf_counter()
    data = prepare_task(args.data_dir, args.task, args.max_seq_len, args.vocab_size, args.seed)
    budget = int(args.budget) if str(args.budget).isdigit() else float(args.budget)
    result = run_mpop(data, args.steps, args.aux_steps, budget, args.n, args.lr, args.seed, **model_sizes(args))
    print("\n" + _compression_table(result["compression"]))
    return _finish(args, result, "MPOP", t0)


def _compression_table(report: dict[str, Any]) -> str:
    lines = [f"{'matrix':<22}{'ranks':<18}{'dense':>8}{'params':>8}{'rel err bound':>15}"]
    for m in report["matrices"]:
        rel = m["error_bound"] / m["norm"] if m["norm"] > 0 else 0.0
        lines.append(f"{m['name']:<22}{str(m['ranks'][1:-1]):<18}{m['dense_params']:>8}{m['params']:>8}{rel:>15.3e}")
    return "\n".join(lines)


def cmd_opf(args: argparse.Namespace) -> dict[str, Any]:
    """OPF: over-parameterized fine-tuning of the most important matrices, merged back to dense (bundled task)."""
    t0 = time.perf_counter()
    data = prepare_task(args.data_dir, args.task, args.max_seq_len, args.vocab_size, args.seed)
    k = int(args.k) if str(args.k).isdigit() else float(args.k)
    result = run_opf(data, args.steps, k, args.dynamic_every or None, args.n, args.min_bond, args.lr, args.seed,
                     **model_sizes(args))
    return _finish(args, result, "OPF", t0)


def cmd_mpoe(args: argparse.Namespace) -> dict[str, Any]:
    """MPOE: FFN mixture of experts sharing MPO central tensors (bundled task)."""
    t0 = time.perf_counter()
    data = prepare_task(args.data_dir, args.task, args.max_seq_len, args.vocab_size, args.seed)
    result = run_mpoe(data, args.steps, args.experts, args.top_k, args.n, args.central_grad, args.balance_coef,
                      args.lr, args.seed, **model_sizes(args))
    return _finish(args, result, "MPOE", t0)


def add_model_options(parser: argparse.ArgumentParser) -> None:
    """``--hidden --layers --intermediate`` (:class:`BertLikeClassifier` sizes, read by :func:`model_sizes`),
    ``--max-seq-len`` and ``--seed``."""
    parser.add_argument("--hidden", type=int, default=64, help="hidden size (default %(default)s)")
    parser.add_argument("--layers", type=int, default=2, help="encoder layers (default %(default)s)")
    parser.add_argument("--intermediate", type=int, default=128, help="FFN size (default %(default)s)")
    parser.add_argument("--max-seq-len", type=int, default=64, help="tokens per sequence (default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the task split, init and training (default %(default)s)")


def add_subparsers(subparsers: Any) -> None:
    """Add the ``mpop``, ``opf`` and ``mpoe`` subcommands (each sets ``func``) to a parser."""
    def common(name: str, func: Callable, steps: int) -> argparse.ArgumentParser:
        p = subparsers.add_parser(name, help=func.__doc__.splitlines()[0], description=func.__doc__)
        p.set_defaults(func=func)
        p.add_argument("--output", default=f"results/methods/{name}.json", help="JSON result path (default %(default)s)")
        p.add_argument("--task", default="pydoc-topics", help="GLUE-format classification task (default %(default)s)")
        p.add_argument("--data-dir", help="task directory with train.tsv/dev.tsv (default for pydoc-topics: generated)")
        p.add_argument("--steps", type=int, default=steps, help="fine-tuning steps (default %(default)s)")
        p.add_argument("--lr", type=float, default=2e-3, help="AdamW learning rate (default %(default)s)")
        p.add_argument("--vocab-size", type=int, default=1000, help="WordPiece vocabulary trained on the train split (default %(default)s)")
        add_model_options(p)
        return p

    p = common("mpop", cmd_mpop, 300)
    p.add_argument("--budget", default="0.3", help="core entries of the encoder matrices: a fraction in (0, 1] of dense, or an integer count (default %(default)s)")
    p.add_argument("--aux-steps", type=int, default=150, help="auxiliary-only fine-tuning steps (default %(default)s)")
    p.add_argument("--n", type=int, default=3, help="cores per matrix (default %(default)s)")
    p = common("opf", cmd_opf, 300)
    p.add_argument("--k", default="0.5", help="matrices to over-parameterize: a fraction in (0, 1] or an integer count (default %(default)s)")
    p.add_argument("--dynamic-every", type=int, default=0, help="re-select every N steps, 0 = static (default %(default)s)")
    p.add_argument("--n", type=int, default=5, help="cores per matrix (default %(default)s)")
    p.add_argument("--min-bond", type=int, help="pad every bond to at least this (default: full ranks)")
    p = common("mpoe", cmd_mpoe, 300)
    p.add_argument("--experts", type=int, default=4, help="default %(default)s")
    p.add_argument("--top-k", type=int, default=1, help="default %(default)s")
    p.add_argument("--n", type=int, default=3, help="cores per matrix, odd (default %(default)s)")
    p.add_argument("--central-grad", choices=("inverse_frequency", "bernoulli", "none"), default="inverse_frequency",
                   help="balancing of the shared centrals' gradients (default %(default)s)")
    p.add_argument("--balance-coef", type=float, default=0.01, help="load-balancing loss weight (default %(default)s)")


def main(argv: list[str] | None = None) -> int:
    """``python examples/mpo_methods.py {mpop,opf,mpoe} ...``"""
    parser = argparse.ArgumentParser(prog="mpo_methods", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    add_subparsers(parser.add_subparsers(dest="command", required=True, metavar="command"))
    args = parser.parse_args(argv)
    try:
        args.func(args)
    except ValueError as exc:
        print(f"mpo_methods: error: {exc}")
        return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
