"""Multi-head attention kernels behind one call: TPU Pallas splash, GPU cuDNN, or plain XLA.

    out = attention(q, k, v, implementation)      q (B, Sq, H, D), k/v (B, Skv, H, D) -> (B, Sq, H, D)

Full bidirectional attention without a mask (Wan and SAMA never mask), softmax scale 1/sqrt(D).
"auto" picks by jax.default_backend(): splash on TPU, cuDNN on GPU for bf16/fp16 inputs (cuDNN's
fused kernel has no fp32 mode), XLA otherwise. Every path computes the softmax in fp32.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax.core import spmd

from sama_jax import sharding

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")

# Splash processes the sequence in tiles of this many tokens; lengths are padded up to a multiple.
SPLASH_BLOCK = 128


def resolve_implementation(implementation: str, dtype) -> str:
    """'auto' -> the kernel for this backend and dtype; other names are checked and returned."""
    if implementation not in IMPLEMENTATIONS:
        raise ValueError(f"unknown attention implementation {implementation!r}; "
                         f"choose one of {IMPLEMENTATIONS}")
    if implementation != "auto":
        return implementation
    backend = jax.default_backend()
    if backend == "tpu":
        return "splash"
    if backend == "gpu" and jnp.dtype(dtype) in (jnp.bfloat16, jnp.float16):
        return "cudnn"
    return "xla"


def attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "auto",
              splash_interpret: bool = False) -> jax.Array:
    """Softmax(q k^T / sqrt(D)) v over (B, S, H, D) arrays. `splash_interpret` runs the Pallas
    kernel in interpret mode (any backend; used to test the TPU path on CPU)."""
    implementation = resolve_implementation(implementation, q.dtype)
    if implementation == "xla":
        return xla_attention(q, k, v)
    if implementation == "cudnn":
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"cuDNN attention needs bfloat16/float16 inputs, got {q.dtype}; "
                             "use compute_dtype=bfloat16 or attention='xla'")
        return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    return splash_attention(q, k, v, interpret=splash_interpret)


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array) -> jax.Array:
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    weights = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, interpret: bool = False) -> jax.Array:
    """Pallas splash attention. Under a mesh it runs per shard (shard_map): batch and heads split as
    the activations are, queries split along 'length', keys/values gathered whole."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = spmd.get_logical_axis_rules()
    kernel = functools.partial(_splash_local, interpret=interpret)
    if mesh.empty or not rules:
        return kernel(q, k, v)
    q_spec = sharding.logical_to_mesh_spec(("batch", "length", "act_heads", None), rules)
    kv_spec = sharding.logical_to_mesh_spec(("batch", None, "act_heads", None), rules)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v)


def _splash_local(q, k, v, interpret):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    q_pad, kv_pad = -q_len % SPLASH_BLOCK, -kv_len % SPLASH_BLOCK
    # Padded keys get their own segment id so no query attends to them; padded query rows attend to
    # the real keys (never an empty softmax row) and are sliced off.
    segment_ids = sk.SegmentIds(
        q=jnp.zeros((q_len + q_pad,), jnp.int32),
        kv=(jnp.arange(kv_len + kv_pad) >= kv_len).astype(jnp.int32))
    mask = sm.MultiHeadMask([sm.FullMask((q_len + q_pad, kv_len + kv_pad))] * heads)
    kernel = sk.make_splash_mha_single_device(mask, interpret=interpret)
    # Splash takes (H, S, D) per example and does not scale the logits itself.
    scale = 1.0 / math.sqrt(head_dim)
    qh = jnp.pad((q * scale).astype(q.dtype), ((0, 0), (0, q_pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    kh = jnp.pad(k, ((0, 0), (0, kv_pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    vh = jnp.pad(v, ((0, 0), (0, kv_pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    out = jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=segment_ids))(qh, kh, vh)
    return out.transpose(0, 2, 1, 3)[:, :q_len]
