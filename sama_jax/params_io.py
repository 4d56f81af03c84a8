"""Orbax checkpoints of model parameters written by the converters and read by the model loaders.

A params checkpoint is one Orbax directory: the parameter pytree (nested dicts of arrays, the layout
of the Flax model's nnx.State) plus custom metadata {"kind": "wan_dit" | "wan_vae" | ..., "config":
{...}} from which the model is rebuilt.

Writing (`ParamsWriter`): small arrays go in Orbax partial saves, one group at a time; an array too
large to hold whole (a 14B DiT parameter stacked over 40 layers is 5.3 GiB) is added by rows
(`add_by_rows`): Orbax saves a one-block placeholder with the array's chunking, the array is resized
to its full shape and filled block by block with TensorStore after Orbax's finalize, so the resident
set stays near one block. Everything is written to OUT.partial-<id> and only then put at OUT:

  1. write and finalize OUT.partial-<id>          (a kill here: the old OUT, if any, is untouched)
  2. write the journal OUT.replace.json naming it  (from here on the new checkpoint is the one)
  3. rename OUT -> OUT.old-<id>, 4. OUT.partial-<id> -> OUT, 5. delete OUT.old-<id>, 6. the journal.

At every instant the old or the new complete checkpoint is at OUT or named by the journal. Readers
(`resolve`) follow the journal without changing anything; the next writer (`recover`) finishes an
interrupted replacement and deletes abandoned partials (and the OUT.old / OUT.replacement leftovers
of earlier versions of this module).
"""

from __future__ import annotations

import collections
import glob
import json
import logging
import os
import shutil
import uuid
from typing import Any, Callable, Mapping, Sequence

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp

# Orbax v1 keeps the pytree of a checkpoint in this subdirectory, one OCDBT database whose keys are
# the tree paths joined by '.'; add_by_rows writes its arrays there (tests catch a layout change).
PYTREE_DIR = "state"
JOURNAL_SUFFIX = ".replace.json"
# Rows written concurrently by add_by_rows: TensorStore writes one while the next is prepared.
WRITES_IN_FLIGHT = 2


class ParamsCheckpointError(ValueError):
    """A params checkpoint that is missing, incomplete or of another kind."""


def _after_step(step: str) -> None:
    """Called after each step of putting a checkpoint in place; tests replace it to kill there."""


def _journal(path: str) -> str:
    return path + JOURNAL_SUFFIX


def _read_journal(path: str) -> dict | None:
    try:
        with open(_journal(path)) as f:
            return json.load(f)
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ParamsCheckpointError(
            f"{_journal(path)}: unreadable replacement journal ({e}); "
            "it is written atomically, so something else changed it"
        ) from e


def _is_params_checkpoint(path: str) -> bool:
    try:
        read_metadata(path)
        return True
    except ParamsCheckpointError:
        return False


def resolve(path: str) -> str:
    """The directory holding the checkpoint of `path`: `path`, or, when a kill interrupted a
    replacement between its two renames, the complete new checkpoint its journal names. Changes
    nothing on disk (several hosts may read at once); the next conversion finishes the swap."""
    journal = _read_journal(os.path.abspath(path))
    if journal is not None and not os.path.isdir(path):
        new = os.path.join(os.path.dirname(os.path.abspath(path)), journal["new"])
        if os.path.isdir(new):
            logging.warning("%s: reading %s, the new checkpoint of an interrupted replacement", path, new)
            return new
    return path


