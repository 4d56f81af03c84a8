"""Wan2.1 causal 3D VAE (video <-> 16-channel latents, 4x in time, 8x in space) in Flax NNX.

Reads like the official Wan2.1 `wan/modules/vae.py` and diffusers' AutoencoderKLWan, channels-last:
causal Conv3d (time padded only on the past side, with the last 2 frames of the previous chunk as
cache), RMS norms over channels, residual blocks, resample blocks (the first chunk is never
resampled in time), one single-head per-frame attention in each middle block, latent normalisation
with the 16 per-channel constants.

    vae = load_vae("ckpt/wan_vae")                 # written by convert-wan-weights --kind vae
    z = vae.encode(video)      # (B, 1+4k, H, W, 3) in [-1, 1] -> (B, 1+k, H/8, W/8, 16), normalised
    x = vae.decode(z)          # inverse, clamped to [-1, 1]
    z = encode_video(vae, video, tiled=True)   # jitted; spatial tiles blended as SAMA/DiffSynth do
    x = decode_latents(vae, z, tiled=True)

Chunking: like the reference, encode runs 1, 4, 4, ... frames at a time and decode one latent frame
at a time, every causal conv reading the cached tail of its input from the previous chunk. The
chunks after the first run in a lax.scan whose carry is that cache, so memory stays flat in the
frame count. `chunked=False` runs the whole video in one pass instead (same numbers, memory grows
with T).

Sharding: activations are constrained to ('batch', None, 'spatial', None, 'act_embed'); map
'spatial' to a mesh axis (e.g. ('spatial', 'context')) to split large frames by rows across devices.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sama_jax import config as config_lib
from sama_jax import params_io, sharding

KIND = "wan_vae"
CACHE_T = 2  # frames of the previous chunk each causal conv sees (its temporal kernel size - 1)
TEMPORAL_STRIDE = 4  # the VAE's compression (dit_cost and resolution count with these)
SPATIAL_STRIDE = 8
LATENTS_MEAN = (
    -0.7571,
    -0.7089,
    -0.9113,
    0.1075,
    -0.1745,
    0.9653,
    -0.1517,
    1.5508,
    0.4134,
    -0.0715,
    0.5517,
    -0.3632,
    -0.1922,
    -0.9497,
    0.2503,
    -0.2921,
)
LATENTS_STD = (
    2.8184,
    1.4541,
    2.3275,
    2.6558,
    1.2196,
    1.7708,
    2.6052,
    2.0743,
    3.2687,
    2.1526,
    2.8652,
    1.5579,
    1.6382,
    1.1253,
    2.8251,
    1.9160,
)
ACTIVATION = ("batch", None, "spatial", None, "act_embed")


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    base_dim: int = 96
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    latents_mean: tuple[float, ...] = LATENTS_MEAN
    latents_std: tuple[float, ...] = LATENTS_STD
    compute_dtype: str = "float32"  # the official pipeline runs bf16
    param_dtype: str = "float32"  # dtype of freshly initialised parameters

    def __post_init__(self):
        for name in ("dim_mult", "temporal_downsample", "latents_mean", "latents_std"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if len(self.temporal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"temporal_downsample {self.temporal_downsample} needs one entry per "
                f"downsampling stage ({len(self.dim_mult) - 1})"
            )
        if sum(self.temporal_downsample) != 2 or len(self.dim_mult) != 4:
            raise ValueError(
                "the Wan2.1 VAE has 3 spatial and 2 temporal downsamplings "
                f"(8x, 4x); got dim_mult {self.dim_mult}, temporal_downsample "
                f"{self.temporal_downsample}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(f"latents_mean/std need {self.z_dim} entries")

    @classmethod
    def from_config(cls, section, precision=None) -> "WanVAEConfig":
        """From a config's model.vae section and precision section."""
        return config_lib.dataclass_from_section(cls, section, precision, "model.vae")


