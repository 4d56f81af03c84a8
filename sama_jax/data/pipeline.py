"""Grain training pipelines: stage mixtures -> one global bucket plan -> each process decodes its slice.

    sources = open_sources(config.data.mixture)                  # one random-access source per entry
    ds = build_pipeline(config.data, sources, batch_size=32, seed=config.seed)   # 32 per process
    it = iter(ds)
    batch = next(it)       # numpy: source/target (B,T,H,W,3) uint8, anchors (B,N,H,W,3) uint8,
                           #        valid (B,) bool, text, kind, id, task (B,) str arrays
    state = it.get_state() # JSON-able; it.set_state(state) resumes with exactly the same batches
    it.skip_summary()      # {"total": n, "counts": {"missing": 1, ...}, "padded": 0, "examples": [...]}

The graph:
  per mixture entry: source -> shuffle(seed_i) -> repeat(num_epochs; reshuffled each epoch)
  -> MapDataset.mix(weights)        the global stream of records (grain.MapDataset, random access),
                                     the same on every process
  -> map_with_index(ShapeProbe)     metadata pass: the (T, H, W) each record will become, from cheap
                                     metadata (plan_shape), or a skip marker; in order, in the calling
                                     thread (data.metadata_threads > 0: read-ahead threads)
  -> GlobalPlanner                  groups stream positions of one (T, H, W) into GLOBAL batches of
                                     batch_size * process_count positions. Every process runs it over
                                     the whole stream, so every process holds the same plan
  -> positions [i*B, (i+1)*B) of each global batch: process i decodes only these (PlannedDecoder:
     prepare_sample at the position) in this process (data.read_threads threads) or in
     data.worker_count spawned worker processes (frames come back through shared memory), and
     stacks them (collate).
Per-sample RNG = default_rng([seed, position]), so a sample is reproducible from (seed, position)
whatever the host, process count or worker count; the batches are the same for any worker count.
At every step all processes yield the same (B, T, H, W): what jax.make_array_from_process_local_data
needs to build global arrays. The union of the processes' batches at a step is exactly the batch one
process with batch_size * process_count would yield.

Why not Grain's mp_prefetch for decoding: its workers derive their element indices from a static
pipeline, while the positions a process decodes come from the sequential plan, which only the main
process computes (workers would each redo the metadata pass of the whole global stream).

Metadata (plan_shape): a record's frames/height/width describe its target (ShardSource records carry
the header values of both) and source_frames/source_height/source_width its source. A manifest line's
frames/height/width describe all its media (sama-make-synthetic writes them): ManifestSource copies
them to the source_* keys, and for a shard record they are read from `meta` (its manifest line).
Whatever is absent is probed: video_io.video_info for a video (opens the container and counts its
packets, which also finds truncated files), the image header for an image. A media path is always
checked to exist and be non-empty. Every process pays this per sample of the GLOBAL batch
(benchmarks/data_metadata_pass.py, one core, 81-frame 480x832 clip): 0.012 ms with size keys; 12 ms
for a video probe (av.open alone takes 12 of them: FFmpeg probes the stream), i.e. 6 s a step at a
global batch of 512; a shard record read 0.4 ms from the page cache plus the probe of its
source (shards store the target's size only). So give large runs size keys for all media.

Bad items, decided identically everywhere: a missing, empty, corrupt or truncated file
(video_io.MediaError), a clip too short for min_frames (transforms.SkipSample), a malformed record or
missing precomputed features is found by the metadata pass, which every process runs on the same
records, so every process drops it from the plan alike. It is logged with its id and path and counted
by reason; nothing is substituted in its place.
A sample that passes the metadata pass but then fails to decode, or decodes to another shape than
its metadata predicted (wrong metadata), is only seen by the process that owns it. That process
keeps the planned shape: the slot becomes zeros with valid=False in the batch (the train step must
weight per-sample losses by `valid`), and it is logged and counted by reason (shape_mismatch for a
wrong shape) and in skip_summary()["padded"]. Other processes are unaffected. No other data is
substituted. `sama-build-shards --check decode` rules such failures out ahead of training.

Resume: the iterator state is the metadata stream position of the next unread record plus the
positions waiting in partly filled global buckets (and the counts); set_state re-probes those few
positions and restarts the stream at the saved position. Every process saves the same plan state.

Records are dicts: id, kind (video_edit | image_edit | t2v), text, target and source (encoded bytes,
or a path), target_ext and source_ext (derived from the path when absent), optional fps, start_frame
(frames to drop from the start of source and target; OpenVE-3M: 4; in `meta` for shard records),
the size metadata above and features ({name: array}). A source of such dicts is anything with __len__
and __getitem__: ManifestSource (a JSONL manifest), arrayrecord.ShardSource (ArrayRecord shards), or
a list.

Precomputed features (sama-precompute): the names in data.features are carried into the batch as
"features/<name>", stacked; "text" is zero-padded to text_len tokens. A sample without one of them is
skipped as missing_features. Text and source features cannot be combined with motion alignment.
"""
from __future__ import annotations

