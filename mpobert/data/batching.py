"""Resumable batch sources for training, sharded across data-parallel ranks.

A batch source is an iterable of per-rank batches (dicts of tensors) with
``state_dict()``/``load_state_dict()``. Every rank walks the same global order
and keeps its own slice of each global batch (``world_size · batch_size``
items), so the union over ranks of one step's batches is exactly the batch a
single process with the same global batch size would see, and the position is
the same on every rank.
"""
from __future__ import annotations

import random
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch

from mpobert.data.pretraining import PretrainingStream, pad_collate


def _check_shard(batch_size: int, rank: int, world_size: int) -> None:
    if not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
    if not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size must be a positive int, got {world_size!r}")
    if not isinstance(rank, int) or not 0 <= rank < world_size:
        raise ValueError(f"rank must be an int in [0, {world_size}), got {rank!r}")


class StreamBatches:
    """Per-rank batches from a resumable stream of instances (:class:`PretrainingStream`,
    :class:`mpobert.data.text.TextStream`), collated by :func:`pad_collate`.

    Parameters
    ----------
    stream : PretrainingStream or TextStream
        The instance stream: iterable, with ``state_dict``/``load_state_dict`` (its position is
        this source's state).
    batch_size : int
        Per-rank batch size.
    rank, world_size : int
        This process's data-parallel rank and the number of ranks.
    pad_id : int
        Padding id for ``input_ids``.
    """

    def __init__(self, stream: PretrainingStream, batch_size: int, rank: int = 0, world_size: int = 1, pad_id: int = 0) -> None:
        if not all(hasattr(stream, a) for a in ("__iter__", "state_dict", "load_state_dict")):
            raise TypeError(f"stream must be a resumable instance stream (PretrainingStream, TextStream), "
                            f"got {type(stream).__name__}")
        _check_shard(batch_size, rank, world_size)
        self.stream, self.batch_size, self.rank, self.world_size, self.pad_id = stream, batch_size, rank, world_size, pad_id

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        it = iter(self.stream)
        global_batch = self.batch_size * self.world_size
        while True:
            items = []
            for item in it:
                items.append(item)
                if len(items) == global_batch:
                    break
            if len(items) < global_batch:
                return  # a non-looping stream ran out: the partial global batch is dropped
            lo = self.rank * self.batch_size
            yield pad_collate(items[lo : lo + self.batch_size], self.pad_id)

    def state_dict(self) -> dict[str, Any]:
        """The stream position after the last batch handed out."""
        return {"stream": self.stream.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue after the batch whose :meth:`state_dict` this was."""
        if "stream" not in state:
            raise ValueError(f"batch-source state lacks 'stream': {sorted(state)}")
        self.stream.load_state_dict(dict(state["stream"]))


class ExampleBatches:
    """Per-rank batches of encoded examples, reshuffled each epoch (seeded), resumable.

    Each epoch is a permutation of the examples drawn from ``random.Random(f"{seed}:{epoch}")``
    (identity order when ``shuffle=False``), cut into global batches; the last
    incomplete global batch of an epoch is dropped so that every rank always gets
    ``batch_size`` items.

    Parameters
    ----------
    features : sequence of dict
        Encoded examples (``input_ids``, ``token_type_ids``, ``labels``).
    batch_size : int
        Per-rank batch size.
    rank, world_size : int
        Data-parallel rank and number of ranks.
    seed : int
        Shuffling seed.
    shuffle : bool
        Shuffle each epoch.
    pad_id : int
        Padding id for ``input_ids``.
    """

    def __init__(
        self, features: Sequence[dict[str, Any]], batch_size: int, rank: int = 0, world_size: int = 1,
        seed: int = 0, shuffle: bool = True, pad_id: int = 0,
    ) -> None:
        _check_shard(batch_size, rank, world_size)
        if len(features) < batch_size * world_size:
            raise ValueError(
                f"{len(features)} examples cannot fill one global batch of {batch_size} x {world_size} ranks"
            )
        self.features, self.batch_size, self.rank, self.world_size = features, batch_size, rank, world_size
        self.seed, self.shuffle, self.pad_id = seed, shuffle, pad_id
        self.steps_per_epoch = len(features) // (batch_size * world_size)
        self._pos = {"epoch": 0, "step": 0}

    def _order(self, epoch: int) -> list[int]:
        order = list(range(len(self.features)))
        if self.shuffle:
            random.Random(f"{self.seed}:{epoch}").shuffle(order)
        return order

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        gb = self.batch_size * self.world_size
        while True:
            epoch, step = self._pos["epoch"], self._pos["step"]
            order = self._order(epoch)
            for s in range(step, self.steps_per_epoch):
                lo = s * gb + self.rank * self.batch_size
                self._pos = {"epoch": epoch, "step": s + 1}
                yield pad_collate([self.features[i] for i in order[lo : lo + self.batch_size]], self.pad_id)
            self._pos = {"epoch": epoch + 1, "step": 0}

    def state_dict(self) -> dict[str, int]:
        """Epoch and step within it after the last batch handed out."""
        return dict(self._pos)

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue after the batch whose :meth:`state_dict` this was."""
        if set(state) != {"epoch", "step"} or not 0 <= int(state["step"]) <= self.steps_per_epoch:
            raise ValueError(f"example-batch state must be {{'epoch', 'step' <= {self.steps_per_epoch}}}, got {dict(state)!r}")
        self._pos = {"epoch": int(state["epoch"]), "step": int(state["step"])}


class MultiTaskBatches:
    """Mix batches of several tasks: each step draws a task, then that task's next batch.

    Task ``t`` is drawn with probability proportional to ``n_t ** alpha`` (``n_t``
    its number of examples; ``alpha=1`` proportional, ``alpha=0`` uniform) from
    ``random.Random(f"{seed}:{step}")``, so every rank draws the same task and a
    resumed run the same sequence. Batches carry a ``"task"`` entry (the name).

    Parameters
    ----------
    sources : mapping of str to ExampleBatches
        One batch source per task.
    alpha : float
        Sampling temperature exponent, in [0, 1].
    seed : int
        Seed of the task draws.
    """

    def __init__(self, sources: Mapping[str, ExampleBatches], alpha: float = 0.5, seed: int = 0) -> None:
        if not sources:
            raise ValueError("sources must hold at least one task")
        for name, src in sources.items():
            if not isinstance(src, ExampleBatches):
                raise TypeError(f"sources[{name!r}] must be ExampleBatches, got {type(src).__name__}")
        if not 0.0 <= alpha <= 1.0:
            raise ValueError(f"alpha must be in [0, 1], got {alpha!r}")
        self.sources = dict(sources)
        self.names = list(self.sources)
        self.weights = [len(s.features) ** alpha for s in self.sources.values()]
        self.seed = seed
        self._step = 0

    def __iter__(self) -> Iterator[dict[str, Any]]:
        iters = {name: iter(src) for name, src in self.sources.items()}
        while True:
            name = random.Random(f"{self.seed}:{self._step}").choices(self.names, self.weights)[0]
            self._step += 1
            batch: dict[str, Any] = next(iters[name])
            batch["task"] = name
            yield batch

    def state_dict(self) -> dict[str, Any]:
        """Step count and every task's own position."""
        return {"step": self._step, "tasks": {n: s.state_dict() for n, s in self.sources.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Continue after the batch whose :meth:`state_dict` this was."""
        if set(state) != {"step", "tasks"} or set(state["tasks"]) != set(self.sources):
            raise ValueError(f"multitask state must hold 'step' and positions of tasks {self.names}")
        self._step = int(state["step"])
        for name, st in state["tasks"].items():
            self.sources[name].load_state_dict(st)
