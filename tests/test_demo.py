"""sama-demo end to end, shortened (--quick: a few steps of every phase): the same commands the full
demo runs, and every output it promises."""

import json
import os
import signal
import subprocess
import sys
import time

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


def _live_pids(pattern: str) -> list[int]:
    """Processes whose command line contains `pattern` (not zombies)."""
    out = subprocess.run(["pgrep", "-f", pattern], capture_output=True, text=True).stdout.split()
    pids = []
    for pid in map(int, out):
        try:
            with open(f"/proc/{pid}/stat") as f:
                if f.read().split(") ")[-1][0] != "Z":
                    pids.append(pid)
        except FileNotFoundError:
            pass
    return pids


def _read_until(proc, text: str, timeout: float = 300.0) -> str:
    seen, start = "", time.time()
    while text not in seen:
        line = proc.stdout.readline()
        assert line or time.time() - start < timeout, seen
        assert line, f"exited before printing {text!r}:\n{seen}"
        seen += line
    return seen


@pytest.mark.slow
def test_killing_the_demo_kills_its_running_phase(tmp_path):
    # kill -9 of sama-demo while its VAE phase runs: the phase dies with it (no orphan that a rerun
    # would race in the same workdir).
    workdir = tmp_path / "demo"
    proc = subprocess.Popen(
        [sys.executable, "-m", "sama_jax.demo", "--workdir", str(workdir), "--quick"],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _read_until(proc, "+ sama_jax.vae_fit")
    deadline = time.time() + 60
    while not _live_pids(f"vae_fit.*{workdir}") and time.time() < deadline:
        time.sleep(0.2)
    assert _live_pids(f"vae_fit.*{workdir}")
    proc.kill()
    proc.wait()
    deadline = time.time() + 30
    while _live_pids(f"vae_fit.*{workdir}") and time.time() < deadline:
        time.sleep(0.2)
    assert not _live_pids(f"vae_fit.*{workdir}")


@pytest.mark.slow
def test_ctrl_c_stops_the_vae_fit_and_writes_nothing(tmp_path, tiny_dataset):
    # SIGINT to the process group (Ctrl-C) after the first step: the step in flight ends, one line
    # says what happened, status 130, and --out is not written (a half-fitted VAE is no result).
    from helpers import link_tiny_dataset

    link_tiny_dataset(tiny_dataset, tmp_path)
    out = tmp_path / "vae"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sama_jax.vae_fit",
            f"--config={demo.CONFIGS}/stage1_sft.py:tiny",
            "--config.data.pixels=1024",
            "--out",
            str(out),
            "--steps",
            "1000",
            "--clip-fraction",
            "0",
        ],
        cwd=tmp_path,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    _read_until(proc, "step 1/1000 done")
    os.killpg(proc.pid, signal.SIGINT)
    rest = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130, rest
    assert "sama-fit-vae: SIGINT at step" in rest and "nothing written" in rest
    assert "Traceback" not in rest
    assert not out.exists()
