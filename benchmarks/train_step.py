"""DiT forward and forward+backward (the flow-matching train step's gradient) at named workloads,
ours next to diffusers' WanTransformer3DModel in the same run.

    # CPU (2 cores, fp32, 1.3B width, 2 layers, 768 video + 512 text tokens; ~3 min):
    PYTHONPATH=. .venv/bin/python benchmarks/train_step.py --workload cpu768 --repeats 3
    PYTHONPATH=. .venv/bin/python benchmarks/train_step.py --workload cpu192 --repeats 3
    # one GPU/TPU chip, bf16, 1.3B (30 layers) at 480x832x17, diffusers alongside when installed:
    PYTHONPATH=. .venv/bin/python benchmarks/train_step.py --workload edit480x17 --dtype bfloat16 \
        --layers 30 --attention auto --json /tmp/train_step.json
    # 14B width, 4 layers, 33 frames; --remat full is the long-sequence setting
    PYTHONPATH=. .venv/bin/python benchmarks/train_step.py --workload edit480x33 --preset wan_14b \
        --layers 4 --dtype bfloat16

Workloads (SAMA in-context: source + target latents of one clip, batch 1, 512 text tokens of width
4096; diffusers gets the same token count as one video of 2x the latent frames, which is what the
anchors in reference/anchors.md measured; --semantic adds SAMA's 65 semantic tokens to ours only):
    cpu192      1 frame at 128x192   ->    192 video tokens
    cpu768      1 frame at 256x384   ->    768 video tokens
    edit480x17  17 frames at 480x832 -> 15,600 video tokens  (edit480x33: 28,080; x49: 40,560; x81: 65,520)
Model FLOPs per forward (anchors.md): layers * (S*(12 D^2 + 4 D F + 4 S D + 4 L D) + 4 D^2 L);
forward+backward counts 3x (remat's recomputation not counted). MFU is against a matmul ceiling
measured in this run (a large jnp.dot in the compute dtype). Each repeat times ours then
diffusers'; the table gives the best (least disturbed) time of each and the ratio
diffusers_seconds / our_seconds (> 1: we are faster), then the per-round ratios; on a shared
machine only same-round ratios mean much. Peak memory: the device's peak where it reports one (GPU/TPU), else XLA's compiled
memory analysis (arguments + outputs + temporaries) for ours; torch's CUDA peak for diffusers.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx

from sama_jax import dit_cost, flow_matching, presets
from sama_jax.models.wan_dit import WanDiT, WanDiTConfig

# name -> (frames, height, width) of one clip; source and target both have this shape.
WORKLOADS = {
    "cpu192": (1, 128, 192),
    "cpu768": (1, 256, 384),
    "edit480x17": (17, 480, 832),
    "edit480x33": (33, 480, 832),
    "edit480x49": (49, 480, 832),
    "edit480x81": (81, 480, 832),
}


def latent_shape(workload: str) -> tuple[int, int, int]:
    return dit_cost.latent_grid(*WORKLOADS[workload])


def matmul_ceiling(dtype, size: int) -> float:
    """Measured TFLOP/s of one (size x size) @ (size x size) matmul in `dtype`."""
    a = jax.random.normal(jax.random.key(0), (size, size), dtype)
    b = jax.random.normal(jax.random.key(1), (size, size), dtype)
    dot = jax.jit(lambda a, b: jnp.dot(a, b, preferred_element_type=jnp.float32))
    seconds = min(_time(lambda: dot(a, b), 3) for _ in range(2))
    return 2 * size**3 / seconds / 1e12


def _time(fn, iters: int) -> float:
    jax.block_until_ready(fn())
    start = time.perf_counter()
    for _ in range(iters):
        out = fn()
    jax.block_until_ready(out)
    return (time.perf_counter() - start) / iters


def _compiled_bytes(compiled) -> int | None:
    analysis = compiled.memory_analysis()
    if analysis is None:
        return None
    return int(
        analysis.argument_size_in_bytes
        + analysis.output_size_in_bytes
        + analysis.temp_size_in_bytes
        - analysis.alias_size_in_bytes
    )


class Ours:
    """Our WanDiT: jitted forward, and value_and_grad of SAMA's loss w.r.t. the parameters."""

    def __init__(self, cfg: WanDiTConfig, grid, num_semantic: int, dtype):
        self.model = WanDiT(cfg, rngs=nnx.Rngs(0))
        keys = jax.random.split(jax.random.key(0), 6)
        shape = (1, *grid, cfg.in_dim)
        self.x0 = jax.random.normal(keys[0], shape, dtype)
        self.noise = jax.random.normal(keys[1], shape, dtype)
        self.source = jax.random.normal(keys[2], shape, dtype)
        self.text = jax.random.normal(keys[3], (1, cfg.text_len, cfg.text_dim), dtype)
        self.semantic = (
            jax.random.normal(keys[4], (1, num_semantic, cfg.semantic_dim), dtype) if num_semantic else None
        )
        self.sigma = jnp.array([0.5], jnp.float32)
        graphdef, params = nnx.split(self.model, nnx.Param)
        self.params = params

        def loss(params, x0, noise, source, text, semantic):
            model = nnx.merge(graphdef, params)
            noisy = flow_matching.add_noise(x0, noise, self.sigma)
            sem_noise = None if semantic is None else jnp.zeros_like(semantic)
            noisy_sem = None if semantic is None else flow_matching.add_noise(semantic, sem_noise, self.sigma)
            velocity, sem_velocity = model(noisy, self.sigma * 1000.0, text, source, noisy_sem)
            out, _ = flow_matching.sama_loss(velocity, noise, x0, sem_velocity, sem_noise, semantic)
            return out

        def forward(params, x0, source, text, semantic):
            return nnx.merge(graphdef, params)(x0, self.sigma * 1000.0, text, source, semantic)[0]

        args = (self.x0, self.source, self.text, self.semantic)
        self.forward = jax.jit(forward).lower(params, *args).compile()
        train_args = (self.x0, self.noise, self.source, self.text, self.semantic)
        self.train = jax.jit(jax.value_and_grad(loss)).lower(params, *train_args).compile()
        self.memory = {"forward": _compiled_bytes(self.forward), "train": _compiled_bytes(self.train)}

    def run_forward(self):
        return self.forward(self.params, self.x0, self.source, self.text, self.semantic)

    def run_train(self):
        return self.train(self.params, self.x0, self.noise, self.source, self.text, self.semantic)


