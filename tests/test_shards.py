"""sama-build-shards as users run it: TFDS readers, reruns, a killed build, bad input, --config."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
from helpers import synthetic_samples

from sama_jax.data import arrayrecord, build_shards, manifest, shard_builder, shard_format

T, H, W = 5, 16, 24
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """10 samples of all kinds (clips at 8 fps) and the manifest that lists them."""
    root = tmp_path_factory.mktemp("shards_data")
    samples = synthetic_samples(root, 5, 4, 3, 3, T, H, W)
    path = str(root / "all.jsonl")
    manifest.write_manifest(path, samples)
    return root, path, samples


def _manifest(root, name, samples):
    path = str(root / f"{name}.jsonl")
    manifest.write_manifest(path, samples)
    return path


def _cli(capsys, *argv):
    """(exit status, stdout, stderr) of sama-build-shards."""
    status = build_shards.main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return status, out, err


def _snapshot(directory):
    return {
        f: (os.stat(os.path.join(directory, f)).st_mtime_ns, open(os.path.join(directory, f), "rb").read())
        for f in sorted(os.listdir(directory))
    }


def test_tfds_and_grain_read_the_records(data, tmp_path):
    import grain
    import tensorflow_datasets as tfds

    _, path, samples = data
    out = tmp_path / "tfds" / "all" / shard_format.VERSION
    index = shard_builder.build_shards(path, str(out), samples_per_shard=3)
    assert index["shards"] == [f"all-train.array_record-0000{i}-of-00004" for i in range(4)]
    info = json.load(open(out / "dataset_info.json"))
    assert info["name"] == "all" and info["fileFormat"] == "array_record"
    assert info["splits"][0]["shardLengths"] == ["3", "3", "3", "1"]

    ours = arrayrecord.ShardSource(str(out))
    builder = tfds.builder_from_directory(str(out))
    by_builder = builder.as_data_source(split="train")
    by_name = tfds.data_source("all", split="train", data_dir=str(tmp_path / "tfds"), download=False)
    assert len(ours) == len(by_builder) == len(by_name) == 10
    for i in range(10):
        mine, theirs = ours[i], by_builder[i]
        assert mine["id"] == samples[i]["id"] and theirs["id"] == mine["id"].encode()
        assert (
            theirs["target"]
            == mine["target"]
            == open(manifest.resolve(path, samples[i]["target"]), "rb").read()
        )
        assert theirs["source"] == mine["source"] and theirs["frames"] == mine["frames"]
        assert json.loads(theirs["meta"]) == mine["meta"]
        assert shard_format.record_from_example(by_name[i]) == mine
    assert ours[0]["kind"] == "video_edit" and (ours[0]["source_frames"], ours[0]["fps"]) == (T, 8.0)
    assert ours[9]["kind"] == "t2v" and "source_frames" not in ours[9] and by_builder[9]["source_frames"] == 0
    assert [r["id"] for r in grain.MapDataset.source(by_builder).map(shard_format.record_from_example)] == [
        s["id"] for s in samples
    ]
    assert grain.MapDataset.source(ours)[4]["id"] == samples[4]["id"]

    # A shard whose samples were all skipped is an empty ArrayRecord file with length 0 in the split.
    root = data[0]
    gap = _manifest(
        root, "gap", samples[:1] + [dict(samples[9], id="gone", target="clips/nowhere.mp4")] + samples[1:2]
    )
    index = shard_builder.build_shards(gap, str(tmp_path / "gap"), samples_per_shard=1)
    assert index["records"] == [1, 0, 1] and index["skipped_counts"] == {"missing": 1}
    gap_source = tfds.builder_from_directory(str(tmp_path / "gap")).as_data_source(split="train")
    assert [r["id"] for r in gap_source] == [samples[0]["id"].encode(), samples[1]["id"].encode()]


def test_features_travel_as_npy_bytes(data, tmp_path):
    from sama_jax import features as features_lib

    root, _, samples = data
    path = _manifest(root, "feat", samples[:2])
    text = np.arange(12, dtype=np.float16).reshape(4, 3)
    target = features_lib.feature_path(path, samples[0]["id"], "text")
    os.makedirs(os.path.dirname(target), exist_ok=True)
    np.save(target, text)
    shard_builder.build_shards(path, str(tmp_path / "s"), features=["text"])
    first, second = list(arrayrecord.ShardSource(str(tmp_path / "s")))
    np.testing.assert_array_equal(first["features"]["text"], text)
    assert first["features"]["text"].dtype == np.float16 and second["features"] == {}


def test_refused_rerun_changes_nothing(data, tmp_path, capsys):
    _, path, _ = data
    out = tmp_path / "s"
    assert (
        _cli(capsys, "--manifest", path, "--out", out, "--samples-per-shard", 4, "--check", "decode")[0] == 0
    )
    before = _snapshot(out)
    status, _, err = _cli(capsys, "--manifest", path, "--out", out, "--samples-per-shard", 4)
    assert status == 2 and "built with different settings (check: 'decode' -> 'header')" in err
    assert "--overwrite" in err and err.count("\n") == 1 and "Traceback" not in err
    assert _snapshot(out) == before  # index.json included: the finished build still opens
    assert len(arrayrecord.ShardSource(str(out))) == 10

    # A directory of the msgpack format (schema 1) is named as such, by the reader and the builder.
    old = tmp_path / "old"
    old.mkdir()
    (old / shard_builder.INDEX).write_text(
        json.dumps(dict(schema=1, shards=["all-00000-of-00001.array_record"], records=[10]))
    )
    with pytest.raises(ValueError, match="records of schema 1 .1: msgpack., this reader reads schema 2"):
        arrayrecord.ShardSource(str(old))
    status, _, err = _cli(capsys, "--manifest", path, "--out", old)
    assert status == 2 and "holds a build of an older format (schema 1)" in err and "--overwrite" in err


def test_appended_sample_builds_only_the_last_shard(data, tmp_path, capsys):
    root, _, samples = data
    path = _manifest(root, "grow", samples[:9])
    out = tmp_path / "s"
    first = shard_builder.build_shards(path, str(out), samples_per_shard=3)
    kept = {i: open(out / first["shards"][i], "rb").read() for i in range(3)}
    manifest.write_manifest(path, samples[:10])
    status, _, err = _cli(capsys, "--manifest", path, "--out", out, "--samples-per-shard", 3)
    assert status == 0 and "manifest gained 1 sample: shards 0-2 unchanged, building shard 3" in err
    index = json.load(open(out / shard_builder.INDEX))
    assert index["resumed_shards"] == 3 and index["records"] == [3, 3, 3, 1]
    assert (
        sorted(f for f in os.listdir(out) if "array_record" in f and not f.endswith(".json"))
        == index["shards"]
    )
    for i in range(3):  # renamed to -of-00004, bytes untouched
        assert open(out / index["shards"][i], "rb").read() == kept[i]
    fresh = shard_builder.build_shards(path, str(tmp_path / "fresh"), samples_per_shard=3)
    for shard in fresh["shards"]:
        assert open(out / shard, "rb").read() == open(tmp_path / "fresh" / shard, "rb").read()
    shards_before = {f: v for f, v in _snapshot(out).items() if "array_record" in f}
    status, _, err = _cli(capsys, "--manifest", path, "--out", out, "--samples-per-shard", 3)
    assert status == 0 and "shards 0-3 unchanged, nothing to build" in err
    assert {f: v for f, v in _snapshot(out).items() if "array_record" in f} == shards_before

    # Samples changed inside done shards: refused, naming the shard and --overwrite; nothing changes.
    before = _snapshot(out)
    manifest.write_manifest(path, samples[:4] + [dict(samples[4], text="other")] + samples[5:10])
    status, _, err = _cli(capsys, "--manifest", path, "--out", out, "--samples-per-shard", 3)
    assert status == 2 and "samples of shard 1 changed (first difference: sample 4" in err
    assert "--overwrite" in err and _snapshot(out) == before
    status, _, err = _cli(capsys, "--manifest", path, "--out", out, "--samples-per-shard", 3, "--overwrite")
    assert status == 0 and "rebuilding all 4 shards" in err
    assert arrayrecord.ShardSource(str(out))[4]["text"] == "other"


def test_wrong_field_type_names_file_and_line(data, tmp_path, capsys):
    root, _, samples = data
    path = root / "typed.jsonl"
    lines = [json.dumps(samples[0]), json.dumps(dict(samples[1], source=5))]
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(
        manifest.ManifestError, match=r"typed.jsonl:2: field 'source' must be a string path, got int"
    ):
        manifest.read_manifest(str(path))
    status, _, err = _cli(capsys, "--manifest", path, "--out", tmp_path / "s")
    assert (
        status == 2
        and err == f"sama-build-shards: error: {path}:2: field 'source' must be a string path, got int\n"
    )
    assert not (tmp_path / "s").exists()  # refused before anything was written
    for bad, message in [
        (dict(samples[0], frames="5"), "field 'frames' must be an integer, got str"),
        (dict(samples[0], text=["a"]), "field 'text' must be a string, got list"),
        (dict(samples[0], fps=True), "field 'fps' must be a number, got bool"),
    ]:
        path.write_text(json.dumps(bad) + "\n")
        with pytest.raises(manifest.ManifestError, match=message):
            manifest.read_manifest(str(path))


def test_config_sets_the_length_check(data, tmp_path, capsys):
    """Shards skip what training would skip: data.min_frames, counted at data.fps's stride."""
    from sama_jax import config as config_lib

    root, _, samples = data
    for name in ("stage1_sft", "stage0_pretrain"):
        config = config_lib.load_config_file(os.path.join(REPO, "configs", f"{name}.py"))
        assert config.data.min_frames == shard_builder.MIN_FRAMES  # the command's default is the configs'
    path = _manifest(root, "clips", [s for s in samples if s["kind"] == "t2v"])
    config = os.path.join(REPO, "configs", "stage1_sft.py") + ":tiny"
    status, out, _ = _cli(capsys, f"--config={config}", "--manifest", path, "--out", tmp_path / "a")
    assert status == 0 and "3 of 3 samples" in out  # 5 frames, min_frames 5, stride 1
    # 8 fps clips for a 4 fps model: stride 2 gives 3 of the 5 frames, too few.
    status, out, _ = _cli(
        capsys, f"--config={config}", "--config.data.fps=4", "--manifest", path, "--out", tmp_path / "b"
    )
    assert status == 0 and "0 of 3 samples" in out and "5 frames give 3 at stride 2 from frame 0" in out
    status, out, _ = _cli(
        capsys,
        f"--config={config}",
        "--config.data.fps=4",
        "--min-frames",
        3,
        "--manifest",
        path,
        "--out",
        tmp_path / "c",
    )
    assert "3 of 3 samples" in out  # an explicit --min-frames wins over the config
    assert json.load(open(tmp_path / "c" / shard_builder.INDEX))["features"] == []
    # start_frame counts too (OpenVE's 4 dropped frames); a negative one is the pipeline's bad_record.
    clips = [s for s in samples if s["kind"] == "t2v"]
    path = _manifest(
        root,
        "starts",
        [dict(clips[0], start_frame=0), dict(clips[1], start_frame=3), dict(clips[2], start_frame=-2)],
    )
    status, out, _ = _cli(capsys, "--manifest", path, "--out", tmp_path / "e", "--min-frames", 3)
    assert status == 0 and "1 of 3 samples" in out and "{'too_short': 1, 'bad_record': 1}" in out
    assert "5 frames give 2 at stride 1 from frame 3, fewer than min_frames=3" in out
    status, _, _ = _cli(
        capsys,
        f"--config={config}",
        "--config.data.features=('text',)",
        "--manifest",
        path,
        "--out",
        tmp_path / "d",
    )
    assert status == 0 and json.load(open(tmp_path / "d" / shard_builder.INDEX))["features"] == ["text"]


