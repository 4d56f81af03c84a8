"""Semantic tokens for SAMA's semantic anchoring: anchor frames -> SigLIP patch features -> tokens.

Per anchor frame: SigLIP's last hidden state (grid x grid patches, 27 x 27 for so400m/384) is pooled to
pool_grid x pool_grid local tokens by adaptive average pooling (PyTorch AdaptiveAvgPool2d bins:
bin i covers rows floor(i*G/g) .. ceil((i+1)*G/g) - 1, so bins overlap when g does not divide G),
row-major, followed by one global token. Frames are concatenated in time order:

    semantic_tokens(siglip, video, cfg)                 (B, T, H, W, 3) uint8 video
    semantic_tokens_from_anchors(siglip, anchors, cfg)  (B, N, H, W, 3): the data pipeline's anchors
        -> (B, N * (pool_grid^2 + 1), hidden)          (1, 65, 1152) by default

Config (presets.SEMANTIC): num_anchor_frames N (1 = the first frame, as the released code's
SigLIPFirstFrameEncoder; N > 1 spreads the anchors evenly over the clip, first and last included),
pool_grid g, global_token: "mean" (mean of all patch features of the frame), "max" (channel-wise max
over patches) or "none" (no global token).
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np

from sama_jax.models import siglip as siglip_lib

GLOBAL_TOKENS = ("mean", "max", "none")


@dataclasses.dataclass(frozen=True)
class SemanticConfig:
    num_anchor_frames: int = 1
    pool_grid: int = 8
    global_token: str = "mean"

    def __post_init__(self):
        if self.global_token not in GLOBAL_TOKENS:
            raise ValueError(f"global_token {self.global_token!r} is not one of {GLOBAL_TOKENS}")
        if self.num_anchor_frames < 1 or self.pool_grid < 1:
            raise ValueError(f"num_anchor_frames and pool_grid must be >= 1, got {self}")

    @property
    def tokens_per_frame(self) -> int:
        return self.pool_grid**2 + (self.global_token != "none")

    @property
    def num_tokens(self) -> int:
        return self.num_anchor_frames * self.tokens_per_frame


def anchor_frame_indices(num_frames: int, num_anchor_frames: int) -> np.ndarray:
    """Frame indices of the anchors: [0] for one; evenly spaced from first to last for several."""
    if num_frames < 1:
        raise ValueError("a video needs at least one frame")
    if num_anchor_frames == 1:
        return np.zeros((1,), np.int32)
    return np.round(np.linspace(0, num_frames - 1, num_anchor_frames)).astype(np.int32)


def adaptive_pool_matrix(size: int, out: int) -> np.ndarray:
    """(out, size) averaging weights of PyTorch's 1-D adaptive average pooling."""
    weights = np.zeros((out, size), np.float32)
    for i in range(out):
        start, end = (i * size) // out, -(-((i + 1) * size) // out)
        weights[i, start:end] = 1.0 / (end - start)
    return weights


def adaptive_avg_pool(grid: jax.Array, out: int) -> jax.Array:
    """(..., G, G, C) -> (..., out, out, C), separable adaptive average pooling in fp32."""
    rows = jnp.asarray(adaptive_pool_matrix(grid.shape[-3], out))
    cols = jnp.asarray(adaptive_pool_matrix(grid.shape[-2], out))
    return jnp.einsum(
        "ih,jw,...hwc->...ijc", rows, cols, grid.astype(jnp.float32), precision=jax.lax.Precision.HIGHEST
    )


def tokens_from_features(features: jax.Array, cfg: SemanticConfig) -> jax.Array:
    """SigLIP patch features (B, N, G*G, C) -> (B, N * tokens_per_frame, C)."""
    b, n, patches, c = features.shape
    g = int(round(patches**0.5))
    if g * g != patches:
        raise ValueError(f"{patches} patch features do not form a square grid")
    features = features.astype(jnp.float32)
    local = adaptive_avg_pool(features.reshape(b, n, g, g, c), cfg.pool_grid)
    tokens = [local.reshape(b, n, cfg.pool_grid**2, c)]
    if cfg.global_token == "mean":
        tokens.append(features.mean(axis=2, keepdims=True))
    elif cfg.global_token == "max":
        tokens.append(features.max(axis=2, keepdims=True))
    return jnp.concatenate(tokens, axis=2).reshape(b, n * cfg.tokens_per_frame, c)


def semantic_tokens_from_anchors(
    model: siglip_lib.SiglipVisionModel, anchors: jax.Array, cfg: SemanticConfig
) -> jax.Array:
    """Anchor frames (B, N, H, W, 3), uint8 or float in [0, 255] (the data pipeline's `anchors`)
    -> semantic tokens (B, N * tokens_per_frame, hidden).

    Jit it with nnx.jit (the model is an argument); inside a training step wrap the result in
    jax.lax.stop_gradient: SigLIP is frozen."""
    b, n = anchors.shape[:2]
    if n != cfg.num_anchor_frames:
        raise ValueError(f"got {n} anchor frames, the semantic config asks for {cfg.num_anchor_frames}")
    pixels = siglip_lib.preprocess(
        jnp.asarray(anchors).reshape((b * n,) + anchors.shape[2:]), model.cfg.image_size
    )
    features = model(pixels)
    return tokens_from_features(features.reshape(b, n, -1, features.shape[-1]), cfg)


def semantic_tokens(model: siglip_lib.SiglipVisionModel, video: jax.Array, cfg: SemanticConfig) -> jax.Array:
    """Whole video (B, T, H, W, 3) -> semantic tokens of its anchor frames (anchor_frame_indices)."""
    frames = jnp.asarray(video)[:, anchor_frame_indices(video.shape[1], cfg.num_anchor_frames)]
    return semantic_tokens_from_anchors(model, frames, cfg)
