"""Host transforms: 4k+1 frame sampling, aspect buckets, resize + centre-crop, anchors, pixel range."""

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

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


def test_paper_buckets_at_480p():
    buckets = transforms.make_buckets(480 * 832, (0.5, 2 / 3, 0.75, 1.0, 4 / 3, 1.5, 2.0), 32)
    assert buckets == [(448, 896), (512, 768), (544, 736), (640, 640), (736, 544), (768, 512), (896, 448)]
    areas = np.array([h * w for h, w in buckets])
    assert np.abs(areas / (480 * 832) - 1).max() < 0.05


@pytest.mark.parametrize(
    "hw, bucket",
    [
        ((1080, 1920), (448, 896)),  # 16:9 is nearest to 1:2 in log ratio
        ((1024, 1024), (640, 640)),
        ((480, 640), (544, 736)),  # 3:4
        ((1920, 1080), (896, 448)),  # portrait
        ((500, 700), (544, 736)),  # 0.714: nearer 3/4 than 2/3 in log ratio
    ],
)
def test_nearest_bucket(hw, bucket):
    buckets = transforms.make_buckets(480 * 832, (0.5, 2 / 3, 0.75, 1.0, 4 / 3, 1.5, 2.0), 32)
    assert transforms.nearest_bucket(*hw, buckets) == bucket


def test_resize_and_crop_covers_then_centre_crops():
    # 40x80, left half red and right half blue -> bucket 32x32: scale max(0.8, 0.4) = 0.8 -> 32x64,
    # crop columns 16..47: the left 16 columns red, the right 16 blue.
    frame = np.zeros((40, 80, 3), np.uint8)
    frame[:, :40, 0] = 255
    frame[:, 40:, 2] = 255
    out = transforms.resize_and_crop(np.stack([frame, frame]), (32, 32))
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    expected = np.asarray(Image.fromarray(frame).resize((64, 32), Image.BILINEAR))[:, 16:48]
    np.testing.assert_array_equal(out[0], expected)
    np.testing.assert_array_equal(out[1], expected)
    assert (out[0, :, :15, 0] == 255).all() and (out[0, :, :15, 2] == 0).all()
    assert (out[0, :, 17:, 2] == 255).all() and (out[0, :, 17:, 0] == 0).all()


def test_resize_and_crop_portrait_crops_rows_and_keeps_exact_size():
    frame = np.arange(90 * 30, dtype=np.uint8).reshape(90, 30, 1).repeat(3, -1)
    out = transforms.resize_and_crop(frame[None], (48, 32))  # scale max(48/90, 32/30) -> 96x32
    assert out.shape == (1, 48, 32, 3)
    full = np.asarray(Image.fromarray(frame).resize((32, 96), Image.BILINEAR))
    np.testing.assert_array_equal(out[0], full[24:72])
    same = np.zeros((1, 48, 32, 3), np.uint8)
    assert transforms.resize_and_crop(same, (48, 32)) is same


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
