"""Compress a whole checkpoint: stream its matrices one at a time through :func:`mpo_core.decompose`,
commit each result atomically with a ledger record, split the work over ``torchrun`` ranks, and let
rank 0 write the index and layout once every rank is done (see :mod:`.plan` for the folder)."""
from __future__ import annotations

import datetime
import json
import math
import os
import time
import warnings
from typing import Any

import torch

from mpo_core.compress_checkpoint.files import (INDEX_NAME, TORCH_DTYPES, TensorEntry, checkpoint_tensors, file_sha256,
                                                read_tensor, safetensors_module, tensor_bytes, write_safetensors)
from mpo_core.compress_checkpoint.plan import (LAYOUT_NAME, MANIFEST_NAME, OUT_DTYPES, Settings, Unit, assign,
                                               auto_budget, check_linear_layout, done_units, lock_output, manifest, matrix_shapes,
                                               natural_key, plan_units, prepare_output, read_record, write_record)
from mpo_core.compress_checkpoint.report import Progress, peak_rss_bytes, summarize
from mpo_core.decompose import decompose
from mpo_core.family import member_at_tolerance, member_for_budget
from mpo_core.io import atomic_write
from mpo_core.mpo import MPO
from mpo_core.rebuild import dense_row_blocks

__all__ = ["compress_checkpoint", "cast_bound", "squared_error"]

ROW_BLOCK = 1 << 18  # entries per block when the error is measured (2 MiB float64 temporaries)


def cast_bound(cores: list[torch.Tensor], unit_roundoff: float) -> float:
    """A bound on ``||W(cores) - W(exact cores)||_F`` when every stored core entry is its exact value
    rounded with relative error at most ``unit_roundoff``: ``((1 + u)^n - 1) prod_k ||T_k||_F``, the
    exact cores' norms bounded by the stored ones over ``1 - u`` (Frobenius norms are submultiplicative
    through the chain's matrix products)."""
    u, n = unit_roundoff, len(cores)
    norms = math.prod(float(torch.linalg.vector_norm(c, dtype=torch.float64)) for c in cores)
    return ((1 + u) ** n - 1) * norms / (1 - u) ** n


