"""The Wan2.1 / SAMA-14B DiT's checkpoint names: our parameter path <-> the released key.

Read by the converter (convert_wan_weights/dit.py) and by lora.py, so the two never disagree.
Each table row is a Param: (our path, official key with {i} for a stacked layer's index, transform);
the diffusers layout is the official one renamed (rename).
"""

from __future__ import annotations

import re

from sama_jax.models.params_table import Param, linear, norm

# Prefixes a saved state dict may carry before the official names.
PREFIXES = ("model.diffusion_model.", "diffusion_model.", "pipe.dit.")
SAMA_PREFIXES = ("segment_embedding.", "siglip_feat_mlp.", "semantic_head.")

# Official name -> diffusers name, per module prefix (blocks use the 'blocks.N.' prefix).
_DIFFUSERS_TOP = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "head.modulation": "scale_shift_table",
    "head.head": "proj_out",
}
_DIFFUSERS_BLOCK = {
    "modulation": "scale_shift_table",
    "self_attn.q": "attn1.to_q",
    "self_attn.k": "attn1.to_k",
    "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "self_attn.norm_q": "attn1.norm_q",
    "self_attn.norm_k": "attn1.norm_k",
    "cross_attn.q": "attn2.to_q",
    "cross_attn.k": "attn2.to_k",
    "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0",
    "cross_attn.norm_q": "attn2.norm_q",
    "cross_attn.norm_k": "attn2.norm_k",
    # diffusers' norm2 is the cross-attention norm, the official norm3.
    "norm3": "norm2",
    "ffn.0": "ffn.net.0.proj",
    "ffn.2": "ffn.net.2",
}


def rename(key: str, to_diffusers: bool) -> str:
    """Official <-> diffusers key name (keys without a diffusers counterpart pass unchanged)."""
    match = re.match(r"blocks\.(\d+)\.(.*)", key)
    table, prefix, rest = (
        (_DIFFUSERS_BLOCK, f"blocks.{match.group(1)}.", match.group(2))
        if match
        else (_DIFFUSERS_TOP, "", key)
    )
    for official, diffusers in table.items():
        old, new = (official, diffusers) if to_diffusers else (diffusers, official)
        if rest == old or rest.startswith(old + "."):
            return prefix + new + rest[len(old) :]
    return key


def to_layout(official_key: str, layout: str) -> str:
    return official_key if layout == "official" else rename(official_key, to_diffusers=True)


def _attention(ours: str, official: str) -> list[Param]:
    rows = [row for name in "qkvo" for row in linear(f"{ours}.{name}", f"{official}.{name}")]
    return (
        rows
        + norm(f"{ours}.norm_q", f"{official}.norm_q", bias=False)
        + norm(f"{ours}.norm_k", f"{official}.norm_k", bias=False)
    )


TOP_PARAMS = (
    [
        Param("patch_embedding.kernel", "patch_embedding.weight", "conv"),
        Param("patch_embedding.bias", "patch_embedding.bias"),
    ]
    + linear("text_embedding.fc1", "text_embedding.0")
    + linear("text_embedding.fc2", "text_embedding.2")
    + linear("time_embedding.fc1", "time_embedding.0")
    + linear("time_embedding.fc2", "time_embedding.2")
    + linear("time_projection", "time_projection.1")
    + [Param("head.modulation", "head.modulation")]
    + linear("head.head", "head.head")
)
SAMA_PARAMS = (
    [Param("segment_embedding", "segment_embedding.weight")]
    + norm("siglip_feat_mlp.norm", "siglip_feat_mlp.norm")
    + linear("siglip_feat_mlp.fc1", "siglip_feat_mlp.fc1")
    + linear("siglip_feat_mlp.fc2", "siglip_feat_mlp.fc2")
    + norm("semantic_head.norm", "semantic_head.norm")
    + linear("semantic_head.proj", "semantic_head.proj")
)
BLOCK_PARAMS = (
    [Param("blocks.modulation", "blocks.{i}.modulation")]
    + _attention("blocks.self_attn", "blocks.{i}.self_attn")
    + norm("blocks.norm3", "blocks.{i}.norm3")
    + _attention("blocks.cross_attn", "blocks.{i}.cross_attn")
    + linear("blocks.ffn.fc1", "blocks.{i}.ffn.0")
    + linear("blocks.ffn.fc2", "blocks.{i}.ffn.2")
)
