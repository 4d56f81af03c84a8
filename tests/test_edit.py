"""sama-edit and the Editor on a tiny random model: mp4 in -> mp4 out, and every bad input."""

import dataclasses
import json
import os

import numpy as np
import pytest
from flax import nnx
from model_helpers import SOURCE_FPS, moving_square

from sama_jax import edit, inference
from sama_jax.data import video_io


@pytest.fixture(scope="module")
def ckpt(tiny_models):
    return tiny_models


def test_mp4_in_mp4_out(ckpt, tmp_path, capsys):
    root, models = ckpt
    out = tmp_path / "out"
    rc = edit.main(
        [
            "--src-video",
            str(root / "clip.mp4"),
            "--prompt",
            "Make the square red.",
            "--output-dir",
            str(out),
            "--prompt-prefix",
        ]
        + models
    )
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert "denoising step 3/3" in printed and "ETA" in printed
    info = video_io.video_info(str(out / "clip.mp4"))
    # 64x48 source, 64x32-pixel budget -> the 64x32 bucket; 3 frames (5 in the model, trimmed).
    assert (info["frames"], info["height"], info["width"]) == (3, 32, 64)
    assert abs(info["fps"] - SOURCE_FPS) < 1e-6
    compare = video_io.video_info(str(out / "clip.compare.mp4"))
    assert (compare["frames"], compare["height"], compare["width"]) == (3, 32, 128)
    sheet = video_io.decode_image(str(out / "clip.sheet.png"))
    assert sheet.shape == (64, 3 * 64, 3)
    side = json.loads((out / "clip.json").read_text())
    # The tiny models' text encoder takes fewer tokens than this prompt has: the model saw its start.
    assert "[Video edit] Make the square red.".startswith(side["model_prompt"]) and side["model_prompt"]
    assert side["negative_prompt"] == "[Video edit]" and side["seed"] == 1
    assert side["frames"] == {"source": 3, "used": 3, "model": 5, "output": 3}
    assert side["settings"]["steps"] == 3 and side["settings"]["prompt_prefix"] == "[Video edit] "
    assert set(side["checkpoints"]) == {"dit", "vae", "text_encoder", "tokenizer"}
    assert side["timings"]["total"] > 0
    print(
        f"\ntiny preset: {side['timings']['total']:.2f} s per edit (first, with compilation), "
        f"stages {side['timings']}"
    )
    assert sorted(os.listdir(out)) == ["clip.compare.mp4", "clip.json", "clip.mp4", "clip.sheet.png"]


def test_list_file_and_padding_kept(ckpt, tmp_path, capsys):
    root, models = ckpt
    listing = tmp_path / "cases.tsv"
    listing.write_text(f"{root / 'long.mp4'}\tRemove the square.\n# a comment\n{root / 'other.mp4'}\n")
    out = tmp_path / "out"
    rc = edit.main(
        [
            "--list",
            str(listing),
            "--prompt",
            "Make the square red.",
            "--output-dir",
            str(out),
            "--keep-padding",
            "--max-frames",
            "4",
            "--seed",
            "3",
        ]
        + models
    )
    assert rc == 0, capsys.readouterr().err
    printed = capsys.readouterr().out
    assert printed.count("models loaded") == 1 and "ETA" in printed
    # long: 10 frames, max 4 -> 4 kept, padded to 5 and kept; other: 4 of its 5 frames, padded to 5.
    assert video_io.video_info(str(out / "long.mp4"))["frames"] == 5
    assert video_io.video_info(str(out / "other.mp4"))["frames"] == 5
    side = json.loads((out / "other.json").read_text())
    assert side["prompt"] == "Make the square red." and side["negative_prompt"] == ""
    assert side["frames"] == {"source": 5, "used": 4, "model": 5, "output": 5}
    assert json.loads((out / "long.json").read_text())["prompt"] == "Remove the square."


@pytest.fixture(scope="module")
def editor(ckpt):
    root, _ = ckpt
    return inference.Editor.from_checkpoints(
        str(root / "dit"),
        str(root / "vae"),
        str(root / "umt5"),
        str(root / "tok"),
        precision={"compute_dtype": "float32"},
    )


def test_seeded_edits_reproduce(editor):
    frames = moving_square(5)
    settings = inference.EditSettings(steps=3, height=32, width=64, exact_size=True, seed=7)
    a = editor.edit(frames, "Make the square red.", settings)
    b = editor.edit(frames, "Make the square red.", settings)
    c = editor.edit(frames, "Make the square red.", dataclasses.replace(settings, seed=8))
    assert a.frames.shape == (5, 32, 64, 3) and a.model_frames == 5
    np.testing.assert_array_equal(a.frames, b.frames)
    assert np.abs(a.frames.astype(int) - c.frames).max() > 0
    # Three edits, three steps each: one compilation of the denoising loop (shared with the
    # commands above, which ran the same model structure and shapes).
    assert editor._denoiser(settings).traces == 1


