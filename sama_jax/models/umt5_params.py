"""umT5 encoder checkpoint names: our parameter path <-> Wan2.1's key (models_t5_umt5-xxl-enc-bf16.pth),
and its transformers (UMT5EncoderModel) name. The table format: sama_jax.models.params_table.

FFN: official ffn.gate.0 = transformers wi_0 (the GELU branch) -> our ffn.gate; ffn.fc1 = wi_1;
ffn.fc2 = wo.
"""

from __future__ import annotations

from sama_jax.models.params_table import Param

LAYOUTS = ("official", "transformers")
_ATTN = "encoder.block.{i}.layer.0.SelfAttention."
_FFN = "encoder.block.{i}.layer.1.DenseReluDense."

PARAMS = [
    Param("token_embedding.embedding", "token_embedding.weight"),
    Param("norm.scale", "norm.weight"),
    Param("blocks.norm1.scale", "blocks.{i}.norm1.weight"),
    *(Param(f"blocks.attn.{n}.kernel", f"blocks.{{i}}.attn.{n}.weight", "linear") for n in "qkvo"),
    Param("blocks.pos_embedding.embedding", "blocks.{i}.pos_embedding.embedding.weight"),
    Param("blocks.norm2.scale", "blocks.{i}.norm2.weight"),
    Param("blocks.ffn.gate.kernel", "blocks.{i}.ffn.gate.0.weight", "linear"),
    Param("blocks.ffn.fc1.kernel", "blocks.{i}.ffn.fc1.weight", "linear"),
    Param("blocks.ffn.fc2.kernel", "blocks.{i}.ffn.fc2.weight", "linear"),
]
BY_OURS = {p.ours: p for p in PARAMS}
# Official key -> transformers key.
TRANSFORMERS = {
    "token_embedding.weight": "shared.weight",
    "norm.weight": "encoder.final_layer_norm.weight",
    "blocks.{i}.norm1.weight": "encoder.block.{i}.layer.0.layer_norm.weight",
    **{f"blocks.{{i}}.attn.{n}.weight": _ATTN + f"{n}.weight" for n in "qkvo"},
    "blocks.{i}.pos_embedding.embedding.weight": _ATTN + "relative_attention_bias.weight",
    "blocks.{i}.norm2.weight": "encoder.block.{i}.layer.1.layer_norm.weight",
    "blocks.{i}.ffn.gate.0.weight": _FFN + "wi_0.weight",
    "blocks.{i}.ffn.fc1.weight": _FFN + "wi_1.weight",
    "blocks.{i}.ffn.fc2.weight": _FFN + "wo.weight",
}
# transformers tensors that are not part of the encoder we build.
IGNORED_PREFIXES = ("decoder.", "lm_head.")
UNTIED_EMBEDDING = "encoder.embed_tokens.weight"


def key_in(layout: str, key: str) -> str:
    """A table key (official; '{i}' kept) in `layout`."""
    return key if layout == "official" else TRANSFORMERS[key]
