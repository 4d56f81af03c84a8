"""Wan2.1 video diffusion transformer with SAMA's semantic anchoring, in Flax NNX.

    velocity, semantic_velocity = WanDiT(config, rngs=...)(
        target_latents (B, F, H, W, in_dim), timesteps (B,) in [0, 1000], text (B, L, text_dim),
        source_latents=None (B, F', H', W', in_dim), semantic_tokens=None (B, N, semantic_dim))

Channels-last. Without source and semantic tokens (and with the zero segment embedding of a base
Wan checkpoint) this is exactly Wan2.1 T2V. SAMA (reference/sama-official.md): tokens are ordered
[source | semantic | target]; a segment embedding (0 source, 1 semantic, 2 target) is added to every
token after patch embedding; source tokens take RoPE positions from their own grid starting at 0,
i.e. the target's positions token for token; semantic tokens enter through an MLP projector and get
zero rotary phasors (their q and k are exactly 0); one timestep modulation for all tokens; the
semantic head reads the last hidden states at the semantic positions, unmodulated.

Precision (config): parameters in `param_dtype`, matmuls in `compute_dtype`; with
residual_dtype='float32' (the official code) the residual stream, the modulation, the time MLP and
the heads stay fp32 whatever the compute dtype. LayerNorm/RMSNorm statistics are always fp32.
Blocks are stacked (leading 'layers' axis) and run with nnx.scan (scan_layers=False: a Python
loop); `remat` is none | full | attention (keep only the attention outputs). GELU and the norms
have hand-written backward passes that keep one residual each.

Context parallelism: called inside `sharding.use_mesh(mesh, rules)` where 'length' maps to mesh
axes of total size > 1, the model pads the token sequence to a multiple of that size (padded keys
masked, padded tokens dropped before the heads) and runs self-attention as `context_parallel` says
(auto | ulysses | ring, models/attention.py); cross-attention keeps the queries sequence-sharded
against whole text keys/values. Nothing else changes for the caller: the same call, the same
results, under jit, grad and any remat policy.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sama_jax import config as config_lib
from sama_jax import params_io, sharding
from sama_jax.models import attention as attention_lib
from sama_jax.models import rope
from sama_jax.models.attention import CONTEXT_PARALLEL, IMPLEMENTATIONS, attention

KIND = "wan_dit"
REMAT_POLICIES = ("none", "full", "attention")
PRECISION_FIELDS = (
    "param_dtype",
    "compute_dtype",
    "residual_dtype",
    "attention",
    "remat",
    "context_parallel",
    "scan_layers",
)


@dataclasses.dataclass(frozen=True)
class WanDiTConfig:
    dim: int
    ffn_dim: int
    num_heads: int
    num_layers: int
    freq_dim: int = 256
    text_dim: int = 4096
    in_dim: int = 16
    out_dim: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    eps: float = 1e-6
    text_len: int = 512
    semantic_dim: int = 1152
    semantic_hidden_dim: int = 1024
    num_segments: int = 3
    rope_theta: float = 10000.0
    semantic_rope: str = "zero"  # zero (SAMA) | identity
    param_dtype: str = "float32"
    compute_dtype: str = "float32"
    residual_dtype: str = "float32"  # float32 (official Wan) | the compute dtype (all-bf16)
    attention: str = "auto"  # auto | xla | cudnn | splash
    remat: str = "none"  # none | full | attention
    context_parallel: str = "auto"  # auto | ulysses | ring (used when the mesh has context > 1)
    scan_layers: bool = True  # nnx.scan over the stacked blocks; False: a Python loop

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if self.dim % self.num_heads:
            raise ValueError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        if self.attention not in IMPLEMENTATIONS:
            raise ValueError(f"attention {self.attention!r} not in {IMPLEMENTATIONS}")
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"remat {self.remat!r} not in {REMAT_POLICIES}")
        if self.context_parallel not in CONTEXT_PARALLEL:
            raise ValueError(f"context_parallel {self.context_parallel!r} not in {CONTEXT_PARALLEL}")
        rope.constant_phasors(0, 2, self.semantic_rope)  # validates the mode

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_config(
        cls, section: Mapping[str, Any], precision: Mapping[str, Any] | None = None
    ) -> "WanDiTConfig":
        """From a config's model.dit section and precision section."""
        return config_lib.dataclass_from_section(cls, section, precision, "model.dit")

    def architecture(self) -> dict:
        """The fields that define the weights (what a checkpoint stores); precision is per run."""
        return {k: v for k, v in dataclasses.asdict(self).items() if k not in PRECISION_FIELDS}


