"""Grain pipeline: mixtures, pairing, pretext on raw clips, determinism, resume, sharding, bad items.

Media are real files written with video_io: flat frames whose grey level encodes the frame index
(H.264 keeps flat frames within a level or two), so frame sampling is checked through the codec.
"""

import json
import logging
import os

import numpy as np
import pytest
from helpers import assert_same, data_config, flat_video, level, take

from sama_jax.data import manifest as manifest_lib
from sama_jax.data import pipeline, pretext, video_io

N_FRAMES = 9


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline_data")
    rng = np.random.default_rng(0)
    sizes = [(32, 64), (48, 48)]
    edits, images, clips = [], [], []
    for i in range(6):
        h, w = sizes[i % 2]
        src = flat_video([level(t) for t in range(N_FRAMES)], h, w)
        video_io.write_video(root / f"v{i}.mp4", src, fps=16)
        video_io.write_video(root / f"v{i}_edit.mp4", 250 - src, fps=16)
        # fps 16 with data.fps 8 -> stride 2
        edits.append(
            dict(
                id=f"ve{i}",
                kind="video_edit",
                source=f"v{i}.mp4",
                target=f"v{i}_edit.mp4",
                text=f"edit {i}",
                fps=16.0,
            )
        )
        img = rng.integers(0, 256, (32, 64, 3) if i % 2 else (64, 64, 3), dtype=np.uint8)
        video_io.write_image(root / f"i{i}.png", img)
        video_io.write_image(root / f"i{i}_edit.png", 255 - img)
        images.append(
            dict(
                id=f"ie{i}",
                kind="image_edit",
                source=f"i{i}.png",
                target=f"i{i}_edit.png",
                text=f"image edit {i}",
            )
        )
        video_io.write_video(root / f"c{i}.mp4", flat_video([level(t) for t in range(N_FRAMES)], h, w), fps=8)
        clips.append(dict(id=f"t2v{i}", kind="t2v", target=f"c{i}.mp4", text=f"clip {i}"))
    manifest_lib.write_manifest(str(root / "video_edits.jsonl"), edits)
    manifest_lib.write_manifest(str(root / "image_edits.jsonl"), images)
    manifest_lib.write_manifest(str(root / "clips.jsonl"), clips)

    # Bad items next to good ones.
    good = (root / "c0.mp4").read_bytes()
    (root / "garbage.mp4").write_bytes(b"this is not an mp4 file" * 10)
    (root / "cut.mp4").write_bytes(good[: len(good) // 2])
    (root / "empty.mp4").write_bytes(b"")
    video_io.write_video(root / "short.mp4", flat_video([10, 20, 30], 32, 64), fps=8)
    bad = [
        dict(id="bad_missing", kind="t2v", target="nowhere.mp4", text="x"),
        dict(id="bad_garbage", kind="t2v", target="garbage.mp4", text="x"),
        dict(id="bad_cut", kind="t2v", target="cut.mp4", text="x"),
        dict(id="bad_empty", kind="t2v", target="empty.mp4", text="x"),
        dict(id="bad_short", kind="t2v", target="short.mp4", text="x"),
        dict(id="bad_missing_source", kind="video_edit", source="gone.mp4", target="c1.mp4", text="x"),
        dict(id="bad_image_clip", kind="t2v", target="i0.png", text="x"),
    ]
    manifest_lib.write_manifest(str(root / "mixed_bad.jsonl"), clips[:3] + bad + clips[3:])
    return root


def make(data_dir, mixture, data=None, batch_size=2, seed=0, **kwargs):
    sources = pipeline.open_sources(mixture, root=str(data_dir))
    kwargs.setdefault("process_index", 0)
    kwargs.setdefault("process_count", 1)
    return pipeline.build_pipeline(data or data_config(), sources, batch_size=batch_size, seed=seed, **kwargs)


STAGE1 = [
    dict(kind="video_edit", manifest="video_edits.jsonl", weight=0.5),
    dict(kind="image_edit", manifest="image_edits.jsonl", weight=0.5),
]
STAGE0 = [
    dict(kind="image_edit", manifest="image_edits.jsonl", weight=0.5),
    dict(kind="t2v", manifest="clips.jsonl", weight=0.5),
]


def test_stage1_epoch_pairs_buckets_and_frames(data_dir):
    it = iter(make(data_dir, STAGE1, num_epochs=1, drop_remainder=False))
    batches = list(it)
    ids = np.concatenate([b["id"] for b in batches]).tolist()
    assert sorted(ids) == sorted([f"ve{i}" for i in range(6)] + [f"ie{i}" for i in range(6)])
    assert it.skip_summary() == {"total": 0, "counts": {}, "padded": 0, "examples": []}
    assert all(b["valid"].all() for b in batches)
    shapes = set()
    for b in batches:
        n = len(b["id"])
        assert b["source"].dtype == np.uint8 and b["source"].shape == b["target"].shape
        assert b["anchors"].shape == (n, 1) + b["target"].shape[2:]
        np.testing.assert_array_equal(b["anchors"][:, 0], b["target"][:, 0])
        assert b["text"].shape == b["kind"].shape == b["task"].shape == (n,)
        assert (b["task"] == "edit").all()
        shapes.add(b["source"].shape[1:4])
        src, tgt = b["source"].astype(int), b["target"].astype(int)
        if b["kind"][0] == "video_edit":
            assert (b["kind"] == "video_edit").all() and b["source"].shape[1] == 5
            # stride 2 (16 fps clip at data.fps 8): frames 0, 2, 4, 6, 8
            means = src.mean(axis=(2, 3, 4))
            np.testing.assert_allclose(means, np.tile([level(t) for t in (0, 2, 4, 6, 8)], (n, 1)), atol=2.5)
            assert np.abs(src + tgt - 250).max() <= 4
        else:
            assert (b["kind"] == "image_edit").all() and b["source"].shape[1] == 1
            assert np.abs(src + tgt - 255).max() <= 2  # png is lossless; each resize rounds
    # 32x64 sources -> (48, 96) bucket, square ones -> (64, 64)
    assert {s[1:] for s in shapes} == {(48, 96), (64, 64)}


def test_stage0_motion_alignment_on_raw_clips_only(data_dir):
    data = data_config(
        motion_alignment=True, fps=0.0, pretext=dict(weights=dict(none=1, cube=1, speed=1, shuffle=1))
    )
    batches, _ = take(make(data_dir, STAGE0, data=data, batch_size=1), 40)
    tasks = set()
    for b in batches:
        kind, task, text = b["kind"][0], b["task"][0], b["text"][0]
        if kind == "image_edit":
            assert task == "edit" and text.startswith("image edit")
            continue
        tasks.add(task)
        assert text.endswith(f"clip {b['id'][0][3:]}")
        token = pretext.DEFAULT_TOKENS[task]
        assert text == (f"{token} " if token else "") + f"clip {b['id'][0][3:]}"
        target = b["target"][0].astype(int)
        source = b["source"][0].astype(int)
        expected = np.array([level(t) for t in range(5)])
        np.testing.assert_allclose(target.mean(axis=(1, 2, 3)), expected, atol=2.5)  # target clean
        if task == "none":
            assert (source == 0).all()
        elif task == "speed":
            np.testing.assert_allclose(
                source.mean(axis=(1, 2, 3)), expected[pretext.speed_indices(5, 2.0)], atol=2.5
            )
        elif task == "cube":
            zero = (source == 0).all(-1)
            assert zero.any() and not zero[0].any()
            np.testing.assert_array_equal(source[~zero], target[~zero])
    assert tasks == set(pretext.TASKS)


def test_sample_is_reproducible_from_seed_and_index(data_dir):
    spec = pipeline.SampleSpec.from_config(data_config(motion_alignment=True, fps=0.0), seed=5)
    record = pipeline.ManifestSource(str(data_dir / "clips.jsonl"))[0]
    a, b = pipeline.prepare_sample(record, 17, spec), pipeline.prepare_sample(record, 17, spec)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    results = {(pipeline.prepare_sample(record, i, spec)["task"]) for i in range(30)}
    assert len(results) > 1


def test_same_seed_same_batches_other_seed_other_order(data_dir):
    a, _ = take(make(data_dir, STAGE1, seed=3), 5)
    b, _ = take(make(data_dir, STAGE1, seed=3), 5)
    assert_same(a, b)
    c, _ = take(make(data_dir, STAGE1, seed=4), 5)
    assert [x["id"].tolist() for x in a] != [x["id"].tolist() for x in c]


def test_worker_processes_give_the_same_batches(data_dir):
    data = data_config(motion_alignment=True, fps=0.0)
    single, it = take(make(data_dir, STAGE0, data=data, worker_count=0), 6)
    state = it.get_state()
    multi, it2 = take(make(data_dir, STAGE0, data=data, worker_count=2), 6)
    assert_same(single, multi)
    assert it2.get_state() == state
    it2.close()


def test_resume_from_saved_state_equals_uninterrupted(data_dir):
    data = data_config(motion_alignment=True, fps=0.0)
    full, _ = take(make(data_dir, STAGE0, data=data, batch_size=3), 8)
    ds = make(data_dir, STAGE0, data=data, batch_size=3)
    head, it = take(ds, 3)
    assert_same(head, full[:3])
    state = json.loads(json.dumps(it.get_state()))  # what a checkpoint stores
    assert state["waiting"], "the test should resume with samples waiting in a partial bucket"
    rest, _ = take(make(data_dir, STAGE0, data=data, batch_size=3), 5, state=state)
    assert_same(rest, full[3:])
    # set_state on an iterator that has moved on rewinds it
    more = [next(it) for _ in range(2)]
    it.set_state(state)
    assert_same([next(it) for _ in range(5)], full[3:])
    assert_same(more, full[3:5])


def test_bad_items_are_skipped_counted_and_logged(data_dir, caplog):
    mixture = [dict(kind="t2v", manifest="mixed_bad.jsonl", weight=1.0)]
    ds = make(data_dir, mixture, batch_size=2, num_epochs=1, drop_remainder=False)
    with caplog.at_level(logging.WARNING, logger="sama_jax.data.pipeline"):
        it = iter(ds)
        batches = list(it)
    ids = sorted(np.concatenate([b["id"] for b in batches]).tolist())
    assert ids == [f"t2v{i}" for i in range(6)]  # every good item once, nothing else
    summary = it.skip_summary()
    # The metadata pass finds cut.mp4 short of the packets its header declares: truncated.
    assert summary["counts"] == {"missing": 2, "corrupt": 1, "truncated": 1, "empty": 1, "too_short": 2}
    assert summary["total"] == 7
    by_id = {e["id"]: e for e in summary["examples"]}
    assert by_id["bad_missing"]["path"].endswith("nowhere.mp4")
    assert by_id["bad_missing_source"]["path"].endswith("gone.mp4")
    assert by_id["bad_cut"]["path"].endswith("cut.mp4")
    assert "too short: 3 frames" in by_id["bad_short"]["message"]
    assert "too short: 1 frames" in by_id["bad_image_clip"]["message"]
    for sample_id in by_id:
        assert any(sample_id in r.getMessage() for r in caplog.records)
    assert it.get_state()["skip_counts"] == summary["counts"]


def test_only_bad_items_stop_with_a_clear_error(data_dir):
    sources = [(dict(weight=1.0), [pipeline.ManifestSource(str(data_dir / "mixed_bad.jsonl"))[3]])]
    ds = pipeline.build_pipeline(
        data_config(), sources, batch_size=1, seed=0, process_index=0, process_count=1
    )
    ds.max_consecutive_skips = 20
    with pytest.raises(RuntimeError, match="20 samples in a row were unusable.*bad_missing"):
        next(iter(ds))


def test_mixture_weights_set_the_proportions(data_dir):
    mixture = [dict(STAGE1[0], weight=3.0), dict(STAGE1[1], weight=1.0)]
    batches, _ = take(make(data_dir, mixture, batch_size=1), 40)
    kinds = [b["kind"][0] for b in batches]
    assert kinds.count("video_edit") == 30 and kinds.count("image_edit") == 10


def test_shard_source_feeds_the_same_batches(data_dir, tmp_path):
    from sama_jax.data import arrayrecord, shard_builder

    shard_builder.build_shards(str(data_dir / "video_edits.jsonl"), str(tmp_path / "ve"), samples_per_shard=4)
    shard_builder.build_shards(str(data_dir / "image_edits.jsonl"), str(tmp_path / "ie"), samples_per_shard=4)
    from_shards = pipeline.open_sources(
        [dict(STAGE1[0], shards="ve"), dict(STAGE1[1], shards="ie")], root=str(tmp_path)
    )
    assert all(isinstance(source, arrayrecord.ShardSource) for _, source in from_shards)
    ds = pipeline.build_pipeline(
        data_config(), from_shards, batch_size=2, seed=0, process_index=0, process_count=1
    )
    a, _ = take(ds, 4)
    b, _ = take(make(data_dir, STAGE1), 4)
    assert_same(a, b)
    with pytest.raises(ValueError, match="neither shards nor a manifest"):
        pipeline.open_sources([dict(kind="t2v", weight=1.0)])


def test_precomputed_features_are_carried_padded_or_the_sample_skipped(data_dir):
    records = []
    for i, record in enumerate(pipeline.ManifestSource(str(data_dir / "image_edits.jsonl"))):
        if i >= 4:
            break
        record = dict(record)
        if i != 2:  # sample 2 lacks its features
            record["features"] = {
                "text": np.full((3 + i, 8), i, np.float32),
                "semantic": np.full((5, 4), 10 + i, np.float32),
            }
        records.append(record)
    data = data_config(features=("text", "semantic"))
    ds = pipeline.build_pipeline(
        data,
        [(dict(weight=1.0), records)],
        batch_size=1,
        seed=0,
        num_epochs=1,
        process_index=0,
        process_count=1,
        text_len=6,
    )
    it = iter(ds)
    batches = list(it)
    assert sorted(b["id"][0] for b in batches) == ["ie0", "ie1", "ie3"]
    for b in batches:
        i = int(b["id"][0][2:])
        text = b["features/text"][0]
        assert text.shape == (6, 8) and (text[: 3 + i] == i).all() and (text[3 + i :] == 0).all()
        np.testing.assert_array_equal(b["features/semantic"][0], np.full((5, 4), 10 + i, np.float32))
    assert it.skip_summary()["counts"] == {"missing_features": 1}
    with pytest.raises(ValueError, match="motion alignment"):
        pipeline.SampleSpec.from_config(data_config(motion_alignment=True, features=("text",)), seed=0)


def test_iterator_checkpoints_through_grains_orbax_handler(data_dir, tmp_path):
    import grain
    from etils import epath

    full, _ = take(make(data_dir, STAGE1, batch_size=3), 5)
    _, it = take(make(data_dir, STAGE1, batch_size=3), 2)
    handler = grain.checkpoint.CheckpointHandler()
    handler.save(epath.Path(tmp_path), item=it)
    fresh = iter(make(data_dir, STAGE1, batch_size=3))
    restored = handler.restore(epath.Path(tmp_path), item=fresh)
    assert_same([next(restored) for _ in range(3)], full[2:])


def test_resume_when_a_waiting_sample_became_unreadable(data_dir, tmp_path):
    import shutil

    for name in os.listdir(data_dir):
        if name.endswith((".mp4", ".png", ".jsonl")):
            shutil.copy(data_dir / name, tmp_path / name)
    data = data_config(motion_alignment=True, fps=0.0)
    ds = make(tmp_path, STAGE0, data=data, batch_size=3)
    _, it = take(ds, 3)
    state = it.get_state()
    assert state["waiting"]
    waiting_ids = {ds.records[p]["id"] for p in state["waiting"]}
    gone = sorted(waiting_ids)[0]
    record = {
        r["id"]: r
        for m in ("clips.jsonl", "image_edits.jsonl")
        for r in pipeline.ManifestSource(str(tmp_path / m))
    }[gone]
    os.remove(record["target"])
    resumed = iter(make(tmp_path, STAGE0, data=data, batch_size=3))
    resumed.set_state(state)
    assert resumed.skip_summary()["counts"] == {"missing": 1}
    later = [next(resumed) for _ in range(2)]
    assert all(b["source"].shape[0] == 3 for b in later)
