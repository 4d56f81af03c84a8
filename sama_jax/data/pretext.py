"""Motion-alignment pretext transforms: corrupt the SOURCE of a raw clip, keep the clean clip as target.

Stage 0 turns a text-to-video clip into an editing pair: source = T(clip), target = clip, and the
instruction gets a task token in front so the model knows which restoration is asked:

    cfg = PretextConfig.from_config(config.data.pretext)
    rng = np.random.default_rng([seed, index])         # a sample is reproducible from (seed, index)
    out = apply_pretext(clip, "A red ball rolls left.", cfg, rng, index)
    out.source, out.text, out.task, out.info           # text: "[tube shuffle] A red ball rolls left."

Tasks, mixed none:cube:speed:shuffle = 1:2:3:4 by default (paper):
  none     no source (a black clip, i.e. plain text-to-video) or the clip itself (`none_source`).
  cube     cube inpainting: 30% of the clip's voxels set to 0, as one contiguous block of frames that
           never includes frame 0 - with a spatial cube ("spatial") or whole frames ("full_frame", the
           released MaskRandomFrames: round(0.3 n) frames, start uniform in [1, n-k]).
  speed    speed perturbation, same length: output frame t shows src = round(min(t/(n-1)*s, 1)*(n-1))
           (released TimeWarpFrames; s = 2 plays at 2x then holds the last frame). "alternate" uses s
           on even and 1/s on odd sample indices, the per-sample form of the released toggle.
  shuffle  tube shuffle: the clip cut into a (t, h, w) grid of near-equal contiguous blocks (the first
           n % parts blocks one longer), blocks permuted within groups of equal shape (released
           SwapFourBlocks); the permutation is returned so `tube_unshuffle` inverts it.
The released code names no task tokens; ours are in PretextConfig.tokens and configurable.
"""

from __future__ import annotations

import dataclasses
import itertools
from typing import Any, Mapping, NamedTuple, Sequence

import numpy as np

TASKS = ("none", "cube", "speed", "shuffle")
DEFAULT_TOKENS = {
    "none": "",
    "cube": "[cube inpainting]",
    "speed": "[speed perturbation]",
    "shuffle": "[tube shuffle]",
}


@dataclasses.dataclass(frozen=True)
class PretextConfig:
    weights: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: dict(none=1.0, cube=2.0, speed=3.0, shuffle=4.0)
    )
    cube_mask_ratio: float = 0.3
    cube_mode: str = "spatial"  # spatial | full_frame
    speed_factor: float = 2.0
    speed_mode: str = "fixed"  # fixed | alternate
    shuffle_grid: tuple[int, int, int] = (2, 2, 2)
    tokens: Mapping[str, str] = dataclasses.field(default_factory=lambda: dict(DEFAULT_TOKENS))
    none_source: str = "black"  # black (text-to-video) | copy (source = the clip)

    def __post_init__(self):
        unknown = set(self.weights) - set(TASKS)
        if unknown or not self.weights or min(self.weights.values()) < 0 or sum(self.weights.values()) <= 0:
            raise ValueError(
                f"pretext weights must be non-negative over {TASKS} with a positive sum, "
                f"got {dict(self.weights)}"
            )
        if not 0.0 < self.cube_mask_ratio < 1.0:
            raise ValueError(f"cube_mask_ratio must be in (0, 1), got {self.cube_mask_ratio}")
        checks = {
            "cube_mode": (self.cube_mode, ("spatial", "full_frame")),
            "speed_mode": (self.speed_mode, ("fixed", "alternate")),
            "none_source": (self.none_source, ("black", "copy")),
        }
        for name, (value, allowed) in checks.items():
            if value not in allowed:
                raise ValueError(f"pretext {name} must be one of {allowed}, got {value!r}")
        if self.speed_factor <= 0:
            raise ValueError(f"speed_factor must be positive, got {self.speed_factor}")
        if len(self.shuffle_grid) != 3 or min(self.shuffle_grid) < 1:
            raise ValueError(f"shuffle_grid must be three positive ints (t, h, w), got {self.shuffle_grid}")

    @classmethod
    def from_config(cls, section: Mapping[str, Any] | None) -> "PretextConfig":
        """From a config section (ConfigDict or dict); absent fields keep the defaults above."""
        if section is None:
            return cls()
        values = dict(section.to_dict() if hasattr(section, "to_dict") else section)
        unknown = set(values) - {f.name for f in dataclasses.fields(cls)}
        if unknown:
            raise ValueError(f"unknown pretext config fields {sorted(unknown)}")
        if "tokens" in values:
            values["tokens"] = dict(DEFAULT_TOKENS, **values["tokens"])
        if "shuffle_grid" in values:
            values["shuffle_grid"] = tuple(int(g) for g in values["shuffle_grid"])
        return cls(**values)


class PretextResult(NamedTuple):
    source: np.ndarray  # uint8 (T, H, W, 3), the corrupted clip
    text: str  # the instruction with the task token in front
    task: str  # one of TASKS
    info: dict  # what was done: mask box, speed and indices, or the permutation


def choose_task(rng: np.random.Generator, weights: Mapping[str, float]) -> str:
    names = [t for t in TASKS if weights.get(t, 0) > 0]
    p = np.array([weights[t] for t in names], np.float64)
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _contiguous_run(n: int, k: int, rng: np.random.Generator) -> int:
    """Start of a run of k frames in [1, n-k]: frame 0 stays visible (released MaskRandomFrames)."""
    return int(rng.integers(1, n - k + 1))