# ----------------------------------------------------------------------------------------------
# The feature cache (the reference's feat_cache / feat_idx, made functional)
# ----------------------------------------------------------------------------------------------


class FeatureCache:
    """Per-layer tails of the previous chunk, used in call order; records this chunk's tails.

    `previous` is None on the first chunk (the reference's empty cache), where zeros stand in for
    the missing frames, which is what the reference's zero padding amounts to; so every layer's
    cache has the same shape in every chunk and can be a lax.scan carry.
    """

    def __init__(self, previous: Sequence[jax.Array] | None = None):
        self.previous = previous
        self.updated: list[jax.Array] = []

    @property
    def first_chunk(self) -> bool:
        return self.previous is None

    def extend(self, x: jax.Array, keep: int = CACHE_T) -> jax.Array:
        """[this layer's tail from the previous chunk (`keep` zero frames on the first), x];
        records its last `keep` frames as the tail for the next chunk."""
        if self.previous is None:
            joined = jnp.pad(x, ((0, 0), (keep, 0)) + ((0, 0),) * (x.ndim - 2))
        else:
            old = self.previous[len(self.updated)]
            joined = jnp.concatenate([old.astype(x.dtype), x], axis=1)
            # Slicing the new tail from the joined array (not from x, which XLA would otherwise
            # simplify it to) orders the carry's write after its read, so XLA can update the
            # cache in place (measured: 0.3 GiB less temporary memory at 480x832 in fp32).
            joined = jax.lax.optimization_barrier(joined)
        self.updated.append(joined[:, -keep:])
        return joined


# ----------------------------------------------------------------------------------------------
# Layers
# ----------------------------------------------------------------------------------------------


def _conv(x: jax.Array, kernel: jax.Array, stride: Sequence[int], padding) -> jax.Array:
    if kernel.ndim == 5 and _one_cpu_device():
        return _conv3d_as_2d(x, kernel, stride, padding)
    spec = ("NDHWC", "DHWIO", "NDHWC") if kernel.ndim == 5 else ("NHWC", "HWIO", "NHWC")
    return jax.lax.conv_general_dilated(
        x, kernel, window_strides=tuple(stride), padding=padding, dimension_numbers=spec
    )


def _one_cpu_device() -> bool:
    """On CPU outside a multi-device mesh. Under one, the summed 2D convolutions let XLA:CPU's
    concurrent thunks reach the devices' collectives in different orders (a rendezvous deadlock
    seen with 8 simulated devices), so sharded programs keep the 3D convolution."""
    if jax.default_backend() != "cpu":
        return False
    mesh = jax.sharding.get_abstract_mesh()
    return mesh.empty or mesh.size == 1