def _p(init, names):
    return sharding.annotated(init, names)


_xavier = nnx.initializers.xavier_uniform()
_zeros = nnx.initializers.zeros_init()
_ones = nnx.initializers.ones_init()


class Linear(nnx.Linear):
    """nnx.Linear with room for a low-rank adapter beside it: y = x W + b + adapter(x). The adapter
    (sama_jax.lora_train) holds its own variable type, so nnx filters keep it apart from the frozen W;
    W and b keep nnx.Linear's parameter paths, so checkpoints are the same with or without one."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lora = nnx.data(None)

    def __call__(self, x):
        y = super().__call__(x)
        return y if self.lora is None else y + self.lora(x.astype(y.dtype))


def _linear(cfg, din, dout, names, rngs, dtype=None, kernel_init=_xavier, bias_init=_zeros):
    return Linear(
        din,
        dout,
        dtype=dtype or cfg.compute_dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=_p(kernel_init, names),
        bias_init=_p(bias_init, names[1:]),
        rngs=rngs,
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2))
def _normalize(x, eps, center):
    """fp32 (x - mean) / std over the last axis (LayerNorm, center=True) or x / rms (RMSNorm)."""
    return _normalize_fwd(x, eps, center)[0]


# The backward needs only the normalised output (which the following scale multiply keeps anyway)
# and the per-token 1/std: autodiff of the formula would keep x, x - mean and y, three
# (tokens x dim) fp32 arrays per norm, six norms per block.
def _normalize_fwd(x, eps, center):
    dtype_token = jnp.zeros((0,), x.dtype)  # the gradient goes back in the input's dtype
    x = x.astype(jnp.float32)
    if center:
        x = x - jnp.mean(x, axis=-1, keepdims=True)
    inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(x), axis=-1, keepdims=True) + eps)
    y = x * inv_std
    return y, (y, inv_std, dtype_token)


def _normalize_bwd(eps, center, residuals, g):
    y, inv_std, dtype_token = residuals
    g = g.astype(jnp.float32)
    dx = g - y * jnp.mean(g * y, axis=-1, keepdims=True)
    if center:
        dx = dx - jnp.mean(g, axis=-1, keepdims=True)
    return ((dx * inv_std).astype(dtype_token.dtype),)


_normalize.defvjp(_normalize_fwd, _normalize_bwd)


def _layer_norm_stats(x, eps):
    return _normalize(x, eps, True)


class LayerNorm(nnx.Module):
    """Affine LayerNorm computed in fp32 (Wan's norm3 and SAMA's projector/head norms)."""

    def __init__(self, dim, eps, param_dtype, names, rngs):
        self.eps = eps
        self.scale = nnx.Param(_p(_ones, names)(rngs.params(), (dim,), param_dtype))
        self.bias = nnx.Param(_p(_zeros, names)(rngs.params(), (dim,), param_dtype))

    def __call__(self, x):
        y = _layer_norm_stats(x, self.eps)
        return y * self.scale.value.astype(jnp.float32) + self.bias.value.astype(jnp.float32)


class RMSNorm(nnx.Module):
    """RMSNorm over the full projected width (all heads together), as Wan's norm_q / norm_k."""

    def __init__(self, dim, eps, param_dtype, rngs):
        self.eps = eps
        self.scale = nnx.Param(_p(_ones, ("heads",))(rngs.params(), (dim,), param_dtype))

    def __call__(self, x):
        y = _normalize(x, self.eps, False)
        # Official order: normalise in fp32, back to the activation dtype, then scale.
        return y.astype(x.dtype) * self.scale.value.astype(x.dtype)


class MLP(nnx.Module):
    def __init__(
        self,
        cfg,
        din,
        dhidden,
        dout,
        activation,
        rngs,
        dtype=None,
        names=(("embed", "mlp"), ("mlp", "embed")),
        init=_xavier,
    ):
        self.fc1 = _linear(cfg, din, dhidden, names[0], rngs, dtype, kernel_init=init)
        self.fc2 = _linear(cfg, dhidden, dout, names[1], rngs, dtype, kernel_init=init)
        self.activation = activation

    def __call__(self, x):
        return self.fc2(self.activation(self.fc1(x)))


@jax.custom_vjp
def gelu_tanh(x):
    return jax.nn.gelu(x, approximate=True)


