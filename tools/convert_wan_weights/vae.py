"""Wan2.1 VAE: PyTorch checkpoint -> params checkpoint of sama_jax.models.wan_vae.WanVAE.

Two layouts are read, official (Wan2.1_VAE.pth) and diffusers (AutoencoderKLWan); their names
are the table in sama_jax/models/wan_vae_params.py. The decoder's flat official index is derived
from the structure, so any num_res_blocks maps right.

Tensor layouts: Conv3d (out, in, t, h, w) -> kernel (t, h, w, in, out); Conv2d (out, in, h, w) ->
(h, w, in, out); the attention's 1x1 Conv2d (out, in, 1, 1) -> Linear kernel (in, out); RMS norm
gamma (C, 1, 1[, 1]) -> (C,). Sizes (base_dim, z_dim, dim_mult, num_res_blocks, temporal
downsampling) come from the tensor shapes and the encoder's block sequence; the latent mean/std come
from a diffusers config.json next to the checkpoint when there is one, else Wan2.1's constants.
"""

from __future__ import annotations

import dataclasses

import numpy as np

from sama_jax import params_io
from sama_jax.models.params_table import transform, tree
from sama_jax.models.wan_vae import KIND, WanVAEConfig
from sama_jax.models.wan_vae_params import entries
from sama_jax.tensor_source import ConversionError, TensorSource, cast, check_keys, config_json

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
        group, group_id = [], None
        for e in table:
            path = tuple(e.param.ours.split("."))
            if path[:-1][:3] != group_id and group:
                writer.add(tree(group))
                group = []
            group_id = path[:-1][:3]
            group.append((e.param.ours, cast(transform(source.get(key(e)), e.param.how), args.dtype)))
        writer.add(tree(group))
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