def cube_mask(frames: np.ndarray, ratio: float, mode: str, rng: np.random.Generator):
    """Zeroes one contiguous block of `ratio` of the clip; returns (masked, bool mask (T, H, W)).

    full_frame: k = round(ratio n) whole frames (at most n-1). spatial: each side of the cube is
    ratio^(1/3) of the clip's (frames after the first, height, width) so the volume is ~ratio of
    the clip, placed uniformly at random.
    """
    t, h, w, _ = frames.shape
    if t < 2:
        raise ValueError(f"cube inpainting needs >= 2 frames (frame 0 is never masked), got {t}")
    mask = np.zeros((t, h, w), bool)
    if mode == "full_frame":
        k = min(max(1, round(t * ratio)), t - 1)
        start = _contiguous_run(t, k, rng)
        mask[start : start + k] = True
    elif mode == "spatial":
        side = ratio ** (1.0 / 3.0)
        kt = min(max(1, round(t * side)), t - 1)
        # The remaining ratio goes to the spatial square-ish box, keeping the frame's aspect.
        area = ratio * t / kt
        kh = min(h, max(1, round(h * np.sqrt(area))))
        kw = min(w, max(1, round(h * w * area / kh)))
        start = _contiguous_run(t, kt, rng)
        top, left = int(rng.integers(0, h - kh + 1)), int(rng.integers(0, w - kw + 1))
        mask[start : start + kt, top : top + kh, left : left + kw] = True
    else:
        raise ValueError(f"cube mode must be spatial or full_frame, got {mode!r}")
    masked = frames.copy()
    masked[mask] = 0
    return masked, mask


def speed_indices(n: int, speed: float) -> np.ndarray:
    """Output frame t shows frame round(min(t/(n-1)*speed, 1)*(n-1)); Python's round (half to even)."""
    if n == 1:
        return np.zeros(1, np.int64)
    return np.array([round(min(t / (n - 1) * speed, 1.0) * (n - 1)) for t in range(n)], np.int64)


def split_sizes(n: int, parts: int) -> list[int]:
    """Near-equal contiguous parts; the first n % parts are one longer: 49 in 4 -> [13, 12, 12, 12]."""
    if parts < 1 or n < parts:
        raise ValueError(f"cannot split {n} into {parts} non-empty parts")
    return [n // parts + (1 if i < n % parts else 0) for i in range(parts)]


def _blocks(shape: Sequence[int], grid: Sequence[int]) -> list[tuple[slice, slice, slice]]:
    """The grid's blocks as (t, h, w) slices, in row-major (t, h, w) order."""
    edges = []
    for n, parts in zip(shape, grid):
        bounds = np.concatenate([[0], np.cumsum(split_sizes(n, parts))])
        edges.append([slice(int(a), int(b)) for a, b in zip(bounds[:-1], bounds[1:])])
    return list(itertools.product(*edges))


def tube_shuffle(frames: np.ndarray, grid: Sequence[int], rng: np.random.Generator):
    """Permutes the grid's blocks within groups of equal shape; returns (shuffled, perm).

    Output block i holds input block perm[i]. A permutation equal to the identity is drawn again
    (when any group has two or more blocks), so a "shuffle" sample is never the clean clip.
    """
    t, h, w, _ = frames.shape
    blocks = _blocks((t, h, w), grid)
    shapes = [tuple(s.stop - s.start for s in b) for b in blocks]
    groups: dict[tuple, list[int]] = {}
    for i, shape in enumerate(shapes):
        groups.setdefault(shape, []).append(i)
    movable = any(len(g) > 1 for g in groups.values())
    perm = np.arange(len(blocks))
    while True:
        for members in groups.values():
            perm[members] = np.asarray(members)[rng.permutation(len(members))]
        if not movable or (perm != np.arange(len(blocks))).any():
            break
    out = np.empty_like(frames)
    for i, j in enumerate(perm):
        out[blocks[i]] = frames[blocks[j]]
    return out, perm


def tube_unshuffle(frames: np.ndarray, perm: np.ndarray, grid: Sequence[int]) -> np.ndarray:
    """Inverse of tube_shuffle: puts output block i back at position perm[i]."""
    t, h, w, _ = frames.shape
    blocks = _blocks((t, h, w), grid)
    out = np.empty_like(frames)
    for i, j in enumerate(perm):
        out[blocks[j]] = frames[blocks[i]]
    return out


def with_token(text: str, token: str) -> str:
    return f"{token} {text}" if token else text


def apply_pretext(
    clip: np.ndarray, text: str, cfg: PretextConfig, rng: np.random.Generator, index: int
) -> PretextResult:
    """Chooses a task by cfg.weights and builds (source, text, task, info) from a clean clip.

    `index` is the sample's index in the data stream; only the "alternate" speed mode uses it.
    """
    task = choose_task(rng, cfg.weights)
    if task in ("cube", "shuffle") and clip.shape[0] < 2:
        raise ValueError(f"{task} needs a video, got {clip.shape[0]} frame(s)")
    if task == "none":
        source = clip.copy() if cfg.none_source == "copy" else np.zeros_like(clip)
        info = {"none_source": cfg.none_source}
    elif task == "cube":
        source, mask = cube_mask(clip, cfg.cube_mask_ratio, cfg.cube_mode, rng)
        info = {"mask": mask}
    elif task == "speed":
        speed = cfg.speed_factor
        if cfg.speed_mode == "alternate" and index % 2:
            speed = 1.0 / speed
        idx = speed_indices(clip.shape[0], speed)
        source, info = clip[idx], {"speed": speed, "indices": idx}
    else:
        source, perm = tube_shuffle(clip, cfg.shuffle_grid, rng)
        info = {"perm": perm, "grid": tuple(cfg.shuffle_grid)}
    return PretextResult(source, with_token(text, cfg.tokens.get(task, "")), task, info)
