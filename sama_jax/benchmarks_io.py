"""Benchmark case lists in, and the file layout each benchmark's scorer reads, out.

    cases = read_cases("openve", "benchmark_videos.csv", media_root="OpenVE-Bench/videos")
    edit = fit_to_source("reco", edit, source_frames=49, source_height=480)
    write_listing("openve", out_dir, cases, records)     # the CSV the benchmark's tools take

Every reader returns Case objects with a unique case_id and a unique output path (relative to the
export's --out, compared once normalised), or raises BenchmarkError naming the file, the line and what
to change, before any model is loaded. Facts on the formats: shared/reference/editing-and-benchmarks.md.

A case list is data from elsewhere: its sources (and manifest targets) must resolve, symlinks
followed, inside the media root (--media-root, default the case list's folder); read_source refuses
any other path as that case's failure (reason outside_media_root), unless read_cases was given
allow_outside=True (sama-export --allow-outside-media-root).

openve    benchmark_videos.csv with columns original_video, prompt, edited_type. Out: the scorer reads
          <out>/<basename of original_video with ".mp4" replaced by "_edited.mp4">; we also write
          <out>/edited_results.csv with columns edited_type,prompt,original_video,edited_result_path.
reco      configs/{task}.txt (a folder of them, or one file), lines "video.mp4: instruction". Out:
          <out>/<task>/<video stem>_<p>.mp4 with p = instruction.replace(' ', '_').replace('.', '')
          .replace(',', '').replace(':', ' ')[:80] (give the scorer <out>/<task> as its edited
          folder). The judge puts source and edit side by side frame for frame, so the edit is cut or
          stretched to the source's frame count and resized to the source's height (aspect kept).
          Sources: <media-root>/<task>/<video> when it exists, else <media-root>/<video>.
vie       a case list (.csv, .json list of objects, or .jsonl) read by configurable column names
          (its public layout is not confirmed); a missing column is an error naming the columns found.
          Out: <out>/<id>.mp4 (id column), else <out>/<video stem>.mp4; <out>/edited_results.csv
          is the case list's columns plus edited_result_path.
manifest  our JSONL manifests (sama_jax.data.manifest), video_edit and image_edit samples; the target
          is the ground truth the scores use. Out: <out>/<id>.mp4 (image edits: <id>.png).
"""

from __future__ import annotations

import csv
import dataclasses
import glob
import json
import os

import numpy as np

from sama_jax.data import manifest as manifest_lib
from sama_jax.data import video_io

BENCHMARKS = ("openve", "reco", "vie", "manifest")
OPENVE_COLUMNS = ("original_video", "prompt", "edited_type")
OPENVE_LISTING = ("edited_type", "prompt", "original_video", "edited_result_path")
LISTING_NAME = "edited_results.csv"
# id "": outputs named by the video's stem; the default type column is used when present.
VIE_COLUMNS = dict(video="video", prompt="prompt", type="type", id="")
RECO_NAME_CHARS = 80


class BenchmarkError(ValueError):
    """A case list that cannot be read as its benchmark; the message names file, line and fix."""


@dataclasses.dataclass
class Case:
    case_id: str  # unique within the run: records and resumes key on it
    source: str  # path of the source video (or image)
    instruction: str
    edit_type: str  # the benchmark's category, for per-type aggregates ("" when none)
    output: str  # output path relative to --out
    where: str  # "file:line" of the case, for messages
    target: str | None = None  # ground-truth edit (manifests), for the scores
    row: dict = dataclasses.field(default_factory=dict)  # the input row as read
    media_root: str = ""  # sources must resolve inside it ("": not checked)
    note: str = ""  # what was changed to make the benchmark's name a file name, for the log


class OutsideMediaRoot(ValueError):
    """A case's source resolves outside the media root; that case fails, the run goes on."""

    reason = "outside_media_root"


def check_inside(path: str, root: str) -> None:
    real, real_root = os.path.realpath(path), os.path.realpath(root)
    if os.path.commonpath([real, real_root]) != real_root:
        raise OutsideMediaRoot(
            f"{path} resolves to {real}, outside the media root {real_root} "
            "(--allow-outside-media-root reads it anyway)"
        )