def _conv3d_as_2d(x: jax.Array, kernel: jax.Array, stride: Sequence[int], padding) -> jax.Array:
    """A 3D convolution as the sum over its kt time taps of 2D convolutions of shifted frames.

    The same arithmetic; XLA:CPU runs 3D convolutions through a generic loop, 6-8x slower than its
    2D kernels (forward and gradient, measured at (4, 7, 64, 64, 16) with a 3x3x3 kernel)."""
    (pad_t0, pad_t1), *spatial = padding
    x = jnp.pad(x, ((0, 0), (pad_t0, pad_t1), (0, 0), (0, 0), (0, 0)))
    kt, st = kernel.shape[0], stride[0]
    b, t = x.shape[:2]
    frames = (t - kt) // st + 1
    out = None
    for i in range(kt):
        if i + st * (frames - 1) < pad_t0:
            # Every frame this tap sees is causal zero padding (a 1-frame input, e.g. an image or
            # a video's first frame): it adds nothing, so it is skipped (3x less work on images).
            continue
        shifted = x[:, i : i + st * (frames - 1) + 1 : st]
        y = jax.lax.conv_general_dilated(
            shifted.reshape((b * frames,) + x.shape[2:]),
            kernel[i],
            window_strides=tuple(stride[1:]),
            padding=tuple(spatial),
            dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
        out = y if out is None else out + y
    return out.reshape((b, frames) + out.shape[1:])


class CausalConv3d(nnx.Module):
    """Conv3d padded by (2 * pad_t) past frames and none of the future: zeros, or the tail of
    the previous chunk from the feature cache."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel_size,
        stride=1,
        padding=0,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
        axes=("conv_in", "conv_out"),
    ):
        kernel_size = _triple(kernel_size)
        self.stride = _triple(stride)
        pad_t, pad_h, pad_w = _triple(padding)
        self.time_pad = 2 * pad_t
        self.spatial_pad = ((pad_h, pad_h), (pad_w, pad_w))
        self.dtype = dtype
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(
            init(rngs.params(), kernel_size + (in_dim, out_dim), param_dtype),
            eager_sharding=False,
            out_sharding=(None, None, None) + tuple(axes),
        )
        self.bias = nnx.Param(
            jnp.zeros((out_dim,), param_dtype), eager_sharding=False, out_sharding=(axes[1],)
        )

    def __call__(self, x: jax.Array, cache: FeatureCache | None = None) -> jax.Array:
        x = x.astype(self.dtype)
        time_pad = (0, 0)
        if self.time_pad:
            if cache is None:
                time_pad = (self.time_pad, 0)  # causal zeros, padded by the convolution
            else:
                x = cache.extend(x, keep=self.time_pad)
        y = _conv(x, self.kernel[...].astype(self.dtype), self.stride, (time_pad,) + self.spatial_pad)
        return y + self.bias[...].astype(self.dtype)


class Conv2d(nnx.Module):
    """Per-frame 2D convolution of (B, T, H, W, C) video."""

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        self.stride = (stride, stride)
        self.padding = ((padding, padding), (padding, padding))
        self.dtype = dtype
        init = nnx.initializers.lecun_normal()
        self.kernel = nnx.Param(
            init(rngs.params(), (kernel_size, kernel_size, in_dim, out_dim), param_dtype),
            eager_sharding=False,
            out_sharding=(None, None, "conv_in", "conv_out"),
        )
        self.bias = nnx.Param(
            jnp.zeros((out_dim,), param_dtype), eager_sharding=False, out_sharding=("conv_out",)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t = x.shape[:2]
        y = _conv(
            x.reshape((b * t,) + x.shape[2:]).astype(self.dtype),
            self.kernel[...].astype(self.dtype),
            self.stride,
            self.padding,
        )
        y = y + self.bias[...].astype(self.dtype)
        return y.reshape((b, t) + y.shape[1:])


class RMSNorm(nnx.Module):
    """x / ||x||_2 over channels (in fp32, as F.normalize with eps 1e-12) * sqrt(C) * gamma."""

    def __init__(self, dim: int, *, dtype, param_dtype):
        self.dtype = dtype
        self.gamma = nnx.Param(
            jnp.ones((dim,), param_dtype), eager_sharding=False, out_sharding=("conv_out",)
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        x32 = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(x32), axis=-1, keepdims=True))
        normalized = (x32 / jnp.maximum(norm, 1e-12)).astype(self.dtype)
        return normalized * math.sqrt(x.shape[-1]) * self.gamma[...].astype(self.dtype)


class ResidualBlock(nnx.Module):
    def __init__(self, in_dim: int, out_dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype)
        self.norm1 = RMSNorm(in_dim, **kw)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1, rngs=rngs, **kw)
        self.norm2 = RMSNorm(out_dim, **kw)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1, rngs=rngs, **kw)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1, rngs=rngs, **kw) if in_dim != out_dim else None

    def __call__(self, x: jax.Array, cache: FeatureCache | None) -> jax.Array:
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = jax.nn.silu(self.norm1(x))
        x = self.conv1(x, cache)
        x = jax.nn.silu(self.norm2(x))
        x = self.conv2(x, cache)
        return sharding.constrain(x + h, ACTIVATION)


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the H*W positions of each frame (so causal in time)."""

    def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        self.dtype = dtype
        self.norm = RMSNorm(dim, dtype=dtype, param_dtype=param_dtype)
        init = nnx.initializers.lecun_normal()
        self.to_qkv = nnx.Linear(
            dim,
            3 * dim,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            kernel_init=sharding.annotated(init, ("conv_in", "conv_out")),
            bias_init=sharding.annotated(nnx.initializers.zeros, ("conv_out",)),
        )
        self.proj = nnx.Linear(
            dim,
            dim,
            dtype=dtype,
            param_dtype=param_dtype,
            rngs=rngs,
            kernel_init=sharding.annotated(init, ("conv_in", "conv_out")),
            bias_init=sharding.annotated(nnx.initializers.zeros, ("conv_out",)),
        )

    def __call__(self, x: jax.Array) -> jax.Array:
        b, t, h, w, c = x.shape
        q, k, v = jnp.split(self.to_qkv(self.norm(x)).reshape(b * t, h * w, 3 * c), 3, axis=-1)
        scores = jnp.einsum("nqc,nkc->nqk", q, k) / math.sqrt(c)
        weights = jax.nn.softmax(scores.astype(jnp.float32), axis=-1).astype(v.dtype)
        out = jnp.einsum("nqk,nkc->nqc", weights, v).reshape(b, t, h, w, c)
        return x.astype(self.dtype) + self.proj(out)


class Resample(nnx.Module):
    """Spatial 2x down/up-sampling, optionally with causal 2x in time (never on the first chunk)."""

    def __init__(self, dim: int, mode: str, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mode = mode
        self.dtype = dtype
        if mode in ("upsample2d", "upsample3d"):
            self.conv = Conv2d(dim, dim // 2, 3, padding=1, **kw)
        elif mode in ("downsample2d", "downsample3d"):
            self.conv = Conv2d(dim, dim, 3, stride=2, **kw)
        else:
            raise ValueError(f"unknown resample mode {mode!r}")
        time_conv = None
        if mode == "upsample3d":
            time_conv = CausalConv3d(dim, 2 * dim, (3, 1, 1), padding=(1, 0, 0), **kw)
        elif mode == "downsample3d":
            time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1), **kw)
        self.time_conv = time_conv

    def __call__(self, x: jax.Array, cache: FeatureCache | None) -> jax.Array:
        if self.mode == "upsample3d":
            x = self._upsample_time(x, cache)
        if self.mode.startswith("upsample"):
            # nearest-exact 2x == repeating each pixel; the reference interpolates in fp32.
            x = jnp.repeat(jnp.repeat(x.astype(jnp.float32), 2, axis=2), 2, axis=3)
            x = x.astype(self.dtype)
            x = self.conv(x)
        else:
            x = self.conv(jnp.pad(x, ((0, 0), (0, 0), (0, 1), (0, 1), (0, 0))))
        if self.mode == "downsample3d":
            x = self._downsample_time(x, cache)
        return sharding.constrain(x, ACTIVATION)

    def _upsample_time(self, x, cache):
        if cache is None:
            # Whole video: the first frame is not doubled; the rest see zeros before frame 1.
            if x.shape[1] == 1:
                return x
            rest = self.time_conv(x[:, 1:])
            return jnp.concatenate([x[:, :1].astype(self.dtype), _interleave_time(rest)], axis=1)
        if cache.first_chunk:
            cache.extend(jnp.zeros_like(x))  # the reference's "Rep": the next chunk sees zeros
            return x
        return _interleave_time(self.time_conv(x, cache))

    def _downsample_time(self, x, cache):
        if cache is None:
            # Whole video: frame 0 passes; then a valid stride-2 conv over [f0 f1 f2], [f2 f3 f4]...
            if x.shape[1] == 1:
                return x
            return jnp.concatenate([x[:, :1], self.time_conv(x)], axis=1)
        if cache.first_chunk:
            cache.extend(x, keep=1)
            return x
        return self.time_conv(cache.extend(x, keep=1))  # valid conv over [last frame, x]


def _interleave_time(x: jax.Array) -> jax.Array:
    """(B, T, H, W, 2C) -> (B, 2T, H, W, C): channel half s becomes output frame 2t + s."""
    b, t, h, w, c2 = x.shape
    x = x.reshape(b, t, h, w, 2, c2 // 2)
    return jnp.moveaxis(x, 4, 2).reshape(b, 2 * t, h, w, c2 // 2)


class MidBlock(nnx.Module):
    def __init__(self, dim: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.resnets = nnx.List([ResidualBlock(dim, dim, **kw), ResidualBlock(dim, dim, **kw)])
        self.attention = AttentionBlock(dim, **kw)

    def __call__(self, x, cache):
        x = self.resnets[0](x, cache)
        x = self.attention(x)
        return self.resnets[1](x, cache)


class Encoder(nnx.Module):
    def __init__(self, cfg: WanVAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dims = [cfg.base_dim * u for u in (1,) + cfg.dim_mult]
        self.conv_in = CausalConv3d(3, dims[0], 3, padding=1, axes=(None, "conv_out"), **kw)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(in_dim, out_dim, **kw))
                in_dim = out_dim
            if i != len(cfg.dim_mult) - 1:
                mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
                blocks.append(Resample(out_dim, mode, **kw))
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], **kw)
        self.norm_out = RMSNorm(dims[-1], dtype=dtype, param_dtype=param_dtype)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, padding=1, **kw)

    def __call__(self, x: jax.Array, cache: FeatureCache | None) -> jax.Array:
        x = self.conv_in(x, cache)
        x = sharding.constrain(x, ACTIVATION)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        x = jax.nn.silu(self.norm_out(x))
        return self.conv_out(x, cache)


class UpBlock(nnx.Module):
    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        num_res_blocks: int,
        upsample: str | None,
        *,
        dtype,
        param_dtype,
        rngs: nnx.Rngs,
    ):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nnx.List([ResidualBlock(a, b, **kw) for a, b in zip(dims[:-1], dims[1:])])
        self.upsampler = Resample(out_dim, upsample, **kw) if upsample else None

    def __call__(self, x, cache):
        for resnet in self.resnets:
            x = resnet(x, cache)
        return x if self.upsampler is None else self.upsampler(x, cache)