def test_clear_errors_are_one_line(data, tmp_path, capsys):
    _, path, _ = data
    cases = [
        (["--manifest", tmp_path / "none.jsonl"], "none.jsonl: manifest file does not exist"),
        (["--manifest", path, "--samples-per-shard", 0], "samples_per_shard must be >= 1, got 0"),
        (["--manifest", path, "--name", "My-Set"], "--name 'My-Set' is not a dataset name"),
        (["--manifest", path, "--features", "txt"], "unknown features ['txt']"),
        (["--manifest", path, "--config=configs/nowhere.py"], "config file not found: configs/nowhere.py"),
    ]
    for argv, message in cases:
        status, _, err = _cli(capsys, *argv, "--out", tmp_path / "s")
        assert (
            status == 2
            and err.startswith("sama-build-shards: error: ")
            and message in err
            and err.count("\n") == 1
        )
    assert not (tmp_path / "s").exists()
    # A live builder holds the lock: a second one names its pid and leaves the directory alone.
    lock = shard_builder.lock_out_dir(str(tmp_path / "s"))
    lock.write(str(os.getpid()))
    lock.flush()
    try:
        status, _, err = _cli(capsys, "--manifest", path, "--out", tmp_path / "s")
    finally:
        lock.close()
    assert status == 2 and f"is being built by pid {os.getpid()}" in err
    status, out, err = _cli(capsys, "--manifest", path, "--out", tmp_path / "s")
    assert status == 0 and "10 of 10 samples" in out and "10/10 samples" in err and "ETA 0s" in err


