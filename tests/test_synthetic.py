"""The synthetic editing data: deterministic, exact ground truth, real media files and manifests."""

import json

import numpy as np

from sama_jax.data import manifest, synthetic, video_io

T, H, W = 5, 32, 48


def _edited_region(source_scene, target_scene, record):
    """Where the edited object is, in the source and in the target, over all frames."""
    k = record["object"]
    region = np.zeros((T, H, W), bool)
    if record["type"] != "add":
        region |= synthetic.object_masks(source_scene.objects[k], T, H, W)
    if record["type"] != "remove":
        region |= synthetic.object_masks(target_scene.objects[k], T, H, W)
    return region


def test_ground_truth_differs_exactly_where_the_edit_is():
    seen = set()
    for index in range(40):
        rng = synthetic.sample_rng(7, "video_edit", index)
        scene = synthetic.random_scene(rng, H, W)
        edited, text, record = synthetic.random_edit(rng, scene, H, W)
        source, target = synthetic.render(scene, T, H, W), synthetic.render(edited, T, H, W)
        changed = (source != target).any(-1)
        region = _edited_region(scene, edited, record)
        assert changed.any(), (index, text)
        assert not (changed & ~region).any(), (index, text)  # nothing outside the edited object moves
        # Outside the edited object's region the two videos are bit-identical.
        np.testing.assert_array_equal(source[~region], target[~region])
        # The same generator state reproduces the sample returned by make_video_edit.
        src2, tgt2, text2, record2 = synthetic.make_video_edit(7, index, T, H, W)
        np.testing.assert_array_equal(src2, source)
        np.testing.assert_array_equal(tgt2, target)
        assert (text2, record2) == (text, record)
        seen.add(record["type"])
    assert seen == set(synthetic.EDITS)


def test_edit_instructions_name_the_object():
    for index in range(30):
        rng = synthetic.sample_rng(3, "image_edit", index)
        scene = synthetic.random_scene(rng, H, W, still=True)
        edited, text, record = synthetic.random_edit(rng, scene, H, W, still=True)
        if record["type"] == "add":
            new = edited.objects[record["object"]]
            assert f"{new.colour}" in text and new.shape in text
        else:
            old = scene.objects[record["object"]]
            assert f"the {old.colour} {old.shape}" in text
        if record["type"] == "recolour":
            assert text.endswith(f"to {edited.objects[record['object']].colour}.")
        # (colour, shape) pairs stay unique, so the instruction is unambiguous in both scenes.
        for s in (scene, edited):
            pairs = [(o.colour, o.shape) for o in s.objects]
            assert len(pairs) == len(set(pairs)) and pairs


def test_shapes_stay_inside_and_move():
    obj = synthetic.Shape("square", "red", "filled", radius=5, y=10, x=10, vy=3.0, vx=-7.0)
    ys, xs = synthetic.trajectory(obj, 40, H, W)
    assert ys.min() >= 5 and ys.max() <= H - 1 - 5 and xs.min() >= 5 and xs.max() <= W - 1 - 5
    np.testing.assert_allclose(ys[:3], [10, 13, 16])
    # x: 10 -> 3 reflects off the left limit (x = radius = 5) to 7, then -4 -> 14 moving right.
    np.testing.assert_allclose(xs[:3], [10, 7, 14])
    mask = synthetic.object_mask(obj, 10, 10, H, W)
    assert mask.sum() == 11 * 11 and mask[5:16, 5:16].all()


def _generate(path, **kw):
    args = dict(seed=1, video_edits=3, image_edits=3, clips=2, frames=T, height=H, width=W, fps=8)
    args.update(kw)
    return synthetic.generate(str(path), **args)


