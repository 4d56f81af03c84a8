"""Grain training pipelines: stage mixtures -> decode + host transforms -> batches of one shape each.

    sources = open_sources(config.data.mixture)                  # one random-access source per entry
    ds = build_pipeline(config.data, sources, batch_size=32, seed=config.seed)
    it = iter(ds)
    batch = next(it)       # numpy: source/target (B,T,H,W,3) uint8, anchors (B,N,H,W,3) uint8,
                           #        text, kind, id, task (B,) str arrays
    state = it.get_state() # JSON-able; it.set_state(state) resumes with exactly the same batches
    it.skip_summary()      # {"total": n, "counts": {"missing": 1, "too_short": 2, ...}, "examples": [...]}

The graph, all Grain (grain.MapDataset) until the batching step:
  per mixture entry: source -> shuffle(seed_i) -> repeat(num_epochs; reshuffled each epoch)
  -> MapDataset.mix(weights)        deterministic interleave in proportion to the weights
  -> map_with_index(SampleTransform) decode, sample 4k+1 frames, bucket resize/crop, pretext, anchors;
                                     per-sample RNG = default_rng([seed, index]) with `index` the
                                     position in the global mixed stream, so a sample is reproducible
                                     from (seed, index) whatever the host or worker count
  -> [process_index::process_count] per-process shard (multi-host)
  -> to_iter_dataset / mp_prefetch  worker processes keep the stream order, so batches do not depend
                                     on the worker count
  -> BucketBatchDataset              groups samples of one (T, H, W) into batches

Records are dicts: id, kind (video_edit | image_edit | t2v), text, target and source (encoded bytes,
or a path), target_ext and source_ext (derived from the path when absent), optional fps and
features ({name: array}). A source of such dicts is anything with __len__ and __getitem__:
ManifestSource (a JSONL manifest), arrayrecord.ShardSource (ArrayRecord shards), or a list.

Precomputed features (sama-precompute): the names in data.features are carried into the batch as
"features/<name>", stacked; "text" is zero-padded to text_len tokens. A sample without one of them is
skipped as missing_features. Text and source features cannot be combined with motion alignment.

Bad items: a missing, empty, corrupt or truncated file (video_io.MediaError), a clip too short for
min_frames (transforms.SkipSample) or a malformed record becomes a skip marker instead of a sample.
The batching step drops it, logs it with its id and path, and counts it by reason; nothing is
substituted in its place. The counts live in the iterator state, so a resumed run keeps totals.

Resume: the iterator state is the stream position of the next unread sample plus the positions of
samples waiting in partly filled buckets; set_state re-reads those few samples by random access and
restarts the upstream stream at the saved position.

Multi-host caveat: each process buckets its own shard. Global arrays need the same per-host batch
shape at every step, which holds when every sample lands in one bucket (one aspect ratio, min_frames =
num_frames, and one kind: images are 1-frame batches); otherwise hosts may disagree on a step's shape
(build_pipeline logs a warning). Agreeing per step by exchanging bucket counts is not enough: each
host's surplus of a shape grows like sqrt(steps), in decoded samples. The fix is a global bucket plan
from per-record shape metadata (stored at shard build): every host forms the same global batches of
stream positions and decodes only its slice.
"""
from __future__ import annotations

import dataclasses
import logging
import os
from typing import Any, Mapping, Sequence

import grain
from absl import flags
import numpy as np

from sama_jax.data import manifest as manifest_lib
from sama_jax.data import pretext as pretext_lib
from sama_jax.data import transforms
from sama_jax.data.video_io import MediaError, decode_media

log = logging.getLogger(__name__)

EDIT_TASK = "edit"          # the task name of real editing pairs (no pretext)
SKIP_KEY = "skipped"        # present (with the reason) only in skip markers
FEATURE_PREFIX = "features/"  # batch keys of precomputed features
MAX_SKIP_EXAMPLES = 100     # examples kept in the summary; every skip is logged and counted


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
# Per-sample transform


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


def prepare_sample(record: Mapping, index: int, spec: SampleSpec) -> dict:
    """One record -> one sample dict of uint8 arrays at its bucket's size (raises on bad input)."""
    kind = record["kind"]
    if kind not in manifest_lib.KINDS:
        raise KeyError(f"kind {kind!r} is not one of {manifest_lib.KINDS}")
    stored = record.get("features") or {}
    missing = [name for name in spec.features if name not in stored]
    if missing:
        raise _MissingFeatures(f"no precomputed {missing} (record has {sorted(stored)})")
    text = record["text"]
    rng = np.random.default_rng([spec.seed, index])
    # An image where a clip belongs decodes as 1 frame and is skipped as too short below.
    is_image = kind == "image_edit"
    stride = transforms.stride_for(record.get("fps"), spec.fps, spec.frame_stride)
    max_frames = 1 if is_image else transforms.frames_needed(spec.num_frames, stride)

    target = _decode(record, "target", max_frames)
    source = _decode(record, "source", max_frames) if kind != "t2v" else None
    total = target.shape[0] if source is None else min(target.shape[0], source.shape[0])
    idx = transforms.frame_indices(total, 1 if is_image else spec.num_frames, stride,
                                   1 if is_image else spec.min_frames)
    # Source and target share the bucket of the source's aspect ratio (released loader).
    ref = target if source is None else source
    size = transforms.nearest_bucket(ref.shape[1], ref.shape[2], spec.buckets)
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
    for name in spec.features:
        value = np.asarray(stored[name])
        if name == "text":  # stored cut to its true length; the DiT takes text_len tokens, zeros after
            if value.shape[0] > spec.text_len:
                raise _MissingFeatures(f"text feature has {value.shape[0]} tokens, more than {spec.text_len}")
            value = np.pad(value, ((0, spec.text_len - value.shape[0]),) + ((0, 0),) * (value.ndim - 1))
        sample[FEATURE_PREFIX + name] = value
    return sample