def _children(pid):
    import psutil

    try:
        return psutil.Process(pid).children(recursive=True)
    except psutil.NoSuchProcess:
        return []


def test_kill_9_takes_the_workers_along(data, tmp_path):
    """kill -9 of a two-worker build mid-way: no worker survives, and a rerun finishes the same shards."""
    import psutil

    root, _, samples = data
    many = [dict(s, id=f"{s['id']}_{k}") for k in range(6) for s in samples]  # 60 samples, 30 shards
    path = _manifest(root, "many", many)
    out = tmp_path / "s"
    command = [
        sys.executable,
        "-m",
        "sama_jax.data.build_shards",
        "--manifest",
        path,
        "--out",
        str(out),
        "--samples-per-shard",
        "2",
        "--workers",
        "2",
    ]
    env = dict(os.environ, PYTHONPATH=REPO)
    builder = subprocess.Popen(
        command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True
    )
    workers = []
    try:
        deadline = time.monotonic() + 120
        while not any(f.endswith("-of-00030.json") for f in (os.listdir(out) if out.exists() else [])):
            assert builder.poll() is None and time.monotonic() < deadline, "the build never started a shard"
            time.sleep(0.01)
        os.killpg(builder.pid, signal.SIGSTOP)  # freeze it mid-build, so the kill lands mid-build
        workers = _children(builder.pid)
        assert len(workers) >= 2 and not (out / shard_builder.INDEX).exists()
        os.kill(builder.pid, signal.SIGKILL)
        builder.wait()
        os.killpg(builder.pid, signal.SIGCONT)  # whatever is left runs on, as after a plain kill -9
        gone, alive = psutil.wait_procs(workers, timeout=10)
        assert alive == [], f"workers outlived the builder: {alive}"
    finally:  # a failing run must not leave its processes behind either
        if builder.poll() is None:
            builder.kill()
        builder.wait()
        for process in workers:
            try:
                process.kill()
            except psutil.NoSuchProcess:
                pass
    rerun = subprocess.run(command, env=env, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-2000:]
    assert "resuming an unfinished build" in rerun.stderr
    assert not [f for f in os.listdir(out) if f.endswith(".tmp")]
    index = json.load(open(out / shard_builder.INDEX))
    fresh = shard_builder.build_shards(path, str(tmp_path / "fresh"), samples_per_shard=2)
    assert index["shards"] == fresh["shards"] and index["records"] == fresh["records"]
    for shard in fresh["shards"]:
        assert open(out / shard, "rb").read() == open(tmp_path / "fresh" / shard, "rb").read()