def test_generate_writes_real_media_and_is_deterministic(tmp_path):
    a = _generate(tmp_path / "a")
    b = _generate(tmp_path / "b")
    c = _generate(tmp_path / "c", seed=2)
    more = _generate(tmp_path / "more", video_edits=4)
    for name in ("video_edits", "image_edits", "clips"):
        lines_a = open(a[name]).read().splitlines()
        assert lines_a == open(b[name]).read().splitlines()
        assert lines_a != open(c[name]).read().splitlines()
        # Growing a count keeps the samples already there.
        assert open(more[name]).read().splitlines()[: len(lines_a)] == lines_a

    videos = manifest.read_manifest(a["video_edits"])
    assert [s["kind"] for s in videos] == ["video_edit"] * 3
    for i, sample in enumerate(videos):
        source, target, text, _ = synthetic.make_video_edit(1, i, T, H, W)
        assert sample["text"] == text
        for key, frames in (("source", source), ("target", target)):
            path = manifest.resolve(a["video_edits"], sample[key])
            decoded = video_io.decode_video(path)
            assert decoded.shape == (T, H, W, 3)
            assert np.abs(decoded.astype(int) - frames).mean() < 4  # H.264 is lossy, but close
            other = manifest.resolve(b["video_edits"], sample[key])
            assert open(path, "rb").read() == open(other, "rb").read()

    for i, sample in enumerate(manifest.read_manifest(a["image_edits"])):
        source, target, text, record = synthetic.make_image_edit(1, i, H, W)
        # png is lossless: the files are the exact ground truth.
        np.testing.assert_array_equal(
            video_io.decode_image(manifest.resolve(a["image_edits"], sample["source"])), source
        )
        np.testing.assert_array_equal(
            video_io.decode_image(manifest.resolve(a["image_edits"], sample["target"])), target
        )
        assert sample["edit"] == record and sample["text"] == text

    clips = manifest.read_manifest(a["clips"])
    assert [s["kind"] for s in clips] == ["t2v", "t2v"] and all("source" not in s for s in clips)
    assert video_io.video_info(manifest.resolve(a["clips"], clips[0]["target"]))["frames"] == T


def test_cli(tmp_path, capsys):
    synthetic.main(
        [
            "--out",
            str(tmp_path),
            "--video-edits",
            "1",
            "--image-edits",
            "1",
            "--clips",
            "1",
            "--frames",
            "3",
            "--height",
            "16",
            "--width",
            "24",
        ]
    )
    assert "clips.jsonl" in capsys.readouterr().out
    sample = json.loads(open(tmp_path / "video_edits.jsonl").readline())
    assert video_io.video_info(tmp_path / sample["source"]) == dict(frames=3, fps=16.0, height=16, width=24)


def test_held_out_split_shows_pairs_the_training_split_never_does(tmp_path):
    pairs = lambda scene: {(o.colour, o.shape) for o in scene.objects}

    def scene_of(rng):
        scene = synthetic.random_scene(rng, 32, 32)
        return (scene,), scene

    draw = lambda i, held_out: synthetic._draw(synthetic.sample_rng(0, "t2v", i), held_out, scene_of)
    assert all(not (pairs(draw(i, False)) & synthetic.HELD_OUT_PAIRS) for i in range(30))
    assert all(pairs(draw(i, True)) & synthetic.HELD_OUT_PAIRS for i in range(30))
    # Every colour and every shape is seen in training, only not in these combinations.
    assert {c for c, _ in synthetic.HELD_OUT_PAIRS} == set(synthetic.COLOURS)
    assert {s for _, s in synthetic.HELD_OUT_PAIRS} == set(synthetic.SHAPES)
    for index in range(6):  # samples stay pure functions of (seed, kind, index, split)
        first = synthetic.make_video_edit(0, index, 3, 32, 32, held_out=True)
        again = synthetic.make_video_edit(0, index, 3, 32, 32, held_out=True)
        assert np.array_equal(first[0], again[0]) and first[2] == again[2]
    paths = synthetic.generate(
        str(tmp_path), video_edits=2, image_edits=2, clips=2, frames=3, height=32, width=32, held_out=True
    )
    assert sorted(paths) == ["clips", "image_edits", "video_edits"]
    assert len(manifest.read_manifest(paths["video_edits"])) == 2


def test_an_added_object_is_fixed_by_its_instruction():
    # Place, size, speed and direction of an added object are the ones its words name, so the
    # target of an "add" edit follows from the source and the instruction.
    seen = 0
    for index in range(60):
        rng = synthetic.sample_rng(5, "video_edit", index)
        scene = synthetic.random_scene(rng, H, W)
        edited, text, record = synthetic.random_edit(rng, scene, H, W)
        if record["type"] != "add":
            continue
        seen += 1
        new = edited.objects[record["object"]]
        place = next(p for p in sorted(synthetic.PLACES, key=len, reverse=True) if f"at the {p} " in text)
        fy, fx = synthetic.PLACES[place]
        assert (new.y, new.x) == (fy * (H - 1), fx * (W - 1))
        assert new.radius == synthetic.ADDED_RADIUS * min(H, W)
        speed = synthetic.ADDED_SPEED * min(H, W)
        direction = text.rsplit("moves ", 1)[1].removeprefix("to the ").rstrip(".")
        assert (new.vy, new.vx) == (
            synthetic.MOTIONS[direction][0] * speed,
            synthetic.MOTIONS[direction][1] * speed,
        )
    assert seen >= 5
