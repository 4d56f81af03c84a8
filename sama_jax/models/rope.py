"""Wan's 3D rotary position embedding, as cos/sin tables over interleaved pairs.

head_dim d splits into t/h/w parts of d - 4*(d//6), 2*(d//6), 2*(d//6) real dims (44/42/42 for
d = 128; 8/4/4 for d = 16). Each part rotates pairs (2i, 2i+1) by position * theta^(-2i/d_part),
the position being the token's frame, row or column index in the patch grid. Tables are built in
float64 with numpy at trace time (shapes are static), as the official code computes RoPE in float64.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def axis_dims(head_dim: int) -> tuple[int, int, int]:
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    hw = 2 * (head_dim // 6)
    return head_dim - 2 * hw, hw, hw


def grid_angles(grid: tuple[int, int, int], head_dim: int, theta: float = 10000.0) -> np.ndarray:
    """(f*h*w, head_dim/2) float64 rotation angles for a patch grid, tokens in (f, h, w) order."""
    parts = []
    for axis, (size, dim) in enumerate(zip(grid, axis_dims(head_dim))):
        inv_freq = 1.0 / theta ** (np.arange(0, dim, 2, dtype=np.float64) / dim)
        angles = np.arange(size, dtype=np.float64)[:, None] * inv_freq[None, :]
        shape = [1, 1, 1, dim // 2]
        shape[axis] = size
        parts.append(np.broadcast_to(angles.reshape(shape), tuple(grid) + (dim // 2,)))
    return np.concatenate(parts, axis=-1).reshape(-1, head_dim // 2)


def grid_phasors(grid, head_dim: int, theta: float = 10000.0) -> tuple[np.ndarray, np.ndarray]:
    """cos, sin tables (tokens, head_dim/2) as float32 for a patch grid."""
    angles = grid_angles(grid, head_dim, theta)
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def constant_phasors(num_tokens: int, head_dim: int, mode: str) -> tuple[np.ndarray, np.ndarray]:
    """Phasors of tokens without a position. 'zero' is what SAMA gives its semantic tokens (complex
    zero, so their rotated q and k are exactly 0); 'identity' leaves q and k unrotated."""
    shape = (num_tokens, head_dim // 2)
    if mode == "zero":
        return np.zeros(shape, np.float32), np.zeros(shape, np.float32)
    if mode == "identity":
        return np.ones(shape, np.float32), np.zeros(shape, np.float32)
    raise ValueError(f"unknown semantic_rope {mode!r}; choose 'zero' (SAMA) or 'identity'")


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates interleaved pairs of x (B, S, H, D) by per-token phasors cos/sin (S, D/2), in fp32."""
    pairs = x.astype(jnp.float32).reshape(*x.shape[:-1], x.shape[-1] // 2, 2)
    real, imag = pairs[..., 0], pairs[..., 1]
    cos = cos[None, :, None, :]
    sin = sin[None, :, None, :]
    rotated = jnp.stack([real * cos - imag * sin, real * sin + imag * cos], axis=-1)
    return rotated.reshape(x.shape).astype(x.dtype)
