"""SigLIP vision tower (so400m-patch14-384 for SAMA's semantic anchoring) in Flax NNX.

Reads like transformers' SiglipVisionModel: patch embedding (Conv p x p, stride p) + learned
position embedding, pre-LN transformer layers (LayerNorm -> MHA with biases -> residual, LayerNorm
-> fc1 -> GELU(tanh) -> fc2 -> residual), then post_layernorm. The output is that last hidden state
(B, (image_size/patch)^2, hidden): what SAMA's feature extractor uses. The attention-pooling (MAP)
head is not built; the converter drops its weights. Images are NHWC.

    model = load_siglip("ckpt/siglip")                      # convert-wan-weights --kind siglip
    features = model(preprocess(frames_uint8, model.cfg.image_size))   # (B, 729, 1152)
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from sama_jax import config as config_lib
from sama_jax import params_io, sharding

KIND = "siglip"


@dataclasses.dataclass(frozen=True)
class SiglipConfig:
    hidden_size: int = 1152
    intermediate_size: int = 4304
    num_layers: int = 27
    num_heads: int = 16
    patch_size: int = 14
    image_size: int = 384
    eps: float = 1e-6
    compute_dtype: str = "float32"
    param_dtype: str = "float32"

    @property
    def grid_size(self) -> int:
        return self.image_size // self.patch_size

    @classmethod
    def from_config(cls, section, precision=None) -> "SiglipConfig":
        """From a config's model.siglip section and precision section."""
        return config_lib.dataclass_from_section(cls, section, precision, "model.siglip")


def preprocess(images: jax.Array, image_size: int) -> jax.Array:
    """uint8 (or float in [0, 255]) images (..., H, W, 3) -> float32 (..., S, S, 3) in [-1, 1].

    SigLIP's processor: resize to image_size x image_size (bicubic; aspect ratio not kept, no crop),
    rescale by 1/255, normalise with mean = std = 0.5. The resize is jax.image.resize's antialiased
    bicubic (Keys a = -0.5, as PIL), done in float: it differs from the PIL processor by PIL's uint8
    rounding of the resized image (at most ~1/255 after rescale on smooth content)."""
    images = jnp.asarray(images)
    x = images.astype(jnp.float32)
    if x.shape[-3:-1] != (image_size, image_size):
        shape = x.shape[:-3] + (image_size, image_size, x.shape[-1])
        x = jax.image.resize(x, shape, method="bicubic", antialias=True)
    return (x / 255.0 - 0.5) / 0.5


def _dense(d_in, d_out, names, cfg, rngs):
    return nnx.Linear(
        d_in,
        d_out,
        dtype=cfg.compute_dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=sharding.annotated(nnx.initializers.lecun_normal(), names),
        bias_init=sharding.annotated(nnx.initializers.zeros_init(), names[-1:]),
        rngs=rngs,
    )


def _layer_norm(cfg, rngs):
    return nnx.LayerNorm(
        cfg.hidden_size,
        epsilon=cfg.eps,
        dtype=jnp.float32,
        param_dtype=cfg.param_dtype,
        scale_init=sharding.annotated(nnx.initializers.ones_init(), (None,)),
        bias_init=sharding.annotated(nnx.initializers.zeros_init(), (None,)),
        rngs=rngs,
    )


class Attention(nnx.Module):
    def __init__(self, cfg: SiglipConfig, rngs: nnx.Rngs):
        self.num_heads = cfg.num_heads
        d = cfg.hidden_size
        self.q_proj = _dense(d, d, ("embed", "heads"), cfg, rngs)
        self.k_proj = _dense(d, d, ("embed", "heads"), cfg, rngs)
        self.v_proj = _dense(d, d, ("embed", "heads"), cfg, rngs)
        self.out_proj = _dense(d, d, ("heads", "embed"), cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        b, n = x.shape[:2]
        split = lambda t: t.reshape(b, n, self.num_heads, -1)
        q, k, v = split(self.q_proj(x)), split(self.k_proj(x)), split(self.v_proj(x))
        q = sharding.constrain(q, ("batch", None, "act_heads", None))
        logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=jnp.float32)
        weights = jax.nn.softmax(logits / math.sqrt(q.shape[-1]), axis=-1).astype(v.dtype)
        out = jnp.einsum("bhqk,bkhd->bqhd", weights, v).reshape(b, n, -1)
        return self.out_proj(out)


