"""The Wan2.1 VAE's checkpoint names: our parameter path <-> the Wan2.1_VAE.pth key, with the diffusers
(AutoencoderKLWan) key and the torch shape; generated from the config (the number of blocks follows
it). The table format: sama_jax.models.params_table.

  official   Wan2.1_VAE.pth: conv1/conv2 (quant/post-quant), encoder.{conv1, downsamples.N (a flat
             list of residual and resample blocks), middle.{0,1,2}, head.{0,2}}, decoder.{conv1,
             middle.*, upsamples.N (flat: num_res_blocks+1 residual blocks, then a resample, per
             stage), head.*}; residual blocks: residual.{0 norm, 2 conv, 3 norm, 6 conv}, shortcut
  diffusers  AutoencoderKLWan: quant_conv/post_quant_conv, encoder.{conv_in, down_blocks.N,
             mid_block.{resnets.0, attentions.0, resnets.1}, norm_out, conv_out}, decoder.{conv_in,
             mid_block, up_blocks.I.{resnets.J, upsamplers.0}, norm_out, conv_out}; residual blocks
             are {norm1, conv1, norm2, conv2, conv_shortcut}
Our tree follows the diffusers names (decoder upsamplers.0 -> upsampler).
"""

from __future__ import annotations

from typing import Iterator, NamedTuple

from sama_jax.models.params_table import Param
from sama_jax.models.wan_vae import WanVAEConfig


class Entry(NamedTuple):
    """A Param (our path, the Wan2.1_VAE.pth key, transform) with its diffusers key and torch shape:
    the VAE's structure follows its config, so its table is generated from it."""

    param: Param
    diffusers: str  # AutoencoderKLWan key
    torch_shape: tuple[int, ...]

    @property
    def official(self) -> str:
        return self.param.key


def _entry(path, official, diffusers, torch_shape, how) -> Entry:
    return Entry(Param(".".join(path), official, how), diffusers, torch_shape)


def _conv3d(path, off, dif, cin, cout, k=(3, 3, 3)) -> Iterator[Entry]:
    yield _entry(path + ("kernel",), off + ".weight", dif + ".weight", (cout, cin) + k, "conv")
    yield _entry(path + ("bias",), off + ".bias", dif + ".bias", (cout,), "copy")


def _conv2d(path, off, dif, cin, cout) -> Iterator[Entry]:
    yield _entry(path + ("kernel",), off + ".weight", dif + ".weight", (cout, cin, 3, 3), "conv2d")
    yield _entry(path + ("bias",), off + ".bias", dif + ".bias", (cout,), "copy")


def _linear(path, off, dif, cin, cout) -> Iterator[Entry]:
    yield _entry(path + ("kernel",), off + ".weight", dif + ".weight", (cout, cin, 1, 1), "conv1x1")
    yield _entry(path + ("bias",), off + ".bias", dif + ".bias", (cout,), "copy")


def _norm(path, off, dif, dim, per_frame=False) -> Iterator[Entry]:
    # The attention's norm works on (B*T, C, H, W) images: its gamma is (C, 1, 1).
    shape = (dim, 1, 1) if per_frame else (dim, 1, 1, 1)
    yield _entry(path + ("gamma",), off + ".gamma", dif + ".gamma", shape, "flatten")


def _residual(path, off, dif, cin, cout) -> Iterator[Entry]:
    yield from _norm(path + ("norm1",), off + ".residual.0", dif + ".norm1", cin)
    yield from _conv3d(path + ("conv1",), off + ".residual.2", dif + ".conv1", cin, cout)
    yield from _norm(path + ("norm2",), off + ".residual.3", dif + ".norm2", cout)
    yield from _conv3d(path + ("conv2",), off + ".residual.6", dif + ".conv2", cout, cout)
    if cin != cout:
        yield from _conv3d(
            path + ("conv_shortcut",), off + ".shortcut", dif + ".conv_shortcut", cin, cout, (1, 1, 1)
        )


def _attention(path, off, dif, dim) -> Iterator[Entry]:
    yield from _norm(path + ("norm",), off + ".norm", dif + ".norm", dim, per_frame=True)
    yield from _linear(path + ("to_qkv",), off + ".to_qkv", dif + ".to_qkv", dim, 3 * dim)
    yield from _linear(path + ("proj",), off + ".proj", dif + ".proj", dim, dim)