import collections
import concurrent.futures
import dataclasses
import io
import logging
import multiprocessing
from multiprocessing import resource_tracker, shared_memory
import os
import weakref
from typing import Any, Mapping, Sequence

import grain
from absl import flags
import numpy as np
from PIL import Image

from sama_jax import features as features_lib
from sama_jax.data import manifest as manifest_lib
from sama_jax.data import pretext as pretext_lib
from sama_jax.data import transforms
from sama_jax.data import video_io
from sama_jax.data.video_io import MediaError, decode_media

log = logging.getLogger(__name__)

EDIT_TASK = "edit"          # the task name of real editing pairs (no pretext)
SKIP_KEY = "skipped"        # present (with the reason) only in skip markers
FEATURE_PREFIX = features_lib.BATCH_PREFIX
MAX_SKIP_EXAMPLES = 100     # examples kept in the summary; every skip is logged and counted
SIZE_KEYS = {"target": ("frames", "height", "width"),
             "source": ("source_frames", "source_height", "source_width")}


# ---------------------------------------------------------------------------------------------------
# Sources


class ManifestSource:
    """Random access over a JSONL manifest's samples, media paths resolved against the manifest."""

    def __init__(self, path: str):
        self.path = os.fspath(path)
        self._records = []
        for sample in manifest_lib.read_manifest(self.path):
            record = dict(sample)
            for field in ("source", "target"):
                if record.get(field):
                    record[field] = manifest_lib.resolve(self.path, record[field])
            if record["kind"] != "t2v":
                # A manifest's frames/height/width describe all the sample's media (see the docstring).
                for key, source_key in zip(SIZE_KEYS["target"], SIZE_KEYS["source"]):
                    if key in record and source_key not in record:
                        record[source_key] = record[key]
            self._records.append(record)

    def __len__(self) -> int:
        return len(self._records)

    def __getitem__(self, index: int) -> dict:
        return self._records[index]

    def __repr__(self) -> str:
        return f"ManifestSource({self.path!r}, {len(self)} samples)"


def open_sources(mixture: Sequence[Mapping[str, Any]], root: str = "") -> list[tuple[dict, Any]]:
    """(entry, source) for each mixture entry, paths relative to root.

    An entry names `shards` (a directory built by sama-build-shards: arrayrecord.ShardSource) or a
    `manifest` (JSONL, media read from the files it lists); shards win when both are given.
    """
    opened = []
    for entry in mixture:
        entry = dict(entry)
        if entry.get("shards"):
            from sama_jax.data import arrayrecord
            source = arrayrecord.ShardSource(os.path.join(root, entry["shards"]))
        elif entry.get("manifest"):
            source = ManifestSource(os.path.join(root, entry["manifest"]))
        else:
            raise ValueError(f"mixture entry {entry} names neither shards nor a manifest")
        if len(source) == 0:
            raise ValueError(f"{source!r}: mixture entry {entry} has no samples")
        opened.append((entry, source))
    return opened


# ---------------------------------------------------------------------------------------------------
# What a sample becomes


