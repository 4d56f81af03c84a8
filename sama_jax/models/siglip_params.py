"""SigLIP vision tower checkpoint names (transformers' SiglipVisionModel; an optional 'vision_model.'
prefix): our parameter path <-> the key. The table format: sama_jax.models.params_table."""

from __future__ import annotations

from sama_jax.models.params_table import Param, linear, norm

PREFIX = "vision_model."
_LAYER = "encoder.layers.{i}."

PARAMS = (
    [
        Param("patch_embedding.kernel", "embeddings.patch_embedding.weight", "conv2d"),
        Param("patch_embedding.bias", "embeddings.patch_embedding.bias"),
        Param("position_embedding.embedding", "embeddings.position_embedding.weight"),
    ]
    + norm("post_layernorm", "post_layernorm")
    + norm("layers.layer_norm1", _LAYER + "layer_norm1")
    + norm("layers.layer_norm2", _LAYER + "layer_norm2")
    + [
        row
        for p in ("q_proj", "k_proj", "v_proj", "out_proj")
        for row in linear(f"layers.self_attn.{p}", _LAYER + f"self_attn.{p}")
    ]
    + linear("layers.mlp.fc1", _LAYER + "mlp.fc1")
    + linear("layers.mlp.fc2", _LAYER + "mlp.fc2")
)
