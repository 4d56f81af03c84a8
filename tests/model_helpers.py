"""Tiny random models, tokenizers and videos shared by the model and editing tests (not a test
module): checkpoints built by shape, without the slow eager initialisers."""

import dataclasses

import jax
import numpy as np
import sentencepiece as spm
from flax import nnx

from sama_jax import params_io, presets, text
from sama_jax.data import video_io
from sama_jax.models import umt5, wan_dit, wan_vae

SENTENCES = [
    f"The {c} {s} moves {d} across the {b} scene number {i}."
    for i, (c, s, d, b) in enumerate(
        (c, s, d, b)
        for c in ("red", "blue", "green", "yellow")
        for s in ("ball", "cube", "square", "circle")
        for d in ("left", "right", "up")
        for b in ("dark", "bright")
    )
]
SENTENCES += ["Replace the cat with a dog & make it café-style.", "Ünïcödé tëxt: naïve façade, über."]


def make_tokenizer_dir(path):
    """A tiny umT5-style tokenizer directory (sentencepiece unigram, pad 0, eos 1, unk 2)."""
    text.build_sentencepiece_tokenizer(SENTENCES, str(path), vocab_size=70)
    return spm.SentencePieceProcessor(model_file=str(path / "spiece.model"))


SOURCE_FPS = 12
TEXTS = ["Make the square red.", "Remove the square.", "[Video edit] Turn the background blue."]


def tiny_hf_umt5(**overrides):
    """A tiny transformers umT5 encoder (random weights), vocabulary 70: make_tokenizer_dir's."""
    from transformers import UMT5Config, UMT5EncoderModel

    config = dict(
        vocab_size=70,
        d_model=16,
        d_kv=4,
        d_ff=32,
        num_layers=1,
        num_heads=4,
        relative_attention_num_buckets=8,
        relative_attention_max_distance=16,
        feed_forward_proj="gated-gelu",
    )
    return UMT5EncoderModel(UMT5Config(**{**config, **overrides}))


def tiny_hf_siglip_config():
    """transformers' SiglipVisionConfig of the tiny preset's SigLIP tower."""
    from transformers import SiglipVisionConfig

    tiny = presets.SIGLIP["tiny"]
    return SiglipVisionConfig(
        hidden_size=tiny["hidden_size"],
        intermediate_size=tiny["intermediate_size"],
        num_hidden_layers=tiny["num_layers"],
        num_attention_heads=tiny["num_heads"],
        patch_size=tiny["patch_size"],
        image_size=tiny["image_size"],
    )


def random_params(module_fn, seed=0):
    """Random weights by shape, without running eager initialisers (the VAE's are slow on CPU):
    kernels scaled by fan-in, scales near 1, everything else near 0."""
    rng = np.random.default_rng(seed)
    abstract = nnx.to_pure_dict(nnx.state(nnx.eval_shape(module_fn)))

    def init(path, leaf):
        if len(leaf.shape) >= 2:
            value = rng.standard_normal(leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
        else:
            is_scale = any(str(getattr(k, "key", k)) in ("gamma", "scale") for k in path)
            value = float(is_scale) + 0.1 * rng.standard_normal(leaf.shape)
        return value.astype(leaf.dtype)

    return jax.tree_util.tree_map_with_path(init, abstract)


def moving_square(frames=10, height=48, width=64):
    video = np.full((frames, height, width, 3), 40, np.uint8)
    for t in range(frames):
        video[t, 10:26, 4 + 3 * t : 20 + 3 * t] = (220, 200, 30)
    return video


def write_tiny_models(root):
    """Random tiny DiT, VAE, umT5 checkpoints, a tokenizer and three mp4 sources under root;
    returns (root, the sama-edit flags that load them at 32x64, 3 steps, fp32)."""
    dit_cfg = wan_dit.WanDiTConfig(**presets.DIT["tiny"])
    params_io.save_params(
        str(root / "dit"),
        random_params(lambda: wan_dit.WanDiT(dit_cfg, rngs=nnx.Rngs(0))),
        wan_dit.KIND,
        dit_cfg.architecture(),
    )
    vae_cfg = wan_vae.WanVAEConfig(**presets.VAE["tiny"])
    params_io.save_params(
        str(root / "vae"),
        random_params(lambda: wan_vae.WanVAE(vae_cfg, rngs=nnx.Rngs(0)), 1),
        wan_vae.KIND,
        dataclasses.asdict(vae_cfg),
    )
    t5_cfg = umt5.UMT5Config.from_config(presets.TEXT_ENCODER["tiny"])
    params_io.save_params(
        str(root / "umt5"),
        random_params(lambda: umt5.UMT5Encoder(t5_cfg, rngs=nnx.Rngs(0)), 2),
        umt5.KIND,
        dataclasses.asdict(t5_cfg),
    )
    text.build_sentencepiece_tokenizer(TEXTS * 20, str(root / "tok"), vocab_size=60)
    # Every edit below runs the model on 5 frames of 32x64, so the jitted VAE and sampler compile once.
    video_io.write_video(str(root / "clip.mp4"), moving_square(3), fps=SOURCE_FPS)
    video_io.write_video(str(root / "long.mp4"), moving_square(10), fps=SOURCE_FPS)
    video_io.write_video(str(root / "other.mp4"), moving_square(5)[:, :, ::-1].copy(), fps=SOURCE_FPS)
    models = [
        "--dit",
        str(root / "dit"),
        "--vae",
        str(root / "vae"),
        "--text-encoder",
        str(root / "umt5"),
        "--tokenizer",
        str(root / "tok"),
        "--height",
        "32",
        "--width",
        "64",
        "--steps",
        "3",
        "--mesh",
        "none",
        "--dtype",
        "float32",
    ]
    return root, models
