"""What one record becomes: the planned (T, H, W) from metadata, the decoded sample, or why it is skipped.

    spec = SampleSpec.from_config(config.data, seed)    # ConfigError for values no sample can satisfy
    shape = plan_shape(record, spec)                     # from size keys or header probes, no decoding
    sample = prepare_sample(record, index, spec)         # uint8 frames at that shape
    marker = skip_marker(record, index, error)           # the counted skip for a known bad-item error
    batch = collate([sample, ...])

plan_shape and prepare_sample share one frames-and-bucket computation (_frames_and_bucket), so a
record's planned shape is the shape it decodes to whenever its metadata is right (docs/data.md).
"""

from __future__ import annotations

import dataclasses
import io
import math
import os
from typing import Mapping, Sequence

import numpy as np
from PIL import Image

from sama_jax import features as features_lib
from sama_jax import resolution
from sama_jax.config import ConfigError
from sama_jax.data import manifest as manifest_lib
from sama_jax.data import pretext as pretext_lib
from sama_jax.data import transforms, video_io
from sama_jax.data.sources import SIZE_KEYS
from sama_jax.data.video_io import MediaError

EDIT_TASK = "edit"  # the task name of real editing pairs (no pretext)
SKIP_KEY = "skipped"  # present (with the reason) only in skip markers
FEATURE_PREFIX = features_lib.BATCH_PREFIX
ARRAY_KEYS = ("source", "target", "anchors")
STRING_KEYS = ("text", "kind", "id", "task")
_REQUIRED = object()


