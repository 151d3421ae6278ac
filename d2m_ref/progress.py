"""Progress on stderr for long runs: the prefill layer by layer, the decode token by token, with an ETA.

Shown only on a terminal (a log file or a pipe gets no carriage-return noise) and never with
--quiet.  One status line is rewritten in place and erased when the run ends, so stdout's
report is never interleaved with it.
"""

from __future__ import annotations

import sys
import time
from typing import Callable, TextIO

Update = Callable[[int, int], None]  # (done, total)

# Redraw at most this often: decode of a tiny model makes thousands of steps per second.
MIN_REDRAW_SECONDS = 0.1


class Progress:
    """A status line on `stream`.  `stage(label, unit)` -> an update(done, total) callback whose
    ETA assumes the remaining steps take as long as the done ones did on average."""

    def __init__(self, stream: TextIO, clock: Callable[[], float] = time.perf_counter):
        self.stream, self.clock = stream, clock
        self._drawn = False

    def stage(self, label: str, unit: str) -> Update:
        start = self.clock()
        last_draw = -float("inf")

        def update(done: int, total: int) -> None:
            nonlocal last_draw
            now = self.clock()
            if done < total and now - last_draw < MIN_REDRAW_SECONDS:
                return
            last_draw = now
            self._draw(status_line(label, unit, done, total, now - start))

        return update

    def _draw(self, line: str) -> None:
        self.stream.write("\r" + line + "\x1b[K")  # \x1b[K: erase the rest of a longer old line
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        """Erase the status line."""
        if self._drawn:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self._drawn = False


def status_line(label: str, unit: str, done: int, total: int, elapsed: float) -> str:
    """'prefill: 3/6 layers, 0.2 s, ETA 0.2 s'"""
    eta = f"ETA {elapsed * (total - done) / done:.1f} s" if done else "ETA ?"
    return f"{label}: {done}/{total} {unit}, {elapsed:.1f} s, {eta}"


def terminal_progress(quiet: bool, stream: TextIO | None = None) -> Progress | None:
    """A Progress on `stream` (default stderr) if it is a terminal and not `quiet`, else None."""
    stream = stream if stream is not None else sys.stderr
    if quiet or not _isatty(stream):
        return None
    return Progress(stream)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False
