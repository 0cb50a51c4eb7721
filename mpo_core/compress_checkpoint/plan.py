"""What a checkpoint compression does, decided before any matrix is read: its settings, the units of
work (one per matrix, one per input shard's untouched tensors), their estimated cost and split
across ranks, and the files that make a run resumable (the manifest and the ledger).

Output folder of a run::

    compress_checkpoint.json      the manifest: settings + the SHA-256 of every input shard
    .ledger/<file>.json           one record per finished unit (its file's SHA-256, the matrix's layout)
    mpo-00001-of-00028.safetensors  one matrix's cores, ``<module>.cores.<k>``
    dense-00001-of-00002.safetensors  an input shard's untouched tensors, byte for byte
    model.safetensors.index.json, mpo_layout.json, config.json ...   written last, by rank 0

A unit is done when its ledger record exists and its file has the recorded SHA-256; the file is
written atomically first, the record second, so a kill at any moment loses at most the units in
flight, which a rerun recomputes to the same bytes.
"""
from __future__ import annotations

import fcntl
import json
import os
import re
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from mpo_core.compress_checkpoint.files import TORCH_DTYPES, TensorEntry, file_sha256
from mpo_core.family import DEFAULT_CORES
from mpo_core.io import atomic_write
from mpo_core.nn import name_matcher
from mpo_core.shapes import capped_ranks, check_int, core_params, resolve_shapes

__all__ = ["Settings", "Unit", "MANIFEST_NAME", "LEDGER_DIR", "LAYOUT_NAME", "OUT_DTYPES", "natural_key",
           "plan_units", "auto_budget", "matrix_shapes", "assign", "manifest", "check_linear_layout", "lock_output", "prepare_output", "done_units", "read_record",
           "write_record"]

MANIFEST_NAME = "compress_checkpoint.json"
LEDGER_DIR = ".ledger"
LAYOUT_NAME = "mpo_layout.json"
FORMAT, VERSION = "mpo_core.compress_checkpoint", 1
OUT_DTYPES = {"input": None, "float64": torch.float64, "float32": torch.float32, "float16": torch.float16,
              "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Settings:
    """Settings of a checkpoint compression; every one of them is in the manifest and must match on resume.

    Parameters
    ----------
    n : int or "auto", default 2
        Cores per matrix: 2 is the truncated SVD (``in_shape=(I, 1)``, ``out_shape=(1, J)``), which beat
        MPO n=3..5 on pretrained BERT matrices (README, "Where MPO wins"); ``n >= 3`` uses the balanced
        :func:`~mpo_core.shapes.factorize` shapes. ``"auto"``: per matrix, the member of the family
        (``cores``) that ``mpo_core.compress(n="auto")`` would choose for that matrix alone, under its own
        limit (:func:`auto_budget`): with ``rel_tol``, the member with the fewest entries meeting it
        (:func:`~mpo_core.family.member_at_tolerance`); with ``budget`` and/or ``max_bond``, the smallest
        error within an entry budget (:func:`~mpo_core.family.member_for_budget`).
    max_bond, rel_tol : optional
        As in :func:`mpo_core.decompose`, per matrix. With ``n="auto"``: ``rel_tol`` alone, or ``max_bond``
        as an entry budget (``max_bond * (rows + cols)``, the rank-``max_bond`` SVD's entries).
    budget : float, optional
        Fraction of each matrix's entries its cores may hold: the largest uniform bond that fits
        (combined with ``max_bond`` by the smaller). Per matrix, since matrices are streamed one at a time.
    cores : tuple of int
        The numbers of cores ``n="auto"`` considers (2 = truncated SVD).
    include, exclude : tuple of str
        Which 2-D tensors are decomposed: a name matching an ``include`` pattern and no ``exclude``
        one (equal, ending in ``"." + pattern``, or a glob). Names must end in ``.weight`` (an
        ``nn.Linear``'s ``(out, in)`` weight); everything else is copied through untouched.
    dtype : {"input", "float64", "float32", "float16", "bfloat16"}
        Dtype of the cores written ("input": the matrix's own).
    device : str
        Where ``decompose`` runs (``"cuda"``: each rank on ``cuda:LOCAL_RANK``).
    threads : int, default 1
        torch threads per process; the output is bitwise reproducible for one thread count.
    seed : int
        ``decompose``'s sketch seed.
    """

    n: int | str = 2
    max_bond: int | None = None
    rel_tol: float | None = None
    budget: float | None = None
    include: tuple[str, ...] = ("*.weight",)
    exclude: tuple[str, ...] = ("*embed*", "*lm_head*")
    dtype: str = "input"
    device: str = "cpu"
    threads: int = 1
    seed: int = 0
    method: str = field(default="auto")
    cores: tuple[int, ...] = DEFAULT_CORES

    def __post_init__(self) -> None:
        if isinstance(self.n, str):
            if self.n != "auto":
                raise ValueError(f"n must be an int >= 2 or 'auto', got {self.n!r}")
            if self.rel_tol is not None and (self.budget is not None or self.max_bond is not None):
                raise ValueError("n='auto' takes rel_tol alone, or budget and/or max_bond (an entry budget per "
                                 f"matrix), not both: got rel_tol={self.rel_tol}, budget={self.budget}, "
                                 f"max_bond={self.max_bond}")
        else:
            check_int("n", self.n, 2)
        object.__setattr__(self, "cores", tuple(check_int("cores", c, 2) for c in self.cores))
        if not self.cores:
            raise ValueError("cores must name at least one number of cores (2 = truncated SVD)")
        check_int("threads", self.threads, 1)
        check_int("seed", self.seed, 0)
        if self.max_bond is not None:
            check_int("max_bond", self.max_bond, 1)
        if self.rel_tol is not None and not 0 <= self.rel_tol < 1:
            raise ValueError(f"rel_tol must be in [0, 1), got {self.rel_tol}")
        if self.budget is not None and not 0 < self.budget <= 1:
            raise ValueError(f"budget must be in (0, 1] (a fraction of each matrix's entries), got {self.budget}")
        if self.max_bond is None and self.rel_tol is None and self.budget is None:
            raise ValueError("give max_bond, rel_tol or budget: an untruncated decomposition is larger than the matrix")
        if self.dtype not in OUT_DTYPES:
            raise ValueError(f"dtype must be one of {list(OUT_DTYPES)}, got {self.dtype!r}")
        torch.device(self.device)  # a malformed device is torch's own error
        object.__setattr__(self, "include", tuple(self.include))
        object.__setattr__(self, "exclude", tuple(self.exclude))


@dataclass(frozen=True)
class Unit:
    """One output file: a matrix's cores (``kind="matrix"``) or an input shard's untouched tensors (``"copy"``)."""

    file: str
    kind: str
    entries: tuple[TensorEntry, ...]
    cost: float  # estimated seconds on one core: to order the work and split it across ranks

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries)


