"""Shard datasets: TFDS datasets of ArrayRecord files built from a manifest, and a Grain source over them.

    sama-build-shards --manifest data/synthetic/video_edits.jsonl --out data/shards/video_edits
    sama-build-shards --config=configs/stage1_sft.py --manifest ... --out ...   # min_frames, fps from data.*
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

Checked before anything is written (a refusal prints one line naming the file, line or key and
changes nothing): the arguments, every manifest line (JSON, kind, required fields, field types:
"file:line: field 'source' must be a string path, got int"), and a previous build in --out (same
settings, same samples in the done shards, no live builder).
Checked per sample while building: every media file must exist, be non-empty and readable -
images decoded, videos' headers read and their packets counted (--check decode: every frame
decoded) - and a video must give at least min_frames frames as training takes them (from
start_frame, at the stride data.fps / data.frame_stride give). A failing sample is skipped, logged
and counted by reason (missing | empty | truncated | corrupt | unsupported | too_short | bad_record:
a negative start_frame) with its id and path; nothing replaces it.

A rerun resumes: a shard counts as done when its report exists (written after the shard file is
complete and renamed into place), and done shards whose samples and settings are unchanged are
kept. Samples appended to the manifest go to the last shard(s), which are rebuilt ("manifest gained
1 sample: shards 0-2 unchanged, building shard 3"). Other changes - different settings, samples
changed, removed or reordered in done shards - are refused with what changed; --overwrite rebuilds
everything. A build killed at any point (workers die with it) leaves .tmp files that the next run,
holding the lock, removes.

Precomputed features: --features text,semantic stores, for each name, the array that
sama_jax.features.feature_path(manifest, id, name) points at (the .npy files sama-precompute
writes under <manifest dir>/features/); a sample without that file gets no entry for the name.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from typing import Iterable, Sequence

from sama_jax.data import shard_format
from sama_jax.data.shard_builder import (
    CHECKS,
    INDEX,
    MIN_FRAMES,
    BadItem,
    build_shards,
    lock_out_dir,
    make_record,
    report_path,
)
from sama_jax.data.shard_format import SCHEMA_VERSION, decode_record, encode_record, shard_names

# The builder's names stay importable from here, where the pipeline, tests and users find them.
__all__ = [
    "CHECKS",
    "INDEX",
    "MIN_FRAMES",
    "SCHEMA_VERSION",
    "BadItem",
    "ShardSource",
    "build_shards",
    "decode_record",
    "encode_record",
    "iter_records",
    "lock_out_dir",
    "main",
    "make_record",
    "report_path",
    "shard_names",
    "shard_paths",
]

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
# Command line


def _parse(argv: Sequence[str]) -> tuple[argparse.Namespace, dict]:
    """Arguments, and the build settings that follow from them and the --config if one is given."""
    from sama_jax import config as config_lib

    parser = argparse.ArgumentParser(
        prog="sama-build-shards", description="Build a TFDS shard dataset from a manifest (resumable)."
    )
    parser.add_argument("--manifest", required=True, help="JSONL manifest (sama_jax.data.manifest format)")
    parser.add_argument("--out", required=True, help="output directory (a TFDS dataset directory)")
    parser.add_argument(
        "--config",
        metavar="FILE.py[:ARG]",
        help="the training config: its data.min_frames, data.fps and data.frame_stride set "
        "the length check (training's skip rule), data.features the default --features",
    )
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--name", default="", help="dataset name (default: the manifest's file stem)")
    parser.add_argument(
        "--min-frames",
        type=int,
        default=None,
        help=f"skip videos giving fewer frames (default: the config's data.min_frames, else {MIN_FRAMES})",
    )
    parser.add_argument(
        "--check",
        choices=CHECKS,
        default="header",
        help="header: read headers and count packets; decode: also decode every frame",
    )
    parser.add_argument(
        "--features",
        default=None,
        help="comma-separated precomputed feature names (default: the config's data.features)",
    )
    parser.add_argument("--overwrite", action="store_true", help="rebuild every shard, whatever is in --out")
    parser.add_argument("--workers", type=int, default=1, help="shards built at once (processes)")
    spec, overrides, rest = config_lib.split_config_args(argv)
    args = parser.parse_args(rest)
    settings = dict(min_frames=MIN_FRAMES, features=[])
    if spec:
        config = config_lib.build_config(spec, overrides)
        settings = dict(
            min_frames=int(config.data.min_frames),
            fps=float(config.data.fps),
            frame_stride=int(config.data.frame_stride),
            features=list(config.data.features),
        )
    elif overrides:
        parser.error(f"--config.{overrides[0][0]} needs a --config=FILE.py to override")
    if args.min_frames is not None:
        settings["min_frames"] = args.min_frames
    if args.features is not None:
        settings["features"] = [f for f in args.features.split(",") if f]
    return args, settings


def _run(argv: Sequence[str]) -> int:
    args, settings = _parse(argv)
    # Progress and skips go to stderr whatever logging the caller set up (a handler of our own).
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(message)s"))
    logger = logging.getLogger("sama_jax")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        index = build_shards(
            args.manifest,
            args.out,
            samples_per_shard=args.samples_per_shard,
            name=args.name,
            check=args.check,
            overwrite=args.overwrite,
            workers=args.workers,
            **settings,
        )
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
    print(
        f"{index['total_records']} of {index['total_samples']} samples in {len(index['shards'])} shards "
        f"under {args.out} ({index['resumed_shards']} shards kept from an earlier run)"
    )
    if index["skipped_total"]:
        print(f"skipped {index['skipped_total']}: {index['skipped_counts']}")
        for item in index["skipped"]:
            print(f"  {item['id']}: {item['reason']}: {item['message']}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """sama-build-shards; an error the user can act on is one line on stderr and exit status 2
    (sama_jax.cli's convention)."""
    from sama_jax import cli

    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        return cli.run("sama-build-shards", lambda: _run(argv))
    except KeyboardInterrupt:
        print("sama-build-shards: interrupted; rerun the same command to resume", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
