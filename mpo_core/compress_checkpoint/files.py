"""Safetensors checkpoint folders, read and written without holding a model in memory.

A checkpoint folder holds one ``model.safetensors``, or shards listed by
``model.safetensors.index.json`` (transformers' ``weight_map``). Headers are read and checked
here (a corrupt one is a ``ValueError`` naming the file); a tensor is read on its own with
``safetensors.safe_open`` (:func:`read_tensor`), and untouched tensors are copied byte for byte
in 4 MiB chunks (:func:`write_safetensors`), so memory never holds more than one matrix.

The files written are deterministic: the header lists tensors ordered by element size (largest
first, which keeps every tensor aligned) then by name, with ``{"format": "pt"}`` metadata.
"""
from __future__ import annotations

import hashlib
import json
import os
import struct
from dataclasses import dataclass
from typing import BinaryIO, Iterable, Union

import torch

from mpo_core.io import atomic_write

__all__ = ["INDEX_NAME", "SINGLE_NAME", "TORCH_DTYPES", "ITEMSIZE", "TensorEntry", "read_header",
           "checkpoint_tensors", "read_tensor", "tensor_bytes", "write_safetensors", "file_sha256",
           "safetensors_module"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CHUNK = 4 << 20
MAX_HEADER = 100 << 20  # safetensors' own limit on the JSON header
ITEMSIZE = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1,
            "BOOL": 1, "U16": 2, "U32": 4, "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
# the dtypes a matrix may have to be decomposed
TORCH_DTYPES = {"F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}
DTYPE_CODES = {v: k for k, v in TORCH_DTYPES.items()}


def safetensors_module():
    """``safetensors`` (the checkpoint interop format), or an ImportError saying how to install it."""
    try:
        import safetensors.torch
    except ImportError:
        raise ImportError("compress_checkpoint reads and writes safetensors checkpoints: pip install safetensors "
                          "(or pip install -e '.[mpobert]')") from None
    return safetensors


@dataclass(frozen=True)
class TensorEntry:
    """One tensor of a safetensors file: its ``dtype`` code (``"BF16"``...), shape and absolute byte range."""

    name: str
    path: str
    dtype: str
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


def read_header(path: str) -> dict[str, TensorEntry]:
    """The tensors of one safetensors file.

    Raises ``FileNotFoundError`` for a missing file and ``ValueError`` naming the file for a
    corrupt one: a header length past the end, JSON that does not parse, an unknown dtype, a
    shape and byte range that disagree, ranges outside the file.
    """
    size = os.path.getsize(path)
    with open(path, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise ValueError(f"{path}: corrupt safetensors file ({size} bytes, no header)")
        (length,) = struct.unpack("<Q", head)
        if length > min(MAX_HEADER, size - 8):
            raise ValueError(f"{path}: corrupt safetensors header (header length {length}, file size {size})")
        raw = fh.read(length)
    try:
        header = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: corrupt safetensors header (not JSON: {exc})") from None
    if not isinstance(header, dict):
        raise ValueError(f"{path}: corrupt safetensors header (not a JSON object)")
    data_start, entries = 8 + length, {}
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = info["dtype"], tuple(int(s) for s in info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise ValueError(f"{path}: corrupt safetensors header (entry {name!r}: {info!r})") from None
        if dtype not in ITEMSIZE:
            raise ValueError(f"{path}: tensor {name!r} has dtype {dtype!r}, which this reader does not know")
        count = 1
        for s in shape:
            count *= s
        if not 0 <= begin <= end <= size - data_start or end - begin != count * ITEMSIZE[dtype]:
            raise ValueError(f"{path}: corrupt safetensors header (tensor {name!r}: bytes {begin}..{end} for "
                             f"shape {list(shape)} {dtype}, data size {size - data_start})")
        entries[name] = TensorEntry(name, path, dtype, shape, data_start + begin, data_start + end)
    return entries


def checkpoint_tensors(folder: str) -> tuple[list[TensorEntry], dict[str, str]]:
    """Every tensor of a checkpoint folder (name order) and its shards (file name -> path).

    With ``model.safetensors.index.json`` the shards are those of its ``weight_map``: a shard it
    names that is missing, or a tensor the index puts in a shard that does not hold it, is a
    ``ValueError``. Without an index: ``model.safetensors``, else every ``*.safetensors`` file.
    """
    if not os.path.isdir(folder):
        raise ValueError(f"{folder!r} is not a folder (a transformers checkpoint folder is expected)")
    index_path = os.path.join(folder, INDEX_NAME)
    if os.path.isfile(index_path):
        try:
            with open(index_path) as fh:
                weight_map = json.load(fh)["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise ValueError(f"{index_path}: not a safetensors index ({exc!r})") from None
        shards = sorted(set(weight_map.values()))
    elif os.path.isfile(os.path.join(folder, SINGLE_NAME)):
        weight_map, shards = None, [SINGLE_NAME]
    else:
        shards, weight_map = sorted(f for f in os.listdir(folder) if f.endswith(".safetensors")), None
        if not shards:
            raise ValueError(f"{folder!r} holds no *.safetensors file")
    missing = [s for s in shards if not os.path.isfile(os.path.join(folder, s))]
    if missing:
        raise ValueError(f"{folder}: shard {missing[0]!r} named by {INDEX_NAME} is missing"
                         + (f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""))
    tensors, paths = {}, {}
    for shard in shards:
        paths[shard] = os.path.join(folder, shard)
        entries = read_header(paths[shard])
        for name, entry in entries.items():
            if name in tensors:
                raise ValueError(f"{folder}: tensor {name!r} is in two shards ({os.path.basename(tensors[name].path)}, {shard})")
            tensors[name] = entry
    if weight_map is not None:
        for name, shard in weight_map.items():
            if name not in tensors or os.path.basename(tensors[name].path) != shard:
                raise ValueError(f"{index_path}: tensor {name!r} is mapped to {shard!r}, which does not hold it")
    return [tensors[k] for k in sorted(tensors)], paths


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """One tensor, read on its own (``safe_open``; the file is unmapped again before returning)."""
    safetensors = safetensors_module()
    try:
        with safetensors.safe_open(entry.path, framework="pt") as fh:
            return fh.get_tensor(entry.name)
    except safetensors.SafetensorError as exc:
        raise ValueError(f"{entry.path}: cannot read tensor {entry.name!r}: {exc}") from None


def tensor_bytes(tensor: torch.Tensor) -> tuple[str, tuple[int, ...], bytes]:
    """``(dtype code, shape, raw little-endian bytes)`` of a CPU tensor, for :func:`write_safetensors`."""
    if tensor.dtype not in DTYPE_CODES:
        raise ValueError(f"cannot write a {tensor.dtype} tensor (float64/32/16 and bfloat16 only)")
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return DTYPE_CODES[tensor.dtype], tuple(tensor.shape), flat.view(torch.uint8).numpy().tobytes()


Source = Union[bytes, TensorEntry]  # bytes in memory, or a tensor copied from its file


def write_safetensors(path: str, tensors: Iterable[tuple[str, str, tuple[int, ...], Source]]) -> int:
    """Write ``(name, dtype code, shape, source)`` tensors to a safetensors file atomically; its size in bytes."""
    items = sorted(tensors, key=lambda t: (-ITEMSIZE[t[1]], t[0]))
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, dtype, shape, source in items:
        size = len(source) if isinstance(source, (bytes, bytearray)) else source.nbytes
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)

    def write(out: BinaryIO) -> None:
        out.write(struct.pack("<Q", len(raw)) + raw)
        for _, _, _, source in items:
            if isinstance(source, (bytes, bytearray)):
                out.write(source)
                continue
            with open(source.path, "rb") as fh:
                fh.seek(source.start)
                left = source.nbytes
                while left:
                    chunk = fh.read(min(CHUNK, left))
                    if not chunk:
                        raise ValueError(f"{source.path}: file ended inside tensor {source.name!r}")
                    out.write(chunk)
                    left -= len(chunk)

    atomic_write(path, write)
    return 8 + len(raw) + offset


def file_sha256(path: str) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as fh:
        for chunk in iter(lambda: fh.read(CHUNK), b""):
            digest.update(chunk)
    return digest.hexdigest()
