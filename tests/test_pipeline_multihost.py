"""Multi-host data: one global bucket plan, each process decoding its slice; metadata; start_frame.

Processes are simulated in this test process with build_pipeline's process_index/process_count.
Media are flat frames whose grey level encodes the frame index (see helpers.py).
"""

import json

import helpers
import ml_collections
import numpy as np
import pytest
from helpers import assert_same, flat_video, level, take

from sama_jax.data import manifest as manifest_lib
from sama_jax.data import pipeline, transforms, video_io

SIZES = [(32, 64), (48, 48), (64, 32)]  # -> buckets (48, 96), (64, 64), (96, 48)
ARRAYS = ("source", "target", "anchors", "valid")


@pytest.fixture(scope="module")
def multi_dir(tmp_path_factory):
    """Video edits, image edits and raw clips in three aspect ratios, videos full (9) or short (6 frames).

    24 samples of each kind reuse 6 media files each, so one epoch (ids unique) fills whole global
    batches: 8 samples of each of the 9 (T, H, W).
    """
    root = tmp_path_factory.mktemp("multihost_data")
    rng = np.random.default_rng(1)
    for i in range(6):
        h, w = SIZES[i % 3]
        frames = 9 if i < 3 else 6  # 6 frames give 5 (4k+1) at num_frames 9
        src = flat_video([level(t) for t in range(frames)], h, w)
        video_io.write_video(root / f"v{i}.mp4", src, fps=16)
        video_io.write_video(root / f"v{i}_edit.mp4", 250 - src, fps=16)
        video_io.write_video(root / f"c{i}.mp4", src, fps=16)
        img = rng.integers(0, 256, (h, w, 3), dtype=np.uint8)
        video_io.write_image(root / f"i{i}.png", img)
        video_io.write_image(root / f"i{i}_edit.png", 255 - img)
    edits, images, clips = [], [], []
    for n in range(24):
        i = n % 6
        h, w = SIZES[i % 3]
        edits.append(
            dict(
                id=f"ve{n}", kind="video_edit", source=f"v{i}.mp4", target=f"v{i}_edit.mp4", text=f"edit {n}"
            )
        )  # no size keys: probed
        images.append(
            dict(
                id=f"ie{n}",
                kind="image_edit",
                source=f"i{i}.png",
                target=f"i{i}_edit.png",
                text=f"image edit {n}",
                height=h,
                width=w,
            )
        )
        clips.append(
            dict(
                id=f"t2v{n}",
                kind="t2v",
                target=f"c{i}.mp4",
                text=f"clip {n}",
                frames=9 if i < 3 else 6,
                height=h,
                width=w,
                fps=16.0,
            )
        )
    for name, rows in (("video_edits", edits), ("image_edits", images), ("clips", clips)):
        manifest_lib.write_manifest(str(root / f"{name}.jsonl"), rows)
    return root


MIXTURE = [
    dict(kind="video_edit", manifest="video_edits.jsonl", weight=1.0),
    dict(kind="image_edit", manifest="image_edits.jsonl", weight=1.0),
    dict(kind="t2v", manifest="clips.jsonl", weight=1.0),
]


def data_config(**overrides):
    return helpers.data_config(
        **{
            **dict(
                num_frames=9,
                fps=0.0,
                motion_alignment=True,
                pretext=dict(weights=dict(none=1, cube=1, speed=1, shuffle=1)),
            ),
            **overrides,
        }
    )


def make(root, batch_size, index=0, count=1, mixture=MIXTURE, **kwargs):
    sources = pipeline.open_sources(mixture, root=str(root))
    return pipeline.build_pipeline(
        data_config(),
        sources,
        batch_size=batch_size,
        seed=7,
        process_index=index,
        process_count=count,
        **kwargs,
    )