class SampleTransform:
    """map_with_index transform: a sample dict, or a skip marker naming the item and the reason."""

    def __init__(self, spec: SampleSpec):
        self.spec = spec

    def __call__(self, index: int, record: Mapping) -> dict:
        sample_id = f"<index {index}>"
        if isinstance(record, Mapping):
            sample_id = record.get("id", sample_id)
        try:
            return prepare_sample(record, index, self.spec)
        except _FieldError as e:
            return {SKIP_KEY: e.error.reason, "id": str(sample_id), "index": int(index),
                    "path": _where(record, e.field), "message": str(e.error)}
        except _MissingFeatures as e:
            return {SKIP_KEY: "missing_features", "id": str(sample_id), "index": int(index),
                    "path": _where(record, "target"), "message": str(e)}
        except transforms.SkipSample as e:
            return {SKIP_KEY: "too_short", "id": str(sample_id), "index": int(index),
                    "path": _where(record, "target"), "message": str(e)}
        except (KeyError, TypeError) as e:
            return {SKIP_KEY: "bad_record", "id": str(sample_id), "index": int(index), "path": "",
                    "message": f"malformed record: {type(e).__name__}: {e}"}


# ---------------------------------------------------------------------------------------------------
# Batching by bucket with a resumable state


ARRAY_KEYS = ("source", "target", "anchors")
STRING_KEYS = ("text", "kind", "id", "task")


def collate(samples: Sequence[dict]) -> dict:
    """Samples of one shape -> a batch: arrays (and features) stacked, strings as numpy str arrays."""
    stacked = [k for k in samples[0] if k in ARRAY_KEYS or k.startswith(FEATURE_PREFIX)]
    batch = {k: np.stack([s[k] for s in samples]) for k in stacked}
    batch.update({k: np.array([s[k] for s in samples]) for k in STRING_KEYS})
    return batch


class BucketBatchDataset(grain.IterDataset):
    """Batches of `batch_size` samples sharing (T, H, W), from a MapDataset of samples/skip markers.

    Samples wait in one buffer per shape; a buffer that reaches batch_size is emitted, so batch order
    follows the stream deterministically. At the end of a finite stream the partial buffers are
    emitted (oldest first) unless drop_remainder.
    """

    def __init__(self, samples: grain.MapDataset, batch_size: int, *, worker_count: int = 0,
                 worker_buffer_size: int = 1, read_threads: int = 1, prefetch: int = 2,
                 drop_remainder: bool = True, max_consecutive_skips: int = 1000):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        self.samples = samples
        self.batch_size = batch_size
        self.worker_count = worker_count
        self.worker_buffer_size = worker_buffer_size
        self.read_options = grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=prefetch)
        self.drop_remainder = drop_remainder
        self.max_consecutive_skips = max_consecutive_skips

    def __iter__(self) -> "BucketBatchIterator":
        return BucketBatchIterator(self)

    def __str__(self) -> str:
        return f"BucketBatchDataset(batch_size={self.batch_size}, workers={self.worker_count})"