class Diffusers:
    """diffusers' WanTransformer3DModel with the same widths, on the same number of tokens."""

    def __init__(self, cfg: WanDiTConfig, grid, dtype: str, remat: str):
        import torch
        from diffusers import WanTransformer3DModel

        self.torch = torch
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
        torch.manual_seed(0)
        self.model = WanTransformer3DModel(
            patch_size=cfg.patch_size,
            num_attention_heads=cfg.num_heads,
            attention_head_dim=cfg.head_dim,
            in_channels=cfg.in_dim,
            out_channels=cfg.out_dim,
            text_dim=cfg.text_dim,
            freq_dim=cfg.freq_dim,
            ffn_dim=cfg.ffn_dim,
            num_layers=cfg.num_layers,
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=cfg.eps,
        ).to(self.device, torch_dtype)
        if remat != "none":
            self.model.enable_gradient_checkpointing()
        frames, height, width = grid
        # Source and target as one video of twice the frames: the same token count.
        shape = (1, cfg.in_dim, 2 * frames, height, width)
        self.x0 = torch.randn(shape, device=self.device, dtype=torch_dtype)
        self.noise = torch.randn(shape, device=self.device, dtype=torch_dtype)
        self.text = torch.randn((1, cfg.text_len, cfg.text_dim), device=self.device, dtype=torch_dtype)
        self.timestep = torch.tensor([500.0], device=self.device)

    def _sync(self):
        if self.device == "cuda":
            self.torch.cuda.synchronize()

    def run_forward(self):
        with self.torch.no_grad():
            self.model(self.x0, self.timestep, self.text, return_dict=False)
        self._sync()

    def run_train(self):
        self.model.zero_grad(set_to_none=True)
        noisy = 0.5 * self.x0 + 0.5 * self.noise
        velocity = self.model(noisy, self.timestep, self.text, return_dict=False)[0]
        loss = self.torch.mean(self.torch.square(velocity.float() - (self.noise - self.x0).float()))
        loss.backward()
        self._sync()

    def time(self, fn, iters: int) -> float:
        fn()
        start = time.perf_counter()
        for _ in range(iters):
            fn()
        return (time.perf_counter() - start) / iters

    def peak_bytes(self) -> int | None:
        if self.device != "cuda":
            return None
        return int(self.torch.cuda.max_memory_allocated())