@pytest.mark.parametrize("count", [2, 4])
def test_processes_slice_one_global_plan(multi_dir, count):
    per_process = 2
    single = list(make(multi_dir, per_process * count, num_epochs=1))
    local = [list(make(multi_dir, per_process, index, count, num_epochs=1)) for index in range(count)]
    assert len(single) == 72 // (per_process * count) and all(len(b) == len(single) for b in local)
    shapes, kinds = set(), set()
    for step in range(len(single)):
        batches = [batches[step] for batches in local]
        assert len({b["source"].shape for b in batches}) == 1, f"step {step}: processes disagree"
        assert batches[0]["source"].shape[0] == per_process
        ids = [b["id"].tolist() for b in batches]
        assert len(set().union(*ids)) == per_process * count  # disjoint
        # The union, in process order, is the single-process global batch, values included.
        for key in single[step]:
            np.testing.assert_array_equal(
                np.concatenate([b[key] for b in batches]), single[step][key], err_msg=f"step {step} {key}"
            )
        shapes.add(batches[0]["source"].shape[1:4])
        kinds.update(single[step]["kind"].tolist())
    # Three aspect buckets x (short clips T=5, full clips T=9, images T=1), all kinds, were planned.
    assert {s[0] for s in shapes} == {1, 5, 9} and len(shapes) == 9
    assert kinds == {"video_edit", "image_edit", "t2v"}

    # One process resumes from its saved state (through JSON, as a checkpoint stores it).
    last = count - 1
    _, it = take(make(multi_dir, per_process, last, count, num_epochs=1), 2)
    state = json.loads(json.dumps(it.get_state()))
    assert state["waiting"], "the test should resume with positions waiting in partial global buckets"
    it = iter(make(multi_dir, per_process, last, count, num_epochs=1))
    it.set_state(state)
    assert_same(list(it), local[last][2:])


