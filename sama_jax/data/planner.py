"""The global bucket plan and this process's batches: GlobalPlanner, BucketBatchDataset, its iterator.

    planner = GlobalPlanner(stream.map_with_index(ShapeProbe(spec)), global_batch, ...)
    shape, positions = planner.next()      # one global batch of stream positions of one (T, H, W)
    ds = BucketBatchDataset(stream, spec, batch_size, process_index=i, process_count=n)
    it = iter(ds); batch = next(it); it.get_state(); it.set_state(state); it.skip_summary()

Every process plans over the whole stream, so all hold the same plan and skip the same records;
the skip-rate guard (SkipGuard) therefore stops or warns on every process alike. How and why:
docs/data.md.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
from typing import Mapping, Sequence

import grain

from sama_jax.config import ConfigError
from sama_jax.data import samples
from sama_jax.data import sources as sources_lib
from sama_jax.data.samples import SKIP_KEY, SampleSpec
from sama_jax.data.workers import DecodePool, PlannedDecoder

log = logging.getLogger(__name__)

MAX_SKIP_EXAMPLES = 100  # examples kept in the summary; every skip is logged and counted
TOP_REASONS = 3  # reasons named in a skip-rate message


class SkipRateError(ValueError):
    """One mixture entry's metadata pass skips more than data.max_skip_fraction of its records."""


class ShapeProbe:
    """map_with_index transform of the metadata pass over (entry, record) pairs:
    {"shape": (T, H, W), "entry": i}, or a skip marker with its "entry"."""

    def __init__(self, spec: SampleSpec):
        self.spec = spec

    def __call__(self, index: int, item: tuple[int, Mapping]) -> dict:
        entry, record = item
        try:
            return {"shape": samples.plan_shape(record, self.spec), "entry": entry}
        except Exception as e:  # noqa: BLE001 - skip_marker re-raises all but the bad-item kinds
            return dict(samples.skip_marker(record, index, e), entry=entry)


class SkipCounter:
    """Skips by reason, the first MAX_SKIP_EXAMPLES of them, each logged."""

    def __init__(self, counts=None, examples=None):
        self.counts = {k: int(v) for k, v in (counts or {}).items()}
        self.examples = list(examples or [])

    def add(self, marker: dict, what: str) -> None:
        reason = marker[SKIP_KEY]
        self.counts[reason] = self.counts.get(reason, 0) + 1
        if len(self.examples) < MAX_SKIP_EXAMPLES:
            self.examples.append({k: marker[k] for k in (SKIP_KEY, "id", "index", "path", "message")})
        log.warning(
            "%s sample %s (%s) at %s: %s", what, marker["id"], reason, marker["path"], marker["message"]
        )


@dataclasses.dataclass(frozen=True)
class SkipGuard:
    """Stops (or warns) when one mixture entry's skip fraction exceeds max_fraction, once the entry
    has min_records records in the metadata pass (one early bad file cannot stop a run)."""

    max_fraction: float = 0.5
    action: str = "error"  # error | warn
    min_records: int = 20
    entries: tuple[str, ...] = ()  # how messages name mixture entry i

    def __post_init__(self):
        if not 0.0 <= self.max_fraction <= 1.0:
            raise ConfigError(
                f"data.max_skip_fraction={self.max_fraction}: must be in [0, 1] (1 never stops)"
            )
        if self.action not in ("error", "warn"):
            raise ConfigError(f"data.on_skip_excess={self.action!r}: must be 'error' or 'warn'")
        if self.min_records < 1:
            raise ConfigError(f"skip-rate check after {self.min_records} records: must be >= 1")

    @classmethod
    def from_config(cls, data, entries: Sequence[str] = ()) -> "SkipGuard":
        defaults = cls()
        value = data.get("max_skip_fraction", defaults.max_fraction)
        try:
            fraction = float(value)
        except (TypeError, ValueError) as e:
            raise ConfigError(f"data.max_skip_fraction={value!r}: must be a number in [0, 1]") from e
        return cls(
            max_fraction=fraction,
            action=str(data.get("on_skip_excess", defaults.action)),
            entries=tuple(entries),
        )

    def name(self, entry: int) -> str:
        return self.entries[entry] if entry < len(self.entries) else f"data.mixture[{entry}]"


