"""The MPOBERT training loop: optimizers, schedule, accumulation, clipping, mixed precision,
DDP, exact resume, non-finite-step handling, progress, JSONL metrics and evaluation.

Usage::

    trainer = Trainer(model, batches, TrainConfig(output_dir="runs/x", max_steps=300))
    final = trainer.train()          # dict, also written to runs/x/final_metrics.json

``model(**batch)`` must return an output with a ``loss`` (attribute or key);
``batches`` is a resumable batch source (:mod:`mpobert.data.batching`). Each
optimizer step consumes ``grad_accum`` per-rank batches on every rank, so the
global batch is ``batch_size · grad_accum · world_size``.
"""
from __future__ import annotations

import contextlib
import dataclasses
import json
import math
import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from mpo_core.accumulate import exclude_cores_from_ddp, weight_cache
from mpo_core.io import atomic_write
from mpobert.checkpoint import CHECKPOINT_NAME, load_checkpoint, rng_state, save_checkpoint, set_rng_state
from mpobert.optim import build_optimizer, warmup_linear_scheduler
from mpobert.options import option
from mpobert.progress import PROGRESS_MODES, TrainingProgress

PRECISIONS = ("fp32", "bf16", "fp16")


class BatchSource(Protocol):
    """An iterable of per-rank batches whose position can be saved and restored."""

    def __iter__(self) -> Iterator[dict[str, Any]]: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class NonFiniteLossError(RuntimeError):
    """Raised after ``max_nonfinite`` consecutive steps with a non-finite loss or gradient."""


OPTIMIZERS = ("lamb", "adamw")