class BucketBatchIterator(grain.DatasetIterator):

    def __init__(self, ds: BucketBatchDataset):
        super().__init__()
        self._ds = ds
        self._next_position = 0                     # stream position of the next sample to read
        self._buffers: dict[tuple, list[tuple[int, dict]]] = {}
        self._upstream = None
        self._exhausted = False
        self._skip_counts: dict[str, int] = {}
        self._skip_examples: list[dict] = []
        self._consecutive_skips = 0

    # The upstream stream restarts at any position: a slice of the MapDataset keeps every sample's
    # global index (and so its seed), and worker processes keep the order.
    def _open_upstream(self):
        tail = self._ds.samples[self._next_position:]
        stream = tail.to_iter_dataset(self._ds.read_options)
        if self._ds.worker_count > 0:
            # Grain's worker processes read absl flags; outside an absl.app main (tests, notebooks)
            # they are unparsed and every read raises, so take the defaults.
            if not flags.FLAGS.is_parsed():
                flags.FLAGS.mark_as_parsed()
            stream = stream.mp_prefetch(grain.MultiprocessingOptions(
                num_workers=self._ds.worker_count, per_worker_buffer_size=self._ds.worker_buffer_size))
        self._upstream = iter(stream)

    def _close_upstream(self):
        if self._upstream is not None and hasattr(self._upstream, "close"):
            self._upstream.close()
        self._upstream = None

    def _count_skip(self, marker: dict):
        reason = marker[SKIP_KEY]
        self._skip_counts[reason] = self._skip_counts.get(reason, 0) + 1
        if len(self._skip_examples) < MAX_SKIP_EXAMPLES:
            self._skip_examples.append({k: marker[k] for k in (SKIP_KEY, "id", "index", "path", "message")})
        log.warning("skipping sample %s (%s) at %s: %s", marker["id"], reason, marker["path"],
                    marker["message"])
        self._consecutive_skips += 1
        if self._consecutive_skips >= self._ds.max_consecutive_skips:
            raise RuntimeError(f"{self._consecutive_skips} samples in a row were unusable; the data "
                               f"is broken, not a few items: {self.skip_summary()}")

    def _add(self, position: int, sample: dict):
        """Buffers a sample; returns a batch when its bucket is full."""
        key = sample["source"].shape[:3]
        bucket = self._buffers.setdefault(key, [])
        bucket.append((position, sample))
        if len(bucket) == self._ds.batch_size:
            del self._buffers[key]
            return collate([s for _, s in bucket])
        return None

    def __next__(self) -> dict:
        while not self._exhausted:
            if self._upstream is None:
                self._open_upstream()
            try:
                item = next(self._upstream)
            except StopIteration:
                self._exhausted = True
                self._close_upstream()
                break
            position = self._next_position
            self._next_position += 1
            if SKIP_KEY in item:
                self._count_skip(item)
                continue
            self._consecutive_skips = 0
            batch = self._add(position, item)
            if batch is not None:
                return batch
        if self._buffers and not self._ds.drop_remainder:
            key = min(self._buffers, key=lambda k: self._buffers[k][0][0])
            return collate([s for _, s in self._buffers.pop(key)])
        raise StopIteration

    def get_state(self) -> dict:
        waiting = sorted(p for bucket in self._buffers.values() for p, _ in bucket)
        return {"next_position": self._next_position, "waiting": waiting,
                "exhausted": self._exhausted, "skip_counts": dict(self._skip_counts),
                "skip_examples": list(self._skip_examples),
                "consecutive_skips": self._consecutive_skips}

    def set_state(self, state: dict) -> None:
        self._close_upstream()
        self._next_position = int(state["next_position"])
        self._exhausted = bool(state["exhausted"])
        self._skip_counts = {k: int(v) for k, v in state["skip_counts"].items()}
        self._skip_examples = list(state["skip_examples"])
        self._consecutive_skips = int(state["consecutive_skips"])
        self._buffers = {}
        for position in state["waiting"]:
            sample = self._ds.samples[int(position)]
            if SKIP_KEY in sample:  # readable when saved, not now (file changed since): count it
                self._count_skip(sample)
                continue
            key = sample["source"].shape[:3]
            self._buffers.setdefault(key, []).append((int(position), sample))

    def skip_summary(self) -> dict:
        """Skipped items so far: total, counts by reason, and the first examples (id, path, message)."""
        return {"total": sum(self._skip_counts.values()), "counts": dict(self._skip_counts),
                "examples": list(self._skip_examples)}

    def close(self) -> None:
        self._close_upstream()
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

    process_index/count default to jax.process_index()/process_count(); worker_count defaults to
    data.worker_count (0: decode in this process with data.read_threads threads).
    """
    if process_index is None or process_count is None:
        import jax
        process_index, process_count = jax.process_index(), jax.process_count()
    spec = SampleSpec.from_config(data, seed, anchor_frames=anchor_frames, text_len=text_len)
    kinds = {entry.get("kind") for entry, _ in sources}
    if process_count > 1 and (len(spec.buckets) > 1 or spec.min_frames < spec.num_frames
                              or ("image_edit" in kinds and len(kinds) > 1)):
        log.warning("multi-host data: each of the %d processes buckets its own shard, and this config "
                    "allows several batch shapes (%d aspect buckets, min_frames %d < num_frames %d, "
                    "kinds %s), so processes may yield different shapes at the same step",
                    process_count, len(spec.buckets), spec.min_frames, spec.num_frames, sorted(kinds))
    samples = mix_sources(sources, seed, num_epochs).map_with_index(SampleTransform(spec))
    local = samples[process_index::process_count]
    workers = int(data.get("worker_count", 0)) if worker_count is None else worker_count
    return BucketBatchDataset(local, batch_size, worker_count=workers,
                              read_threads=int(data.get("read_threads", 1)),
                              prefetch=int(data.get("prefetch", 2)), drop_remainder=drop_remainder)
