"""The training loop's progress display: a tqdm bar, plain lines, or nothing (:class:`TrainingProgress`)."""
from __future__ import annotations

import sys

__all__ = ["PROGRESS_MODES", "TrainingProgress", "format_duration"]

PROGRESS_MODES = ("auto", "tqdm", "plain", "none")
"""``TrainConfig.progress``: a tqdm bar on a terminal when installed (auto), tqdm, plain lines, or none."""


def format_duration(seconds: float) -> str:
    """``"12m05s"``, or ``"1h02m05s"`` from an hour on (negative counts as 0)."""
    seconds = int(max(0, seconds))
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m{seconds % 60:02d}s" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


class TrainingProgress:
    """A tqdm bar when available (and asked), else plain lines on stdout every ``log_every`` steps."""

    def __init__(self, mode: str, total: int, initial: int, enabled: bool, log_every: int) -> None:
        self.bar = None
        self.plain = False
        self.log_every = max(1, log_every)
        if not enabled or mode == "none":
            return
        use_tqdm = mode == "tqdm" or (mode == "auto" and sys.stderr.isatty())
        if use_tqdm:
            try:
                from tqdm.auto import tqdm
            except ImportError:
                if mode == "tqdm":
                    raise ValueError("progress='tqdm' but tqdm is not installed") from None
            else:
                self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, desc="train")
                return
        self.plain = True

    def update(self, step: int, total: int, stats: dict[str, float]) -> None:
        text = f"loss {stats['loss']:.4f} lr {stats['lr']:.2e} tok/s {stats['tokens_per_s']:.0f} ETA {format_duration(stats['eta_s'])}"
        if self.bar is not None:
            self.bar.update(1)
            self.bar.set_postfix_str(text, refresh=False)
        elif self.plain and (step % self.log_every == 0 or step == total):
            print(f"step {step}/{total} {text}", flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
