"""Decoding planned positions: in the calling thread, in read threads, or in spawned worker processes.

    decoder = PlannedDecoder(records, spec)        # (position, planned shape) -> (sample, problem)
    pool = DecodePool(decoder, worker_count=8, read_threads=1)
    job = pool.submit(position, shape)             # None when decoding happens at take()
    sample, problem = pool.take(job, position, shape)

Worker processes hold a copy of the record stream and decode by position; their frames come back
through shared memory (pickling them through the pool's pipe cost the main process ~4x more CPU
per sample, measured with benchmarks/data_throughput.py).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import multiprocessing
import os
import weakref
from multiprocessing import resource_tracker, shared_memory

import grain
import numpy as np

from sama_jax import child_processes
from sama_jax.data import samples
from sama_jax.data.samples import SKIP_KEY, SampleSpec


class PlannedDecoder:
    """(position, planned shape) -> (sample, None), or (padding, skip marker) when it cannot be made.

    Picklable: worker processes hold a copy of the record stream and decode by position.
    """

    def __init__(self, records: grain.MapDataset, spec: SampleSpec):
        self.records, self.spec = records, spec

    def __call__(self, position: int, shape: tuple[int, int, int]) -> tuple[dict, dict | None]:
        record = self.records[position]
        try:
            sample = samples.prepare_sample(record, position, self.spec)
        except Exception as e:  # noqa: BLE001 - skip_marker re-raises all but the bad-item kinds
            problem = samples.skip_marker(record, position, e)
        else:
            got = tuple(sample["source"].shape[:3])
            if got == tuple(shape):
                sample["valid"] = True
                return sample, None
            problem = {
                SKIP_KEY: "shape_mismatch",
                "id": str(record.get("id")),
                "index": int(position),
                "path": samples.where(record, "source" if record.get("source") else "target"),
                "message": f"decoded to (T, H, W) {got}, its metadata predicted {tuple(shape)}",
            }
        return samples.padding_sample(record, shape, self.spec), problem


class DecodePool:
    """Where planned samples are decoded: worker_count > 0 spawned processes, else read_threads > 1
    threads, else the calling thread (at take()). The pool starts at the first submit."""

    def __init__(self, decoder: PlannedDecoder, worker_count: int = 0, read_threads: int = 1):
        self.decoder, self.worker_count, self.read_threads = decoder, worker_count, read_threads
        self._pool = None

    @property
    def parallel(self) -> bool:
        return self.worker_count > 0 or self.read_threads > 1

    def _executor(self) -> concurrent.futures.Executor:
        if self._pool is None:
            if self.worker_count > 0:
                # Spawned, not forked: a caller's threads (JAX, Grain) cannot deadlock the children.
                self._pool = concurrent.futures.ProcessPoolExecutor(
                    self.worker_count,
                    mp_context=multiprocessing.get_context("spawn"),
                    initializer=_start_worker,
                    initargs=(self.decoder, os.getpid()),
                )
            else:
                self._pool = concurrent.futures.ThreadPoolExecutor(self.read_threads)
            weakref.finalize(self, self._pool.shutdown, wait=False, cancel_futures=True)
        return self._pool

    def submit(self, position: int, shape: tuple[int, int, int]) -> concurrent.futures.Future | None:
        if not self.parallel:
            return None
        if self.worker_count > 0:
            return self._executor().submit(_decode_in_worker, position, shape)
        return self._executor().submit(self.decoder, position, shape)

    def take(self, job, position: int, shape: tuple[int, int, int]) -> tuple[dict, dict | None]:
        """The (sample, problem) of a submitted job (or decoded now when job is None)."""
        if job is None:
            return self.decoder(position, shape)
        return _from_worker(job.result()) if self.worker_count > 0 else job.result()

    def drop(self, job) -> None:
        """Forgets a job whose result will not be used, freeing its shared memory."""
        if job is not None and not job.cancel() and self.worker_count > 0:
            job.add_done_callback(_discard)  # runs now if done, else when it finishes

    def shutdown(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
            self._pool = None


_WORKER_DECODER: PlannedDecoder | None = None


def _start_worker(decoder: PlannedDecoder, parent: int) -> None:
    global _WORKER_DECODER
    child_processes.worker_init(parent)  # Ctrl-C is the trainer's to handle; die with it
    _WORKER_DECODER = decoder


def _decode_in_worker(position: int, shape: tuple[int, int, int]):
    sample, problem = _WORKER_DECODER(position, shape)
    return {k: _to_shared(v) for k, v in sample.items()}, problem


_SHARED_MIN_BYTES = 1 << 14  # smaller arrays are pickled


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
