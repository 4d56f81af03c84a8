"""sama-demo end to end, shortened (--quick: a few steps of every phase): the same commands the full
demo runs, and every output it promises."""

import json
import os

import numpy as np
import pytest
from helpers import tensorboard_events

from sama_jax import demo
from sama_jax.data import video_io


@pytest.mark.slow
def test_quick_demo_runs_every_phase_and_writes_the_report(tmp_path, capsys):
    workdir = tmp_path / "demo"
    assert demo.main(["--workdir", str(workdir), "--quick"]) == 0
    out = capsys.readouterr().out
    assert "inside the edited region" in out and "outside the edited region" in out
    with open(workdir / "report.json") as f:
        report = json.load(f)
    assert set(report["tables"]) == set(demo.COLUMNS)
    cases = report["tables"]["trained"]["all"]["cases"]
    assert (
        cases == demo.QUICK["cases"] == len(report["per_case"]["copy"]) == len(report["per_case"]["stage0"])
    )
    # Copying the source is exact outside the edited region up to the H.264 round trip; through the
    # (barely fitted) VAE it is worse, and the ceiling is that VAE's round trip of the held-out clips.
    assert report["tables"]["copy"]["all"]["psnr_out"] > 30
    assert report["tables"]["copy_vae"]["all"]["psnr_out"] < report["tables"]["copy"]["all"]["psnr_out"]
    assert 0 < report["vae_ceiling_psnr"] < 30
    assert set(report["phase_seconds"]) == set(demo.PHASES[:-1])  # the report cannot time itself
    assert report["total_seconds"] == pytest.approx(sum(report["phase_seconds"].values()), abs=0.2)
    # Every target is judged, with its margin; a few steps of training meet few of them.
    targets = report["targets"]
    assert "vae_ceiling" in targets and not targets["vae_ceiling"]["met"]
    assert all(set(v) == {"met", "margin"} for v in targets.values())
    assert f"targets met: {sum(v['met'] for v in targets.values())} of {len(targets)}" in out
    for name in ("report.txt", "index.html"):
        assert os.path.getsize(workdir / name) > 0
    page = (workdir / "index.html").read_text()
    assert page.count("<video") == 5 * cases
    for label in ("source", "ground truth", "trained", "stage 0 only", "untrained"):
        assert f"<th>{label}</th>" in page
    # The sheet: a header row of labels, then per case its instruction and 5 columns of 3 frames.
    sheet = video_io.decode_image(str(workdir / "sheet.png"))
    assert sheet.shape[1] == 5 * 3 * 64 * 2 + 4 * 6
    assert sheet.shape[0] == 18 + cases * (6 + 18 + 64 * 2)
    assert np.mean(sheet[:18] < 128) > 0.005  # the labels are drawn
    # Stage 1's TensorBoard events: the training scalars at the last step and the validation loss.
    events = tensorboard_events(workdir / "stage1")
    last = demo.QUICK["stage1_steps"]
    for tag in ("loss", "loss_fm", "loss_semantic", "grad_norm", "lr", "samples_per_sec", "compile_seconds"):
        assert last in events[tag], tag
    assert "mfu" not in events  # no peak FLOP/s is known for a CPU: n/a, not a tiny number
    assert events["val_loss/mean"].keys() == {1, 2}
    # A rerun continues from what is done: every phase but the report is skipped.
    assert demo.main(["--workdir", str(workdir), "--quick"]) == 0
    rerun = capsys.readouterr().out
    assert all(f"{phase} done before" in rerun for phase in demo.PHASES[:-1])
