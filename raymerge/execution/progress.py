"""Progress of the execute phase: bytes done, GB/s, ETA, workers busy.

On a terminal, one live bar on stderr, redrawn a few times a second; in job logs (no TTY), a
log line every few seconds.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable

log = logging.getLogger("raymerge.progress")  # shown by default, unlike the phase details


class Progress:
    def __init__(self, total_bytes: int, total_items: int, interval: float = 5.0, done_bytes: int = 0,
                 done_items: int = 0, tty: bool | None = None) -> None:
        self.tty = sys.stderr.isatty() if tty is None else tty
        self.total_bytes = total_bytes
        self.total_items = total_items
        self.done_bytes = self._first_bytes = done_bytes  # a resumed run starts part done
        self.done_items = done_items
        self.interval = interval
        self.start()

    def start(self, workers: int = 0, busy: Callable[[], int] | None = None) -> None:
        """Start the clock when the workers are ready, so start-up is not in the rate."""
        self.started = time.monotonic()
        self.stopped: float | None = None
        self._last_log = self.started
        self._marks: list[tuple[float, int]] = [(self.started, self.done_bytes)]  # (time, bytes done)
        self.workers = workers
        self._busy = busy

    def add(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        self.done_items += 1
        now = time.monotonic()
        self._marks.append((now, self.done_bytes))
        last = self.done_items == self.total_items
        if self.tty and log.isEnabledFor(logging.INFO):
            if now - self._last_log >= 0.2 or last:
                self._last_log = now
                sys.stderr.write("\r" + self.bar() + ("\n" if last else ""))
                sys.stderr.flush()
        elif now - self._last_log >= self.interval or last:
            self._last_log = now
            log.info("execute: %s", self.line())

    def bar(self, width: int = 30) -> str:
        filled = int(width * self.done_bytes / self.total_bytes) if self.total_bytes else width
        return f"[{'#' * filled}{'.' * (width - filled)}] {self.line()}"

    def stop(self) -> None:
        """Stop the clock: the execute phase is over."""
        self.stopped = time.monotonic()

    @property
    def elapsed(self) -> float:
        return (self.stopped or time.monotonic()) - self.started

    def rate(self) -> float:
        """Output bytes per second written by this run so far."""
        return (self.done_bytes - self._first_bytes) / self.elapsed if self.elapsed > 0 else 0.0

    def steady_rate(self) -> float:
        """Output bytes per second between the items that completed 10% and 90% of this run's
        bytes: the rate once the workers are warm, without the first items and the last ones."""
        first, total = self._marks[0][1], self.done_bytes - self._marks[0][1]
        inside = [(t, b) for t, b in self._marks if 0.1 * total <= b - first <= 0.9 * total]
        if len(inside) < 3 or inside[-1][0] <= inside[0][0]:
            return self.rate()
        return (inside[-1][1] - inside[0][1]) / (inside[-1][0] - inside[0][0])

    def line(self) -> str:
        rate = self.rate()
        left = (self.total_bytes - self.done_bytes) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done_bytes / self.total_bytes if self.total_bytes else 100.0
        eta = f"{left:.0f}s" if left != float("inf") else "?"
        busy = f", {self._busy()}/{self.workers} workers busy" if getattr(self, "_busy", None) else ""
        return (f"{self.done_bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB ({pct:.0f}%), "
                f"{self.done_items}/{self.total_items} items, {rate / 1e9:.2f} GB/s, ETA {eta}{busy}")