def run_error(args, capsys):
    rc = edit.main(args)
    return rc, capsys.readouterr().err


def test_bad_inputs_are_named_before_any_model_loads(ckpt, tmp_path, capsys):
    root, models = ckpt
    out = tmp_path / "out"
    base = ["--prompt", "Make the square red.", "--output-dir", str(out)]
    (tmp_path / "corrupt.mp4").write_bytes(os.urandom(2000))
    (tmp_path / "empty.mp4").write_bytes(b"")
    (tmp_path / "clip.gif").write_bytes(b"GIF89a")
    cases = [
        (["--src-video", str(tmp_path / "corrupt.mp4")] + models, "corrupt.mp4: cannot read video header"),
        (["--src-video", str(tmp_path / "empty.mp4")] + models, "empty.mp4: empty file"),
        (["--src-video", str(tmp_path / "missing.mp4")] + models, "missing.mp4: file does not exist"),
        (["--src-video", str(tmp_path / "clip.gif")] + models, "unsupported extension '.gif'"),
        (
            ["--src-video", str(root / "clip.mp4"), "--exact-size", "--height", "30", "--width", "50"]
            + models[:8],
            "50x30 (w x h) does not fit the model",
        ),
        (
            ["--src-video", str(root / "clip.mp4")]
            + models[:2]
            + models[4:]
            + ["--vae", str(tmp_path / "novae")],
            "--vae " + str(tmp_path / "novae") + ": does not exist",
        ),
        (["--src-video", str(root / "clip.mp4")] + models[2:], "--dit not given"),
        (["--src-video", str(root / "clip.mp4"), "--steps", "0"] + models[:8], "--steps must be >= 1"),
    ]
    for args, message in cases:
        rc, err = run_error(base + args, capsys)
        assert rc == 2 and message in err, (message, err)
        assert not out.exists() or not os.listdir(out)
    # An --output-dir that is a file is named with the rest, before the models load.
    afile = tmp_path / "afile"
    afile.write_text("")
    args = ["--prompt", "p", "--output-dir", str(afile), "--src-video", str(root / "clip.mp4")] + models
    rc, err = run_error(args, capsys)
    assert rc == 2 and f"--output-dir {afile} is a file, not a folder" in err, err
    rc, err = run_error(args[:3] + [str(afile / "sub")] + args[4:], capsys)
    assert rc == 2 and f"--output-dir {afile / 'sub'}: {afile} is a file, not a folder" in err, err
    out.mkdir()
    (out / "clip.mp4").write_bytes(b"an earlier result")
    rc, err = run_error(base + ["--src-video", str(root / "clip.mp4")] + models, capsys)
    assert rc == 2 and "clip.mp4 exists: pass --overwrite" in err
    assert (out / "clip.mp4").read_bytes() == b"an earlier result"


def test_a_prompt_longer_than_the_text_encoder_takes_is_cut_with_a_warning(ckpt, tmp_path, capsys):
    root, models = ckpt
    prompt = "Make the square red and " + " and ".join(["then blue"] * 40) + "."
    out = tmp_path / "out"
    rc = edit.main(
        ["--src-video", str(root / "clip.mp4"), "--prompt", prompt, "--output-dir", str(out)] + models
    )
    err = capsys.readouterr().err
    assert rc == 0, err
    warning = [line for line in err.splitlines() if "warning: the prompt is" in line]
    assert len(warning) == 1, err
    total = int(warning[0].split("the prompt is ")[1].split(" tokens")[0])
    kept = int(warning[0].split("the text encoder takes ")[1].split(":")[0])
    assert kept < total and f"the model sees its first {kept} tokens, ending" in warning[0]
    # The sidecar keeps the whole prompt and records the part the model saw.
    side = json.loads((out / "clip.json").read_text())
    assert side["prompt"] == prompt
    assert prompt.startswith(side["model_prompt"]) and 0 < len(side["model_prompt"]) < len(prompt) / 2


def test_a_failed_edit_leaves_no_partial_output(ckpt, tmp_path, capsys, monkeypatch):
    root, models = ckpt
    out = tmp_path / "out"

    def broken(path, frame):
        raise video_io.MediaError(f"{path}: disk full", "invalid")

    monkeypatch.setattr(video_io, "write_image", broken)
    rc = edit.main(
        ["--src-video", str(root / "other.mp4"), "--prompt", "Make the square red.", "--output-dir", str(out)]
        + models
    )
    assert rc == 1 and "disk full" in capsys.readouterr().err
    assert os.listdir(out) == []