def diffusers_available() -> bool:
    try:
        import diffusers  # noqa: F401
        import torch  # noqa: F401
    except ImportError:
        return False
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workload", default="cpu768", choices=sorted(WORKLOADS))
    parser.add_argument("--preset", default="wan_1_3b", choices=presets.PRESET_NAMES)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "bfloat16"),
        help="parameters and compute (the residual stream stays fp32, as official Wan)",
    )
    parser.add_argument("--attention", default="auto")
    parser.add_argument(
        "--remat",
        default="none",
        choices=("none", "full", "attention"),
        help="ours: this policy; diffusers: gradient checkpointing unless 'none'",
    )
    parser.add_argument(
        "--no-scan",
        action="store_true",
        help="run the blocks as a Python loop (scan_layers=False) instead of nnx.scan",
    )
    parser.add_argument("--semantic", type=int, default=0, help="SAMA semantic tokens (ours only)")
    parser.add_argument("--repeats", type=int, default=3, help="alternating ours/diffusers rounds")
    parser.add_argument("--iters", type=int, default=2, help="calls per timing")
    parser.add_argument("--no-diffusers", action="store_true")
    parser.add_argument(
        "--matmul-size",
        type=int,
        default=None,
        help="side of the ceiling matmul (default 2048 on CPU, 8192 otherwise)",
    )
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)

    section = dict(presets.DIT[args.preset], num_layers=args.layers)
    if args.no_scan:
        section["scan_layers"] = False
    cfg = WanDiTConfig(
        **section,
        param_dtype=args.dtype,
        compute_dtype=args.dtype,
        residual_dtype="float32",
        attention=args.attention,
        remat=args.remat,
    )
    grid = latent_shape(args.workload)
    tokens = 2 * dit_cost.video_tokens(*WORKLOADS[args.workload], cfg.patch_size)
    flops = dit_cost.forward_flops(cfg, tokens + args.semantic, cfg.text_len)
    backend = jax.default_backend()
    device = jax.devices()[0]
    print(
        f"{args.workload}: {device.device_kind} ({backend}), {args.preset} width, {cfg.num_layers} "
        f"layers, {tokens} video + {args.semantic} semantic + {cfg.text_len} text tokens, "
        f"{args.dtype}, attention {args.attention}, remat {args.remat}"
        f"{', no scan' if args.no_scan else ''}",
        flush=True,
    )

    ceiling = matmul_ceiling(args.dtype, args.matmul_size or (2048 if backend == "cpu" else 8192))
    print(f"matmul ceiling ({args.dtype}): {ceiling:.3f} TFLOP/s", flush=True)

    start = time.perf_counter()
    ours = Ours(cfg, grid, args.semantic, args.dtype)
    print(f"ours compiled in {time.perf_counter() - start:.0f} s", flush=True)
    theirs = None
    if not args.no_diffusers and diffusers_available():
        theirs = Diffusers(cfg, grid, args.dtype, args.remat)
    elif not args.no_diffusers:
        print("diffusers/torch not importable: timing ours only")

    times = {"ours_forward": [], "ours_train": [], "diffusers_forward": [], "diffusers_train": []}
    for r in range(args.repeats):
        start = time.perf_counter()
        times["ours_forward"].append(_time(ours.run_forward, args.iters))
        times["ours_train"].append(_time(ours.run_train, args.iters))
        if theirs is not None:
            times["diffusers_forward"].append(theirs.time(theirs.run_forward, args.iters))
            times["diffusers_train"].append(theirs.time(theirs.run_train, args.iters))
        round_s = time.perf_counter() - start
        print(
            f"  round {r + 1}/{args.repeats}: "
            + ", ".join(f"{k} {v[-1]:.3f} s" for k, v in times.items() if v)
            + f"  (ETA {round_s * (args.repeats - r - 1):.0f} s)",
            flush=True,
        )

    stats = device.memory_stats() or {}
    result = dict(
        workload=args.workload,
        device=device.device_kind,
        backend=backend,
        preset=args.preset,
        layers=cfg.num_layers,
        dtype=args.dtype,
        attention=args.attention,
        remat=args.remat,
        scan_layers=not args.no_scan,
        video_tokens=tokens,
        semantic_tokens=args.semantic,
        text_tokens=cfg.text_len,
        forward_flops=flops,
        matmul_ceiling_tflops=ceiling,
        ours_peak_bytes=stats.get("peak_bytes_in_use"),
        ours_compiled_bytes=ours.memory,
        diffusers_peak_bytes=theirs.peak_bytes() if theirs else None,
        seconds={},
    )
    print(
        f"{'':<10}{'ours s':>10}{'tokens/s':>11}{'TFLOP/s':>9}{'MFU':>7}"
        f"{'diffusers s':>13}{'TFLOP/s':>9}{'ratio':>7}"
    )
    for step, multiple in (("forward", 1), ("train", 3)):
        ours_s = min(times[f"ours_{step}"])
        line = (
            f"{step:<10}{ours_s:>10.4f}{tokens / ours_s:>11.0f}"
            f"{multiple * flops / ours_s / 1e12:>9.3f}{100 * multiple * flops / ours_s / 1e12 / ceiling:>6.1f}%"
        )
        result["seconds"][f"ours_{step}"] = times[f"ours_{step}"]
        if theirs is not None:
            their_s = min(times[f"diffusers_{step}"])
            line += f"{their_s:>13.4f}{multiple * flops / their_s / 1e12:>9.3f}{their_s / ours_s:>6.2f}x"
            result["seconds"][f"diffusers_{step}"] = times[f"diffusers_{step}"]
            result[f"ratio_{step}"] = their_s / ours_s
            rounds = [t / o for t, o in zip(times[f"diffusers_{step}"], times[f"ours_{step}"])]
            result[f"ratio_{step}_per_round"] = rounds
            line += "   per round " + " ".join(f"{r:.2f}x" for r in rounds)
        print(line)
    if result["ours_peak_bytes"]:
        print(f"ours peak device memory: {result['ours_peak_bytes'] / 2**30:.2f} GiB")
    print(
        "ours compiled memory (args+outputs+temps): "
        + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in ours.memory.items() if v is not None)
    )
    if result["diffusers_peak_bytes"]:
        print(f"diffusers peak CUDA memory: {result['diffusers_peak_bytes'] / 2**30:.2f} GiB")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