def test_image_batches_have_their_own_size_on_every_process(multi_dir):
    """image_batch_size (bs_img next to bs_vid): single-frame buckets are planned at their own
    global size, and two processes still slice one plan."""
    single = list(make(multi_dir, 4, num_epochs=1, image_batch_size=8))
    local = [list(make(multi_dir, 2, index, 2, num_epochs=1, image_batch_size=4)) for index in range(2)]
    sizes = sorted((b["source"].shape[1], len(b["id"])) for b in single)
    # 24 images in 3 buckets -> 3 batches of 8; 48 clips and video edits in 6 buckets -> 12 of 4.
    assert sizes == [(1, 8)] * 3 + [(5, 4)] * 6 + [(9, 4)] * 6
    assert all(len(b) == len(single) for b in local)
    for step, whole in enumerate(single):
        parts = [batches[step] for batches in local]
        assert [len(p["id"]) for p in parts] == [len(whole["id"]) // 2] * 2
        for key in ARRAYS + ("id",):
            np.testing.assert_array_equal(np.concatenate([p[key] for p in parts]), whole[key])


def test_every_process_saves_the_same_plan_state(multi_dir):
    states = []
    for index in range(2):
        _, it = take(make(multi_dir, 2, index, 2), 3)
        states.append(it.get_state())
    assert states[0] == states[1]


def test_several_processes_need_drop_remainder(multi_dir):
    with pytest.raises(ValueError, match="drop_remainder=False needs a single process"):
        make(multi_dir, 2, 0, 2, drop_remainder=False)
    with pytest.raises(ValueError, match="process_index 2 is not in"):
        make(multi_dir, 2, 2, 2)


def test_planned_shape_is_the_decoded_shape(multi_dir):
    spec = pipeline.SampleSpec.from_config(data_config(), seed=0)
    for name in ("video_edits", "image_edits", "clips"):
        for record in pipeline.ManifestSource(str(multi_dir / f"{name}.jsonl")):
            decoded = pipeline.prepare_sample(record, 3, spec)["source"].shape[:3]
            assert pipeline.plan_shape(record, spec) == decoded, record["id"]
            # The same from a header probe alone (no size keys in the record).
            bare = {k: v for k, v in record.items() if k not in sum(pipeline.SIZE_KEYS.values(), ())}
            assert pipeline.plan_shape(bare, spec) == decoded, record["id"]


def test_metadata_comes_from_size_keys_when_present(multi_dir, tmp_path):
    spec = pipeline.SampleSpec.from_config(data_config(), seed=0)
    images = pipeline.ManifestSource(str(multi_dir / "image_edits.jsonl"))
    # A manifest's height/width describe source and target alike.
    assert images[0]["source_height"] == images[0]["height"] == 32
    (tmp_path / "noise.mp4").write_bytes(b"not a video" * 50)
    record = dict(
        id="x", kind="t2v", target=str(tmp_path / "noise.mp4"), text="x", frames=17, height=48, width=48
    )
    assert pipeline.plan_shape(record, spec) == (9, 64, 64)  # trusted: no probe was made
    with pytest.raises(pipeline.FieldError, match="cannot read video header"):
        pipeline.plan_shape(dict(record, frames=None), spec)
    with pytest.raises(pipeline.FieldError, match="does not exist"):
        pipeline.plan_shape(dict(record, target=str(tmp_path / "gone.mp4")), spec)
    # A shard record: its own size keys are the target's; its manifest line (meta) describes the source.
    shard_like = dict(
        id="s",
        kind="video_edit",
        text="x",
        target=b"t" * 9,
        target_ext=".mp4",
        source=b"s" * 9,
        source_ext=".mp4",
        frames=17,
        height=48,
        width=96,
        meta=dict(frames=17, height=96, width=48),
    )
    assert pipeline.plan_shape(shard_like, spec) == (9, 96, 48)  # the source's bucket, no probe
    with pytest.raises(pipeline.FieldError, match="<source bytes of s>: cannot read video header"):
        pipeline.plan_shape(dict(shard_like, meta={}), spec)


def test_decode_failure_pads_only_its_own_slot(tmp_path):
    """Passes the metadata pass, fails later: a zero slot with valid=False on the owning process."""
    good = flat_video([level(t) for t in range(9)], 32, 64)
    records = []
    for i in range(6):
        video_io.write_video(tmp_path / f"c{i}.mp4", good, fps=16)
        records.append(dict(id=f"c{i}", kind="t2v", target=str(tmp_path / f"c{i}.mp4"), text=f"clip {i}"))
    (tmp_path / "garbage.mp4").write_bytes(b"not a video" * 50)
    video_io.write_video(tmp_path / "square.mp4", flat_video([level(t) for t in range(9)], 48, 48), fps=16)
    size = dict(frames=9, height=32, width=64)
    records += [
        dict(id="garbage", kind="t2v", target=str(tmp_path / "garbage.mp4"), text="x", **size),
        dict(id="liar", kind="t2v", target=str(tmp_path / "square.mp4"), text="x", **size),
        dict(id="gone", kind="t2v", target=str(tmp_path / "gone.mp4"), text="x", **size),
    ]
    sources = [(dict(weight=1.0), records)]

    def run(index, count, workers=0):
        ds = pipeline.build_pipeline(
            data_config(motion_alignment=False),
            sources,
            batch_size=4 // count,
            seed=0,
            num_epochs=1,
            process_index=index,
            process_count=count,
            worker_count=workers,
        )
        it = iter(ds)
        batches, summary = list(it), it.skip_summary()
        it.close()
        return batches, summary

    single, single_summary = run(0, 1)
    per = [run(index, 2) for index in range(2)]
    # Worker processes (frames back through shared memory) give the same batches, pads included.
    in_workers, summary = run(1, 2, workers=2)
    assert_same(in_workers, per[1][0])
    assert summary == per[1][1]
    assert len(single) == 2 and all(len(batches) == 2 for batches, _ in per)
    valid = {}
    for step in range(2):
        batches = [batches[step] for batches, _ in per]
        assert batches[0]["source"].shape == batches[1]["source"].shape == (2, 9, 48, 96, 3)
        for key in ("id", "valid", "source", "target"):
            np.testing.assert_array_equal(np.concatenate([b[key] for b in batches]), single[step][key])
        for b in batches:
            valid.update(zip(b["id"].tolist(), b["valid"].tolist()))
            assert (b["source"][~b["valid"]] == 0).all() and (b["target"][~b["valid"]] == 0).all()
    assert valid == {**{f"c{i}": True for i in range(6)}, "garbage": False, "liar": False}
    # The metadata-pass skip is counted by every process alike; a pad only where it was decoded.
    for _, summary in per:
        assert summary["counts"].get("missing") == 1
    padded = {}
    for _, summary in per:
        for reason in ("corrupt", "shape_mismatch"):
            padded[reason] = padded.get(reason, 0) + summary["counts"].get(reason, 0)
    assert padded == {"corrupt": 1, "shape_mismatch": 1}
    assert sum(summary["padded"] for _, summary in per) == 2 == single_summary["padded"]
    mismatch = [e for _, s in per for e in s["examples"] if e["skipped"] == "shape_mismatch"]
    assert mismatch[0]["id"] == "liar" and "(9, 64, 64)" in mismatch[0]["message"]


# ---------------------------------------------------------------------------------------------------
# start_frame (OpenVE-3M: SAMA's loader drops the first 4 frames)


def test_frame_indices_from_a_start_frame():
    np.testing.assert_array_equal(transforms.frame_indices(12, 5, 1, 5, start=4), np.arange(4, 9))
    np.testing.assert_array_equal(
        transforms.frame_indices(12, 81, 2, 1, start=4), [4]
    )  # 4 usable at stride 2 -> 1
    assert transforms.frames_needed(5, 2, start=4) == 13
    with pytest.raises(
        transforms.SkipSample, match="12 frames give 1 at stride 2 after dropping the first 4"
    ):
        transforms.frame_indices(12, 81, 2, 5, start=4)
    with pytest.raises(ValueError, match="start frame"):
        transforms.frame_indices(12, 5, start=-1)


def test_start_frame_drops_leading_frames_of_source_and_target(tmp_path):
    src = flat_video([level(t) for t in range(12)], 32, 64)
    video_io.write_video(tmp_path / "s.mp4", src, fps=16)
    video_io.write_video(tmp_path / "t.mp4", 250 - src, fps=16)
    manifest_lib.write_manifest(
        str(tmp_path / "openve.jsonl"),
        [
            dict(id="o0", kind="video_edit", source="s.mp4", target="t.mp4", text="x", start_frame=4),
            dict(id="o1", kind="video_edit", source="s.mp4", target="t.mp4", text="x", start_frame=9),
            dict(id="o2", kind="video_edit", source="s.mp4", target="t.mp4", text="x", start_frame=-2),
        ],
    )
    spec = pipeline.SampleSpec(num_frames=5, min_frames=5, buckets=((32, 64),))
    record = pipeline.ManifestSource(str(tmp_path / "openve.jsonl"))[0]
    expected = np.array([level(t) for t in range(4, 9)])
    for rec in (
        record,
        dict({k: v for k, v in record.items() if k != "start_frame"}, meta=dict(start_frame=4)),
    ):
        sample = pipeline.prepare_sample(rec, 0, spec)  # the manifest key, or a shard record's meta
        np.testing.assert_allclose(sample["source"].astype(float).mean(axis=(1, 2, 3)), expected, atol=2.5)
        np.testing.assert_allclose(
            sample["target"].astype(float).mean(axis=(1, 2, 3)), 250 - expected, atol=2.5
        )
        assert pipeline.plan_shape(rec, spec) == (5, 32, 64)

    # Through the pipeline: 3 usable frames after start 9 is too short; a negative start is malformed.
    data = ml_collections.ConfigDict(
        dict(
            num_frames=5,
            fps=0.0,
            min_frames=5,
            pixels=32 * 64,
            aspect_ratios=(0.5,),
            size_multiple=16,
            motion_alignment=False,
        )
    )
    sources = pipeline.open_sources([dict(kind="video_edit", manifest="openve.jsonl")], root=str(tmp_path))
    it = iter(
        pipeline.build_pipeline(
            data, sources, batch_size=1, seed=0, num_epochs=1, process_index=0, process_count=1
        )
    )
    batches = list(it)
    assert [b["id"][0] for b in batches] == ["o0"]
    np.testing.assert_allclose(batches[0]["source"][0].astype(float).mean(axis=(1, 2, 3)), expected, atol=2.5)
    assert it.skip_summary()["counts"] == {"too_short": 1, "bad_record": 1}


def test_metadata_and_decode_threads_give_the_same_batches(multi_dir):
    plain = list(make(multi_dir, 4, 1, 2, num_epochs=1))
    sources = pipeline.open_sources(MIXTURE, root=str(multi_dir))
    threaded = pipeline.build_pipeline(
        data_config(metadata_threads=2, read_threads=2),
        sources,
        batch_size=4,
        seed=7,
        num_epochs=1,
        process_index=1,
        process_count=2,
    )
    it = iter(threaded)
    assert_same(list(it), plain)
    it.close()