def _resample(path, off, dif, dim, mode) -> Iterator[Entry]:
    out = dim // 2 if mode.startswith("upsample") else dim
    yield from _conv2d(path + ("conv",), off + ".resample.1", dif + ".resample.1", dim, out)
    if mode == "upsample3d":
        yield from _conv3d(
            path + ("time_conv",), off + ".time_conv", dif + ".time_conv", dim, 2 * dim, (3, 1, 1)
        )
    elif mode == "downsample3d":
        yield from _conv3d(path + ("time_conv",), off + ".time_conv", dif + ".time_conv", dim, dim, (3, 1, 1))


def _mid(path, off, dif, dim) -> Iterator[Entry]:
    yield from _residual(path + ("resnets", "0"), off + ".0", dif + ".resnets.0", dim, dim)
    yield from _attention(path + ("attention",), off + ".1", dif + ".attentions.0", dim)
    yield from _residual(path + ("resnets", "1"), off + ".2", dif + ".resnets.1", dim, dim)


def entries(cfg: WanVAEConfig) -> list[Entry]:
    """Every parameter of the model built from `cfg`, with its key in both layouts."""
    out: list[Entry] = []
    z, stages = cfg.z_dim, len(cfg.dim_mult)
    # Encoder
    dims = [cfg.base_dim * u for u in (1,) + cfg.dim_mult]
    enc = ("encoder",)
    out += _conv3d(enc + ("conv_in",), "encoder.conv1", "encoder.conv_in", 3, dims[0])
    n = 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        for _ in range(cfg.num_res_blocks):
            out += _residual(
                enc + ("down_blocks", str(n)),
                f"encoder.downsamples.{n}",
                f"encoder.down_blocks.{n}",
                cin,
                cout,
            )
            cin, n = cout, n + 1
        if i != stages - 1:
            mode = "downsample3d" if cfg.temporal_downsample[i] else "downsample2d"
            out += _resample(
                enc + ("down_blocks", str(n)),
                f"encoder.downsamples.{n}",
                f"encoder.down_blocks.{n}",
                cout,
                mode,
            )
            n += 1
    out += _mid(enc + ("mid_block",), "encoder.middle", "encoder.mid_block", dims[-1])
    out += _norm(enc + ("norm_out",), "encoder.head.0", "encoder.norm_out", dims[-1])
    out += _conv3d(enc + ("conv_out",), "encoder.head.2", "encoder.conv_out", dims[-1], 2 * z)
    # Quantisation convs
    out += _conv3d(("quant_conv",), "conv1", "quant_conv", 2 * z, 2 * z, (1, 1, 1))
    out += _conv3d(("post_quant_conv",), "conv2", "post_quant_conv", z, z, (1, 1, 1))
    # Decoder
    dims = [cfg.base_dim * u for u in (cfg.dim_mult[-1],) + cfg.dim_mult[::-1]]
    temporal_upsample = cfg.temporal_downsample[::-1]
    dec = ("decoder",)
    out += _conv3d(dec + ("conv_in",), "decoder.conv1", "decoder.conv_in", z, dims[0])
    out += _mid(dec + ("mid_block",), "decoder.middle", "decoder.mid_block", dims[0])
    n = 0
    for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
        if i > 0:
            cin //= 2
        for j in range(cfg.num_res_blocks + 1):
            out += _residual(
                dec + ("up_blocks", str(i), "resnets", str(j)),
                f"decoder.upsamples.{n}",
                f"decoder.up_blocks.{i}.resnets.{j}",
                cin,
                cout,
            )
            cin, n = cout, n + 1
        if i != stages - 1:
            mode = "upsample3d" if temporal_upsample[i] else "upsample2d"
            out += _resample(
                dec + ("up_blocks", str(i), "upsampler"),
                f"decoder.upsamples.{n}",
                f"decoder.up_blocks.{i}.upsamplers.0",
                cout,
                mode,
            )
            n += 1
    out += _norm(dec + ("norm_out",), "decoder.head.0", "decoder.norm_out", dims[-1])
    out += _conv3d(dec + ("conv_out",), "decoder.head.2", "decoder.conv_out", dims[-1], 3)
    return out
