"""sama-build-shards' work: check each manifest sample, write shards, keep what a rerun can keep.

The command is sama_jax.data.build_shards; the output layout and the record schema are documented
in sama_jax.data.arrayrecord; the file format in sama_jax.data.shard_format. This module decides, before anything is written,
which shards of an output directory are still right for the manifest and settings (plan), and then
builds the others under an exclusive lock on the directory (build_shards).
"""

from __future__ import annotations

import concurrent.futures
import hashlib
import json
import logging
import multiprocessing
import os
import re
import shutil
from typing import Callable, Sequence

import numpy as np

from sama_jax import child_processes, dir_lock
from sama_jax import features as features_lib
from sama_jax.data import manifest as manifest_lib
from sama_jax.data import shard_format, transforms, video_io
from sama_jax.data.video_io import MediaError
from sama_jax.progress import Progress

log = logging.getLogger("sama_jax.data.arrayrecord")

MIN_FRAMES = 5  # = data.min_frames of configs/stage*.py (tests/test_shards.py keeps them equal)
CHECKS = ("header", "decode")
INDEX = "index.json"
LOCK = dir_lock.LOCK
WRITER_OPTIONS = "group_size:1,uncompressed"  # random access to one record; media is compressed already
# Keys whose change makes every done shard wrong. The manifest's path may move; its contents are
# compared per shard (sample_hashes) so that appended samples do not invalidate the rest.
SETTING_KEYS = (
    "schema",
    "name",
    "samples_per_shard",
    "min_frames",
    "fps",
    "frame_stride",
    "check",
    "features",
)


# ---------------------------------------------------------------------------------------------------
# Checking and reading one sample


class BadItem(Exception):
    """A sample that cannot go into a shard; reason is one of the skip categories."""

    def __init__(self, reason: str, path: str, message: str):
        super().__init__(message)
        self.reason, self.path = reason, path


def _read_media(path: str, check: str) -> tuple[bytes, str, dict]:
    """(bytes, ext, info) of one media file after checking it; raises BadItem."""
    ext = os.path.splitext(path)[1].lower()
    try:
        if video_io.is_image_ext(ext):
            blob = _read_bytes(path)
            image = video_io.decode_image(blob)
            return blob, ext, dict(frames=1, fps=0.0, height=image.shape[0], width=image.shape[1], image=True)
        if ext not in video_io.VIDEO_EXTS:
            raise MediaError(f"{path}: unsupported extension {ext!r}", "unsupported")
        blob = _read_bytes(path)
        info = dict(video_io.video_info(blob), image=False)
        if check == "decode":
            info["frames"] = video_io.decode_video(blob).shape[0]
    except MediaError as e:
        # The checks ran on bytes; name the file in the message.
        raise BadItem(e.reason, path, str(e).replace("<bytes>", path)) from e
    return blob, ext, info


def _read_bytes(path: str) -> bytes:
    video_io.check_media_file(path)
    with open(path, "rb") as f:
        return f.read()


def _check_length(path: str, info: dict, min_frames: int, stride: int, start: int) -> None:
    """Training skips a clip that gives fewer than min_frames frames; so does the build."""
    if info["image"]:
        return
    used = len(range(start, info["frames"], stride))
    if used < min_frames:
        how = "" if (stride, start) == (1, 0) else f" give {used} at stride {stride} from frame {start}"
        raise BadItem(
            "too_short", path, f"{path}: {info['frames']} frames{how}, fewer than min_frames={min_frames}"
        )


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


