"""Orbax checkpoints of model parameters written by the converters and read by the model loaders.

A params checkpoint is one Orbax directory: the parameter pytree (nested dicts of arrays, the layout
of the Flax model's nnx.State) plus custom metadata {"kind": "wan_dit" | "wan_vae" | ..., "config":
{...}} from which the model is rebuilt. Writes are partial saves, one group of tensors at a time, so a
converter never holds the whole model in memory; `finalize` makes the checkpoint appear atomically:
a crash before it leaves no directory at the target path.
"""
from __future__ import annotations

import glob
import os
import shutil
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint.experimental.v1 as ocp


class ParamsCheckpointError(ValueError):
    """A params checkpoint that is missing, incomplete or of another kind."""


class ParamsWriter:
    """Writes a params checkpoint incrementally: `add` groups of arrays, then `finalize`."""

    def __init__(self, path: str, kind: str, config: Mapping[str, Any], overwrite: bool = False):
        self.path = os.path.abspath(path)
        if os.path.exists(self.path) and not overwrite:
            raise ParamsCheckpointError(f"{self.path} exists; pass overwrite to replace it")
        # Replacing writes next to the old checkpoint and swaps at the end, so a crash at any point
        # leaves either the old or the new checkpoint complete at `path`.
        self._target = self.path + ".replacement" if os.path.exists(self.path) else self.path
        # Leftovers of an interrupted earlier conversion must not be merged into this one.
        for stale in glob.glob(glob.escape(self._target) + ".partial_save*") + (
                [self._target] if self._target != self.path else []):
            if os.path.exists(stale):
                shutil.rmtree(stale)
        self._metadata = {"kind": kind, "config": _jsonable(dict(config))}
        self._started = False

    def add(self, tree: Mapping[str, Any]) -> None:
        """Adds arrays (new keys only) to the pending checkpoint; they can be freed afterwards."""
        ocp.partial.save(self._target, tree,
                         custom_metadata=None if self._started else self._metadata)
        self._started = True

    def finalize(self) -> None:
        if not self._started:
            raise ParamsCheckpointError(f"{self.path}: nothing was written")
        ocp.partial.finalize(self._target)
        if self._target != self.path:
            old = self.path + ".old"
            os.replace(self.path, old)
            os.replace(self._target, self.path)
            shutil.rmtree(old)


def save_params(path: str, params: Mapping[str, Any], kind: str, config: Mapping[str, Any],
                overwrite: bool = False) -> None:
    """Writes a whole parameter tree at once (small models, tests)."""
    writer = ParamsWriter(path, kind, config, overwrite=overwrite)
    writer.add(jax.tree.map(np.asarray, params))
    writer.finalize()


def read_metadata(path: str) -> tuple[str, dict]:
    """(kind, config) of a params checkpoint."""
    if not os.path.isdir(path):
        raise ParamsCheckpointError(f"params checkpoint not found: {path}")
    try:
        meta = ocp.metadata(path).custom_metadata or {}
    except Exception as e:  # noqa: BLE001 - orbax raises layout/IO errors of several types
        raise ParamsCheckpointError(f"{path} is not a complete Orbax checkpoint: {e}") from e
    if "kind" not in meta or "config" not in meta:
        raise ParamsCheckpointError(f"{path} is an Orbax checkpoint but not a sama_jax params "
                                    "checkpoint (no kind/config metadata)")
    return meta["kind"], meta["config"]


def load_params(path: str, expected_kind: str | None = None, abstract: Any = None):
    """-> (params, config). `abstract`: optional pytree of jax.ShapeDtypeStruct (with shardings) to
    restore into, e.g. straight onto a mesh; without it, arrays come back as host numpy arrays."""
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



def load_module(path: str, kind: str, build: Callable[[dict], Any], mesh=None, rules=None):
    """A Flax NNX module filled from a params checkpoint.

    `build(stored config dict) -> module` runs abstractly (no parameter memory); each array is then
    restored in the dtype the built module asks for and, with `mesh`, straight into the sharding its
    logical axis names give under `rules` (default sharding.DEFAULT_RULES). A checkpoint whose
    arrays do not fit the module is refused with every missing, unexpected or mis-shaped array.
    """
    from flax import nnx

    from sama_jax import sharding

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
    problems += [f"{k}: checkpoint {tuple(stored[k].shape)}, model {tuple(expected[k].shape)}"
                 for k in sorted(set(stored) & set(expected))
                 if tuple(stored[k].shape) != tuple(expected[k].shape)]
    if problems:
        raise ParamsCheckpointError(
            f"{path} does not fit the {kind} model built from its config:\n  " + "\n  ".join(problems))
    if mesh is not None:
        placements = _flatten(nnx.to_pure_dict(
            sharding.state_shardings(state, mesh, rules or sharding.DEFAULT_RULES)))
        sharding.check_divisible(expected, placements)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        placements = {k: device for k in expected}
    target = _unflatten({k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=placements[k])
                         for k, v in expected.items()})
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
PRECISION_KEYS = ("param_dtype", "compute_dtype", "dtype", "residual_dtype", "attention", "remat")


def split_precision(stored: Mapping[str, Any], precision: Mapping[str, Any] | None = None
                    ) -> tuple[dict, dict]:
    """A stored checkpoint config -> (architecture fields, precision fields). The checkpoint's own
    dtypes are the defaults; `precision` (a config's precision section) overrides them."""
    architecture = {k: v for k, v in stored.items() if k not in PRECISION_KEYS}
    defaults = {k: v for k, v in stored.items() if k in PRECISION_KEYS and k != "dtype"}
    if "dtype" in stored:
        defaults.setdefault("compute_dtype", stored["dtype"])
    return architecture, dict(defaults, **dict(precision or {}))