@dataclasses.dataclass(frozen=True)
class SampleSpec:
    """What one sample becomes; built from config.data with `from_config`."""
    num_frames: int = 81
    frame_stride: int = 1
    fps: float = 0.0                  # > 0: stride = round(record fps / fps) when the record has fps
    min_frames: int = 5               # a video giving fewer 4k+1 frames is skipped as too short
    buckets: tuple = ((480, 832),)
    anchor_frames: int = 1
    pretext: pretext_lib.PretextConfig | None = None   # set: t2v clips get a motion-alignment source
    seed: int = 0
    features: tuple = ()              # precomputed features to carry, e.g. ("text", "semantic")
    text_len: int = 512               # the "text" feature is zero-padded to this many tokens

    def __post_init__(self):
        # Motion alignment rewrites the instruction and makes the source at train time, so features
        # of the stored text or source cannot match what the sample becomes.
        stale = {"text", "source_latents"} & set(self.features)
        if self.pretext is not None and stale:
            raise ValueError(f"precomputed features {sorted(stale)} cannot be used with motion alignment "
                             f"(it prepends a task token and makes the source per step); encode them "
                             f"online or drop them from data.features")

    @classmethod
    def from_config(cls, data, seed: int, anchor_frames: int = 1, text_len: int = 512) -> "SampleSpec":
        get = data.get
        pretext = None
        if get("motion_alignment", False):
            pretext = pretext_lib.PretextConfig.from_config(get("pretext", None))
        buckets = transforms.make_buckets(int(data["pixels"]), tuple(data["aspect_ratios"]),
                                          int(data["size_multiple"]))
        return cls(num_frames=int(data["num_frames"]), frame_stride=int(get("frame_stride", 1)),
                   fps=float(get("fps", 0.0)), min_frames=int(get("min_frames", 5)),
                   buckets=tuple(buckets), anchor_frames=int(get("anchor_frames", anchor_frames)),
                   pretext=pretext, seed=int(seed), features=tuple(get("features", ())),
                   text_len=int(get("text_len", text_len)))


def _ext(record: Mapping, field: str) -> str:
    ext = record.get(f"{field}_ext")
    if ext:
        return ext
    value = record.get(field)
    if isinstance(value, str):
        return os.path.splitext(value)[1]
    raise KeyError(f"{field}_ext (the media is bytes, so the extension must be given)")


def _where(record: Mapping, field: str) -> str:
    value = record.get(field)
    return value if isinstance(value, str) else f"<{field} bytes of {record.get('id')}>"


def _decode(record: Mapping, field: str, max_frames: int | None) -> np.ndarray:
    try:
        return decode_media(record[field], _ext(record, field), max_frames=max_frames)
    except MediaError as e:
        raise _FieldError(field, e) from e


class _MissingFeatures(Exception):
    """A precomputed feature that data.features asks for is absent from the record (or unusable)."""


class _FieldError(Exception):
    """The MediaError of one media field ("source" or "target") of a record, with the field's name."""

    def __init__(self, field: str, error: Exception):
        super().__init__(str(error))
        self.field, self.error = field, error


def _check_kind(record: Mapping) -> str:
    kind = record["kind"]
    if kind not in manifest_lib.KINDS:
        raise KeyError(f"kind {kind!r} is not one of {manifest_lib.KINDS}")
    return kind


def _check_features(record: Mapping, spec: SampleSpec) -> dict:
    stored = record.get("features") or {}
    missing = [name for name in spec.features if name not in stored]
    if missing:
        raise _MissingFeatures(f"no precomputed {missing} (record has {sorted(stored)})")
    if "text" in spec.features and np.shape(stored["text"])[0] > spec.text_len:
        raise _MissingFeatures(f"text feature has {np.shape(stored['text'])[0]} tokens, "
                               f"more than {spec.text_len}")
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


# ---------------------------------------------------------------------------------------------------
# Metadata pass: the shape a record will have, without decoding it


def _check_present(value, name: str) -> None:
    """The existence checks decoding starts with, so a missing or empty file is caught here."""
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) == 0:
            raise MediaError(f"{name}: empty input (0 bytes)", "empty")
        return
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(f"media must be a path or bytes, got {type(value).__name__}")
    if not os.path.isfile(value):
        raise MediaError(f"{name}: file does not exist", "missing")
    if os.path.getsize(value) == 0:
        raise MediaError(f"{name}: empty file (0 bytes)", "empty")


