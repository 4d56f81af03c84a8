"""sama-ablate: the fast-motion split, the verdicts, the refusals and the report of made-up runs.
--quick end to end runs in test_demo.py, on the quick demo's world."""

import math
import os

import numpy as np
import pytest

from sama_jax import ablate, ablation_report
from sama_jax.data import manifest as manifest_lib
from sama_jax.data import synthetic, video_io

H = W = 64


def _speeds(objects):
    return [math.hypot(o.vy, o.vx) for o in objects]


def test_fast_split_objects_move_at_least_twice_the_fastest_training_speed():
    fastest_training = synthetic.SPEEDS[1] * min(H, W)
    seen_add = 0
    for index in range(40):
        rng = synthetic.sample_rng(synthetic.FAST_SEED, "video_edit", index)
        scene = synthetic.random_scene(rng, H, W, speeds=synthetic.FAST_SPEEDS)
        edited, _, record = synthetic.random_edit(rng, scene, H, W, speeds=synthetic.FAST_SPEEDS)
        seen_add += record["type"] == "add"
        for speed in _speeds(scene.objects + edited.objects):
            assert speed >= 2 * fastest_training - 1e-9
    assert seen_add >= 3  # an added object (its speed is not drawn) is fast too
    # The training split's objects stay within the training range.
    for index in range(40):
        scene = synthetic.random_scene(synthetic.sample_rng(0, "video_edit", index), H, W)
        assert max(_speeds(scene.objects)) <= fastest_training + 1e-9


def test_ensure_fast_split_writes_video_edits_only_and_keeps_them(tmp_path):
    path = synthetic.ensure_fast_split(str(tmp_path / "fast"), 2)
    samples = manifest_lib.read_manifest(path)
    assert [s["id"] for s in samples] == ["synvid_000000", "synvid_000001"]
    assert not os.path.exists(tmp_path / "fast" / "clips" / "synclip_000000.mp4")
    source = video_io.decode_video(manifest_lib.resolve(path, samples[0]["source"]))
    assert source.shape == (synthetic.DEFAULT_SIZE["frames"], 64, 64, 3)
    # Consecutive frames differ a lot more than a training clip's: objects move 6-10 px a frame.
    mtime = os.path.getmtime(path)
    assert synthetic.ensure_fast_split(str(tmp_path / "fast"), 2) == path
    assert os.path.getmtime(path) == mtime


def test_verdicts_follow_the_spread():
    stat = lambda mean, std, n=3: dict(mean=mean, std=std, n=n)
    v = ablation_report.verdict
    assert v(stat(10.0, 0.3), stat(9.0, 0.4), True)["verdict"] == "reproduced"  # 1.0 > 0.5
    assert v(stat(10.0, 0.3), stat(9.6, 0.4), True)["verdict"] == "inconclusive"  # 0.4 < 0.5
    assert v(stat(9.0, 0.3), stat(10.0, 0.4), True)["verdict"] == "not reproduced"
    assert v(stat(0.9, 0.01), stat(1.0, 0.01), False)["verdict"] == "reproduced"  # lower is better
    one_seed = v(stat(10.0, 0.0, 1), stat(1.0, 0.0, 1), True)
    assert one_seed["verdict"] == "inconclusive" and "one seed" in one_seed["why"]
    assert one_seed["difference"] == pytest.approx(9.0)
    assert v(dict(mean=None, std=None, n=0), stat(1.0, 0.1), True)["verdict"] == "inconclusive"
    assert ablation_report.mean_std([1.0, 3.0, None]) == dict(mean=2.0, std=pytest.approx(math.sqrt(2)), n=2)


