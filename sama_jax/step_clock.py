"""The train loop's clock: step time, throughput, MFU and ETA over the steps since the last log.

    clock = StepClock(total_steps, peak_flops=peak_tflops * 1e12 * devices)   # None: no MFU (CPU)
    clock.compiled(seconds)           # a step that compiled a new batch shape: left out of the rates
    with clock.paused():              # evaluation, checkpoint saving: left out of the rates
        ...
    first = clock.record(step, metrics, samples=..., flops=..., tokens=...)   # a finished step
    summary = clock.summary(step)     # means of the window + rates; starts a new window

The first recorded step includes compilation: it starts the clock and is never part of a window.
"""

from __future__ import annotations

import contextlib
import time

from sama_jax import progress

# Counters reported as their latest value, not averaged over the window.
LATEST = ("skipped_updates", "nonfinite_in_row")


class StepClock:
    def __init__(self, total_steps: int, peak_flops: float | None, now=time.time):
        self.total_steps, self.peak_flops, self.now = total_steps, peak_flops, now
        self.window: list[dict] = []
        self.since: tuple[float, int] | None = None  # (time, step) the window starts at
        self.paused_seconds = self.compile_seconds = 0.0
        self.seconds_per_step = 0.0  # of the last window
        self.shapes: set = set()

    def new_shape(self, shape) -> bool:
        """True the first time a batch shape is seen (its step compiles)."""
        if shape in self.shapes:
            return False
        self.shapes.add(shape)
        return True

    def compiled(self, seconds: float) -> None:
        self.compile_seconds += seconds
        self.paused_seconds += seconds

    @contextlib.contextmanager
    def paused(self):
        began = self.now()
        try:
            yield
        finally:
            self.paused_seconds += self.now() - began

    def _restart(self, step: int) -> None:
        self.since = (self.now(), step)
        self.window.clear()
        self.paused_seconds = self.compile_seconds = 0.0

    def record(self, step: int, metrics: dict, *, samples: float, flops: float, tokens: float) -> bool:
        """A finished step's host metrics; -> True for the first step (it starts the clock)."""
        if self.since is None:
            self._restart(step)
            return True
        self.window.append(dict(metrics, _samples=samples, _flops=flops, _tokens=tokens))
        return False

    def summary(self, step: int) -> dict | None:
        """The window's mean metrics (LATEST: the last value), step_time, samples/tokens per second,
        mfu and compile_seconds; None when no step finished since the last summary."""
        if self.since is None:
            return None
        if not self.window or step <= self.since[1]:
            self._restart(step)
            return None
        seconds = max(1e-9, self.now() - self.since[0] - self.paused_seconds)
        dt = seconds / (step - self.since[1])
        mean = lambda key: sum(w[key] for w in self.window) / len(self.window)
        keys = [k for k in self.window[0] if not k.startswith("_")]
        out = {k: mean(k) for k in keys if k not in LATEST}
        out.update(
            step_time=dt,
            samples_per_sec=mean("_samples") / dt,
            tokens_per_sec=mean("_tokens") / dt,
            compile_seconds=self.compile_seconds,
        )
        if self.peak_flops:  # unknown on a CPU: no MFU rather than a meaningless tiny number
            out["mfu"] = mean("_flops") / dt / self.peak_flops
        out.update({k: self.window[-1][k] for k in keys if k in LATEST})
        self.seconds_per_step = dt
        self._restart(step)
        return out

    def line(self, step: int, summary: dict) -> str:
        """'step i/N k=v ..., ETA t' of a summary."""
        details = " ".join(f"{k}={v:.4g}" for k, v in summary.items())
        return progress.step_line(step, self.total_steps, self.seconds_per_step, details)
