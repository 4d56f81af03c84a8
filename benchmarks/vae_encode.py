"""Wan2.1 VAE encode: time per frame and memory at 480x832, full-size config (base_dim 96).

    .venv/bin/python benchmarks/vae_encode.py --frames 1 5 9 --plan 9 33 81 [--dtype float32]
        [--height 480 --width 832] [--diffusers]

Random weights (the released VAE's shapes; numbers do not depend on the values). For each
--frames T (ascending) it jits the chunked encode (first frame, then 4-frame chunks in a
lax.scan), compiles it ahead of time, runs it once timed, and prints the wall time, seconds per
frame, the process's peak RSS so far and XLA's temporary-buffer size for that program; on an
accelerator also the device's peak bytes in use. For each --plan T it only compiles and prints
XLA's buffer sizes: how memory scales with T, without running it (81 frames at 480x832 in fp32
take tens of minutes on 2 CPU cores). Steady-state time per frame = (t(T2) - t(T1)) / (T2 - T1)
from the two largest measured T's; 81 frames = t(1) + 80 such frames.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from sama_jax.models import wan_vae  # noqa: E402


def random_vae(cfg: wan_vae.WanVAEConfig) -> wan_vae.WanVAE:
    """Full-size VAE with N(0, 1/fan_in) kernels, unit norms, zero biases, made on the host
    (eager jax init compiles one program per parameter shape: slow on CPU)."""
    graphdef, state = nnx.split(nnx.eval_shape(lambda: wan_vae.WanVAE(cfg, rngs=nnx.Rngs(0))))
    rng = np.random.default_rng(0)

    def fill(path, leaf):
        name = str(path[-1].key)
        if name == "gamma":
            return jnp.ones(leaf.shape, leaf.dtype)
        if name == "bias":
            return jnp.zeros(leaf.shape, leaf.dtype)
        fan_in = int(np.prod(leaf.shape[:-1]))
        values = rng.standard_normal(leaf.shape, dtype=np.float32) / np.sqrt(fan_in)
        return jnp.asarray(values, leaf.dtype)

    params = jax.tree_util.tree_map_with_path(fill, nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, params)
    return nnx.merge(graphdef, state)


def peak_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # Linux: KiB


def device_peak_gib() -> float | None:
    stats = jax.devices()[0].memory_stats() or {}
    return stats["peak_bytes_in_use"] / 2**30 if "peak_bytes_in_use" in stats else None


def time_diffusers(args) -> None:
    """The same encodes with diffusers (PyTorch eager, its chunk loop, no tiling)."""
    import torch
    from diffusers import AutoencoderKLWan

    dtype = getattr(torch, args.dtype)
    model = AutoencoderKLWan().eval().to(dtype)
    for frames in sorted(args.frames):
        video = torch.rand(1, 3, frames, args.height, args.width, dtype=dtype) * 2 - 1
        with torch.no_grad():
            start = time.perf_counter()
            model.encode(video)
            elapsed = time.perf_counter() - start
        print(
            f"diffusers T={frames:3d}: {elapsed:7.2f} s ({elapsed / frames:.2f} s/frame), "
            f"torch threads {torch.get_num_threads()}, peak RSS {peak_rss_gib():.2f} GiB"
        )


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--frames", type=int, nargs="*", default=[1, 5, 9])
    parser.add_argument("--plan", type=int, nargs="*", default=[9, 33, 81])
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16"))
    parser.add_argument(
        "--diffusers",
        action="store_true",
        help="also time diffusers' AutoencoderKLWan (PyTorch, same shapes, dtype)",
    )
    args = parser.parse_args()

    cfg = wan_vae.WanVAEConfig(compute_dtype=args.dtype, param_dtype=args.dtype)
    print(
        f"device {jax.devices()[0].device_kind} x{jax.device_count()}, {args.dtype}, "
        f"{args.height}x{args.width}, base_dim {cfg.base_dim}"
    )
    start = time.perf_counter()
    vae = random_vae(cfg)
    print(
        f"random full-size VAE built in {time.perf_counter() - start:.1f}s, peak RSS {peak_rss_gib():.2f} GiB"
    )
    graphdef, state = nnx.split(vae)
    encode = jax.jit(lambda s, v: nnx.merge(graphdef, s).encode(v))

    def shape(frames):
        return (1, frames, args.height, args.width, 3)

    for frames in args.plan:
        video = jax.ShapeDtypeStruct(shape(frames), jnp.dtype(args.dtype))
        memory = encode.lower(state, video).compile().memory_analysis()
        print(
            f"plan T={frames:3d}: XLA temp {memory.temp_size_in_bytes / 2**30:.2f} GiB, "
            f"argument {memory.argument_size_in_bytes / 2**30:.2f} GiB, "
            f"output {memory.output_size_in_bytes / 2**20:.1f} MiB"
        )

    times = {}
    for frames in sorted(args.frames):
        video = jnp.asarray(np.random.default_rng(frames).uniform(-1, 1, shape(frames)), args.dtype)
        compiled = encode.lower(state, video).compile()  # compiled ahead: the run is not
        start = time.perf_counter()
        latents = jax.block_until_ready(compiled(state, video))
        times[frames] = time.perf_counter() - start
        device_peak = device_peak_gib()
        print(
            f"run  T={frames:3d}: {times[frames]:7.2f} s ({times[frames] / frames:.2f} s/frame; "
            f"one run after compiling), latents {tuple(latents.shape)}, "
            f"XLA temp {compiled.memory_analysis().temp_size_in_bytes / 2**30:.2f} GiB, "
            f"peak RSS {peak_rss_gib():.2f} GiB"
            + (f", device peak {device_peak:.2f} GiB" if device_peak is not None else "")
        )
    if args.diffusers:
        time_diffusers(args)
    measured = sorted(times)
    if len(measured) >= 2 and measured[-1] > measured[-2]:
        t1, t2 = measured[-2], measured[-1]
        per_frame = (times[t2] - times[t1]) / (t2 - t1)
        first_frame = times[1] if 1 in times else None
        estimate = (first_frame if first_frame is not None else per_frame) + 80 * per_frame
        print(
            f"steady state: {per_frame:.2f} s/frame ({4 * per_frame:.2f} s per 4-frame chunk); "
            f"81 frames extrapolated: {estimate:.0f} s"
        )


if __name__ == "__main__":
    main()
