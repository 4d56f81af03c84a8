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
from typing import Any, Mapping

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