def _is_4k1(n: int) -> bool:
    return n >= 1 and (n - 1) % 4 == 0


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """What one sample becomes; built from config.data with `from_config`, checked when made."""

    num_frames: int = 81
    frame_stride: int = 1
    fps: float = 0.0  # > 0: stride = round(record fps / fps) when the record has fps
    min_frames: int = 5  # a video giving fewer 4k+1 frames is skipped as too short
    buckets: tuple = ((480, 832),)
    anchor_frames: int = 1
    pretext: pretext_lib.PretextConfig | None = None  # set: t2v clips get a motion-alignment source
    seed: int = 0
    features: tuple = ()  # precomputed features to carry, e.g. ("text", "semantic")
    text_len: int = 512  # the "text" feature is zero-padded to this many tokens
    min_size: int = 8  # min(h, w) of source and target below this: skipped too_small
    max_aspect: float = 4.0  # max(h, w) / min(h, w) above this: skipped bad_aspect

    def __post_init__(self):
        # Each of these would make every sample of a kind unusable; the run stops here instead of
        # skipping them one by one. Field names are the data.* keys they come from.
        problems = []
        if not _is_4k1(self.num_frames):
            problems.append(
                f"data.num_frames={self.num_frames}: must be 4k+1 (1, 5, 9, ..., 81): "
                f"the Wan VAE maps 4k+1 frames to k+1 latent frames"
            )
        if self.frame_stride < 1:
            problems.append(f"data.frame_stride={self.frame_stride}: must be >= 1 (1 takes every frame)")
        if not self.fps >= 0:
            problems.append(f"data.fps={self.fps}: must be >= 0 (0 uses data.frame_stride)")
        if not _is_4k1(self.min_frames):
            problems.append(f"data.min_frames={self.min_frames}: must be 4k+1 (1, 5, 9, ...)")
        elif _is_4k1(self.num_frames) and self.min_frames > self.num_frames:
            problems.append(
                f"data.min_frames={self.min_frames}: more than data.num_frames="
                f"{self.num_frames}, so every video would be skipped as too short"
            )
        if not self.buckets or any(len(b) != 2 or min(b) < 1 for b in self.buckets):
            problems.append(
                f"buckets {self.buckets}: need at least one (height, width), both >= 1 "
                f"(from data.pixels, data.aspect_ratios, data.size_multiple)"
            )
        if self.anchor_frames < 1:
            problems.append(
                f"anchor_frames={self.anchor_frames}: must be >= 1 (model.semantic.num_anchor_frames)"
            )
        if self.text_len < 1:
            problems.append(f"text_len={self.text_len}: must be >= 1 (the DiT's text_len)")
        if self.min_size < 1:
            problems.append(f"data.min_size={self.min_size}: must be >= 1 (pixels of the shorter side)")
        if not self.max_aspect >= 1:
            problems.append(f"data.max_aspect={self.max_aspect}: must be >= 1 (longer side / shorter side)")
        unknown = sorted(set(self.features) - set(features_lib.NAMES))
        if unknown:
            problems.append(
                f"data.features={tuple(self.features)}: unknown {unknown} (known: {features_lib.NAMES})"
            )
        # Motion alignment rewrites the instruction and makes the source at train time, so features
        # of the stored text or source cannot match what the sample becomes.
        stale = {"text", "source_latents"} & set(self.features)
        if self.pretext is not None and stale:
            problems.append(
                f"data.features: precomputed {sorted(stale)} cannot be used with motion "
                f"alignment (it prepends a task token and makes the source per step); "
                f"encode them online or drop them from data.features"
            )
        if problems:
            raise ConfigError("; ".join(problems))

    @classmethod
    def from_config(cls, data, seed: int, anchor_frames: int = 1, text_len: int = 512) -> "SampleSpec":
        """The spec of config.data; ConfigError naming the key for a value no sample can satisfy.

        anchor_frames and text_len belong to the model (model.semantic.num_anchor_frames, the DiT's
        text_len): the caller passes them.
        """
        pretext = None
        if data.get("motion_alignment", False):
            try:
                pretext = pretext_lib.PretextConfig.from_config(data.get("pretext", None))
            except ValueError as e:
                raise ConfigError(f"data.pretext: {e}") from e
        pixels = _number(data, "pixels", _REQUIRED, int)
        size_multiple = _number(data, "size_multiple", _REQUIRED, int)
        if pixels <= 0:
            raise ConfigError(f"data.pixels={pixels}: must be > 0 (the area of a bucket, e.g. 480 * 832)")
        if size_multiple <= 0:
            raise ConfigError(f"data.size_multiple={size_multiple}: must be > 0 (e.g. 16 or 32)")
        ratios = data.get("aspect_ratios", _REQUIRED)
        if ratios is _REQUIRED:
            raise ConfigError("data.aspect_ratios: missing (declare it in the config's data section)")
        try:
            ratios = tuple(float(r) for r in ratios)
        except (TypeError, ValueError):
            ratios = ()
        if not ratios or not all(r > 0 and math.isfinite(r) for r in ratios):
            raise ConfigError(
                f"data.aspect_ratios={data['aspect_ratios']!r}: must be positive numbers (h/w), at least one"
            )
        defaults = cls()
        return cls(
            num_frames=_number(data, "num_frames", _REQUIRED, int),
            frame_stride=_number(data, "frame_stride", defaults.frame_stride, int),
            fps=_number(data, "fps", defaults.fps, float),
            min_frames=_number(data, "min_frames", defaults.min_frames, int),
            buckets=tuple(resolution.training_buckets(pixels, ratios, size_multiple)),
            anchor_frames=int(anchor_frames),
            pretext=pretext,
            seed=int(seed),
            features=tuple(data.get("features", ())),
            text_len=int(text_len),
            min_size=_number(data, "min_size", defaults.min_size, int),
            max_aspect=_number(data, "max_aspect", defaults.max_aspect, float),
        )


def _number(data, key: str, default, kind: type):
    """data[key] as an int or float, or ConfigError naming data.<key>."""
    value = data.get(key, default)
    if value is _REQUIRED:
        raise ConfigError(f"data.{key}: missing (declare it in the config's data section)")
    try:
        converted = kind(value)
    except (TypeError, ValueError):
        converted = None
    if converted is None or isinstance(value, bool) or (kind is int and converted != value):
        raise ConfigError(f"data.{key}={value!r}: must be {'an integer' if kind is int else 'a number'}")
    return converted


