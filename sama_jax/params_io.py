"""Orbax checkpoints of model parameters written by the converters and read by the model loaders.

A params checkpoint is one Orbax directory: the parameter pytree (nested dicts of arrays, the layout
of the Flax model's nnx.State) plus custom metadata {"kind": "wan_dit" | "wan_vae" | ..., "config":
{...}} from which the model is rebuilt. Writes are partial saves, one group of tensors at a time, so a
converter never holds the whole model in memory; `finalize` makes the checkpoint appear atomically:
a crash before it leaves no directory at the target path.
"""
from __future__ import annotations

import os
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
        if os.path.exists(self.path):
            if not overwrite:
                raise ParamsCheckpointError(f"{self.path} exists; pass overwrite to replace it")
        self.overwrite = overwrite
        self._metadata = {"kind": kind, "config": _jsonable(dict(config))}
        self._started = False

    def add(self, tree: Mapping[str, Any]) -> None:
        """Adds arrays (new keys only) to the pending checkpoint; they can be freed afterwards."""
        ocp.partial.save(self.path, tree, custom_metadata=None if self._started else self._metadata)
        self._started = True

    def finalize(self) -> None:
        if not self._started:
            raise ParamsCheckpointError(f"{self.path}: nothing was written")
        if self.overwrite and os.path.exists(self.path):
            ocp.delete(self.path) if ocp.is_orbax_checkpoint(self.path) else _rmtree(self.path)
        ocp.partial.finalize(self.path)


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
    if not ocp.is_orbax_checkpoint(path):
        raise ParamsCheckpointError(f"{path} is not a complete Orbax checkpoint")
    meta = ocp.metadata(path).custom_metadata or {}
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


def _rmtree(path):
    import shutil

    shutil.rmtree(path)