# Autodiff of the tanh formula keeps ~4 extra (tokens x ffn_dim) intermediates per layer for the
# backward (x^2, x^3, the tanh, ...): the largest activations of the block. The derivative needs
# only x, so that is all this saves (as PyTorch's fused gelu does).
_GELU_C = math.sqrt(2.0 / math.pi)
_GELU_A = 0.044715


def _gelu_tanh_fwd(x):
    return gelu_tanh(x), x


def _gelu_tanh_bwd(x, g):
    x32 = x.astype(jnp.float32)
    t = jnp.tanh(_GELU_C * (x32 + _GELU_A * x32**3))
    grad = 0.5 * (1 + t) + 0.5 * x32 * (1 - t * t) * _GELU_C * (1 + 3 * _GELU_A * x32 * x32)
    return ((g.astype(jnp.float32) * grad).astype(g.dtype),)


gelu_tanh.defvjp(_gelu_tanh_fwd, _gelu_tanh_bwd)


def gelu_erf(x):
    return jax.nn.gelu(x, approximate=False)


class Attention(nnx.Module):
    """Wan self/cross attention: q/k RMS-normalised over all heads before the split and RoPE."""

    def __init__(self, cfg: WanDiTConfig, rngs):
        self.cfg = cfg
        self.q = _linear(cfg, cfg.dim, cfg.dim, ("embed", "heads"), rngs)
        self.k = _linear(cfg, cfg.dim, cfg.dim, ("embed", "heads"), rngs)
        self.v = _linear(cfg, cfg.dim, cfg.dim, ("embed", "heads"), rngs)
        self.o = _linear(cfg, cfg.dim, cfg.dim, ("heads", "embed"), rngs)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps, cfg.param_dtype, rngs)
        self.norm_k = RMSNorm(cfg.dim, cfg.eps, cfg.param_dtype, rngs)

    def __call__(self, x, context=None, phasors=None, kv_valid=None):
        """Self-attention when context is None (keys >= kv_valid masked: sequence padding), else
        cross-attention to context."""
        cfg = self.cfg
        kv_input = x if context is None else context
        heads = lambda t: t.reshape(*t.shape[:2], cfg.num_heads, cfg.head_dim)
        q = heads(self.norm_q(self.q(x)))
        k = heads(self.norm_k(self.k(kv_input)))
        v = heads(self.v(kv_input))
        if phasors is not None:
            q = rope.apply_rope(q, *phasors)
            k = rope.apply_rope(k, *phasors)
        q = sharding.constrain(q, ("batch", "length", "act_heads", None))
        kv_names = ("batch", "length" if context is None else None, "act_heads", None)
        k = sharding.constrain(k, kv_names)
        v = sharding.constrain(v, kv_names)
        if context is None:
            out = attention_lib.self_attention(q, k, v, cfg.attention, cfg.context_parallel, kv_valid)
        else:
            # Queries stay sequence-sharded; the text keys/values are whole on every context shard.
            out = attention(q, k, v, cfg.attention)
        out = checkpoint_name(out, "attention")
        return self.o(out.reshape(*out.shape[:2], cfg.dim))


class WanBlock(nnx.Module):
    def __init__(self, cfg: WanDiTConfig, rngs):
        self.cfg = cfg
        self.modulation = nnx.Param(
            _p(nnx.initializers.normal(1.0 / math.sqrt(cfg.dim)), (None, None, "embed"))(
                rngs.params(), (1, 6, cfg.dim), cfg.param_dtype
            )
        )
        self.self_attn = Attention(cfg, rngs)
        self.norm3 = LayerNorm(cfg.dim, cfg.eps, cfg.param_dtype, ("embed",), rngs)
        self.cross_attn = Attention(cfg, rngs)
        self.ffn = MLP(cfg, cfg.dim, cfg.ffn_dim, cfg.dim, gelu_tanh, rngs)

    def __call__(self, x, context, e0, phasors, kv_valid=None):
        cfg = self.cfg
        rd, cd = x.dtype, jnp.dtype(cfg.compute_dtype)
        mod = self.modulation.value.astype(rd) + e0
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=1)
        norm = lambda t: _layer_norm_stats(t, cfg.eps).astype(rd)

        y = self.self_attn(
            (norm(x) * (1 + scale_msa) + shift_msa).astype(cd), phasors=phasors, kv_valid=kv_valid
        )
        x = x + y.astype(rd) * gate_msa
        x = x + self.cross_attn(self.norm3(x).astype(cd), context=context).astype(rd)
        y = self.ffn((norm(x) * (1 + scale_mlp) + shift_mlp).astype(cd))
        x = x + y.astype(rd) * gate_mlp
        return sharding.constrain(x, ("batch", "length", "act_embed"))