def squared_error(dense: torch.Tensor, matrix: torch.Tensor) -> float:
    """``||dense - matrix||_F^2`` in float64, by row blocks (no full-size temporary)."""
    step = max(1, ROW_BLOCK // matrix.shape[1])
    return sum(float(torch.linalg.vector_norm(dense[i:i + step].double() - matrix[i:i + step].double()) ** 2)
               for i in range(0, matrix.shape[0], step))


def _roundoff(dtype: torch.dtype) -> float:
    return float(torch.finfo(dtype).eps) / 2


def _auto_member(name: str, matrix: torch.Tensor, settings: Settings) -> tuple[MPO, dict[str, Any]]:
    """``n="auto"``: the family's member for this matrix alone under its own limit (:func:`.plan.auto_budget`,
    or ``rel_tol``), decomposed; and what the layout records of the choice."""
    rows, cols = matrix.shape
    kwargs = dict(seed=settings.seed, method=settings.method)
    budget = auto_budget(settings, rows, cols)
    if budget is None:
        point, mpo, sizes = member_at_tolerance(matrix, settings.rel_tol, cores=settings.cores, **kwargs)
        why = f"fewest entries at rel_tol={settings.rel_tol} ({', '.join(f'{k} {v}' for k, v in sizes.items())})"
        return mpo, {"member": point.member.name, "family_choice": why, "auto_budget": None}
    entry = member_for_budget(matrix, budget, cores=settings.cores)
    point = entry.point
    if point.member is None:
        raise ValueError(f"n='auto': {name} ({rows}x{cols}) is best kept dense under its budget of {budget} entries "
                         f"({entry.why()}); leave it out with --exclude")
    mpo = decompose(matrix, point.member.in_shape, point.member.out_shape, max_bond=list(point.ranks), **kwargs)
    return mpo, {"member": point.member.name, "family_choice": entry.why(), "auto_budget": budget}


def _compress_matrix(entry: TensorEntry, settings: Settings, device: torch.device, names: set[str]) -> tuple[list, dict]:
    """The cores (to write) and the layout record of one matrix."""
    weight = read_tensor(entry).to(device)  # nn.Linear's (out, in)
    matrix = weight.T  # in x out, as MPOLinear stores it; decompose copies it once into its working layout
    rows, cols = matrix.shape
    choice: dict[str, Any] = {}
    if settings.n == "auto":
        mpo, choice = _auto_member(entry.name, matrix, settings)
        in_shape, out_shape, cap = mpo.in_shape, mpo.out_shape, None
    else:
        in_shape, out_shape, cap = matrix_shapes(settings, rows, cols)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)  # rel_tol not met under the cap: recorded below
            mpo = decompose(matrix, in_shape, out_shape, max_bond=cap, rel_tol=settings.rel_tol, seed=settings.seed,
                            method=settings.method)
    out_dtype = OUT_DTYPES[settings.dtype] or weight.dtype
    cores = [c.to(out_dtype) for c in mpo.cores]
    u = _roundoff(weight.dtype) + (_roundoff(out_dtype) if out_dtype != weight.dtype else 0.0)
    rounding = cast_bound(cores, u)
    # measured row block by row block: the float64 rebuild never exists whole beside the matrix
    error = math.sqrt(sum(squared_error(block, matrix[row:row + block.shape[0]])
                          for row, block in dense_row_blocks([c.double() for c in cores], ROW_BLOCK)))
    del matrix, weight
    module = entry.name[: -len(".weight")]
    entries_mpo = sum(c.numel() for c in cores)
    record = {
        "module": module, "source": entry.name, "source_dtype": str(TORCH_DTYPES[entry.dtype]).replace("torch.", ""),
        "in_features": rows, "out_features": cols, "in_shape": list(in_shape), "out_shape": list(out_shape),
        "ranks": mpo.ranks, "bias": f"{module}.bias" in names, "origin": "linear", "n": len(in_shape),
        "max_bond": cap, "rel_tol": settings.rel_tol, "rel_tol_met": mpo.metadata["rel_tol_met"],
        "routes": mpo.metadata["routes"], "dtype": str(out_dtype).replace("torch.", ""),
        "norm": mpo.norm, "error_bound": mpo.error_bound, "cast_bound": rounding,
        "bound": mpo.error_bound + rounding, "rel_bound": (mpo.error_bound + rounding) / mpo.norm if mpo.norm else 0.0,
        "error": error, "rel_error": error / mpo.norm if mpo.norm else 0.0,
        "entries_dense": rows * cols, "entries_mpo": entries_mpo, **choice,
    }
    tensors = [(f"{module}.cores.{k}", *tensor_bytes(c.cpu())) for k, c in enumerate(cores)]
    return tensors, record


def run_unit(unit: Unit, settings: Settings, device: torch.device, out_dir: str, names: set[str]) -> dict[str, Any]:
    """Write one unit's file atomically, then its ledger record; the record."""
    path = os.path.join(out_dir, unit.file)
    if unit.kind == "matrix":
        tensors, matrix = _compress_matrix(unit.entries[0], settings, device, names)
        entries = 0
    else:
        tensors = [(e.name, e.dtype, e.shape, e) for e in unit.entries]
        matrix, entries = None, sum(math.prod(e.shape) for e in unit.entries)
    size = write_safetensors(path, tensors)
    data = sum(len(s) if isinstance(s, bytes) else s.nbytes for *_, s in tensors)
    record = {"file": unit.file, "kind": unit.kind, "size": size, "sha256": file_sha256(path), "data_bytes": data,
              "tensors": sorted(t[0] for t in tensors), "entries": entries, "matrix": matrix}
    write_record(out_dir, record)
    return record


