"""sama-precompute on a tiny synthetic dataset: layout, values, resume, failures, settings guard."""

import dataclasses
import os

import numpy as np
import pytest
import torch
from flax import nnx
from model_helpers import make_tokenizer_dir, random_params, tiny_hf_siglip_config, tiny_hf_umt5
from transformers import SiglipVisionModel

from convert_wan_weights import cli
from sama_jax import config as config_lib
from sama_jax import params_io, precompute, presets, semantic, text
from sama_jax.data import pipeline, synthetic
from sama_jax.models import load_siglip, load_text_encoder, wan_vae

CONFIG = os.path.join(os.path.dirname(__file__), "..", "configs", "stage1_sft.py") + ":tiny"


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("precompute")
    torch.manual_seed(0)
    make_tokenizer_dir(root / "tok")
    tiny_hf_umt5().save_pretrained(root / "hf_umt5")
    SiglipVisionModel(tiny_hf_siglip_config()).save_pretrained(root / "hf_siglip")
    for kind in ("umt5", "siglip"):
        assert (
            cli.main([str(root / f"hf_{kind}"), str(root / kind), "--kind", kind, "--dtype", "float32"]) == 0
        )
    vae_cfg = wan_vae.WanVAEConfig(**presets.VAE["tiny"])
    params_io.save_params(
        str(root / "vae"),
        random_params(lambda: wan_vae.WanVAE(vae_cfg, rngs=nnx.Rngs(0))),
        wan_vae.KIND,
        dataclasses.asdict(vae_cfg),
    )
    paths = synthetic.generate(
        str(root / "data"), video_edits=2, image_edits=1, clips=1, frames=5, height=32, width=48
    )
    os.remove(root / "data" / "videos" / "synvid_000001_tgt.mp4")  # one broken item
    args = [
        f"--config={CONFIG}",
        "--text-encoder",
        str(root / "umt5"),
        "--tokenizer",
        str(root / "tok"),
        "--siglip",
        str(root / "siglip"),
        "--vae",
        str(root / "vae"),
        "--batch-size",
        "2",
    ]
    for name in ("video_edits", "image_edits", "clips"):
        args += ["--manifest", paths[name]]
    return root, paths, args


