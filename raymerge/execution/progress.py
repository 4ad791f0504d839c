"""Progress of the execute phase: bytes done, GB/s, ETA, logged every few seconds."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("raymerge.progress")  # shown by default, unlike the phase details


class Progress:
    def __init__(self, total_bytes: int, total_items: int, interval: float = 5.0, done_bytes: int = 0,
                 done_items: int = 0) -> None:
        self.total_bytes = total_bytes
        self.total_items = total_items
        self.done_bytes = self._first_bytes = done_bytes  # a resumed run starts part done
        self.done_items = done_items
        self.interval = interval
        self.start()

    def start(self) -> None:
        """Start the clock: called when the workers are ready, so start-up is not in the rate."""
        self.started = time.monotonic()
        self._last_log = self.started

    def add(self, nbytes: int) -> None:
        self.done_bytes += nbytes
        self.done_items += 1
        now = time.monotonic()
        if now - self._last_log >= self.interval or self.done_items == self.total_items:
            self._last_log = now
            log.info("execute: %s", self.line())

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def rate(self) -> float:
        """Output bytes per second written by this run so far."""
        return (self.done_bytes - self._first_bytes) / self.elapsed if self.elapsed > 0 else 0.0

    def line(self) -> str:
        rate = self.rate()
        left = (self.total_bytes - self.done_bytes) / rate if rate > 0 else float("inf")
        pct = 100.0 * self.done_bytes / self.total_bytes if self.total_bytes else 100.0
        eta = f"{left:.0f}s" if left != float("inf") else "?"
        return (f"{self.done_bytes / 1e9:.2f}/{self.total_bytes / 1e9:.2f} GB ({pct:.0f}%), "
                f"{self.done_items}/{self.total_items} items, {rate / 1e9:.2f} GB/s, ETA {eta}")
