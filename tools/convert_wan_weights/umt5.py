"""umT5-XXL encoder: PyTorch checkpoint -> params checkpoint of sama_jax.models.umt5.UMT5Encoder.

Two layouts are read:
  official  Wan2.1's models_t5_umt5-xxl-enc-bf16.pth: token_embedding.weight, blocks.N.{norm1,
            attn.{q,k,v,o}, norm2, ffn.gate.0, ffn.fc1, ffn.fc2, pos_embedding.embedding}, norm.weight
  transformers  UMT5EncoderModel (or a full UMT5 model; its decoder.* and lm_head.* tensors are
            ignored): shared.weight, encoder.block.N.layer.0.SelfAttention.{q,k,v,o,
            relative_attention_bias}, layer.0.layer_norm, layer.1.DenseReluDense.{wi_0,wi_1,wo},
            layer.1.layer_norm, encoder.final_layer_norm
FFN mapping: official ffn.gate.0 = transformers wi_0 (the GELU branch) -> our ffn.gate; ffn.fc1 = wi_1
-> ffn.fc1; ffn.fc2 = wo -> ffn.fc2. The token embedding is always read from shared.weight when present:
some transformers 5.x saves leave encoder.embed_tokens untied (zeros), so it is never trusted over it.

Memory: the token embedding (256384 x 4096) is read and written EMBEDDING_BLOCK_BYTES of rows at a
time in the stored dtype, and a stacked per-layer weight larger than that one layer at a time
(ParamsWriter.add_by_rows), so no whole float32 copy of either is ever held.

Sizes come from tensor shapes. max_distance and eps are not stored in the weights: they come from a
transformers config.json next to the checkpoint when there is one, else umT5-XXL's (128, 1e-6).
"""

from __future__ import annotations

import re

import numpy as np

from convert_wan_weights.progress import Progress
from sama_jax import params_io, presets
from sama_jax.models.params_table import PERMUTATION, stored_shape, tree
from sama_jax.models.umt5_params import BY_OURS, IGNORED_PREFIXES, PARAMS, UNTIED_EMBEDDING, key_in
from sama_jax.tensor_source import ConversionError, TensorSource, check_keys, config_json

KIND = "umt5"
# Rows of the token embedding per write, and the size above which a stacked weight is written
# layer by layer.
EMBEDDING_BLOCK_BYTES = 64 << 20


def layout_of(source: TensorSource) -> str | None:
    if "token_embedding.weight" in source and "blocks.0.pos_embedding.embedding.weight" in source:
        return "official"
    if "encoder.block.0.layer.0.SelfAttention.q.weight" in source:
        return "transformers"
    return None


def matches(source: TensorSource) -> bool:
    return layout_of(source) is not None


def infer_config(source: TensorSource, layout: str) -> dict:
    key = lambda ours: key_in(layout, BY_OURS[ours].key).format(i=0)
    embedding = key("token_embedding.embedding")
    if embedding not in source and layout == "transformers" and UNTIED_EMBEDDING in source:
        embedding = UNTIED_EMBEDDING
    for needed in (embedding, key("blocks.ffn.fc1.kernel"), key("blocks.pos_embedding.embedding")):
        if needed not in source:
            raise ConversionError(f"{source.path}: {layout} umT5 layout but no tensor {needed!r}")
    pattern = re.compile(r"^blocks\.(\d+)\." if layout == "official" else r"^encoder\.block\.(\d+)\.")
    layers = {int(m.group(1)) for k in source.keys() if (m := pattern.match(k))}
    vocab_size, dim = source.shape(embedding)
    num_buckets, num_heads = source.shape(key("blocks.pos_embedding.embedding"))
    full = presets.TEXT_ENCODER["wan_14b"]
    ffn_dim = source.shape(key("blocks.ffn.fc1.kernel"))[0]
    config = dict(
        vocab_size=vocab_size,
        dim=dim,
        ffn_dim=ffn_dim,
        num_heads=num_heads,
        num_layers=max(layers) + 1,
        num_buckets=num_buckets,
        max_distance=full["max_distance"],
        eps=full["eps"],
        text_len=full["text_len"],
    )
    hf = config_json(source) if layout == "transformers" else {}
    if hf:
        where = "config.json next to " + source.path
        if hf.get("feed_forward_proj", "gated-gelu") != "gated-gelu":
            raise ConversionError(
                f"{where}: feed_forward_proj is {hf['feed_forward_proj']!r}; umT5 uses gated-gelu"
            )
        if hf.get("num_heads", num_heads) != num_heads:
            raise ConversionError(
                f"{where}: num_heads {hf['num_heads']} but the relative attention bias has {num_heads} heads"
            )
        config["max_distance"] = hf.get("relative_attention_max_distance", config["max_distance"])
        config["eps"] = hf.get("layer_norm_epsilon", config["eps"])
    return config


