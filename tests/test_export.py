"""sama-export with a stand-in editor: each benchmark's layout read back as its scorer reads it,
resume, failures, two processes, scores, and the command's one-line errors."""

import csv
import json
import math
import os
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from sama_jax import benchmarks_io, export, export_records, export_report
from sama_jax.data import synthetic, video_io

SETTINGS = {"steps": 2, "sampler": "euler", "guidance": 5.0}
IDENTITY = {"dit": {"path": "/ckpt/dit", "sha256": "abc"}}


class StandInEditor:
    """The editor contract: edit(frames, instruction, *, seed) -> uint8 frames. Here: the frames at
    half size, colours inverted, one frame fewer (so the exporter's fitting is exercised)."""

    def __init__(self, oracle=None):
        self.calls = []
        self.oracle = oracle  # {instruction: frames}: return these instead

    def edit(self, frames, instruction, *, seed):
        self.calls.append(instruction)
        if self.oracle is not None:
            return self.oracle[instruction]
        return np.ascontiguousarray(255 - frames[: max(1, len(frames) - 1), ::2, ::2])


@pytest.fixture(scope="module")
def synthetic_set(tmp_path_factory):
    root = tmp_path_factory.mktemp("syn")
    synthetic.generate(
        str(root), seed=0, video_edits=5, image_edits=0, clips=0, frames=5, height=32, width=48
    )
    return root


def _run(cases, editor, out, benchmark="manifest", settings=SETTINGS, **kw):
    return export.run_export(
        cases,
        editor,
        str(out),
        benchmark=benchmark,
        seed=1,
        settings=settings,
        identity=IDENTITY,
        log=lambda line: None,
        **kw,
    )


def _manifest_cases(root, n=5):
    return benchmarks_io.read_cases("manifest", str(root / "video_edits.jsonl"))[:n]


def test_openve_layout_reads_back_as_its_scorer_reads_it(synthetic_set, tmp_path):
    csv_path = tmp_path / "benchmark_videos.csv"
    with open(csv_path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["original_video", "prompt", "edited_type"])
        w.writerow(["videos/synvid_000000_src.mp4", "Make it red.", "local_change"])
        w.writerow(["videos/synvid_000001_src.mp4", "Remove the square, please.", "local_remove"])
    cases = benchmarks_io.read_cases("openve", str(csv_path), str(synthetic_set))
    out = tmp_path / "out"
    summary = _run(cases, StandInEditor(), out, benchmark="openve")
    assert (summary["done"], summary["failed"], summary["run"]["done"]) == (2, 0, 2)
    # The scorer: for each benchmark row, <save_dir>/<basename>.replace(".mp4", "_edited.mp4").
    with open(csv_path) as f:
        for row in csv.DictReader(f):
            edited = out / os.path.basename(row["original_video"]).replace(".mp4", "_edited.mp4")
            assert video_io.video_info(str(edited))["frames"] == 4
    with open(out / "edited_results.csv") as f:
        reader = csv.DictReader(f)
        assert reader.fieldnames == ["edited_type", "prompt", "original_video", "edited_result_path"]
        rows = list(reader)
    assert [r["edited_type"] for r in rows] == ["local_change", "local_remove"]
    assert rows[1]["prompt"] == "Remove the square, please."
    assert all(os.path.isfile(r["edited_result_path"]) for r in rows)


def test_reco_layout_keeps_frame_count_and_height(synthetic_set, tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "add.txt").write_text(
        "synvid_000000_src.mp4: Add a red circle, on the left.\n\nsynvid_000001_src.mp4: Add text: hello.\n"
    )
    (configs / "style.txt").write_text("synvid_000002_src.mp4: Make it look like a watercolor.\n")
    cases = benchmarks_io.read_cases("reco", str(configs), str(synthetic_set / "videos"))
    out = tmp_path / "out"
    assert _run(cases, StandInEditor(), out, benchmark="reco")["done"] == 3
    for task, video, instruction in [
        ("add", "synvid_000000_src.mp4", "Add a red circle, on the left."),
        ("add", "synvid_000001_src.mp4", "Add text: hello."),
        ("style", "synvid_000002_src.mp4", "Make it look like a watercolor."),
    ]:
        p = instruction.replace(" ", "_").replace(".", "").replace(",", "").replace(":", " ")[:80]
        edited = out / task / f"{video[:-4]}_{p}.mp4"
        source = video_io.video_info(str(synthetic_set / "videos" / video))
        info = video_io.video_info(str(edited))
        # The stand-in returns 4 frames at half size: the exporter restores 5 frames of height 32.
        assert (info["frames"], info["height"]) == (source["frames"], source["height"])
    assert not (out / "edited_results.csv").exists()


