"""Multi-head attention kernels behind one call: TPU Pallas splash, GPU cuDNN, or plain XLA; and
context parallelism of self-attention over the mesh axis that 'length' maps to.

    out = attention(q, k, v, implementation)      q (B, Sq, H, D), k/v (B, Skv, H, D) -> (B, Sq, H, D)
    out = self_attention(q, k, v, implementation, context_parallel, kv_valid)

Full bidirectional attention (Wan and SAMA never mask), softmax scale 1/sqrt(D). `kv_valid` (a
static int) masks keys at positions >= kv_valid: the tokens WanDiT appends so that the sequence
divides the context axis. "auto" picks by jax.default_backend(): splash on TPU, cuDNN on GPU for
bf16/fp16 inputs (cuDNN's fused kernel has no fp32 mode), XLA otherwise. Every path computes the
softmax in fp32.

Context parallelism (q, k, v sequence-sharded over the context axis):
  ulysses  all_to_all to head-sharded full sequences, the local kernel above, all_to_all back;
           needs the per-device head count (after tensor sharding) divisible by the context size.
  ring     each device keeps its query block and passes its key/value block around the ring
           (ppermute), accumulating an online softmax; any head count; XLA einsums per block.
  auto     ulysses where the heads divide, ring otherwise.
"""
from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax.core import spmd
from jax.sharding import PartitionSpec

from sama_jax import sharding

IMPLEMENTATIONS = ("auto", "xla", "cudnn", "splash")
CONTEXT_PARALLEL = ("auto", "ulysses", "ring")

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
              splash_interpret: bool = False, kv_valid: int | None = None) -> jax.Array:
    """Softmax(q k^T / sqrt(D)) v over (B, S, H, D) arrays, keys >= kv_valid masked out.
    `splash_interpret` runs the Pallas kernel in interpret mode (any backend; used to test the TPU
    path on CPU). Under a mesh, splash runs per shard; XLA and cuDNN are partitioned by XLA."""
    implementation = resolve_implementation(implementation, q.dtype)
    if implementation == "splash":
        return splash_attention(q, k, v, interpret=splash_interpret, kv_valid=kv_valid)
    return local_attention(q, k, v, implementation, kv_valid=kv_valid)


def local_attention(q, k, v, implementation: str, kv_valid: int | None = None,
                    splash_interpret: bool = False) -> jax.Array:
    """The kernel on arrays that are whole on this device (inside shard_map, or unsharded)."""
    implementation = resolve_implementation(implementation, q.dtype)
    if kv_valid is not None and kv_valid >= k.shape[1]:
        kv_valid = None
    if implementation == "xla":
        return xla_attention(q, k, v, kv_valid)
    if implementation == "cudnn":
        if q.dtype not in (jnp.bfloat16, jnp.float16):
            raise ValueError(f"cuDNN attention needs bfloat16/float16 inputs, got {q.dtype}; "
                             "use compute_dtype=bfloat16 or attention='xla'")
        lengths = None if kv_valid is None else jnp.full((q.shape[0],), kv_valid, jnp.int32)
        return jax.nn.dot_product_attention(q, k, v, key_value_seq_lengths=lengths,
                                            implementation="cudnn")
    return _splash_local(q, k, v, splash_interpret, kv_valid)


def _key_mask(kv_len: int, kv_valid: int | None, offset=0):
    """(kv_len,) bool, True for real keys; None when every key is real."""
    if kv_valid is None:
        return None
    return offset + jnp.arange(kv_len) < kv_valid