# ---------------------------------------------------------------------------------------------------
# Errors the checks raise; skip_marker turns them into counted skips


class MissingFeatures(Exception):
    """A precomputed feature that data.features asks for is absent from the record (or unusable)."""


class FieldError(Exception):
    """Why one media field ("source" or "target") of a record is unusable: the error and its reason."""

    def __init__(self, field: str, error: Exception, reason: str | None = None):
        super().__init__(str(error))
        self.field, self.error = field, error
        self.reason = reason or getattr(error, "reason", "corrupt")


def _ext(record: Mapping, field: str) -> str:
    ext = record.get(f"{field}_ext")
    if ext:
        return ext
    value = record.get(field)
    if isinstance(value, str):
        return os.path.splitext(value)[1]
    raise KeyError(f"{field}_ext (the media is bytes, so the extension must be given)")


def where(record: Mapping, field: str) -> str:
    """The file of a media field, or a name for its bytes."""
    value = record.get(field)
    return value if isinstance(value, str) else f"<{field} bytes of {record.get('id')}>"


def _check_kind(record: Mapping) -> str:
    kind = record["kind"]
    if kind not in manifest_lib.KINDS:
        raise KeyError(f"kind {kind!r} is not one of {manifest_lib.KINDS}")
    return kind


def _check_features(record: Mapping, spec: SampleSpec) -> dict:
    stored = record.get("features") or {}
    missing = [name for name in spec.features if name not in stored]
    if missing:
        raise MissingFeatures(f"no precomputed {missing} (record has {sorted(stored)})")
    if "text" in spec.features and np.shape(stored["text"])[0] > spec.text_len:
        raise MissingFeatures(
            f"text feature has {np.shape(stored['text'])[0]} tokens, more than {spec.text_len}"
        )
    return stored


def _start_frame(record: Mapping) -> int:
    """Leading frames to drop (record key start_frame, or meta.start_frame in shard records)."""
    value = record.get("start_frame")
    if value is None:
        value = (record.get("meta") or {}).get("start_frame", 0)
    if isinstance(value, bool) or int(value) != value or value < 0:
        raise ValueError(f"start_frame must be a non-negative integer, got {value!r}")
    return int(value)


def _frame_sampling(record: Mapping, spec: SampleSpec, is_image: bool) -> tuple[int, int, int, int]:
    """(num_frames, stride, min_frames, start) for this record; an image is one frame."""
    if is_image:
        return 1, 1, 1, 0
    stride = transforms.stride_for(record.get("fps"), spec.fps, spec.frame_stride)
    return spec.num_frames, stride, spec.min_frames, _start_frame(record)


def _frames_and_bucket(target: Sequence[int], source: Sequence[int] | None, sampling, spec: SampleSpec):
    """(frame indices, bucket (h, w)) for media of (frames, height, width) `target` and `source`
    (None for t2v). Shared by the metadata pass and decoding, so planned and decoded shapes agree.
    Raises FieldError naming the media at fault: too_small, bad_aspect, too_short."""
    media = {"target": target} if source is None else {"target": target, "source": source}
    for field, (_, height, width) in media.items():
        if min(height, width) < spec.min_size:
            raise FieldError(
                field,
                transforms.SkipSample(
                    f"{field} too small: {height}x{width}, shorter side below data.min_size={spec.min_size}"
                ),
                "too_small",
            )
        if max(height, width) / min(height, width) > spec.max_aspect:
            raise FieldError(
                field,
                transforms.SkipSample(
                    f"{field} aspect ratio {max(height, width) / min(height, width):.2f} ({height}x{width}) "
                    f"above data.max_aspect={spec.max_aspect}"
                ),
                "bad_aspect",
            )
    num_frames, stride, min_frames, start = sampling
    shortest = min(media, key=lambda field: media[field][0])  # the target on a tie
    try:
        idx = transforms.frame_indices(media[shortest][0], num_frames, stride, min_frames, start)
    except transforms.SkipSample as e:
        raise FieldError(shortest, transforms.SkipSample(f"{shortest} {e}"), "too_short") from e
    # Source and target share the bucket of the source's aspect ratio (released loader).
    ref = media.get("source", target)
    return idx, resolution.nearest_training_bucket(ref[1], ref[2], spec.buckets)


