"""Wan2.1 DiT / SAMA-14B state dict -> params checkpoint for sama_jax.models.wan_dit.WanDiT.

Layouts, told apart by their keys (an optional 'model.diffusion_model.' / 'diffusion_model.' /
'pipe.dit.' prefix is stripped):
  official   Wan2.1 / DiffSynth / SAMA names: time_projection.1.weight, blocks.N.self_attn.q.weight...
  diffusers  WanTransformer3DModel names: condition_embedder.time_proj.weight, blocks.N.attn1.to_q...
SAMA's additions (segment_embedding, siglip_feat_mlp.{norm,fc1,fc2}, semantic_head.{norm,proj}) use
the same names in both. Model size comes from the shapes: dim, ffn_dim, layers, text/freq/in/out
dims, patch size, semantic widths. The head count is not in any shape, so it is taken from, in order:
`options.num_heads`; a config.json next to the weights (diffusers' num_attention_heads, or
num_heads); dim / 128 when 128 divides dim (every released Wan2.1 model has head_dim 128). text_len
(512 for the released models) likewise from `options.text_len` or config.json.

A base Wan checkpoint lacks SAMA's keys: an error unless `allow_base_wan`, in which case they are
initialised as SAMA's code leaves them: segment embedding zero (a no-op); the projector with
PyTorch's default Linear init (U(+-1/sqrt(fan_in)) for weight and bias) and LayerNorm (1, 0); the
semantic head with a xavier-uniform weight, N(0, 1e-3^2) bias and LayerNorm (1, 0); numpy seed
`options.seed` (default 0).

Streaming: each output parameter is built and written on its own, converted straight to the stored
dtype (torch: one copy per tensor, transposed on the way). Small parameters are written in groups;
a parameter larger than GROUP_BYTES (every weight matrix of the 14B blocks, time_projection) goes
through ParamsWriter.add_by_rows, a stacked one a layer at a time, each layer read through a fresh
memory map of its shard that is dropped afterwards. Peak host memory is a few layers of the largest
parameter (ffn.0 of 14B: 13824 x 5120 x 2 bytes = 135 MiB) whatever the depth: 1.45 GiB peak RSS
for the full 40-layer 14B (benchmarks/convert_dit_rss.py --layers 40).
"""

from __future__ import annotations

import ctypes
import re

import numpy as np
import orbax.checkpoint.experimental.v1 as ocp

from convert_wan_weights.progress import Progress
from sama_jax import params_io
from sama_jax.models.params_table import PERMUTATION, stored_shape, transform
from sama_jax.models.wan_dit_params import (
    BLOCK_PARAMS,
    PREFIXES,
    SAMA_PARAMS,
    SAMA_PREFIXES,
    TOP_PARAMS,
    rename,
    to_layout,
)
from sama_jax.tensor_source import (
    ConversionError,
    TensorSource,
    cast,
    check_keys,
    config_json,
    nest,
    strip_prefix,
)

KIND = "wan_dit"
# Small parameters are flushed to the checkpoint in groups of about this many bytes; a stacked
# parameter larger than this is written layer by layer.
GROUP_BYTES = 64 << 20


def detect_layout(bare_keys, path: str) -> str:
    keys = set(bare_keys)
    if "time_projection.1.weight" in keys:
        return "official"
    if "condition_embedder.time_proj.weight" in keys:
        return "diffusers"
    raise ConversionError(
        f"{path}: not a Wan2.1 DiT checkpoint: neither time_projection.1.weight (official "
        "Wan/SAMA layout) nor condition_embedder.time_proj.weight (diffusers) found"
    )


def matches(source: TensorSource) -> bool:
    bare = strip_prefix(source.keys(), PREFIXES)
    return "patch_embedding.weight" in bare and (
        "time_projection.1.weight" in bare or "condition_embedder.time_proj.weight" in bare
    )


def expected_shapes(cfg: dict) -> dict[str, tuple[int, ...]]:
    """Official key -> shape for a model config (the SAMA keys included)."""
    dim, ffn, sem, hid = cfg["dim"], cfg["ffn_dim"], cfg["semantic_dim"], cfg["semantic_hidden_dim"]
    patch = tuple(cfg["patch_size"])
    lin = lambda name, i, o: {f"{name}.weight": (o, i), f"{name}.bias": (o,)}
    shapes = {
        "patch_embedding.weight": (dim, cfg["in_dim"], *patch),
        "patch_embedding.bias": (dim,),
        "head.modulation": (1, 2, dim),
        "segment_embedding.weight": (cfg["num_segments"], dim),
        "siglip_feat_mlp.norm.weight": (sem,),
        "siglip_feat_mlp.norm.bias": (sem,),
        "semantic_head.norm.weight": (dim,),
        "semantic_head.norm.bias": (dim,),
    }
    shapes.update(lin("text_embedding.0", cfg["text_dim"], dim) | lin("text_embedding.2", dim, dim))
    shapes.update(lin("time_embedding.0", cfg["freq_dim"], dim) | lin("time_embedding.2", dim, dim))
    shapes.update(lin("time_projection.1", dim, 6 * dim))
    shapes.update(lin("head.head", dim, cfg["out_dim"] * int(np.prod(patch))))
    shapes.update(lin("siglip_feat_mlp.fc1", sem, hid) | lin("siglip_feat_mlp.fc2", hid, dim))
    shapes.update(lin("semantic_head.proj", dim, sem))
    for i in range(cfg["num_layers"]):
        b = f"blocks.{i}."
        shapes[b + "modulation"] = (1, 6, dim)
        for attn in ("self_attn", "cross_attn"):
            for name in "qkvo":
                shapes.update(lin(f"{b}{attn}.{name}", dim, dim))
            shapes[f"{b}{attn}.norm_q.weight"] = (dim,)
            shapes[f"{b}{attn}.norm_k.weight"] = (dim,)
        shapes[b + "norm3.weight"] = (dim,)
        shapes[b + "norm3.bias"] = (dim,)
        shapes.update(lin(b + "ffn.0", dim, ffn) | lin(b + "ffn.2", ffn, dim))
    return shapes