def _image_size(value, name: str) -> tuple[int, int]:
    """(height, width) from an image's header; pixels are not decoded."""
    try:
        with Image.open(io.BytesIO(bytes(value)) if not isinstance(value, (str, os.PathLike)) else value) as im:
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
        values = [value or meta.get(key) or meta.get(shared)
                  for value, key, shared in zip(values, keys, SIZE_KEYS["target"])]
    return values


def media_size(record: Mapping, field: str) -> tuple[int, int, int]:
    """(frames, height, width) of one media field: from the record's size keys, else a header probe."""
    value = record[field]
    ext = video_io.normalize_ext(_ext(record, field))
    name = _where(record, field)
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
        raise _FieldError(field, MediaError(str(e).replace("<bytes>", name), e.reason)) from e


def plan_shape(record: Mapping, spec: SampleSpec) -> tuple[int, int, int]:
    """The (T, H, W) prepare_sample makes of this record, from metadata; raises what it would raise."""
    kind = _check_kind(record)
    _check_features(record, spec)
    sampling = _frame_sampling(record, spec, kind == "image_edit")
    target = media_size(record, "target")
    source = media_size(record, "source") if kind != "t2v" else None
    idx, size = _frames_and_bucket(target, source, sampling, spec)
    return (len(idx),) + tuple(size)


def _frames_and_bucket(target: Sequence[int], source: Sequence[int] | None, sampling, spec: SampleSpec):
    """(frame indices, bucket (h, w)) for media of (frames, height, width) `target` and `source`
    (None for t2v). Shared by the metadata pass and decoding, so planned and decoded shapes agree."""
    num_frames, stride, min_frames, start = sampling
    total = target[0] if source is None else min(target[0], source[0])
    idx = transforms.frame_indices(total, num_frames, stride, min_frames, start)
    # Source and target share the bucket of the source's aspect ratio (released loader).
    ref = target if source is None else source
    return idx, transforms.nearest_bucket(ref[1], ref[2], spec.buckets)


def _skip_marker(record, index: int, error: Exception) -> dict:
    """The skip marker of a known kind of bad item (re-raises anything else: a bug, not bad data)."""
    is_record = isinstance(record, Mapping)
    sample_id = record.get("id", f"<index {index}>") if is_record else f"<index {index}>"
    target = _where(record, "target") if is_record else ""
    if isinstance(error, _FieldError):
        reason, path, message = error.error.reason, _where(record, error.field), str(error.error)
    elif isinstance(error, _MissingFeatures):
        reason, path, message = "missing_features", target, str(error)
    elif isinstance(error, transforms.SkipSample):
        reason, path, message = "too_short", target, str(error)
    elif isinstance(error, (KeyError, TypeError, ValueError)):
        reason, path, message = "bad_record", "", f"malformed record: {type(error).__name__}: {error}"
    else:
        raise error
    return {SKIP_KEY: reason, "id": str(sample_id), "index": int(index), "path": path, "message": message}


class ShapeProbe:
    """map_with_index transform of the metadata pass: {"shape": (T, H, W)} or a skip marker."""

    def __init__(self, spec: SampleSpec):
        self.spec = spec

    def __call__(self, index: int, record: Mapping) -> dict:
        try:
            return {"shape": plan_shape(record, self.spec)}
        except Exception as e:  # noqa: BLE001 - _skip_marker re-raises all but the bad-item kinds
            return _skip_marker(record, index, e)