def test_run_directory_that_is_not_a_run_is_named_before_models_load(ckpt, tmp_path, capsys):
    root, models = ckpt
    run = tmp_path / "run"
    run.mkdir()
    args = ["--src-video", str(root / "clip.mp4"), "--prompt", "p", "--output-dir", str(tmp_path / "out")]
    rc, err = run_error(args + ["--run", str(run)] + models[8:], capsys)
    assert rc == 2 and f"--run {run}: not a sama-train run directory" in err
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_sharded_edit_matches_one_device(ckpt, editor):
    """On 8 devices (data 2 x fsdp 4: the CFG batch split over 'data', parameters over fsdp) the
    edit equals the single-device one."""
    from sama_jax import sharding

    root, _ = ckpt
    mesh = sharding.create_mesh({"ici": {"data": 2, "fsdp": -1}})
    sharded = inference.Editor.from_checkpoints(
        str(root / "dit"),
        str(root / "vae"),
        str(root / "umt5"),
        str(root / "tok"),
        mesh=mesh,
        rules=(("batch", "data"),) + sharding.DEFAULT_RULES,
        precision={"compute_dtype": "float32"},
    )
    settings = inference.EditSettings(steps=3, height=32, width=64, exact_size=True, seed=7)
    frames = moving_square(5)
    a = editor.edit(frames, "Make the square red.", settings)
    b = sharded.edit(frames, "Make the square red.", settings)
    assert np.abs(a.frames.astype(int) - b.frames).max() <= 1


def test_settings_from_a_run_config():
    from sama_jax import config as config_lib

    spec = os.path.join(os.path.dirname(__file__), "..", "configs", "stage1_sft.py") + ":tiny"
    config = config_lib.build_config(spec, [])
    settings = inference.settings_from_config(config, height=64, width=64, exact_size=True)
    assert (settings.steps, settings.guidance, settings.shift, settings.sampler) == (
        config.eval.num_steps,
        config.eval.guidance,
        config.eval.shift,
        config.eval.sampler,
    )
    assert settings.prompt_prefix == "[Video edit] " and settings.semantic_tokens == 5  # tiny: 2x2 + 1
    assert settings.output_size(48, 80) == (64, 64)


def test_the_editors_loop_is_the_released_loop_written_out(editor):
    """The compiled loop around the DiT (doubled CFG batch, source latents and semantic state in
    both passes) against the released pipeline's loop written out by hand, one DiT call per pass."""
    import jax.numpy as jnp
    import ml_dtypes

    from sama_jax import sampling

    rng = np.random.default_rng(0)
    normal = lambda *shape: rng.standard_normal(shape).astype(np.float32)
    noise, source, sem = normal(1, 2, 4, 8, 16), normal(1, 2, 4, 8, 16), normal(1, 65, 32)
    text_pos, text_neg = normal(1, 16, 32), normal(1, 16, 32)
    steps, g = 3, 5.0
    den = editor._denoiser(inference.EditSettings(steps=steps))
    _, state = nnx.split(editor.dit)
    carry = den.run(
        state,
        den.init(jnp.asarray(noise), jnp.asarray(sem)),
        {"text": text_pos, "source": source},
        {"text": text_neg, "source": source},
        sampling.make_schedule("euler", steps, 5.0),
        g,
    )
    x, s = den.output(carry)

    call = nnx.jit(lambda m, *a: m(*a))
    sigmas = np.linspace(1, 0, steps + 1)
    sigmas = np.append(5 * sigmas[:-1] / (1 + 4 * sigmas[:-1]), 0.0)
    hx, hs = noise, sem
    for i in range(steps):
        t = np.array([1000 * sigmas[i]], np.float32).astype(ml_dtypes.bfloat16).astype(np.float32)
        vc, vsc = call(editor.dit, hx, t, text_pos, source, hs)
        vu, vsu = call(editor.dit, hx, t, text_neg, source, hs)
        dt = sigmas[i + 1] - sigmas[i]
        hx = hx + np.asarray(vu + g * (vc - vu)) * dt
        hs = hs + np.asarray(vsu + g * (vsc - vsu)) * dt
    np.testing.assert_allclose(x, hx, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(s, hs, rtol=1e-4, atol=1e-4)
    assert np.abs(np.asarray(x) - noise).max() > 0.1


def test_ctrl_c_during_an_edit_is_one_line_and_leaves_nothing(ckpt, tmp_path):
    import signal
    import subprocess
    import sys
    import time

    root, models = ckpt
    out, log = tmp_path / "out", tmp_path / "log.txt"
    # Unbuffered: "models loaded" reaches the log when it is printed, not at exit (on a quiet
    # machine with a warm compilation cache a short edit is over before a buffered line shows).
    env = dict(
        os.environ,
        PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""),
        PYTHONUNBUFFERED="1",
    )
    argv = ["--src-video", str(root / "clip.mp4"), "--prompt", "p", "--output-dir", str(out)]
    with open(log, "w") as f:
        proc = subprocess.Popen(
            [sys.executable, "-m", "sama_jax.edit", *argv, *models, "--steps", "400"],
            env=env,
            stdout=f,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    while "models loaded" not in log.read_text():
        assert proc.poll() is None, log.read_text()
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    assert proc.wait(timeout=120) == 130
    text = log.read_text()
    assert text.splitlines()[-1] == "sama-edit: interrupted" and "Traceback" not in text, text
    assert not out.exists() or os.listdir(out) == []