def _read_csv(path: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """(header, [(line number, row)]) of a CSV file."""
    with open(path, newline="", encoding="utf-8-sig") as f:
        reader = csv.DictReader(f)
        header = list(reader.fieldnames or [])
        rows = [(reader.line_num, row) for row in reader]
    return header, rows


def _require_columns(path: str, header, wanted, how: str) -> None:
    missing = [c for c in wanted if c not in header]
    if missing:
        raise BenchmarkError(
            f"{path}: no column {', '.join(repr(c) for c in missing)}; columns found: "
            f"{', '.join(repr(c) for c in header) or 'none'} ({how})"
        )


def _check_unique(cases: list[Case]) -> list[Case]:
    ids, outputs = {}, {}
    for case in cases:
        output = os.path.normpath(case.output)
        if os.path.isabs(output) or output.startswith(os.pardir):
            raise BenchmarkError(f"{case.where}: output {case.output!r} is not inside --out")
        if case.case_id in ids:
            raise BenchmarkError(f"{case.where}: case {case.case_id!r} is also {ids[case.case_id]}")
        if output in outputs:
            raise BenchmarkError(
                f"{case.where}: writes {output}, as {outputs[output]} does: "
                "the benchmark's file naming cannot tell them apart"
            )
        ids[case.case_id], outputs[output] = case.where, case.where
    if not cases:
        raise BenchmarkError("the case list has no cases")
    return cases


def openve_output_name(original_video: str) -> str:
    """The file the OpenVE scorer opens for a case: the basename with '.mp4' -> '_edited.mp4'."""
    return os.path.basename(original_video).replace(".mp4", "_edited.mp4")


def read_openve(path: str, media_root: str) -> list[Case]:
    header, rows = _read_csv(path)
    _require_columns(path, header, OPENVE_COLUMNS, "OpenVE-Bench's benchmark_videos.csv")
    cases = []
    for line, row in rows:
        where = f"{path}:{line}"
        video, prompt = row["original_video"].strip(), row["prompt"].strip()
        if not video or not prompt:
            raise BenchmarkError(f"{where}: empty original_video or prompt")
        name = openve_output_name(video)
        if name == os.path.basename(video):
            raise BenchmarkError(
                f"{where}: original_video {video!r} does not end in .mp4, so the "
                "scorer's '<name>_edited.mp4' rule has no name for its edit"
            )
        cases.append(
            Case(
                case_id=name,
                source=os.path.join(media_root, video),
                instruction=prompt,
                edit_type=row["edited_type"].strip(),
                output=name,
                where=where,
                row=row,
            )
        )
    return _check_unique(cases)


def reco_output_name(video: str, instruction: str) -> str:
    """ReCo's edited file name: {video stem}_{p}.mp4 (tools' rule, including its ':' -> ' '), with
    a path separator, which the rule keeps, replaced by '_' (else the edit lands in a subfolder the
    scorer never reads)."""
    p = instruction.replace(" ", "_").replace(".", "").replace(",", "").replace(":", " ")[:RECO_NAME_CHARS]
    return f"{os.path.splitext(os.path.basename(video))[0]}_{_no_separators(p)}.mp4"


def _no_separators(name: str) -> str:
    return name.replace("/", "_").replace(os.sep, "_")


def read_reco(path: str, media_root: str) -> list[Case]:
    files = sorted(glob.glob(os.path.join(path, "*.txt"))) if os.path.isdir(path) else [path]
    if not files:
        raise BenchmarkError(f"{path}: no {{task}}.txt files (ReCo-Bench's configs/ folder)")
    cases = []
    for file in files:
        task = os.path.splitext(os.path.basename(file))[0]
        with open(file, encoding="utf-8") as f:
            for line_no, line in enumerate(f, 1):
                if not line.strip():
                    continue
                where = f"{file}:{line_no}"
                video, sep, instruction = line.strip().partition(":")
                video, instruction = video.strip(), instruction.strip()
                if not sep or not video or not instruction:
                    raise BenchmarkError(f"{where}: expected 'video.mp4: instruction', got {line.strip()!r}")
                in_task = os.path.join(media_root, task, video)
                source = in_task if os.path.exists(in_task) else os.path.join(media_root, video)
                output = f"{task}/{reco_output_name(video, instruction)}"
                note = ""
                if "/" in instruction or os.sep in instruction:
                    note = f"'/' in the instruction is '_' in the output name {output}"
                cases.append(
                    Case(
                        case_id=output,
                        source=source,
                        instruction=instruction,
                        edit_type=task,
                        output=output,
                        where=where,
                        row={"video": video, "task": task},
                        note=note,
                    )
                )
    return _check_unique(cases)


def _read_rows(path: str) -> tuple[list[str], list[tuple[int, dict]]]:
    """Rows of a .csv, .json (a list of objects) or .jsonl case list, with line (or item) numbers."""
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        return _read_csv(path)
    if ext not in (".json", ".jsonl"):
        raise BenchmarkError(f"{path}: a VIE-Bench case list must be .csv, .json or .jsonl")
    with open(path, encoding="utf-8") as f:
        try:
            if ext == ".json":
                items = json.load(f)
                if isinstance(items, dict):  # {id: row} is also common
                    items = [
                        dict(row, id=key) if isinstance(row, dict) else row for key, row in items.items()
                    ]
                rows = list(enumerate(items, 1))
            else:
                rows = [(n, json.loads(line)) for n, line in enumerate(f, 1) if line.strip()]
        except json.JSONDecodeError as e:
            raise BenchmarkError(f"{path}: not valid JSON ({e.msg}, line {e.lineno})") from e
    bad = next((n for n, row in rows if not isinstance(row, dict)), None)
    if bad is not None:
        raise BenchmarkError(f"{path}: item {bad} is not an object with named fields")
    header = list(dict.fromkeys(k for _, row in rows for k in row))
    return header, rows


def read_vie(path: str, media_root: str, columns: dict | None = None) -> list[Case]:
    given = dict(columns or {})
    columns = dict(VIE_COLUMNS, **given)
    header, rows = _read_rows(path)
    if "type" not in given and columns["type"] not in header:
        columns["type"] = ""  # the default category column is optional; a named one is required
    wanted = [columns["video"], columns["prompt"]] + [columns[k] for k in ("type", "id") if columns[k]]
    _require_columns(
        path, header, wanted, "choose them with --vie-columns video=...,prompt=...,type=...,id=..."
    )
    cases = []
    for line, row in rows:
        where = f"{path}:{line}"
        video, prompt = (
            str(row.get(columns["video"]) or "").strip(),
            str(row.get(columns["prompt"]) or "").strip(),
        )
        if not video or not prompt:
            raise BenchmarkError(f"{where}: empty {columns['video']!r} or {columns['prompt']!r}")
        name = (
            str(row[columns["id"]]).strip() if columns["id"] else os.path.splitext(os.path.basename(video))[0]
        )
        if not name or "/" in name or name.startswith("."):
            raise BenchmarkError(f"{where}: {name!r} cannot name an output file")
        cases.append(
            Case(
                case_id=name,
                source=os.path.join(media_root, video),
                instruction=prompt,
                edit_type=str(row.get(columns["type"], "") or "").strip() if columns["type"] else "",
                output=f"{name}.mp4",
                where=where,
                row=row,
            )
        )
    return _check_unique(cases)


def read_manifest_cases(path: str, media_root: str | None = None) -> list[Case]:
    """video_edit and image_edit samples of a manifest; paths relative to media_root, default the
    manifest's folder (the manifest convention)."""
    cases = []
    for number, sample in enumerate(manifest_lib.read_manifest(path), 1):
        if sample["kind"] not in ("video_edit", "image_edit"):
            continue
        resolve = (
            (lambda p: os.path.join(media_root, p))
            if media_root
            else (lambda p: manifest_lib.resolve(path, p))
        )
        edit = sample.get("edit") if isinstance(sample.get("edit"), dict) else {}
        edit_type = str(edit.get("type") or sample.get("edit_type") or sample.get("task") or "")
        sid = str(sample["id"])
        if "/" in sid or sid.startswith("."):
            raise BenchmarkError(f"{path}: sample {number}: id {sid!r} cannot name an output file")
        ext = ".png" if sample["kind"] == "image_edit" else ".mp4"
        cases.append(
            Case(
                case_id=sid,
                source=resolve(sample["source"]),
                instruction=sample["text"],
                edit_type=edit_type,
                output=sid + ext,
                where=f"{path}: sample {number}",
                target=resolve(sample["target"]),
                row=sample,
            )
        )
    if not cases:
        raise BenchmarkError(f"{path}: no video_edit or image_edit samples")
    return _check_unique(cases)


def parse_columns(text: str) -> dict:
    """'video=path,prompt=instruction' -> {"video": "path", "prompt": "instruction"}."""
    out = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key.strip() not in VIE_COLUMNS:
            raise BenchmarkError(
                f"--vie-columns {text!r}: expected key=column pairs with keys {', '.join(VIE_COLUMNS)}"
            )
        out[key.strip()] = value.strip()
    return out


def read_cases(
    benchmark: str,
    path: str,
    media_root: str | None = None,
    vie_columns: dict | None = None,
    allow_outside: bool = False,
) -> list[Case]:
    if benchmark not in BENCHMARKS:
        raise BenchmarkError(f"--benchmark {benchmark!r} is not one of {', '.join(BENCHMARKS)}")
    if not os.path.exists(path):
        raise FileNotFoundError(f"--cases {path}: no such file or folder")
    root = media_root if media_root else os.path.dirname(os.path.abspath(path))
    if benchmark == "manifest":
        cases = read_manifest_cases(path, media_root)
    elif benchmark == "openve":
        cases = read_openve(path, root)
    elif benchmark == "reco":
        cases = read_reco(path, root)
    else:
        cases = read_vie(path, root, vie_columns)
    if not allow_outside:
        for case in cases:
            case.media_root = os.path.abspath(root)
    return cases


def match_frames(video: np.ndarray, count: int) -> np.ndarray:
    """Cut to `count` frames, or stretch by repeating frames evenly when shorter."""
    if len(video) >= count:
        return video[:count]
    return video[np.floor(np.arange(count) * len(video) / count).astype(int)]


def fit_to_source(benchmark: str, edit: np.ndarray, source_frames: int, source_height: int) -> np.ndarray:
    """The edit as the benchmark's judge needs it: ReCo puts source and edit side by side frame for
    frame, so the edit takes the source's frame count and height (width scaled, kept even)."""
    if benchmark != "reco":
        return edit
    from sama_jax import scores

    edit = match_frames(edit, source_frames)
    h, w = edit.shape[1:3]
    if h != source_height:
        width = max(2, int(round(w * source_height / h / 2)) * 2)
        edit = scores.resize_frames(edit, source_height, width)
    return edit


def _write_csv(path: str, header, rows) -> None:
    tmp = f"{path}.tmp{os.getpid()}"  # processes finalizing at once never share a temporary file
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.DictWriter(f, fieldnames=list(header), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
    os.replace(tmp, path)


def write_listing(benchmark: str, out_dir: str, cases: list[Case], done: set) -> str | None:
    """The benchmark's own listing of the finished edits (cases whose id is in `done`), in case-list
    order; returns its path, or None for benchmarks that read only the files (reco, manifest)."""
    path = os.path.join(out_dir, LISTING_NAME)
    finished = [c for c in cases if c.case_id in done]
    if benchmark == "openve":
        rows = [
            dict(
                edited_type=c.edit_type,
                prompt=c.instruction,
                original_video=c.row["original_video"],
                edited_result_path=os.path.abspath(os.path.join(out_dir, c.output)),
            )
            for c in finished
        ]
        _write_csv(path, OPENVE_LISTING, rows)
        return path
    if benchmark == "vie":
        header = list(dict.fromkeys(k for c in cases for k in c.row)) + ["edited_result_path"]
        rows = [
            dict(c.row, edited_result_path=os.path.abspath(os.path.join(out_dir, c.output))) for c in finished
        ]
        _write_csv(path, header, rows)
        return path
    return None


def read_source(case: Case, max_frames: int | None = None) -> np.ndarray:
    """(T, H, W, 3) uint8 source frames; MediaError for an unreadable file, OutsideMediaRoot for a
    source (or target) outside the case's media root."""
    if case.media_root:
        for path in filter(None, (case.source, case.target)):
            check_inside(path, case.media_root)
    return video_io.decode_media(case.source, os.path.splitext(case.source)[1], max_frames)
