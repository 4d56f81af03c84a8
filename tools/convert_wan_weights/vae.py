"""Wan2.1 VAE: PyTorch checkpoint -> params checkpoint of sama_jax.models.wan_vae.WanVAE.

Two layouts are read:
  official   Wan2.1_VAE.pth: conv1/conv2 (quant/post-quant), encoder.{conv1, downsamples.N (a flat
             list of residual and resample blocks), middle.{0,1,2}, head.{0,2}}, decoder.{conv1,
             middle.*, upsamples.N (flat: num_res_blocks+1 residual blocks, then a resample, per
             stage), head.*}; residual blocks: residual.{0 norm, 2 conv, 3 norm, 6 conv}, shortcut
  diffusers  AutoencoderKLWan: quant_conv/post_quant_conv, encoder.{conv_in, down_blocks.N,
             mid_block.{resnets.0, attentions.0, resnets.1}, norm_out, conv_out}, decoder.{conv_in,
             mid_block, up_blocks.I.{resnets.J, upsamplers.0}, norm_out, conv_out}; residual blocks
             are {norm1, conv1, norm2, conv2, conv_shortcut}
Both map onto our tree, which follows the diffusers names (decoder upsamplers.0 -> upsampler).
The decoder's flat official index is derived from the structure, so any num_res_blocks maps right.

Tensor layouts: Conv3d (out, in, t, h, w) -> kernel (t, h, w, in, out); Conv2d (out, in, h, w) ->
(h, w, in, out); the attention's 1x1 Conv2d (out, in, 1, 1) -> Linear kernel (in, out); RMS norm
gamma (C, 1, 1[, 1]) -> (C,). Sizes (base_dim, z_dim, dim_mult, num_res_blocks, temporal
downsampling) come from the tensor shapes and the encoder's block sequence; the latent mean/std come
from a diffusers config.json next to the checkpoint when there is one, else Wan2.1's constants.
"""

from __future__ import annotations

import dataclasses
from typing import Iterator, NamedTuple

import numpy as np

from sama_jax import params_io
from sama_jax.models.wan_vae import KIND, WanVAEConfig
from tools.convert_wan_weights.source import ConversionError, TensorSource, cast, check_keys, config_json


class Entry(NamedTuple):
    path: tuple[str, ...]  # our parameter path
    official: str  # Wan2.1_VAE.pth key
    diffusers: str  # AutoencoderKLWan key
    torch_shape: tuple[int, ...]
    layout: str  # how the torch tensor becomes ours: conv3d, conv2d, linear, norm


def _conv3d(path, off, dif, cin, cout, k=(3, 3, 3)) -> Iterator[Entry]:
    yield Entry(path + ("kernel",), off + ".weight", dif + ".weight", (cout, cin) + k, "conv3d")
    yield Entry(path + ("bias",), off + ".bias", dif + ".bias", (cout,), "bias")


def _conv2d(path, off, dif, cin, cout) -> Iterator[Entry]:
    yield Entry(path + ("kernel",), off + ".weight", dif + ".weight", (cout, cin, 3, 3), "conv2d")
    yield Entry(path + ("bias",), off + ".bias", dif + ".bias", (cout,), "bias")


def _linear(path, off, dif, cin, cout) -> Iterator[Entry]:
    yield Entry(path + ("kernel",), off + ".weight", dif + ".weight", (cout, cin, 1, 1), "linear")
    yield Entry(path + ("bias",), off + ".bias", dif + ".bias", (cout,), "bias")


def _norm(path, off, dif, dim, per_frame=False) -> Iterator[Entry]:
    # The attention's norm works on (B*T, C, H, W) images: its gamma is (C, 1, 1).
    shape = (dim, 1, 1) if per_frame else (dim, 1, 1, 1)
    yield Entry(path + ("gamma",), off + ".gamma", dif + ".gamma", shape, "norm")


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


# Keys that identify each layout (and that every Wan2.1 VAE has).
_MARKERS = {
    "official": ("encoder.conv1.weight", "decoder.head.2.weight", "conv2.weight"),
    "diffusers": ("encoder.conv_in.weight", "decoder.conv_out.weight", "post_quant_conv.weight"),
}


def layout_of(source: TensorSource) -> str | None:
    for layout, keys in _MARKERS.items():
        if all(k in source for k in keys):
            return layout
    return None


def matches(source: TensorSource) -> bool:
    return layout_of(source) is not None