class Decoder(nnx.Module):
    def __init__(self, cfg: WanVAEConfig, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        dims = [cfg.base_dim * u for u in (cfg.dim_mult[-1],) + cfg.dim_mult[::-1]]
        temporal_upsample = cfg.temporal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1, **kw)
        self.mid_block = MidBlock(dims[0], **kw)
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous stage's upsampler halves the channels
            upsample = None
            if i != len(cfg.dim_mult) - 1:
                upsample = "upsample3d" if temporal_upsample[i] else "upsample2d"
            blocks.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks, upsample, **kw))
        self.up_blocks = nnx.List(blocks)
        self.norm_out = RMSNorm(dims[-1], dtype=dtype, param_dtype=param_dtype)
        self.conv_out = CausalConv3d(dims[-1], 3, 3, padding=1, axes=("conv_in", None), **kw)

    def __call__(self, x: jax.Array, cache: FeatureCache | None) -> jax.Array:
        x = self.conv_in(x, cache)
        x = sharding.constrain(x, ACTIVATION)
        x = self.mid_block(x, cache)
        for block in self.up_blocks:
            x = block(x, cache)
        x = jax.nn.silu(self.norm_out(x))
        return self.conv_out(x, cache)


# ----------------------------------------------------------------------------------------------
# The VAE
# ----------------------------------------------------------------------------------------------


