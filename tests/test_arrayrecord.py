"""ArrayRecord shards: build, read back through Grain, resume, skip and count bad items."""

import json
import os
import pickle

import grain
import numpy as np
import pytest
from helpers import synthetic_samples

from sama_jax.data import (
    arrayrecord,
    build_shards,
    manifest,
    shard_builder,
    shard_format,
    synthetic,
    video_io,
)

T, H, W = 5, 32, 48


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    """A manifest of good synthetic samples of all three kinds plus one bad item of each reason."""
    root = tmp_path_factory.mktemp("data")
    samples = synthetic_samples(root, 3, 3, 2, 2, T, H, W)
    good = synthetic.render(synthetic.random_scene(np.random.default_rng(0), H, W), T, H, W)
    blob = open(root / samples[0]["source"], "rb").read()
    (root / "bad").mkdir()
    (root / "bad/empty.mp4").write_bytes(b"")
    (root / "bad/cut.mp4").write_bytes(blob[: len(blob) // 2])
    (root / "bad/broken.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 40)
    video_io.write_video(root / "bad/short.mp4", good[:2], fps=8)
    bad = [
        dict(
            id="bad_missing",
            kind="video_edit",
            source="bad/nowhere.mp4",
            target=samples[0]["target"],
            text="x",
        ),
        dict(id="bad_empty", kind="t2v", target="bad/empty.mp4", text="x"),
        dict(id="bad_cut", kind="video_edit", source=samples[0]["source"], target="bad/cut.mp4", text="x"),
        dict(id="bad_png", kind="image_edit", source="bad/broken.png", target=samples[3]["target"], text="x"),
        dict(id="bad_short", kind="t2v", target="bad/short.mp4", text="x"),
    ]
    # Interleave so bad items land in several shards.
    mixed = []
    for i, sample in enumerate(samples):
        mixed.append(sample)
        if i < len(bad):
            mixed.append(bad[i])
    path = str(root / "all.jsonl")
    manifest.write_manifest(path, mixed)
    return path, samples, bad


def _build(dataset, out, **kw):
    path, _, _ = dataset
    args = dict(samples_per_shard=4, min_frames=3)
    args.update(kw)
    return shard_builder.build_shards(path, str(out), **args)


def test_build_read_back_and_skip_counts(dataset, tmp_path):
    path, samples, bad = dataset
    index = _build(dataset, tmp_path / "shards")
    assert index["total_samples"] == 12 and len(index["shards"]) == 3
    assert index["total_records"] == 7 and sum(index["records"]) == 7
    assert index["skipped_total"] == 5
    assert index["skipped_counts"] == {"missing": 1, "empty": 1, "truncated": 1, "corrupt": 1, "too_short": 1}
    by_id = {item["id"]: item for item in index["skipped"]}
    assert by_id["bad_missing"]["path"].endswith("bad/nowhere.mp4")
    assert by_id["bad_cut"]["reason"] == "truncated" and "bad/cut.mp4" in by_id["bad_cut"]["message"]
    assert by_id["bad_png"]["path"].endswith("bad/broken.png")
    assert "2 frames" in by_id["bad_short"]["message"]

    source = arrayrecord.ShardSource(str(tmp_path / "shards"))
    assert len(source) == 7
    records = [source[i] for i in range(len(source))]
    assert [r["id"] for r in records] == [s["id"] for s in samples]  # manifest order, bad ones left out
    for record, sample in zip(records, samples):
        assert record["kind"] == sample["kind"] and record["text"] == sample["text"]
        with open(manifest.resolve(path, sample["target"]), "rb") as f:
            assert record["target"] == f.read()
        if sample["kind"] == "t2v":
            assert record["source"] == b"" and record["source_ext"] == ""
        else:
            with open(manifest.resolve(path, sample["source"]), "rb") as f:
                assert record["source"] == f.read()
        assert record["features"] == {} and record["meta"]["origin"] == "synthetic"
    video = records[0]
    assert (video["target_ext"], video["frames"], video["height"], video["width"], video["fps"]) == (
        ".mp4",
        T,
        H,
        W,
        8.0,
    )
    assert (video["source_frames"], video["source_height"], video["source_width"]) == (T, H, W)
    assert video["meta"]["edit"] == json.loads(open(path).readline())["edit"]
    assert video_io.decode_media(video["target"], video["target_ext"]).shape == (T, H, W, 3)
    image = records[3]
    assert image["kind"] == "image_edit" and image["target_ext"] == ".png" and image["frames"] == 1
    assert (image["source_frames"], image["source_height"], image["source_width"]) == (1, H, W)
    np.testing.assert_array_equal(
        video_io.decode_media(image["source"], image["source_ext"])[0],
        synthetic.make_image_edit(3, 0, H, W)[0],
    )

    # The documented schema, read with Grain's own source, and through a Grain dataset and a pickle
    # (what worker processes do).
    raw = grain.sources.ArrayRecordDataSource(arrayrecord.shard_paths(str(tmp_path / "shards")))
    assert shard_format.decode_record(raw[5])["id"] == samples[5]["id"]
    assert grain.MapDataset.source(source)[6]["id"] == samples[6]["id"]
    assert pickle.loads(pickle.dumps(source))[2]["target"] == records[2]["target"]


def test_resume_keeps_done_shards(dataset, tmp_path):
    out = tmp_path / "shards"
    first = _build(dataset, out)
    shard_files = [out / s for s in first["shards"]]
    stamps = [os.stat(p).st_mtime_ns for p in shard_files]
    # Simulate a build killed while writing shard 1: its report is missing and a partial file remains.
    os.remove(shard_builder.report_path(shard_files[1]))
    os.remove(shard_files[1])
    (out / (first["shards"][1] + ".tmp")).write_bytes(b"partial")
    os.remove(out / shard_builder.INDEX)
    with pytest.raises(FileNotFoundError, match="unfinished"):
        arrayrecord.ShardSource(str(out))

    second = _build(dataset, out)
    assert second["resumed_shards"] == 2
    assert [os.stat(p).st_mtime_ns for p in shard_files][::2] == stamps[::2]  # untouched
    for key in ("shards", "records", "total_records", "skipped_counts", "skipped_total"):
        assert second[key] == first[key]
    assert [r["id"] for r in arrayrecord.iter_records(str(out))] == [s["id"] for s in dataset[1]]
    assert not (out / (first["shards"][1] + ".tmp")).exists()

    # Different settings over done shards are refused, not mixed in.
    with pytest.raises(ValueError, match="min_frames"):
        _build(dataset, out, min_frames=1)
    third = _build(dataset, out, min_frames=1, overwrite=True)
    assert third["resumed_shards"] == 0 and third["skipped_counts"].get("too_short") is None
    assert third["total_records"] == 8


def test_decode_check_and_features(dataset, tmp_path):
    """Features stored by sama-precompute (at precompute.feature_path) travel inside the records."""
    from sama_jax import precompute

    path, samples, _ = dataset
    stored = {}
    for i, sample in enumerate(samples[:4]):  # only some samples have features
        stored[sample["id"]] = np.arange(6, dtype=np.float32).reshape(2, 3) + i
        target = precompute.feature_path(path, sample["id"], "text")
        os.makedirs(os.path.dirname(target), exist_ok=True)
        np.save(target, stored[sample["id"]])
    index = _build(dataset, tmp_path / "shards", check="decode", features=["text"], samples_per_shard=100)
    assert index["skipped_counts"] == {"missing": 1, "empty": 1, "truncated": 1, "corrupt": 1, "too_short": 1}
    for record in arrayrecord.iter_records(str(tmp_path / "shards")):
        if record["id"] in stored:
            assert list(record["features"]) == ["text"]
            np.testing.assert_array_equal(record["features"]["text"], stored[record["id"]])
            assert record["features"]["text"].dtype == np.float32
        else:
            assert record["features"] == {}
    for sample_id in stored:  # the dataset fixture is shared: leave no features behind
        os.remove(precompute.feature_path(path, sample_id, "text"))


def test_cli_and_bad_arguments(dataset, tmp_path, capsys):
    path, _, _ = dataset
    build_shards.main(
        ["--manifest", path, "--out", str(tmp_path / "s"), "--samples-per-shard", "5", "--min-frames", "3"]
    )
    out = capsys.readouterr().out
    assert "7 of 12 samples in 3 shards" in out and "skipped 5" in out and "bad_cut: truncated" in out
    # Shards built by two worker processes are the same as those built in order.
    parallel = shard_builder.build_shards(
        path, str(tmp_path / "p"), samples_per_shard=5, min_frames=3, workers=2
    )
    sequential = json.load(open(tmp_path / "s" / shard_builder.INDEX))
    for key in ("shards", "records", "skipped", "skipped_counts"):
        assert parallel[key] == sequential[key]
    for shard in parallel["shards"]:
        assert (tmp_path / "p" / shard).read_bytes() == (tmp_path / "s" / shard).read_bytes()
    # One sample a shard: the bad items' shards are empty and are left out of the source.
    index = shard_builder.build_shards(path, str(tmp_path / "one"), samples_per_shard=1, min_frames=3)
    assert index["records"].count(0) == 5
    assert len(arrayrecord.ShardSource(str(tmp_path / "one"))) == 7
    with pytest.raises(ValueError, match="check"):
        shard_builder.build_shards(path, str(tmp_path / "x"), check="maybe")


def test_records_feed_the_training_pipeline(dataset, tmp_path):
    """ShardSource records are what sama_jax.data.pipeline's sample transform consumes."""
    from sama_jax.data import pipeline

    _build(dataset, tmp_path / "shards")
    source = arrayrecord.ShardSource(str(tmp_path / "shards"))
    spec = pipeline.SampleSpec(num_frames=5, min_frames=5, buckets=((32, 48),), anchor_frames=1)
    kinds = []
    for index in range(len(source)):
        sample = pipeline.prepare_sample(source[index], index, spec)
        frames = 1 if sample["kind"] == "image_edit" else 5
        assert sample["target"].shape == sample["source"].shape == (frames, 32, 48, 3)
        kinds.append(sample["kind"])
    assert kinds == ["video_edit"] * 3 + ["image_edit"] * 2 + ["t2v"] * 2
    # The decoded target matches the synthetic ground truth up to H.264 loss.
    first = pipeline.prepare_sample(source[0], 0, spec)
    truth = synthetic.make_video_edit(3, 0, T, H, W)[1]
    assert np.abs(first["target"].astype(int) - truth).mean() < 4