# ---------------------------------------------------------------------------------------------------
# Decoding one sample


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
    idx, size = _frames_and_bucket(target.shape[:3], None if source is None else source.shape[:3],
                                   sampling, spec)
    target = transforms.resize_and_crop(target[idx], size)
    task = EDIT_TASK
    if source is not None:
        source = transforms.resize_and_crop(source[idx], size)
    elif spec.pretext is not None:
        made = pretext_lib.apply_pretext(target, text, spec.pretext, rng, index)
        source, text, task = made.source, made.text, made.task
    else:
        # A raw clip outside motion-alignment training is plain text-to-video: no source content.
        source, task = np.zeros_like(target), "none"
    anchors = target[transforms.anchor_indices(target.shape[0], spec.anchor_frames)]
    sample = dict(source=source, target=target, anchors=anchors, text=text, kind=kind,
                  id=str(record["id"]), task=task)
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
    sample = dict(source=frames, target=frames, anchors=anchors, text="", kind=str(record.get("kind", "")),
                  id=str(record.get("id", "")), task="", valid=False)
    # The metadata pass found the features in the record, so their shapes are known.
    sample.update({k: np.zeros_like(v) for k, v in _features(record.get("features") or {}, spec).items()})
    return sample


class PlannedDecoder:
    """(position, planned shape) -> (sample, None), or (padding, skip marker) when it cannot be made.

    Picklable: worker processes hold a copy of the record stream and decode by position.
    """

    def __init__(self, records: grain.MapDataset, spec: SampleSpec):
        self.records, self.spec = records, spec

    def __call__(self, position: int, shape: tuple[int, int, int]) -> tuple[dict, dict | None]:
        record = self.records[position]
        try:
            sample = prepare_sample(record, position, self.spec)
        except Exception as e:  # noqa: BLE001 - _skip_marker re-raises all but the bad-item kinds
            problem = _skip_marker(record, position, e)
        else:
            got = tuple(sample["source"].shape[:3])
            if got == tuple(shape):
                sample["valid"] = True
                return sample, None
            problem = {SKIP_KEY: "shape_mismatch", "id": str(record.get("id")), "index": int(position),
                       "path": _where(record, "source" if record.get("source") else "target"),
                       "message": f"decoded to (T, H, W) {got}, its metadata predicted {tuple(shape)}"}
        return padding_sample(record, shape, self.spec), problem


_WORKER_DECODER: PlannedDecoder | None = None


def _start_worker(decoder: PlannedDecoder) -> None:
    global _WORKER_DECODER
    # Grain reads absl flags; a spawned process has them unparsed and every read would raise.
    if not flags.FLAGS.is_parsed():
        flags.FLAGS.mark_as_parsed()
    _WORKER_DECODER = decoder


def _decode_in_worker(position: int, shape: tuple[int, int, int]):
    sample, problem = _WORKER_DECODER(position, shape)
    return {k: _to_shared(v) for k, v in sample.items()}, problem


# Frames go back to the main process through shared memory: pickling them through the pool's pipe
# cost the main process ~4x more CPU per sample (measured with benchmarks/data_throughput.py).
_SHARED_MIN_BYTES = 1 << 14


@dataclasses.dataclass(frozen=True)
class _SharedArray:
    name: str
    shape: tuple
    dtype: str


def _to_shared(value):
    if not isinstance(value, np.ndarray) or value.nbytes < _SHARED_MIN_BYTES:
        return value
    block = shared_memory.SharedMemory(create=True, size=value.nbytes)
    np.ndarray(value.shape, value.dtype, buffer=block.buf)[...] = value
    # The main process unlinks the block once read; untrack it here, or this worker's resource
    # tracker would unlink it again (with a warning) when the worker exits.
    resource_tracker.unregister(block._name, "shared_memory")
    block.close()
    return _SharedArray(block.name, value.shape, value.dtype.str)


def _from_shared(value):
    if not isinstance(value, _SharedArray):
        return value
    block = shared_memory.SharedMemory(name=value.name)
    try:
        return np.ndarray(value.shape, np.dtype(value.dtype), buffer=block.buf).copy()
    finally:
        block.close()
        block.unlink()


def _from_worker(result) -> tuple[dict, dict | None]:
    sample, problem = result
    return {k: _from_shared(v) for k, v in sample.items()}, problem


def _discard(job: concurrent.futures.Future) -> None:
    """Frees the shared memory of a worker's result that will not be used (done-callback)."""
    if not job.cancelled() and job.exception() is None:
        _from_worker(job.result())


# ---------------------------------------------------------------------------------------------------
# The global plan and the per-process batches


