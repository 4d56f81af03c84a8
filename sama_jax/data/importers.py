"""Importers: public video-editing dataset layouts -> our manifest (sama_jax.data.manifest).

    sama-import-manifest --format ditto --input Ditto-1M/metadata.json --root Ditto-1M --out ditto.jsonl
    sama-import-manifest --format reco --input ReCo/*_data_configs.json --root ReCo --out reco.jsonl
    sama-import-manifest --format openve --input OpenVE-3M/csv/*.csv --root OpenVE-3M --out openve.jsonl
    sama-import-manifest --format diffsynth --input metadata.csv --root data --out mine.jsonl

What each format expects (media paths in the metadata are relative to --root, which defaults to the
metadata file's directory; absolute paths are kept):

  ditto      Ditto-1M metadata: a JSON list (or JSONL) of objects with `source_path`, `edited_path`,
             `instruction` (optional `source_caption`, kept). Ditto's tree keeps videos either at
             <root>/<path> or <root>/videos/<path>; the first that exists is used.
  reco       ReCo-Data task configs `<task>_data_configs.json`: a JSON list of objects with
             `src_video`, `tar_video`, `instruction_final_refine`; the task (add, remove, replace,
             style) is taken from the file name and kept as `task`.
  openve     OpenVE-3M CSVs, one per edit category. Columns: source one of original_video,
             source_video, src_video, input_video; target one of edited_video, edited_result_path,
             target_video, tgt_video, video; instruction one of prompt, instruction, edit_prompt;
             optional edited_type/edit_type (else the CSV's name) kept as `edit_type`. The names
             follow OpenVE-Bench's CSV; the 3M release's column names could not be confirmed from
             public material, so the importer accepts these aliases and names the columns it found
             when none fit. SAMA's released loader drops the first 4 frames of both OpenVE-3M videos;
             rows carry `start_frame: 4` to record that.
  diffsynth  DiffSynth-Studio metadata (what SAMA's released trainer reads): CSV, JSON list or JSONL
             with `video` (target), optional `source_video` (absent or empty: a text-to-video clip)
             and `prompt`. Ditto-1M's DiffSynth CSVs use this layout too.

A target with an image extension makes an image_edit sample. Ids are "<format>-<file stem>-<row>", so
re-importing the same files gives the same ids. A bad row (a required field missing or empty) raises
ImportFormatError naming the file and line (JSON lists: the item number); with --skip-bad-rows it is
logged, counted and left out instead. Media are not opened here: sama-build-shards checks them.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import os
import sys
from typing import Callable, Iterable, Iterator, Sequence

from sama_jax import cli
from sama_jax.data import manifest as manifest_lib
from sama_jax.data import video_io

log = logging.getLogger(__name__)


class ImportFormatError(ValueError):
    """A metadata row or file that does not fit the expected layout; names the file and line."""


# ---------------------------------------------------------------------------------------------------
# Reading rows: (where, row) pairs, `where` = "file:line" (or "file: item n" for JSON lists)


def _read_rows(path: str) -> Iterator[tuple[str, dict]]:
    if not os.path.isfile(path):
        raise ImportFormatError(f"{path}: file does not exist")
    ext = os.path.splitext(path)[1].lower()
    if ext == ".csv":
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames:
                raise ImportFormatError(f"{path}: empty CSV (no header row)")
            row_start = 2
            for row in reader:
                yield f"{path}:{row_start}", row
                row_start = reader.line_num + 1  # a quoted field may span lines
    elif ext == ".jsonl":
        with open(path, encoding="utf-8") as f:
            for number, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield f"{path}:{number}", json.loads(line)
                except json.JSONDecodeError as e:
                    raise ImportFormatError(f"{path}:{number}: not JSON ({e.msg})") from e
    elif ext == ".json":
        with open(path, encoding="utf-8") as f:
            try:
                items = json.load(f)
            except json.JSONDecodeError as e:
                raise ImportFormatError(f"{path}:{e.lineno}: not JSON ({e.msg})") from e
        if not isinstance(items, list):
            raise ImportFormatError(f"{path}: expected a JSON list of objects, got {type(items).__name__}")
        for number, item in enumerate(items, 1):
            yield f"{path}: item {number}", item
    else:
        raise ImportFormatError(f"{path}: unsupported metadata file type {ext!r} (.csv, .json, .jsonl)")


def _field(row, where: str, names: Sequence[str], required: bool = True) -> str:
    if not isinstance(row, dict):
        raise ImportFormatError(f"{where}: expected an object, got {type(row).__name__}")
    for name in names:
        value = row.get(name)
        if value is not None and str(value).strip():
            return str(value).strip()
    if required:
        present = [k for k in names if k in row]
        detail = (
            f"{present[0]!r} is empty" if present else f"none of {list(names)} present (has {sorted(row)})"
        )
        raise ImportFormatError(f"{where}: {detail}")
    return ""


# ---------------------------------------------------------------------------------------------------
# Building samples


class _Builder:
    """Turns (source, target, text) rows into manifest samples with paths relative to the manifest."""

    def __init__(self, fmt: str, root: str | None, manifest_path: str, absolute: bool):
        self.fmt, self.root, self.absolute = fmt, root, absolute
        self.manifest_dir = os.path.dirname(os.path.abspath(manifest_path))

    def media(
        self, path: str, metadata_path: str, candidates: Callable[[str], list[str]] | None = None
    ) -> str:
        root = self.root or os.path.dirname(os.path.abspath(metadata_path))
        if os.path.isabs(path):
            full = path
        else:
            options = [os.path.join(root, path)] + (candidates(root) if candidates else [])
            full = next((p for p in options if os.path.exists(p)), options[0])
        full = os.path.normpath(os.path.abspath(full))
        return full if self.absolute else os.path.relpath(full, self.manifest_dir)

    def sample(
        self, metadata_path: str, row_index: int, source: str, target: str, text: str, **extra
    ) -> dict:
        stem = os.path.splitext(os.path.basename(metadata_path))[0]
        if source:
            kind = (
                "image_edit" if video_io.is_image_ext(os.path.splitext(target)[1] or ".mp4") else "video_edit"
            )
        else:
            kind = "t2v"
        sample = dict(id=f"{self.fmt}-{stem}-{row_index:07d}", kind=kind, target=target, text=text)
        if source:
            sample["source"] = source
        sample.update(origin=self.fmt, **{k: v for k, v in extra.items() if v not in (None, "")})
        return sample


def _ditto(builder: _Builder, path: str, where: str, row: dict, index: int) -> dict:
    def in_videos(name):
        return lambda root: [os.path.join(root, "videos", name)]

    src_rel = _field(row, where, ("source_path",))
    tgt_rel = _field(row, where, ("edited_path",))
    return builder.sample(
        path,
        index,
        builder.media(src_rel, path, in_videos(src_rel)),
        builder.media(tgt_rel, path, in_videos(tgt_rel)),
        _field(row, where, ("instruction",)),
        source_caption=_field(row, where, ("source_caption",), required=False),
    )


def _reco(builder: _Builder, path: str, where: str, row: dict, index: int) -> dict:
    stem = os.path.splitext(os.path.basename(path))[0]
    task = stem[: -len("_data_configs")] if stem.endswith("_data_configs") else stem
    return builder.sample(
        path,
        index,
        builder.media(_field(row, where, ("src_video",)), path),
        builder.media(_field(row, where, ("tar_video",)), path),
        _field(row, where, ("instruction_final_refine",)),
        task=task,
    )


OPENVE_SOURCE = ("original_video", "source_video", "src_video", "input_video")
OPENVE_TARGET = ("edited_video", "edited_result_path", "target_video", "tgt_video", "video")
OPENVE_TEXT = ("prompt", "instruction", "edit_prompt")
OPENVE_START_FRAME = 4  # SAMA's released loader drops these leading frames of OpenVE-3M clips


def _openve(builder: _Builder, path: str, where: str, row: dict, index: int) -> dict:
    edit_type = _field(row, where, ("edited_type", "edit_type"), required=False)
    return builder.sample(
        path,
        index,
        builder.media(_field(row, where, OPENVE_SOURCE), path),
        builder.media(_field(row, where, OPENVE_TARGET), path),
        _field(row, where, OPENVE_TEXT),
        edit_type=edit_type or os.path.splitext(os.path.basename(path))[0],
        start_frame=OPENVE_START_FRAME,
    )


def _diffsynth(builder: _Builder, path: str, where: str, row: dict, index: int) -> dict:
    source = _field(row, where, ("source_video",), required=False)
    return builder.sample(
        path,
        index,
        builder.media(source, path) if source else "",
        builder.media(_field(row, where, ("video",)), path),
        _field(row, where, ("prompt",)),
    )


FORMATS = {"ditto": _ditto, "reco": _reco, "openve": _openve, "diffsynth": _diffsynth}


def import_samples(
    fmt: str,
    inputs: Iterable[str],
    manifest_path: str,
    root: str | None = None,
    absolute: bool = False,
    skip_bad_rows: bool = False,
) -> tuple[list[dict], list[str]]:
    """(samples, bad-row messages) for metadata files of one format; paths relative to manifest_path."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown format {fmt!r}; expected one of {sorted(FORMATS)}")
    convert, builder = FORMATS[fmt], _Builder(fmt, root, manifest_path, absolute)
    samples, bad = [], []
    for path in inputs:
        for index, (where, row) in enumerate(_read_rows(path)):
            try:
                sample = convert(builder, path, where, row, index)
                manifest_lib.validate(sample, where)
            except (ImportFormatError, manifest_lib.ManifestError) as e:
                if not skip_bad_rows:
                    raise ImportFormatError(str(e)) from e
                log.warning("skipping bad row: %s", e)
                bad.append(str(e))
                continue
            samples.append(sample)
    return samples, bad