def natural_key(name: str) -> list:
    """``layers.2`` before ``layers.10``."""
    return [int(t) if t.isdigit() else t for t in re.split(r"(\d+)", name)]


def auto_budget(settings: Settings, rows: int, cols: int) -> int | None:
    """The entry budget of an ``rows x cols`` matrix under ``n="auto"`` (``None``: ``rel_tol`` decides):
    ``budget * rows * cols`` and ``max_bond * (rows + cols)``, the smaller of those given, at least
    ``rows + cols`` (the rank-1 SVD, as a fixed ``n`` keeps at least bond 1) and below ``rows * cols``
    (the checkpoint stores every chosen matrix as cores, so dense must not fit)."""
    if settings.n != "auto":
        raise ValueError(f"auto_budget is for n='auto', got n={settings.n!r}")
    limits = [int(settings.budget * rows * cols)] if settings.budget is not None else []
    if settings.max_bond is not None:
        limits.append(settings.max_bond * (rows + cols))
    if not limits:
        return None
    return max(rows + cols, min(rows * cols - 1, *limits))


def matrix_shapes(settings: Settings, rows: int, cols: int) -> tuple[tuple[int, ...], tuple[int, ...], int | None]:
    """``(in_shape, out_shape, bond cap)`` of an ``rows x cols`` matrix (``in x out``) under a fixed ``n``."""
    if settings.n == "auto":
        raise ValueError("n='auto' chooses the shapes per matrix (mpo_core.family), not matrix_shapes")
    if settings.n == 2:
        in_shape, out_shape = (rows, 1), (1, cols)
    else:
        in_shape, out_shape = resolve_shapes(rows, cols, None, None, settings.n)
    cap = settings.max_bond
    if settings.budget is not None:
        allowed = settings.budget * rows * cols
        low, high = 1, max(capped_ranks(in_shape, out_shape))
        while low < high:  # the largest uniform bond whose cores fit the budget (at least 1)
            mid = (low + high + 1) // 2
            if core_params(in_shape, out_shape, capped_ranks(in_shape, out_shape, mid)) <= allowed:
                low = mid
            else:
                high = mid - 1
        cap = low if cap is None else min(cap, low)
    return in_shape, out_shape, cap