class Head(nnx.Module):
    """Wan's output head: LayerNorm modulated by (modulation + e), then Linear to patch pixels."""

    def __init__(self, cfg: WanDiTConfig, rngs):
        self.eps = cfg.eps
        self.modulation = nnx.Param(
            _p(nnx.initializers.normal(1.0 / math.sqrt(cfg.dim)), (None, None, "embed"))(
                rngs.params(), (1, 2, cfg.dim), cfg.param_dtype
            )
        )
        self.head = _linear(
            cfg,
            cfg.dim,
            cfg.out_dim * math.prod(cfg.patch_size),
            ("embed", None),
            rngs,
            dtype=cfg.residual_dtype,
        )

    def __call__(self, x, e):
        rd = x.dtype
        shift, scale = jnp.split(self.modulation.value.astype(rd) + e[:, None, :], 2, axis=1)
        return self.head((_layer_norm_stats(x, self.eps).astype(rd) * (1 + scale) + shift))


class SemanticProjector(nnx.Module):
    """SAMA's SigLIPFeatMLP: LN(semantic_dim) -> Linear -> GELU(erf) -> Linear(-> dim)."""

    def __init__(self, cfg: WanDiTConfig, rngs):
        self.norm = LayerNorm(cfg.semantic_dim, 1e-6, cfg.param_dtype, (None,), rngs)
        self.fc1 = _linear(cfg, cfg.semantic_dim, cfg.semantic_hidden_dim, (None, "mlp"), rngs)
        self.fc2 = _linear(cfg, cfg.semantic_hidden_dim, cfg.dim, ("mlp", "embed"), rngs)

    def __call__(self, x, cd):
        return self.fc2(gelu_erf(self.fc1(self.norm(x).astype(cd))))


class SemanticHead(nnx.Module):
    """SAMA's SemanticDiffusionHead: LN(dim) -> Linear(dim -> semantic_dim), no modulation."""

    def __init__(self, cfg: WanDiTConfig, rngs):
        self.norm = LayerNorm(cfg.dim, 1e-6, cfg.param_dtype, ("embed",), rngs)
        self.proj = _linear(cfg, cfg.dim, cfg.semantic_dim, ("embed", None), rngs, dtype=cfg.residual_dtype)

    def __call__(self, x):
        return self.proj(self.norm(x).astype(x.dtype))


def timestep_sinusoid(timesteps: jax.Array, dim: int) -> jax.Array:
    """[cos, sin] of t * 10000^(-i/(dim/2)), i < dim/2 (cos first, as Wan)."""
    half = dim // 2
    freqs = jnp.asarray(np.power(10000.0, -np.arange(half, dtype=np.float64) / half), jnp.float32)
    angles = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
    return jnp.concatenate([jnp.cos(angles), jnp.sin(angles)], axis=-1)


class PatchEmbedding(nnx.Module):
    """Wan's Conv3d with kernel = stride = patch_size, kept as a (pt, ph, pw, in, dim) kernel and
    applied as one matmul over non-overlapping patches (see WanDiT.patchify)."""

    def __init__(self, cfg: WanDiTConfig, rngs):
        self.kernel = nnx.Param(
            _p(_xavier, (None, None, None, None, "embed"))(
                rngs.params(), (*cfg.patch_size, cfg.in_dim, cfg.dim), cfg.param_dtype
            )
        )
        self.bias = nnx.Param(_p(_zeros, ("embed",))(rngs.params(), (cfg.dim,), cfg.param_dtype))


