"""A dependency-free progress bar on stderr, weighted by each step's expected cost."""
from __future__ import annotations

import sys
import time


class Progress:
    """``step(label, weight)`` before each unit of work; ``done()`` at the end.

    On a terminal the bar redraws in place; otherwise (CI logs) each step is one line."""

    def __init__(self, total_weight: float, enabled: bool = True, width: int = 30):
        self.total = max(total_weight, 1e-9)
        self.done_weight = 0.0
        self.enabled = enabled
        self.width = width
        self.tty = sys.stderr.isatty()
        self.t0 = time.monotonic()
        self._current = 0.0

    def step(self, label: str, weight: float = 1.0) -> None:
        self.done_weight += self._current
        self._current = weight
        self._draw(label)

    def _draw(self, label: str) -> None:
        if not self.enabled:
            return
        frac = min(1.0, self.done_weight / self.total)
        filled = int(frac * self.width)
        bar = "#" * filled + "." * (self.width - filled)
        line = f"[{bar}] {frac * 100:3.0f}% {time.monotonic() - self.t0:6.1f}s  {label}"
        if self.tty:
            sys.stderr.write("\r\x1b[2K" + line)
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def done(self) -> None:
        self.done_weight = self.total
        self._current = 0.0
        self._draw("done")
        if self.enabled and self.tty:
            sys.stderr.write("\n")
