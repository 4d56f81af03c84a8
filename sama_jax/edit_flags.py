"""The editing flags sama-edit and sama-export share (one definition, so they cannot drift apart);
edit.settings_from_args maps them to inference.EditSettings.

    add_editing_flags(io_group, sampler_group, semantic_tokens=65)
"""

from __future__ import annotations

DEFAULT_FPS = 20.0  # the released inference's --fps: used when a source has none


def add_editing_flags(io, sampler, *, semantic_tokens: int | None = 65, semantic_help: str = "") -> None:
    """io: size, frames, VAE tiling, prompt prefix and output flags; sampler: the sampler's.
    semantic_tokens=None means "the model's own count" (the caller resolves it)."""
    io.add_argument("--height", type=int, default=480, help="pixel budget (with --width) for the buckets")
    io.add_argument("--width", type=int, default=832)
    io.add_argument(
        "--exact-size",
        action="store_true",
        help="edit at exactly --height x --width (centre crop) instead of the bucket rule",
    )
    io.add_argument("--max-frames", type=int, default=81)
    io.add_argument("--fps", type=float, default=DEFAULT_FPS, help="output fps when a source has none")
    io.add_argument("--seed", type=int, default=1, help="seeds the video and the semantic noise")
    io.add_argument(
        "--tiled", action="store_true", help="tiled VAE encode/decode (30x52 latents, stride 15x26)"
    )
    io.add_argument(
        "--prompt-prefix",
        action="store_true",
        help="prompt '[Video edit] ' + prompt, negative '[Video edit]' (else '')",
    )
    io.add_argument(
        "--keep-padding",
        action="store_true",
        help="keep the frames repeated up to 4k+1 (the released output); default: trimmed",
    )
    io.add_argument("--crf", type=int, default=17, help="H.264 quality of the mp4s (17: visually lossless)")
    sampler.add_argument("--steps", type=int, default=50)
    sampler.add_argument("--guidance", type=float, default=5.0, help="CFG scale on the text (1: no CFG)")
    sampler.add_argument("--shift", type=float, default=5.0)
    sampler.add_argument(
        "--sampler",
        default="euler",
        choices=("euler", "unipc"),
        help="euler: the released SAMA sampler; unipc: Wan2.1's",
    )
    sampler.add_argument(
        "--cfg-mode",
        default="batch",
        choices=("batch", "sequential"),
        help="CFG passes as one doubled batch (faster) or two calls (less memory)",
    )
    sampler.add_argument(
        "--latent-dtype",
        default=None,
        choices=("bfloat16", "float32"),
        help="sampler state dtype (default: bfloat16 for euler as released, float32 for unipc)",
    )
    sampler.add_argument(
        "--semantic-tokens",
        type=int,
        default=semantic_tokens,
        help=semantic_help or "semantic tokens denoised with the video",
    )


def mesh_from_flag(text: str):
    """--mesh 'axis=size,...' (or 'none') -> (mesh over this process's devices, rules), or (None, None).
    Inference batches are 1 (2 with CFG): they shard over 'data' only, never over fsdp."""
    from sama_jax import edit_rules

    if text.strip().lower() == "none":
        return None, None
    sizes = {}
    for part in text.split(","):
        axis, sep, size = part.partition("=")
        if not sep or not size.strip().lstrip("-").isdigit():
            raise edit_rules.EditInputError(
                f"--mesh {text!r}: expected 'axis=size,...' (e.g. 'fsdp=-1' or 'data=2,fsdp=-1'), or 'none'"
            )
        sizes[axis.strip()] = int(size)
    import jax

    from sama_jax import sharding

    # Each process edits its own cases (sama-export): its mesh is its own devices.
    mesh = sharding.create_mesh({"ici": sizes}, devices=jax.local_devices())
    return mesh, (("batch", "data"),) + sharding.DEFAULT_RULES


def editor_from_flags(args):
    """The Editor the model flags name: --run DIR (its EMA or --params raw DiT, encoders and
    tokenizer), --preset NAME (untrained models, for timing and smoke runs), or the converted
    checkpoints --dit --vae --text-encoder --tokenizer; --lora-path merged, --dtype, --mesh."""
    from sama_jax import inference

    mesh, rules = mesh_from_flag(args.mesh)
    lora_path = args.lora_path or None
    precision = dict(param_dtype=args.dtype, compute_dtype=args.dtype, residual_dtype="float32")
    if args.run:
        use_ema = getattr(args, "params", "ema") == "ema"
        return inference.Editor.from_run(
            args.run, use_ema=use_ema, mesh=mesh, rules=rules, lora_path=lora_path
        )
    if getattr(args, "preset", ""):
        return inference.Editor.untrained(args.preset, args.tokenizer, precision, mesh=mesh, rules=rules)
    return inference.Editor.from_checkpoints(
        args.dit,
        args.vae,
        args.text_encoder,
        args.tokenizer,
        mesh=mesh,
        rules=rules,
        precision=precision,
        lora_path=lora_path,
    )