class WanVAE(nnx.Module):
    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        self.config = cfg
        kw = dict(dtype=jnp.dtype(cfg.compute_dtype), param_dtype=jnp.dtype(cfg.param_dtype), rngs=rngs)
        self.encoder = Encoder(cfg, **kw)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1, **kw)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1, **kw)
        self.decoder = Decoder(cfg, **kw)

    # -- public API -------------------------------------------------------------------------------
    def encode(self, video: jax.Array, *, chunked: bool = True, pad_frames: bool = False) -> jax.Array:
        """(B, T, H, W, 3) in [-1, 1], T = 4k+1, H and W multiples of 8 -> normalised latents
        (mu - mean) / std of shape (B, 1+k, H/8, W/8, z_dim). `pad_frames` repeats the last frame
        up to the next 4k+1 instead of raising."""
        video = check_video(video, pad_frames)
        mu = self.encode_mean(video, chunked=chunked)
        mean, std = self.latent_stats()
        return ((mu - mean) / std).astype(self.config.compute_dtype)

    def decode(self, latents: jax.Array, *, chunked: bool = True) -> jax.Array:
        """Normalised latents (B, 1+k, h, w, z_dim) -> video (B, 1+4k, 8h, 8w, 3) in [-1, 1]."""
        return jnp.clip(self.decode_unclamped(latents, chunked=chunked), -1.0, 1.0)

    # -- pieces (tiling blends unclamped tiles) ---------------------------------------------------
    def encode_mean(self, video: jax.Array, *, chunked: bool = True) -> jax.Array:
        """The posterior mean mu (not normalised) of a checked (B, 4k+1, H, W, 3) video."""
        video = sharding.constrain(video.astype(self.config.compute_dtype), ACTIVATION)
        if chunked:
            out = _run_chunks(self.encoder, video, TEMPORAL_STRIDE, 1)
        else:
            out = self.encoder(video, None)
        return self.quant_conv(out)[..., : self.config.z_dim]

    def decode_unclamped(self, latents: jax.Array, *, chunked: bool = True) -> jax.Array:
        if latents.ndim != 5 or latents.shape[-1] != self.config.z_dim:
            raise ValueError(f"latents must be (B, T, h, w, {self.config.z_dim}), got {tuple(latents.shape)}")
        mean, std = self.latent_stats()
        z = latents.astype(jnp.float32) * std + mean
        x = self.post_quant_conv(sharding.constrain(z.astype(self.config.compute_dtype), ACTIVATION))
        if not chunked:
            return self.decoder(x, None)
        return _run_chunks(self.decoder, x, 1, TEMPORAL_STRIDE)

    def latent_stats(self):
        shape = (1, 1, 1, 1, self.config.z_dim)
        return (
            jnp.asarray(self.config.latents_mean, jnp.float32).reshape(shape),
            jnp.asarray(self.config.latents_std, jnp.float32).reshape(shape),
        )