@dataclass
class TrainConfig:
    """Settings of a training run; each field's help (``metadata``) documents it.

    The ``python -m mpobert`` training options are generated from these fields, so this class
    is the one list of them (:func:`mpobert.options.add_options`).
    """

    output_dir: str = option("runs/mpobert", "directory for checkpoint.pt, metrics.jsonl, final_metrics.json (and the model)")
    max_steps: int = option(100, "optimizer steps (skipped non-finite steps count: each consumes its batches)")
    optimizer: str = option("lamb", "optimizer (mpobert.optim.build_optimizer)", choices=OPTIMIZERS)
    lr: float = option(1e-3, "peak learning rate")
    weight_decay: float = option(0.01, "decoupled weight decay, not on biases and norms")
    warmup_steps: int = option(0, "linear warmup from 0, then linear decay to 0 at max_steps")
    grad_accum: int = option(1, "micro-batches per optimizer step")
    max_grad_norm: float = option(1.0, "clip the global gradient norm to this; 0 = no clipping (the norm is still logged)")
    precision: str = option("fp32", "bf16 autocast, or fp16 autocast with a GradScaler (GPU only)", choices=PRECISIONS)
    seed: int = option(0, "seed of init, data order and dropout (the dropout RNG is offset by the rank)")
    log_every: int = option(10, "steps between log records, 0 = none")
    eval_every: int = option(0, "steps between evaluations, 0 = only at the end")
    save_every: int = option(0, "steps between checkpoints, 0 = only at the end")
    max_nonfinite: int = option(5, "stop with NonFiniteLossError after this many consecutive NaN/inf steps")
    resume: bool = option(False, "continue from OUTPUT_DIR/checkpoint.pt if present")
    progress: str = option("auto", "tqdm bar (auto: on a terminal, when installed), plain lines, or none", choices=PROGRESS_MODES)
    device: str = option("auto", "'auto' (CUDA if available, else CPU), 'cpu', 'cuda:0', ...")

    def __post_init__(self) -> None:
        for name in ("max_steps", "grad_accum", "max_nonfinite"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a positive int, got {v!r}")
        for name in ("warmup_steps", "log_every", "eval_every", "save_every", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"{name} must be a non-negative int, got {v!r}")
        if self.warmup_steps > self.max_steps:
            raise ValueError(f"warmup_steps ({self.warmup_steps}) must not exceed max_steps ({self.max_steps})")
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"lr must be a positive finite float, got {self.lr!r}")
        if not self.max_grad_norm >= 0:
            raise ValueError(f"max_grad_norm must be >= 0, got {self.max_grad_norm!r}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.optimizer.lower() not in OPTIMIZERS:
            raise ValueError(f"optimizer must be one of {OPTIMIZERS}, got {self.optimizer!r}")
        if self.progress not in PROGRESS_MODES:
            raise ValueError(f"progress must be one of {PROGRESS_MODES}, got {self.progress!r}")


def setup_distributed() -> tuple[int, int, int]:
    """Join the process group of a ``torchrun`` launch (NCCL on GPU, gloo on CPU), if any.

    Returns
    -------
    rank, world_size, local_rank : int
        ``(0, 1, 0)`` outside a distributed launch. An already initialized group is used as is.
    """
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", dist.get_rank()))
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, 0
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
    dist.init_process_group(backend=backend)
    return dist.get_rank(), dist.get_world_size(), local_rank


def resolve_device(device: str, local_rank: int = 0) -> torch.device:
    """``"auto"`` → ``cuda:<local_rank>`` if CUDA is available, else CPU; otherwise ``torch.device(device)``."""
    if device == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(device)


def _loss_of(output: Any) -> torch.Tensor:
    loss = output.get("loss") if isinstance(output, dict) else getattr(output, "loss", None)
    if loss is None and not isinstance(output, dict):
        try:
            loss = output["loss"]
        except (KeyError, TypeError, IndexError):
            loss = None
    if not isinstance(loss, torch.Tensor):
        raise ValueError("the model output has no 'loss': pass labels in the batch")
    return loss


def _to_device(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


class Trainer:
    """Train ``model`` on ``batches`` with the settings of ``config``.

    Parameters
    ----------
    model : nn.Module
        ``model(**batch)`` returns an output with ``loss``. Moved to the device; wrapped in
        ``DistributedDataParallel`` when a process group with more than one rank exists.
    batches : BatchSource
        Per-rank batches; its position is checkpointed.
    config : TrainConfig
        Settings.
    eval_fn : callable, optional
        ``eval_fn(model) -> dict[str, float]`` on the unwrapped model (rank 0 only, in eval mode).
    fingerprint : dict, optional
        Extra settings that a resumed run must share (e.g. the model config, batch size);
        the optimizer settings, precision, ``max_steps`` and world size are always included.
    find_unused_parameters : bool
        Passed to ``DistributedDataParallel``: needed when a step leaves some parameters
        without gradient (e.g. the other tasks' heads in multitask training).
    on_step : callable, optional
        ``on_step(trainer)`` after every optimizer step (``trainer.step`` counts it). It may change
        the model's parameters if it keeps ``trainer.optimizer`` in step (e.g. dynamic OPF swaps
        layers and calls :func:`mpo_core.opf.sync_optimizer`); single process only.

    The data-parallel rank and world size come from :func:`setup_distributed` (the
    initialized process group, or ``torchrun``'s environment, or a single process).
    """

    def __init__(
        self, model: nn.Module, batches: BatchSource, config: TrainConfig,
        eval_fn: Callable[[nn.Module], dict[str, float]] | None = None,
        fingerprint: dict[str, Any] | None = None, find_unused_parameters: bool = False,
        on_step: Callable[[Trainer], None] | None = None,
    ) -> None:
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
        if not isinstance(config, TrainConfig):
            raise TypeError(f"config must be a TrainConfig, got {type(config).__name__}")
        for attr in ("state_dict", "load_state_dict", "__iter__"):
            if not hasattr(batches, attr):
                raise TypeError(f"batches must be a resumable batch source (missing {attr})")
        self.config = config
        self.rank, self.world_size, local_rank = setup_distributed()
        self.device = resolve_device(config.device, local_rank)
        if config.precision == "fp16" and self.device.type == "cpu":
            raise ValueError("precision='fp16' needs a CUDA device (use 'bf16' on CPU)")
        self.model = model.to(self.device)
        self.batches = batches
        self.eval_fn = eval_fn
        self.on_step = on_step
        self.output_dir = Path(config.output_dir)
        self.fingerprint = {
            **(fingerprint or {}),
            **{k: getattr(config, k) for k in ("optimizer", "lr", "weight_decay", "warmup_steps", "grad_accum",
                                              "max_grad_norm", "precision", "seed", "max_steps")},
            "world_size": self.world_size,
        }
        self.ddp = None
        if self.world_size > 1:
            ids = [self.device.index] if self.device.type == "cuda" else None
            exclude_cores_from_ddp(self.model)  # their gradients come from weight_cache, all-reduced there
            self.ddp = nn.parallel.DistributedDataParallel(self.model, device_ids=ids,
                                                           find_unused_parameters=find_unused_parameters)
        self.optimizer = build_optimizer(self.model, config.optimizer, config.lr, config.weight_decay)
        self.scheduler = warmup_linear_scheduler(self.optimizer, config.warmup_steps, config.max_steps)
        self.scaler = torch.amp.GradScaler(self.device.type) if config.precision == "fp16" else None
        self.step = 0
        self.counters = {"skipped_steps": 0, "consecutive_nonfinite": 0, "scaler_skipped_steps": 0, "tokens": 0}
        self.is_main = self.rank == 0

    # ------------------------------------------------------------------ checkpoints
    @property
    def checkpoint_path(self) -> Path:
        return self.output_dir / CHECKPOINT_NAME

    def save(self) -> Path | None:
        """Write the checkpoint (collective under DDP: every rank must call it). Returns its path on rank 0."""
        rng = [rng_state()]
        if self.world_size > 1:
            rng = [None] * self.world_size
            dist.all_gather_object(rng, rng_state())
        path = None
        if self.is_main:
            path = save_checkpoint(self.checkpoint_path, {
                "step": self.step, "model": self.model.state_dict(), "optimizer": self.optimizer.state_dict(),
                "scheduler": self.scheduler.state_dict(), "scaler": None if self.scaler is None else self.scaler.state_dict(),
                "rng": rng, "data": self.batches.state_dict(), "counters": dict(self.counters),
                "fingerprint": self.fingerprint,
            })
        if self.world_size > 1:
            dist.barrier()
        return path

    def load(self, path: str | os.PathLike | None = None) -> None:
        """Restore every state from a checkpoint (default: ``output_dir/checkpoint.pt``).

        Raises ``ValueError`` if it is corrupt or was written by a different run.
        """
        ckpt = load_checkpoint(path or self.checkpoint_path, self.fingerprint)
        try:
            self.model.load_state_dict(ckpt["model"])
            self.optimizer.load_state_dict(ckpt["optimizer"])
            self.scheduler.load_state_dict(ckpt["scheduler"])
            if self.scaler is not None:
                self.scaler.load_state_dict(ckpt["scaler"])
            self.batches.load_state_dict(ckpt["data"])
        except (RuntimeError, KeyError) as exc:
            raise ValueError(f"checkpoint does not match this model/optimizer: {exc}") from exc
        if len(ckpt["rng"]) != self.world_size:
            raise ValueError(f"checkpoint holds RNG states of {len(ckpt['rng'])} ranks, this run has {self.world_size}")
        set_rng_state(ckpt["rng"][self.rank])
        self.step = int(ckpt["step"])
        self.counters = dict(ckpt["counters"])

    # ------------------------------------------------------------------ logging
    def _log(self, record: dict[str, Any]) -> None:
        if self.is_main:
            with open(self.output_dir / "metrics.jsonl", "a", encoding="utf-8") as f:
                f.write(json.dumps(record) + "\n")

    def _truncate_log(self) -> None:
        """On resume, drop log records of steps after the checkpoint (they will be redone)."""
        path = self.output_dir / "metrics.jsonl"
        if not self.is_main or not path.exists():
            return
        keep = [ln for ln in path.read_text(encoding="utf-8").splitlines() if ln.strip() and json.loads(ln).get("step", 0) <= self.step]
        atomic_write(path, "".join(ln + "\n" for ln in keep).encode("utf-8"))

    def evaluate(self) -> dict[str, float]:
        """Run ``eval_fn`` on rank 0 (others wait); returns its metrics (empty without ``eval_fn``)."""
        metrics: dict[str, float] = {}
        if self.eval_fn is not None and self.is_main:
            was_training = self.model.training
            self.model.eval()
            with torch.no_grad(), self._autocast():
                metrics = {k: float(v) for k, v in self.eval_fn(self.model).items()}
            self.model.train(was_training)
            self._log({"step": self.step, "eval": metrics})
        if self.world_size > 1:
            dist.barrier()
        return metrics

    def _amp_dtype(self) -> torch.dtype | None:
        """The autocast dtype of the micro-batches (``None`` in fp32)."""
        return {"fp32": None, "bf16": torch.bfloat16}.get(self.config.precision, torch.float16)

    def _autocast(self) -> contextlib.AbstractContextManager:
        dtype = self._amp_dtype()
        return contextlib.nullcontext() if dtype is None else torch.autocast(self.device.type, dtype=dtype)

    # ------------------------------------------------------------------ the loop
    def _train_step(self, it: Iterator[dict[str, Any]]) -> dict[str, float]:
        cfg = self.config
        net = self.ddp if self.ddp is not None else self.model
        loss_sum = torch.zeros((), device=self.device)
        tokens = 0
        # each MPO weight is rebuilt once for the grad_accum micro-batches; the cores get their
        # gradient when the context ends (before unscaling and clipping), all-reduced under DDP.
        # One micro-batch in one process needs no cache: MPOBERT's encoder builds every W once in its
        # forward (forward_weights), measured 2-4% faster per step than weight_cache at k=1, and under
        # autocast in its dtype (benchmarks/train_step.py)
        cached = cfg.grad_accum > 1 or self.ddp is not None
        cache = weight_cache(self.model, process_group=True if self.ddp is not None else None,
                             dtype=self._amp_dtype()) if cached else contextlib.nullcontext()
        with cache:
            for micro in range(cfg.grad_accum):
                try:
                    batch = next(it)
                except StopIteration:
                    raise ValueError(f"the batch source ran out at step {self.step} (before max_steps={cfg.max_steps})") from None
                mask = batch.get("attention_mask")
                tokens += int(mask.sum()) if isinstance(mask, torch.Tensor) else int(batch["input_ids"].numel())
                batch = _to_device(batch, self.device)
                sync = self.ddp is None or micro == cfg.grad_accum - 1
                with (contextlib.nullcontext() if sync else self.ddp.no_sync()), self._autocast():
                    loss = _loss_of(net(**batch)).float() / cfg.grad_accum
                (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
                loss_sum += loss.detach()
        if self.world_size > 1:
            dist.all_reduce(loss_sum)
            loss_sum /= self.world_size
            t = torch.tensor([tokens], device=self.device)
            dist.all_reduce(t)
            tokens = int(t.item())
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = cfg.max_grad_norm if cfg.max_grad_norm > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm) if params else torch.zeros(())
        loss_val, norm_val = float(loss_sum), float(grad_norm)
        lr = self.optimizer.param_groups[0]["lr"]
        # With a GradScaler, inf/NaN gradients are its business (it skips the step and lowers
        # the scale); a non-finite loss is not.
        nonfinite = not math.isfinite(loss_val) or (self.scaler is None and not math.isfinite(norm_val))
        if nonfinite:
            self.optimizer.zero_grad(set_to_none=True)
            if self.scaler is not None:
                self.scaler.update()
            self.counters["skipped_steps"] += 1
            self.counters["consecutive_nonfinite"] += 1
        else:
            self.counters["consecutive_nonfinite"] = 0
            if self.scaler is not None:
                scale = self.scaler.get_scale()
                self.scaler.step(self.optimizer)
                self.scaler.update()
                if self.scaler.get_scale() < scale:
                    self.counters["scaler_skipped_steps"] += 1
            else:
                self.optimizer.step()
            self.scheduler.step()
            self.optimizer.zero_grad(set_to_none=True)
        self.step += 1
        self.counters["tokens"] += tokens
        return {"loss": loss_val, "grad_norm": norm_val, "lr": lr, "tokens": tokens, "skipped": int(nonfinite)}

    def train(self, extra_metrics: dict[str, Any] | None = None) -> dict[str, Any]:
        """Run until ``max_steps``; returns the final metrics, also written to ``final_metrics.json``.

        The metrics hold the step count, time, throughput, first/last losses, a
        :func:`loss_curve_summary` of ``metrics.jsonl``, the end-of-run evaluation and the
        config; ``extra_metrics`` (e.g. a baseline) are added to them.

        Raises
        ------
        NonFiniteLossError
            After ``max_nonfinite`` consecutive steps with a non-finite loss or gradient
            (the last good state stays in the previous checkpoint).
        """
        cfg = self.config
        self.output_dir.mkdir(parents=True, exist_ok=True)
        resumed_from = None
        if cfg.resume and self.checkpoint_path.exists():
            self.load()
            resumed_from = self.step
            self._truncate_log()
        else:
            torch.manual_seed(cfg.seed + self.rank)
            if self.is_main and (self.output_dir / "metrics.jsonl").exists():
                (self.output_dir / "metrics.jsonl").unlink()
        self.model.train()
        progress = TrainingProgress(cfg.progress, cfg.max_steps, self.step, self.is_main, cfg.log_every)
        it = iter(self.batches)
        start = time.perf_counter()
        start_step, start_tokens = self.step, self.counters["tokens"]
        window_loss, window_n, window_tokens, window_t0 = 0.0, 0, 0, start
        eval_metrics: dict[str, float] = {}
        loss_history: list[float] = []
        try:
            while self.step < cfg.max_steps:
                stats = self._train_step(it)
                if self.on_step is not None:
                    self.on_step(self)
                if stats["skipped"]:
                    if self.counters["consecutive_nonfinite"] >= cfg.max_nonfinite:
                        raise NonFiniteLossError(
                            f"{self.counters['consecutive_nonfinite']} consecutive steps with a non-finite loss or gradient "
                            f"(last: step {self.step}, loss {stats['loss']}, grad norm {stats['grad_norm']}); "
                            f"stopping. Lower the learning rate, use bf16/fp32 instead of fp16, or check the data."
                        )
                    self._log({"step": self.step, "skipped_nonfinite": True, "loss": str(stats["loss"]),
                               "grad_norm": str(stats["grad_norm"])})
                else:
                    window_loss += stats["loss"]
                    window_n += 1
                    loss_history.append(stats["loss"])
                window_tokens += stats["tokens"]
                now = time.perf_counter()
                done = self.step - start_step
                eta = (now - start) / done * (cfg.max_steps - self.step)
                tps = window_tokens / max(now - window_t0, 1e-9)
                progress.update(self.step, cfg.max_steps, {"loss": stats["loss"], "lr": stats["lr"], "tokens_per_s": tps, "eta_s": eta})
                if cfg.log_every and self.step % cfg.log_every == 0 and window_n:
                    self._log({"step": self.step, "loss": window_loss / window_n, "lr": stats["lr"],
                               "grad_norm": stats["grad_norm"], "tokens_per_s": tps, "elapsed_s": now - start,
                               "skipped_steps": self.counters["skipped_steps"]})
                    window_loss, window_n, window_tokens, window_t0 = 0.0, 0, 0, now
                if cfg.eval_every and self.step % cfg.eval_every == 0 and self.step < cfg.max_steps:
                    self.evaluate()
                if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.max_steps:
                    self.save()
        finally:
            progress.close()
        elapsed = time.perf_counter() - start
        self.save()
        eval_metrics = self.evaluate()
        final = {
            "steps": self.step, "resumed_from": resumed_from, "train_time_s": elapsed,
            "tokens_per_s": (self.counters["tokens"] - start_tokens) / max(elapsed, 1e-9),
            "loss_first": loss_history[0] if loss_history else None,
            "loss_last": loss_history[-1] if loss_history else None,
            "loss_last10_mean": sum(loss_history[-10:]) / len(loss_history[-10:]) if loss_history else None,
            "skipped_steps": self.counters["skipped_steps"],
            "scaler_skipped_steps": self.counters["scaler_skipped_steps"],
            "eval": eval_metrics, "config": dataclasses.asdict(cfg), "world_size": self.world_size,
            "loss_curve": loss_curve_summary(self.output_dir / "metrics.jsonl"), **(extra_metrics or {}),
        }
        if self.is_main:
            atomic_write(self.output_dir / "final_metrics.json", json.dumps(final, indent=2).encode("utf-8"))
        return final


def read_metrics(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Records of a ``metrics.jsonl`` log, in order."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def loss_curve_summary(metrics_path: str | os.PathLike, points: int = 5) -> list[tuple[int, float]]:
    """``points`` evenly spaced ``(step, loss)`` records of a ``metrics.jsonl`` log (first and last included)."""
    if not os.path.exists(metrics_path):
        return []
    recs = [r for r in read_metrics(metrics_path) if "loss" in r and isinstance(r["loss"], float)]
    if not recs:
        return []
    idx = sorted({round(i * (len(recs) - 1) / max(points - 1, 1)) for i in range(points)})
    return [(recs[i]["step"], recs[i]["loss"]) for i in idx]