ARRAY_KEYS = ("source", "target", "anchors")
STRING_KEYS = ("text", "kind", "id", "task")


def collate(samples: Sequence[dict]) -> dict:
    """Samples of one shape -> a batch: arrays (and features) stacked, strings as numpy str arrays."""
    stacked = [k for k in samples[0] if k in ARRAY_KEYS or k.startswith(FEATURE_PREFIX)]
    batch = {k: np.stack([s[k] for s in samples]) for k in stacked}
    batch.update({k: np.array([s[k] for s in samples]) for k in STRING_KEYS})
    batch["valid"] = np.array([s.get("valid", True) for s in samples], bool)
    return batch


class _Counter:
    """Skips by reason, the first MAX_SKIP_EXAMPLES of them, each logged."""

    def __init__(self, counts=None, examples=None):
        self.counts = {k: int(v) for k, v in (counts or {}).items()}
        self.examples = list(examples or [])

    def add(self, marker: dict, what: str) -> None:
        reason = marker[SKIP_KEY]
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < MAX_SKIP_EXAMPLES:
            self.examples.append({k: marker[k] for k in (SKIP_KEY, "id", "index", "path", "message")})
        log.warning("%s sample %s (%s) at %s: %s", what, marker["id"], reason, marker["path"],
                    marker["message"])


class GlobalPlanner:
    """Global batches of stream positions sharing one (T, H, W), from the metadata pass.

    Positions wait in one buffer per shape; a buffer reaching global_batch is emitted, so the plan
    follows the stream deterministically and is the same on every process. At the end of a finite
    stream the partial buffers are emitted (oldest first) unless drop_remainder.
    """

    def __init__(self, shapes: grain.MapDataset, global_batch: int, read_options: grain.ReadOptions,
                 drop_remainder: bool, max_consecutive_skips: int):
        self.shapes, self.global_batch = shapes, global_batch
        self.read_options, self.drop_remainder = read_options, drop_remainder
        self.max_consecutive_skips = max_consecutive_skips
        self._upstream = None
        self.restore(None)

    def _open(self):
        # A slice of the MapDataset keeps every record's global position; Grain's read threads keep
        # the order.
        self._upstream = iter(self.shapes[self._next_position:].to_iter_dataset(self.read_options))

    def close(self):
        if self._upstream is not None and hasattr(self._upstream, "close"):
            self._upstream.close()
        self._upstream = None

    def _skip(self, marker: dict):
        self._skips.add(marker, "skipping")
        self._consecutive_skips += 1
        if self._consecutive_skips >= self.max_consecutive_skips:
            raise RuntimeError(f"{self._consecutive_skips} samples in a row were unusable; the data "
                               f"is broken, not a few items: {self._skips.counts} {self._skips.examples}")

    def next(self) -> tuple[tuple[int, int, int], list[int]] | None:
        """(shape, positions) of the next global batch, or None at the end of the stream."""
        while not self._exhausted:
            if self._upstream is None:
                self._open()
            try:
                item = next(self._upstream)
            except StopIteration:
                self._exhausted = True
                self.close()
                break
            position = self._next_position
            self._next_position += 1
            if SKIP_KEY in item:
                self._skip(item)
                continue
            self._consecutive_skips = 0
            shape = tuple(item["shape"])
            bucket = self._buffers.setdefault(shape, [])
            bucket.append(position)
            if len(bucket) == self.global_batch:
                return shape, self._buffers.pop(shape)
        if self._buffers and not self.drop_remainder:
            shape = min(self._buffers, key=lambda k: self._buffers[k][0])
            return shape, self._buffers.pop(shape)
        return None

    def state(self) -> dict:
        return {"next_position": self._next_position,
                "waiting": sorted(p for bucket in self._buffers.values() for p in bucket),
                "exhausted": self._exhausted, "skip_counts": dict(self._skips.counts),
                "skip_examples": list(self._skips.examples), "consecutive_skips": self._consecutive_skips}

    def restore(self, state: dict | None) -> None:
        """Back to a saved state (None: the start); waiting positions are probed again."""
        self.close()
        state = state or {}
        self._next_position = int(state.get("next_position", 0))
        self._exhausted = bool(state.get("exhausted", False))
        self._skips = _Counter(state.get("skip_counts"), state.get("skip_examples"))
        self._consecutive_skips = int(state.get("consecutive_skips", 0))
        self._buffers: dict[tuple, list[int]] = {}
        for position in state.get("waiting", ()):
            item = self.shapes[int(position)]
            if SKIP_KEY in item:  # usable when saved, not now (a file changed since): every process agrees
                self._skip(item)
                continue
            self._buffers.setdefault(tuple(item["shape"]), []).append(int(position))