# ---------------------------------------------------------------------------------------------------
# Metadata pass: the shape a record will have, without decoding it


def _check_present(value, name: str) -> None:
    """What decoding checks first, so a missing or empty file is caught by the metadata pass."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) == 0:
            raise MediaError(f"{name}: empty input (0 bytes)", "empty")
    elif isinstance(value, (str, os.PathLike)):
        video_io.check_media_file(value)
    else:
        raise TypeError(f"media must be a path or bytes, got {type(value).__name__}")


def _image_size(value, name: str) -> tuple[int, int]:
    """(height, width) from an image's header; pixels are not decoded."""
    try:
        with Image.open(
            io.BytesIO(bytes(value)) if not isinstance(value, (str, os.PathLike)) else value
        ) as im:
            width, height = im.size
    except Exception as e:  # UnidentifiedImageError, OSError, SyntaxError (bad chunks)...
        raise MediaError(f"{name}: cannot read image header ({type(e).__name__}: {e})") from e
    return height, width


def _stated_size(record: Mapping, field: str) -> list:
    """The (frames, height, width) a record states for a media field, None where it states nothing."""
    keys = SIZE_KEYS[field]
    values = [record.get(key) for key in keys]
    if field == "source":
        # A shard record keeps its manifest line in `meta`, whose frames/height/width describe all the
        # sample's media (the record's own are the target's, read at shard build).
        meta = record.get("meta") or {}
        values = [
            value or meta.get(key) or meta.get(shared)
            for value, key, shared in zip(values, keys, SIZE_KEYS["target"])
        ]
    return values


def media_size(record: Mapping, field: str) -> tuple[int, int, int]:
    """(frames, height, width) of one media field: from the record's size keys, else a header probe."""
    value = record[field]
    ext = video_io.normalize_ext(_ext(record, field))
    name = where(record, field)
    frames, height, width = _stated_size(record, field)
    try:
        _check_present(value, name)
        if ext in video_io.IMAGE_EXTS:
            if not (height and width):
                height, width = _image_size(value, name)
            return 1, int(height), int(width)
        if ext not in video_io.VIDEO_EXTS:
            raise MediaError(f"{name}: unsupported extension {ext!r}", "unsupported")
        if not (frames and height and width):
            info = video_io.video_info(value)
            frames, height, width = info["frames"], info["height"], info["width"]
        return int(frames), int(height), int(width)
    except MediaError as e:  # probes of bytes say "<bytes>"; name the record's field instead
        raise FieldError(field, MediaError(str(e).replace("<bytes>", name), e.reason)) from e


def plan_shape(record: Mapping, spec: SampleSpec) -> tuple[int, int, int]:
    """The (T, H, W) prepare_sample makes of this record, from metadata; raises what it would raise."""
    kind = _check_kind(record)
    _check_features(record, spec)
    sampling = _frame_sampling(record, spec, kind == "image_edit")
    target = media_size(record, "target")
    source = media_size(record, "source") if kind != "t2v" else None
    idx, size = _frames_and_bucket(target, source, sampling, spec)
    return (len(idx),) + tuple(size)


def skip_marker(record, index: int, error: Exception) -> dict:
    """The skip marker of a known kind of bad item; re-raises anything else (a bug or a config error)."""
    if isinstance(error, ConfigError):  # not the item's fault: every item would fail alike
        raise error
    is_record = isinstance(record, Mapping)
    sample_id = record.get("id", f"<index {index}>") if is_record else f"<index {index}>"
    target = where(record, "target") if is_record else ""
    if isinstance(error, FieldError):
        reason, path, message = error.reason, where(record, error.field), str(error.error)
    elif isinstance(error, MissingFeatures):
        reason, path, message = "missing_features", target, str(error)
    elif isinstance(error, transforms.SkipSample):
        reason, path, message = "too_short", target, str(error)
    elif isinstance(error, (KeyError, TypeError, ValueError)):
        reason, path, message = "bad_record", "", f"malformed record: {type(error).__name__}: {error}"
    else:
        raise error
    return {SKIP_KEY: reason, "id": str(sample_id), "index": int(index), "path": path, "message": message}