def xla_attention(q: jax.Array, k: jax.Array, v: jax.Array, kv_valid: int | None = None) -> jax.Array:
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32) * scale
    mask = _key_mask(k.shape[1], kv_valid)
    weights = jax.nn.softmax(logits, axis=-1, where=mask)
    if mask is not None:
        weights = jnp.where(mask, weights, 0.0)
    out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v,
                     preferred_element_type=jnp.float32)
    return out.astype(q.dtype)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, interpret: bool = False,
                     kv_valid: int | None = None) -> jax.Array:
    """Pallas splash attention. Under a mesh it runs per shard (shard_map): batch and heads split as
    the activations are, queries split along 'length', keys/values gathered whole."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = spmd.get_logical_axis_rules()
    kernel = functools.partial(_splash_local, interpret=interpret, kv_valid=kv_valid)
    if mesh.empty or not rules:
        return kernel(q, k, v)
    q_spec = sharding.logical_to_mesh_spec(("batch", "length", "act_heads", None), rules)
    kv_spec = sharding.logical_to_mesh_spec(("batch", None, "act_heads", None), rules)
    return jax.shard_map(kernel, mesh=mesh, in_specs=(q_spec, kv_spec, kv_spec),
                         out_specs=q_spec, check_vma=False)(q, k, v)


def _splash_local(q, k, v, interpret, kv_valid=None):
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_kernel as sk
    from jax.experimental.pallas.ops.tpu.splash_attention import splash_attention_mask as sm

    batch, q_len, heads, head_dim = q.shape
    kv_len = k.shape[1]
    real_kv = kv_len if kv_valid is None else min(kv_valid, kv_len)
    q_pad, kv_pad = -q_len % SPLASH_BLOCK, -kv_len % SPLASH_BLOCK
    # Padded keys (beyond kv_valid, and splash's tile padding) get their own segment id so no query
    # attends to them; padded query rows attend to the real keys (never an empty softmax row) and
    # are sliced off.
    segment_ids = sk.SegmentIds(
        q=jnp.zeros((q_len + q_pad,), jnp.int32),
        kv=(jnp.arange(kv_len + kv_pad) >= real_kv).astype(jnp.int32))
    mask = sm.MultiHeadMask([sm.FullMask((q_len + q_pad, kv_len + kv_pad))] * heads)
    kernel = sk.make_splash_mha_single_device(mask, interpret=interpret)
    # Splash takes (H, S, D) per example and does not scale the logits itself.
    scale = 1.0 / math.sqrt(head_dim)
    qh = jnp.pad((q * scale).astype(q.dtype), ((0, 0), (0, q_pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    kh = jnp.pad(k, ((0, 0), (0, kv_pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    vh = jnp.pad(v, ((0, 0), (0, kv_pad), (0, 0), (0, 0))).transpose(0, 2, 1, 3)
    out = jax.vmap(lambda a, b, c: kernel(a, b, c, segment_ids=segment_ids))(qh, kh, vh)
    return out.transpose(0, 2, 1, 3)[:, :q_len]


# -- context parallelism ---------------------------------------------------------------------------

def context_axes() -> tuple[str, ...]:
    """The mesh axes that the token axis ('length') is sharded over in the current use_mesh
    context, leaving out axes of size 1; () outside a mesh."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        return ()
    axes = sharding.logical_to_mesh_spec(("length",), rules)[0]
    axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    return tuple(a for a in axes if mesh.shape[a] > 1)


def context_size() -> int:
    """How many devices share one sequence; the token count must be padded to a multiple of it."""
    mesh = jax.sharding.get_abstract_mesh()
    return math.prod(mesh.shape[a] for a in context_axes())


def _shard_spec(logical, shape, mesh, rules) -> PartitionSpec:
    """The PartitionSpec of an activation by logical names, replicating any dimension the mesh
    axes do not divide (shard_map needs exact division; GSPMD would pad)."""
    spec = sharding.logical_to_mesh_spec(logical, rules)
    out = []
    for size, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        names = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
        out.append(axes if size % math.prod(mesh.shape[a] for a in names) == 0 else None)
    return PartitionSpec(*out)


def resolve_context_parallel(mode: str, num_heads: int) -> str:
    """'auto' -> 'ulysses' when each device's heads (after tensor sharding) divide over the
    context axis, else 'ring'; an explicit 'ulysses' that cannot split the heads is an error."""
    if mode not in CONTEXT_PARALLEL:
        raise ValueError(f"unknown context_parallel {mode!r}; choose one of {CONTEXT_PARALLEL}")
    mesh = jax.sharding.get_abstract_mesh()
    rules = spmd.get_logical_axis_rules()
    cp = context_size()
    head_axes = _shard_spec(("act_heads",), (num_heads,), mesh, rules)[0]
    head_axes = () if head_axes is None else (head_axes if isinstance(head_axes, tuple) else (head_axes,))
    local_heads = num_heads // math.prod(mesh.shape[a] for a in head_axes)
    if mode == "auto":
        return "ulysses" if local_heads % cp == 0 else "ring"
    if mode == "ulysses" and local_heads % cp:
        raise ValueError(f"context_parallel='ulysses' splits each device's {local_heads} heads over "
                         f"a context axis of {cp}, which does not divide them; set "
                         "precision.context_parallel to 'ring' or 'auto', or change mesh.ici.context")
    return mode