def _run_chunks(module, x: jax.Array, chunk: int, out_chunk: int) -> jax.Array:
    """The reference's chunk loop: `module` on x[:, :1], then on each next `chunk` frames in a
    lax.scan whose carry is the feature cache and the output, written in place `out_chunk` frames
    per step, so that nothing but the output grows with the frame count."""
    first = FeatureCache()
    head = module(x[:, :1], first)
    num_chunks = (x.shape[1] - 1) // chunk
    if not num_chunks:
        return head
    out = jnp.zeros(head.shape[:1] + (1 + num_chunks * out_chunk,) + head.shape[2:], head.dtype)
    out = jax.lax.dynamic_update_slice_in_dim(out, head, 0, axis=1)

    def step(carry, i):
        previous, out = carry
        cache = FeatureCache(previous)
        y = module(jax.lax.dynamic_slice_in_dim(x, 1 + i * chunk, chunk, axis=1), cache)
        out = jax.lax.dynamic_update_slice_in_dim(out, y.astype(out.dtype), 1 + i * out_chunk, axis=1)
        return (cache.updated, sharding.constrain(out, ACTIVATION)), None

    (_, out), _ = jax.lax.scan(step, (first.updated, out), jnp.arange(num_chunks))
    return out


def check_video(video: jax.Array, pad_frames: bool = False) -> jax.Array:
    """Validates a (B, T, H, W, 3) video for the VAE; pads T to 4k+1 by repeating the last frame
    when `pad_frames`."""
    if video.ndim != 5 or video.shape[-1] != 3:
        raise ValueError(f"video must be (B, T, H, W, 3) channels-last RGB, got {tuple(video.shape)}")
    _, t, h, w, _ = video.shape
    if h % SPATIAL_STRIDE or w % SPATIAL_STRIDE:
        raise ValueError(
            f"video frames are {h}x{w}; the Wan VAE needs height and width that are "
            f"multiples of {SPATIAL_STRIDE}"
        )
    extra = (t - 1) % TEMPORAL_STRIDE
    if extra:
        if not pad_frames:
            raise ValueError(
                f"video has {t} frames; the Wan VAE encodes 4k+1 frames (1, 5, 9, ...): trim to "
                f"{t - extra} or pass pad_frames=True to repeat the last frame up to "
                f"{t - extra + TEMPORAL_STRIDE}"
            )
        pad = TEMPORAL_STRIDE - extra
        video = jnp.concatenate([video, jnp.repeat(video[:, -1:], pad, axis=1)], axis=1)
    return video


