"""PyTorch references for the DiT tests (helpers only, no tests): tiny diffusers
WanTransformer3DModel, the checkpoint layouts users have, and SAMA's semantic/segment/shared-RoPE
path written from the spec.

The official-layout key names below are written out from reference/wan21.md on purpose, instead of
reusing the converter's table, so the tests check that table rather than repeat it.
"""

from __future__ import annotations

import json
import os
import re
import types

import numpy as np
import torch
from safetensors.torch import save_file

DIFFUSERS_TO_OFFICIAL = [
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^blocks\.(\d+)\.scale_shift_table$", r"blocks.\1.modulation"),
    (r"^blocks\.(\d+)\.attn1\.to_out\.0\.", r"blocks.\1.self_attn.o."),
    (r"^blocks\.(\d+)\.attn1\.to_([qkv])\.", r"blocks.\1.self_attn.\2."),
    (r"^blocks\.(\d+)\.attn1\.norm_", r"blocks.\1.self_attn.norm_"),
    (r"^blocks\.(\d+)\.attn2\.to_out\.0\.", r"blocks.\1.cross_attn.o."),
    (r"^blocks\.(\d+)\.attn2\.to_([qkv])\.", r"blocks.\1.cross_attn.\2."),
    (r"^blocks\.(\d+)\.attn2\.norm_", r"blocks.\1.cross_attn.norm_"),
    (r"^blocks\.(\d+)\.norm2\.", r"blocks.\1.norm3."),
    (r"^blocks\.(\d+)\.ffn\.net\.0\.proj\.", r"blocks.\1.ffn.0."),
    (r"^blocks\.(\d+)\.ffn\.net\.2\.", r"blocks.\1.ffn.2."),
]


def official_name(diffusers_key: str) -> str:
    for pattern, repl in DIFFUSERS_TO_OFFICIAL:
        new, n = re.subn(pattern, repl, diffusers_key)
        if n:
            return new
    return diffusers_key


def tiny_diffusers_wan(num_heads=3, head_dim=16, ffn_dim=40, num_layers=2, text_dim=24, freq_dim=32, seed=0):
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    model = WanTransformer3DModel(
        patch_size=(1, 2, 2),
        num_attention_heads=num_heads,
        attention_head_dim=head_dim,
        in_channels=16,
        out_channels=16,
        text_dim=text_dim,
        freq_dim=freq_dim,
        ffn_dim=ffn_dim,
        num_layers=num_layers,
        cross_attn_norm=True,
        qk_norm="rms_norm_across_heads",
        eps=1e-6,
    )
    # Random init leaves biases and norms at 0/1 and the head at zero in places; perturb every
    # tensor so each one matters to the output.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model.eval()


class SamaExtras(torch.nn.Module):
    """SAMA's additions with the official module names (siglip_feat_mlp, semantic_head)."""

    def __init__(self, dim, semantic_dim, hidden_dim, seed=1):
        super().__init__()
        torch.manual_seed(seed)
        self.segment_embedding = torch.nn.Embedding(3, dim)
        self.siglip_feat_mlp = torch.nn.Module()
        self.siglip_feat_mlp.norm = torch.nn.LayerNorm(semantic_dim, eps=1e-6)
        self.siglip_feat_mlp.fc1 = torch.nn.Linear(semantic_dim, hidden_dim)
        self.siglip_feat_mlp.fc2 = torch.nn.Linear(hidden_dim, dim)
        self.semantic_head = torch.nn.Module()
        self.semantic_head.norm = torch.nn.LayerNorm(dim, eps=1e-6)
        self.semantic_head.proj = torch.nn.Linear(dim, semantic_dim)
        with torch.no_grad():
            for p in self.parameters():
                p.add_(0.05 * torch.randn_like(p))

    def project(self, semantic):
        m = self.siglip_feat_mlp
        return m.fc2(torch.nn.functional.gelu(m.fc1(m.norm(semantic)), approximate="none"))

    def head(self, hidden):
        return self.semantic_head.proj(self.semantic_head.norm(hidden))


def diffusers_forward(model, latents_cl, timesteps, text):
    """Channels-last numpy in, channels-last numpy out (diffusers is channels-first)."""
    with torch.no_grad():
        out = model(
            torch.from_numpy(latents_cl).permute(0, 4, 1, 2, 3),
            torch.from_numpy(timesteps),
            torch.from_numpy(text),
            return_dict=False,
        )[0]
    return out.permute(0, 2, 3, 4, 1).numpy()


