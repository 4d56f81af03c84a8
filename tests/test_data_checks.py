"""Data mistakes fail early and say where: config values, mixture paths, skip rates, degenerate media."""

import json
import logging
import os
import re

import helpers
import numpy as np
import pytest
from helpers import flat_video, level, take

from sama_jax.config import ConfigError, load_config_file
from sama_jax.data import manifest as manifest_lib
from sama_jax.data import pipeline, video_io

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def data_config(**overrides):
    return helpers.data_config(
        **{**dict(fps=0.0, pixels=32 * 32, aspect_ratios=(1.0,), prefetch=0), **overrides}
    )


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("num_frames", 6, "data.num_frames=6: must be 4k+1 (1, 5, 9, ..., 81)"),
        ("frame_stride", 0, "data.frame_stride=0: must be >= 1"),
        ("fps", -8.0, "data.fps=-8.0: must be >= 0"),
        ("min_frames", 4, "data.min_frames=4: must be 4k+1"),
        ("min_frames", 9, "data.min_frames=9: more than data.num_frames=5"),
        ("pixels", 0, "data.pixels=0: must be > 0"),
        ("size_multiple", -16, "data.size_multiple=-16: must be > 0"),
        ("aspect_ratios", (), "data.aspect_ratios=(): must be positive numbers"),
        ("min_size", 0, "data.min_size=0: must be >= 1"),
        ("max_aspect", 0.5, "data.max_aspect=0.5: must be >= 1"),
        ("features", ("txt",), "data.features=('txt',): unknown ['txt']"),
        ("num_frames", 4.5, "data.num_frames=4.5: must be an integer"),
        ("max_skip_fraction", 1.5, "data.max_skip_fraction=1.5: must be in [0, 1]"),
        ("on_skip_excess", "ignore", "data.on_skip_excess='ignore': must be 'error' or 'warn'"),
        ("worker_count", -1, "data.worker_count=-1: must be an integer >= 0"),
    ],
)
def test_config_values_no_sample_can_satisfy_stop_before_any_data(key, value, message):
    data = data_config(**{key: value})
    # build_pipeline checks before it touches a record (this one is not even a record)...
    with pytest.raises(ConfigError, match=re.escape(message)):
        pipeline.build_pipeline(
            data, [(dict(weight=1.0), [dict(id="x")])], batch_size=1, seed=0, process_index=0, process_count=1
        )
    # ...and check_data_config is the same check for a command to run before it builds models.
    with pytest.raises(ConfigError, match=re.escape(message)):
        pipeline.check_data_config(data)


def test_a_config_error_is_never_a_skip():
    with pytest.raises(ConfigError, match="data.num_frames=6"):
        pipeline.SampleSpec(num_frames=6)  # a spec made in code is checked too
    with pytest.raises(ConfigError, match="data.pretext: cube_mask_ratio"):
        pipeline.SampleSpec.from_config(
            data_config(motion_alignment=True, pretext=dict(cube_mask_ratio=2.0)), seed=0
        )
    with pytest.raises(ConfigError, match="everything fails alike"):
        pipeline.skip_marker(dict(id="x"), 0, ConfigError("everything fails alike"))
    # ...while a record's own problem still is one.
    marker = pipeline.skip_marker(dict(id="x"), 3, ValueError("start_frame must be ..."))
    assert (marker["skipped"], marker["id"], marker["index"]) == ("bad_record", "x", 3)


def test_shipped_configs_declare_the_data_keys_and_pass_the_checks():
    for spec, min_size in (
        ("stage1_sft.py:tiny", 8),
        ("stage1_sft.py:wan_14b", 32),
        ("stage0_pretrain.py:tiny", 8),
    ):
        data = load_config_file(os.path.join(CONFIGS, spec)).data
        assert (data.root, data.min_size, data.max_aspect, data.features) == ("", min_size, 4.0, ())
        assert (data.max_skip_fraction, data.on_skip_excess) == (0.5, "error")
        pipeline.check_data_config(data)


# ---------------------------------------------------------------------------------------------------
# Mixture paths


