"""scores: PSNR/SSIM inside and outside the edited region, temporal consistency, aggregates."""

import math

import numpy as np
import pytest

from sama_jax import scores
from sama_jax.data import synthetic


def _video(rng, t=3, h=24, w=32, lo=40, hi=200):
    return rng.integers(lo, hi, (t, h, w, 3)).astype(np.uint8)


def test_identical_videos_give_inf_and_one(rng):
    v = _video(rng)
    assert scores.psnr(v, v) == math.inf
    assert scores.ssim(v, v) == 1.0
    mask = np.zeros(v.shape[:3], bool)
    mask[:, 4:10, 5:20] = True
    assert scores.psnr(v, v, mask) == math.inf and scores.ssim(v, v, mask) == 1.0
    assert scores.psnr(v, v, np.zeros_like(mask)) is None


def test_known_noise_gives_known_psnr(rng):
    v = _video(rng)
    # +-4 on every value (no clipping: values lie in [40, 200)): MSE 16.
    noisy = (v.astype(np.int16) + 4 * rng.choice([-1, 1], v.shape)).astype(np.uint8)
    assert scores.psnr(v, noisy) == pytest.approx(20 * math.log10(255 / 4), abs=1e-9)
    offset = v + np.uint8(5)
    assert scores.psnr(v, offset) == pytest.approx(10 * math.log10(255**2 / 25), abs=1e-9)


def test_noise_inside_the_region_only():
    v = np.full((2, 20, 20, 3), 100, np.uint8)
    region = np.zeros((2, 20, 20), bool)
    region[:, 5:12, 6:14] = True
    edited = v.copy()
    edited[region] += 10
    assert scores.psnr(edited, v, ~region) == math.inf
    assert scores.psnr(edited, v, region) == pytest.approx(20 * math.log10(255 / 10), abs=1e-9)


def test_ssim_of_flat_images_is_the_luminance_term():
    # Flat frames have zero variance, so SSIM = (2ab + C1) / (a^2 + b^2 + C1) exactly.
    a = np.full((1, 16, 16, 3), 100, np.uint8)
    b = np.full((1, 16, 16, 3), 120, np.uint8)
    c1 = (0.01 * 255) ** 2
    assert scores.ssim(a, b) == pytest.approx((2 * 100 * 120 + c1) / (100**2 + 120**2 + c1), rel=1e-9)


def test_temporal_figures(rng):
    frame = _video(rng, t=1)
    still = np.repeat(frame, 4, axis=0)
    assert scores.temporal_ssim(still) == 1.0
    assert scores.temporal_diff_rmse(still, still) == 0.0
    flicker = still.copy()
    flicker[1::2] += np.uint8(6)  # every other frame brighter by 6: differences +-6 vs 0
    assert scores.temporal_diff_rmse(flicker, still) == pytest.approx(6.0)
    assert scores.temporal_ssim(flicker) < 1.0
    assert scores.temporal_ssim(still[:1]) is None


def test_score_edit_on_synthetic_ground_truth():
    source, target, _, record = synthetic.make_video_edit(0, 3, 5, 32, 48)
    region = scores.edit_region(source, target, threshold=0)
    assert region.any() and not region.all()
    perfect = scores.score_edit(target, target, source, threshold=0)
    assert perfect["psnr_in"] == math.inf and perfect["psnr_out"] == math.inf
    assert perfect["ssim_in"] == 1.0 and perfect["ssim_out"] == 1.0
    assert perfect["region_fraction"] == pytest.approx(region.mean())
    # The identity "edit" preserves everything and follows nothing.
    unedited = scores.score_edit(source, target, source, threshold=0)
    assert unedited["psnr_out"] == math.inf
    assert unedited["psnr_in"] < 30 and unedited["ssim_in"] < perfect["ssim_in"]
    # An edit at another size (the model's bucket) is resized to the target before scoring.
    big = scores.resize_frames(target, 64, 96)
    assert scores.score_edit(big, target, source, threshold=0)["psnr_in"] > 20


def test_aggregate_per_type_with_capped_psnr():
    rows = [
        ("add", dict(psnr_in=math.inf, ssim_in=1.0)),
        ("add", dict(psnr_in=20.0, ssim_in=0.5)),
        ("remove", dict(psnr_in=30.0, ssim_in=None)),
    ]
    table = scores.aggregate(rows)
    assert table["add"] == dict(psnr_in=(scores.PSNR_CAP + 20) / 2, ssim_in=0.75, cases=2)
    assert table["remove"] == dict(psnr_in=30.0, cases=1)
    assert table["all"]["cases"] == 3 and table["all"]["ssim_in"] == 0.75
    assert list(table) == ["add", "remove", "all"]


def test_siglip_consistency_of_a_still_video(rng):
    from flax import nnx

    from sama_jax import presets
    from sama_jax.models import siglip

    cfg = siglip.SiglipConfig.from_config(presets.model_config("tiny").siglip)
    model = siglip.SiglipVisionModel(cfg, rngs=nnx.Rngs(0))
    frame = _video(rng, t=1)
    still = np.repeat(frame, 3, axis=0)
    assert scores.siglip_consistency(model, still) == pytest.approx(1.0, abs=1e-5)
    other = np.concatenate([still[:2], 255 - still[2:]])
    assert scores.siglip_consistency(model, other) < 0.9999


