"""Batch -> DiT inputs: the one place where SAMA's conditioning is made.

    encoders = conditioning.build_encoders(config, rngs)          # random (tiny preset, tests)
    encoders = conditioning.load_encoders(config, paths, mesh=m)  # converted checkpoints
    arrays = conditioning.host_arrays(batch, tokenizer, config)    # numpy, on the host
    inputs = conditioning.dit_inputs(encoders, arrays)            # inside jit: DiTInputs

A pipeline batch carries videos (source/target uint8, anchors) and the instruction text; the DiT wants
source latents, clean target latents x0, the umT5 text context and SAMA's clean semantic tokens. Each
of the four comes from its frozen encoder (Wan VAE, umT5, SigLIP) under the run's precision policy,
or from a precomputed feature in the batch ("features/<name>", config.data.features) when present:
then that encoder is not needed and need not be loaded. Encoder outputs are wrapped in
stop_gradient: the encoders are frozen.
"""

from __future__ import annotations

from typing import Any, Mapping, NamedTuple

import jax
import numpy as np
from flax import nnx

from sama_jax import features as features_lib
from sama_jax import semantic as semantic_lib
from sama_jax import text as text_lib
from sama_jax.data import transforms
from sama_jax.models import siglip, umt5, wan_vae

FEATURE_FOR = {
    "vae": ("target_latents", "source_latents"),
    "text_encoder": ("text",),
    "siglip": ("semantic",),
}


class DiTInputs(NamedTuple):
    source_latents: jax.Array  # (B, 1+k, h, w, 16), clean
    x0: jax.Array  # (B, 1+k, h, w, 16), the clean target the loss noises
    context: jax.Array  # (B, text_len, text_dim), zero past each text's length
    semantic_x0: jax.Array  # (B, N, semantic_dim) clean semantic tokens of the target's anchors


class Encoders(nnx.Module):
    """The frozen encoders of a run; an encoder whose outputs come precomputed is None."""

    def __init__(self, vae, text_encoder, vision, semantic: semantic_lib.SemanticConfig):
        self.vae = vae
        self.text_encoder = text_encoder
        self.vision = vision
        self.semantic = semantic


def needed(config) -> tuple[str, ...]:
    """The encoders a run must build: those whose every output is not precomputed (data.features)."""
    precomputed = set(config.data.features)
    return tuple(name for name, outputs in FEATURE_FOR.items() if not set(outputs) <= precomputed)


def semantic_config(config) -> semantic_lib.SemanticConfig:
    return semantic_lib.SemanticConfig(**config.model.semantic)


def frozen_precision(config) -> dict:
    """The precision policy of the frozen encoders: the run's, with frozen_param_dtype parameters."""
    precision = dict(config.precision)
    return dict(precision, param_dtype=precision.pop("frozen_param_dtype"))


def build_encoders(config, rngs: nnx.Rngs, names: tuple[str, ...] | None = None) -> Encoders:
    """Randomly initialised encoders from config.model (the tiny preset and tests)."""
    names = needed(config) if names is None else names
    model, precision = config.model, frozen_precision(config)
    return Encoders(
        wan_vae.WanVAE(wan_vae.WanVAEConfig.from_config(model.vae, precision), rngs=rngs)
        if "vae" in names
        else None,
        umt5.UMT5Encoder(umt5.UMT5Config.from_config(model.text_encoder, precision), rngs=rngs)
        if "text_encoder" in names
        else None,
        siglip.SiglipVisionModel(siglip.SiglipConfig.from_config(model.siglip, precision), rngs=rngs)
        if "siglip" in names
        else None,
        semantic_config(config),
    )


def load_encoders(
    config, paths: Mapping[str, str], *, mesh=None, rules=None, names: tuple[str, ...] | None = None
) -> Encoders:
    """Encoders from converted checkpoints: paths = {"vae": dir, "text_encoder": dir, "siglip": dir};
    only the `names` needed (default: needed(config)) must be given."""
    names = needed(config) if names is None else names
    missing = [n for n in names if not paths.get(n)]
    if missing:
        raise ValueError(
            f"no checkpoint given for the encoders {missing} (the run needs them: "
            f"data.features={list(config.data.features)} does not provide their outputs)"
        )
    kw = dict(mesh=mesh, rules=rules, precision=frozen_precision(config))
    return Encoders(
        wan_vae.load_vae(paths["vae"], **kw) if "vae" in names else None,
        umt5.load_text_encoder(paths["text_encoder"], **kw) if "text_encoder" in names else None,
        siglip.load_siglip(paths["siglip"], **kw) if "siglip" in names else None,
        semantic_config(config),
    )


def prompt(text: str, prefix: str) -> str:
    return prefix + text if prefix and not text.startswith(prefix) else text


def host_arrays(batch: Mapping[str, Any], tokenizer, config) -> dict[str, np.ndarray]:
    """A pipeline batch -> the numpy arrays the step takes (strings dropped, text tokenized with
    config.prompt_prefix when the text is encoded online)."""
    arrays = {k: v for k, v in batch.items() if isinstance(v, np.ndarray) and v.dtype.kind not in "USO"}
    if "text" not in config.data.features:
        texts = [prompt(str(t), config.prompt_prefix) for t in batch["text"]]
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
    vision: siglip.SiglipVisionModel, anchors: jax.Array, cfg: semantic_lib.SemanticConfig
) -> jax.Array:
    return jax.lax.stop_gradient(semantic_lib.semantic_tokens_from_anchors(vision, anchors, cfg))


def dit_inputs(encoders: Encoders, batch: Mapping[str, jax.Array]) -> DiTInputs:
    """Traceable (call it inside nnx.jit): precomputed features win, else the encoder runs."""

    def latents(name, field):
        stored = _feature(batch, name)
        return stored if stored is not None else encode_video(encoders.vae, batch[field])

    context = _feature(batch, "text")
    if context is None:
        context = encode_text(encoders.text_encoder, batch["ids"], batch["mask"])
    semantic_x0 = _feature(batch, "semantic")
    if semantic_x0 is None:
        semantic_x0 = encode_semantic(encoders.vision, batch["anchors"], encoders.semantic)
    return DiTInputs(
        latents("source_latents", "source"), latents("target_latents", "target"), context, semantic_x0
    )