@pytest.mark.parametrize(
    "flags, message",
    [
        (
            ["--config.train.semantic_anchoring=False"],
            "--config.train.semantic_anchoring: the ablation sets it itself (the arms set it)",
        ),
        (["--config.train.steps=5"], "--config.train.steps: the ablation sets it itself (use --stage0-steps"),
        (["--config.train.no_such_key=1"], "no_such_key"),
        (["--seeds", "0"], "--seeds=0: give at least 1"),
        (["--demo-workdir", "/no/such/dir"], "--demo-workdir=/no/such/dir is not a directory"),
    ],
)
def test_bad_flags_are_one_line_errors_before_anything_runs(tmp_path, capsys, flags, message):
    assert ablate.main(["--workdir", str(tmp_path / "a"), "--quick", *flags]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not (tmp_path / "a").exists()


def _fake_run(seed: int, shift: float) -> dict:
    """One arm-seed's metrics as run_metrics returns them; `shift` makes an arm better (> 0)."""
    val = lambda steps, base: {str(s): base - shift - 0.01 * i + 0.001 * seed for i, s in enumerate(steps)}
    return dict(
        val_s0=val((20, 40), 1.0),
        val_s1=val((60, 120), 0.9),
        val_s1_mean=0.9 - shift + 0.001 * seed,
        loss_var=0.02 - shift / 100 + 0.0001 * seed,
        psnr_in=9.0 + 10 * shift + 0.01 * seed,
        ssim_in=0.15,
        fast_tssim=0.7,
        fast_tssim_target=0.8,
        fast_tdiff_rmse=30.0 - 10 * shift + 0.01 * seed,
        zero_shot_psnr_in=8.5 + shift,
        zero_shot_ssim_in=0.1,
    )


def test_report_of_made_up_runs_judges_each_claim_and_draws_the_curves(tmp_path):
    # +SA and full clearly better than the baseline, +MA the same: reproduced / inconclusive.
    shifts = {"baseline": 0.0, "+SA": 0.1, "+MA": 0.0, "full": 0.1}
    per_seed = {arm: {str(s): _fake_run(s, shift) for s in range(3)} for arm, shift in shifts.items()}
    per_seed["untrained"] = {
        str(s): dict(psnr_in=7.0 + 0.01 * s, zero_shot_psnr_in=7.0 + 0.01 * s) for s in range(3)
    }
    summary = ablation_report.summarise(per_seed)
    assert summary["+SA"]["psnr_in"]["mean"] == pytest.approx(10.01)
    assert summary["+SA"]["psnr_in"]["std"] == pytest.approx(0.01)
    assert summary["baseline"]["val_s1"]["120"]["mean"] == pytest.approx(0.891)
    verdicts = {c["claim"]: c["verdict"] for c in ablation_report.judge(summary)}
    assert verdicts == {
        "semantic anchoring speeds convergence": "reproduced",
        "semantic anchoring lowers the training-loss variance": "reproduced",
        "motion alignment improves temporal consistency under fast motion": "inconclusive",
        "stage 0 alone gives zero-shot editing": "reproduced",
        "+SA beats the baseline (paper: 6.696 vs 6.312)": "reproduced",
        "+MA beats the baseline (paper: 6.711 vs 6.312)": "inconclusive",
        "full SAMA beats the baseline (paper: 7.095 vs 6.312)": "reproduced",
    }
    report = dict(
        settings=dict(ablate.FULL, quick=False),
        overrides=[["optimizer.lr", "5e-4"]],
        summary=summary,
        claims=ablation_report.judge(summary),
        seconds=dict(stage0=10.0, stage1=20.0, export=5.0),
    )
    text = ablation_report.format_report(report)
    assert "--config.optimizer.lr=5e-4" in text
    rows = {}  # the first table: the edits, the paper beside them
    for line in text.splitlines():
        if "|" in line:
            rows.setdefault(line.split("|")[0].strip(), line)
    assert "6.696" in rows["+SA"] and "10.01 +- 0.01" in rows["+SA"]
    assert rows["untrained"].count("7.01 +- 0.01") == 2  # its edits are stage 0's zero point
    assert text.count("[reproduced]") == 5 and text.count("[inconclusive]") == 2
    assert "total 35" in text
    ablation_report.curves_png(summary, str(tmp_path / "curves.png"))
    curves = video_io.decode_image(str(tmp_path / "curves.png"))
    assert curves.shape == (380, 1120, 3)
    for colour in ablation_report.COLOURS.values():
        assert np.any(np.all(curves == colour, axis=-1)), colour


def test_eta_counts_the_runs_left_at_their_times_without_compilation(tmp_path):
    ablation = ablate.Ablation(str(tmp_path), dict(ablate.QUICK, quick=True), [], 0)
    units = ablation.units(2)
    assert len(units) == 2 * (3 * len(ablate.ARMS) + 1)
    assert ablation.eta(units) == "ETA once each kind of run has run"
    keys = {ablation.timing_key(u, arm) for u, arm, _ in units}
    assert keys == {"stage0", "stage0+SA", "stage1", "stage1+SA", "export", "export (untrained)"}
    ablation.cold = {k: 100.0 for k in keys}
    assert ablation.eta(units).startswith(f"{len(units)} runs left, ETA at most 43m20s")
    ablation.timings = {k: [10.0, 20.0] for k in keys}
    assert ablation.eta(units) == f"{len(units)} runs left, ETA 6m30s"


def test_a_workdir_keeps_its_settings_but_may_grow_seeds(tmp_path):
    settings = dict(ablate.QUICK, quick=True, world=str(tmp_path / "world"))
    ablate.Ablation(str(tmp_path), settings, [("optimizer.lr", "5e-4")], 0).check_settings()
    more_seeds = dict(settings, seeds=3)
    ablate.Ablation(str(tmp_path), more_seeds, [("optimizer.lr", "5e-4")], 0).check_settings()
    with pytest.raises(
        ablate.AblationError, match=r"other settings \(overrides: overrides=\[\['optimizer.lr'"
    ):
        ablate.Ablation(str(tmp_path), settings, [], 0).check_settings()
    with pytest.raises(ablate.AblationError, match=r"\(world: world='.*world'\); use another --workdir"):
        other = dict(settings, world=str(tmp_path / "elsewhere"))
        ablate.Ablation(str(tmp_path), other, [("optimizer.lr", "5e-4")], 0).check_settings()
