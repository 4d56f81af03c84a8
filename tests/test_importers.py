"""Importers: each public layout, made small in the test, becomes a valid manifest; bad rows name file:line."""

import csv
import json
import os

import numpy as np
import pytest

from sama_jax.data import arrayrecord, importers, manifest, shard_builder, video_io
from sama_jax.data.importers import ImportFormatError


def _touch(root, *paths):
    for path in paths:
        full = os.path.join(root, path)
        os.makedirs(os.path.dirname(full), exist_ok=True)
        open(full, "wb").close()


def _write_csv(path, header, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)


def _resolved(manifest_path, sample, key):
    return os.path.normpath(manifest.resolve(manifest_path, sample[key]))


def test_ditto(tmp_path):
    root = tmp_path / "Ditto-1M"
    # One pair lives directly under the root, the other under videos/ (both layouts occur).
    _touch(root, "source/a.mp4", "local/a_edit.mp4", "videos/source/b.mp4", "videos/global_style/b.mp4")
    items = [
        dict(
            source_path="source/a.mp4",
            edited_path="local/a_edit.mp4",
            instruction="Make the car red.",
            source_caption="A car drives.",
        ),
        dict(source_path="source/b.mp4", edited_path="global_style/b.mp4", instruction="Van Gogh style."),
    ]
    meta = root / "metadata.json"
    meta.write_text(json.dumps(items))
    out = str(tmp_path / "out" / "ditto.jsonl")
    summary = importers.import_manifest("ditto", [str(meta)], out)
    assert summary["samples"] == 2 and summary["kinds"] == {"video_edit": 2}
    samples = manifest.read_manifest(out)
    assert samples[0]["id"] == "ditto-metadata-0000000" and samples[0]["text"] == "Make the car red."
    assert samples[0]["source_caption"] == "A car drives." and "source_caption" not in samples[1]
    assert _resolved(out, samples[0], "source") == str(root / "source/a.mp4")
    assert _resolved(out, samples[1], "source") == str(root / "videos/source/b.mp4")
    assert _resolved(out, samples[1], "target") == str(root / "videos/global_style/b.mp4")
    assert not os.path.isabs(samples[0]["source"])  # relative: the manifest moves with the data

    # The same metadata as JSONL, one row missing its instruction: error names file and line.
    jsonl = root / "metadata.jsonl"
    jsonl.write_text(json.dumps(items[0]) + "\n\n" + json.dumps(dict(items[1], instruction="")) + "\n")
    with pytest.raises(ImportFormatError, match=r"metadata.jsonl:3: 'instruction' is empty"):
        importers.import_manifest("ditto", [str(jsonl)], out)
    samples, bad = importers.import_samples("ditto", [str(jsonl)], out, skip_bad_rows=True)
    assert len(samples) == 1 and len(bad) == 1 and "metadata.jsonl:3" in bad[0]


def test_reco(tmp_path):
    root = tmp_path / "ReCo"
    configs = root / "configs"
    configs.mkdir(parents=True)
    rows = [
        dict(
            src_video="add/src_videos/1.mp4",
            tar_video="add/tar_videos/1.mp4",
            instruction_final_refine="Add a dog on the grass.",
        ),
        dict(
            src_video="add/src_videos/2.mp4",
            tar_video="add/tar_videos/2.mp4",
            instruction_final_refine="Add a hat.",
        ),
    ]
    (configs / "add_data_configs.json").write_text(json.dumps(rows))
    (configs / "remove_data_configs.json").write_text(
        json.dumps([dict(src_video="remove/src/9.mp4", tar_video="remove/tar/9.mp4")])
    )
    out = str(tmp_path / "reco.jsonl")
    samples, _ = importers.import_samples(
        "reco", [str(configs / "add_data_configs.json")], out, root=str(root)
    )
    assert [s["task"] for s in samples] == ["add", "add"]
    assert [s["id"] for s in samples] == ["reco-add_data_configs-0000000", "reco-add_data_configs-0000001"]
    assert _resolved(out, samples[1], "target") == str(root / "add/tar_videos/2.mp4")
    assert samples[1]["text"] == "Add a hat." and samples[1]["kind"] == "video_edit"
    with pytest.raises(
        ImportFormatError, match=r"remove_data_configs.json: item 1: none of \['instruction_final_refine'\]"
    ):
        importers.import_samples("reco", [str(configs / "remove_data_configs.json")], out, root=str(root))