# transformers families whose linear layers are GPT-2's Conv1D, with (in, out) weights
CONV1D_FAMILIES = ("gpt2", "openai-gpt", "imagegpt", "decision_transformer")


def check_linear_layout(in_dir: str) -> None:
    """``ValueError`` for a checkpoint whose ``config.json`` names a family of ``Conv1D`` layers: their
    ``(in, out)`` weights would be read as ``nn.Linear``'s ``(out, in)`` (not supported yet)."""
    path = os.path.join(in_dir, "config.json")
    if not os.path.isfile(path):
        return
    try:
        with open(path) as fh:
            model_type = json.load(fh).get("model_type")
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError) as exc:
        raise ValueError(f"{path} is not a transformers config ({exc!r})") from None
    if model_type in CONV1D_FAMILIES:
        raise ValueError(f"{path}: model_type {model_type!r} stores its linear layers as GPT-2's Conv1D ((in, out) "
                         f"weights); compress_checkpoint reads nn.Linear's (out, in) only: use mpo_core.compress on the model")


def plan_units(tensors: list[TensorEntry], settings: Settings) -> list[Unit]:
    """The units of work in output order: every chosen matrix, then each input shard's untouched tensors.

    Raises ``ValueError`` for an ``include`` pattern that matches no 2-D tensor, a chosen tensor
    whose name does not end in ``.weight`` or whose dtype cannot be decomposed.
    """
    include, exclude = name_matcher(list(settings.include)), name_matcher(list(settings.exclude), "exclude")
    matrices = [t for t in tensors if len(t.shape) == 2]
    for pattern in settings.include:
        if not any(name_matcher([pattern])(t.name, None) for t in matrices):
            some = ", ".join(t.name for t in matrices[:5])
            raise ValueError(f"include pattern {pattern!r} matches no 2-D tensor of the checkpoint (some: {some})")
    chosen = sorted((t for t in matrices if include(t.name, None) and not exclude(t.name, None)),
                    key=lambda t: natural_key(t.name))
    if not chosen:
        raise ValueError(f"no 2-D tensor is chosen by include={list(settings.include)} and "
                         f"exclude={list(settings.exclude)}")
    for t in chosen:
        if not t.name.endswith(".weight"):
            raise ValueError(f"tensor {t.name!r} is chosen but is not a linear layer's weight (its name must end in .weight)")
        if t.dtype not in TORCH_DTYPES:
            raise ValueError(f"tensor {t.name!r} in {t.path} has dtype {t.dtype}, which decompose cannot handle "
                             f"(F64, F32, F16, BF16); leave it out with --exclude")
    units = []
    for k, t in enumerate(chosen):
        rows, cols = t.shape[1], t.shape[0]
        flops = 2.0 * rows * cols * min(rows, cols)
        units.append(Unit(f"mpo-{k + 1:05d}-of-{len(chosen):05d}.safetensors", "matrix", (t,), flops / 1e10))
    taken = {t.name for t in chosen}
    by_shard: dict[str, list[TensorEntry]] = {}
    for t in tensors:
        if t.name not in taken:
            by_shard.setdefault(os.path.basename(t.path), []).append(t)
    for k, shard in enumerate(sorted(by_shard, key=natural_key)):
        entries = tuple(by_shard[shard])
        units.append(Unit(f"dense-{k + 1:05d}-of-{len(by_shard):05d}.safetensors", "copy", entries,
                          sum(e.nbytes for e in entries) / 1e9))
    return units


def assign(units: list[Unit], world: int) -> list[list[Unit]]:
    """Units per rank: largest estimated cost first, each to the least loaded rank (deterministic)."""
    loads, out = [0.0] * world, [[] for _ in range(world)]
    for unit in sorted(units, key=lambda u: (-u.cost, u.file)):
        rank = min(range(world), key=lambda r: (loads[r], r))
        loads[rank] += unit.cost
        out[rank].append(unit)
    return out


def manifest(settings: Settings, fingerprints: dict[str, str]) -> dict[str, Any]:
    settings_dict = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(settings).items()}
    return {"format": FORMAT, "version": VERSION, "settings": settings_dict, "input_shards": fingerprints}


