"""Progress display for training: an in-place bar on interactive terminals, and wandb logging."""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Optional, TextIO

# The bar appears only once an epoch has run this long, so short runs and tests stay quiet.
_BAR_DELAY_S = 2.0
_BAR_REFRESH_S = 0.1
_BAR_WIDTH = 30


def _interactive(stream: TextIO) -> bool:
    if os.environ.get("GINJAX_PROGRESS", "1") == "0":
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


class ProgressBar:
    """Batches done in the current epoch, redrawn in place on `stream` (stderr by default).

    Draws nothing unless `stream` is a terminal (set GINJAX_PROGRESS=0 to turn it off) and the
    epoch has lasted `delay_s`; `close` erases the bar so the per-epoch lines stay clean.
    """

    def __init__(
        self,
        total: Optional[int],
        label: str,
        stream: Optional[TextIO] = None,
        delay_s: Optional[float] = None,
    ) -> None:
        self.stream = sys.stderr if stream is None else stream
        self.enabled = _interactive(self.stream)
        self.total = total
        self.label = label
        self.delay_s = _BAR_DELAY_S if delay_s is None else delay_s
        self.done = 0
        self.start = time.perf_counter()
        self._last_draw = -float("inf")
        self._drawn_width = 0

    def update(self, n: int = 1) -> None:
        self.done += n
        if not self.enabled:
            return
        now = time.perf_counter()
        if now - self.start < self.delay_s or now - self._last_draw < _BAR_REFRESH_S:
            return
        self._last_draw = now
        self._draw(now - self.start)

    def _draw(self, elapsed: float) -> None:
        if self.total:
            filled = int(_BAR_WIDTH * min(self.done, self.total) / self.total)
            bar = "#" * filled + "-" * (_BAR_WIDTH - filled)
            text = f"{self.label} [{bar}] {self.done}/{self.total} batches {elapsed:.1f}s"
        else:
            text = f"{self.label} {self.done} batches {elapsed:.1f}s"
        padding = " " * max(0, self._drawn_width - len(text))
        self.stream.write("\r" + text + padding)
        self.stream.flush()
        self._drawn_width = len(text)

    def close(self) -> None:
        if self._drawn_width:
            self.stream.write("\r" + " " * self._drawn_width + "\r")
            self.stream.flush()
            self._drawn_width = 0


def import_wandb() -> Any:
    """wandb, imported only when asked for (`is_wandb=True`); it is not a dependency."""
    try:
        import wandb
    except ImportError as error:
        raise ImportError(
            "`is_wandb=True` logs through wandb, which is not installed: `pip install wandb` "
            "(and call wandb.init before training), or pass is_wandb=False"
        ) from error
    return wandb