def test_openve(tmp_path):
    root = tmp_path / "OpenVE-3M"
    root.mkdir()
    _write_csv(
        root / "background_change.csv",
        ["original_video", "edited_video", "prompt"],
        [
            ["src/1.mp4", "edit/1.mp4", "Replace the background with a beach,\nkeeping the person."],
            ["src/2.mp4", "edit/2.mp4", "Replace the sky with fireworks."],
        ],
    )
    _write_csv(
        root / "bench.csv",
        ["edited_type", "prompt", "original_video", "edited_result_path"],
        [["local_remove", "Remove the cup.", "o/3.mp4", "e/3.mp4"]],
    )
    _write_csv(root / "odd.csv", ["a", "b", "prompt"], [["x", "y", "z"]])
    out = str(tmp_path / "openve.jsonl")
    samples, _ = importers.import_samples(
        "openve", [str(root / "background_change.csv"), str(root / "bench.csv")], out
    )
    assert len(samples) == 3
    assert samples[0]["text"] == "Replace the background with a beach,\nkeeping the person."
    assert [s["edit_type"] for s in samples] == ["background_change", "background_change", "local_remove"]
    assert all(s["start_frame"] == 4 for s in samples)
    assert _resolved(out, samples[2], "target") == str(root / "e/3.mp4")
    # Row 2 starts on line 4: the first row's quoted prompt spans lines 2-3.
    _write_csv(
        root / "bad.csv",
        ["original_video", "edited_video", "prompt"],
        [["s/1.mp4", "e/1.mp4", "two\nlines"], ["s/2.mp4", "", "no target"]],
    )
    with pytest.raises(ImportFormatError, match=r"bad.csv:4: 'edited_video' is empty"):
        importers.import_samples("openve", [str(root / "bad.csv")], out)
    with pytest.raises(
        ImportFormatError, match=r"odd.csv:2: none of .*original_video.* \(has \['a', 'b', 'prompt'\]\)"
    ):
        importers.import_samples("openve", [str(root / "odd.csv")], out)


def test_diffsynth_to_shards(tmp_path, rng):
    """DiffSynth metadata with a video edit, a t2v clip and an image edit, through to ArrayRecord."""
    data = tmp_path / "data"
    frames = rng.integers(0, 256, (5, 16, 24, 3), dtype=np.uint8)
    for name in ("src.mp4", "tgt.mp4", "clip.mp4"):
        video_io.write_video(data / name, frames, fps=8)
    for name in ("a.png", "a_edit.png"):
        video_io.write_image(data / name, frames[0])
    _write_csv(
        data / "metadata.csv",
        ["video", "source_video", "prompt"],
        [
            ["tgt.mp4", "src.mp4", "Make it blue."],
            ["clip.mp4", "", "A clip."],
            ["a_edit.png", "a.png", "Recolour."],
        ],
    )
    out = str(tmp_path / "manifests" / "mine.jsonl")
    importers.main(["--format", "diffsynth", "--input", str(data / "metadata.csv"), "--out", out])
    samples = manifest.read_manifest(out)
    assert [s["kind"] for s in samples] == ["video_edit", "t2v", "image_edit"]
    assert "source" not in samples[1]
    # JSON-list and JSONL forms of the same metadata give the same samples (ids follow the file stem).
    rows = [
        dict(video="tgt.mp4", source_video="src.mp4", prompt="Make it blue."),
        dict(video="clip.mp4", prompt="A clip."),
        dict(video="a_edit.png", source_video="a.png", prompt="Recolour."),
    ]
    (data / "metadata.json").write_text(json.dumps(rows))
    (data / "metadata.jsonl").write_text("\n".join(json.dumps(r) for r in rows))
    for name in ("metadata.json", "metadata.jsonl"):
        again, _ = importers.import_samples("diffsynth", [str(data / name)], out)
        assert [{k: v for k, v in s.items() if k != "id"} for s in again] == [
            {k: v for k, v in s.items() if k != "id"} for s in samples
        ]

    index = shard_builder.build_shards(out, str(tmp_path / "shards"))
    assert index["total_records"] == 3 and index["skipped_total"] == 0
    records = list(arrayrecord.iter_records(str(tmp_path / "shards")))
    assert records[0]["source"] == (data / "src.mp4").read_bytes()
    assert records[2]["target_ext"] == ".png"


def test_bad_files(tmp_path):
    out = str(tmp_path / "m.jsonl")
    with pytest.raises(ImportFormatError, match="nowhere.csv: file does not exist"):
        importers.import_samples("diffsynth", [str(tmp_path / "nowhere.csv")], out)
    (tmp_path / "meta.txt").write_text("video,prompt\n")
    with pytest.raises(ImportFormatError, match="meta.txt: unsupported metadata file type"):
        importers.import_samples("diffsynth", [str(tmp_path / "meta.txt")], out)
    (tmp_path / "broken.json").write_text('[{"video": "a.mp4",\n "prompt": }]')
    with pytest.raises(ImportFormatError, match="broken.json:2: not JSON"):
        importers.import_samples("diffsynth", [str(tmp_path / "broken.json")], out)
    (tmp_path / "obj.json").write_text('{"video": "a.mp4"}')
    with pytest.raises(ImportFormatError, match="obj.json: expected a JSON list"):
        importers.import_samples("diffsynth", [str(tmp_path / "obj.json")], out)
    (tmp_path / "empty.csv").write_text("video,prompt\n")
    with pytest.raises(ImportFormatError, match="no samples"):
        importers.import_manifest("diffsynth", [str(tmp_path / "empty.csv")], out)
    with pytest.raises(ValueError, match="unknown format"):
        importers.import_samples("youtube", [], out)