def import_manifest(
    fmt: str,
    inputs: Iterable[str],
    manifest_path: str,
    root: str | None = None,
    absolute: bool = False,
    skip_bad_rows: bool = False,
) -> dict:
    """Imports and writes the manifest; returns a summary {samples, kinds, bad_rows, manifest}."""
    inputs = list(inputs)
    samples, bad = import_samples(fmt, inputs, manifest_path, root, absolute, skip_bad_rows)
    if not samples:
        raise ImportFormatError(f"no samples imported from {inputs}")
    manifest_lib.write_manifest(manifest_path, samples)
    kinds = {}
    for sample in samples:
        kinds[sample["kind"]] = kinds.get(sample["kind"], 0) + 1
    return dict(manifest=manifest_path, samples=len(samples), kinds=kinds, bad_rows=len(bad), bad=bad)


def main(argv=None) -> int:
    return cli.run("sama-import-manifest", lambda: _main(argv))


def _main(argv) -> int:
    parser = argparse.ArgumentParser(
        prog="sama-import-manifest", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--format", required=True, choices=sorted(FORMATS))
    parser.add_argument("--input", required=True, nargs="+", help="metadata files (csv/json/jsonl)")
    parser.add_argument("--out", required=True, help="manifest (.jsonl) to write")
    parser.add_argument(
        "--root",
        default=None,
        help="directory media paths are relative to (default: each metadata file's directory)",
    )
    parser.add_argument("--absolute", action="store_true", help="write absolute media paths")
    parser.add_argument("--skip-bad-rows", action="store_true", help="log and skip malformed rows")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    summary = import_manifest(args.format, args.input, args.out, args.root, args.absolute, args.skip_bad_rows)
    print(
        f"{summary['samples']} samples {summary['kinds']} -> {summary['manifest']}"
        + (f"; skipped {summary['bad_rows']} bad rows" if summary["bad_rows"] else "")
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
