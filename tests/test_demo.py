"""sama-demo end to end, shortened (--quick: a few steps of every phase): the same commands the full
demo runs, and every output it promises; then sama-ablate --quick on the same world (every arm
for a few steps through sama-train and sama-export, the report with the paper beside it)."""

import contextlib
import io
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import tensorboard_events

from sama_jax import ablate, ablation_report, demo
from sama_jax.data import video_io


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory, tiny_dataset):
    """sama-demo --quick, once for the module: (workdir, what it printed). Its data is the tiny
    presets' (the same counts and tokenizer): the session's copy saves generating it (a copy: the
    features phase writes beside it). The quick ablation below reuses its world."""
    workdir = tmp_path_factory.mktemp("quick_demo") / "demo"
    shutil.copytree(os.path.join(tiny_dataset, "synthetic"), workdir / "data" / "synthetic")
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        assert demo.main(["--workdir", str(workdir), "--quick"]) == 0
    return workdir, printed.getvalue()


@pytest.mark.slow
def test_quick_demo_runs_every_phase_and_writes_the_report(quick_demo, capsys):
    workdir, out = quick_demo
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


@pytest.mark.slow
def test_quick_ablation_runs_every_arm_and_writes_the_report(tmp_path, capsys, quick_demo):
    # sama-ablate --quick on the quick demo's world (--demo-workdir: its data, VAE and features,
    # read only), as a user reuses a finished demo; the world phases are not run twice.
    workdir, world = tmp_path / "ablate", str(quick_demo[0])
    args = ["--workdir", str(workdir), "--demo-workdir", world, "--quick"]
    assert ablate.main(args) == 0
    out = capsys.readouterr().out
    root = workdir / "ablation"
    with open(root / "report.json") as f:
        report = json.load(f)
    summary = report["summary"]
    assert set(summary) == {*ablate.ARMS, "untrained"}
    for arm in ablate.ARMS:
        m = summary[arm]
        assert m["psnr_in"]["n"] == 1 and m["psnr_in"]["std"] == 0.0
        assert 3.0 < m["psnr_in"]["mean"] < 40.0 and 0.0 < m["ssim_in"]["mean"] < 1.0
        assert 0.0 < m["fast_tssim"]["mean"] <= 1.0 and m["fast_tdiff_rmse"]["mean"] > 0.0
        assert 3.0 < m["zero_shot_psnr_in"]["mean"] < 40.0
        # Two steps a stage, evaluated at both; the loss variance of the last half (step 2).
        assert set(m["val_s0"]) == set(m["val_s1"]) == {"1", "2"}
        assert all(0.0 < v["mean"] < 10.0 for v in m["val_s1"].values())
        assert m["loss_var"]["mean"] == 0.0  # one step in the last half of a 2-step stage
    # The arms differ where they should: SA's runs read semantic tokens, MA's stage 0 the pretext.
    for arm, (semantic, motion) in ablate.ARMS.items():
        for stage in (0, 1):
            with open(root / ablate.ARM_DIRS[arm] / "seed0" / f"stage{stage}" / "config.json") as f:
                config = json.load(f)
            assert config["train"]["semantic_anchoring"] is semantic
            assert config["data"]["motion_alignment"] is (motion and stage == 0)
            assert config["seed"] == 0 and config["train"]["steps"] == 2
    # One seed: every claim is inconclusive, each said in one line beside the paper's table.
    assert [c["verdict"] for c in report["claims"]] == ["inconclusive"] * len(ablation_report.CLAIMS)
    for arm, score in ablation_report.PAPER.items():
        assert any(line.startswith(arm) and f"{score:.3f}" in line for line in out.splitlines()), arm
    assert out.count("[inconclusive]") == len(ablation_report.CLAIMS)
    assert (root / "report.txt").read_text().strip() in out
    # The curves: two panels, every arm's colour drawn.
    curves = video_io.decode_image(str(root / "curves.png"))
    assert curves.shape == (380, 1120, 3)
    for colour in ablation_report.COLOURS.values():
        assert np.any(np.all(curves == colour, axis=-1)), colour
    page = (root / "index.html").read_text()
    cases = ablate.QUICK["cases"] + ablate.QUICK["fast_cases"]
    assert page.count("<video") == cases * (2 + len(ablate.ARMS) + 2)
    for video in page.split('<video src="')[1:]:
        assert os.path.exists(root / video.split('"')[0])
    # A rerun runs nothing again; other settings in the same workdir are refused.
    assert ablate.main(args) == 0
    assert "+ sama_jax" not in capsys.readouterr().out
    assert ablate.main([*args, "--stage1-steps", "3"]) == 2
    assert "other settings (stage1_steps: stage1_steps=2)" in capsys.readouterr().err
    elsewhere = ["--demo-workdir", str(tmp_path)]
    assert ablate.main(["--workdir", str(workdir), "--quick", *elsewhere]) == 2
    assert f"other settings (world: world={world!r})" in capsys.readouterr().err


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