def sama_reference_forward(
    model, extras, target_cl, timesteps, text, source_cl, semantic, semantic_rope="zero"
):
    """SAMA's model_fn (reference/sama-official.md) on diffusers' Wan modules, in fp32.

    Token order [source | semantic | target]; segment embedding (0, 1, 2) added to every token
    after patch embedding; the source gets the target grid's RoPE positions; semantic tokens get
    complex-zero phasors ('zero') or identity ones; one timestep modulation; Wan head on the target
    tokens; semantic head on the last hidden states at the semantic positions."""
    with torch.no_grad():
        target = torch.from_numpy(target_cl).permute(0, 4, 1, 2, 3)
        source = torch.from_numpy(source_cl).permute(0, 4, 1, 2, 3)
        batch, _, frames, height, width = target.shape
        grid = (frames, height // 2, width // 2)
        cos_t, sin_t = model.rope(target)  # (1, S, 1, head_dim), pair-repeated
        cos_s, sin_s = model.rope(source)
        num_sem = semantic.shape[1]
        if semantic_rope == "zero":
            cos_m = torch.zeros(1, num_sem, 1, cos_t.shape[-1], dtype=cos_t.dtype)
        else:
            cos_m = torch.ones(1, num_sem, 1, cos_t.shape[-1], dtype=cos_t.dtype)
        sin_m = torch.zeros_like(cos_m)
        rotary = (torch.cat([cos_s, cos_m, cos_t], 1), torch.cat([sin_s, sin_m, sin_t], 1))

        embed = lambda x: model.patch_embedding(x).flatten(2).transpose(1, 2)
        src_tokens, tgt_tokens = embed(source), embed(target)
        sem_tokens = extras.project(torch.from_numpy(semantic))
        seg = extras.segment_embedding.weight
        x = torch.cat([src_tokens + seg[0], sem_tokens + seg[1], tgt_tokens + seg[2]], dim=1)

        temb, timestep_proj, context, _ = model.condition_embedder(
            torch.from_numpy(timesteps), torch.from_numpy(text), None
        )
        timestep_proj = timestep_proj.unflatten(1, (6, -1))
        for block in model.blocks:
            x = block(x, context, timestep_proj, rotary)

        n_src = src_tokens.shape[1]
        sem_out = extras.head(x[:, n_src : n_src + num_sem])
        shift, scale = (model.scale_shift_table + temb.unsqueeze(1)).chunk(2, dim=1)
        h = x[:, -tgt_tokens.shape[1] :]
        h = model.proj_out(model.norm_out(h) * (1 + scale) + shift)
        h = h.reshape(batch, *grid, 1, 2, 2, -1).permute(0, 1, 4, 2, 5, 3, 6, 7)
        velocity = h.reshape(batch, frames, height, width, -1)
    return velocity.numpy(), sem_out.numpy()


def save_diffusers_layout(model, folder):
    """What `save_pretrained` writes: config.json + diffusion_pytorch_model.safetensors."""
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def official_state_dict(model, extras=None):
    state = {official_name(k): v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if extras is not None:
        state.update({k: v.detach().clone().contiguous() for k, v in extras.state_dict().items()})
    return state


def save_official_sharded(state, folder, num_shards=2, prefix="diffusion_pytorch_model"):
    """Official 14B layout: <prefix>-0000i-of-0000n.safetensors + .safetensors.index.json."""
    os.makedirs(folder, exist_ok=True)
    keys = sorted(state)
    weight_map = {}
    for i in range(num_shards):
        name = f"{prefix}-{i + 1:05d}-of-{num_shards:05d}.safetensors"
        part = keys[i::num_shards]
        save_file({k: state[k] for k in part}, os.path.join(folder, name))
        weight_map.update({k: name for k in part})
    index = os.path.join(folder, f"{prefix}.safetensors.index.json")
    with open(index, "w") as f:
        json.dump({"metadata": {}, "weight_map": weight_map}, f)
    return index


def options(**kwargs):
    base = dict(dtype="float32", allow_base_wan=False, overwrite=False, num_heads=None, text_len=None, seed=0)
    base.update(kwargs)
    return types.SimpleNamespace(**base)


def rel_err(ours, ref) -> float:
    """max|a - b| / max|b|."""
    ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(ours - ref)) / np.max(np.abs(ref)))
