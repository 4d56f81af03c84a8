"""Automatic edit scores against an exact ground truth (the synthetic set), needing no external weights.

    region = edit_region(source, target)              # (T, H, W) bool: where the edit should act
    scores = score_edit(edit, target, source)         # {"psnr_in", "ssim_in", "psnr_out", ...}
    table = aggregate(rows)                           # per edit type and "all": means and case counts

Inside the edited region the edit should become the target (instruction following); outside it the
edit should stay the source, which there equals the target (preservation). So PSNR and SSIM of the
edit against the target are taken twice, inside and outside the region. Videos are uint8
(T, H, W, 3), compared on [0, 255]; identical videos give PSNR inf and SSIM 1.0.

SSIM is Wang et al. (2004): Gaussian window sigma 1.5 (truncated at 3.5 sigma, an 11-tap kernel),
K1 = 0.01, K2 = 0.03, per RGB channel and per frame; the SSIM map (reflect padding at the borders)
is averaged over the pixels of a region, so the same map serves inside and outside.
Temporal consistency: temporal_ssim is the mean SSIM of consecutive frames of the edit (the
target's own figure, temporal_ssim_target, is what a perfect edit reaches: objects move);
temporal_diff_rmse is the RMSE between the edit's and the target's frame-to-frame differences
(0 for a perfect edit; flicker raises it).
SigLIP consistency (siglip_consistency, when SigLIP weights are given): the mean cosine similarity of
consecutive frames' SigLIP embeddings, each the mean of the vision tower's last hidden states (the
global token SAMA's semantic anchoring uses; our port has no attention-pooling head).
"""

from __future__ import annotations

import functools
import math

import numpy as np
from PIL import Image
from scipy import ndimage

DATA_RANGE = 255.0
SSIM_SIGMA = 1.5
SSIM_TRUNCATE = 3.5
SSIM_K1, SSIM_K2 = 0.01, 0.03
# Means over cases count a PSNR above this (identical videos: inf) as this, so one perfect case does
# not make a whole edit type's mean infinite.
PSNR_CAP = 100.0
# |source - target| above this (max over RGB) marks the edited region when no exact mask is known:
# H.264 at crf 17 moves colours by a few levels, an edit by tens.
REGION_THRESHOLD = 24


def _check(video: np.ndarray, name: str) -> np.ndarray:
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"{name}: expected (T, H, W, 3) frames, got shape {video.shape}")
    return video


def _same_shape(a: np.ndarray, b: np.ndarray) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"cannot compare videos of shapes {a.shape} and {b.shape}: align them first (scores.align)"
        )


def _mask(mask: np.ndarray | None, shape: tuple) -> np.ndarray:
    """(T, H, W) bool, all true when None."""
    if mask is None:
        return np.ones(shape[:3], bool)
    mask = np.asarray(mask, bool)
    if mask.shape != tuple(shape[:3]):
        raise ValueError(f"region mask of shape {mask.shape} does not match video frames {shape[:3]}")
    return mask


def psnr(a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None) -> float | None:
    """PSNR in dB over the masked pixels (all channels); inf when equal there, None for an empty mask."""
    a, b = _check(a, "a"), _check(b, "b")
    _same_shape(a, b)
    m = _mask(mask, a.shape)
    if not m.any():
        return None
    diff = a.astype(np.float64)[m] - b.astype(np.float64)[m]
    mse = float(np.mean(diff * diff))
    return math.inf if mse == 0 else 10.0 * math.log10(DATA_RANGE**2 / mse)


def _blur(x: np.ndarray) -> np.ndarray:
    """Gaussian filter over H and W of (T, H, W, C), each frame and channel on its own."""
    return ndimage.gaussian_filter(
        x, sigma=(0, SSIM_SIGMA, SSIM_SIGMA, 0), truncate=SSIM_TRUNCATE, mode="reflect"
    )


