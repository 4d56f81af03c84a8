"""umT5-XXL encoder (Wan2.1's text encoder) in Flax NNX.

Reads like the official Wan2.1 `wan/modules/t5.py` encoder (shared_pos=False): token embedding, then
per layer x += Attn(RMSNorm(x)) with the layer's own relative position bias, x += FFN(RMSNorm(x)),
then a final RMSNorm. T5 conventions: no 1/sqrt(d) attention scaling, no biases, RMS norms computed
in fp32, gated FFN fc2(fc1(x) * gelu_tanh(gate(x))). Layers are stacked and run with nnx.scan.

    model = load_text_encoder("ckpt/umt5")          # written by convert-wan-weights --kind umt5
    hidden = model(ids, mask)                        # (B, L) int ids, (B, L) 0/1 mask -> (B, L, dim)

The text pipeline (cleaning, tokenizer, zeroing past the true length) is sama_jax.text.
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sama_jax import config as config_lib
from sama_jax import params_io, sharding

KIND = "umt5"


@dataclasses.dataclass(frozen=True)
class UMT5Config:
    vocab_size: int = 256384
    dim: int = 4096
    ffn_dim: int = 10240
    num_heads: int = 64
    num_layers: int = 24
    num_buckets: int = 32
    max_distance: int = 128
    eps: float = 1e-6
    text_len: int = 512
    compute_dtype: str = "float32"  # the official pipeline runs bf16
    param_dtype: str = "float32"  # dtype of freshly initialised parameters

    @property
    def head_dim(self) -> int:
        return self.dim // self.num_heads

    @classmethod
    def from_config(cls, section, precision=None) -> "UMT5Config":
        """From a config's model.text_encoder section and precision section."""
        return config_lib.dataclass_from_section(cls, section, precision, "model.text_encoder")


