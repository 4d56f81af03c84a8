"""Resolution buckets and resizing: the released training rule and the released inference rule.
Sizes are (height, width) throughout.

Training (the released training loader; sama_jax.data):
    buckets = training_buckets(480 * 832, (0.5, 2/3, 0.75, 1.0, 4/3, 1.5, 2.0), 32)
    h, w = nearest_training_bucket(1080, 1920, buckets)       # (448, 896): nearest in log h/w
    frames = cover_and_crop(frames, (h, w))                  # scale to cover, centre crop, bilinear
Inference (the released infer_sh/inference.py; sama_jax.edit_rules):
    h, w = inference_bucket(1080, 1920, 480, 832)             # (480, 832) of 15 buckets, linear w/h
    frames = crop_and_resize(frames, (h, w))                  # centre crop to the ratio, bicubic

The inference buckets for a height x width pixel budget: h = 416..896 in steps of 32 (for 480x832),
w = round(budget / h / 32) * 32, kept when 0.5 <= w/h <= 2, in ascending h; the bucket whose w/h is
closest to the source's (first on ties) is used. Either way a size must be a multiple of
SIZE_MULTIPLE (the VAE's spatial stride times the DiT's patch).
"""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np
from PIL import Image

from sama_jax.models import wan_vae

SIZE_MULTIPLE = wan_vae.SPATIAL_STRIDE * 2  # x the DiT's spatial patch 2: 16
INFERENCE_BUCKET_FACTOR = 32


class SizeError(ValueError):
    """A size (or budget) no bucket or model can take; the message says which."""


# -- training -------------------------------------------------------------------------------------


def training_buckets(
    pixels: int, aspect_ratios: Sequence[float], size_multiple: int
) -> list[tuple[int, int]]:
    """(height, width) per aspect ratio h/w, area close to `pixels`, both sides multiples of size_multiple.

    480*832 with ratios 1/2, 2/3, 3/4, 1, 4/3, 3/2, 2 and multiple 32 gives
    (448, 896), (512, 768), (544, 736), (640, 640), (736, 544), (768, 512), (896, 448).
    """
    if pixels <= 0 or size_multiple <= 0:
        raise SizeError(f"pixels and size_multiple must be positive, got {pixels}, {size_multiple}")
    buckets = []
    for ratio in aspect_ratios:
        if ratio <= 0:
            raise SizeError(f"aspect ratios must be positive, got {ratio}")
        h = max(1, round(math.sqrt(pixels * ratio) / size_multiple)) * size_multiple
        w = max(1, round(math.sqrt(pixels / ratio) / size_multiple)) * size_multiple
        if (h, w) not in buckets:
            buckets.append((h, w))
    return sorted(buckets)


def nearest_training_bucket(height: int, width: int, buckets: Sequence[tuple[int, int]]) -> tuple[int, int]:
    """The bucket whose aspect ratio is closest to height/width, measured in log ratio.

    Log distance treats 2:1 and 1:2 symmetrically; ties go to the earlier bucket in `buckets`.
    """
    if height <= 0 or width <= 0:
        raise SizeError(f"frame size must be positive, got {height}x{width}")
    ratio = math.log(height / width)
    return min(buckets, key=lambda b: abs(math.log(b[0] / b[1]) - ratio))


def cover_and_crop(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Resizes (scale = max(th/h, tw/w), bilinear) so the bucket is covered, then centre-crops to it.

    This is the released training loader's ImageCropAndResize: no letterboxing, the longer side loses
    its edges. frames: uint8 (T, H, W, 3); returns uint8 (T, th, tw, 3).
    """
    th, tw = size
    t, h, w, c = frames.shape
    if (h, w) == (th, tw):
        return frames
    scale = max(th / h, tw / w)
    # round() can land one pixel short of the bucket; never go below it.
    nh, nw = max(th, round(h * scale)), max(tw, round(w * scale))
    top, left = (nh - th) // 2, (nw - tw) // 2
    out = np.empty((t, th, tw, c), np.uint8)
    for i in range(t):
        image = Image.fromarray(frames[i]).resize((nw, nh), Image.BILINEAR)
        out[i] = np.asarray(image)[top : top + th, left : left + tw]
    return out


# -- inference ------------------------------------------------------------------------------------


def inference_buckets(
    pixels: int, factor: int = INFERENCE_BUCKET_FACTOR, min_ar: float = 0.5, max_ar: float = 2.0
) -> list[tuple[int, int]]:
    """(height, width) buckets of about `pixels` pixels, in the released order (height ascending)."""
    if pixels <= 0:
        raise SizeError(f"--height x --width must be positive, got {pixels} pixels")
    h_min = math.floor(math.sqrt(pixels / max_ar) / factor) * factor
    h_max = math.ceil(math.sqrt(pixels / min_ar) / factor) * factor
    buckets = []
    for h in range(max(h_min, factor), h_max + 1, factor):
        w = round(pixels / h / factor) * factor
        if w > 0 and min_ar <= w / h <= max_ar:
            buckets.append((h, w))
    if not buckets:
        raise SizeError(
            f"no {factor}-aligned resolution of about {pixels} pixels has an aspect "
            f"ratio in [{min_ar}, {max_ar}]: raise --height/--width"
        )
    return buckets


def nearest_inference_bucket(height: int, width: int, buckets) -> tuple[int, int]:
    """The bucket with the closest w/h (absolute difference); the first one on ties."""
    ratio = width / height
    return min(buckets, key=lambda b: abs(b[1] / b[0] - ratio))


def inference_bucket(
    height: int, width: int, budget_height: int = 480, budget_width: int = 832
) -> tuple[int, int]:
    """(height, width) the released rule picks for a source of height x width."""
    if width <= 0 or height <= 0:
        raise SizeError(f"source frames have no size ({width}x{height})")
    return nearest_inference_bucket(height, width, inference_buckets(budget_height * budget_width))


def crop_and_resize(frames: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Centre crop to the target aspect ratio, then PIL bicubic resize, as the released VideoData
    (frames already at the target size pass unchanged). uint8 (T, H, W, 3) -> (T, height, width, 3)."""
    height, width = size
    t, ih, iw, _ = frames.shape
    if (ih, iw) == (height, width):
        return frames
    if ih / iw < height / width:
        cw = int(ih / height * width)
        left = (iw - cw) // 2
        frames = frames[:, :, left : left + cw]
    else:
        ch = int(iw / width * height)
        top = (ih - ch) // 2
        frames = frames[:, top : top + ch]
    out = np.empty((t, height, width, 3), np.uint8)
    for i in range(t):
        out[i] = np.asarray(
            Image.fromarray(np.ascontiguousarray(frames[i])).resize((width, height), Image.BICUBIC)
        )
    return out


def check_size(height: int, width: int, where: str = "--height/--width") -> None:
    """Raises SizeError naming the size unless the model can take it."""
    if height <= 0 or width <= 0 or height % SIZE_MULTIPLE or width % SIZE_MULTIPLE:
        raise SizeError(
            f"{where}: {width}x{height} (w x h) does not fit the model: both sides must "
            f"be positive multiples of {SIZE_MULTIPLE} (VAE stride 8 x patch 2), e.g. "
            f"{max(1, round(width / 16)) * 16}x{max(1, round(height / 16)) * 16}"
        )