def _differences(there: dict, here: dict) -> list[str]:
    out = []
    for key in sorted(set(there.get("settings", {})) | set(here["settings"])):
        a, b = there.get("settings", {}).get(key, "(absent)"), here["settings"].get(key, "(absent)")
        if a != b:
            out.append(f"setting {key}: {a!r} there, {b!r} now")
    shards_there, shards_here = there.get("input_shards", {}), here["input_shards"]
    for shard in sorted(set(shards_there) | set(shards_here)):
        if shard not in shards_here:
            out.append(f"input shard {shard} was there, is not in the input now")
        elif shard not in shards_there:
            out.append(f"input shard {shard} is new in the input")
        elif shards_there[shard] != shards_here[shard]:
            out.append(f"input shard {shard} has changed (its SHA-256)")
    if there.get("format") != here["format"] or there.get("version") != here["version"]:
        out.append(f"format {there.get('format')!r} v{there.get('version')!r} there, {here['format']!r} v{here['version']} now")
    return out


def lock_output(out_dir: str) -> int:
    """Create ``out_dir`` if needed and hold an exclusive ``flock`` on it (the descriptor; closed by the
    caller, or with the process, even after ``kill -9``). ``ValueError`` when another process holds it:
    two runs never write one folder (a killed ``torchrun``'s workers may live on)."""
    if os.path.exists(out_dir) and not os.path.isdir(out_dir):
        raise ValueError(f"{out_dir} exists and is not a folder: nothing was written")
    os.makedirs(out_dir, exist_ok=True)
    fd = os.open(out_dir, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise ValueError(f"another compress_checkpoint is running in {out_dir} (it holds the folder's lock): "
                         f"wait for it or end it first") from None
    return fd


def prepare_output(out_dir: str, wanted: dict[str, Any]) -> bool:
    """Create ``out_dir`` with its manifest, or check the manifest of the run it holds (True: a resume).

    Raises ``ValueError`` (writing nothing) when ``out_dir`` holds another run (the message lists
    every setting and input shard that differs) or files that are not a run's.
    """
    path = os.path.join(out_dir, MANIFEST_NAME)
    if os.path.isfile(path):
        try:
            with open(path) as fh:
                there = json.load(fh)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise ValueError(f"{path} is corrupt ({exc}): not resuming into {out_dir}") from None
        diffs = _differences(there if isinstance(there, dict) else {}, wanted)
        if diffs:
            raise ValueError(f"{out_dir} holds another run ({MANIFEST_NAME}); nothing was written. What differs: "
                             + "; ".join(diffs))
        for folder in (out_dir, os.path.join(out_dir, LEDGER_DIR)):  # atomic_write's leftovers of a killed run
            if os.path.isdir(folder):
                for name in os.listdir(folder):
                    if name.startswith(".") and name.endswith(".tmp"):
                        os.unlink(os.path.join(folder, name))
        return True
    # a run killed while writing its manifest leaves only atomic_write's temporary file of it
    leftovers = [n for n in os.listdir(out_dir) if n.startswith(f".{MANIFEST_NAME}.") and n.endswith(".tmp")] \
        if os.path.isdir(out_dir) else []
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or len(os.listdir(out_dir)) > len(leftovers)):
        raise ValueError(f"{out_dir} exists and holds no {MANIFEST_NAME}: not a compress_checkpoint run, "
                         f"nothing was written (give an empty or new folder)")
    for name in leftovers:
        os.unlink(os.path.join(out_dir, name))
    atomic_write(path, (json.dumps(wanted, indent=2, sort_keys=True) + "\n").encode())  # the manifest first
    os.makedirs(os.path.join(out_dir, LEDGER_DIR), exist_ok=True)
    return False


def read_record(out_dir: str, file: str) -> dict[str, Any] | None:
    path = os.path.join(out_dir, LEDGER_DIR, file + ".json")
    try:
        with open(path) as fh:
            return json.load(fh)
    except (FileNotFoundError, json.JSONDecodeError):
        return None


def write_record(out_dir: str, record: dict[str, Any]) -> None:
    path = os.path.join(out_dir, LEDGER_DIR, record["file"] + ".json")
    atomic_write(path, (json.dumps(record, indent=2, sort_keys=True) + "\n").encode())


def done_units(out_dir: str, units: list[Unit]) -> set[str]:
    """The units whose ledger record exists and whose file has the recorded size and SHA-256."""
    done = set()
    for unit in units:
        record = read_record(out_dir, unit.file)
        path = os.path.join(out_dir, unit.file)
        if (record is not None and os.path.isfile(path) and os.path.getsize(path) == record.get("size")
                and file_sha256(path) == record.get("sha256")):
            done.add(unit.file)
    return done