def relative_position_buckets(
    query_len: int, key_len: int, num_buckets: int, max_distance: int
) -> np.ndarray:
    """T5's bidirectional bucket of (key - query) for every (query, key) pair, as int32 (Lq, Lk).

    Half the buckets per direction; exact buckets for distances below max_exact = num_buckets // 4,
    log-spaced buckets up to max_distance, beyond which distances share the last bucket. Computed in
    float32 with the reference's operation order so bucket edges land where PyTorch puts them.
    """
    relative = np.arange(key_len)[None, :] - np.arange(query_len)[:, None]
    num_buckets //= 2
    buckets = (relative > 0).astype(np.int64) * num_buckets
    distance = np.abs(relative)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # Distances below max_exact take the exact branch; clamping keeps log() finite for them.
    log_ratio = np.log(np.maximum(distance, 1).astype(np.float32) / np.float32(max_exact)) / np.float32(
        math.log(max_distance / max_exact)
    )
    large = max_exact + (log_ratio * np.float32(num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(is_small, distance, large)).astype(np.int32)


class RMSNorm(nnx.Module):
    """T5 layer norm: x / rms(x) in fp32, cast to the compute dtype, times a learned scale."""

    def __init__(self, dim: int, eps: float, dtype, param_dtype):
        self.eps = eps
        self.dtype = dtype
        self.scale = nnx.Param(jnp.ones((dim,), param_dtype), eager_sharding=False, out_sharding=(None,))

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        x32 = x32 * jax.lax.rsqrt(jnp.mean(jnp.square(x32), axis=-1, keepdims=True) + self.eps)
        return self.scale[...].astype(self.dtype) * x32.astype(self.dtype)


def _linear(d_in, d_out, names, cfg, rngs):
    init = nnx.initializers.normal(d_in**-0.5)
    return nnx.Linear(
        d_in,
        d_out,
        use_bias=False,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=sharding.annotated(init, names),
        rngs=rngs,
    )


class Attention(nnx.Module):
    def __init__(self, cfg: UMT5Config, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        self.q = _linear(cfg.dim, cfg.dim, ("embed", "heads"), cfg, rngs)
        self.k = _linear(cfg.dim, cfg.dim, ("embed", "heads"), cfg, rngs)
        self.v = _linear(cfg.dim, cfg.dim, ("embed", "heads"), cfg, rngs)
        self.o = _linear(cfg.dim, cfg.dim, ("heads", "embed"), cfg, rngs)

    def __call__(self, x: jax.Array, bias: jax.Array) -> jax.Array:
        """x (B, L, dim); bias (B or 1, H, L, L) fp32 = relative position bias + key mask."""
        b, n = x.shape[:2]
        split = lambda t: t.reshape(b, n, self.num_heads, -1)
        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        q = sharding.constrain(q, ("batch", None, "act_heads", None))
        # T5 folds the scale into the initialisation: logits are q.k without 1/sqrt(d).
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) + bias
        weights = jax.nn.softmax(logits, axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, -1)
        return self.o(out)


class FeedForward(nnx.Module):
    def __init__(self, cfg: UMT5Config, rngs: nnx.Rngs):
        # Official names: gate = ffn.gate.0 (the GELU branch, transformers' wi_0), fc1 = wi_1, fc2 = wo.
        self.gate = _linear(cfg.dim, cfg.ffn_dim, ("embed", "mlp"), cfg, rngs)
        self.fc1 = _linear(cfg.dim, cfg.ffn_dim, ("embed", "mlp"), cfg, rngs)
        self.fc2 = _linear(cfg.ffn_dim, cfg.dim, ("mlp", "embed"), cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = self.fc1(x) * jax.nn.gelu(self.gate(x), approximate=True)
        hidden = sharding.constrain(hidden, ("batch", None, "mlp"))
        return self.fc2(hidden)


class Block(nnx.Module):
    def __init__(self, cfg: UMT5Config, rngs: nnx.Rngs):
        dtype, param_dtype = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
        self.num_buckets, self.max_distance = cfg.num_buckets, cfg.max_distance
        self.norm1 = RMSNorm(cfg.dim, cfg.eps, dtype, param_dtype)
        self.attn = Attention(cfg, rngs)
        self.norm2 = RMSNorm(cfg.dim, cfg.eps, dtype, param_dtype)
        self.ffn = FeedForward(cfg, rngs)
        # umT5: every layer has its own relative position bias table (num_buckets, num_heads).
        self.pos_embedding = nnx.Embed(
            cfg.num_buckets,
            cfg.num_heads,
            dtype=jnp.float32,
            param_dtype=param_dtype,
            embedding_init=sharding.annotated(nnx.initializers.normal(cfg.dim**-0.5), (None, "heads")),
            rngs=rngs,
        )

    def __call__(self, x: jax.Array, key_mask_bias: jax.Array) -> jax.Array:
        n = x.shape[1]
        buckets = relative_position_buckets(n, n, self.num_buckets, self.max_distance)
        position_bias = self.pos_embedding(jnp.asarray(buckets)).transpose(2, 0, 1)[None]
        x = x + self.attn(self.norm1(x), position_bias + key_mask_bias)
        x = x + self.ffn(self.norm2(x))
        return sharding.constrain(x, ("batch", "length", "act_embed"))


class UMT5Encoder(nnx.Module):
    def __init__(self, cfg: UMT5Config, *, rngs: nnx.Rngs):
        self.cfg = cfg
        dtype, param_dtype = jnp.dtype(cfg.compute_dtype), jnp.dtype(cfg.param_dtype)
        self.token_embedding = nnx.Embed(
            cfg.vocab_size,
            cfg.dim,
            dtype=dtype,
            param_dtype=param_dtype,
            embedding_init=sharding.annotated(nnx.initializers.normal(1.0), ("vocab", "embed")),
            rngs=rngs,
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(rngs):
            return Block(cfg, rngs)

        self.blocks = make_blocks(rngs)
        self.norm = RMSNorm(cfg.dim, cfg.eps, dtype, param_dtype)

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """ids (B, L) int; mask (B, L), 1 for real tokens -> last hidden state (B, L, dim).

        Padded keys are masked out of attention (as the reference does); the outputs at padded
        positions are computed but meaningless: sama_jax.text.encode zeroes them."""
        x = self.token_embedding(ids)
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        key_mask_bias = jnp.where(mask[:, None, None, :] > 0, 0.0, jnp.finfo(jnp.float32).min).astype(
            jnp.float32
        )

        @nnx.scan(
            in_axes=(nnx.Carry, 0, None),
            out_axes=nnx.Carry,
            transform_metadata={nnx.PARTITION_NAME: "layers"},
        )
        def run_blocks(x, block, key_mask_bias):
            return block(x, key_mask_bias)

        x = run_blocks(x, self.blocks, key_mask_bias)
        return self.norm(x)


def load_text_encoder(path: str, *, mesh=None, rules=None, precision=None) -> UMT5Encoder:
    """umT5 encoder from a params checkpoint written by `convert-wan-weights --kind umt5`.

    `precision` (a config's precision section) sets param_dtype / compute_dtype (default: the
    checkpoint's stored dtype). With `mesh`, parameters are restored straight onto it by their
    logical axis names under `rules` (default sharding.DEFAULT_RULES)."""
    return params_io.load_module(
        path,
        KIND,
        lambda stored: UMT5Encoder(
            UMT5Config.from_config(*params_io.split_precision(stored, precision)), rngs=nnx.Rngs(0)
        ),
        mesh,
        rules,
    )
