"""The manifest: one JSON object a line, one training sample each, paths relative to the manifest.

    {"id": "clip_000017", "kind": "video_edit", "source": "videos/a.mp4", "target": "videos/a_edit.mp4",
     "text": "Replace the red ball with a blue cube."}
    {"id": "img_000003", "kind": "image_edit", "source": "images/b.png", "target": "images/b_edit.png",
     "text": "Make the square green."}
    {"id": "t2v_000042", "kind": "t2v", "target": "clips/c.mp4", "text": "A yellow circle moves left."}

kind: video_edit | image_edit | t2v. `source` is required for the edit kinds and absent for t2v (the
motion-alignment transforms make a source from the clip). Any other keys are kept (e.g. fps, origin).
Optional keys written by our tools:
    origin                  where the sample came from: synthetic | ditto | reco | openve | diffsynth
    fps, frames, height, width   the media's, when the writer knows them (sama-make-synthetic)
    edit                    synthetic edits: {"type": recolour|replace|remove|add|restyle, "object": i}
    task, edit_type         the source dataset's edit category (ReCo task, OpenVE category)
    start_frame             leading frames to drop from source and target (OpenVE-3M: 4, as SAMA's loader)
    source_caption          Ditto-1M's caption of the source video
read_manifest checks every line before anything uses it: JSON, kind, required keys, unique ids, and
the types of the keys above (FIELD_TYPES), naming the line: "m.jsonl:7: field 'source' must be a
string path, got int".
Manifests are made by sama-make-synthetic (sama_jax.data.synthetic) and sama-import-manifest
(sama_jax.data.importers), and turned into ArrayRecord shards by sama-build-shards.
"""

from __future__ import annotations

import json
import os
from typing import Iterable

KINDS = ("video_edit", "image_edit", "t2v")
REQUIRED = {
    "video_edit": ("source", "target", "text"),
    "image_edit": ("source", "target", "text"),
    "t2v": ("target", "text"),
}


class ManifestError(ValueError):
    """A manifest line that is not a valid sample; the message names the file and line."""


# The type each known key must have: (accepted types, how the message names it). A wrong type would
# otherwise surface as a bare TypeError deep inside a build, with no file or line. Values are the
# users' business (a negative start_frame is the pipeline's and the builder's "bad_record").
_STRING = ((str,), "a string")
_PATH = ((str,), "a string path")
_INT = ((int,), "an integer")
FIELD_TYPES = {
    "id": ((str, int), "a string or an integer"),
    "kind": _STRING,
    "text": _STRING,
    "source": _PATH,
    "target": _PATH,
    "origin": _STRING,
    "task": _STRING,
    "edit_type": _STRING,
    "source_caption": _STRING,
    "edit": ((dict,), "a JSON object"),
    "fps": ((int, float), "a number"),
    "frames": _INT,
    "height": _INT,
    "width": _INT,
    "start_frame": _INT,
}


def _check_type(sample: dict, key: str, where: str) -> None:
    types, described = FIELD_TYPES[key]
    value = sample[key]
    # bool is an int subclass, but `"frames": true` is a mistake, not a count.
    if not isinstance(value, types) or isinstance(value, bool):
        got = "null" if value is None else type(value).__name__
        raise ManifestError(f"{where}: field {key!r} must be {described}, got {got}")


def validate(sample: dict, where: str) -> dict:
    if not isinstance(sample, dict):
        raise ManifestError(f"{where}: expected a JSON object, got {type(sample).__name__}")
    kind = sample.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise ManifestError(f"{where}: kind {kind!r} is not one of {KINDS}")
    missing = [k for k in ("id",) + REQUIRED[kind] if k not in sample or sample[k] in ("", None)]
    if missing:
        raise ManifestError(f"{where}: {kind} sample lacks {missing}")
    for key in FIELD_TYPES:
        if key in sample:
            _check_type(sample, key, where)
    return sample


def read_manifest(path: str) -> list[dict]:
    """All samples of a JSONL manifest, validated; ids must be unique."""
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: manifest file does not exist")
    samples, seen = [], {}
    with open(path) as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{number}"
            try:
                sample = json.loads(line)
            except json.JSONDecodeError as e:
                raise ManifestError(f"{where}: not JSON ({e.msg})") from e
            validate(sample, where)
            if sample["id"] in seen:
                raise ManifestError(f"{where}: id {sample['id']!r} already used on line {seen[sample['id']]}")
            seen[sample["id"]] = number
            samples.append(sample)
    return samples


def write_manifest(path: str, samples: Iterable[dict]) -> int:
    """Writes samples (validated) atomically; returns how many."""
    tmp = path + ".tmp"
    count = 0
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(tmp, "w") as f:
        for count, sample in enumerate(samples, 1):
            validate(sample, f"{path}: sample {count}")
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")
    os.replace(tmp, path)
    return count


def resolve(manifest_path: str, relative: str) -> str:
    """A sample's path, relative to the manifest's directory (absolute paths are kept)."""
    return os.path.join(os.path.dirname(os.path.abspath(manifest_path)), relative)