def recover(path: str) -> list[str]:
    """Finishes the replacement a kill interrupted at `path` and deletes abandoned partial writes.
    Returns one line per thing done."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    done = []
    journal = _read_journal(path)
    if journal is not None:  # the new checkpoint is complete: finish putting it in place
        new, old = os.path.join(parent, journal["new"]), os.path.join(parent, journal["old"])
        if os.path.isdir(new):
            if os.path.lexists(path):
                os.rename(path, old)
            os.rename(new, path)
            done.append(f"finished replacing {path}")
        if os.path.lexists(old):
            if os.path.isdir(path):
                shutil.rmtree(old)
                done.append(f"deleted the replaced checkpoint {old}")
            else:  # the new checkpoint was deleted by hand: keep the old one
                os.rename(old, path)
                done.append(f"restored {path} from {old}")
        os.remove(_journal(path))
    # Leftovers of the previous scheme (OUT.replacement swapped in through OUT.old).
    legacy_old, legacy_new = path + ".old", path + ".replacement"
    if os.path.isdir(legacy_old) and not os.path.lexists(path):
        if _is_params_checkpoint(legacy_new):
            os.rename(legacy_new, path)
            done.append(f"finished replacing {path} (left by an earlier version)")
        else:
            os.rename(legacy_old, path)
            done.append(f"restored {path} from {legacy_old}")
    # Without a journal, partial writes were never complete: nothing refers to them.
    stale = [
        p
        for pattern in (".partial-*", ".partial_save", JOURNAL_SUFFIX + ".partial-*")
        for p in glob.glob(glob.escape(path) + pattern)
    ]
    stale += [p for p in (legacy_old, legacy_new, legacy_new + ".partial_save") if os.path.lexists(p)]
    for leftover in stale:
        if os.path.isdir(leftover):
            shutil.rmtree(leftover)
        else:
            os.remove(leftover)
        done.append(f"deleted {leftover}, left by an interrupted conversion")
    return done


def check_output(path: str, overwrite: bool) -> list[str]:
    """Raises ParamsCheckpointError unless a params checkpoint may be written at `path` (run before
    converting). Cleans up after interrupted writes first; returns what `recover` did."""
    path = os.path.abspath(path)
    parent = os.path.dirname(path)
    if os.path.lexists(parent) and not os.path.isdir(parent):
        raise ParamsCheckpointError(f"{parent} is not a directory; choose another output")
    os.makedirs(parent, exist_ok=True)
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ParamsCheckpointError(f"{parent}: no permission to write the output there")
    done = recover(path)
    if os.path.lexists(path):
        if not os.path.isdir(path):
            raise ParamsCheckpointError(
                f"{path} exists and is not a checkpoint directory; remove it or choose another output"
            )
        if not overwrite:
            raise ParamsCheckpointError(f"{path} exists; pass --overwrite to replace it")
        if os.listdir(path) and not _is_params_checkpoint(path):
            raise ParamsCheckpointError(
                f"{path} is not a params checkpoint; --overwrite only "
                "replaces one: remove it yourself or choose another output"
            )
    return done


def check_free_space(path: str, nbytes: int) -> None:
    """Raises ParamsCheckpointError unless about `nbytes` fit next to `path` (an old checkpoint
    there stays until the new one is complete)."""
    parent = os.path.dirname(os.path.abspath(path))
    free = shutil.disk_usage(parent).free
    if nbytes > free:
        raise ParamsCheckpointError(
            f"{parent}: the checkpoint needs about {nbytes / 2**30:.1f} GiB, "
            f"only {free / 2**30:.1f} GiB are free"
        )


class ParamsWriter:
    """Writes a params checkpoint incrementally: `add` groups of arrays and `add_by_rows` large
    arrays, then `finalize`. `on_written(arrays, nbytes)` is called as data reaches the disk."""

    def __init__(
        self,
        path: str,
        kind: str,
        config: Mapping[str, Any],
        overwrite: bool = False,
        on_written: Callable[[int, int], None] | None = None,
    ):
        self.path = os.path.abspath(path)
        check_output(self.path, overwrite)
        self._id = _shared_id()
        self._target = f"{self.path}.partial-{self._id}"
        self._metadata = {"kind": kind, "config": _jsonable(dict(config))}
        self._started = False
        self._by_rows: list[tuple[tuple[str, ...], tuple[int, ...], np.dtype, int, Callable]] = []
        self._on_written = on_written or (lambda arrays, nbytes: None)
        self._committed = False

    def __enter__(self) -> "ParamsWriter":
        return self

    def __exit__(self, exc_type, exc, traceback) -> None:
        if exc_type is not None:
            self.abandon()

    def _save(self, tree: Mapping[str, Any]) -> None:
        ocp.partial.save(self._target, tree, custom_metadata=None if self._started else self._metadata)
        self._started = True

    def add(self, tree: Mapping[str, Any]) -> None:
        """Adds arrays (new keys only) to the pending checkpoint; they can be freed afterwards."""
        self._save(tree)
        leaves = jax.tree.leaves(tree)
        self._on_written(len(leaves), sum(np.asarray(leaf).nbytes for leaf in leaves))

    def add_by_rows(
        self,
        keys: Sequence[str],
        shape: Sequence[int],
        dtype,
        rows: Callable[[int, int], np.ndarray],
        block_rows: int = 1,
    ) -> None:
        """Adds the array `keys` (a path in the tree) of `shape` and `dtype`, written at finalize
        `block_rows` rows at a time: `rows(start, stop)` -> the array's rows [start, stop)."""
        shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
        # Orbax records the leaf in its tree metadata; its tiny data is replaced at finalize.
        self._save(_nest(keys, np.zeros((1,) * len(shape), dtype)))
        self._by_rows.append((tuple(keys), shape, dtype, max(1, min(block_rows, shape[0])), rows))

    def finalize(self) -> None:
        if not self._started:
            raise ParamsCheckpointError(f"{self.path}: nothing was written")
        ocp.partial.finalize(self._target)
        # Orbax's save and finalize are collective; the rest is file work for one process, which
        # the others wait for, so OUT exists everywhere when finalize returns.
        if jax.process_index() == 0:
            for by_rows in self._by_rows:
                self._write_rows(*by_rows)
            _after_step("written")
            self._put_in_place()
        if jax.process_count() > 1:
            from jax.experimental import multihost_utils

            multihost_utils.sync_global_devices(f"params_io.finalize {self.path}")

    def _write_rows(self, keys, shape, dtype, block_rows, rows) -> None:
        import tensorstore as ts

        spec = {
            "driver": "zarr3",
            "kvstore": {
                "driver": "ocdbt",
                "base": f"file://{self._target}/{PYTREE_DIR}/",
                "path": ".".join(keys) + "/",
            },
        }
        # One chunk per block, stored uncompressed: zstd saves ~20% on bf16 weights but makes the
        # write (and every load) 2-3x slower. Replaces the placeholder Orbax wrote.
        metadata = {
            "shape": list(shape),
            "data_type": dtype.name,
            "fill_value": 0,
            "chunk_grid": {"name": "regular", "configuration": {"chunk_shape": [block_rows, *shape[1:]]}},
            "chunk_key_encoding": {"name": "default"},
            "codecs": [{"name": "bytes", "configuration": {"endian": "little"}}],
        }
        try:  # the placeholder must be where Orbax will look for the array
            ts.open(spec, open=True).result()
        except ValueError as e:
            raise ParamsCheckpointError(
                f"{self._target}: Orbax did not store {'.'.join(keys)} under "
                f"{PYTREE_DIR}/ as params_io expects (Orbax layout changed?): {e}"
            ) from e
        store = ts.open(dict(spec, metadata=metadata), create=True, delete_existing=True).result()
        pending = collections.deque()
        for start in range(0, shape[0], block_rows):
            stop = min(start + block_rows, shape[0])
            block = np.ascontiguousarray(rows(start, stop), dtype)
            if block.shape != (stop - start, *shape[1:]):
                raise ParamsCheckpointError(
                    f"{'/'.join(keys)}: rows [{start}, {stop}) have shape "
                    f"{block.shape}, expected {(stop - start, *shape[1:])}"
                )
            # The block is not modified after this, so TensorStore may write it without a copy.
            pending.append(
                (store[start:stop].write(block, can_reference_source_data_indefinitely=True), block.nbytes)
            )
            if len(pending) >= WRITES_IN_FLIGHT:
                self._wait(pending.popleft())
        while pending:
            self._wait(pending.popleft())
        self._on_written(1, 0)

    def _wait(self, write) -> None:
        future, nbytes = write
        future.result()
        self._on_written(0, nbytes)

    def _put_in_place(self) -> None:
        parent = os.path.dirname(self.path)
        old = f"{os.path.basename(self.path)}.old-{self._id}"
        journal_tmp = f"{_journal(self.path)}.partial-{self._id}"
        with open(journal_tmp, "w") as f:
            json.dump({"new": os.path.basename(self._target), "old": old}, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(journal_tmp, _journal(self.path))
        self._committed = True
        _after_step("journal")
        if os.path.lexists(self.path):
            os.rename(self.path, os.path.join(parent, old))
            _after_step("moved_old")
        os.rename(self._target, self.path)
        _after_step("moved_new")
        if os.path.lexists(os.path.join(parent, old)):
            shutil.rmtree(os.path.join(parent, old))
            _after_step("deleted_old")
        os.remove(_journal(self.path))

    def abandon(self) -> None:
        """Deletes what this writer wrote (after an error) unless the journal already names it;
        OUT itself is never touched."""
        if self._committed:
            return
        for partial in (self._target, self._target + ".partial_save"):
            if os.path.lexists(partial):
                shutil.rmtree(partial)


def _shared_id() -> str:
    """A random id for this write, the same on every process (Orbax's collective save needs one
    path on all of them)."""
    token = np.uint32(uuid.uuid4().int & 0xFFFFFFFF)
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        token = multihost_utils.broadcast_one_to_all(token)
    return f"{int(token):08x}"


def save_params(
    path: str, params: Mapping[str, Any], kind: str, config: Mapping[str, Any], overwrite: bool = False
) -> None:
    """Writes a whole parameter tree at once (small models, tests)."""
    writer = ParamsWriter(path, kind, config, overwrite=overwrite)
    writer.add(jax.tree.map(np.asarray, params))
    writer.finalize()


def read_metadata(path: str) -> tuple[str, dict]:
    """(kind, config) of a params checkpoint."""
    path = resolve(path)
    if not os.path.isdir(path):
        raise ParamsCheckpointError(f"params checkpoint not found: {path}")
    try:
        meta = ocp.metadata(path).custom_metadata or {}
    except Exception as e:  # noqa: BLE001 - orbax raises layout/IO errors of several types
        raise ParamsCheckpointError(f"{path} is not a complete Orbax checkpoint: {e}") from e
    if "kind" not in meta or "config" not in meta:
        raise ParamsCheckpointError(
            f"{path} is an Orbax checkpoint but not a sama_jax params checkpoint (no kind/config metadata)"
        )
    return meta["kind"], meta["config"]


def load_params(path: str, expected_kind: str | None = None, abstract: Any = None):
    """-> (params, config). `abstract`: optional pytree of jax.ShapeDtypeStruct (with shardings) to
    restore into, e.g. straight onto a mesh; without it, arrays come back as host numpy arrays."""
    path = resolve(path)
    kind, config = read_metadata(path)
    if expected_kind is not None and kind != expected_kind:
        raise ParamsCheckpointError(f"{path} holds a '{kind}' checkpoint, expected '{expected_kind}'")
    params = ocp.load_pytree(path, abstract) if abstract is not None else ocp.load_pytree(path)
    return params, config


def _jsonable(value):
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (tuple, list)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    return value


def _nest(keys: Sequence[str], value) -> dict:
    for key in reversed(tuple(keys)):
        value = {key: value}
    return value


def load_module(path: str, kind: str, build: Callable[[dict], Any], mesh=None, rules=None):
    """A Flax NNX module filled from a params checkpoint.

    `build(stored config dict) -> module` runs abstractly (no parameter memory); each array is then
    restored in the dtype the built module asks for and, with `mesh`, straight into the sharding its
    logical axis names give under `rules` (default sharding.DEFAULT_RULES). A checkpoint whose
    arrays do not fit the module is refused with every missing, unexpected or mis-shaped array.
    """
    from flax import nnx

    from sama_jax import sharding

    path = resolve(path)
    stored_kind, config = read_metadata(path)
    if stored_kind != kind:
        raise ParamsCheckpointError(f"{path} holds a '{stored_kind}' checkpoint, expected '{kind}'")
    try:
        abstract = nnx.eval_shape(lambda: build(config))
    except (TypeError, ValueError) as e:
        raise ParamsCheckpointError(f"{path}: its config does not build a {kind} model: {e}") from e
    graphdef, state = nnx.split(abstract)
    expected = _flatten(nnx.to_pure_dict(state))
    stored = _flatten(ocp.metadata(path).metadata)
    problems = [f"missing {k}" for k in sorted(set(expected) - set(stored))]
    problems += [f"unexpected {k}" for k in sorted(set(stored) - set(expected))]
    problems += [
        f"{k}: checkpoint {tuple(stored[k].shape)}, model {tuple(expected[k].shape)}"
        for k in sorted(set(stored) & set(expected))
        if tuple(stored[k].shape) != tuple(expected[k].shape)
    ]
    if problems:
        raise ParamsCheckpointError(
            f"{path} does not fit the {kind} model built from its config:\n  " + "\n  ".join(problems)
        )
    if mesh is not None:
        placements = _flatten(
            nnx.to_pure_dict(sharding.state_shardings(state, mesh, rules or sharding.DEFAULT_RULES))
        )
        sharding.check_divisible(expected, placements)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        placements = {k: device for k in expected}
    target = _unflatten(
        {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=placements[k]) for k, v in expected.items()}
    )
    params, _ = load_params(path, expected_kind=kind, abstract=target)
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    """Nested dicts -> {'a/0/b': leaf}. Module lists give int keys in nnx and str keys on disk; the
    joined names agree."""
    out = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}" if prefix else str(key)
        if isinstance(value, Mapping):
            out.update(_flatten(value, name))
        else:
            out[name] = value
    return out


def _unflatten(flat: Mapping[str, Any]) -> dict:
    tree: dict = {}
    for name, value in flat.items():
        *parents, leaf = name.split("/")
        node = tree
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return tree


# Run-time fields a stored config may carry next to the architecture ("dtype": older converters'
# name for the compute dtype). They describe how a run computes, not the weights.
PRECISION_KEYS = (
    "param_dtype",
    "compute_dtype",
    "dtype",
    "residual_dtype",
    "attention",
    "remat",
    "context_parallel",
    "scan_layers",
)


def split_precision(
    stored: Mapping[str, Any], precision: Mapping[str, Any] | None = None
) -> tuple[dict, dict]:
    """A stored checkpoint config -> (architecture fields, precision fields). The checkpoint's own
    dtypes are the defaults; `precision` (a config's precision section) overrides them."""
    architecture = {k: v for k, v in stored.items() if k not in PRECISION_KEYS}
    defaults = {k: v for k, v in stored.items() if k in PRECISION_KEYS and k != "dtype"}
    if "dtype" in stored:
        defaults.setdefault("compute_dtype", stored["dtype"])
    return architecture, dict(defaults, **dict(precision or {}))