def ssim_map(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(T, H, W) SSIM per pixel, averaged over the RGB channels."""
    a, b = _check(a, "a").astype(np.float64), _check(b, "b").astype(np.float64)
    _same_shape(a, b)
    c1, c2 = (SSIM_K1 * DATA_RANGE) ** 2, (SSIM_K2 * DATA_RANGE) ** 2
    mu_a, mu_b = _blur(a), _blur(b)
    var_a = _blur(a * a) - mu_a * mu_a
    var_b = _blur(b * b) - mu_b * mu_b
    cov = _blur(a * b) - mu_a * mu_b
    s = ((2 * mu_a * mu_b + c1) * (2 * cov + c2)) / ((mu_a**2 + mu_b**2 + c1) * (var_a + var_b + c2))
    return s.mean(axis=-1)


def ssim(
    a: np.ndarray, b: np.ndarray, mask: np.ndarray | None = None, precomputed_map: np.ndarray | None = None
) -> float | None:
    """Mean SSIM over the masked pixels; 1.0 when equal, None for an empty mask."""
    s = ssim_map(a, b) if precomputed_map is None else precomputed_map
    m = _mask(mask, s.shape + (3,))
    return float(s[m].mean()) if m.any() else None


def temporal_ssim(video: np.ndarray) -> float | None:
    """Mean SSIM of consecutive frames; None for a single frame."""
    video = _check(video, "video")
    if len(video) < 2:
        return None
    return float(ssim_map(video[:-1], video[1:]).mean())


def temporal_diff_rmse(edit: np.ndarray, target: np.ndarray) -> float | None:
    """RMSE (0-255 levels) between the frame-to-frame differences of the edit and of the target."""
    edit, target = _check(edit, "edit"), _check(target, "target")
    _same_shape(edit, target)
    if len(edit) < 2:
        return None
    d = np.diff(edit.astype(np.float64), axis=0) - np.diff(target.astype(np.float64), axis=0)
    return float(np.sqrt(np.mean(d * d)))


def edit_region(source: np.ndarray, target: np.ndarray, threshold: float = REGION_THRESHOLD) -> np.ndarray:
    """(T, H, W) bool: where source and target differ by more than `threshold` in some channel.

    threshold 0 on exact renders gives exactly the pixels the edit changes."""
    source, target = _check(source, "source"), _check(target, "target")
    _same_shape(source, target)
    diff = np.abs(source.astype(np.int16) - target.astype(np.int16)).max(axis=-1)
    return diff > threshold


def resize_frames(video: np.ndarray, height: int, width: int) -> np.ndarray:
    """(T, h, w, 3) uint8 -> (T, height, width, 3), PIL bicubic per frame (unchanged if equal)."""
    video = _check(video, "video")
    if video.shape[1:3] == (height, width):
        return video
    return np.stack(
        [
            np.asarray(Image.fromarray(np.ascontiguousarray(f)).resize((width, height), Image.BICUBIC))
            for f in video
        ]
    )


def align(edit: np.ndarray, *references: np.ndarray) -> tuple[np.ndarray, ...]:
    """The edit resized to the first reference's size and every video cut to the shortest count,
    so an edit at the model's bucket size can be compared with its ground truth."""
    edit = _check(edit, "edit")
    h, w = references[0].shape[1:3]
    count = min(len(v) for v in (edit,) + references)
    return (resize_frames(edit[:count], h, w),) + tuple(v[:count] for v in references)


def score_edit(
    edit: np.ndarray,
    target: np.ndarray,
    source: np.ndarray | None = None,
    region: np.ndarray | None = None,
    threshold: float = REGION_THRESHOLD,
) -> dict:
    """All scores of one edit against its ground truth. The region is given, or found from source vs
    target (edit_region); the edit is aligned to the target first."""
    if source is None and region is None:
        raise ValueError("score_edit needs the source video or the edited region")
    refs = (target,) if source is None else (target, source)
    edit, target, *rest = align(edit, *refs)
    if region is None:
        region = edit_region(rest[0], target, threshold)
    region = np.asarray(region, bool)[: len(edit)]
    outside = ~region
    s = ssim_map(edit, target)
    return {
        "psnr_in": psnr(edit, target, region),
        "ssim_in": ssim(edit, target, region, s),
        "psnr_out": psnr(edit, target, outside),
        "ssim_out": ssim(edit, target, outside, s),
        "psnr": psnr(edit, target),
        "ssim": float(s.mean()),
        "temporal_ssim": temporal_ssim(edit),
        "temporal_ssim_target": temporal_ssim(target),
        "temporal_diff_rmse": temporal_diff_rmse(edit, target),
        "region_fraction": float(region.mean()),
        "frames": int(len(edit)),
    }


def _for_mean(name: str, value: float) -> float:
    return min(value, PSNR_CAP) if name.startswith("psnr") else value


def aggregate(rows: list[tuple[str, dict]]) -> dict:
    """[(edit type, scores)] -> {edit type: {metric: mean, "cases": n}, "all": {...}} ("all" is not a
    valid edit type name here). A metric's mean
    is over the cases that have it (None: empty region, one frame); PSNRs above PSNR_CAP count as it.
    Only float scores are averaged (not counts such as "frames")."""
    groups: dict[str, list[dict]] = {}
    for edit_type, scores in rows:
        groups.setdefault(edit_type, []).append(scores)
        groups.setdefault("all", []).append(scores)
    table = {}
    for edit_type in sorted(groups, key=lambda k: (k == "all", k)):
        cases = groups[edit_type]
        names = sorted({k for c in cases for k, v in c.items() if isinstance(v, float)})
        means = {}
        for name in names:
            values = [_for_mean(name, c[name]) for c in cases if isinstance(c.get(name), float)]
            means[name] = float(np.mean(values))
        table[edit_type] = dict(means, cases=len(cases))
    return table


@functools.cache
def _siglip_embed():
    """The jitted frames -> normalised mean embeddings function, built once (jax imported lazily:
    the other scores need only numpy)."""
    import jax.numpy as jnp
    from flax import nnx

    from sama_jax.models import siglip as siglip_lib

    @nnx.jit
    def embed(model, frames):
        features = model(siglip_lib.preprocess(frames, model.cfg.image_size)).mean(axis=1)
        return features / jnp.linalg.norm(features, axis=-1, keepdims=True)

    return embed


def siglip_embeddings(model, video: np.ndarray, batch: int = 16) -> np.ndarray:
    """(T, hidden) float32: per frame, the mean of SigLIP's last hidden states, L2-normalised."""
    video = _check(video, "video")
    embed = _siglip_embed()
    return np.concatenate(
        [np.asarray(embed(model, video[i : i + batch])) for i in range(0, len(video), batch)]
    )


def siglip_consistency(model, video: np.ndarray) -> float | None:
    """Mean cosine similarity of consecutive frames' SigLIP embeddings; None for a single frame."""
    if len(video) < 2:
        return None
    e = siglip_embeddings(model, video)
    return float(np.mean(np.sum(e[:-1] * e[1:], axis=-1)))
