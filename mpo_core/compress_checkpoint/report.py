"""What a checkpoint compression shows while it runs (progress: units done / total, GB/s, ETA) and
at the end (the summary: entries before/after, worst and median relative bound, time, per kind)."""
from __future__ import annotations

import ctypes
import re
import resource
import statistics
import sys
import time
from typing import Any

__all__ = ["Progress", "summarize", "format_summary", "peak_rss_bytes", "return_freed_memory"]


def peak_rss_bytes() -> int:
    """This process's peak resident set size so far: ``VmHWM`` of ``/proc/self/status`` (``ru_maxrss``
    would include the parent's size when a large process started this one), else ``ru_maxrss``."""
    try:
        with open("/proc/self/status") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # kilobytes on Linux


def return_freed_memory() -> bool:
    """On glibc, serve every allocation of 128 KiB or more by ``mmap`` (``mallopt(M_MMAP_THRESHOLD)``), so a
    finished matrix's memory leaves the process at once; glibc's default raises that threshold as large
    blocks are freed and keeps them in its heap (measured here: peak 7.6x instead of 5.4x the largest
    float32 matrix). Process-wide; the command line calls it. False where it is not glibc."""
    try:
        return bool(ctypes.CDLL("libc.so.6").mallopt(-3, 128 * 1024))  # -3: M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        return False


def _clock(seconds: float) -> str:
    seconds = int(max(0, seconds))
    return f"{seconds // 3600:d}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """Units done / total with GB/s read and ETA: a tqdm bar (``mode="bar"``, or ``"auto"`` on a
    terminal with tqdm installed), plain lines (``"lines"``, or ``"auto"`` otherwise), or ``"none"``."""

    def __init__(self, total: int, total_bytes: int, mode: str = "auto", prefix: str = "compress_checkpoint") -> None:
        if mode not in ("auto", "bar", "lines", "none"):
            raise ValueError(f"progress must be auto, bar, lines or none, got {mode!r}")
        self.total, self.total_bytes, self.prefix = total, total_bytes, prefix
        self.done = self.done_bytes = 0
        self.start = time.perf_counter()
        self.bar = None
        if mode in ("auto", "bar"):
            try:
                from tqdm.auto import tqdm
            except ImportError:
                if mode == "bar":
                    raise ImportError("progress='bar' needs tqdm (pip install tqdm)") from None
                tqdm = None
            if tqdm is not None and (mode == "bar" or sys.stderr.isatty()):
                self.bar = tqdm(total=total, desc=prefix, unit="matrix")
        self.lines = self.bar is None and mode != "none"

    @property
    def rate(self) -> float:
        """Bytes of input per second so far."""
        return self.done_bytes / max(time.perf_counter() - self.start, 1e-9)

    def update(self, name: str, nbytes: int) -> None:
        self.done += 1
        self.done_bytes += nbytes
        rate = self.rate
        eta = (self.total_bytes - self.done_bytes) / rate if rate > 0 else float("inf")
        if self.bar is not None:
            self.bar.set_postfix_str(f"{rate / 1e9:.3f} GB/s")
            self.bar.update(1)
        elif self.lines:
            print(f"[{self.prefix}] {self.done}/{self.total} {name}  {rate / 1e9:.3f} GB/s  "
                  f"ETA {_clock(eta) if eta != float('inf') else '?'}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _kind(name: str) -> str:
    return re.sub(r"\.\d+\.", ".*.", name)


def summarize(records: list[dict[str, Any]], seconds: float, bytes_read: int, baseline_rss: int) -> dict[str, Any]:
    """The run's summary from the ledger records of every unit (JSON-able)."""
    matrices = [r["matrix"] for r in records if r.get("matrix")]
    copied = sum(r["entries"] for r in records if not r.get("matrix"))
    before = sum(m["entries_dense"] for m in matrices)
    after = sum(m["entries_mpo"] for m in matrices)
    bounds = [m["rel_bound"] for m in matrices]
    kinds: dict[str, list[dict]] = {}
    for m in matrices:
        kinds.setdefault(_kind(m["source"]), []).append(m)
    return {
        "matrices": len(matrices), "entries_before": before, "entries_after": after,
        "fraction_kept": after / before if before else None,
        "model_entries_before": before + copied, "model_entries_after": after + copied,
        "worst_rel_bound": max(bounds) if bounds else None,
        "median_rel_bound": statistics.median(bounds) if bounds else None,
        "worst_rel_error": max((m["rel_error"] for m in matrices), default=None),
        "larger_than_dense": [m["module"] for m in matrices if m["entries_mpo"] > m["entries_dense"]],
        "seconds": seconds, "bytes_read": bytes_read, "gb_per_s": bytes_read / max(seconds, 1e-9) / 1e9,
        "peak_rss_bytes": peak_rss_bytes(), "baseline_rss_bytes": baseline_rss,
        "largest_matrix_entries": max((m["entries_dense"] for m in matrices), default=0),
        "kinds": [{"kind": k, "count": len(ms), "shape": [ms[0]["in_features"], ms[0]["out_features"]],
                   "n": sorted({m["n"] for m in ms}),
                   "ranks": sorted({tuple(m["ranks"]) for m in ms})[0:3],
                   "entries_kept": sum(m["entries_mpo"] for m in ms) / sum(m["entries_dense"] for m in ms),
                   "worst_rel_bound": max(m["rel_bound"] for m in ms)}
                  for k, ms in sorted(kinds.items())],
    }


def format_summary(summary: dict[str, Any]) -> str:
    rows = [f"{'kind':<48} {'count':>5} {'in x out':>13} {'n':<7} {'ranks':<18} {'kept':>6} {'worst bound':>11}"]
    for k in summary["kinds"]:
        ranks = " | ".join("x".join(map(str, r[1:-1])) for r in k["ranks"])
        cores = "|".join(map(str, k["n"]))
        rows.append(f"{k['kind']:<48} {k['count']:>5} {k['shape'][0]:>6}x{k['shape'][1]:<6} {cores:<7} {ranks:<18} "
                    f"{k['entries_kept']:>6.1%} {k['worst_rel_bound']:>11.4g}")
    s = summary
    rows.append(f"{s['matrices']} matrices: {s['entries_before']:,} -> {s['entries_after']:,} entries "
                f"({s['fraction_kept']:.1%}); whole checkpoint {s['model_entries_before']:,} -> "
                f"{s['model_entries_after']:,}")
    rows.append(f"relative error bound: worst {s['worst_rel_bound']:.4g}, median {s['median_rel_bound']:.4g}; "
                f"measured worst {s['worst_rel_error']:.4g}")
    rows.append(f"this run: {s['seconds']:.1f} s, {s['bytes_read'] / 1e9:.3f} GB read ({s['gb_per_s']:.3f} GB/s), "
                f"peak RSS {s['peak_rss_bytes'] / 2**20:.0f} MiB, {(s['peak_rss_bytes'] - s['baseline_rss_bytes']) / 2**20:.0f} MiB "
                f"above the start (rank 0; largest matrix {s['largest_matrix_entries']:,} entries)")
    if s["larger_than_dense"]:
        rows.append(f"larger than dense (bond too high for the shape): {', '.join(s['larger_than_dense'][:5])}")
    return "\n".join(rows)