class BucketBatchDataset(grain.IterDataset):
    """This process's batches: its slice of each global batch of the plan, decoded and stacked."""

    def __init__(self, records: grain.MapDataset, spec: SampleSpec, batch_size: int, *,
                 process_index: int = 0, process_count: int = 1, worker_count: int = 0,
                 read_threads: int = 1, metadata_threads: int = 0, prefetch: int = 2,
                 drop_remainder: bool = True, max_consecutive_skips: int = 1000):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        if process_count > 1 and not drop_remainder:
            raise ValueError("drop_remainder=False needs a single process: the last, partial global "
                             "batch would give processes different batch sizes")
        self.records, self.spec = records, spec
        self.batch_size, self.process_index, self.process_count = batch_size, process_index, process_count
        self.worker_count, self.read_threads, self.prefetch = worker_count, read_threads, prefetch
        # metadata_threads 0 runs the metadata pass in the calling thread: a thread probing headers
        # while this thread decodes makes both wait on the GIL (measured: decodes 2 ms -> 60 ms).
        # > 0 reads ahead about one global batch with threads: for probes that wait on remote storage
        # while worker processes decode.
        self.metadata_options = grain.ReadOptions(num_threads=metadata_threads,
                                                  prefetch_buffer_size=batch_size * process_count)
        self.drop_remainder = drop_remainder
        self.max_consecutive_skips = max_consecutive_skips

    def __iter__(self) -> "BucketBatchIterator":
        return BucketBatchIterator(self)

    def __str__(self) -> str:
        return (f"BucketBatchDataset(batch_size={self.batch_size}, process {self.process_index} of "
                f"{self.process_count}, workers={self.worker_count})")


