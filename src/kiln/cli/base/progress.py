"""The build's progress bar on stderr."""
from __future__ import annotations

import sys
import time


class Progress:
    """A one-line progress bar on stderr (plain lines when not a terminal)."""

    STAGES = ("parse", "passes", "tactics", "serialize")
    open_line = False          # a bar is drawn without its newline (an error message must start below it)

    def __init__(self, enabled: bool = True) -> None:
        self.enabled = enabled
        self.tty = sys.stderr.isatty()
        self.t0 = time.perf_counter()
        self.last = None

    def __call__(self, stage: str, frac: float = 0.0) -> None:
        if not self.enabled:
            return
        i = self.STAGES.index(stage) if stage in self.STAGES else 0
        done = (i + min(max(frac, 0.0), 1.0)) / len(self.STAGES)
        width = 24
        bar = "#" * int(done * width) + "-" * (width - int(done * width))
        line = f"[{bar}] {stage:<9} {time.perf_counter() - self.t0:6.1f}s"
        if self.tty:
            sys.stderr.write("\r" + line)
            sys.stderr.flush()
            Progress.open_line = True
        elif stage != self.last:
            sys.stderr.write(line + "\n")
        self.last = stage

    def done(self) -> None:
        """End the bar's line."""
        if self.enabled and self.tty:
            sys.stderr.write("\n")
            Progress.open_line = False
