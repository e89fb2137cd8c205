"""Progress of a long pass over images, on stderr: `encode` and the trainer show it the same way.

On a terminal it is click's bar, redrawn in place. On a pipe or a file click would print only
the label, and a redrawn bar would be one endless line, so a log gets a line at every quarter.
"""

from __future__ import annotations

import math
import sys
import time
from typing import Any, TextIO

import click


class ProgressBar:
    """`update(done, total, note)` as work finishes, `close()` (or leave `with`) at the end.

    The rate counts from the first update, so the work a resumed encode reuses does not inflate it.
    """

    def __init__(self, label: str, stream: TextIO | None = None) -> None:
        self.label = label
        self.stream = stream if stream is not None else sys.stderr
        self._bar: Any = None
        self._start: float | None = None
        self._first = self._last = 0
        self._next_share = 0.25

    def update(self, done: int, total: int, note: str = "") -> None:
        now = time.perf_counter()
        if self._start is None:
            self._start, self._first, self._last = now, done, done
            if self.stream.isatty():
                self._bar = click.progressbar(
                    length=total, label=self.label, file=self.stream, show_pos=True, item_show_func=lambda s: s
                ).__enter__()
        elapsed = now - self._start
        rate = (done - self._first) / elapsed if elapsed > 0 else 0.0
        status = f"{note}, {rate:.1f} images/s" if note else f"{rate:.1f} images/s"
        if self._bar is not None:
            self._bar.update(done - self._last, status)
        else:
            self._log_quarter(done, total, status, rate)
        self._last = done

    def _log_quarter(self, done: int, total: int, status: str, rate: float) -> None:
        share = done / total if total else 1.0
        if share < self._next_share:
            return
        self._next_share = math.floor(share * 4 + 1) / 4
        left = f", {format_duration((total - done) / rate)} left" if done < total and rate > 0 else ""
        self.stream.write(f"{self.label} {done}/{total} {status}{left}\n")
        self.stream.flush()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None

    def __enter__(self) -> ProgressBar:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def format_duration(seconds: float) -> str:
    """Whole seconds as 1h02m, 3m05s or 12s."""
    hours, rest = divmod(round(seconds), 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"
