"""Mixture entries -> random-access record sources -> the one mixed record stream every process reads.

    sources = open_sources(config.data.mixture, root=config.data.root)   # [(entry, source)], checked
    stream = mix_sources(sources, seed, num_epochs)     # grain.MapDataset of (entry index, record)

A source is anything with __len__ and __getitem__ returning record dicts: ManifestSource (a JSONL
manifest), arrayrecord.ShardSource (shards built by sama-build-shards) or a list. The record keys are
described in docs/data.md.
"""

from __future__ import annotations

import math
import os
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from sama_jax.config import ConfigError
from sama_jax.data import arrayrecord
from sama_jax.data import manifest as manifest_lib

# The record keys that state the size of each media field (docs/data.md, "Metadata").
SIZE_KEYS = {
    "target": ("frames", "height", "width"),
    "source": ("source_frames", "source_height", "source_width"),
}


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
                # A manifest's frames/height/width describe all the sample's media.
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


def _resolved_path(i: int, entry: Mapping, root: str) -> tuple[str, str]:
    """(key, absolute path) of mixture entry i: relative paths resolve against root, else the cwd."""
    key = "shards" if entry.get("shards") else "manifest" if entry.get("manifest") else None
    if key is None:
        raise ConfigError(
            f"data.mixture[{i}]: {dict(entry)} names neither shards nor a manifest "
            f"(give shards=<directory from sama-build-shards> or manifest=<file.jsonl>)"
        )
    value = os.fspath(entry[key])
    path = os.path.abspath(os.path.join(root, value))
    # shards: a build directory or one .array_record file; a manifest is a file.
    if not (os.path.exists(path) if key == "shards" else os.path.isfile(path)):
        if os.path.isabs(value):
            against = "an absolute path"
        elif root:
            against = f"resolved against data.root={os.path.abspath(root)}"
        else:
            against = f"resolved against the current directory {os.getcwd()}"
        raise ConfigError(
            f"data.mixture[{i}].{key}: {value} not found ({against}; set data.root or use an absolute path)"
        )
    return key, path


def _weight(i: int, entry: Mapping) -> float:
    value = entry.get("weight", 1.0)
    try:
        weight = float(value)
    except (TypeError, ValueError):
        weight = math.nan
    if isinstance(value, bool) or not weight >= 0 or math.isinf(weight):
        raise ConfigError(f"data.mixture[{i}].weight={value!r}: must be a finite number >= 0")
    return weight


def open_sources(mixture: Sequence[Mapping[str, Any]], root: str = "") -> list[tuple[dict, Any]]:
    """(entry, source) for each mixture entry, its path made absolute; every path is checked first.

    An entry names `shards` (a directory built by sama-build-shards: arrayrecord.ShardSource) or a
    `manifest` (JSONL, media read from the files it lists); shards win when both are given. Relative
    paths resolve against `root` (data.root) when it is set, else against the current directory.
    Raises ConfigError naming the key (data.mixture[i].manifest ...) before any source is read.
    """
    entries = []
    for i, entry in enumerate(mixture):
        if not isinstance(entry, Mapping):
            raise ConfigError(
                f"data.mixture[{i}]={entry!r}: must be a dict with kind, manifest or shards, and weight"
            )
        entry = dict(entry)
        _weight(i, entry)
        key, entry[key] = _resolved_path(i, entry, root)
        entries.append((i, key, entry))
    opened = []
    for i, key, entry in entries:
        if key == "shards":
            source = arrayrecord.ShardSource(entry[key])
        else:
            source = ManifestSource(entry[key])
        if len(source) == 0:
            raise ConfigError(f"data.mixture[{i}].{key}: {source!r} has no samples")
        opened.append((entry, source))
    return opened


def describe_entry(i: int, entry: Mapping, source: Any) -> str:
    """How messages name mixture entry i: its kind and path (or the source, for a list)."""
    parts = [f"kind={entry['kind']}"] if entry.get("kind") else []
    for key in ("shards", "manifest"):
        if entry.get(key):
            parts.append(f"{key}={entry[key]}")
            break
    else:
        parts.append(f"{type(source).__name__} of {len(source)} records")
    return f"data.mixture[{i}] ({', '.join(parts)})"


def _sub_seed(seed: int, i: int) -> int:
    return int(np.random.SeedSequence([seed, i]).generate_state(1)[0])


class _TagWithEntry:
    """record -> (entry index, record): the planner counts skips per mixture entry."""

    def __init__(self, entry: int):
        self.entry = entry

    def __call__(self, record):
        return self.entry, record


def mix_sources(
    sources: Sequence[tuple[Mapping, Any]], seed: int, num_epochs: int | None = None
) -> grain.MapDataset:
    """(entry index, record) pairs: globally shuffled, repeated, weight-mixed; each epoch reshuffled."""
    parts, weights = [], []
    for i, (entry, source) in enumerate(sources):
        weight = _weight(i, entry)
        if weight == 0:
            continue
        part = grain.MapDataset.source(source).shuffle(seed=_sub_seed(seed, i)).repeat(num_epochs)
        parts.append(part.map(_TagWithEntry(i)))
        weights.append(weight)
    if not parts:
        raise ConfigError("data.mixture: no entry has a positive weight")
    return parts[0] if len(parts) == 1 else grain.MapDataset.mix(parts, weights)


def record_of(item: tuple[int, Any]) -> Any:
    """The record of an (entry index, record) pair of the mixed stream."""
    return item[1]