def test_relative_mixture_paths_follow_data_root_else_the_cwd(tmp_path, monkeypatch):
    video_io.write_image(tmp_path / "a.png", np.zeros((32, 32, 3), np.uint8))
    manifest_lib.write_manifest(
        str(tmp_path / "images.jsonl"),
        [dict(id="a", kind="image_edit", source="a.png", target="a.png", text="x")],
    )
    (tmp_path / "broken.jsonl").write_text("{not json\n")
    mixture = [dict(kind="image_edit", manifest="broken.jsonl"), dict(kind="image_edit", manifest="x.jsonl")]
    monkeypatch.chdir(tmp_path / "..")
    # Every entry's path is checked before any manifest is read (broken.jsonl is never parsed).
    expected = (
        f"data.mixture[1].manifest: x.jsonl not found (resolved against data.root={tmp_path}; "
        f"set data.root or use an absolute path)"
    )
    with pytest.raises(ConfigError, match=re.escape(expected)):
        pipeline.open_sources(mixture, root=str(tmp_path))
    with pytest.raises(
        ConfigError,
        match=re.escape(
            f"data.mixture[0].manifest: images.jsonl not found (resolved against the current directory "
            f"{os.getcwd()}; set data.root"
        ),
    ):
        pipeline.open_sources([dict(kind="image_edit", manifest="images.jsonl")])
    with pytest.raises(ConfigError, match=r"data.mixture\[0\].shards: .*gone not found \(an absolute path"):
        pipeline.open_sources([dict(kind="image_edit", shards=str(tmp_path / "gone"))])
    with pytest.raises(ConfigError, match=r"data.mixture\[0\].weight=-1: must be a finite number >= 0"):
        pipeline.open_sources(
            [dict(kind="image_edit", manifest="images.jsonl", weight=-1)], root=str(tmp_path)
        )

    rooted = pipeline.open_sources([dict(kind="image_edit", manifest="images.jsonl")], root=str(tmp_path))
    monkeypatch.chdir(tmp_path)
    from_cwd = pipeline.open_sources([dict(kind="image_edit", manifest="images.jsonl")])
    for entry, source in (rooted[0], from_cwd[0]):
        assert entry["manifest"] == str(tmp_path / "images.jsonl")  # resolved, as messages show it
        assert source[0]["target"] == str(tmp_path / "a.png")


# ---------------------------------------------------------------------------------------------------
# Per-sample skips name the media at fault


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    root = tmp_path_factory.mktemp("checks_media")
    clip = flat_video([level(t) for t in range(9)], 32, 32)
    video_io.write_video(root / "clip.mp4", clip, fps=8)
    video_io.write_video(root / "short.mp4", clip[:3], fps=8)
    video_io.write_video(root / "tiny.mp4", flat_video([level(t) for t in range(9)], 2, 2), fps=8)
    video_io.write_video(root / "sliver.mp4", flat_video([level(t) for t in range(9)], 16, 512), fps=8)
    video_io.write_image(root / "dot.png", np.full((1, 1, 3), 200, np.uint8))
    video_io.write_image(root / "img.png", np.full((32, 32, 3), 100, np.uint8))
    return root


def test_skips_name_the_short_small_or_sliver_media(media):
    records = [
        dict(id="short_source", kind="video_edit", source="short.mp4", target="clip.mp4", text="x"),
        dict(id="tiny_clip", kind="t2v", target="tiny.mp4", text="x"),
        dict(id="dot_source", kind="image_edit", source="dot.png", target="img.png", text="x"),
        dict(id="sliver", kind="video_edit", source="clip.mp4", target="sliver.mp4", text="x"),
        dict(id="good", kind="video_edit", source="clip.mp4", target="clip.mp4", text="x"),
    ]
    manifest_lib.write_manifest(str(media / "degenerate.jsonl"), records)
    data = data_config(min_size=8, max_aspect=4.0)
    sources = pipeline.open_sources([dict(kind="video_edit", manifest="degenerate.jsonl")], root=str(media))
    it = iter(
        pipeline.build_pipeline(
            data, sources, batch_size=1, seed=0, num_epochs=1, process_index=0, process_count=1
        )
    )
    batches = list(it)
    assert [b["id"][0] for b in batches] == ["good"] and batches[0]["valid"].all()
    summary = it.skip_summary()
    assert summary["counts"] == {"too_short": 1, "too_small": 2, "bad_aspect": 1}
    by_id = {e["id"]: e for e in summary["examples"]}
    assert by_id["short_source"]["path"] == str(media / "short.mp4")  # the source, not clip.mp4
    assert "source too short: 3 frames give 1" in by_id["short_source"]["message"]
    assert by_id["tiny_clip"]["path"].endswith("tiny.mp4") and "2x2" in by_id["tiny_clip"]["message"]
    assert (
        by_id["dot_source"]["path"].endswith("dot.png")
        and "data.min_size=8" in by_id["dot_source"]["message"]
    )
    assert (
        by_id["sliver"]["path"].endswith("sliver.mp4") and "aspect ratio 32.00" in by_id["sliver"]["message"]
    )
    # Decoding decides alike (one computation), so a sample read without the metadata pass agrees.
    spec = pipeline.SampleSpec.from_config(data, seed=0)
    for record in pipeline.ManifestSource(str(media / "degenerate.jsonl"))[:4]:
        with pytest.raises(pipeline.FieldError) as caught:
            pipeline.prepare_sample(record, 0, spec)
        assert caught.value.reason == by_id[record["id"]]["skipped"]
        assert record[caught.value.field] == by_id[record["id"]]["path"]
    # The bounds are the config's: a laxer one keeps the sliver (cropped to its bucket).
    lax = pipeline.SampleSpec.from_config(data_config(min_size=1, max_aspect=40.0), seed=0)
    assert pipeline.plan_shape(pipeline.ManifestSource(str(media / "degenerate.jsonl"))[3], lax) == (
        5,
        32,
        32,
    )


