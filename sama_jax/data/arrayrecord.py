"""ArrayRecord shards built from a manifest, and a Grain random-access source over them.

    sama-build-shards --manifest data/synthetic/video_edits.jsonl --out data/shards/video_edits
    source = ShardSource("data/shards/video_edits")     # grain RandomAccessDataSource
    record = source[0]                                   # dict, see "Record" below

Layout of --out:
    <name>-00000-of-00004.array_record    shard i holds manifest samples [i*S, (i+1)*S) that passed
    <name>-00000-of-00004.json            the shard's report: records, skipped items with reasons
    index.json                            written last: shards in order, totals, skip counts

Record: one msgpack map per sample (array_record group_size:1, so a read touches one record):
    id, kind, text          str (kind: video_edit | image_edit | t2v)
    target, target_ext      encoded media bytes (mp4/png/... as in the dataset) and ".mp4"-style ext
    source, source_ext      the same for the source; b"" and "" for t2v
    fps, frames, height, width   of the target from its header (fps 0.0 for images)
    source_frames, source_height, source_width   of the source (edit kinds only)
    meta                    dict of the manifest's other keys (e.g. edit, origin)
    features                {name: np.ndarray} precomputed features found for the sample (may be {})
ShardSource returns exactly this dict (features as read-only numpy arrays over the record), which is what
sama_jax.data.pipeline's sample transform consumes.

Why msgpack and not tf.train.Example: the records are a few byte strings and arrays, msgpack
encodes them without TensorFlow in the reader (Grain workers stay light), and the shards remain
plain ArrayRecord files that grain.sources.ArrayRecordDataSource opens.

Checks at build time, before a sample is written: every media file must exist, be non-empty and
readable - images decoded, videos' headers read and their packets counted (video_io.video_info; the
"decode" check decodes every frame) - and a video needs at least --min-frames frames. A failing
sample is skipped, logged and counted by reason (missing | empty | truncated | corrupt |
unsupported | too_short) with its id and path; nothing replaces it.

Resumable: a shard counts as done when its report exists, which is written after the shard file is
complete and renamed into place; a rerun keeps done shards and builds the rest. The report records
the manifest's hash and the shard size, so a changed manifest is refused rather than mixed in.

Precomputed features: --features text,semantic stores, for each name, the array that
sama_jax.features.feature_path(manifest, id, name) points at (the .npy files sama-precompute
writes under <manifest dir>/features/); a sample without that file gets no entry for the name.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import hashlib
import json
import logging
import multiprocessing
import os
from typing import Iterable, Sequence

import msgpack
import numpy as np

from sama_jax import features as features_lib
from sama_jax.data import manifest as manifest_lib
from sama_jax.data import video_io
from sama_jax.data.video_io import MediaError

log = logging.getLogger(__name__)

SCHEMA_VERSION = 1
INDEX = "index.json"
WRITER_OPTIONS = "group_size:1,uncompressed"   # random access to one record; media is compressed already
CHECKS = ("header", "decode")


# ---------------------------------------------------------------------------------------------------
# Record encoding


def _pack_default(value):
    if isinstance(value, np.ndarray):
        return {"__ndarray__": True, "dtype": value.dtype.str, "shape": list(value.shape),
                "data": np.ascontiguousarray(value).tobytes()}
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in a record")


def _unpack_hook(value: dict):
    if value.get("__ndarray__"):
        return np.frombuffer(value["data"], dtype=np.dtype(value["dtype"])).reshape(value["shape"])
    return value


def encode_record(record: dict) -> bytes:
    return msgpack.packb(record, default=_pack_default, use_bin_type=True)


def decode_record(data: bytes) -> dict:
    return msgpack.unpackb(data, object_hook=_unpack_hook, raw=False)


# ---------------------------------------------------------------------------------------------------
# Checking and reading one sample


class BadItem(Exception):
    """A sample that cannot go into a shard; reason is one of the skip categories."""

    def __init__(self, reason: str, path: str, message: str):
        super().__init__(message)
        self.reason, self.path = reason, path


def _read_media(path: str, min_frames: int, check: str) -> tuple[bytes, str, dict]:
    """(bytes, ext, info) of one media file after checking it; raises BadItem."""
    ext = os.path.splitext(path)[1].lower()
    try:
        if video_io.is_image_ext(ext):
            blob = _read_bytes(path)
            image = video_io.decode_image(blob)
            return blob, ext, dict(frames=1, fps=0.0, height=image.shape[0], width=image.shape[1])
        if ext not in video_io.VIDEO_EXTS:
            raise MediaError(f"{path}: unsupported extension {ext!r}", "unsupported")
        blob = _read_bytes(path)
        info = video_io.video_info(blob)
        if check == "decode":
            info["frames"] = video_io.decode_video(blob).shape[0]
    except MediaError as e:
        # The checks ran on bytes; name the file in the message.
        raise BadItem(e.reason, path, str(e).replace("<bytes>", path)) from e
    if info["frames"] < min_frames:
        raise BadItem("too_short", path, f"{path}: {info['frames']} frames, fewer than min_frames={min_frames}")
    return blob, ext, info


def _read_bytes(path: str) -> bytes:
    if not os.path.isfile(path):
        raise MediaError(f"{path}: file does not exist", "missing")
    with open(path, "rb") as f:
        blob = f.read()
    if not blob:
        raise MediaError(f"{path}: empty file (0 bytes)", "empty")
    return blob


def _load_features(manifest_path: str, sample_id: str, names: Sequence[str]) -> dict:
    features = {}
    for name in names:
        path = features_lib.feature_path(manifest_path, sample_id, name)
        if os.path.exists(path):
            try:
                features[name] = np.load(path, allow_pickle=False)
            except (OSError, ValueError) as e:
                raise BadItem("corrupt", path, f"{path}: cannot read feature {name!r} ({e})") from e
    return features


def make_record(sample: dict, manifest_path: str, min_frames: int = 1, check: str = "header",
                features: Sequence[str] = ()) -> dict:
    """The record of one manifest sample (schema in the module docstring); raises BadItem."""
    kind = sample["kind"]
    target_path = manifest_lib.resolve(manifest_path, sample["target"])
    target, target_ext, info = _read_media(target_path, min_frames, check)
    source, source_ext, source_size = b"", "", {}
    if kind != "t2v":
        source_path = manifest_lib.resolve(manifest_path, sample["source"])
        source, source_ext, source_info = _read_media(source_path, min_frames, check)
        # The pipeline plans batch shapes from these without opening the media again.
        source_size = dict(source_frames=int(source_info["frames"]),
                           source_height=int(source_info["height"]),
                           source_width=int(source_info["width"]))
    meta = {k: v for k, v in sample.items() if k not in ("id", "kind", "text", "source", "target")}
    return dict(id=str(sample["id"]), kind=kind, text=str(sample["text"]), target=target,
                target_ext=target_ext, source=source, source_ext=source_ext, fps=float(info["fps"]),
                frames=int(info["frames"]), height=int(info["height"]), width=int(info["width"]),
                **source_size, meta=meta,
                features=_load_features(manifest_path, str(sample["id"]), features))


# ---------------------------------------------------------------------------------------------------
# Building


def _manifest_hash(path: str) -> str:
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def shard_names(name: str, num_shards: int) -> list[str]:
    return [f"{name}-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]


def _write_json(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def _build_shard(samples: Sequence[dict], manifest_path: str, path: str, settings: dict,
                 min_frames: int, check: str, features: Sequence[str]) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = path + ".tmp"
    writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
    written, skipped = [], []
    try:
        for sample in samples:
            try:
                record = make_record(sample, manifest_path, min_frames, check, features)
            except BadItem as e:
                log.warning("skipping %s (%s): %s", sample["id"], e.reason, e)
                skipped.append(dict(id=sample["id"], reason=e.reason, path=e.path, message=str(e)))
                continue
            writer.write(encode_record(record))
            written.append(sample["id"])
    finally:
        writer.close()
    os.replace(tmp, path)
    report = dict(settings, shard=os.path.basename(path), records=len(written), ids=written, skipped=skipped)
    _write_json(path[:-len(".array_record")] + ".json", report)
    return report


def build_shards(manifest_path: str, out_dir: str, samples_per_shard: int = 256, name: str = "",
                 min_frames: int = 1, check: str = "header", features: Sequence[str] = (),
                 overwrite: bool = False, workers: int = 1) -> dict:
    """Builds (or finishes building) the shards of a manifest; returns the index (see docstring).

    Samples go to shards by their manifest position, so a rerun assigns them identically.
    workers > 1 builds that many shards at once in separate processes.
    """
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    samples = manifest_lib.read_manifest(manifest_path)
    if not samples:
        raise ValueError(f"{manifest_path}: manifest has no samples")
    unknown = sorted(set(features) - set(features_lib.NAMES))
    if unknown:
        raise ValueError(f"unknown features {unknown}; known: {list(features_lib.NAMES)}")
    name = name or os.path.splitext(os.path.basename(manifest_path))[0]
    num_shards = -(-len(samples) // samples_per_shard)
    settings = dict(schema=SCHEMA_VERSION, manifest=os.path.abspath(manifest_path),
                    manifest_sha256=_manifest_hash(manifest_path), samples_per_shard=samples_per_shard,
                    min_frames=min_frames, check=check, features=list(features))
    os.makedirs(out_dir, exist_ok=True)
    index_path = os.path.join(out_dir, INDEX)
    if os.path.exists(index_path):
        os.remove(index_path)  # rewritten at the end; its absence marks an unfinished build
    reports, todo = {}, []
    for i, shard in enumerate(shard_names(name, num_shards)):
        path = os.path.join(out_dir, shard)
        report_path = path[:-len(".array_record")] + ".json"
        if os.path.exists(report_path) and os.path.exists(path) and not overwrite:
            with open(report_path) as f:
                report = json.load(f)
            stale = {k: (report.get(k), v) for k, v in settings.items()
                     if k != "manifest" and report.get(k) != v}  # the path may move; the hash may not
            if stale:
                raise ValueError(f"{report_path}: built with different settings {stale}; "
                                 f"build into a new directory or pass overwrite")
            reports[i] = report
        else:
            todo.append((i, samples[i * samples_per_shard:(i + 1) * samples_per_shard], path))
    resumed = len(reports)
    jobs = [(chunk, manifest_path, path, settings, min_frames, check, list(features)) for _, chunk, path in todo]
    if workers > 1 and len(todo) > 1:
        # Shards are independent; spawned processes (not forked) so a caller's threads cannot deadlock them.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(min(workers, len(todo)), mp_context=context) as pool:
            built = pool.map(_build_shard, *zip(*jobs))
            for (i, _, _), report in zip(todo, built):
                reports[i] = report
                log.info("shard %d/%d: %d records, %d skipped", i + 1, num_shards, report["records"],
                         len(report["skipped"]))
    else:
        for (i, _, _), job in zip(todo, jobs):
            reports[i] = _build_shard(*job)
            log.info("shard %d/%d: %d records, %d skipped", i + 1, num_shards, reports[i]["records"],
                     len(reports[i]["skipped"]))
    reports = [reports[i] for i in range(num_shards)]
    skipped = [item for report in reports for item in report["skipped"]]
    counts = {}
    for item in skipped:
        counts[item["reason"]] = counts.get(item["reason"], 0) + 1
    index = dict(settings, shards=[r["shard"] for r in reports], records=[r["records"] for r in reports],
                 total_records=sum(r["records"] for r in reports), total_samples=len(samples),
                 skipped_total=len(skipped), skipped_counts=counts, skipped=skipped,
                 resumed_shards=resumed)
    _write_json(index_path, index)
    return index


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
            raise FileNotFoundError(f"{index_path}: no index; the build is unfinished (rerun sama-build-shards)")
        with open(index_path) as f:
            index = json.load(f)
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
        return decode_record(self._source[index])

    def __repr__(self) -> str:
        return f"ShardSource({len(self.paths)} shards, {len(self)} records)"


def iter_records(location: str | Sequence[str]) -> Iterable[dict]:
    source = ShardSource(location)
    for i in range(len(source)):
        yield source[i]


# ---------------------------------------------------------------------------------------------------
# Command line


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description="Build ArrayRecord shards from a manifest (resumable).")
    parser.add_argument("--manifest", required=True, help="JSONL manifest (sama_jax.data.manifest format)")
    parser.add_argument("--out", required=True, help="output directory of shards and index.json")
    parser.add_argument("--samples-per-shard", type=int, default=256)
    parser.add_argument("--name", default="", help="shard file prefix (default: the manifest's name)")
    parser.add_argument("--min-frames", type=int, default=1, help="skip videos with fewer frames")
    parser.add_argument("--check", choices=CHECKS, default="header",
                        help="header: read headers and count packets; decode: also decode every frame")
    parser.add_argument("--features", default="", help="comma-separated precomputed feature names")
    parser.add_argument("--overwrite", action="store_true", help="rebuild shards that are already done")
    parser.add_argument("--workers", type=int, default=1, help="shards built at once (processes)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    index = build_shards(args.manifest, args.out, samples_per_shard=args.samples_per_shard, name=args.name,
                         min_frames=args.min_frames, check=args.check,
                         features=[f for f in args.features.split(",") if f], overwrite=args.overwrite,
                         workers=args.workers)
    print(f"{index['total_records']} of {index['total_samples']} samples in {len(index['shards'])} shards "
          f"under {args.out} ({index['resumed_shards']} shards kept from an earlier run)")
    if index["skipped_total"]:
        print(f"skipped {index['skipped_total']}: {index['skipped_counts']}")
        for item in index["skipped"]:
            print(f"  {item['id']}: {item['reason']}: {item['message']}")


if __name__ == "__main__":
    main()