class GlobalPlanner:
    """Global batches of stream positions sharing one (T, H, W), from the metadata pass.

    Positions wait in one buffer per shape; a buffer reaching its batch size (global_batch, or
    image_global_batch for single-frame shapes when given) is emitted, so the plan
    follows the stream deterministically and is the same on every process. At the end of a finite
    stream the partial buffers are emitted (oldest first) unless drop_remainder.
    """

    def __init__(
        self,
        shapes: grain.MapDataset,
        global_batch: int,
        read_options: grain.ReadOptions,
        drop_remainder: bool,
        max_consecutive_skips: int,
        guard: SkipGuard | None = None,
        image_global_batch: int | None = None,
    ):
        self.shapes, self.global_batch = shapes, global_batch
        self.image_global_batch = image_global_batch or global_batch
        self.read_options, self.drop_remainder = read_options, drop_remainder
        self.max_consecutive_skips = max_consecutive_skips
        self.guard = guard or SkipGuard()
        self._upstream = None
        self._warned: set[int] = set()
        self.restore(None)

    def _open(self):
        # A slice of the MapDataset keeps every record's global position; Grain's read threads keep
        # the order.
        self._upstream = iter(self.shapes[self._next_position :].to_iter_dataset(self.read_options))

    def close(self):
        if self._upstream is not None and hasattr(self._upstream, "close"):
            self._upstream.close()
        self._upstream = None

    def _entry_stats(self, item: dict) -> dict:
        return self._entries.setdefault(str(item.get("entry", 0)), {"seen": 0, "skips": {}, "example": ""})

    def _skip(self, item: dict):
        self._skips.add(item, "skipping")
        stats = self._entry_stats(item)
        stats["skips"][item[SKIP_KEY]] = stats["skips"].get(item[SKIP_KEY], 0) + 1
        stats["example"] = stats["example"] or f"{item['id']} at {item['path']}: {item['message']}"
        self._consecutive_skips += 1
        if self._consecutive_skips >= self.max_consecutive_skips:
            raise RuntimeError(
                f"{self._consecutive_skips} samples in a row were unusable; the data "
                f"is broken, not a few items: {self._skips.counts} {self._skips.examples}"
            )

    def _check_skip_rate(self, item: dict):
        stats, guard = self._entry_stats(item), self.guard
        if stats["seen"] < guard.min_records:
            return
        entry, seen, skipped = int(item.get("entry", 0)), stats["seen"], sum(stats["skips"].values())
        if skipped <= guard.max_fraction * seen or entry in self._warned:
            return
        top = sorted(stats["skips"].items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_REASONS]
        message = (
            f"{guard.name(entry)}: {skipped} of the first {seen} records were skipped "
            f"({skipped / seen:.0%} > data.max_skip_fraction={guard.max_fraction:g}); top reasons: "
            f"{', '.join(f'{reason} {n}' for reason, n in top)}; e.g. {stats['example']}. "
            f"Fix or drop the entry, or raise data.max_skip_fraction "
            f"(data.on_skip_excess='warn' only warns)"
        )
        if guard.action == "error":
            raise SkipRateError(message)
        self._warned.add(entry)
        log.warning("SKIP RATE TOO HIGH, continuing (data.on_skip_excess='warn'): %s", message)

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
            self._entry_stats(item)["seen"] += 1
            if SKIP_KEY in item:
                self._skip(item)
                self._check_skip_rate(item)
                continue
            self._consecutive_skips = 0
            self._check_skip_rate(item)
            shape = tuple(item["shape"])
            bucket = self._buffers.setdefault(shape, [])
            bucket.append(position)
            if len(bucket) == self.batch_size_of(shape):
                return shape, self._buffers.pop(shape)
        if self._buffers and not self.drop_remainder:
            shape = min(self._buffers, key=lambda k: self._buffers[k][0])
            return shape, self._buffers.pop(shape)
        return None

    def batch_size_of(self, shape: tuple[int, int, int]) -> int:
        """The global batch size of a bucket: images (T = 1) may have their own."""
        return self.image_global_batch if shape[0] == 1 else self.global_batch

    def state(self) -> dict:
        return {
            "next_position": self._next_position,
            "waiting": sorted(p for bucket in self._buffers.values() for p in bucket),
            "exhausted": self._exhausted,
            "skip_counts": dict(self._skips.counts),
            "skip_examples": list(self._skips.examples),
            "consecutive_skips": self._consecutive_skips,
            "entries": {k: dict(v, skips=dict(v["skips"])) for k, v in self._entries.items()},
        }

    def restore(self, state: dict | None) -> None:
        """Back to a saved state (None: the start); waiting positions are probed again."""
        self.close()
        state = state or {}
        self._next_position = int(state.get("next_position", 0))
        self._exhausted = bool(state.get("exhausted", False))
        self._skips = SkipCounter(state.get("skip_counts"), state.get("skip_examples"))
        self._consecutive_skips = int(state.get("consecutive_skips", 0))
        self._entries = {k: dict(v, skips=dict(v["skips"])) for k, v in state.get("entries", {}).items()}
        self._buffers: dict[tuple, list[int]] = {}
        for position in state.get("waiting", ()):
            item = self.shapes[int(position)]
            if SKIP_KEY in item:  # usable when saved, not now (a file changed since): every process agrees
                self._skip(item)
                continue
            self._buffers.setdefault(tuple(item["shape"]), []).append(int(position))