def _triple(v) -> tuple[int, int, int]:
    return tuple(v) if isinstance(v, (tuple, list)) else (v, v, v)


# ----------------------------------------------------------------------------------------------
# Jitted entry points and spatial tiling
# ----------------------------------------------------------------------------------------------


@functools.partial(nnx.jit, static_argnames=("chunked",))
def _encode_jit(vae: WanVAE, video: jax.Array, chunked: bool) -> jax.Array:
    return vae.encode(video, chunked=chunked)


@functools.partial(nnx.jit, static_argnames=("chunked",))
def _decode_jit(vae: WanVAE, latents: jax.Array, chunked: bool) -> jax.Array:
    return vae.decode(latents, chunked=chunked)


@functools.partial(nnx.jit, static_argnames=("chunked",))
def _encode_mean_jit(vae: WanVAE, video: jax.Array, chunked: bool) -> jax.Array:
    return vae.encode_mean(video, chunked=chunked)


@functools.partial(nnx.jit, static_argnames=("chunked",))
def _decode_unclamped_jit(vae: WanVAE, latents: jax.Array, chunked: bool) -> jax.Array:
    return vae.decode_unclamped(latents, chunked=chunked)


def encode_video(
    vae: WanVAE,
    video,
    *,
    tiled: bool = False,
    tile_size=(30, 52),
    tile_stride=(15, 26),
    chunked: bool = True,
    pad_frames: bool = False,
) -> jax.Array:
    """Jitted `vae.encode`. With `tiled`, the frames are cut into overlapping tiles of tile_size
    latents (x8 pixels) every tile_stride latents, each encoded on its own and blended with linear
    ramps over the overlaps (SAMA's defaults: 30x52 tiles, stride 15x26)."""
    video = check_video(jnp.asarray(video), pad_frames)
    if not tiled:
        return _encode_jit(vae, video, chunked)
    px = lambda v: tuple(SPATIAL_STRIDE * int(s) for s in v)
    mu = _blend_tiles(
        lambda part: _encode_mean_jit(vae, part, chunked),
        video,
        px(tile_size),
        px(tile_stride),
        up=1,
        down=SPATIAL_STRIDE,
    )
    mean, std = vae.latent_stats()
    return ((mu - mean) / std).astype(vae.config.compute_dtype)


