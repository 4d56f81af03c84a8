"""Seconds per edit: the whole Editor (umT5, VAE encode, 50-step CFG sampler, VAE decode) on random
weights, and optionally the same denoising loop in PyTorch/diffusers.

    .venv/bin/python benchmarks/edit_speed.py --preset tiny --frames 9 --height 64 --width 64   # CPU
    .venv/bin/python benchmarks/edit_speed.py --preset wan_1_3b --torch     # 480x832x17 on a GPU

The first edit compiles; the report is the mean of --edits edits after it, per stage. --torch runs
diffusers' WanTransformer3DModel with FlowMatchEulerDiscreteScheduler(shift 5) for the same number
of steps, CFG as one batch of 2, on the same token count (source + target latents concatenated
along frames: diffusers' Wan has no in-context source tokens; no semantic tokens) - the DiT loop
only, to compare with our "denoise" stage. Random weights: speed does not depend on values.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
import time

import jax
import numpy as np

from sama_jax import dit_cost, inference, presets, text


def build_editor(preset: str, dtype: str, tokenizer_dir: str) -> inference.Editor:
    """sama-export --preset's untrained Editor, with a small tokenizer made for the benchmark."""
    texts = ["[Video edit] Make the car red.", "Replace the seal with a red crab.", "Remove the tree."]
    text.build_sentencepiece_tokenizer(texts * 30, tokenizer_dir, vocab_size=80)
    precision = dict(param_dtype=dtype, compute_dtype=dtype, residual_dtype="float32")
    return inference.Editor.untrained(preset, tokenizer_dir, precision)


def torch_loop(preset: str, latent_shape, steps: int, text_len: int) -> float:
    """Seconds per `steps`-step CFG Euler loop of diffusers' Wan transformer (bf16, CUDA if present)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

    cfg = presets.DIT[preset]
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model = (
        WanTransformer3DModel(
            patch_size=cfg["patch_size"],
            num_attention_heads=cfg["num_heads"],
            attention_head_dim=cfg["dim"] // cfg["num_heads"],
            in_channels=cfg["in_dim"],
            out_channels=cfg["out_dim"],
            text_dim=cfg["text_dim"],
            freq_dim=cfg["freq_dim"],
            ffn_dim=cfg["ffn_dim"],
            num_layers=cfg["num_layers"],
            cross_attn_norm=True,
            qk_norm="rms_norm_across_heads",
            eps=cfg["eps"],
        )
        .to(device, torch.bfloat16)
        .eval()
    )
    _, f, h, w, c = latent_shape
    # Source + target in context: the same token count as 2 f frames.
    x = torch.randn(1, c, 2 * f, h, w, device=device, dtype=torch.bfloat16)
    context = torch.randn(2, text_len, cfg["text_dim"], device=device, dtype=torch.bfloat16)
    scheduler = FlowMatchEulerDiscreteScheduler(shift=5.0)

    def run():
        scheduler.set_timesteps(sigmas=np.linspace(1, 0, steps + 1)[:-1])
        latents = x.clone()
        with torch.no_grad():
            for t in scheduler.timesteps:
                out = model(
                    torch.cat([latents, latents]), t.expand(2).to(device), context, return_dict=False
                )[0]
                cond, uncond = out.chunk(2)
                latents = scheduler.step(uncond + 5.0 * (cond - uncond), t, latents).prev_sample
        if device == "cuda":
            torch.cuda.synchronize()

    run()
    start = time.perf_counter()
    run()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--preset", default="wan_1_3b", choices=presets.PRESET_NAMES)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--sampler", default="euler", choices=("euler", "unipc"))
    parser.add_argument("--cfg-mode", default="batch", choices=("batch", "sequential"))
    parser.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float32"))
    parser.add_argument("--tiled", action="store_true")
    parser.add_argument("--edits", type=int, default=2, help="timed edits after the compiling one")
    parser.add_argument("--torch", action="store_true", help="also time the diffusers loop")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        editor = build_editor(args.preset, args.dtype, os.path.join(tmp, "tokenizer"))
    settings = inference.EditSettings(
        steps=args.steps,
        sampler=args.sampler,
        cfg_mode=args.cfg_mode,
        height=args.height,
        width=args.width,
        exact_size=True,
        tiled=args.tiled,
    )
    rng = np.random.default_rng(0)
    frames = rng.integers(0, 255, (args.frames, args.height, args.width, 3), dtype=np.uint8)
    start = time.perf_counter()
    first = editor.edit(frames, "Make the car red.", settings)
    first_seconds = time.perf_counter() - start
    runs = []
    for i in range(args.edits):
        start = time.perf_counter()
        result = editor.edit(frames, "Make the car red.", dataclasses.replace(settings, seed=i + 2))
        runs.append((time.perf_counter() - start, result.timings))
    mean = sum(s for s, _ in runs) / len(runs)
    stages = {k: round(sum(t[k] for _, t in runs) / len(runs), 3) for k in runs[0][1]}
    print(
        f"device {jax.devices()[0].device_kind} x {jax.device_count()}, preset {args.preset}, "
        f"{args.frames} frames {args.width}x{args.height}, {args.steps} {args.sampler} steps, "
        f"CFG {args.cfg_mode}, {args.dtype}, tiled {args.tiled}"
    )
    print(
        f"first edit (compiles): {first_seconds:.2f} s; then {mean:.2f} s per edit over {len(runs)}: {stages}"
    )
    if args.torch:
        latent_shape = (1, *dit_cost.latent_grid(first.model_frames, args.height, args.width), 16)
        seconds = torch_loop(args.preset, latent_shape, args.steps, presets.DIT[args.preset]["text_len"])
        print(
            f"diffusers WanTransformer3DModel, same loop (CFG batch 2, no semantic tokens): {seconds:.2f} s "
            f"vs ours (denoise stage) {stages['denoise']:.2f} s"
        )


if __name__ == "__main__":
    main()
