import numpy as np
import pytest

from sama_jax import edit_rules as er
from sama_jax import resolution


def test_frame_counts_pad_to_4k_plus_1():
    assert er.frame_counts(49, 81) == (49, 49)
    assert er.frame_counts(50, 81) == (50, 53)
    assert er.frame_counts(48, 81) == (48, 49)
    assert er.frame_counts(120, 81) == (81, 81)
    assert er.frame_counts(120, 50) == (50, 53)
    assert er.frame_counts(1, 81) == (1, 1)
    with pytest.raises(er.EditInputError, match="no frames"):
        er.frame_counts(0, 81)


def test_padding_repeats_the_last_frame(rng):
    frames = rng.integers(0, 255, (6, 4, 4, 3), dtype=np.uint8)
    padded = er.pad_frames(frames, 9)
    assert padded.shape == (9, 4, 4, 3)
    np.testing.assert_array_equal(padded[:6], frames)
    for i in (6, 7, 8):
        np.testing.assert_array_equal(padded[i], frames[5])


def test_prepare_frames_crops_the_centre_and_keeps_the_count(rng):
    # 16:9 source, 10 frames, a 96x160 budget (buckets 160x96, 128x128, 96x160) -> 160x96,
    # 13 frames (4k+1), 10 kept; the crop to 5:3 removes 6 columns each side.
    frames = np.zeros((10, 108, 192, 3), np.uint8)
    frames[:, :, :4] = 255
    assert resolution.inference_buckets(96 * 160) == [(96, 160), (128, 128), (160, 96)]
    clip, kept = er.prepare_frames(frames, max_frames=81, height=96, width=160)
    assert clip.shape == (13, 96, 160, 3) and kept == 10
    assert clip[:, :, 0].max() == 0
    clip, kept = er.prepare_frames(frames, max_frames=5, height=32, width=48, exact_size=True)
    assert clip.shape == (5, 32, 48, 3) and kept == 5
    assert clip[:, :, 0].max() == 0  # 108/192 < 32/48: width cropped, edges gone


def test_exact_sizes_the_model_cannot_take_are_named():
    frames = np.zeros((5, 40, 40, 3), np.uint8)
    with pytest.raises(resolution.SizeError, match=r"840x470 .*multiples of 16"):
        er.prepare_frames(frames, height=470, width=840, exact_size=True)


def test_prompts():
    assert er.edit_prompts("Make the car red.", er.PROMPT_PREFIX) == (
        "[Video edit] Make the car red.",
        "[Video edit]",
    )
    assert er.edit_prompts("Make the car red.", "") == ("Make the car red.", "")
    # Never twice: training (conditioning, precompute) and editing share the rule.
    assert er.edit_prompts("[Video edit] Make it red.", er.PROMPT_PREFIX)[0] == "[Video edit] Make it red."
    assert er.with_prefix("[Video edit] x", "[Video edit] ") == "[Video edit] x"
    assert er.with_prefix("x", "[Video edit] ") == "[Video edit] x" and er.with_prefix("x", "") == "x"
    with pytest.raises(er.EditInputError, match="--prompt is empty"):
        er.edit_prompts("  ", "")
