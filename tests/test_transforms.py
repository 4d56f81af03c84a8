"""Host transforms: 4k+1 frame sampling, aspect buckets, resize + centre-crop, anchors, pixel range."""

import jax.numpy as jnp
import numpy as np
import pytest

from sama_jax.data import transforms


def test_largest_4k1():
    assert [transforms.largest_4k1(n) for n in range(0, 11)] == [0, 1, 1, 1, 1, 5, 5, 5, 5, 9, 9]


def test_frame_indices_long_clip_takes_num_frames_from_frame_0():
    np.testing.assert_array_equal(transforms.frame_indices(120, 81), np.arange(81))
    np.testing.assert_array_equal(transforms.frame_indices(200, 81, stride=2), np.arange(81) * 2)


def test_frame_indices_short_clip_takes_largest_4k1_that_fits():
    np.testing.assert_array_equal(transforms.frame_indices(52, 81), np.arange(49))
    # stride 3 over 30 frames: indices 0..27 are 10 frames -> 9 = 4*2+1
    np.testing.assert_array_equal(transforms.frame_indices(30, 81, stride=3), np.arange(9) * 3)


def test_frame_indices_too_short_is_a_skip_with_reason():
    with pytest.raises(transforms.SkipSample, match="too short: 4 frames give 1"):
        transforms.frame_indices(4, 81, min_frames=5)
    with pytest.raises(transforms.SkipSample, match="need at least 17"):
        transforms.frame_indices(16, 81, min_frames=17)


def test_frame_indices_image_and_bad_arguments():
    np.testing.assert_array_equal(transforms.frame_indices(1, 1, min_frames=1), [0])
    with pytest.raises(ValueError, match="4k\\+1"):
        transforms.frame_indices(100, 80)
    with pytest.raises(ValueError, match="stride"):
        transforms.frame_indices(100, 81, stride=0)


def test_stride_for_fps_policy():
    assert transforms.stride_for(30.0, 16.0) == 2
    assert transforms.stride_for(24.0, 16.0) == 2  # round(1.5) -> 2
    assert transforms.stride_for(10.0, 16.0) == 1  # never below 1
    assert transforms.stride_for(None, 16.0, 3) == 3  # unknown clip fps: the configured stride
    assert transforms.stride_for(30.0, 0.0, 1) == 1  # fps policy off
    assert transforms.frames_needed(81, 2) == 161


def test_anchor_indices():
    np.testing.assert_array_equal(transforms.anchor_indices(81), [0])
    np.testing.assert_array_equal(transforms.anchor_indices(9, 3), [0, 4, 8])
    np.testing.assert_array_equal(transforms.anchor_indices(1, 2), [0, 0])
    with pytest.raises(ValueError):
        transforms.anchor_indices(9, 0)


def test_to_model_range_numpy_and_jax():
    x = np.array([0, 51, 255], np.uint8)
    np.testing.assert_allclose(transforms.to_model_range(x), [-1.0, -0.6, 1.0], atol=1e-6)
    y = transforms.to_model_range(jnp.asarray(x))
    assert y.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(y), [-1.0, -0.6, 1.0], atol=1e-6)
