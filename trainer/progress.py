"""Progress that shows in logs too: tqdm's bar on a terminal; elsewhere (a pipe, a CI log, a Kubernetes job) one
line every few seconds with the count, the rate and the time left, instead of silence until the end.

``MONOSEMANTIC_PROGRESS_S`` sets the seconds between log lines (default 5).
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any, Iterable

from tqdm.auto import tqdm


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str, unit: str = "it", initial: int = 0,
             enabled: bool = True, **options: Any):
    """A tqdm bar where stderr is a terminal, a LogProgress where it is not, nothing when not ``enabled``."""
    if not enabled:
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, disable=True)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, unit=unit, initial=initial, **options)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)


class LogProgress:
    """The subset of tqdm's interface the trainer uses (update, set_postfix, close, iteration), as log lines."""

    def __init__(self, iterable: Iterable | None, *, total: int | None, desc: str, unit: str, initial: int = 0) -> None:
        self.iterable, self.desc, self.unit, self.initial, self.n = iterable, desc, unit, initial, initial
        self.total = total if total is not None else (len(iterable) if hasattr(iterable, "__len__") else None)
        self.interval = float(os.environ.get("MONOSEMANTIC_PROGRESS_S", "5"))
        self.started = self.last = time.monotonic()
        self.postfix = ""

    def __iter__(self):
        for item in self.iterable:
            yield item
            self.update(1)
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        if time.monotonic() - self.last >= self.interval:
            self._line()

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.n > self.initial:
            self._line()

    def _line(self) -> None:
        now = time.monotonic()
        self.last = now
        rate = (self.n - self.initial) / max(now - self.started, 1e-9)
        done = f"{self.n:,}/{self.total:,} {self.unit}" if self.total else f"{self.n:,} {self.unit}"
        share = f" ({self.n / self.total:.0%})" if self.total else ""
        left = ""
        if self.total and rate > 0:
            seconds = int((self.total - self.n) / rate)
            left = f", ETA {seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
        extra = f", {self.postfix}" if self.postfix else ""
        print(f"{self.desc}: {done}{share}, {rate:,.1f} {self.unit}/s{left}{extra}", file=sys.stderr, flush=True)
