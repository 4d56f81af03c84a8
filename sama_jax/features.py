"""Precomputed frozen-encoder features: their names and where they live on disk.

Layout: <manifest dir>/features/<manifest stem>/<name>/<quoted sample id>.npy, one array per sample
and feature, plus <name>/settings.json recording what produced them (sama-precompute writes them,
sama-build-shards packs them into records, the data pipeline carries them into batches as
"features/<name>", and sama_jax.conditioning uses them in place of the encoders).
    text            (L, dim) umT5 last hidden state of prompt_prefix + text, L <= text_len
    semantic        (N * (g*g + 1), hidden) SigLIP semantic tokens of the target's anchor frames
    target_latents  (1+k, H/8, W/8, 16) normalised Wan VAE latents of the target
    source_latents  the same for the source (edit samples only)
"""

from __future__ import annotations

import os
import urllib.parse

import numpy as np

NAMES = ("text", "semantic", "target_latents", "source_latents")
MEDIA_NAMES = NAMES[1:]  # need the sample's decoded frames
BATCH_PREFIX = "features/"  # batch keys of precomputed features


def feature_path(manifest_path: str, sample_id: str, name: str) -> str:
    """Where feature `name` of sample `sample_id` of the manifest at `manifest_path` is stored."""
    base = os.path.dirname(os.path.abspath(manifest_path))
    stem = os.path.splitext(os.path.basename(manifest_path))[0]
    # Ids are free-form strings: quote them so '/' or '..' cannot escape the directory.
    filename = urllib.parse.quote(str(sample_id), safe="") + ".npy"
    if filename.startswith("."):
        filename = "%2E" + filename[1:]
    return os.path.join(base, "features", stem, name, filename)


def settings_path(manifest_path: str, name: str) -> str:
    return os.path.join(os.path.dirname(feature_path(manifest_path, "x", name)), "settings.json")


def pad_text(embedding: np.ndarray, text_len: int) -> np.ndarray:
    """A stored (L, dim) text feature -> (text_len, dim), zeros past L (what the DiT consumes)."""
    if embedding.shape[0] > text_len:
        raise ValueError(f"text feature has {embedding.shape[0]} tokens, more than text_len {text_len}")
    return np.pad(embedding, ((0, text_len - embedding.shape[0]), (0, 0)))