# ---------------------------------------------------------------------------------------------------
# Decoding one sample


def _decode(record: Mapping, field: str, max_frames: int | None) -> np.ndarray:
    try:
        return video_io.decode_media(record[field], _ext(record, field), max_frames=max_frames)
    except MediaError as e:
        raise FieldError(field, e) from e


def prepare_sample(record: Mapping, index: int, spec: SampleSpec) -> dict:
    """One record -> one sample dict of uint8 arrays at its bucket's size (raises on bad input)."""
    kind = _check_kind(record)
    stored = _check_features(record, spec)
    text = record["text"]
    rng = np.random.default_rng([spec.seed, index])
    # An image where a clip belongs decodes as 1 frame and is skipped as too short below.
    sampling = _frame_sampling(record, spec, kind == "image_edit")
    num_frames, stride, _, start = sampling
    max_frames = transforms.frames_needed(num_frames, stride, start)

    target = _decode(record, "target", max_frames)
    source = _decode(record, "source", max_frames) if kind != "t2v" else None
    idx, size = _frames_and_bucket(
        target.shape[:3], None if source is None else source.shape[:3], sampling, spec
    )
    target = resolution.cover_and_crop(target[idx], size)
    task = EDIT_TASK
    if source is not None:
        source = resolution.cover_and_crop(source[idx], size)
    elif spec.pretext is not None:
        made = pretext_lib.apply_pretext(target, text, spec.pretext, rng, index)
        source, text, task = made.source, made.text, made.task
    else:
        # A raw clip outside motion-alignment training is plain text-to-video: no source content.
        source, task = np.zeros_like(target), "none"
    anchors = target[transforms.anchor_indices(target.shape[0], spec.anchor_frames)]
    sample = dict(
        source=source, target=target, anchors=anchors, text=text, kind=kind, id=str(record["id"]), task=task
    )
    sample.update(_features(stored, spec))
    return sample


def _features(stored: Mapping, spec: SampleSpec) -> dict:
    out = {}
    for name in spec.features:
        value = np.asarray(stored[name])
        if name == "text":  # stored cut to its true length; the DiT takes text_len tokens, zeros after
            value = np.pad(value, ((0, spec.text_len - value.shape[0]),) + ((0, 0),) * (value.ndim - 1))
        out[FEATURE_PREFIX + name] = value
    return out


def padding_sample(record: Mapping, shape: tuple[int, int, int], spec: SampleSpec) -> dict:
    """The valid=False stand-in for a planned sample that could not be made: zeros of its shape."""
    t, h, w = shape
    frames = np.zeros((t, h, w, 3), np.uint8)
    anchors = np.zeros((len(transforms.anchor_indices(t, spec.anchor_frames)), h, w, 3), np.uint8)
    sample = dict(
        source=frames,
        target=frames,
        anchors=anchors,
        text="",
        kind=str(record.get("kind", "")),
        id=str(record.get("id", "")),
        task="",
        valid=False,
    )
    # The metadata pass found the features in the record, so their shapes are known.
    sample.update({k: np.zeros_like(v) for k, v in _features(record.get("features") or {}, spec).items()})
    return sample


def collate(samples: Sequence[dict]) -> dict:
    """Samples of one shape -> a batch: arrays (and features) stacked, strings as numpy str arrays."""
    stacked = [k for k in samples[0] if k in ARRAY_KEYS or k.startswith(FEATURE_PREFIX)]
    batch = {k: np.stack([s[k] for s in samples]) for k in stacked}
    batch.update({k: np.array([s[k] for s in samples]) for k in STRING_KEYS})
    batch["valid"] = np.array([s.get("valid", True) for s in samples], bool)
    return batch