class WanDiT(nnx.Module):
    def __init__(self, cfg: WanDiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        rd = cfg.residual_dtype
        self.patch_embedding = PatchEmbedding(cfg, rngs)
        self.text_embedding = MLP(
            cfg, cfg.text_dim, cfg.dim, cfg.dim, gelu_tanh, rngs, names=((None, "embed"), ("embed", None))
        )
        self.time_embedding = MLP(
            cfg,
            cfg.freq_dim,
            cfg.dim,
            cfg.dim,
            jax.nn.silu,
            rngs,
            dtype=rd,
            names=((None, "embed"), ("embed", None)),
        )
        self.time_projection = _linear(cfg, cfg.dim, 6 * cfg.dim, ("embed", None), rngs, dtype=rd)

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return WanBlock(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.head = Head(cfg, rngs)
        # Zero, as SAMA's loader leaves it for a base Wan checkpoint: a no-op until trained.
        self.segment_embedding = nnx.Param(
            _p(_zeros, (None, "embed"))(rngs.params(), (cfg.num_segments, cfg.dim), cfg.param_dtype)
        )
        self.siglip_feat_mlp = SemanticProjector(cfg, rngs)
        self.semantic_head = SemanticHead(cfg, rngs)

    # -- pieces --------------------------------------------------------------------------------
    def patchify(self, latents: jax.Array) -> tuple[jax.Array, tuple[int, int, int]]:
        """(B, F, H, W, C) -> tokens (B, f*h*w, dim) in (f, h, w) order, and the grid (f, h, w)."""
        cfg = self.cfg
        b, f, h, w, c = latents.shape
        pt, ph, pw = cfg.patch_size
        if c != cfg.in_dim or f % pt or h % ph or w % pw:
            raise ValueError(
                f"latents of shape {latents.shape} do not fit the model: need "
                f"channels {cfg.in_dim} and F, H, W divisible by patch {cfg.patch_size}"
            )
        grid = (f // pt, h // ph, w // pw)
        x = latents.reshape(b, grid[0], pt, grid[1], ph, grid[2], pw, c)
        x = x.transpose(0, 1, 3, 5, 2, 4, 6, 7).astype(cfg.compute_dtype)
        kernel = self.patch_embedding.kernel.value.astype(cfg.compute_dtype)
        tokens = jnp.einsum("bfhwpqrc,pqrcd->bfhwd", x, kernel, preferred_element_type=jnp.float32)
        tokens = tokens + self.patch_embedding.bias.value.astype(jnp.float32)
        return tokens.reshape(b, -1, cfg.dim).astype(cfg.residual_dtype), grid

    def unpatchify(self, tokens: jax.Array, grid) -> jax.Array:
        """(B, f*h*w, prod(patch)*out_dim) -> (B, F, H, W, out_dim)."""
        b = tokens.shape[0]
        pt, ph, pw = self.cfg.patch_size
        x = tokens.reshape(b, *grid, pt, ph, pw, self.cfg.out_dim)
        x = x.transpose(0, 1, 4, 2, 5, 3, 6, 7)
        return x.reshape(b, grid[0] * pt, grid[1] * ph, grid[2] * pw, self.cfg.out_dim)

    def embed_text(self, text: jax.Array) -> jax.Array:
        cfg = self.cfg
        if text.ndim != 3 or text.shape[-1] != cfg.text_dim or text.shape[1] > cfg.text_len:
            raise ValueError(f"text of shape {text.shape}: expected (B, L <= {cfg.text_len}, {cfg.text_dim})")
        # Zero-pad to text_len BEFORE the MLP: padded positions are attended as text_embedding(0).
        text = jnp.pad(text, ((0, 0), (0, cfg.text_len - text.shape[1]), (0, 0)))
        return self.text_embedding(text.astype(cfg.compute_dtype))

    def embed_time(self, timesteps: jax.Array) -> tuple[jax.Array, jax.Array]:
        """-> e (B, dim) for the head and e0 (B, 6, dim) for the blocks, in the residual dtype."""
        cfg = self.cfg
        sinusoid = timestep_sinusoid(timesteps, cfg.freq_dim).astype(cfg.residual_dtype)
        e = self.time_embedding(sinusoid)
        e0 = self.time_projection(jax.nn.silu(e)).reshape(-1, 6, cfg.dim)
        return e, sharding.constrain(e0, ("batch", None, "act_embed"))

    def run_blocks(self, x, context, e0, phasors, kv_valid=None):
        remat = self.cfg.remat

        def layer(block, x):
            return block(x, context, e0, phasors, kv_valid)

        if remat == "full":
            layer = nnx.remat(layer)
        elif remat == "attention":
            layer = nnx.remat(layer, policy=jax.checkpoint_policies.save_only_these_names("attention"))

        if not self.cfg.scan_layers:
            # One copy of the block per layer in the program: longer compiles, but no per-layer
            # dynamic-slice of the stacked weights and no stacked gradient accumulators, which on
            # XLA:CPU cost as much as the matmuls at short sequences.
            graphdef, state = nnx.split(self.blocks)
            for i in range(self.cfg.num_layers):
                x = layer(nnx.merge(graphdef, jax.tree.map(lambda p: p[i], state)), x)
            return x

        @nnx.scan(
            in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"}
        )
        def scan(x, block):
            return layer(block, x)

        return scan(x, self.blocks)

    # -- forward -------------------------------------------------------------------------------
    def __call__(self, target_latents, timesteps, text, source_latents=None, semantic_tokens=None):
        cfg = self.cfg
        rd, cd = jnp.dtype(cfg.residual_dtype), jnp.dtype(cfg.compute_dtype)
        segment = self.segment_embedding.value.astype(rd)
        target, grid = self.patchify(target_latents)

        tokens, cos, sin = [], [], []
        if source_latents is not None:
            source, source_grid = self.patchify(source_latents)
            tokens.append(source + segment[0])
            # Positions from the source's own grid, starting at 0: shared with the target.
            for table, out in zip(rope.grid_phasors(source_grid, cfg.head_dim, cfg.rope_theta), (cos, sin)):
                out.append(table)
        num_semantic = 0
        if semantic_tokens is not None:
            if semantic_tokens.ndim != 3 or semantic_tokens.shape[-1] != cfg.semantic_dim:
                raise ValueError(
                    f"semantic_tokens of shape {semantic_tokens.shape}: expected (B, N, {cfg.semantic_dim})"
                )
            num_semantic = semantic_tokens.shape[1]
            projected = self.siglip_feat_mlp(semantic_tokens, cd).astype(rd)
            tokens.append(projected + segment[1])
            for table, out in zip(
                rope.constant_phasors(num_semantic, cfg.head_dim, cfg.semantic_rope), (cos, sin)
            ):
                out.append(table)
        tokens.append(target + segment[2])
        for table, out in zip(rope.grid_phasors(grid, cfg.head_dim, cfg.rope_theta), (cos, sin)):
            out.append(table)
        num_source = tokens[0].shape[1] if source_latents is not None else 0
        num_target = target.shape[1]

        x = jnp.concatenate(tokens, axis=1)
        cos, sin = np.concatenate(cos), np.concatenate(sin)
        # Context parallelism splits the tokens evenly: pad to a multiple of the context axis with
        # tokens that no query attends to (kv_valid) and that are dropped before the heads.
        num_tokens = x.shape[1]
        pad = -num_tokens % attention_lib.context_size()
        kv_valid = num_tokens if pad else None
        if pad:
            x = jnp.pad(x, ((0, 0), (0, pad), (0, 0)))
            cos = np.pad(cos, ((0, pad), (0, 0)), constant_values=1.0)
            sin = np.pad(sin, ((0, pad), (0, 0)))
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        phasors = (jnp.asarray(cos), jnp.asarray(sin))
        e, e0 = self.embed_time(timesteps)
        context = self.embed_text(text)
        x = self.run_blocks(x, context, e0, phasors, kv_valid)[:, :num_tokens]

        semantic_velocity = None
        if semantic_tokens is not None:
            semantic_velocity = self.semantic_head(x[:, num_source : num_source + num_semantic])
        velocity = self.unpatchify(self.head(x[:, num_tokens - num_target :], e), grid)
        return velocity, semantic_velocity


def abstract_dit(cfg: WanDiTConfig) -> WanDiT:
    """The model with shapes and annotations but no allocated parameters."""
    return nnx.eval_shape(lambda: WanDiT(cfg, rngs=nnx.Rngs(0)))


def load_dit(path: str, *, mesh=None, rules=None, precision: Mapping[str, Any] | None = None) -> WanDiT:
    """A WanDiT from a params checkpoint written by `convert-wan-weights` (or `save_dit`).

    `precision` (a config's precision section) sets the run-time fields (param_dtype,
    compute_dtype, residual_dtype, attention, remat). With `mesh`, parameters are restored straight
    into their shardings from the logical annotations under `rules`."""
    return params_io.load_module(
        path,
        KIND,
        lambda stored: WanDiT(
            WanDiTConfig.from_config(*params_io.split_precision(stored, precision)), rngs=nnx.Rngs(0)
        ),
        mesh,
        rules,
    )


def save_dit(path: str, model: WanDiT, overwrite: bool = False) -> None:
    """Writes a model's parameters as a params checkpoint that `load_dit` reads."""
    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    params_io.save_params(path, params, KIND, model.cfg.architecture(), overwrite=overwrite)