class MLP(nnx.Module):
    def __init__(self, cfg: SiglipConfig, rngs: nnx.Rngs):
        self.fc1 = _dense(cfg.hidden_size, cfg.intermediate_size, ("embed", "mlp"), cfg, rngs)
        self.fc2 = _dense(cfg.intermediate_size, cfg.hidden_size, ("mlp", "embed"), cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        hidden = jax.nn.gelu(self.fc1(x), approximate=True)
        return self.fc2(sharding.constrain(hidden, ("batch", None, "mlp")))


class EncoderLayer(nnx.Module):
    def __init__(self, cfg: SiglipConfig, rngs: nnx.Rngs):
        self.dtype = jnp.dtype(cfg.compute_dtype)
        self.layer_norm1 = _layer_norm(cfg, rngs)
        self.self_attn = Attention(cfg, rngs)
        self.layer_norm2 = _layer_norm(cfg, rngs)
        self.mlp = MLP(cfg, rngs)

    def __call__(self, x: jax.Array) -> jax.Array:
        # LayerNorms compute in fp32 and hand the compute dtype to the projections.
        x = x + self.self_attn(self.layer_norm1(x).astype(self.dtype))
        x = x + self.mlp(self.layer_norm2(x).astype(self.dtype))
        return sharding.constrain(x, ("batch", "length", "act_embed"))


class SiglipVisionModel(nnx.Module):
    def __init__(self, cfg: SiglipConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        d = cfg.hidden_size
        self.patch_embedding = nnx.Conv(
            3,
            d,
            kernel_size=(cfg.patch_size, cfg.patch_size),
            strides=cfg.patch_size,
            padding="VALID",
            dtype=cfg.compute_dtype,
            param_dtype=cfg.param_dtype,
            kernel_init=sharding.annotated(nnx.initializers.lecun_normal(), (None, None, None, "embed")),
            bias_init=sharding.annotated(nnx.initializers.zeros_init(), ("embed",)),
            rngs=rngs,
        )
        self.position_embedding = nnx.Embed(
            cfg.grid_size**2,
            d,
            dtype=cfg.compute_dtype,
            param_dtype=cfg.param_dtype,
            embedding_init=sharding.annotated(nnx.initializers.normal(d**-0.5), (None, "embed")),
            rngs=rngs,
        )

        @nnx.split_rngs(splits=cfg.num_layers)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(rngs):
            return EncoderLayer(cfg, rngs)

        self.layers = make_layers(rngs)
        self.post_layernorm = _layer_norm(cfg, rngs)

    def __call__(self, pixels: jax.Array) -> jax.Array:
        """pixels (B, image_size, image_size, 3) in [-1, 1] -> (B, grid^2, hidden) fp32,
        patches in row-major (h, w) order."""
        if pixels.shape[-3:] != (self.cfg.image_size, self.cfg.image_size, 3):
            raise ValueError(
                f"SigLIP expects (B, {self.cfg.image_size}, {self.cfg.image_size}, 3) "
                f"pixels, got {pixels.shape}; use siglip.preprocess"
            )
        x = self.patch_embedding(pixels.astype(self.cfg.compute_dtype))
        x = x.reshape(x.shape[0], -1, x.shape[-1])
        x = x + self.position_embedding.embedding[...].astype(x.dtype)[None]
        x = sharding.constrain(x, ("batch", "length", "act_embed"))

        @nnx.scan(
            in_axes=(nnx.Carry, 0), out_axes=nnx.Carry, transform_metadata={nnx.PARTITION_NAME: "layers"}
        )
        def run_layers(x, layer):
            return layer(x)

        return self.post_layernorm(run_layers(x, self.layers))


def load_siglip(path: str, *, mesh=None, rules=None, precision=None) -> SiglipVisionModel:
    """SigLIP vision tower from a params checkpoint written by `convert-wan-weights --kind siglip`;
    `mesh`, `rules` and `precision` as in umt5.load_text_encoder."""
    return params_io.load_module(
        path,
        KIND,
        lambda stored: SiglipVisionModel(
            SiglipConfig.from_config(*params_io.split_precision(stored, precision)), rngs=nnx.Rngs(0)
        ),
        mesh,
        rules,
    )