class BucketBatchDataset(grain.IterDataset):
    """This process's batches: its slice of each global batch of the plan, decoded and stacked.

    stream: the (entry index, record) pairs of sources.mix_sources; `records` is its records.
    batch_size: per process; image_batch_size (per process, None: batch_size) is the size of the
    single-frame batches (image edits), as the released trainer's bs_img next to bs_vid.
    """

    def __init__(
        self,
        stream: grain.MapDataset,
        spec: SampleSpec,
        batch_size: int,
        *,
        image_batch_size: int | None = None,
        process_index: int = 0,
        process_count: int = 1,
        worker_count: int = 0,
        read_threads: int = 1,
        metadata_threads: int = 0,
        prefetch: int = 2,
        drop_remainder: bool = True,
        max_consecutive_skips: int = 1000,
        skip_guard: SkipGuard | None = None,
    ):
        super().__init__()
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if image_batch_size is not None and image_batch_size < 1:
            raise ValueError(f"image_batch_size must be >= 1, got {image_batch_size}")
        if not 0 <= process_index < process_count:
            raise ValueError(f"process_index {process_index} is not in [0, {process_count})")
        if process_count > 1 and not drop_remainder:
            raise ValueError(
                "drop_remainder=False needs a single process: the last, partial global "
                "batch would give processes different batch sizes"
            )
        self.stream, self.records, self.spec = stream, stream.map(sources_lib.record_of), spec
        self.batch_size, self.process_index, self.process_count = batch_size, process_index, process_count
        self.image_batch_size = image_batch_size or batch_size
        self.worker_count, self.read_threads, self.prefetch = worker_count, read_threads, prefetch
        # metadata_threads 0 runs the metadata pass in the calling thread: a thread probing headers
        # while this thread decodes makes both wait on the GIL (measured: decodes 2 ms -> 60 ms).
        # > 0 reads ahead about one global batch with threads: for probes that wait on remote storage
        # while worker processes decode.
        self.metadata_options = grain.ReadOptions(
            num_threads=metadata_threads, prefetch_buffer_size=batch_size * process_count
        )
        self.drop_remainder = drop_remainder
        self.max_consecutive_skips = max_consecutive_skips
        self.skip_guard = skip_guard or SkipGuard()

    def __iter__(self) -> "BucketBatchIterator":
        return BucketBatchIterator(self)

    def __str__(self) -> str:
        return (
            f"BucketBatchDataset(batch_size={self.batch_size}, "
            f"image_batch_size={self.image_batch_size}, process {self.process_index} of "
            f"{self.process_count}, workers={self.worker_count})"
        )


class BucketBatchIterator(grain.DatasetIterator):
    def __init__(self, ds: BucketBatchDataset):
        super().__init__()
        self._ds = ds
        self._pool = DecodePool(PlannedDecoder(ds.records, ds.spec), ds.worker_count, ds.read_threads)
        self._planner = GlobalPlanner(
            ds.stream.map_with_index(ShapeProbe(ds.spec)),
            ds.batch_size * ds.process_count,
            ds.metadata_options,
            ds.drop_remainder,
            ds.max_consecutive_skips,
            ds.skip_guard,
            image_global_batch=ds.image_batch_size * ds.process_count,
        )
        # Planned batches in flight: (shape, this process's positions, plan state after it, jobs).
        self._ahead: collections.deque = collections.deque()
        self._state = self._planner.state()  # the plan state after the last batch returned
        self._padded = SkipCounter()

    def _plan_ahead(self):
        depth = 1 + (max(0, self._ds.prefetch) if self._pool.parallel else 0)
        while len(self._ahead) < depth:
            planned = self._planner.next()
            if planned is None:
                return
            shape, positions = planned
            size = self._planner.batch_size_of(shape) // self._ds.process_count
            first = self._ds.process_index * size
            mine = positions[first : first + size]
            jobs = [self._pool.submit(p, shape) for p in mine]
            self._ahead.append((shape, mine, self._planner.state(), jobs))

    def __next__(self) -> dict:
        self._plan_ahead()
        if not self._ahead:
            self._state = self._planner.state()  # the end: the skips found after the last batch count
            raise StopIteration
        shape, mine, state, jobs = self._ahead.popleft()
        self._plan_ahead()  # keep the workers busy while this batch is gathered
        results = [self._pool.take(job, p, shape) for p, job in zip(mine, jobs)]
        for _, problem in results:
            if problem is not None:
                self._padded.add(problem, "padding (valid=False) for")
        self._state = state
        return samples.collate([sample for sample, _ in results])

    def _drop_ahead(self):
        for _, _, _, jobs in self._ahead:
            for job in jobs:
                self._pool.drop(job)
        self._ahead.clear()

    def get_state(self) -> dict:
        return dict(
            self._state, padded_counts=dict(self._padded.counts), padded_examples=list(self._padded.examples)
        )

    def set_state(self, state: dict) -> None:
        self._drop_ahead()
        self._planner.restore(state)
        self._state = self._planner.state()
        self._padded = SkipCounter(state.get("padded_counts"), state.get("padded_examples"))

    def skip_summary(self) -> dict:
        """Bad items so far: total, counts by reason, how many were padded, first examples."""
        counts = dict(self._state["skip_counts"])
        for reason, n in self._padded.counts.items():
            counts[reason] = counts.get(reason, 0) + n
        examples = (self._state["skip_examples"] + self._padded.examples)[:MAX_SKIP_EXAMPLES]
        return {
            "total": sum(counts.values()),
            "counts": counts,
            "padded": sum(self._padded.counts.values()),
            "examples": examples,
        }

    def close(self) -> None:
        self._drop_ahead()
        self._planner.close()
        self._pool.shutdown()
        super().close()
