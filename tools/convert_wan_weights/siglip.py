"""SigLIP vision tower: transformers safetensors -> params checkpoint of sama_jax.models.siglip.

Accepted layouts (transformers key names):
  prefixed  vision_model.embeddings..., vision_model.encoder.layers.N..., vision_model.post_layernorm
            (SiglipVisionModel.save_pretrained, and the full SiglipModel such as
            google/siglip-so400m-patch14-384, whose text_model.* and logit_{scale,bias} are ignored)
  flat      the same keys without the vision_model. prefix
The attention-pooling head (head.probe, head.attention.*, head.layernorm.*, head.mlp.*) is ignored
on purpose: SAMA's semantic features are the last hidden state after post_layernorm, before that head.

Sizes come from tensor shapes; the number of heads and the input size (384 for so400m, which is not
27 patches x 14 = 378) are not in the weights and are read from the config.json next to the
checkpoint (its vision_config for a full SiglipModel). Without a config.json only so400m-patch14-384
(width 1152, patch 14, 27 x 27 positions -> 16 heads, 384 px) is recognised.
"""

from __future__ import annotations

import math
import re

import numpy as np

from sama_jax import params_io, presets
from sama_jax.models.params_table import transform, tree
from sama_jax.models.siglip_params import PARAMS, PREFIX
from sama_jax.tensor_source import (
    ConversionError,
    TensorSource,
    cast,
    check_keys,
    config_json,
)

KIND = "siglip"
# Tensors that are present in released checkpoints but are not part of the tower we build.
IGNORED = re.compile(r"^(vision_model\.)?head\.|^text_model\.|^logit_(scale|bias)$")


def prefix_of(source: TensorSource) -> str | None:
    for prefix in (PREFIX, ""):
        if (
            f"{prefix}embeddings.patch_embedding.weight" in source
            and f"{prefix}encoder.layers.0.self_attn.q_proj.weight" in source
        ):
            return prefix
    return None


def matches(source: TensorSource) -> bool:
    return prefix_of(source) is not None


def infer_config(source: TensorSource, prefix: str) -> dict:
    hidden, channels, patch, _ = source.shape(f"{prefix}embeddings.patch_embedding.weight")
    if channels != 3:
        raise ConversionError(f"{source.path}: patch embedding takes {channels} channels, expected 3")
    num_positions, _ = source.shape(f"{prefix}embeddings.position_embedding.weight")
    grid = math.isqrt(num_positions)
    if grid * grid != num_positions:
        raise ConversionError(f"{source.path}: {num_positions} position embeddings is not a square grid")
    pattern = re.compile("^" + re.escape(prefix) + r"encoder\.layers\.(\d+)\.")
    layers = {int(m.group(1)) for k in source.keys() if (m := pattern.match(k))}
    full = presets.SIGLIP["wan_14b"]
    config = dict(
        hidden_size=hidden,
        num_layers=max(layers) + 1,
        patch_size=patch,
        image_size=grid * patch,
        eps=full["eps"],
        intermediate_size=source.shape(f"{prefix}encoder.layers.0.mlp.fc1.weight")[0],
    )
    hf = config_json(source)
    hf = hf.get("vision_config", hf)
    so400m = (hidden, patch, grid) == (
        full["hidden_size"],
        full["patch_size"],
        full["image_size"] // full["patch_size"],
    )
    # The input size need not be a multiple of the patch: so400m takes 384 px and its VALID patch
    # conv ignores the last 384 - 27 * 14 = 6 rows and columns.
    if "image_size" in hf:
        config["image_size"] = hf["image_size"]
    elif so400m:
        config["image_size"] = full["image_size"]
    if config["image_size"] // patch != grid:
        raise ConversionError(
            f"{source.path}: image_size {config['image_size']} with patch {patch} "
            f"gives a {config['image_size'] // patch}^2 grid, but the position "
            f"embedding has {num_positions} entries"
        )
    if "num_attention_heads" in hf:
        config["num_heads"] = hf["num_attention_heads"]
        config["eps"] = hf.get("layer_norm_eps", config["eps"])
    elif so400m:
        config["num_heads"] = full["num_heads"]
    else:
        raise ConversionError(
            f"{source.path}: the number of attention heads is not in the weights; "
            "put the model's config.json next to the checkpoint"
        )
    if hidden % config["num_heads"]:
        raise ConversionError(
            f"{source.path}: width {hidden} is not divisible by {config['num_heads']} heads"
        )
    return config


def _torch_shapes(config: dict) -> dict[str, tuple[int, ...]]:
    """Our parameter path -> the torch tensor's shape (one layer's for a stacked one)."""
    d, f, p = config["hidden_size"], config["intermediate_size"], config["patch_size"]
    shapes = {
        "patch_embedding.kernel": (d, 3, p, p),
        "position_embedding.embedding": ((config["image_size"] // p) ** 2, d),
        "layers.mlp.fc1.kernel": (f, d),
        "layers.mlp.fc1.bias": (f,),
        "layers.mlp.fc2.kernel": (d, f),
    }
    square = [p.ours for p in PARAMS if p.ours.startswith("layers.self_attn") and p.how == "linear"]
    return shapes | {ours: (d, d) for ours in square}


def expected_shapes(config: dict, prefix: str) -> dict[str, tuple[int, ...]]:
    shapes = _torch_shapes(config)
    hidden = (config["hidden_size"],)
    return {prefix + key: shapes.get(p.ours, hidden) for p in PARAMS for key in p.keys(config["num_layers"])}


def convert(source: TensorSource, output: str, args) -> dict:
    prefix = prefix_of(source)
    if prefix is None:
        raise ConversionError(
            f"{source.path}: not a SigLIP vision tower (no "
            "[vision_model.]embeddings.patch_embedding / encoder.layers.0 tensors)"
        )
    config = infer_config(source, prefix)
    shapes = {k: source.shape(k) for k in source.keys()}
    ignored = [k for k in shapes if IGNORED.match(k)]
    check_keys(
        source.path, {k: v for k, v in shapes.items() if k not in ignored}, expected_shapes(config, prefix)
    )
    source.check_float(k for k in shapes if k not in ignored)

    config.update(compute_dtype=args.dtype, param_dtype=args.dtype)
    get = lambda key: source.get(prefix + key)
    with params_io.ParamsWriter(output, KIND, config, overwrite=args.overwrite) as writer:
        _write(writer, get, config, args.dtype)
    num_params = sum(int(np.prod(s)) for s in expected_shapes(config, prefix).values())
    return dict(
        layout="prefixed" if prefix else "flat",
        num_layers=config["num_layers"],
        hidden_size=config["hidden_size"],
        num_params=num_params,
        ignored_tensors=len(ignored),
        dtype=args.dtype,
    )


def _write(writer, get, config, dtype) -> None:
    """The unstacked parameters in one group, then each per-layer tensor stacked over layers."""
    writer.add(tree((p.ours, cast(transform(get(p.key), p.how), dtype)) for p in PARAMS if not p.stacked))
    for p in PARAMS:
        if p.stacked:
            layers = [cast(transform(get(key), p.how), dtype) for key in p.keys(config["num_layers"])]
            writer.add(tree([(p.ours, np.stack(layers))]))
    writer.finalize()
