"""Progress and ETA text: the one formatter every command uses.

    duration(292.4)                      -> '4m52s'   (41s, 4m52s, 1h02m07s)
    step_line(12, 50, 0.8, "loss=0.1")   -> 'step 12/50 loss=0.1, ETA 30s'
    Progress(total, unit="samples")      -> 'N/M samples, r samples/s, ETA 4m52s' at most every few seconds

An ETA is the work left times a rate the caller measured after compilation (a first jitted call
compiles, and a rate that includes it predicts the rest badly).
"""

from __future__ import annotations

import logging
import time

log = logging.getLogger("sama_jax")


def duration(seconds: float) -> str:
    seconds = int(round(max(0.0, seconds)))
    if seconds < 60:
        return f"{seconds}s"
    minutes, seconds = divmod(seconds, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m{seconds:02d}s"


def eta(done: float, total: float, seconds_per_unit: float) -> str:
    return "ETA " + duration(seconds_per_unit * max(0.0, total - done))


def step_line(done: int, total: int, seconds_per_step: float, details: str = "", what: str = "step") -> str:
    """'step i/N details, ETA t': seconds_per_step measured after compilation."""
    return (
        f"{what} {done}/{total}"
        + (f" {details}" if details else "")
        + ", "
        + eta(done, total, seconds_per_step)
    )


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
        self.log.info(
            "%s%d/%d %s, %.1f %s/s, %s",
            what,
            self.done,
            self.total,
            self.unit,
            rate,
            self.unit,
            eta(self.done, self.total, 1 / rate if rate > 0 else 0.0),
        )


def step_reporter(log, prefix: str = "", every: int = 1, quiet_seconds: float = 0.0):
    """A progress(step, steps, seconds) callback (the Editor's) that logs
    'prefix step i/N, t s, ETA' every `every` steps and at the last, once `quiet_seconds` have passed.
    The first step includes compiling the loop: the rate is of the steps after it."""
    first = {}

    def report(step: int, steps: int, seconds: float) -> None:
        first.setdefault("seconds", seconds)
        per_step = (seconds - first["seconds"]) / (step - 1) if step > 1 else seconds
        if seconds >= quiet_seconds and (step % every == 0 or step == steps):
            log(f"{prefix}" + step_line(step, steps, per_step, f"{seconds:.1f} s", what="denoising step"))

    return report