class BucketBatchIterator(grain.DatasetIterator):

    def __init__(self, ds: BucketBatchDataset):
        super().__init__()
        self._ds = ds
        self._decoder = PlannedDecoder(ds.records, ds.spec)
        self._planner = GlobalPlanner(ds.records.map_with_index(ShapeProbe(ds.spec)),
                                      ds.batch_size * ds.process_count, ds.metadata_options,
                                      ds.drop_remainder, ds.max_consecutive_skips)
        self._pool = None
        # Planned batches in flight: (shape, this process's positions, plan state after it, futures).
        self._ahead: collections.deque = collections.deque()
        self._state = self._planner.state()      # the plan state after the last batch returned
        self._padded = _Counter()

    def _executor(self):
        if self._pool is None:
            if self._ds.worker_count > 0:
                # Spawned, not forked: a caller's threads (JAX, Grain) cannot deadlock the children.
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    self._ds.worker_count, mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_worker, initargs=(self._decoder,))
            elif self._ds.read_threads > 1:
                self._pool = concurrent.futures.ThreadPoolExecutor(self._ds.read_threads)
            else:
                return None
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        return self._pool

    def _plan_ahead(self):
        pool = self._executor()
        depth = 1 + (max(0, self._ds.prefetch) if pool is not None else 0)
        while len(self._ahead) < depth:
            planned = self._planner.next()
            if planned is None:
                return
            shape, positions = planned
            first = self._ds.process_index * self._ds.batch_size
            mine = positions[first:first + self._ds.batch_size]
            if pool is None:
                jobs = [None] * len(mine)     # decoded when the batch is taken
            elif self._ds.worker_count > 0:
                jobs = [pool.submit(_decode_in_worker, p, shape) for p in mine]
            else:
                jobs = [pool.submit(self._decoder, p, shape) for p in mine]
            self._ahead.append((shape, mine, self._planner.state(), jobs))

    def __next__(self) -> dict:
        self._plan_ahead()
        if not self._ahead:
            self._state = self._planner.state()   # the end: the skips found after the last batch count
            raise StopIteration
        shape, mine, state, jobs = self._ahead.popleft()
        self._plan_ahead()   # keep the workers busy while this batch is gathered
        results = [self._decoder(p, shape) if job is None
                   else _from_worker(job.result()) if self._ds.worker_count > 0 else job.result()
                   for p, job in zip(mine, jobs)]
        for _, problem in results:
            if problem is not None:
                self._padded.add(problem, "padding (valid=False) for")
        self._state = state
        return collate([sample for sample, _ in results])

    def _drop_ahead(self):
        for _, _, _, jobs in self._ahead:
            for job in jobs:
                if job is not None and not job.cancel() and self._ds.worker_count > 0:
                    job.add_done_callback(_discard)   # runs now if done, else when it finishes
        self._ahead.clear()

    def get_state(self) -> dict:
        return dict(self._state, padded_counts=dict(self._padded.counts),
                    padded_examples=list(self._padded.examples))

    def set_state(self, state: dict) -> None:
        self._drop_ahead()
        self._planner.restore(state)
        self._state = self._planner.state()
        self._padded = _Counter(state.get("padded_counts"), state.get("padded_examples"))

    def skip_summary(self) -> dict:
        """Bad items so far: total, counts by reason, how many were padded, first examples."""
        counts = dict(self._state["skip_counts"])
        for reason, n in self._padded.counts.items():
            counts[reason] = counts.get(reason, 0) + n
        examples = (self._state["skip_examples"] + self._padded.examples)[:MAX_SKIP_EXAMPLES]
        return {"total": sum(counts.values()), "counts": counts,
                "padded": sum(self._padded.counts.values()), "examples": examples}

    def close(self) -> None:
        self._drop_ahead()
        self._planner.close()
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None
        super().close()


# ---------------------------------------------------------------------------------------------------
# The pipeline


def _sub_seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([seed, i]).generate_state(1)[0])


def mix_sources(sources: Sequence[tuple[Mapping, Any]], seed: int,
                num_epochs: int | None = None) -> grain.MapDataset:
    """Globally shuffled, repeated, weight-mixed records; each epoch of each source is reshuffled."""
    parts, weights = [], []
    for i, (entry, source) in enumerate(sources):
        weight = float(entry.get("weight", 1.0))
        if weight <= 0:
            continue
        parts.append(grain.MapDataset.source(source).shuffle(seed=_sub_seed(seed, i)).repeat(num_epochs))
        weights.append(weight)
    if not parts:
        raise ValueError("the data mixture has no entry with a positive weight")
    return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)


def build_pipeline(data, sources: Sequence[tuple[Mapping, Any]], *, batch_size: int, seed: int,
                   num_epochs: int | None = None, process_index: int | None = None,
                   process_count: int | None = None, worker_count: int | None = None,
                   anchor_frames: int = 1, text_len: int = 512,
                   drop_remainder: bool = True) -> BucketBatchDataset:
    """The training pipeline for config.data over opened sources; batch_size is per process.

    process_index/count default to jax.process_index()/process_count(); every process must be given
    the same config, sources, seed and batch_size (it computes the same global plan). worker_count defaults to
    data.worker_count (0: decode in this process with data.read_threads threads).
    """
    if process_index is None or process_count is None:
        import jax
        process_index, process_count = jax.process_index(), jax.process_count()
    spec = SampleSpec.from_config(data, seed, anchor_frames=anchor_frames, text_len=text_len)
    records = mix_sources(sources, seed, num_epochs)
    workers = int(data.get("worker_count", 0)) if worker_count is None else worker_count
    return BucketBatchDataset(records, spec, batch_size, process_index=process_index,
                              process_count=process_count, worker_count=workers,
                              read_threads=int(data.get("read_threads", 1)),
                              metadata_threads=int(data.get("metadata_threads", 0)),
                              prefetch=int(data.get("prefetch", 2)), drop_remainder=drop_remainder)