def test_edit_scores_evaluator_metrics_from_a_stand_in_editor():
    from sama_jax.evaluators import edit_scores

    cases = edit_scores.held_out_cases(3, seed=1000, frames=5, height=32, width=32)
    assert all(c.region.any() for c in cases)
    again = edit_scores.held_out_cases(3, seed=1000, frames=5, height=32, width=32)
    assert all(np.array_equal(a.target, b.target) for a, b in zip(cases, again))  # fixed cases
    by_text = {c.instruction: c for c in cases}
    oracle = dict(edit_scores.score_cases(lambda f, t: by_text[t].target, cases))
    assert oracle["edit_scores/psnr_in"] == scores.PSNR_CAP and oracle["edit_scores/ssim_out"] == 1.0
    for c in cases:
        assert oracle[f"edit_scores/{c.edit_type}/psnr_in"] == scores.PSNR_CAP
    unedited = dict(edit_scores.score_cases(lambda f, t: f, cases))
    assert unedited["edit_scores/psnr_out"] == scores.PSNR_CAP
    assert unedited["edit_scores/psnr_in"] < 30 and unedited["edit_scores/temporal_diff_rmse"] > 0
    assert list(edit_scores.score_cases(lambda f, t: f, [])) == []
    # The first two cases as pictures: rows source, edit (here: the source), target; 5 columns.
    with_pictures = dict(edit_scores.score_cases(lambda f, t: f, cases, sample_images=2))
    pictures = {k: v for k, v in with_pictures.items() if k.startswith("edit_samples/")}
    assert sorted(pictures) == [f"edit_samples/{i}_{cases[i].edit_type}" for i in range(2)]
    sheet = pictures[f"edit_samples/0_{cases[0].edit_type}"]
    assert sheet.shape == (3 * 32, 5 * 32, 3) and sheet.dtype == np.uint8
    np.testing.assert_array_equal(sheet[:32, :32], cases[0].source[0])
    np.testing.assert_array_equal(sheet[32:64, 32:64], cases[0].source[1])
    np.testing.assert_array_equal(sheet[64:, 128:], cases[0].target[4])
    timed = "edit_scores/seconds_per_case"
    assert {k: v for k, v in with_pictures.items() if k not in pictures and k != timed} == {
        k: v for k, v in unedited.items() if k != timed
    }


def _random_module(module_fn, seed):
    """A module with random weights set by shape (model_helpers.random_params: no slow eager init)."""
    from flax import nnx
    from model_helpers import random_params

    graphdef, state = nnx.split(nnx.eval_shape(module_fn))
    nnx.replace_by_pure_dict(state, random_params(module_fn, seed))
    return nnx.merge(graphdef, state)


@pytest.mark.slow
def test_edit_scores_evaluator_with_the_editor(tmp_path):
    """The evaluator on the tiny preset's random models: every metric, deterministic across runs,
    and another DiT module of the same structure (an EMA copy) is accepted."""
    from flax import nnx

    from sama_jax import config as config_lib
    from sama_jax import encoders as encoders_lib
    from sama_jax import text
    from sama_jax.evaluators import edit_scores
    from sama_jax.models import umt5, wan_dit, wan_vae

    config = config_lib.build_config(
        "configs/stage1_sft.py:tiny",
        [
            ("eval.edit_scores.num_cases", "2"),
            ("eval.num_steps", "2"),
            ("eval.edit_scores.height", "32"),
            ("eval.edit_scores.width", "32"),
        ],
    )
    cases = edit_scores.held_out_cases(2, 1000, 5, 32, 32)
    tokenizer = text.load_tokenizer(
        text.build_sentencepiece_tokenizer(
            [c.instruction for c in cases] * 20 + ["[Video edit]"], str(tmp_path / "tok"), vocab_size=60
        )
    )
    model, precision = config.model, encoders_lib.frozen_precision(config)
    vae = _random_module(
        lambda: wan_vae.WanVAE(wan_vae.WanVAEConfig.from_config(model.vae, precision), rngs=nnx.Rngs(0)), 1
    )
    encoder = _random_module(
        lambda: umt5.UMT5Encoder(
            umt5.UMT5Config.from_config(model.text_encoder, precision), rngs=nnx.Rngs(0)
        ),
        2,
    )
    encoders = encoders_lib.Encoders(vae, encoder, None, encoders_lib.semantic_config(config))
    dit_fn = lambda: wan_dit.WanDiT(
        wan_dit.WanDiTConfig.from_config(model.dit, config.precision), rngs=nnx.Rngs(0)
    )
    dit = _random_module(dit_fn, 0)
    evaluator = edit_scores.EditScores(config, mesh=None, rules=None, encoders=encoders, tokenizer=tokenizer)
    first = dict(evaluator.run(dit, 0))
    assert {f"edit_scores/{m}" for m in edit_scores.METRICS} <= set(first)
    pictures = sorted(k for k in first if k.startswith("edit_samples/"))
    assert len(pictures) == config.eval.edit_scores.sample_images == 2
    assert all(first[k].shape == (3 * 32, 5 * 32, 3) for k in pictures)
    numbers = lambda d: {k: v for k, v in d.items() if "seconds" not in k and k not in pictures}
    assert all(np.isfinite(v) for v in numbers(first).values())
    second = dict(evaluator.run(_random_module(dit_fn, 0), 10))
    assert numbers(second) == numbers(first)
    for k in pictures:  # the same edits, picture for picture
        np.testing.assert_array_equal(second[k], first[k])
    other = dict(evaluator.run(_random_module(dit_fn, 5), 20))
    assert other["edit_scores/psnr_in"] != first["edit_scores/psnr_in"]