def decode_latents(
    vae: WanVAE,
    latents,
    *,
    tiled: bool = False,
    tile_size=(30, 52),
    tile_stride=(15, 26),
    chunked: bool = True,
) -> jax.Array:
    """Jitted `vae.decode`; `tiled` decodes overlapping latent tiles (sizes in latents) and blends
    the unclamped outputs with linear ramps over (tile - stride) * 8 pixels, then clamps."""
    latents = jnp.asarray(latents)
    if not tiled:
        return _decode_jit(vae, latents, chunked)
    out = _blend_tiles(
        lambda part: _decode_unclamped_jit(vae, part, chunked),
        latents,
        tuple(tile_size),
        tuple(tile_stride),
        up=SPATIAL_STRIDE,
        down=1,
    )
    return jnp.clip(out, -1.0, 1.0)


def tile_starts(size: int, tile: int, stride: int) -> list[int]:
    """Tile offsets along one axis: every `stride`, dropping tiles once the previous one reaches
    the end (the reference's task list; the last tile may be cut short by the frame edge)."""
    return [s for s in range(0, size, stride) if not (s - stride >= 0 and s - stride + tile >= size)]


def ramp_mask(length: int, border: int, left_edge: bool, right_edge: bool) -> np.ndarray:
    """1 inside, (i+1)/border ramps over `border` samples at sides that overlap another tile."""
    mask = np.ones((length,), np.float32)
    ramp = (np.arange(border, dtype=np.float32) + 1) / border
    if border and not left_edge:
        mask[:border] = ramp[:length]
    if border and not right_edge:
        mask[-border:] = ramp[::-1][-length:]
    return mask


def _blend_tiles(run, x: jax.Array, tile, stride, up: int, down: int) -> jax.Array:
    """Runs `run` on overlapping spatial tiles of x (B, T, H, W, C) and blends the outputs, whose
    spatial size is the input's * up / down, with ramp masks normalised by their sum."""
    height, width = x.shape[2:4]
    values = weight = None
    for h0 in tile_starts(height, tile[0], stride[0]):
        for w0 in tile_starts(width, tile[1], stride[1]):
            out = run(x[:, :, h0 : h0 + tile[0], w0 : w0 + tile[1]])
            mask_h = ramp_mask(
                out.shape[2], (tile[0] - stride[0]) * up // down, h0 == 0, h0 + tile[0] >= height
            )
            mask_w = ramp_mask(
                out.shape[3], (tile[1] - stride[1]) * up // down, w0 == 0, w0 + tile[1] >= width
            )
            mask = jnp.asarray(np.minimum(mask_h[:, None], mask_w[None, :]))
            if values is None:
                values = jnp.zeros(
                    out.shape[:2] + (height * up // down, width * up // down) + out.shape[4:], jnp.float32
                )
                weight = jnp.zeros((height * up // down, width * up // down), jnp.float32)
            values, weight = _accumulate(values, weight, out, mask, h0 * up // down, w0 * up // down)
    return values / weight[None, None, :, :, None]


@functools.partial(jax.jit, donate_argnums=(0, 1))
def _accumulate(values, weight, out, mask, h0, w0):
    """values[.., h0:, w0:] += out * mask; weight[h0:, w0:] += mask, in place (donated buffers)."""
    region = jax.lax.dynamic_slice(values, (0, 0, h0, w0, 0), out.shape)
    values = jax.lax.dynamic_update_slice(
        values, region + out.astype(jnp.float32) * mask[None, None, :, :, None], (0, 0, h0, w0, 0)
    )
    region = jax.lax.dynamic_slice(weight, (h0, w0), mask.shape)
    weight = jax.lax.dynamic_update_slice(weight, region + mask, (h0, w0))
    return values, weight


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def load_vae(path: str, *, mesh=None, rules=None, precision=None) -> WanVAE:
    """Wan VAE from a params checkpoint written by `convert-wan-weights --kind vae`;
    `mesh`, `rules` and `precision` as in umt5.load_text_encoder."""
    return params_io.load_module(
        path,
        KIND,
        lambda stored: WanVAE(
            WanVAEConfig.from_config(*params_io.split_precision(stored, precision)), rngs=nnx.Rngs(0)
        ),
        mesh,
        rules,
    )