def _finalize(in_dir: str, out_dir: str, units: list[Unit]) -> list[dict[str, Any]]:
    """Rank 0, once every unit is done: the index, the layout and the input's other files."""
    records = [read_record(out_dir, u.file) for u in units]
    missing = [u.file for u, r in zip(units, records) if r is None]
    if missing:
        raise RuntimeError(f"units without a ledger record after every rank finished: {missing[:5]}")
    weight_map = {name: r["file"] for r in records for name in r["tensors"]}
    index = {"metadata": {"total_size": sum(r["data_bytes"] for r in records)},
             "weight_map": dict(sorted(weight_map.items()))}
    layout = {r["matrix"]["module"]: r["matrix"] for r in records if r["matrix"]}
    layout = dict(sorted(layout.items(), key=lambda kv: natural_key(kv[0])))
    ours = {INDEX_NAME, LAYOUT_NAME, MANIFEST_NAME}
    for name in sorted(os.listdir(in_dir)):
        source = os.path.join(in_dir, name)
        if os.path.isfile(source) and not name.endswith(".safetensors") and not name.startswith(".") and name not in ours:
            with open(source, "rb") as fh:
                atomic_write(os.path.join(out_dir, name), fh.read())
    atomic_write(os.path.join(out_dir, LAYOUT_NAME), json_text(layout).encode())
    atomic_write(os.path.join(out_dir, INDEX_NAME), json_text(index).encode())
    return records


def json_text(obj: Any) -> str:
    return json.dumps(obj, indent=2) + "\n"