def expected_shapes(config: dict, layout: str) -> dict[str, tuple[int, ...]]:
    d, f, h, nb = config["dim"], config["ffn_dim"], config["num_heads"], config["num_buckets"]
    torch_shapes = {
        "token_embedding.embedding": (config["vocab_size"], d),
        "blocks.pos_embedding.embedding": (nb, h),
        "blocks.ffn.gate.kernel": (f, d),
        "blocks.ffn.fc1.kernel": (f, d),
        "blocks.ffn.fc2.kernel": (d, f),
        **{f"blocks.attn.{n}.kernel": (d, d) for n in "qkvo"},
    }
    return {
        key_in(layout, p.key).format(i=i): torch_shapes.get(p.ours, (d,))
        for p in PARAMS
        for i in range(config["num_layers"] if p.stacked else 1)
    }


def convert(source: TensorSource, output: str, args) -> dict:
    layout = layout_of(source)
    if layout is None:
        raise ConversionError(
            f"{source.path}: not a umT5 encoder checkpoint (neither the official "
            "Wan2.1 nor the transformers UMT5EncoderModel layout)"
        )
    config = infer_config(source, layout)
    expected = expected_shapes(config, layout)
    shapes = {k: source.shape(k) for k in source.keys()}
    ignored = [k for k in shapes if layout == "transformers" and k.startswith(IGNORED_PREFIXES)]
    embedding_key = key_in(layout, "token_embedding.weight")
    if layout == "transformers":
        if embedding_key not in shapes and UNTIED_EMBEDDING in shapes:
            embedding_key = UNTIED_EMBEDDING  # only the encoder's copy was saved
            expected[UNTIED_EMBEDDING] = expected.pop(key_in(layout, "token_embedding.weight"))
        elif UNTIED_EMBEDDING in shapes:
            ignored.append(UNTIED_EMBEDDING)  # tied to shared.weight; possibly left as zeros
    check_keys(source.path, {k: v for k, v in shapes.items() if k not in ignored}, expected)

    source.check_float(k for k in shapes if k not in ignored)

    config.update(compute_dtype=args.dtype, param_dtype=args.dtype)
    dtype, itemsize = args.dtype, 2 if args.dtype == "bfloat16" else 4
    num_layers = config["num_layers"]
    vocab, dim = source.shape(embedding_key)
    stacked = [p for p in PARAMS if p.stacked]
    per_layer = {
        p.ours: (num_layers, *stored_shape(source.shape(key_in(layout, p.key).format(i=0)), p.how))
        for p in stacked
    }
    total = itemsize * (vocab * dim + dim + sum(int(np.prod(shape)) for shape in per_layer.values()))
    progress = Progress(KIND, 2 + len(stacked), total)

    def layer(p, i):
        return source.read(key_in(layout, p.key).format(i=i), dtype, permute=PERMUTATION.get(p.how))

    with params_io.ParamsWriter(
        output, KIND, config, overwrite=args.overwrite, on_written=progress
    ) as writer:
        writer.add(tree([("norm.scale", source.read(key_in(layout, "norm.weight"), dtype))]))
        writer.add_by_rows(
            ("token_embedding", "embedding"),
            (vocab, dim),
            _np_dtype(dtype),
            lambda start, stop: source.read(embedding_key, dtype, rows=(start, stop)),
            block_rows=max(1, EMBEDDING_BLOCK_BYTES // (dim * itemsize)),
        )
        for p in stacked:
            if int(np.prod(per_layer[p.ours])) * itemsize > EMBEDDING_BLOCK_BYTES:
                writer.add_by_rows(
                    tuple(p.ours.split(".")),
                    per_layer[p.ours],
                    _np_dtype(dtype),
                    lambda start, stop, p=p: layer(p, start)[None],
                )
            else:
                writer.add(tree([(p.ours, np.stack([layer(p, i) for i in range(num_layers)]))]))
        writer.finalize()
    num_params = sum(int(np.prod(s)) for s in expected.values())
    return dict(
        layout=layout,
        num_layers=config["num_layers"],
        dim=config["dim"],
        num_params=num_params,
        ignored_tensors=len(ignored),
        dtype=args.dtype,
    )


def _np_dtype(dtype: str) -> np.dtype:
    import ml_dtypes

    return np.dtype(ml_dtypes.bfloat16) if dtype == "bfloat16" else np.dtype(np.float32)