def make_record(
    sample: dict,
    manifest_path: str,
    min_frames: int = MIN_FRAMES,
    check: str = "header",
    features: Sequence[str] = (),
    fps: float = 0.0,
    frame_stride: int = 1,
) -> dict:
    """The record of one manifest sample (schema: sama_jax.data.arrayrecord); raises BadItem.

    fps and frame_stride are data.fps and data.frame_stride: with them the length check counts the
    frames training takes (from start_frame at the stride it will use), not the frames in the file.
    """
    kind = sample["kind"]
    target_path = manifest_lib.resolve(manifest_path, sample["target"])
    start = sample.get("start_frame", 0)
    if start < 0:  # as the pipeline does (its "bad_record"): nothing sensible to take
        raise BadItem(
            "bad_record",
            target_path,
            f"{target_path}: start_frame must be a non-negative integer, got {start!r}",
        )
    target, target_ext, info = _read_media(target_path, check)
    stride = transforms.stride_for(info["fps"], fps, frame_stride)
    _check_length(target_path, info, min_frames, stride, start)
    source, source_ext, source_size = b"", "", {}
    if kind != "t2v":
        source_path = manifest_lib.resolve(manifest_path, sample["source"])
        source, source_ext, source_info = _read_media(source_path, check)
        _check_length(source_path, source_info, min_frames, stride, start)
        # The pipeline plans batch shapes from these without opening the media again.
        source_size = dict(
            source_frames=int(source_info["frames"]),
            source_height=int(source_info["height"]),
            source_width=int(source_info["width"]),
        )
    meta = {k: v for k, v in sample.items() if k not in ("id", "kind", "text", "source", "target")}
    return dict(
        id=str(sample["id"]),
        kind=kind,
        text=str(sample["text"]),
        target=target,
        target_ext=target_ext,
        source=source,
        source_ext=source_ext,
        fps=float(info["fps"]),
        frames=int(info["frames"]),
        height=int(info["height"]),
        width=int(info["width"]),
        **source_size,
        meta=meta,
        features=_load_features(manifest_path, str(sample["id"]), features),
    )


# ---------------------------------------------------------------------------------------------------
# Writing one shard (in this process or a worker)


def report_path(shard_path: str) -> str:
    """The shard's report: written after the shard file is complete, so it marks the shard done."""
    return os.fspath(shard_path) + ".json"


def _write_json(path: str, value) -> None:
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(value, f, indent=1)
    os.replace(tmp, path)


def _sample_hash(sample: dict) -> str:
    return hashlib.sha256(json.dumps(sample, sort_keys=True, ensure_ascii=False).encode()).hexdigest()[:16]


def _build_shard(
    samples: Sequence[dict],
    manifest_path: str,
    path: str,
    settings: dict,
    on_sample: Callable[[], None] | None = None,
) -> dict:
    from array_record.python.array_record_module import ArrayRecordWriter

    tmp = path + ".tmp"
    writer = ArrayRecordWriter(tmp, WRITER_OPTIONS)
    written, skipped = [], []
    try:
        for sample in samples:
            try:
                record = make_record(
                    sample,
                    manifest_path,
                    settings["min_frames"],
                    settings["check"],
                    settings["features"],
                    settings["fps"],
                    settings["frame_stride"],
                )
            except BadItem as e:
                log.warning("skipping %s (%s): %s", sample["id"], e.reason, e)
                skipped.append(dict(id=sample["id"], reason=e.reason, path=e.path, message=str(e)))
            else:
                writer.write(shard_format.encode_record(record))
                written.append(sample["id"])
            if on_sample:
                on_sample()
    finally:
        writer.close()
    os.replace(tmp, path)
    report = dict(
        settings,
        shard=os.path.basename(path),
        records=len(written),
        ids=written,
        skipped=skipped,
        sample_hashes=[_sample_hash(s) for s in samples],
        num_bytes=os.path.getsize(path),
    )
    _write_json(report_path(path), report)
    return report


# ---------------------------------------------------------------------------------------------------
# Planning: what a (re)run keeps, builds, renames and removes; nothing is changed here


class Plan:
    def __init__(self):
        self.keep = {}  # shard index -> (current file name, report) of a finished shard still right
        self.build = []  # shard indices to build
        self.remove = []  # shard and report files that are not kept (replaced, stale or unfinished)
        self.summary = ""  # what a rerun keeps and builds, for the log


def _ranges(indices) -> str:
    parts = []
    for i in sorted(indices):
        if parts and parts[-1][1] == i - 1:
            parts[-1][1] = i
        else:
            parts.append([i, i])
    return ", ".join(str(a) if a == b else f"{a}-{b}" for a, b in parts)