# ---------------------------------------------------------------------------------------------------
# Skip-rate guard


def _entry(media, name, n, bad_every):
    """A t2v manifest of n records (size keys given: no probes), every bad_every-th naming a missing file."""
    records = [
        dict(
            id=f"{name}{i}",
            kind="t2v",
            target="clip.mp4" if i % bad_every else "gone.mp4",
            text="x",
            frames=9,
            height=32,
            width=32,
        )
        for i in range(n)
    ]
    manifest_lib.write_manifest(str(media / f"{name}.jsonl"), records)
    return dict(kind="t2v", manifest=f"{name}.jsonl", weight=1.0)


def _good_images(media):
    records = [
        dict(id=f"g{i}", kind="image_edit", source="img.png", target="img.png", text="x", height=32, width=32)
        for i in range(30)
    ]
    manifest_lib.write_manifest(str(media / "good.jsonl"), records)
    return dict(kind="image_edit", manifest="good.jsonl", weight=1.0)


def _mostly_missing(media):
    """The good images and 30 clips of which 2 in 3 are missing."""
    entry = _entry(media, "shaky", 30, bad_every=1)
    records = [
        dict(r, target="clip.mp4" if i % 3 == 0 else "gone.mp4")
        for i, r in enumerate(manifest_lib.read_manifest(str(media / "shaky.jsonl")))
    ]
    manifest_lib.write_manifest(str(media / "shaky.jsonl"), records)
    return [_good_images(media), entry]


def _run(media, mixture, index=0, count=1, **overrides):
    sources = pipeline.open_sources(mixture, root=str(media))
    return pipeline.build_pipeline(
        data_config(**overrides),
        sources,
        batch_size=2,
        seed=0,
        num_epochs=1,
        process_index=index,
        process_count=count,
    )


def test_an_entry_skipping_most_records_stops_the_run_on_every_process(media):
    mixture = _mostly_missing(media)
    for index in range(2):  # every process plans alike, so stops alike
        with pytest.raises(pipeline.SkipRateError) as caught:
            list(_run(media, mixture, index=index, count=2))
        message = str(caught.value)
        assert re.match(
            r"data.mixture\[1\] \(kind=t2v, manifest=.*shaky.jsonl\): (\d+) of the first 20 "
            r"records were skipped \(\d+% > data.max_skip_fraction=0.5\); top reasons: missing \1;",
            message,
        ), message
        assert "gone.mp4: file does not exist" in message and "data.on_skip_excess" in message
    assert isinstance(caught.value, ValueError)


def test_skip_rate_warns_instead_when_configured_and_counts_resume(media, caplog):
    mixture = _mostly_missing(media)
    with caplog.at_level(logging.WARNING):
        it = iter(_run(media, mixture, on_skip_excess="warn"))
        batches = list(it)
    ids = np.concatenate([b["id"] for b in batches]).tolist()
    assert sorted(ids) == sorted([f"g{i}" for i in range(30)] + [f"shaky{i}" for i in range(0, 30, 3)])
    loud = [r.getMessage() for r in caplog.records if "SKIP RATE TOO HIGH" in r.getMessage()]
    assert len(loud) == 1 and "data.mixture[1] (kind=t2v" in loud[0]  # once per entry
    entries = it.get_state()["entries"]
    assert entries["0"]["seen"] == 30 and entries["0"]["skips"] == {}
    assert entries["1"]["seen"] == 30 and entries["1"]["skips"] == {"missing": 20}
    # Resumed from a checkpoint, the counts go on from where they were.
    _, it = take(_run(media, mixture, on_skip_excess="warn"), 5)
    state = json.loads(json.dumps(it.get_state()))
    resumed = iter(_run(media, mixture, on_skip_excess="warn"))
    resumed.set_state(state)
    list(resumed)
    assert resumed.get_state()["entries"] == entries


def test_a_few_bad_records_or_a_small_entry_do_not_trip_the_guard(media):
    third = _entry(media, "third", 30, bad_every=3)  # 10 of 30 missing: 33% < 50%
    small = _entry(media, "small", 15, bad_every=1)  # all 15 missing, but fewer than 20 seen
    for entry, expected in ((third, {"seen": 30, "missing": 10}), (small, {"seen": 15, "missing": 15})):
        it = iter(_run(media, [entry]))
        list(it)
        stats = it.get_state()["entries"]["0"]
        assert dict(stats["skips"], seen=stats["seen"]) == expected
    # A stricter threshold stops the same data, naming the entry.
    with pytest.raises(
        pipeline.SkipRateError,
        match=r"data.mixture\[0\] \(kind=t2v, manifest=.*third.jsonl\)"
        r".*data.max_skip_fraction=0.2",
    ):
        list(_run(media, [third], max_skip_fraction=0.2))
