"""sama-train's step clock: pauses and compile time left out of the rates, window means, MFU, ETA;
and the one progress formatter."""

import pytest

from sama_jax import progress
from sama_jax.step_clock import StepClock


class FakeTime:
    def __init__(self):
        self.t = 100.0

    def __call__(self):
        return self.t


def test_rates_leave_out_compile_and_pauses():
    now = FakeTime()
    clock = StepClock(total_steps=10, peak_flops=1e6, now=now)
    assert clock.record(1, {"loss": 9.0, "skipped_updates": 0.0}, samples=4, flops=1e6, tokens=40)
    assert clock.summary(1) is None  # the first step (compilation) starts the clock only
    now.t += 2.0
    assert not clock.record(2, {"loss": 1.0, "skipped_updates": 0.0}, samples=4, flops=2e6, tokens=40)
    assert clock.new_shape((1, 2)) and not clock.new_shape((1, 2))
    clock.compiled(3.0)  # step 3 compiled a new shape for 3 s
    now.t += 5.0
    with clock.paused():  # an evaluation of 1 s
        now.t += 1.0
    now.t += 1.0
    clock.record(3, {"loss": 3.0, "skipped_updates": 2.0}, samples=4, flops=2e6, tokens=40)
    summary = clock.summary(3)
    # 9 s since step 1, 3 s compiling and 1 s evaluating: 5 s for 2 steps.
    assert summary["step_time"] == pytest.approx(2.5)
    assert summary["loss"] == pytest.approx(2.0)
    assert summary["skipped_updates"] == 2.0  # a counter: its latest value
    assert summary["samples_per_sec"] == pytest.approx(4 / 2.5)
    assert summary["tokens_per_sec"] == pytest.approx(40 / 2.5)
    assert summary["mfu"] == pytest.approx(2e6 / 2.5 / 1e6)
    assert summary["compile_seconds"] == 3.0
    assert clock.line(3, {"loss": 2.0}) == "step 3/10 loss=2, ETA 18s"  # 7 steps x 2.5 s
    # The next window starts clean.
    now.t += 4.0
    clock.record(4, {"loss": 5.0, "skipped_updates": 2.0}, samples=4, flops=2e6, tokens=40)
    again = clock.summary(4)
    assert again["step_time"] == pytest.approx(4.0) and again["compile_seconds"] == 0.0
    assert clock.summary(4) is None  # nothing finished since


def test_progress_formats():
    assert [progress.duration(s) for s in (0.4, 41, 292.4, 3727)] == ["0s", "41s", "4m52s", "1h02m07s"]
    assert progress.step_line(12, 50, 0.8, "loss=0.1") == "step 12/50 loss=0.1, ETA 30s"
    assert progress.step_line(3, 3, 1.0, what="denoising step") == "denoising step 3/3, ETA 0s"


def test_no_mfu_without_a_peak():
    # A CPU has no peak FLOP/s (sama-train passes None there): the summary has no MFU at all.
    now = FakeTime()
    clock = StepClock(total_steps=4, peak_flops=None, now=now)
    clock.record(1, {"loss": 1.0}, samples=1, flops=1e6, tokens=1)
    now.t += 2.0
    clock.record(2, {"loss": 1.0}, samples=1, flops=1e6, tokens=1)
    summary = clock.summary(2)
    assert "mfu" not in summary and summary["step_time"] == pytest.approx(2.0)