def test_writes_every_feature_and_reports_the_broken_item(setup, capsys):
    root, paths, args = setup
    assert precompute.main(args) == 1  # one failed item -> exit status 1
    out = capsys.readouterr().out
    assert "FAILED synvid_000001" in out and "synvid_000001_tgt.mp4" in out

    config, _ = config_lib.load_config([f"--config={CONFIG}"])
    encoder = text.TextEncoder(
        load_text_encoder(str(root / "umt5")),
        text.load_tokenizer(str(root / "tok")),
        config.model.text_encoder.text_len,
    )
    siglip = load_siglip(str(root / "siglip"))
    sem_cfg = semantic.SemanticConfig(**dict(config.model.semantic))
    spec = dataclasses.replace(pipeline.SampleSpec.from_config(config.data, seed=0), pretext=None)
    vae = wan_vae.load_vae(str(root / "vae"))

    for name in ("video_edits", "image_edits", "clips"):
        for record in pipeline.ManifestSource(paths[name]):
            feature = lambda f: precompute.feature_path(paths[name], record["id"], f)
            if record["id"] == "synvid_000001":
                assert not os.path.exists(feature("semantic"))
                assert os.path.exists(feature("text"))  # text needs no media
                continue
            context, length = encoder([config.prompt_prefix + record["text"]])
            stored = np.load(feature("text"))
            assert stored.shape == (length[0], 16)
            np.testing.assert_allclose(stored, np.asarray(context)[0, : length[0]], rtol=1e-6, atol=1e-6)
            assert precompute.pad_text(stored, 16).shape == (16, 16)

            sample = pipeline.prepare_sample(record, 0, spec)
            tokens = np.load(feature("semantic"))
            assert tokens.shape == (sem_cfg.num_tokens, presets.SIGLIP["tiny"]["hidden_size"])
            expected = semantic.semantic_tokens(siglip, sample["target"][None], sem_cfg)[0]
            np.testing.assert_allclose(tokens, np.asarray(expected), rtol=1e-5, atol=1e-5)

            latents = np.load(feature("target_latents"))
            t, h, w = sample["target"].shape[:3]
            assert latents.shape == ((t - 1) // 4 + 1, h // 8, w // 8, 16)
            assert np.isfinite(latents).all() and np.abs(latents).max() > 0
            video = np.asarray(sample["target"], np.float32)[None] * (2 / 255) - 1
            np.testing.assert_allclose(
                latents, np.asarray(wan_vae.encode_video(vae, video))[0], rtol=1e-5, atol=1e-5
            )
            assert os.path.exists(feature("source_latents")) == (record["kind"] != "t2v")


def test_rerun_skips_done_work_and_guards_settings(setup, capsys):
    root, paths, args = setup
    precompute.main(args)
    done = precompute.feature_path(paths["video_edits"], "synvid_000000", "target_latents")
    before = os.stat(done).st_mtime_ns
    capsys.readouterr()
    assert precompute.main(args) == 1  # the broken item still fails ...
    out = capsys.readouterr().out
    # ... and nothing is left to do for the good items.
    assert [line for line in out.splitlines() if "image_edits.jsonl" in line][0].count("written {}") == 1
    assert [line for line in out.splitlines() if "clips.jsonl" in line][0].count("written {}") == 1
    assert os.stat(done).st_mtime_ns == before
    assert not [f for f in os.listdir(os.path.dirname(done)) if ".tmp" in f]

    assert precompute.main(args + ["--prompt-prefix", "[Image edit] "]) == 2  # not config.prompt_prefix
    assert "other settings" in capsys.readouterr().err


def test_feature_path_layout():
    path = precompute.feature_path("/data/set/edits.jsonl", "a/../b", "text")
    assert path == "/data/set/features/edits/text/a%2F..%2Fb.npy"
    assert os.path.basename(precompute.feature_path("m.jsonl", "..", "text")) == "%2E..npy"
    with pytest.raises(ValueError, match="more than text_len"):
        precompute.pad_text(np.zeros((5, 2)), 4)


@pytest.mark.slow
def test_ctrl_c_writes_the_item_in_flight_stops_and_a_rerun_goes_on(setup, tmp_path):
    """The command as a terminal runs it: Ctrl-C to its process group stops it after the item in
    flight (status 130, one line, no traceback, no .tmp file); the rerun finishes the rest."""
    import signal
    import subprocess
    import sys
    import time

    root, _, args = setup
    data = synthetic.generate(
        str(tmp_path / "data"), video_edits=16, image_edits=0, clips=0, frames=5, height=32, width=48
    )
    manifest = data["video_edits"]
    argv = [sys.executable, "-m", "sama_jax.precompute", f"--config={CONFIG}", "--vae", str(root / "vae")]
    argv += ["--manifest", manifest]
    folder = os.path.dirname(precompute.feature_path(manifest, "x", "target_latents"))
    env = dict(os.environ, PYTHONPATH=os.getcwd() + os.pathsep + os.environ.get("PYTHONPATH", ""))
    proc = subprocess.Popen(
        argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    while not os.path.isdir(folder) or not [f for f in os.listdir(folder) if f.endswith(".npy")]:
        assert proc.poll() is None, proc.communicate()[0]
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGINT)
    log = proc.communicate(timeout=120)[0]
    assert proc.returncode == 130 and "Traceback" not in log, log
    assert "sama-precompute: SIGINT: writing the batch in flight, then stopping" in log
    assert "sama-precompute: stopped by signal SIGINT" in log
    written = [f for f in os.listdir(folder) if f.endswith(".npy")]
    assert 1 <= len(written) < 16 and not [f for f in os.listdir(folder) if ".tmp" in f]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert len([f for f in os.listdir(folder) if f.endswith(".npy")]) == 16
