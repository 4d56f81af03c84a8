"""Host transforms: frame sampling to 4k+1 frames and anchors (buckets and resizing: sama_jax.resolution).

All functions take and return numpy uint8 (T, H, W, 3) frames; images are 1-frame videos. Pixels stay
uint8 on the host (4x less to copy and transfer than float32) and become floats in [-1, 1] with
`to_model_range` where the model consumes them, inside the jitted step:

    idx = frame_indices(total=120, num_frames=81, stride=1)          # 0..80
    frames = resolution.cover_and_crop(frames[idx], (h, w))          # the bucket's size
    anchors = frames[anchor_indices(len(frames), 1)]                  # the first frame

Why 4k+1: the Wan VAE compresses time 4x after the first frame, so clips of 4k+1 frames map to k+1
latent frames with nothing dropped or padded.
"""

from __future__ import annotations

import numpy as np


class SkipSample(ValueError):
    """A readable sample that this pipeline cannot use (e.g. a clip too short); the reason says why."""


def largest_4k1(n: int) -> int:
    """The largest count of the form 4k+1 that is <= n (0 when n < 1)."""
    return 0 if n < 1 else 4 * ((n - 1) // 4) + 1


def stride_for(record_fps: float | None, target_fps: float | None, default_stride: int = 1) -> int:
    """Frame stride: round(record_fps / target_fps) when both are known (never below 1), else default.

    A 30 fps clip sampled for a 16 fps model gives stride 2, so motion speed stays close to what the
    model was trained on whatever the source frame rate.
    """
    if record_fps and target_fps and record_fps > 0 and target_fps > 0:
        return max(1, int(round(record_fps / target_fps)))
    if default_stride < 1:
        raise ValueError(f"frame stride must be >= 1, got {default_stride}")
    return int(default_stride)


def frames_needed(num_frames: int, stride: int, start: int = 0) -> int:
    """How many leading frames to decode to take `num_frames` at `stride` from frame `start`."""
    return start + (num_frames - 1) * stride + 1


def frame_indices(
    total: int, num_frames: int, stride: int = 1, min_frames: int = 5, start: int = 0
) -> np.ndarray:
    """Indices of the frames to keep: start, start + stride, ... , as many as fit, cut to 4k+1.

    Starts at frame 0 as the released code does, or at `start` for clips whose first frames are
    unusable (OpenVE-3M records carry start_frame 4: SAMA's loader drops them). A clip with fewer
    than num_frames frames after `start` at this stride gives the largest 4k+1 that fits; fewer than
    `min_frames` raises SkipSample. An image (total == 1) gives [0] when min_frames <= 1.
    """
    if num_frames < 1 or (num_frames - 1) % 4:
        raise ValueError(f"num_frames must be 4k+1, got {num_frames}")
    if stride < 1:
        raise ValueError(f"frame stride must be >= 1, got {stride}")
    if start < 0:
        raise ValueError(f"start frame must be >= 0, got {start}")
    usable = total - start
    available = (usable - 1) // stride + 1 if usable > 0 else 0
    count = min(num_frames, largest_4k1(available))
    if count < max(1, min_frames):
        after = f" after dropping the first {start}" if start else ""
        raise SkipSample(
            f"too short: {total} frames give {count} at stride {stride}{after}, need at least {min_frames}"
        )
    return start + np.arange(count) * stride


def anchor_indices(num_frames: int, count: int = 1) -> np.ndarray:
    """Frames used as semantic anchors: the first frame for count 1, else `count` evenly spaced ones."""
    if count < 1:
        raise ValueError(f"anchor count must be >= 1, got {count}")
    if count == 1:
        return np.zeros(1, np.int64)
    return np.round(np.linspace(0, num_frames - 1, count)).astype(np.int64)


def to_model_range(frames):
    """uint8 pixels -> float32 in [-1, 1] (x * 2/255 - 1, as the released code); numpy or jax arrays."""
    return frames.astype("float32") * (2.0 / 255.0) - 1.0
