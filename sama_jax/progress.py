"""Progress of a long command: 'N/M unit, r unit/s, ETA h:mm:ss', at most every few seconds."""

from __future__ import annotations

import logging
import time

log = logging.getLogger("sama_jax")


class Progress:
    """Reports to `logger` (default: the sama_jax logger) at most every `every` seconds and at the end."""

    def __init__(self, total: int, every: float = 5.0, unit: str = "samples", logger=None):
        self.total, self.every, self.unit, self.done = total, every, unit, 0
        self.log = logger or log
        self.start = self.last = time.monotonic()

    def advance(self, count: int = 1, what: str = "") -> None:
        self.done += count
        now = time.monotonic()
        if now - self.last < self.every and self.done < self.total:
            return
        self.last = now
        rate = self.done / max(now - self.start, 1e-9)
        eta = (self.total - self.done) / rate if rate > 0 else 0.0
        self.log.info(
            "%s%d/%d %s, %.1f %s/s, ETA %s",
            what,
            self.done,
            self.total,
            self.unit,
            rate,
            self.unit,
            time.strftime("%H:%M:%S", time.gmtime(eta)),
        )
