"""umT5-XXL encode time per prompt (512 tokens) and memory, measured on a few full-width layers.

    python benchmarks/umt5_encode.py --layers 2 --dtype bfloat16
    python benchmarks/umt5_encode.py --layers 2 --dtype float32 --batch 1 --repeats 3
    python benchmarks/umt5_encode.py --layers 2 --dtype float32 --reference   # transformers, same sizes

The full encoder (5.68B parameters, 24 layers of width 4096 / FFN 10240 / 64 heads) needs 11.4 GB in
bf16, more than a shared test machine has: this builds `--layers` layers at full width with random
weights, times the jitted encoder on one batch of `--batch` prompts of 512 tokens, and extrapolates
linearly to 24 layers (the embedding lookup and the final norm are negligible next to one layer).
The vocabulary is cut to --vocab rows (a lookup costs the same at any vocabulary size); the full
model's parameter memory is computed from the real sizes and printed alongside.
"""

from __future__ import annotations

import argparse
import dataclasses
import resource
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sama_jax import presets, text
from sama_jax.models.umt5 import UMT5Config, UMT5Encoder


def num_params(cfg: UMT5Config) -> int:
    per_layer = 4 * cfg.dim**2 + 3 * cfg.dim * cfg.ffn_dim + 2 * cfg.dim + cfg.num_buckets * cfg.num_heads
    return cfg.vocab_size * cfg.dim + cfg.num_layers * per_layer + cfg.dim


def flops_per_prompt_layer(cfg: UMT5Config, length: int) -> float:
    dense = 2 * length * (4 * cfg.dim**2 + 3 * cfg.dim * cfg.ffn_dim)
    attention = 2 * 2 * length * length * cfg.dim
    return dense + attention


def random_model(cfg: UMT5Config, seed: int = 0) -> UMT5Encoder:
    """Full-width model with random weights filled from numpy (no eager initialisers)."""
    rng = np.random.default_rng(seed)
    graphdef, state = nnx.split(nnx.eval_shape(lambda: UMT5Encoder(cfg, rngs=nnx.Rngs(0))))

    def fill(leaf):
        fan_in = leaf.shape[-2] if len(leaf.shape) >= 2 else 1
        return jnp.asarray(rng.standard_normal(leaf.shape, np.float32) / np.sqrt(fan_in), leaf.dtype)

    nnx.replace_by_pure_dict(state, jax.tree.map(fill, nnx.to_pure_dict(state)))
    return nnx.merge(graphdef, state)


def reference_encoder(cfg: UMT5Config, dtype: str):
    """transformers' UMT5EncoderModel with the same sizes (random init) as a callable."""
    import torch
    from transformers import UMT5Config as HFConfig
    from transformers import UMT5EncoderModel

    torch_dtype = dict(bfloat16=torch.bfloat16, float32=torch.float32)[dtype]
    model = (
        UMT5EncoderModel(
            HFConfig(
                vocab_size=cfg.vocab_size,
                d_model=cfg.dim,
                d_kv=cfg.head_dim,
                d_ff=cfg.ffn_dim,
                num_layers=cfg.num_layers,
                num_heads=cfg.num_heads,
                relative_attention_num_buckets=cfg.num_buckets,
                relative_attention_max_distance=cfg.max_distance,
                feed_forward_proj="gated-gelu",
                dropout_rate=0.0,
            )
        )
        .to(torch_dtype)
        .eval()
    )

    def encode(ids, mask):
        with torch.no_grad():
            model(input_ids=torch.from_numpy(ids).long(), attention_mask=torch.from_numpy(mask).long())

    return (
        encode,
        f"cpu, transformers UMT5EncoderModel (torch {torch.__version__}, {torch.get_num_threads()} threads)",
    )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--length", type=int, default=512)
    parser.add_argument("--vocab", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--reference",
        action="store_true",
        help="time transformers' UMT5EncoderModel (PyTorch) instead, same sizes",
    )
    args = parser.parse_args()

    full = UMT5Config(**presets.TEXT_ENCODER["wan_14b"], compute_dtype=args.dtype, param_dtype=args.dtype)
    cfg = dataclasses.replace(full, num_layers=args.layers, vocab_size=args.vocab)
    ids = np.random.default_rng(1).integers(1, args.vocab, (args.batch, args.length)).astype(np.int32)
    # The encoder runs all 512 positions whatever the prompt length: a full mask costs the same.
    mask = np.ones_like(ids)
    if args.reference:
        encode, device = reference_encoder(cfg, args.dtype)
    else:
        model = random_model(cfg)
        jitted = nnx.jit(text.encode)
        encode = lambda i, m: jitted(model, i, m).block_until_ready()
        device = f"{jax.devices()[0].device_kind} x{jax.device_count()} ({jax.default_backend()}), sama_jax"

    start = time.perf_counter()
    encode(ids, mask)
    compile_s = time.perf_counter() - start
    times = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        encode(ids, mask)
        times.append(time.perf_counter() - start)
    best = min(times)
    per_layer = best / args.layers
    flops = flops_per_prompt_layer(cfg, args.length) * args.batch * args.layers
    bytes_per = jnp.dtype(args.dtype).itemsize
    print(f"device: {device}")
    print(
        f"config: {args.layers} of {full.num_layers} layers at full width (dim {cfg.dim}, ffn {cfg.ffn_dim}, "
        f"heads {cfg.num_heads}), {args.dtype}, batch {args.batch} x {args.length} tokens"
    )
    print(f"first run (compile for jax): {compile_s:.2f} s; runs: {', '.join(f'{t:.3f}' for t in times)} s")
    print(f"measured: {best:.3f} s per batch, {per_layer:.3f} s per layer, {flops / best / 1e9:.1f} GFLOP/s")
    print(
        f"extrapolated to {full.num_layers} layers: {per_layer * full.num_layers:.2f} s per batch, "
        f"{per_layer * full.num_layers / args.batch:.2f} s per prompt"
    )
    print(
        f"full umT5-XXL parameters: {num_params(full) / 1e9:.3f} B = "
        f"{num_params(full) * bytes_per / 2**30:.2f} GiB in {args.dtype}"
    )
    print(
        f"this process: peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20:.2f} GiB "
        f"({num_params(cfg) / 1e9:.3f} B parameters built)"
    )


if __name__ == "__main__":
    main()
