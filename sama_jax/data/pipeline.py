"""The training data pipeline of config.data: mixture -> one global bucket plan -> this process's batches.

    sources = open_sources(config.data.mixture, root=config.data.root)   # paths checked first
    ds = build_pipeline(config.data, sources, batch_size=32, seed=config.seed)   # 32 per process
    it = iter(ds)
    batch = next(it)       # numpy: source/target (B,T,H,W,3) uint8, anchors (B,N,H,W,3) uint8,
                           #        valid (B,) bool, text, kind, id, task (B,) str arrays
    state = it.get_state() # JSON-able; it.set_state(state) resumes with exactly the same batches
    it.skip_summary()      # {"total": n, "counts": {"missing": 1, ...}, "padded": 0, "examples": [...]}

The jobs live in sources.py (mixture entries, the mixed stream), samples.py (what one record
becomes, per-sample checks), workers.py (decoding in threads or processes) and planner.py (the
global plan, the iterator, the skip-rate guard). The design, its measurements and the rules for
bad items: docs/data.md.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import jax

from sama_jax.config import ConfigError
from sama_jax.data.planner import (
    BucketBatchDataset,
    BucketBatchIterator,
    GlobalPlanner,
    ShapeProbe,
    SkipGuard,
    SkipRateError,
)
from sama_jax.data.samples import (
    EDIT_TASK,
    FEATURE_PREFIX,
    SKIP_KEY,
    FieldError,
    MissingFeatures,
    SampleSpec,
    collate,
    media_size,
    padding_sample,
    plan_shape,
    prepare_sample,
    skip_marker,
)
from sama_jax.data.sources import SIZE_KEYS, ManifestSource, describe_entry, mix_sources, open_sources
from sama_jax.data.workers import PlannedDecoder

__all__ = [
    "BucketBatchDataset",
    "BucketBatchIterator",
    "EDIT_TASK",
    "FEATURE_PREFIX",
    "FieldError",
    "GlobalPlanner",
    "ManifestSource",
    "MissingFeatures",
    "PlannedDecoder",
    "SIZE_KEYS",
    "SKIP_KEY",
    "SampleSpec",
    "ShapeProbe",
    "SkipGuard",
    "SkipRateError",
    "build_pipeline",
    "check_data_config",
    "collate",
    "media_size",
    "mix_sources",
    "open_sources",
    "padding_sample",
    "plan_shape",
    "prepare_sample",
    "skip_marker",
]


def _count(data, key: str, default: int, minimum: int) -> int:
    value = data.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"data.{key}={value!r}: must be an integer >= {minimum}")
    return value


def check_data_config(data, seed: int = 0, anchor_frames: int = 1, text_len: int = 512) -> SampleSpec:
    """Every check of config.data that needs no data: the SampleSpec, the loader counts and the
    skip-rate guard. Raises ConfigError naming the key; cheap, so call it before building models."""
    spec = SampleSpec.from_config(data, seed, anchor_frames=anchor_frames, text_len=text_len)
    for key, default, minimum in (
        ("worker_count", 0, 0),
        ("read_threads", 1, 1),
        ("metadata_threads", 0, 0),
        ("prefetch", 2, 0),
    ):
        _count(data, key, default, minimum)
    SkipGuard.from_config(data)
    return spec


def build_pipeline(
    data,
    sources: Sequence[tuple[Mapping, Any]],
    *,
    batch_size: int,
    seed: int,
    image_batch_size: int | None = None,
    num_epochs: int | None = None,
    process_index: int | None = None,
    process_count: int | None = None,
    worker_count: int | None = None,
    anchor_frames: int = 1,
    text_len: int = 512,
    drop_remainder: bool = True,
) -> BucketBatchDataset:
    """The training pipeline for config.data over opened sources; batch_size is per process, and
    image_batch_size (None: batch_size) that of single-frame (image) batches.

    process_index/count default to jax.process_index()/process_count(); every process must be given
    the same config, sources, seed and batch_size (it computes the same global plan). worker_count
    defaults to data.worker_count (0: decode in this process with data.read_threads threads).
    """
    if process_index is None or process_count is None:
        process_index, process_count = jax.process_index(), jax.process_count()
    spec = check_data_config(data, seed, anchor_frames=anchor_frames, text_len=text_len)
    entries = [describe_entry(i, entry, source) for i, (entry, source) in enumerate(sources)]
    guard = SkipGuard.from_config(data, entries)
    stream = mix_sources(sources, seed, num_epochs)
    workers = _count(data, "worker_count", 0, 0) if worker_count is None else worker_count
    return BucketBatchDataset(
        stream,
        spec,
        batch_size,
        image_batch_size=image_batch_size,
        process_index=process_index,
        process_count=process_count,
        worker_count=workers,
        read_threads=_count(data, "read_threads", 1, 1),
        metadata_threads=_count(data, "metadata_threads", 0, 0),
        prefetch=_count(data, "prefetch", 2, 0),
        drop_remainder=drop_remainder,
        skip_guard=guard,
    )