def test_vie_columns_are_configurable_and_named_when_missing(synthetic_set, tmp_path):
    cases_path = tmp_path / "vie.json"
    cases_path.write_text(
        json.dumps(
            [
                {
                    "uid": "swap_01",
                    "src": "videos/synvid_000000_src.mp4",
                    "instruction": "Swap it.",
                    "cat": "swap",
                },
                {
                    "uid": "add_02",
                    "src": "videos/synvid_000001_src.mp4",
                    "instruction": "Add one.",
                    "cat": "add",
                },
            ]
        )
    )
    with pytest.raises(
        benchmarks_io.BenchmarkError, match="columns found: 'uid', 'src', 'instruction', 'cat'"
    ):
        benchmarks_io.read_cases("vie", str(cases_path), str(synthetic_set))
    columns = benchmarks_io.parse_columns("video=src,prompt=instruction,type=cat,id=uid")
    cases = benchmarks_io.read_cases("vie", str(cases_path), str(synthetic_set), columns)
    out = tmp_path / "out"
    assert _run(cases, StandInEditor(), out, benchmark="vie")["done"] == 2
    with open(out / "edited_results.csv") as f:
        rows = list(csv.DictReader(f))
    assert [r["uid"] for r in rows] == ["swap_01", "add_02"]
    assert rows[0]["edited_result_path"].endswith("swap_01.mp4") and os.path.isfile(
        rows[0]["edited_result_path"]
    )


def test_manifest_scores_per_case_and_per_edit_type(synthetic_set, tmp_path):
    cases = _manifest_cases(synthetic_set)
    targets = {c.instruction: video_io.decode_video(c.target) for c in cases}
    out = tmp_path / "oracle"
    _run(cases, StandInEditor(oracle=targets), out)
    table = json.loads((out / "scores.json").read_text())
    types = {c.edit_type for c in cases}
    assert set(table["per_edit_type"]) == types | {"all"}
    assert table["per_edit_type"]["all"]["cases"] == len(cases)
    for row in table["per_case"].values():  # the exact target: perfect inside and outside
        assert row["psnr_in"] == math.inf and row["ssim_out"] == 1.0
    records = [json.loads(line) for line in (out / "records.jsonl").read_text().splitlines()]
    assert [r["case_id"] for r in records] == [c.case_id for c in cases]
    r = records[0]
    assert r["status"] == "done" and r["seed"] == 1 and r["settings"] == SETTINGS
    assert r["identity"] == IDENTITY and r["instruction"] == cases[0].instruction
    assert {"decode", "edit", "write", "total"} <= set(r["timings"])
    # The preview: rows source | ground truth | edit at the edit's size.
    sheet = video_io.decode_image(str(out / r["preview"]))
    assert sheet.shape[0] == 3 * 32
    assert "psnr_in" in (out / "report.html").read_text()
    # Copying the source back ("no edit") preserves everything and follows nothing.
    copy = {c.instruction: video_io.decode_video(c.source) for c in cases}
    _run(cases, StandInEditor(oracle=copy), tmp_path / "copy")
    copied = json.loads((tmp_path / "copy" / "scores.json").read_text())["per_edit_type"]["all"]
    # Outside the region source and target differ only by H.264 noise (about 40 dB).
    assert copied["psnr_out"] > 35 and copied["psnr_in"] < 30


