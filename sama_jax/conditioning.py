"""Batch -> DiT inputs: the one place where SAMA's conditioning is made.

    arrays = conditioning.host_arrays(batch, tokenizer, config)    # numpy, on the host
    inputs = conditioning.dit_inputs(encoders, arrays)            # inside jit: DiTInputs

A pipeline batch carries videos (source/target uint8, anchors) and the instruction text; the DiT wants
source latents, clean target latents x0, the umT5 text context and SAMA's clean semantic tokens. Each
of the four comes from its frozen encoder (Wan VAE, umT5, SigLIP) under the run's precision policy,
or from a precomputed feature in the batch ("features/<name>", config.data.features) when present:
then that encoder is not needed and need not be loaded. Encoder outputs are wrapped in
stop_gradient: the encoders are frozen (built, loaded and recorded by sama_jax.encoders).
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import numpy as np

from sama_jax import edit_rules
from sama_jax import encoders as encoders_lib
from sama_jax import features as features_lib
from sama_jax import semantic as semantic_lib
from sama_jax import text as text_lib
from sama_jax.data import transforms
from sama_jax.models import siglip, umt5, wan_vae


class DiTInputs(NamedTuple):
    source_latents: jax.Array  # (B, 1+k, h, w, 16), clean
    x0: jax.Array  # (B, 1+k, h, w, 16), the clean target the loss noises
    context: jax.Array  # (B, text_len, text_dim), zero past each text's length
    semantic_x0: jax.Array  # (B, N, semantic_dim) clean semantic tokens of the target's anchors


def host_arrays(batch: Mapping[str, Any], tokenizer, config) -> dict[str, np.ndarray]:
    """A pipeline batch -> the numpy arrays the step takes (strings dropped, text tokenized with
    config.prompt_prefix when the text is encoded online)."""
    arrays = {k: v for k, v in batch.items() if isinstance(v, np.ndarray) and v.dtype.kind not in "USO"}
    if "text" not in config.data.features:
        texts = [edit_rules.with_prefix(str(t), config.prompt_prefix) for t in batch["text"]]
        arrays["ids"], arrays["mask"] = text_lib.tokenize(tokenizer, texts, int(config.model.dit.text_len))
    return arrays


def _feature(batch, name):
    return batch.get(features_lib.BATCH_PREFIX + name)


def encode_video(vae: wan_vae.WanVAE, frames: jax.Array) -> jax.Array:
    """uint8 frames (B, T, H, W, 3) -> normalised latents; frozen."""
    return jax.lax.stop_gradient(vae.encode(transforms.to_model_range(frames)))


def encode_text(text_encoder: umt5.UMT5Encoder, ids: jax.Array, mask: jax.Array) -> jax.Array:
    return jax.lax.stop_gradient(text_lib.encode(text_encoder, ids, mask))


def encode_semantic(
    siglip_model: siglip.SiglipVisionModel, anchors: jax.Array, cfg: semantic_lib.SemanticConfig
) -> jax.Array:
    return jax.lax.stop_gradient(semantic_lib.semantic_tokens_from_anchors(siglip_model, anchors, cfg))


def dit_inputs(encoders: encoders_lib.Encoders, batch: Mapping[str, jax.Array]) -> DiTInputs:
    """Traceable (call it inside nnx.jit): precomputed features win, else the encoder runs."""

    def latents(name, field):
        stored = _feature(batch, name)
        return stored if stored is not None else encode_video(encoders.vae, batch[field])

    context = _feature(batch, "text")
    if context is None:
        context = encode_text(encoders.text_encoder, batch["ids"], batch["mask"])
    semantic_x0 = _feature(batch, "semantic")
    if semantic_x0 is None:
        semantic_x0 = encode_semantic(encoders.siglip, batch["anchors"], encoders.semantic)
    return DiTInputs(
        latents("source_latents", "source"), latents("target_latents", "target"), context, semantic_x0
    )
