"""The size and cost of a Wan DiT workload: latent grids, token counts and the analytic FLOP formula
of ../shared/reference/anchors.md. sama-train's MFU, its image-batch check and the benchmarks
(train_step, dit_forward, memory_plan) all count with these.

    dit_cost.latent_grid(81, 480, 832)                 # (21, 60, 104): Wan VAE, 4x time, 8x space
    dit_cost.video_tokens(17, 480, 832, (1, 2, 2))     # 7,800 DiT tokens of one video
    dit_cost.forward_flops(dit_cfg, tokens, text_tokens)
"""

from __future__ import annotations

from sama_jax.models.wan_vae import SPATIAL_STRIDE, TEMPORAL_STRIDE  # the Wan VAE's compression


def latent_frames(frames: int) -> int:
    """Latent frames of 4k+1 video frames (an image: 1)."""
    return 1 + (frames - 1) // TEMPORAL_STRIDE


def latent_grid(frames: int, height: int, width: int) -> tuple[int, int, int]:
    return latent_frames(frames), height // SPATIAL_STRIDE, width // SPATIAL_STRIDE


def video_tokens(frames: int, height: int, width: int, patch) -> int:
    """DiT tokens of one video: the latent grid, then the patch."""
    t, h, w = latent_grid(frames, height, width)
    return (t // patch[0]) * (h // patch[1]) * (w // patch[2])


def forward_flops(dit_cfg, tokens: int, text_tokens: int) -> float:
    """One DiT forward over `tokens` self-attention tokens with `text_tokens` of text context."""
    d, f, s, l = dit_cfg.dim, dit_cfg.ffn_dim, tokens, text_tokens
    return dit_cfg.num_layers * (s * (12 * d * d + 4 * d * f + 4 * s * d + 4 * l * d) + 4 * d * d * l)


def train_flops(dit_cfg, tokens: int, text_tokens: int) -> float:
    """A train step's FLOPs per sample: forward + backward = 3 x the forward (no remat counted)."""
    return 3.0 * forward_flops(dit_cfg, tokens, text_tokens)
