"""Rectified-flow training objective of Wan2.1 / SAMA.

    x_t = (1 - s) x0 + s eps,   v = eps - x0,   model timestep = 1000 s
with s drawn uniformly and shifted, s' = k s / (1 + (k - 1) s) (k = 5 for Wan at 480p), the same s for
the video latents and SAMA's semantic tokens of a sample. SAMA's loss:
    L = MSE(v_pred, v) + w * L1(sem_pred, sem_v),   w = 0.1
optionally with the released trainer's per-sample weighting of the MSE (gaussian_bump_weight).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000  # Wan's training grid: timestep = 1000 * sigma (training and sampling)


def shift_sigma(sigma: jax.Array, shift: float) -> jax.Array:
    """The shifted schedule sigma' = shift * s / (1 + (shift - 1) * s), for training's sampled sigmas
    and every sampler's grid (numpy or jax arrays, in their dtype)."""
    return shift * sigma / (1.0 + (shift - 1.0) * sigma)


def sample_sigma(key: jax.Array, batch: int, shift: float) -> jax.Array:
    """(batch,) shifted sigmas in (0, 1]; u is drawn in [1/1000, 1] as the 1000-step training grid."""
    u = jax.random.uniform(key, (batch,), minval=1.0 / NUM_TRAIN_TIMESTEPS, maxval=1.0)
    return shift_sigma(u, shift)


def _bump(timesteps):
    return np.exp(-2.0 * ((timesteps - NUM_TRAIN_TIMESTEPS / 2) / NUM_TRAIN_TIMESTEPS) ** 2)


def gaussian_bump_weight(timesteps: jax.Array, shift: float) -> jax.Array:
    """DiffSynth's training weight w(t) = exp(-2 ((t - 500) / 1000)^2), minus its minimum and scaled
    to mean 1 over the 1000 shifted training timesteps (FlowMatchScheduler, training=True; the
    minimum and mean are taken on that grid, w is then evaluated at the sampled t)."""
    grid = NUM_TRAIN_TIMESTEPS * np.asarray(
        shift_sigma(np.linspace(1.0, 0.0, NUM_TRAIN_TIMESTEPS + 1)[:-1], shift)
    )
    low = _bump(grid).min()
    scale = NUM_TRAIN_TIMESTEPS / (_bump(grid) - low).sum()
    t = jnp.asarray(timesteps, jnp.float32)
    return (jnp.exp(-2.0 * ((t - NUM_TRAIN_TIMESTEPS / 2) / NUM_TRAIN_TIMESTEPS) ** 2) - low) * scale


def add_noise(x0: jax.Array, noise: jax.Array, sigma: jax.Array) -> jax.Array:
    """(1 - s) x0 + s eps with one sigma per sample (leading axis)."""
    s = sigma.reshape((-1,) + (1,) * (x0.ndim - 1)).astype(jnp.float32)
    return ((1.0 - s) * x0.astype(jnp.float32) + s * noise.astype(jnp.float32)).astype(x0.dtype)


def _masked_mean(
    per_element: jax.Array, valid: jax.Array | None, sample_weight: jax.Array | None = None
) -> jax.Array:
    """Mean over everything, counting only samples with valid=True (the data pipeline marks slots it
    had to pad); all-invalid batches give 0, not NaN. sample_weight scales each sample's mean."""
    per_sample = jnp.mean(per_element.reshape(per_element.shape[0], -1), axis=1)
    if sample_weight is not None:
        per_sample = per_sample * sample_weight.astype(jnp.float32)
    if valid is None:
        return jnp.mean(per_sample)
    weight = valid.astype(jnp.float32)
    return jnp.sum(per_sample * weight) / jnp.maximum(jnp.sum(weight), 1.0)


def sama_loss(
    velocity,
    noise,
    x0,
    semantic_velocity=None,
    semantic_noise=None,
    semantic_x0=None,
    semantic_weight: float = 0.1,
    valid=None,
    fm_weight=None,
) -> tuple[jax.Array, dict]:
    """L_FM + semantic_weight * L1 on the semantic tokens' velocity, computed in fp32.

    valid: optional (B,) bool; samples with False contribute nothing.
    fm_weight: optional (B,) weights of the samples' flow-matching MSE (e.g. gaussian_bump_weight)."""
    target = noise.astype(jnp.float32) - x0.astype(jnp.float32)
    loss_fm = _masked_mean(jnp.square(velocity.astype(jnp.float32) - target), valid, fm_weight)
    metrics = {"loss_fm": loss_fm}
    loss = loss_fm
    if semantic_velocity is not None:
        semantic_target = semantic_noise.astype(jnp.float32) - semantic_x0.astype(jnp.float32)
        loss_sem = _masked_mean(jnp.abs(semantic_velocity.astype(jnp.float32) - semantic_target), valid)
        metrics["loss_semantic"] = loss_sem
        loss = loss + semantic_weight * loss_sem
    metrics["loss"] = loss
    return loss, metrics
