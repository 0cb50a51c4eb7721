"""Shared pieces of the benchmarks: the one timer and the device description (from
:mod:`mpo_core.gpu.timing`, shared with ``python -m mpo_core.check``), a plain-text table,
and the JSON report.

Every contender of a benchmark is timed by :func:`time_calls` (or :func:`time_call`): on a
GPU with CUDA events around each call after warm-up calls, elsewhere with
``time.perf_counter``; contenders interleaved call by call, each with the same warm-up
and repeat count.
"""
from __future__ import annotations

import json
import platform
from typing import Any, Sequence

import torch

from mpo_core.gpu.timing import device_description, device_info, time_call, time_calls
from mpo_core.io import atomic_write

__all__ = ["device_description", "device_info", "format_table", "time_call", "time_calls", "write_json"]


def format_table(rows: Sequence[dict[str, Any]], columns: Sequence[str]) -> str:
    """Render ``rows`` (dicts) as an aligned text table with the given column order."""

    def cell(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.3g}" if abs(v) < 1e4 else f"{v:.3e}"
        return str(v)

    cells = [[cell(r.get(c, "")) for c in columns] for r in rows]
    widths = [max(len(c), *(len(row[k]) for row in cells)) if cells else len(c) for k, c in enumerate(columns)]
    line = lambda vals: "  ".join(v.rjust(w) for v, w in zip(vals, widths))  # noqa: E731
    return "\n".join([line(columns), line(["-" * w for w in widths])] + [line(r) for r in cells])


def write_json(path: str, payload: dict[str, Any]) -> None:
    """Write ``payload`` (plus environment facts) to ``path`` atomically, creating its folder."""
    payload = {
        "environment": {
            "torch": torch.__version__,
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cuda_available": torch.cuda.is_available(),
        },
        **payload,
    }
    atomic_write(path, json.dumps(payload, indent=2, default=str).encode())
