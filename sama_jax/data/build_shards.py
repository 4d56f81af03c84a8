"""sama-build-shards: a manifest -> a TFDS shard dataset of ArrayRecord files (read by
sama_jax.data.arrayrecord.ShardSource; built by sama_jax.data.shard_builder).

    sama-build-shards --manifest data/synthetic/video_edits.jsonl --out data/shards/video_edits
    sama-build-shards --config=configs/stage1_sft.py --manifest ... --out ...   # min_frames, fps from data.*

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
import logging
import sys
from typing import Sequence

from sama_jax.data.shard_builder import CHECKS, MIN_FRAMES, build_shards


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