def self_attention(q: jax.Array, k: jax.Array, v: jax.Array, implementation: str = "auto",
                   context_parallel: str = "auto", kv_valid: int | None = None,
                   splash_interpret: bool = False) -> jax.Array:
    """Self-attention over (B, S, H, D) arrays whose S is sharded over the context axis (when the
    mesh has one of size > 1; S must then be a multiple of context_size()). Otherwise this is
    `attention`. Keys at positions >= kv_valid are masked out."""
    axes = context_axes()
    if not axes:
        return attention(q, k, v, implementation, splash_interpret, kv_valid)
    cp = context_size()
    if q.shape[1] % cp:
        raise ValueError(f"sequence of {q.shape[1]} tokens is not a multiple of the context axis "
                         f"({cp}); pad it (WanDiT does) and pass kv_valid")
    mode = resolve_context_parallel(context_parallel, q.shape[2])
    mesh = jax.sharding.get_abstract_mesh()
    rules = spmd.get_logical_axis_rules()
    spec = _shard_spec(("batch", "length", "act_heads", None), q.shape, mesh, rules)
    if mode == "ulysses":
        body = functools.partial(_ulysses_local, axes=axes, implementation=implementation,
                                 kv_valid=kv_valid, splash_interpret=splash_interpret)
    else:
        body = functools.partial(_ring_local, axes=axes, cp=cp, kv_valid=kv_valid)
    return jax.shard_map(body, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                         check_vma=False)(q, k, v)


def _ulysses_local(q, k, v, axes, implementation, kv_valid, splash_interpret):
    # (B, S/cp, H, D) -> (B, S, H/cp, D): every device gets whole sequences for some heads.
    to_heads = lambda t: jax.lax.all_to_all(t, axes, split_axis=2, concat_axis=1, tiled=True)
    out = local_attention(to_heads(q), to_heads(k), to_heads(v), implementation, kv_valid,
                          splash_interpret)
    return jax.lax.all_to_all(out, axes, split_axis=1, concat_axis=2, tiled=True)


# Finite, so that blocks of padding never produce inf - inf.
_MASKED = -1e30


def _ring_local(q, k, v, axes, cp, kv_valid):
    """Blockwise attention of this device's queries against every device's keys/values: at step i
    this device holds the key/value block of device (index - i) mod cp, then passes it on."""
    block = k.shape[1]
    index = jax.lax.axis_index(axes)
    scale = 1.0 / math.sqrt(q.shape[-1])
    perm = [(j, (j + 1) % cp) for j in range(cp)]

    # Rematerialised per block: the backward keeps one block's logits alive, not all cp of them.
    @jax.checkpoint
    def accumulate(carry, k_blk, v_blk, source):
        m, l, o = carry
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k_blk, preferred_element_type=jnp.float32) * scale
        if kv_valid is not None:
            real = source * block + jnp.arange(block) < kv_valid
            logits = jnp.where(real, logits, _MASKED)
        m_new = jnp.maximum(m, jnp.max(logits, axis=-1))
        # A block of padding alone (m_new = _MASKED) adds weight 1 per key, but every query meets
        # key 0 (real) in some block, and there correction = exp(_MASKED - real max) = 0 wipes it.
        p = jnp.exp(logits - m_new[..., None])
        correction = jnp.exp(m - m_new)
        l = l * correction + jnp.sum(p, axis=-1)
        o = o * correction[..., None] + jnp.einsum("bhqk,bkhd->bhqd", p.astype(v_blk.dtype), v_blk,
                                                   preferred_element_type=jnp.float32)
        return m_new, l, o

    b, sq, h, d = q.shape
    carry = (jnp.full((b, h, sq), _MASKED, jnp.float32), jnp.zeros((b, h, sq), jnp.float32),
             jnp.zeros((b, h, sq, d), jnp.float32))
    for step in range(cp):
        carry = accumulate(carry, k, v, (index - step) % cp)
        if step < cp - 1:
            k, v = (jax.lax.ppermute(t, axes, perm) for t in (k, v))
    _, l, o = carry
    return (o / l[..., None]).transpose(0, 2, 1, 3).astype(q.dtype)
