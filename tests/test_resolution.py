"""Resolution buckets and resizing, (height, width) throughout: the released training rule (ratio
buckets, nearest in log ratio, cover + centre crop, bilinear) and the released inference rule (15
buckets near the budget, nearest in w/h, centre crop + bicubic)."""

import numpy as np
import pytest
from PIL import Image

from sama_jax import resolution

RELEASED_BUCKETS = [
    (448, 896),
    (480, 832),
    (512, 768),
    (544, 736),
    (576, 704),
    (608, 672),
    (640, 640),
    (672, 608),
    (704, 576),
    (736, 544),
    (768, 512),
    (800, 512),
    (832, 480),
    (864, 448),
    (896, 448),
]


def test_the_fifteen_released_buckets():
    assert resolution.inference_buckets(480 * 832) == RELEASED_BUCKETS


@pytest.mark.parametrize(
    "source, expected",
    [
        ((1080, 1920), (480, 832)),  # the released example
        ((720, 1280), (480, 832)),
        ((1024, 1024), (640, 640)),
        ((480, 640), (544, 736)),
        ((1920, 1080), (832, 480)),  # portrait phone video
        ((1280, 720), (832, 480)),
        ((640, 480), (736, 544)),
        ((1000, 3000), (448, 896)),  # beyond 2:1 -> the widest bucket
        ((1600, 400), (896, 448)),
        ((480, 832), (480, 832)),
    ],
)
def test_inference_bucket_rule(source, expected):
    assert resolution.inference_bucket(*source) == expected


def test_crop_and_resize_matches_the_released_arithmetic(rng):
    frame = rng.integers(0, 255, (1, 108, 192, 3), dtype=np.uint8)
    out = resolution.crop_and_resize(frame, (48, 64))  # 108/192 < 48/64 -> crop width to int(108/48*64)=144
    ref = Image.fromarray(frame[0][:, 24:168]).resize((64, 48), Image.BICUBIC)
    np.testing.assert_array_equal(out[0], np.asarray(ref))
    out = resolution.crop_and_resize(frame, (64, 64))  # crop width to 108, left 42
    np.testing.assert_array_equal(
        out[0], np.asarray(Image.fromarray(frame[0][:, 42:150]).resize((64, 64), Image.BICUBIC))
    )


def test_paper_buckets_at_480p():
    buckets = resolution.training_buckets(480 * 832, (0.5, 2 / 3, 0.75, 1.0, 4 / 3, 1.5, 2.0), 32)
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
def test_nearest_training_bucket(hw, bucket):
    buckets = resolution.training_buckets(480 * 832, (0.5, 2 / 3, 0.75, 1.0, 4 / 3, 1.5, 2.0), 32)
    assert resolution.nearest_training_bucket(*hw, buckets) == bucket


def test_cover_and_crop_covers_then_centre_crops():
    # 40x80, left half red and right half blue -> bucket 32x32: scale max(0.8, 0.4) = 0.8 -> 32x64,
    # crop columns 16..47: the left 16 columns red, the right 16 blue.
    frame = np.zeros((40, 80, 3), np.uint8)
    frame[:, :40, 0] = 255
    frame[:, 40:, 2] = 255
    out = resolution.cover_and_crop(np.stack([frame, frame]), (32, 32))
    assert out.shape == (2, 32, 32, 3) and out.dtype == np.uint8
    expected = np.asarray(Image.fromarray(frame).resize((64, 32), Image.BILINEAR))[:, 16:48]
    np.testing.assert_array_equal(out[0], expected)
    np.testing.assert_array_equal(out[1], expected)
    assert (out[0, :, :15, 0] == 255).all() and (out[0, :, :15, 2] == 0).all()
    assert (out[0, :, 17:, 2] == 255).all() and (out[0, :, 17:, 0] == 0).all()


def test_cover_and_crop_portrait_crops_rows_and_keeps_exact_size():
    frame = np.arange(90 * 30, dtype=np.uint8).reshape(90, 30, 1).repeat(3, -1)
    out = resolution.cover_and_crop(frame[None], (48, 32))  # scale max(48/90, 32/30) -> 96x32
    assert out.shape == (1, 48, 32, 3)
    full = np.asarray(Image.fromarray(frame).resize((32, 96), Image.BILINEAR))
    np.testing.assert_array_equal(out[0], full[24:72])
    same = np.zeros((1, 48, 32, 3), np.uint8)
    assert resolution.cover_and_crop(same, (48, 32)) is same