def infer_config(source: TensorSource, layout: str) -> WanVAEConfig:
    """Sizes from shapes; stages from the encoder's flat block list (a resample ends a stage)."""
    official = layout == "official"
    conv_in, post_quant = _MARKERS[layout][0], _MARKERS[layout][2]
    block = "encoder.downsamples.{}" if official else "encoder.down_blocks.{}"
    res_conv2 = ".residual.6.weight" if official else ".conv2.weight"
    base_dim, z_dim = source.shape(conv_in)[0], source.shape(post_quant)[0]
    stages: list[list[int]] = [[]]  # output channels of each stage's residual blocks
    temporal: list[bool] = []
    n = 0
    while any(k.startswith(block.format(n) + ".") for k in source.keys()):
        prefix = block.format(n)
        if prefix + ".resample.1.weight" in source:
            temporal.append(prefix + ".time_conv.weight" in source)
            stages.append([])
        elif prefix + res_conv2 in source:
            stages[-1].append(source.shape(prefix + res_conv2)[0])
        else:
            raise ConversionError(
                f"{source.path}: {prefix} is neither a residual block "
                f"({prefix}{res_conv2}) nor a resample block"
            )
        n += 1
    counts = {len(s) for s in stages}
    if len(counts) != 1 or 0 in counts or any(len(set(s)) != 1 for s in stages):
        raise ConversionError(
            f"{source.path}: unexpected encoder block structure (residual block widths per stage: {stages})"
        )
    dim_mult = tuple(s[0] // base_dim for s in stages)
    hf = _read_diffusers_config(source) if not official else {}
    stats = {k: tuple(hf[k]) for k in ("latents_mean", "latents_std") if k in hf}
    try:
        return WanVAEConfig(
            base_dim=base_dim,
            z_dim=z_dim,
            dim_mult=dim_mult,
            num_res_blocks=counts.pop(),
            temporal_downsample=tuple(temporal),
            **stats,
        )
    except ValueError as e:
        raise ConversionError(f"{source.path}: not a Wan2.1 VAE: {e}") from e


def _read_diffusers_config(source: TensorSource) -> dict:
    config = config_json(source)
    # Wan2.2's VAE shares the class but not the architecture.
    if config.get("is_residual") or config.get("patch_size"):
        raise ConversionError(
            f"config.json next to {source.path}: is_residual/patch_size are set: this is a Wan2.2 VAE, "
            "only the Wan2.1 VAE is supported"
        )
    return config


def to_ours(tensor: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv3d":
        return tensor.transpose(2, 3, 4, 1, 0)
    if layout == "conv2d":
        return tensor.transpose(2, 3, 1, 0)
    if layout == "linear":
        return tensor[:, :, 0, 0].T
    if layout == "norm":
        return tensor.reshape(-1)
    return tensor


def _nest(tree: dict, path: tuple[str, ...], value) -> None:
    for name in path[:-1]:
        tree = tree.setdefault(name, {})
    tree[path[-1]] = value


def convert(source: TensorSource, output: str, args) -> dict:
    layout = layout_of(source)
    if layout is None:
        raise ConversionError(
            f"{source.path}: not a Wan2.1 VAE checkpoint (neither the official "
            "Wan2.1_VAE.pth nor the diffusers AutoencoderKLWan layout)"
        )
    cfg = infer_config(source, layout)
    table = entries(cfg)
    key = (lambda e: e.official) if layout == "official" else (lambda e: e.diffusers)
    check_keys(
        source.path, {k: source.shape(k) for k in source.keys()}, {key(e): e.torch_shape for e in table}
    )

    source.check_float(key(e) for e in table)

    config = dict(dataclasses.asdict(cfg), compute_dtype=args.dtype, param_dtype=args.dtype)
    with params_io.ParamsWriter(output, KIND, config, overwrite=args.overwrite) as writer:
        # One partial save per block keeps at most one block's tensors in memory.
        group, group_id = {}, None
        for e in table:
            if e.path[:-1][:3] != group_id and group:
                writer.add(group)
                group = {}
            group_id = e.path[:-1][:3]
            _nest(group, e.path, cast(to_ours(source.get(key(e)), e.layout), args.dtype))
        writer.add(group)
        writer.finalize()
    return dict(
        layout=layout,
        base_dim=cfg.base_dim,
        z_dim=cfg.z_dim,
        dim_mult=list(cfg.dim_mult),
        num_tensors=len(table),
        num_params=sum(int(np.prod(e.torch_shape)) for e in table),
        dtype=args.dtype,
    )