def test_resume_skips_finished_and_redoes_half_written(synthetic_set, tmp_path):
    cases = _manifest_cases(synthetic_set, 4)
    out = tmp_path / "out"
    first = StandInEditor()
    assert _run(cases, first, out)["done"] == 4
    # Case 1's output cut short (as if killed while copied); case 2's record lost after its output
    # was renamed into place (killed between the two); a stray temporary file of case 3.
    half = out / cases[1].output
    half.write_bytes(half.read_bytes()[: half.stat().st_size // 2])
    records = out / "records" / "process-00000-of-00001.jsonl"
    lines = [
        line for line in records.read_text().splitlines() if json.loads(line)["case_id"] != cases[2].case_id
    ]
    records.write_text("\n".join(lines) + "\n" + '{"case_id": "torn')
    (out / (cases[3].output + ".tmp.mp4")).write_bytes(b"partial")
    again = StandInEditor()
    summary = _run(cases, again, out)
    assert sorted(again.calls) == sorted([cases[1].instruction, cases[2].instruction])
    assert (summary["done"], summary["skipped"], summary["failed"]) == (2, 2, 0)
    assert all(
        export_records.is_finished(r, str(out)) for r in export_records.load_records(str(out)).values()
    )
    third = StandInEditor()
    assert _run(cases, third, out)["skipped"] == 4 and third.calls == []


def test_corrupt_input_is_recorded_and_the_run_goes_on(synthetic_set, tmp_path):
    cases = _manifest_cases(synthetic_set, 3)
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42" + os.urandom(2000))
    cases[1].source = str(bad)
    cases[1].media_root = os.path.commonpath([tmp_path, synthetic_set])  # source and target inside it
    out = tmp_path / "out"
    summary = _run(cases, StandInEditor(), out)
    assert (summary["done"], summary["failed"]) == (2, 1)
    record = export_records.load_records(str(out))[cases[1].case_id]
    assert record["status"] == "failed" and record["reason"] == "corrupt" and "broken.mp4" in record["error"]
    run = json.loads((out / "summary.json").read_text())
    assert (run["done"], run["failed"], run["failure_reasons"]) == (2, 1, {"corrupt": 1})
    # A rerun retries the failed case only (it fails again before reaching the editor).
    again = _run(cases, StandInEditor(), out)
    assert (again["done"], again["skipped"], again["failed"]) == (0, 2, 1)


def test_other_settings_into_the_same_out_are_refused(synthetic_set, tmp_path):
    cases = _manifest_cases(synthetic_set, 1)
    _run(cases, StandInEditor(), tmp_path)
    with pytest.raises(FileExistsError, match="steps 2, now 4"):
        _run(cases, StandInEditor(), tmp_path, settings=dict(SETTINGS, steps=4))


WORKER = textwrap.dedent("""
    import sys
    import numpy as np
    from sama_jax import benchmarks_io, export

    class Editor:
        def edit(self, frames, instruction, *, seed):
            return np.ascontiguousarray(255 - frames)

    manifest, out, index = sys.argv[1], sys.argv[2], int(sys.argv[3])
    cases = benchmarks_io.read_cases("manifest", manifest)
    summary = export.run_export(cases, Editor(), out, benchmark="manifest", seed=1, settings={},
                                identity={}, process_index=index, process_count=2, log=print)
    print("DONE", summary["done"])
""")


def test_two_processes_split_the_cases(synthetic_set, tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, str(synthetic_set / "video_edits.jsonl"), str(out), str(i)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for i in range(2)
    ]
    logs = [p.communicate(timeout=120)[0] for p in procs]
    assert all(p.returncode == 0 for p in procs), logs
    assert "DONE 3" in logs[0] and "DONE 2" in logs[1]
    lines = [
        json.loads(line)
        for path in sorted((out / "records").iterdir())
        for line in path.read_text().splitlines()
    ]
    ids = [r["case_id"] for r in lines]
    cases = _manifest_cases(synthetic_set)
    assert sorted(ids) == sorted(c.case_id for c in cases)  # none missing, none doubled
    assert all(r["status"] == "done" for r in lines)
    assert len((out / "records.jsonl").read_text().splitlines()) == 5  # whichever finished last
    assert json.loads((out / "summary.json").read_text())["done"] == 5


def test_command_errors_are_one_line_before_models_load(synthetic_set, tmp_path, capsys):
    cases = tmp_path / "vie.csv"
    cases.write_text("clip,text\nvideos/synvid_000000_src.mp4,Do it.\n")
    argv = [
        "--benchmark",
        "vie",
        "--cases",
        str(cases),
        "--media-root",
        str(synthetic_set),
        "--out",
        str(tmp_path / "out"),
        "--preset",
        "tiny",
    ]
    assert export.main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("sama-export: error:") and "columns found: 'clip', 'text'" in err
    assert len(err.splitlines()) == 1
    assert (
        export.main(
            argv[:-4]
            + [
                "--vie-columns",
                "video=clip,prompt=text",
                "--media-root",
                str(tmp_path),
                "--out",
                str(tmp_path / "out"),
                "--preset",
                "tiny",
            ]
        )
        == 2
    )
    assert "check --media-root" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_editor_adapter_passes_each_case_seed_and_keeps_the_settings():
    import dataclasses

    @dataclasses.dataclass(frozen=True)
    class Settings:
        steps: int = 3
        seed: int = 1

    class Editor:  # the Editor's signature: edit(frames, prompt, settings, progress) -> EditResult
        identities = {"dit": {"sha256": "x"}}

        def edit(self, frames, prompt, settings, progress):
            self.got = (prompt, settings)
            return type("Result", (), dict(frames=frames, timings={"denoise": 0.5}))()

    editor = Editor()
    adapter = export.EditorAdapter(editor, Settings(), log=lambda line: None)
    assert adapter.settings == {"steps": 3, "seed": 1} and adapter.identity == editor.identities
    frames = np.zeros((1, 16, 16, 3), np.uint8)
    result = adapter.edit(frames, "Do it.", seed=7)
    assert editor.got == ("Do it.", Settings(steps=3, seed=7))
    assert export._edit_frames(result)[1] == {"denoise": 0.5}


@pytest.fixture(scope="module")
def ckpt(tiny_models):
    return tiny_models


@pytest.mark.slow
def test_command_end_to_end_with_checkpoints_and_resume(ckpt, tmp_path, capsys):
    """sama-export on ReCo-style cases with the tiny random checkpoints of test_edit: the judge's
    frame count and height, the checkpoint identity in every record, and a rerun that edits nothing."""
    root, models = ckpt
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "add.txt").write_text("clip.mp4: Make the square red.\nother.mp4: Remove the square.\n")
    argv = [
        "--benchmark",
        "reco",
        "--cases",
        str(configs),
        "--media-root",
        str(root),
        "--out",
        str(tmp_path / "out"),
        "--prompt-prefix",
    ] + models
    assert export.main(argv) == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "2 done, 0 skipped, 0 failed of 2" in printed and "cases/min" in printed
    for video, name in [("clip", "Make_the_square_red"), ("other", "Remove_the_square")]:
        info = video_io.video_info(str(tmp_path / "out" / "add" / f"{video}_{name}.mp4"))
        source = video_io.video_info(str(root / f"{video}.mp4"))
        # The edit is 64x32 (the bucket); the judge needs the source's 48 rows and frame count.
        assert (info["frames"], info["height"]) == (source["frames"], source["height"])
    records = export_records.load_records(str(tmp_path / "out"))
    assert {r["identity"]["dit"]["sha256"] for r in records.values()} == {inference_fingerprint(root / "dit")}
    assert all(r["settings"]["prompt_prefix"] == "[Video edit] " for r in records.values())
    assert export.main(argv) == 0
    assert "0 done, 2 skipped, 0 failed of 2" in capsys.readouterr().out


def inference_fingerprint(path):
    from sama_jax import inference

    return inference.fingerprint(str(path))["sha256"]


# ----------------------------------------------------------------------------- the command's safety
# sama-export's CLI with the stand-in editor in place of the models (export.build_editor), so these
# run the real argument handling, case reading, loop and report in well under a second per case.

STAND_IN = textwrap.dedent("""
    import dataclasses, sys, time
    import numpy as np
    from sama_jax import export

    class Editor:
        identity = {}

        def __init__(self, settings):
            self.settings = dataclasses.asdict(settings)  # as the real adapter records them

        def edit(self, frames, instruction, *, seed):
            time.sleep(float(sys.argv[1]))
            return np.ascontiguousarray(255 - frames)

    export.build_editor = lambda args, settings, log: Editor(settings)
    sys.exit(export.main(sys.argv[2:]))
""")


def _export_command(*argv, delay=0.0, **popen):
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    return subprocess.Popen(
        [sys.executable, "-c", STAND_IN, str(delay), *map(str, argv)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **popen,
    )


def _reco_argv(configs, media, out, *extra):
    return ["--benchmark", "reco", "--cases", configs, "--media-root", media, "--out", out]


def test_sources_outside_the_media_root_fail_with_a_reason(synthetic_set, tmp_path):
    """A downloaded case list cannot make sama-export read files outside --media-root: absolute
    paths, '..' and symlinks out are failed cases (reason outside_media_root), unless asked."""
    media, elsewhere = tmp_path / "media", tmp_path / "elsewhere"
    media.mkdir()
    elsewhere.mkdir()
    video = synthetic_set / "videos" / "synvid_000000_src.mp4"
    (media / "clip.mp4").write_bytes(video.read_bytes())
    (elsewhere / "secret.mp4").write_bytes(video.read_bytes())
    (media / "link.mp4").symlink_to(elsewhere / "secret.mp4")
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "add.txt").write_text(
        "clip.mp4: Make it red.\n"
        f"{elsewhere / 'secret.mp4'}: Copy it.\n"
        "../elsewhere/secret.mp4: Copy it again.\n"
        "link.mp4: Copy it through a link.\n"
    )
    out = tmp_path / "out"
    proc = _export_command("--preset", "tiny", *_reco_argv(configs, media, out))
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 1, log
    records = export_records.load_records(str(out))
    assert {r["instruction"]: r["status"] for r in records.values()} == {
        "Make it red.": "done",
        "Copy it.": "failed",
        "Copy it again.": "failed",
        "Copy it through a link.": "failed",
    }
    for r in records.values():
        if r["status"] == "failed":
            assert r["reason"] == "outside_media_root" and "outside the media root" in r["error"], r
            assert not (out / r["output"]).exists()
    assert json.loads((out / "summary.json").read_text())["failure_reasons"] == {"outside_media_root": 3}

    proc = _export_command(
        "--preset", "tiny", "--allow-outside-media-root", *_reco_argv(configs, media, tmp_path / "all")
    )
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "4 done, 0 skipped, 0 failed of 4" in log, log


def test_reco_output_names_hold_no_path_separator_and_every_failure_has_a_reason(synthetic_set, tmp_path):
    configs = tmp_path / "configs"
    configs.mkdir()
    (configs / "add.txt").write_text(
        "synvid_000000_src.mp4: make it ../x\nsynvid_000000_src.mp4: make it //x\n"
    )
    out = tmp_path / "out"
    proc = _export_command("--preset", "tiny", *_reco_argv(configs, synthetic_set / "videos", out))
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 0 and "2 done, 0 skipped, 0 failed of 2" in log, log
    assert sorted(os.listdir(out / "add")) == [
        "synvid_000000_src_make_it___x.mp4",
        "synvid_000000_src_make_it__x.mp4",
    ]
    assert f"{configs / 'add.txt'}:1: '/' in the instruction is '_' in the output name" in log
    # Names equal once normalised are refused before any model loads, naming both lines.
    (configs / "add.txt").write_text(
        "synvid_000000_src.mp4: make it a/b\nsynvid_000000_src.mp4: make it a_b\n"
    )
    proc = _export_command(
        "--preset", "tiny", *_reco_argv(configs, synthetic_set / "videos", tmp_path / "o2")
    )
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 2 and log.count("\n") == 1, log
    assert "add.txt:2: case 'add/synvid_000000_src_make_it_a_b.mp4' is also " in log and "add.txt:1" in log
    # A finished case whose output went missing counts as failed, with a reason.
    os.remove(out / "add" / "synvid_000000_src_make_it__x.mp4")
    (configs / "add.txt").write_text(
        "synvid_000000_src.mp4: make it ../x\nsynvid_000000_src.mp4: make it //x\n"
    )
    cases = benchmarks_io.read_cases("reco", str(configs), str(synthetic_set / "videos"))
    summary = export_report.finalize(str(out), "reco", cases)
    assert summary["failed"] == 1 and summary["failure_reasons"] == {"output_missing_or_changed": 1}


def test_ctrl_c_finishes_the_case_in_flight_and_a_rerun_goes_on(synthetic_set, tmp_path):
    import signal

    out = tmp_path / "out"
    argv = [
        "--preset",
        "tiny",
        "--benchmark",
        "manifest",
        "--cases",
        synthetic_set / "video_edits.jsonl",
        "--out",
        out,
    ]
    proc = _export_command(*argv, delay=1.0, start_new_session=True)
    while not (out / "records").is_dir() or not any((out / "records").iterdir()):
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)  # the terminal's Ctrl-C
    log = proc.communicate(timeout=60)[0]
    assert proc.returncode == 130 and "Traceback" not in log, log
    assert "sama-export: SIGINT: finishing the case in flight, then stopping" in log
    assert "stopped by signal SIGINT after" in log and "rerun the same command to continue" in log
    records = export_records.load_records(str(out))
    assert 1 <= len(records) < 5 and all(r["status"] == "done" for r in records.values())
    assert not [f for f in os.listdir(out) if "tmp" in f]
    proc = _export_command(*argv)
    log = proc.communicate(timeout=120)[0]
    assert (
        proc.returncode == 0 and f"{5 - len(records)} done, {len(records)} skipped, 0 failed of 5" in log
    ), log