# -- config from shapes ----------------------------------------------------------------------------
def derive_config(source: TensorSource, official_keys, shape_of, options) -> dict:
    """Model config from tensor shapes (official names via `shape_of`), config.json and options."""
    from sama_jax import presets

    def need(key):
        shape = shape_of(key)
        if shape is None:
            raise ConversionError(f"{source.path}: cannot derive the model size: {key} is missing")
        return shape

    patch_shape = need("patch_embedding.weight")
    dim, in_dim, patch = patch_shape[0], patch_shape[1], tuple(patch_shape[2:])
    if len(patch) != 3:
        raise ConversionError(
            f"{source.path}: patch_embedding.weight has shape {patch_shape}, "
            "expected a Conv3d weight (dim, in, t, h, w)"
        )
    layer_ids = set()
    for key in official_keys:
        match = re.match(r"blocks\.(\d+)\.", key)
        if match:
            layer_ids.add(int(match.group(1)))
    if not layer_ids:
        raise ConversionError(f"{source.path}: no transformer blocks (blocks.N.*) found")
    extra = config_json(source)
    num_heads = (
        getattr(options, "num_heads", None) or extra.get("num_attention_heads") or extra.get("num_heads")
    )
    if not num_heads:
        if dim % 128:
            raise ConversionError(
                f"{source.path}: cannot tell the number of attention heads of a dim-{dim} model "
                "(not a multiple of 128); put a config.json with num_attention_heads next to the "
                "weights or pass --num-heads"
            )
        num_heads = dim // 128
    if dim % int(num_heads):
        raise ConversionError(f"{source.path}: dim {dim} is not divisible by num_heads {num_heads}")
    common = presets.DIT["wan_14b"]
    cfg = dict(
        dim=dim,
        ffn_dim=need("blocks.0.ffn.0.weight")[0],
        num_heads=int(num_heads),
        num_layers=max(layer_ids) + 1,
        freq_dim=need("time_embedding.0.weight")[1],
        text_dim=need("text_embedding.0.weight")[1],
        in_dim=in_dim,
        out_dim=need("head.head.weight")[0] // int(np.prod(patch)),
        patch_size=patch,
        eps=float(extra.get("eps", common["eps"])),
        text_len=int(getattr(options, "text_len", None) or extra.get("text_len") or common["text_len"]),
        semantic_dim=common["semantic_dim"],
        semantic_hidden_dim=common["semantic_hidden_dim"],
        num_segments=common["num_segments"],
    )
    fc1 = shape_of("siglip_feat_mlp.fc1.weight")
    if fc1 is not None:
        cfg["semantic_hidden_dim"], cfg["semantic_dim"] = fc1
    segments = shape_of("segment_embedding.weight")
    if segments is not None:
        cfg["num_segments"] = segments[0]
    return cfg


# -- base-Wan initialisation of SAMA's modules -----------------------------------------------------
def _sama_init(key: str, shape: tuple[int, ...], cfg: dict, rng: np.random.Generator) -> np.ndarray:
    if key == "segment_embedding.weight":
        return np.zeros(shape, np.float32)
    if key.endswith("norm.weight"):
        return np.ones(shape, np.float32)
    if key.endswith("norm.bias"):
        return np.zeros(shape, np.float32)
    if key.startswith("siglip_feat_mlp."):  # torch.nn.Linear default init
        fan_in = cfg["semantic_dim"] if ".fc1." in key else cfg["semantic_hidden_dim"]
        bound = 1.0 / np.sqrt(fan_in)
        return rng.uniform(-bound, bound, shape).astype(np.float32)
    if key == "semantic_head.proj.weight":  # xavier uniform
        bound = np.sqrt(6.0 / (shape[0] + shape[1]))
        return rng.uniform(-bound, bound, shape).astype(np.float32)
    if key == "semantic_head.proj.bias":
        return rng.normal(0.0, 1e-3, shape).astype(np.float32)
    raise ConversionError(f"no initialisation for {key}")


