"""Forward (and optionally train-step) time of the SAMA DiT at the anchor workload.

    .venv/bin/python benchmarks/dit_forward.py --preset wan_1_3b                 # edit480x17, bf16
    .venv/bin/python benchmarks/dit_forward.py --preset wan_14b --layers 4
    .venv/bin/python benchmarks/dit_forward.py --preset wan_1_3b --layers 1 --frames 1 --height 64 --width 64   # CPU smoke

Workload "edit480x17" (reference/anchors.md): 17 frames at 480x832 -> latents 5x60x104; source +
target = 2 x 5 x 30 x 52 = 15,600 video tokens; 512 text tokens of width 4096; batch 1;
`--semantic 65` adds SAMA's semantic tokens (the diffusers anchor has none). Random weights (speed
does not depend on values). FLOPs per forward as in anchors.md:
    layers * (S*(12 D^2 + 4 D F + 4 S D + 4 L D) + 4 D^2 L),  S video tokens, L = 512;
a train step counts 3x. Prints seconds per call, TFLOP/s, MFU against --peak-tflops (800 = the
measured H100 bf16 matmul ceiling) and the device's peak memory when it reports one.
"""

from __future__ import annotations

import argparse
import time

import jax
import jax.numpy as jnp
from flax import nnx

from sama_jax import dit_cost, presets
from sama_jax.models.wan_dit import WanDiT, WanDiTConfig


def _time(fn, iters):
    jax.block_until_ready(fn())  # compile
    jax.block_until_ready(fn())  # warm
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="wan_1_3b", choices=presets.PRESET_NAMES)
    parser.add_argument("--layers", type=int, default=None, help="override the layer count")
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--semantic", type=int, default=0, help="semantic tokens (SAMA: 65)")
    parser.add_argument("--no-source", action="store_true", help="target tokens only (plain T2V)")
    parser.add_argument("--compute-dtype", default="bfloat16")
    parser.add_argument("--param-dtype", default="bfloat16")
    parser.add_argument("--residual-dtype", default="float32")
    parser.add_argument("--attention", default="auto")
    parser.add_argument("--remat", default="none")
    parser.add_argument("--train", action="store_true", help="also time forward+backward")
    parser.add_argument("--iters", type=int, default=5)
    parser.add_argument("--peak-tflops", type=float, default=800.0)
    args = parser.parse_args()

    section = dict(presets.DIT[args.preset])
    if args.layers:
        section["num_layers"] = args.layers
    cfg = WanDiTConfig(
        **section,
        compute_dtype=args.compute_dtype,
        param_dtype=args.param_dtype,
        residual_dtype=args.residual_dtype,
        attention=args.attention,
        remat=args.remat,
    )
    model = WanDiT(cfg, rngs=nnx.Rngs(0))

    latent_shape = (1, *dit_cost.latent_grid(args.frames, args.height, args.width), cfg.in_dim)
    key = jax.random.key(0)
    target = jax.random.normal(key, latent_shape, jnp.bfloat16)
    source = None if args.no_source else jax.random.normal(jax.random.key(1), latent_shape, jnp.bfloat16)
    semantic = (
        jax.random.normal(jax.random.key(2), (1, args.semantic, cfg.semantic_dim), jnp.bfloat16)
        if args.semantic
        else None
    )
    text = jax.random.normal(jax.random.key(3), (1, cfg.text_len, cfg.text_dim), jnp.bfloat16)
    timesteps = jnp.array([500.0], jnp.float32)
    tokens_per_video = dit_cost.video_tokens(args.frames, args.height, args.width, cfg.patch_size)
    video_tokens = tokens_per_video * (1 if source is None else 2)

    forward = nnx.jit(lambda m, *a: m(*a))
    seconds = _time(lambda: forward(model, target, timesteps, text, source, semantic), args.iters)
    flops = dit_cost.forward_flops(cfg, video_tokens + args.semantic, cfg.text_len)
    device = jax.devices()[0]
    print(
        f"device {device.device_kind} ({jax.default_backend()}), preset {args.preset}, "
        f"{cfg.num_layers} layers, dim {cfg.dim}, {video_tokens} video + {args.semantic} semantic "
        f"tokens, {cfg.text_len} text tokens, compute {cfg.compute_dtype}, residual "
        f"{cfg.residual_dtype}, attention {args.attention}, remat {args.remat}"
    )
    print(
        f"forward: {seconds:.4f} s, {flops / seconds / 1e12:.1f} TFLOP/s, "
        f"MFU {100 * flops / seconds / 1e12 / args.peak_tflops:.1f}% of {args.peak_tflops:.0f}"
    )

    if args.train:

        def loss(m, *a):
            velocity, semantic_velocity = m(*a)
            out = jnp.mean(jnp.square(velocity.astype(jnp.float32)))
            if semantic_velocity is not None:
                out = out + 0.1 * jnp.mean(jnp.abs(semantic_velocity.astype(jnp.float32)))
            return out

        step = nnx.jit(nnx.grad(loss))
        seconds = _time(lambda: step(model, target, timesteps, text, source, semantic), args.iters)
        print(
            f"train step (fwd+bwd): {seconds:.4f} s, {3 * flops / seconds / 1e12:.1f} TFLOP/s, "
            f"MFU {100 * 3 * flops / seconds / 1e12 / args.peak_tflops:.1f}%"
        )
    stats = device.memory_stats() or {}
    if "peak_bytes_in_use" in stats:
        print(f"peak device memory: {stats['peak_bytes_in_use'] / 2**30:.2f} GiB")


if __name__ == "__main__":
    main()
