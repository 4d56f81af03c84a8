"""Ctrl-C and SIGTERM as a request to stop cleanly, the same in every long command.

    with interrupts.StopRequest("sama-precompute", "stopping after the current batch") as stop:
        while work_left and not stop.requested:
            ...          # nothing is raised into the work: a save in flight finishes
    if stop.requested: save, say so, return stop.exit_code
    stop = interrupts.StopRequest(...).install()   # or for the rest of the process

The first SIGINT or SIGTERM only sets the flag and says, in one line, what happens now; a second
Ctrl-C exits at once (status 130), leaving what was half-written to the next run's cleanup. The exit
status of a clean stop: 0 after SIGTERM (a preempted job that saved its work), 130 after Ctrl-C (so
`cmd && next` does not go on). Outside a StopRequest, Ctrl-C is cli.run's one line and status 130.
"""

from __future__ import annotations

import os
import signal
import sys
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequest:
    def __init__(self, prog: str, then: str):
        self.prog, self.then = prog, then  # `then`: what the command does now, in words
        self.signal: int | None = None
        self._previous = {}

    @property
    def requested(self) -> bool:
        return self.signal is not None

    @property
    def exit_code(self) -> int:
        return 128 + signal.SIGINT if self.signal == signal.SIGINT else 0

    @property
    def name(self) -> str:
        return signal.Signals(self.signal).name if self.signal else ""

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            if signum == signal.SIGINT:
                print(f"{self.prog}: second interrupt: exiting now", file=sys.stderr, flush=True)
                os._exit(128 + signal.SIGINT)
            return
        self.signal = signum
        print(
            f"{self.prog}: {signal.Signals(signum).name}: {self.then} (Ctrl-C again exits at once)",
            file=sys.stderr,
            flush=True,
        )

    def install(self) -> StopRequest:
        if threading.current_thread() is not threading.main_thread():
            return self  # only the main thread may set handlers; a caller's thread keeps Python's
        for sig in SIGNALS:
            self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __enter__(self) -> StopRequest:
        return self.install()

    def __exit__(self, *exc) -> None:
        self.restore()


class Stopped(Exception):
    """A command stopped on request: its one-line message and exit status (cli-level handlers print
    the message and return the status)."""

    def __init__(self, message: str, exit_code: int):
        super().__init__(message)
        self.exit_code = exit_code