def _shards(word: str, indices) -> str:
    return f"{word}{'s' * (len(indices) > 1)} {_ranges(indices)}"


# A shard file or its report, of any dataset name and shard count.
_SHARD_FILE = re.compile(
    r"^(.+)-" + shard_format.SPLIT + r"\." + shard_format.FILE_FORMAT + r"-\d{5}-of-\d{5}(\.json)?$"
)


def _read_index(out_dir: str) -> dict | None:
    path = os.path.join(out_dir, INDEX)
    if not os.path.exists(path):
        return None
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:  # cut short: the build is unfinished, and the index is rewritten at its end
        return None


def _read_report(path: str) -> dict | None:
    try:
        with open(path) as f:
            return json.load(f)
    except ValueError:  # unreadable: the shard counts as unfinished and is rebuilt
        return None


def plan(out_dir: str, samples: Sequence[dict], settings: dict, overwrite: bool) -> Plan:
    """Which shards of out_dir are still right for these samples and settings; raises ValueError to
    refuse. Reads only: the caller holds the lock and carries the plan out."""
    name, size = settings["name"], settings["samples_per_shard"]
    num_shards = -(-len(samples) // size)
    files = set(os.listdir(out_dir)) if os.path.isdir(out_dir) else set()
    index = _read_index(out_dir)
    ours = {f for f in files if _SHARD_FILE.match(f)}
    old_layout = index is not None and index.get("schema") != shard_format.SCHEMA_VERSION
    others = sorted({_SHARD_FILE.match(f).group(1) for f in ours} - {name})
    if (old_layout or others) and not overwrite:
        what = (
            f"a build of an older format (schema {index.get('schema')})"
            if old_layout
            else f"shards of another dataset name ({', '.join(others)})"
        )
        raise ValueError(f"{out_dir} holds {what}; build into a new directory or pass --overwrite")
    if old_layout:  # schema 1 listed its files in the index: <name>-0000i-of-0000n.array_record + .json
        ours |= {
            f
            for shard in index.get("shards", [])
            for f in (shard, shard.rsplit(".", 1)[0] + ".json")
            if f in files
        }

    found = {}  # shard index -> [(file name, report)]: finished shards of this name, any shard count
    for f in sorted(files):
        parsed = shard_format.parse_shard_name(name, f)
        report = (
            _read_report(os.path.join(out_dir, report_path(f)))
            if parsed and report_path(f) in files
            else None
        )
        if report is not None:
            found.setdefault(parsed[0], []).append((f, report))
    if not overwrite:
        for entries in found.values():
            for f, report in entries:
                changed = [
                    f"{k}: {report.get(k)!r} -> {settings[k]!r}"
                    for k in SETTING_KEYS
                    if report.get(k) != settings[k]
                ]
                if changed:
                    raise ValueError(
                        f"{os.path.join(out_dir, f)}: built with different settings "
                        f"({', '.join(changed)}); build into a new directory or pass --overwrite"
                    )

    work, changed = Plan(), []
    for i in range(num_shards):
        hashes = [_sample_hash(s) for s in samples[i * size : (i + 1) * size]]
        entries = [] if overwrite else found.get(i, [])
        match = next(((f, r) for f, r in entries if r["sample_hashes"] == hashes), None)
        if match:
            work.keep[i] = match
            continue
        work.build.append(i)
        old = entries[0][1]["sample_hashes"] if entries else None
        if old is not None and not (len(old) < len(hashes) and hashes[: len(old)] == old):
            changed.append((i, old, hashes))  # not just samples appended to the last shard
    extra = sorted(i for i in found if i >= num_shards)
    kept_files = {g for f, _ in work.keep.values() for g in (f, report_path(f))}
    work.remove = sorted(ours - kept_files)

    if overwrite:
        work.summary = f"--overwrite: rebuilding all {num_shards} shards" if found else ""
        return work
    if changed or extra:
        detail = []
        if changed:
            i, old, new = changed[0]
            j = next((j for j, (a, b) in enumerate(zip(old, new)) if a != b), min(len(old), len(new)))
            first = (
                f"first difference: sample {i * size + j}, id {samples[i * size + j]['id']!r}"
                if j < len(new)
                else f"shard {i} lost samples"
            )
            detail.append(f"samples of {_shards('shard', [c[0] for c in changed])} changed ({first})")
        if extra:
            detail.append(f"{_shards('shard', extra)} lie past the manifest's end ({len(samples)} samples)")
        raise ValueError(
            f"{out_dir}: the manifest changed since the build: {'; '.join(detail)}. A rerun "
            f"only picks up samples appended to the manifest; pass --overwrite to rebuild, "
            f"or build into a new directory"
        )
    if work.keep:
        old_total = index.get("total_samples") if index else None
        head = ""
        if old_total is not None and old_total < len(samples):
            gained = len(samples) - old_total
            head = f"manifest gained {gained} sample{'s' * (gained != 1)}: "
        elif old_total is None:
            head = "resuming an unfinished build: "
        work.summary = f"{head}{_shards('shard', work.keep)} unchanged, " + (
            f"building {_shards('shard', work.build)}" if work.build else "nothing to build"
        )
    return work


# ---------------------------------------------------------------------------------------------------
# The lock on an output directory


def lock_out_dir(out_dir: str):
    """An exclusive lock on OUT (sama_jax.dir_lock), held while the returned file stays open; the
    kernel drops it when the builder dies however it dies, so a lock that can be taken means no
    builder is alive. The pid is written once the plan is accepted (a refused call changes nothing)."""
    return dir_lock.acquire(out_dir, busy="is being built by", mark=False)


# ---------------------------------------------------------------------------------------------------
# Building


def build_shards(
    manifest_path: str,
    out_dir: str,
    samples_per_shard: int = 256,
    name: str = "",
    min_frames: int = MIN_FRAMES,
    check: str = "header",
    features: Sequence[str] = (),
    overwrite: bool = False,
    workers: int = 1,
    fps: float = 0.0,
    frame_stride: int = 1,
) -> dict:
    """Builds (or finishes building) the shard dataset of a manifest; returns the index.

    Every check on the arguments, the manifest and a previous build in out_dir runs before anything
    is written; a refused call changes nothing. Samples go to shards by their manifest position, so
    a rerun assigns them identically and samples appended to the manifest only touch the last shards.
    workers > 1 builds that many shards at once in separate processes.
    """
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    if samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be >= 1, got {samples_per_shard}")
    if min_frames < 1:
        raise ValueError(f"min_frames must be >= 1, got {min_frames}")
    if workers < 1:
        raise ValueError(f"workers must be >= 1, got {workers}")
    unknown = sorted(set(features) - set(features_lib.NAMES))
    if unknown:
        raise ValueError(f"unknown features {unknown}; known: {list(features_lib.NAMES)}")
    name = shard_format.check_name(name, "--name") if name else shard_format.default_name(manifest_path)
    samples = manifest_lib.read_manifest(manifest_path)
    if not samples:
        raise ValueError(f"{manifest_path}: manifest has no samples")
    settings = dict(
        schema=shard_format.SCHEMA_VERSION,
        name=name,
        samples_per_shard=samples_per_shard,
        min_frames=min_frames,
        fps=float(fps),
        frame_stride=int(frame_stride),
        check=check,
        features=list(features),
    )
    num_shards = -(-len(samples) // samples_per_shard)
    names = shard_format.shard_names(name, num_shards)

    lock = lock_out_dir(out_dir)
    try:
        work = plan(out_dir, samples, settings, overwrite)  # a refusal leaves out_dir as it was
        dir_lock.mark_owner(lock)
        log.info(
            "%s: %d samples in %d shards of %d; %s",
            out_dir,
            len(samples),
            num_shards,
            samples_per_shard,
            work.summary or f"building {_shards('shard', work.build)}",
        )
        renames = {i: f for i, (f, _) in work.keep.items() if f != names[i]}
        index_path = os.path.join(out_dir, INDEX)
        if (work.build or work.remove or renames) and os.path.exists(index_path):
            os.remove(index_path)  # rewritten at the end; its absence marks an unfinished build
        # Under the lock, any .tmp file is a dead builder's leftover.
        for f in sorted(os.listdir(out_dir)):
            if os.path.isdir(os.path.join(out_dir, f)) and f.endswith(".tmp"):
                shutil.rmtree(os.path.join(out_dir, f))
            elif f.endswith(".tmp") or f in work.remove:
                os.remove(os.path.join(out_dir, f))
        reports = {}
        for i, (current, report) in work.keep.items():
            if current != names[i]:  # the manifest grew into more shards: TFDS names carry the count
                os.replace(os.path.join(out_dir, current), os.path.join(out_dir, names[i]))
                report = dict(report, shard=names[i])
                _write_json(os.path.join(out_dir, report_path(names[i])), report)
                os.remove(os.path.join(out_dir, report_path(current)))
            reports[i] = report
        reports.update(_build(work.build, samples, manifest_path, out_dir, names, settings, workers))
        reports = [reports[i] for i in range(num_shards)]
        return _finish(out_dir, manifest_path, samples, settings, reports, resumed=len(work.keep))
    finally:
        lock.close()


def _build(
    todo: Sequence[int], samples, manifest_path: str, out_dir: str, names, settings: dict, workers: int
) -> dict:
    size = settings["samples_per_shard"]
    chunks = {i: samples[i * size : (i + 1) * size] for i in todo}
    progress = Progress(sum(len(c) for c in chunks.values()), logger=log)
    reports = {}

    def done(i, report):
        reports[i] = report
        log.info(
            "shard %d/%d: %d records, %d skipped",
            i + 1,
            len(names),
            report["records"],
            len(report["skipped"]),
        )

    if workers > 1 and len(todo) > 1:
        # Shards are independent; spawned processes (not forked) so a caller's threads cannot deadlock them.
        context = multiprocessing.get_context("spawn")
        with concurrent.futures.ProcessPoolExecutor(
            min(workers, len(todo)),
            mp_context=context,
            initializer=child_processes.worker_init,
            initargs=(os.getpid(),),
        ) as pool:
            futures = {
                pool.submit(
                    _build_shard, chunks[i], manifest_path, os.path.join(out_dir, names[i]), settings
                ): i
                for i in todo
            }
            try:
                for future in concurrent.futures.as_completed(futures):
                    i = futures[future]
                    done(i, future.result())
                    progress.advance(len(chunks[i]), f"{len(reports)}/{len(todo)} shards, ")
            except BaseException:  # stop at the first failure instead of building every other shard first
                for future in futures:
                    future.cancel()
                raise
    else:
        for i in todo:
            done(
                i,
                _build_shard(
                    chunks[i],
                    manifest_path,
                    os.path.join(out_dir, names[i]),
                    settings,
                    on_sample=progress.advance,
                ),
            )
    return reports


def _finish(
    out_dir: str, manifest_path: str, samples, settings: dict, reports: Sequence[dict], resumed: int
) -> dict:
    """TFDS metadata, then index.json (last: its presence marks a finished build)."""
    skipped = [item for report in reports for item in report["skipped"]]
    counts = {}
    for item in skipped:
        counts[item["reason"]] = counts.get(item["reason"], 0) + 1
    records = [r["records"] for r in reports]
    shard_format.write_tfds_metadata(
        out_dir,
        settings["name"],
        records,
        sum(r["num_bytes"] for r in reports),
        description=f"Built by sama-build-shards from {os.path.abspath(manifest_path)}: "
        f"{sum(records)} of {len(samples)} samples ({len(skipped)} skipped, see index.json).",
    )
    with open(manifest_path, "rb") as f:
        manifest_sha256 = hashlib.sha256(f.read()).hexdigest()
    index = dict(
        settings,
        manifest=os.path.abspath(manifest_path),
        manifest_sha256=manifest_sha256,
        tfds_version=shard_format.VERSION,
        split=shard_format.SPLIT,
        shards=[r["shard"] for r in reports],
        records=records,
        total_records=sum(records),
        total_samples=len(samples),
        skipped_total=len(skipped),
        skipped_counts=counts,
        skipped=skipped,
        resumed_shards=resumed,
    )
    _write_json(os.path.join(out_dir, INDEX), index)
    return index