# -- conversion ------------------------------------------------------------------------------------
def _merge(into: dict, tree: dict) -> None:
    for k, v in tree.items():
        if isinstance(v, dict):
            _merge(into.setdefault(k, {}), v)
        else:
            into[k] = v


def _return_freed_memory() -> None:
    """glibc keeps memory freed by the writer's worker threads in their malloc arenas; without a
    trim, each group's write buffers stay resident and the next group stacks on top."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def convert(source: TensorSource, output: str, options) -> dict:
    bare = strip_prefix(source.keys(), PREFIXES)
    layout = detect_layout(bare, source.path)
    to_file = {}  # official key -> key in the file
    for key in bare:
        to_file[key if layout == "official" else rename(key, to_diffusers=False)] = bare[key]

    def shape_of(official_key):
        file_key = to_file.get(official_key)
        return None if file_key is None else tuple(source.shape(file_key))

    cfg = derive_config(source, list(to_file), shape_of, options)
    expected = {to_layout(k, layout): s for k, s in expected_shapes(cfg).items()}
    sama_keys = [k for k in expected if k.startswith(SAMA_PREFIXES)]
    allow_base = bool(getattr(options, "allow_base_wan", False))
    try:
        check_keys(
            source.path,
            {k: source.shape(v) for k, v in bare.items()},
            expected,
            optional=sama_keys if allow_base else (),
        )
    except ConversionError as e:
        missing_sama = [k for k in sama_keys if k not in bare]
        hint = (
            "\n  (a base Wan2.1 checkpoint without SAMA's keys converts with --allow-base-wan)"
            if missing_sama and not allow_base
            else ""
        )
        raise ConversionError(f"{e}{hint}") from None
    source.check_float(bare.values())

    rng = np.random.default_rng(getattr(options, "seed", 0) or 0)
    shapes = expected_shapes(cfg)
    dtype = getattr(options, "dtype", "bfloat16")
    np_dtype = cast(np.zeros(0, np.float32), dtype).dtype
    initialised = []

    def read(official_key: str, how: str) -> np.ndarray:
        file_key = to_file.get(official_key)
        if file_key is None:
            initialised.append(official_key)
            return cast(transform(_sama_init(official_key, shapes[official_key], cfg, rng), how), dtype)
        return source.read(file_key, dtype, permute=PERMUTATION.get(how))

    def layers(template: str, how: str):
        return lambda start, stop: (
            np.stack([read(template.format(i=i), how) for i in range(start, stop)])
            if stop - start > 1
            else read(template.format(i=start), how)[None]
        )

    num_layers = cfg["num_layers"]
    stored = {ours: stored_shape(shapes[official], how) for ours, official, how in TOP_PARAMS + SAMA_PARAMS}
    stored.update(
        {
            ours: (num_layers, *stored_shape(shapes[template.format(i=0)], how))
            for ours, template, how in BLOCK_PARAMS
        }
    )
    nbytes = {ours: int(np.prod(shape)) * np_dtype.itemsize for ours, shape in stored.items()}
    progress = Progress(KIND, len(stored), sum(nbytes.values()))
    group, group_bytes = {}, 0

    def add(writer, path: str, array: np.ndarray) -> None:
        nonlocal group, group_bytes
        _merge(group, nest(path.split("."), array))
        group_bytes += array.nbytes
        if group_bytes >= GROUP_BYTES:
            writer.add(group)
            group, group_bytes = {}, 0
            _return_freed_memory()

    # Orbax copies host arrays before writing them unless told not to; these arrays are never
    # modified after being handed over, and the copy would double the memory of a group.
    no_copy = ocp.Context()
    no_copy.memory.deepcopy_host_arrays = False
    overwrite = bool(getattr(options, "overwrite", False))
    with no_copy, params_io.ParamsWriter(output, KIND, cfg, overwrite, on_written=progress) as writer:
        for ours, official, how in TOP_PARAMS + SAMA_PARAMS:
            if nbytes[ours] > GROUP_BYTES:  # time_projection of 14B: 315 MiB, uncompressed as one block
                writer.add_by_rows(
                    ours.split("."),
                    stored[ours],
                    np_dtype,
                    lambda start, stop, key=official, how=how: read(key, how)[start:stop],
                    block_rows=stored[ours][0],
                )
            else:
                add(writer, ours, read(official, how))
        for ours, template, how in BLOCK_PARAMS:
            if nbytes[ours] > GROUP_BYTES:
                writer.add_by_rows(ours.split("."), stored[ours], np_dtype, layers(template, how))
            else:
                add(writer, ours, layers(template, how)(0, num_layers))
        if group:
            writer.add(group)
        writer.finalize()
    return dict(
        layout=layout,
        dtype=dtype,
        params=int(sum(np.prod(s) for s in stored.values())),
        num_layers=num_layers,
        dim=cfg["dim"],
        num_heads=cfg["num_heads"],
        initialised=initialised,
    )
