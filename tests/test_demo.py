"""sama-demo end to end, shortened (--quick: a few steps of every phase): the same commands the full
demo runs, and every output it promises."""

import json
import os

import pytest
from helpers import tensorboard_events

from sama_jax import demo


@pytest.mark.slow
def test_quick_demo_runs_every_phase_and_writes_the_report(tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert demo.main(["--workdir", str(workdir), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "inside and outside the edited region" in out
    with open(workdir / "report.json") as f:
        report = json.load(f)
    assert set(report["tables"]) == {"trained", "untrained", "copy"}
    cases = report["tables"]["trained"]["all"]["cases"]
    assert cases == demo.QUICK["cases"] == len(report["per_case"]["copy"])
    # Copying the source is exact outside the edited region up to the H.264 round trip.
    assert report["tables"]["copy"]["all"]["psnr_out"] > 30
    assert set(report["phase_seconds"]) == set(demo.PHASES[:-1])  # the report cannot time itself
    for name in ("report.txt", "sheet.png", "index.html"):
        assert os.path.getsize(workdir / name) > 0
    page = (workdir / "index.html").read_text()
    assert page.count("<video") == 4 * cases
    # Stage 1's TensorBoard events: the training scalars at the log steps, the evaluators' scores
    # and a picture of a held-out edit (rows source, edit, target of 64 x 64 frames).
    events = tensorboard_events(workdir / "stage1")
    last = demo.QUICK["stage1_steps"]
    for tag in (
        "loss",
        "loss_fm",
        "loss_semantic",
        "grad_norm",
        "lr",
        "mfu",
        "samples_per_sec",
        "compile_seconds",
    ):
        assert last in events[tag], tag
    assert events["val_loss/mean"].keys() == events["edit_scores/psnr_in"].keys() == {1, 2}
    (tag,) = [t for t in events if t.startswith("edit_samples/0_")]
    picture = events[tag][last]
    assert picture.shape[0] == 3 * 64 and picture.shape[2] == 3 and picture.std() > 0
    # A rerun continues from what is done: every phase but the report is skipped.
    assert demo.main(["--workdir", str(workdir), "--quick"]) == 0
    rerun = capsys.readouterr().out
    assert all(f"{phase} done before" in rerun for phase in demo.PHASES[:-1])
