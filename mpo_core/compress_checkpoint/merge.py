"""Merge an MPO checkpoint written by :func:`~mpo_core.compress_checkpoint.compress_checkpoint` back into a
plain dense one (``nn.Linear`` weights again; plain ``transformers`` loads it), one matrix at a time,
with the error it carries: the certified bound, and measured against the original when given."""
from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from typing import Any

import torch

from mpo_core.compress_checkpoint.files import (INDEX_NAME, TensorEntry, checkpoint_tensors, read_tensor,
                                                tensor_bytes, write_safetensors)
from mpo_core.compress_checkpoint.plan import LAYOUT_NAME, LEDGER_DIR, MANIFEST_NAME, OUT_DTYPES
from mpo_core.compress_checkpoint.report import Progress
from mpo_core.compress_checkpoint.run import json_text, squared_error
from mpo_core.io import atomic_write
from mpo_core.rebuild import dense_matrix

__all__ = ["merge_checkpoint"]


def _read_json(path: str, what: str) -> Any:
    if not os.path.isfile(path):
        raise ValueError(f"{path} not found: {what}")
    with open(path) as fh:
        return json.load(fh)


def _merge_matrix(rec: dict, tensors: dict[str, TensorEntry], dtype: torch.dtype | None,
                  reference: dict[str, TensorEntry] | None) -> tuple[tuple, dict]:
    module = rec["module"]
    cores = [read_tensor(tensors[f"{module}.cores.{k}"]).double() for k in range(len(rec["in_shape"]))]
    dense = dense_matrix(cores)  # in x out, float64
    out_dtype = dtype or OUT_DTYPES[rec["source_dtype"]]
    weight = dense.T.to(out_dtype).contiguous()  # nn.Linear's (out, in)
    # rounding each entry of the merged matrix to out_dtype moves it by at most u ||W'||_F
    final_cast = float(torch.finfo(out_dtype).eps) / 2 * float(torch.linalg.vector_norm(dense))
    del dense
    row = {"module": module, "rel_bound": (rec["bound"] + final_cast) / rec["norm"] if rec["norm"] else 0.0}
    if reference is not None:
        original = read_tensor(reference[rec["source"]])
        norm = float(torch.linalg.vector_norm(original, dtype=torch.float64))
        row["rel_error"] = math.sqrt(squared_error(weight, original)) / norm if norm else 0.0
    return (f"{module}.weight", *tensor_bytes(weight)), row


def merge_checkpoint(mpo_dir: str | os.PathLike, out_dir: str | os.PathLike, reference: str | os.PathLike | None = None,
                     dtype: str | None = None, progress: str = "auto") -> dict[str, Any]:
    """Write the dense checkpoint of an MPO checkpoint folder; the error report.

    Parameters
    ----------
    mpo_dir : path
        A finished ``compress_checkpoint`` output (its ``mpo_layout.json`` and index).
    out_dir : path
        A new or empty folder; it is built beside itself and renamed into place at the end.
    reference : path, optional
        The original checkpoint: each merged matrix's relative error against it is measured.
    dtype : str, optional
        Dtype of the merged weights (default: each matrix's original dtype).

    Returns
    -------
    dict
        ``matrices`` (per module: ``rel_bound``, the certified relative bound including the final
        cast, and ``rel_error`` when ``reference`` is given), ``worst_rel_bound``, ``worst_rel_error``.
    """
    mpo_dir, out_dir = os.fspath(mpo_dir), os.path.abspath(os.fspath(out_dir))
    if dtype is not None and OUT_DTYPES.get(dtype) is None:
        raise ValueError(f"dtype must be one of {[k for k in OUT_DTYPES if k != 'input']}, got {dtype!r}")
    layout = _read_json(os.path.join(mpo_dir, LAYOUT_NAME), "not a finished compress_checkpoint output")
    _read_json(os.path.join(mpo_dir, INDEX_NAME), "not a finished compress_checkpoint output")
    if os.path.exists(out_dir) and (not os.path.isdir(out_dir) or os.listdir(out_dir)):
        raise ValueError(f"{out_dir} exists and is not empty: nothing was written (give a new or empty folder)")
    entries, _ = checkpoint_tensors(mpo_dir)
    tensors = {t.name: t for t in entries}
    ref = {t.name: t for t in checkpoint_tensors(os.fspath(reference))[0]} if reference is not None else None
    by_file: dict[str, list[str]] = {}
    for t in entries:
        by_file.setdefault(os.path.basename(t.path), []).append(t.name)
    modules_of = {f"{m}.cores.0": rec for m, rec in layout.items()}
    parent = os.path.dirname(out_dir)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(out_dir)}.", dir=parent)
    rows, weight_map, total = [], {}, 0
    bar = Progress(len(by_file), sum(t.nbytes for t in entries), progress, "merge_checkpoint")
    try:
        for file in sorted(by_file):
            names = by_file[file]
            matrices = [modules_of[n] for n in names if n in modules_of]
            if matrices:
                out_name, items = file.replace("mpo-", "merged-", 1), []
                for rec in matrices:
                    item, row = _merge_matrix(rec, tensors, OUT_DTYPES[dtype] if dtype else None, ref)
                    items.append(item)
                    rows.append(row)
            else:
                out_name, items = file, [(n, tensors[n].dtype, tensors[n].shape, tensors[n]) for n in names]
            write_safetensors(os.path.join(tmp, out_name), items)
            total += sum(len(s) if isinstance(s, bytes) else s.nbytes for *_, s in items)
            weight_map.update({item[0]: out_name for item in items})
            bar.update(file, sum(tensors[n].nbytes for n in names))
        for name in sorted(os.listdir(mpo_dir)):
            source = os.path.join(mpo_dir, name)
            if (os.path.isfile(source) and not name.endswith(".safetensors") and not name.startswith(".")
                    and name not in (INDEX_NAME, LAYOUT_NAME, MANIFEST_NAME, LEDGER_DIR)):
                shutil.copyfile(source, os.path.join(tmp, name))
        index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
        atomic_write(os.path.join(tmp, INDEX_NAME), json_text(index).encode())
        if os.path.isdir(out_dir):
            os.rmdir(out_dir)  # empty, checked above
        os.replace(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        bar.close()
    errors = [r["rel_error"] for r in rows if "rel_error" in r]
    return {"matrices": rows, "worst_rel_bound": max(r["rel_bound"] for r in rows),
            "worst_rel_error": max(errors) if errors else None}
