"""Progress of a conversion on stderr: arrays and bytes written, elapsed time and ETA.

    convert-wan-weights: wan_dit 12/52 arrays, 3.1/26.3 GiB, 41s, ETA 4m52s

A line every INTERVAL_S seconds while data is written, and one when the last array is written.
The ETA extrapolates the bytes written so far (sama_jax.progress formats it).
"""

from __future__ import annotations

import sys
import time

from sama_jax import progress

INTERVAL_S = 10.0


class Progress:
    """`progress(arrays, nbytes)` after each write; matches ParamsWriter's on_written."""

    def __init__(self, label: str, total_arrays: int, total_bytes: int, stream=None):
        self.label, self.total_arrays, self.total_bytes = label, total_arrays, max(1, total_bytes)
        self.arrays = self.nbytes = 0
        self.stream = stream or sys.stderr
        self.start = self.last = time.monotonic()

    def __call__(self, arrays: int, nbytes: int) -> None:
        self.arrays += arrays
        self.nbytes += nbytes
        now = time.monotonic()
        done = self.arrays >= self.total_arrays
        if not done and now - self.last < INTERVAL_S:
            return
        self.last = now
        elapsed = now - self.start
        if done:
            tail = "done"
        elif self.nbytes:
            tail = progress.eta(self.nbytes, self.total_bytes, elapsed / self.nbytes)
        else:
            tail = "ETA unknown"
        print(
            f"convert-wan-weights: {self.label} {self.arrays}/{self.total_arrays} arrays, "
            f"{self.nbytes / 2**30:.2f}/{self.total_bytes / 2**30:.2f} GiB, {progress.duration(elapsed)}, {tail}",
            file=self.stream,
            flush=True,
        )