def _distributed() -> tuple[int, int, bool]:
    """``(rank, world size, whether this call started the process group)``: gloo under torchrun."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, 1, False
    import torch.distributed as dist

    if dist.is_initialized():
        return dist.get_rank(), dist.get_world_size(), False
    dist.init_process_group("gloo", timeout=datetime.timedelta(hours=24))  # a rank may wait hours on the others
    return dist.get_rank(), dist.get_world_size(), True


def _share(obj: Any, world: int, gather: bool = False) -> Any:
    """Rank 0's ``obj`` on every rank, or (``gather``) every rank's ``obj`` as a list."""
    if world == 1:
        return [obj] if gather else obj
    import torch.distributed as dist

    if gather:
        out = [None] * world
        dist.all_gather_object(out, obj)
        return out
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def compress_checkpoint(in_dir: str | os.PathLike, out_dir: str | os.PathLike, settings: Settings | None = None,
                        progress: str = "auto", **kwargs: Any) -> dict[str, Any]:
    """Compress every chosen matrix of a safetensors checkpoint folder into an MPO checkpoint folder.

    Parameters
    ----------
    in_dir : path
        A transformers checkpoint folder: ``model.safetensors``, or shards and
        ``model.safetensors.index.json``. Read lazily, one matrix at a time.
    out_dir : path
        A new or empty folder, or one holding an unfinished (or finished) run with the same settings
        and input: that run continues (finished units are kept, their files checked by SHA-256).
    settings : Settings, optional
        Or its fields as keyword arguments (``n=2, max_bond=64, ...``).
    progress : {"auto", "bar", "lines", "none"}

    Under ``torchrun`` (``WORLD_SIZE > 1``) the pending units are split across ranks by estimated
    cost, largest first; each rank writes its own files, and rank 0 writes the index and layout
    after every rank is done. The folder's bytes do not depend on the number of ranks or on
    interruptions (for one ``threads`` setting and device).

    Memory: one matrix as stored plus ``decompose``'s working set, never the model. With ``n=2`` (the
    truncated SVD) and a sketched split, ``decompose`` reads the matrix in place (no working copy) and
    the error is measured against a row-block rebuild: the matrix plus ``O((rows + cols) * bond)``
    (measured: 1.3x a 4096x11008 float32 matrix's bytes at bond 64, with
    :func:`.report.return_freed_memory`, which the command line calls). Otherwise (``n > 2``, or an
    exact or Gram split) add ``decompose``'s float64 working copy: about ``stored + 16`` bytes per entry
    of the largest matrix. ``n="auto"`` decomposes each matrix exactly as every member of ``cores`` (and,
    with a budget, at up to 8 sizes per MPO member, as :class:`~mpo_core.family.FamilyPlanner` does) before
    the chosen one: several float64 copies of the largest matrix, and several times the time.

    Returns
    -------
    dict
        On rank 0 the summary (see :func:`.report.summarize`); on other ranks ``{"rank": r, ...}``.

    Raises
    ------
    ValueError
        Bad settings, a missing shard, a corrupt header, a chosen matrix of a dtype ``decompose``
        cannot take, an ``include`` pattern that matches nothing, or an ``out_dir`` holding another
        run or other files (nothing is written then).
    """
    settings = settings if settings is not None else Settings(**kwargs)
    safetensors_module()
    in_dir, out_dir = os.fspath(in_dir), os.fspath(out_dir)
    threads = torch.get_num_threads()
    rank, world, owned = _distributed()
    try:
        torch.set_num_threads(settings.threads)
        return _run(in_dir, out_dir, settings, progress, rank, world)
    finally:
        torch.set_num_threads(threads)
        if owned:
            import torch.distributed as dist

            dist.destroy_process_group()


def _run(in_dir: str, out_dir: str, settings: Settings, progress: str, rank: int, world: int) -> dict[str, Any]:
    start, baseline = time.perf_counter(), peak_rss_bytes()
    tensors, shards = checkpoint_tensors(in_dir)
    check_linear_layout(in_dir)
    units = plan_units(tensors, settings)
    names = {t.name for t in tensors}
    outcome: Any = None
    lock = None
    if rank == 0:
        try:
            # the input's fingerprint: every shard's SHA-256 (one read of the input, rank 0 only)
            wanted = manifest(settings, {shard: file_sha256(path) for shard, path in shards.items()})
            lock = lock_output(out_dir)
            outcome = ("ok", sorted(done_units(out_dir, units)) if prepare_output(out_dir, wanted) else [])
        except ValueError as exc:
            outcome = ("error", str(exc))
    try:
        outcome = _share(outcome, world)
        if outcome[0] == "error":
            raise ValueError(outcome[1])
        return _work(in_dir, out_dir, settings, progress, rank, world, units, names, set(outcome[1]), start, baseline)
    finally:
        if lock is not None:
            os.close(lock)


def _work(in_dir: str, out_dir: str, settings: Settings, progress: str, rank: int, world: int, units: list[Unit],
          names: set[str], done: set[str], start: float, baseline: int) -> dict[str, Any]:
    """This rank's share of the pending units, then (rank 0) the index once every rank is done."""
    mine = assign([u for u in units if u.file not in done], world)[rank]
    device = torch.device(settings.device)
    if device.type == "cuda" and device.index is None and world > 1:
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", rank)))
    bar = Progress(len(mine), sum(u.nbytes for u in mine), progress,
                   "compress_checkpoint" + (f" rank {rank}/{world}" if world > 1 else ""))
    failure, read = None, 0
    try:
        for unit in mine:
            run_unit(unit, settings, device, out_dir, names)
            read += unit.nbytes
            bar.update(unit.entries[0].name if unit.kind == "matrix" else unit.file, unit.nbytes)
    except Exception as exc:
        if world == 1:
            raise
        failure = f"rank {rank}: {type(exc).__name__}: {exc}"
    finally:
        bar.close()
    results = _share((failure, read), world, gather=True)
    failures = [f for f, _ in results if f]
    if failures:
        raise RuntimeError("compress_checkpoint failed on " + "; ".join(failures))
    summary: dict[str, Any] = {"rank": rank, "world_size": world, "units": len(mine), "resumed_units": len(done)}
    if rank == 0:
        records = _finalize(in_dir, out_dir, units)
        summary = {**summarize(records, time.perf_counter() - start, sum(r for _, r in results), baseline),
                   "world_size": world, "resumed_units": len(done), "units": len(units)}
    _share(None, world, gather=True)  # every rank returns after the index is written
    return summary
