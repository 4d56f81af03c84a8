"""Reading shard datasets: TFDS datasets of ArrayRecord files (built by sama-build-shards,
sama_jax/data/build_shards.py), and a Grain source over them.

    source = ShardSource("data/shards/video_edits")     # grain RandomAccessDataSource
    record = source[0]                                   # dict, see "Record" below

The output directory is a TFDS dataset (sama_jax.data.shard_format) plus our build records:
    <name>-train.array_record-00000-of-00004   shard i holds manifest samples [i*S, (i+1)*S) that passed
    <name>-train.array_record-00000-of-00004.json   the shard's report: records, skipped items, sample hashes
    dataset_info.json, features.json           TFDS metadata: features, split "train", shard lengths
    index.json                                 written last: shards in order, totals, skip counts
    .lock                                      held by a running build (its pid inside)
so besides ShardSource, TFDS and Grain open it directly:
    tfds.builder_from_directory(out).as_data_source(split="train")
    tfds.data_source(name, split="train", data_dir=D)       # when out is D/<name>/2.0.0
    grain.MapDataset.source(ShardSource(out))
<name> is --name, by default the manifest's file stem made a TFDS name (lowercase, digits, _).

Record (as ShardSource returns it; TFDS gives the same fields, text and media as bytes, meta as
JSON text, features as .npy bytes, and source sizes 0 for t2v):
    id, kind, text          str (kind: video_edit | image_edit | t2v)
    target, target_ext      encoded media bytes (mp4/png/... as in the dataset) and ".mp4"-style ext
    source, source_ext      the same for the source; b"" and "" for t2v
    fps, frames, height, width   of the target from its header (fps 0.0 for images; stored as float32)
    source_frames, source_height, source_width   of the source (edit kinds only)
    meta                    dict of the manifest's other keys (e.g. edit, origin, start_frame)
    features                {name: np.ndarray} precomputed features found for the sample (may be {})
which is what sama_jax.data.pipeline's sample transform consumes; the size keys let its planner
shape batches without opening any media.
"""

from __future__ import annotations

import json
import os
from typing import Iterable, Sequence

from sama_jax.data import shard_format
from sama_jax.data.shard_builder import INDEX
from sama_jax.data.shard_format import SCHEMA_VERSION

# ---------------------------------------------------------------------------------------------------
# Reading


def shard_paths(location: str | Sequence[str]) -> list[str]:
    """Shard files of a build directory (from its index, in order) or the given list of files."""
    if isinstance(location, (list, tuple)):
        return [os.fspath(p) for p in location]
    location = os.fspath(location)
    if os.path.isdir(location):
        index_path = os.path.join(location, INDEX)
        if not os.path.exists(index_path):
            raise FileNotFoundError(
                f"{index_path}: no index; the build is unfinished (rerun sama-build-shards)"
            )
        with open(index_path) as f:
            index = json.load(f)
        if index.get("schema") != SCHEMA_VERSION:
            raise ValueError(
                f"{index_path}: records of schema {index.get('schema')} (1: msgpack), this reader "
                f"reads schema {SCHEMA_VERSION}; rebuild with sama-build-shards --overwrite"
            )
        # A shard whose samples were all skipped holds no records; leave it out of the source.
        return [os.path.join(location, shard) for shard, n in zip(index["shards"], index["records"]) if n]
    return [location]


class ShardSource:
    """grain RandomAccessDataSource over shards: len() records; [i] -> the record dict of sample i.

    Picklable (Grain worker processes reopen the files), and a thin layer over
    grain.sources.ArrayRecordDataSource, which maps a global index to (shard, offset).
    """

    def __init__(self, location: str | Sequence[str]):
        import grain

        self.paths = shard_paths(location)
        for path in self.paths:
            if not os.path.exists(path):
                raise FileNotFoundError(f"{path}: shard file does not exist")
        self._source = grain.sources.ArrayRecordDataSource(self.paths)

    def __len__(self) -> int:
        return len(self._source)

    def __getitem__(self, index: int) -> dict:
        if not 0 <= index < len(self):  # IndexError (not ArrayRecord's ValueError) ends iteration
            raise IndexError(f"record {index} out of range for {self!r}")
        return shard_format.decode_record(self._source[index])

    def __repr__(self) -> str:
        return f"ShardSource({len(self.paths)} shards, {len(self)} records)"


def iter_records(location: str | Sequence[str]) -> Iterable[dict]:
    source = ShardSource(location)
    for i in range(len(source)):
        yield source[i]


# ---------------------------------------------------------------------------------------------------
