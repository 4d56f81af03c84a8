"""Model size presets: tiny (CPU tests), demo (sama-demo's embedded default), wan_1_3b and wan_14b.

One table per component. The DiT differs between sizes; the frozen encoders (VAE, umT5-XXL,
SigLIP so400m/384) are the released full-size ones for both Wan sizes and tiny ones for `tiny`.
Each component's model class is built from its section, e.g. `WanDiTConfig(**config.model.dit)`.
"""

from __future__ import annotations

import copy

import ml_collections

PRESET_NAMES = ("tiny", "demo", "wan_1_3b", "wan_14b")
# Presets that run on a CPU with generated data (small frames, few steps, random encoders allowed).
CPU_PRESETS = ("tiny", "demo")

_DIT_COMMON = dict(
    freq_dim=256,
    text_dim=4096,
    in_dim=16,
    out_dim=16,
    patch_size=(1, 2, 2),
    eps=1e-6,
    text_len=512,
    semantic_dim=1152,
    semantic_hidden_dim=1024,
    num_segments=3,
)
# The demo VAE's latent channels: 3x Wan's 16 (a 64x64 frame keeps 8x8x48 numbers), so a VAE
# fitted in minutes reconstructs the synthetic world (flat shapes with sharp edges).
DEMO_LATENT_CHANNELS = 48

DIT = {
    # head_dim 16 -> RoPE split t/h/w = 8/4/4 real dims.
    "tiny": dict(
        _DIT_COMMON,
        dim=64,
        ffn_dim=128,
        num_heads=4,
        num_layers=2,
        freq_dim=32,
        text_dim=32,
        text_len=16,
        semantic_dim=32,
        semantic_hidden_dim=48,
    ),
    # sama-demo: the tiny encoders' widths, a DiT big enough to learn the synthetic edits in minutes
    # on two CPU cores; latent channels are the demo VAE's.
    "demo": dict(
        _DIT_COMMON,
        dim=192,
        ffn_dim=512,
        num_heads=6,
        num_layers=4,
        freq_dim=64,
        text_dim=32,
        text_len=16,
        semantic_dim=32,
        semantic_hidden_dim=48,
        in_dim=DEMO_LATENT_CHANNELS,
        out_dim=DEMO_LATENT_CHANNELS,
    ),
    "wan_1_3b": dict(_DIT_COMMON, dim=1536, ffn_dim=8960, num_heads=12, num_layers=30),
    "wan_14b": dict(_DIT_COMMON, dim=5120, ffn_dim=13824, num_heads=40, num_layers=40),
}

_VAE_FULL = dict(
    base_dim=96, z_dim=16, dim_mult=(1, 2, 4, 4), num_res_blocks=2, temporal_downsample=(False, True, True)
)
VAE = {
    "tiny": dict(_VAE_FULL, base_dim=8),
    # Normalisation stats start at (0, 1); sama-fit-vae measures and stores the fitted VAE's.
    "demo": dict(
        _VAE_FULL,
        base_dim=8,
        z_dim=DEMO_LATENT_CHANNELS,
        latents_mean=(0.0,) * DEMO_LATENT_CHANNELS,
        latents_std=(1.0,) * DEMO_LATENT_CHANNELS,
    ),
    "wan_1_3b": dict(_VAE_FULL),
    "wan_14b": dict(_VAE_FULL),
}

_UMT5_FULL = dict(
    vocab_size=256384,
    dim=4096,
    ffn_dim=10240,
    num_heads=64,
    num_layers=24,
    num_buckets=32,
    max_distance=128,
    eps=1e-6,
    text_len=512,
)
TEXT_ENCODER = {
    "tiny": dict(
        _UMT5_FULL,
        vocab_size=512,
        dim=32,
        ffn_dim=64,
        num_heads=4,
        num_layers=2,
        num_buckets=8,
        max_distance=16,
        text_len=16,
    ),
    "wan_1_3b": dict(_UMT5_FULL),
    "wan_14b": dict(_UMT5_FULL),
}

_SIGLIP_FULL = dict(
    hidden_size=1152,
    intermediate_size=4304,
    num_layers=27,
    num_heads=16,
    patch_size=14,
    image_size=384,
    eps=1e-6,
)
SIGLIP = {
    "tiny": dict(
        _SIGLIP_FULL, hidden_size=32, intermediate_size=64, num_layers=2, num_heads=4, image_size=56
    ),
    "wan_1_3b": dict(_SIGLIP_FULL),
    "wan_14b": dict(_SIGLIP_FULL),
}

# Semantic anchoring: N anchor frames of the target -> pooled SigLIP patch tokens + global tokens.
SEMANTIC = {
    "tiny": dict(num_anchor_frames=1, pool_grid=2, global_token="mean"),
    "wan_1_3b": dict(num_anchor_frames=1, pool_grid=8, global_token="mean"),
    "wan_14b": dict(num_anchor_frames=1, pool_grid=8, global_token="mean"),
}

# The demo keeps the tiny text encoder, SigLIP and semantic pooling (random, frozen).
for _table in (TEXT_ENCODER, SIGLIP, SEMANTIC):
    _table["demo"] = _table["tiny"]


def model_config(name: str) -> ml_collections.ConfigDict:
    """The `model` config section for a preset: one subsection per component."""
    if name not in PRESET_NAMES:
        raise ValueError(f"unknown model preset {name!r}; known: {', '.join(PRESET_NAMES)}")
    return ml_collections.ConfigDict(
        dict(
            preset=name,
            dit=copy.deepcopy(DIT[name]),
            vae=copy.deepcopy(VAE[name]),
            text_encoder=copy.deepcopy(TEXT_ENCODER[name]),
            siglip=copy.deepcopy(SIGLIP[name]),
            semantic=copy.deepcopy(SEMANTIC[name]),
        )
    )
