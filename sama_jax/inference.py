"""The editor: source frames + instruction -> edited frames, with the models loaded once.

    editor = Editor.from_checkpoints(dit="ckpt/sama_14b", vae="ckpt/wan_vae",
                                     text_encoder="ckpt/umt5", tokenizer="ckpt/google/umt5-xxl")
    settings = EditSettings(prompt_prefix="[Video edit] ", tiled=True)
    result = editor.edit(frames, "Make the sky pink.", settings)
    result.frames        # (T, h, w, 3) uint8, T = the source's frame count (min(N, max_frames))

One edit, as the released SAMA inference runs it (reference/sama-official.md 4): the frame and
resolution rules of edit_rules; the prompt and the negative prompt each encoded alone by umT5;
the source clip encoded by the VAE (tiled when asked: 30x52-latent tiles, stride 15x26); video
noise and 65 semantic tokens ~ N(0, I) from the seed; the sampler of sampling.py with CFG on the
text only; the VAE decode; ((x + 1) * 127.5) clipped and truncated to uint8. By default the frames
added to reach 4k+1 are trimmed from the result (keep_padding keeps them, as the released code).

`Editor(dit, vae, text_encoder, tokenizer)` takes modules already built (a train loop's EMA model,
tests); `from_checkpoints` loads converted params checkpoints. With a mesh, every call runs under
it; the doubled CFG batch then shards over the 'batch' rule's mesh axes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import os
import time
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sama_jax import edit_rules, resolution, sampling, semantic, sharding, text
from sama_jax import lora as lora_lib
from sama_jax.data import transforms
from sama_jax.models import umt5, wan_dit, wan_vae

# Latent dtype per sampler when not set: the released SAMA runs its Euler loop in bf16, Wan's UniPC
# runs in float32.
DEFAULT_LATENT_DTYPE = {"euler": "bfloat16", "unipc": "float32"}


@dataclasses.dataclass(frozen=True)
class EditSettings:
    """Everything that decides an edit besides the models, the frames and the prompt."""

    steps: int = 50
    guidance: float = 5.0
    shift: float = 5.0
    sampler: str = "euler"
    cfg_mode: str = "batch"  # batch (one doubled call) | sequential (two calls, less memory)
    seed: int = 1
    max_frames: int = 81
    height: int = 480  # with width: the bucket rule's pixel budget, or the exact size
    width: int = 832
    exact_size: bool = False
    tiled: bool = False
    prompt_prefix: str = ""  # "[Video edit] " with the released --prompt-prefix flag
    keep_padding: bool = False
    latent_dtype: str | None = None  # None: DEFAULT_LATENT_DTYPE[sampler]
    semantic_tokens: int = 65

    def __post_init__(self):
        if self.sampler not in sampling.SAMPLERS:
            raise edit_rules.EditInputError(f"--sampler {self.sampler!r} is not one of {sampling.SAMPLERS}")
        if self.cfg_mode not in sampling.CFG_MODES:
            raise edit_rules.EditInputError(
                f"--cfg-mode {self.cfg_mode!r} is not one of {sampling.CFG_MODES}"
            )
        if self.steps < 1:
            raise edit_rules.EditInputError(f"--steps must be >= 1, got {self.steps}")
        if not np.isfinite(self.guidance) or self.shift <= 0:
            raise edit_rules.EditInputError(
                f"--guidance must be finite and --shift positive, got {self.guidance}, {self.shift}"
            )
        if self.max_frames < 1 or self.semantic_tokens < 0:
            raise edit_rules.EditInputError(
                f"--max-frames must be >= 1 and --semantic-tokens >= 0, got "
                f"{self.max_frames}, {self.semantic_tokens}"
            )
        if self.latent_dtype not in (None, "bfloat16", "float32"):
            raise edit_rules.EditInputError(f"--latent-dtype {self.latent_dtype!r}: bfloat16 or float32")

    @property
    def dtype(self) -> str:
        return self.latent_dtype or DEFAULT_LATENT_DTYPE[self.sampler]

    def output_size(self, height: int, width: int) -> tuple[int, int]:
        """(height, width) of the edit of a height x width source; raises if the model cannot take it."""
        if self.exact_size:
            resolution.check_size(self.height, self.width)
            return self.height, self.width
        return resolution.inference_bucket(height, width, self.height, self.width)


def settings_from_config(config, **overrides) -> EditSettings:
    """EditSettings for a training run's sample edits: config.eval.{num_steps, guidance, shift,
    sampler}, config.prompt_prefix, and as many semantic tokens as config.model.semantic makes.
    Held-out clips come from the pipeline already at a bucket size: pass height/width of the clip
    with exact_size=True to edit at that size (the default is the released 480x832 budget)."""
    values = dict(
        steps=int(config.eval.num_steps),
        guidance=float(config.eval.guidance),
        shift=float(config.eval.shift),
        sampler=str(config.eval.sampler),
        prompt_prefix=str(config.prompt_prefix),
        semantic_tokens=semantic.SemanticConfig(**config.model.semantic).num_tokens,
    )
    values.update(overrides)
    return EditSettings(**values)


@dataclasses.dataclass
class EditResult:
    frames: np.ndarray  # (T, h, w, 3) uint8: the edit
    source: np.ndarray  # (T, h, w, 3) uint8: the model's input clip, frame for frame
    prompt: str  # as the text encoder saw it (cut to its text_len tokens)
    negative_prompt: str
    source_frames: int  # frames taken from the source (min(N, max_frames))
    model_frames: int  # after padding to 4k+1
    timings: dict  # seconds per stage


@functools.cache
def denoiser_for(graphdef, sampler: str, cfg_mode: str, guided: bool) -> sampling.Denoiser:
    """One Denoiser (one compiled loop per input shape) per model structure and sampler setting,
    shared by every Editor of that structure (editors built for each command in one process, tests)."""
    return sampling.Denoiser(sampling.dit_velocity_fn(graphdef), sampler, cfg_mode, guided)


def fingerprint(path: str) -> dict:
    """A cheap identity of a checkpoint file or directory: path, total bytes and a sha256 over each
    file's relative name, size and first and last MiB (hashing 28 GB of weights per edit is not)."""
    path = os.path.abspath(path)
    files = (
        [path]
        if os.path.isfile(path)
        else sorted(os.path.join(root, f) for root, _, names in os.walk(path) for f in names)
    )
    digest, total = hashlib.sha256(), 0
    for file in files:
        size = os.path.getsize(file)
        total += size
        digest.update(f"{os.path.relpath(file, path)}:{size};".encode())
        with open(file, "rb") as f:
            digest.update(f.read(1 << 20))
            if size > 2 << 20:
                f.seek(-(1 << 20), os.SEEK_END)
                digest.update(f.read())
    return {"path": path, "bytes": total, "sha256": digest.hexdigest()[:16]}


def to_uint8(video: jax.Array) -> np.ndarray:
    """[-1, 1] -> uint8 as the released code: ((x + 1) * 127.5).clip(0, 255), truncated."""
    return np.asarray(jnp.clip((video.astype(jnp.float32) + 1.0) * 127.5, 0, 255)).astype(np.uint8)


class Editor:
    def __init__(
        self, dit, vae, text_encoder, tokenizer, *, mesh=None, rules=None, identities: dict | None = None
    ):
        if text_encoder.cfg.dim != dit.cfg.text_dim:
            raise ValueError(f"text encoder width {text_encoder.cfg.dim} != DiT text_dim {dit.cfg.text_dim}")
        self.dit, self.vae = dit, vae
        self.text = text.TextEncoder(text_encoder, tokenizer, text_len=dit.cfg.text_len)
        self.mesh, self.rules = mesh, rules or sharding.DEFAULT_RULES
        self.identities = dict(identities or {})
        self._graphdef, _ = nnx.split(dit)

    @classmethod
    def from_checkpoints(
        cls,
        dit: str,
        vae: str,
        text_encoder: str,
        tokenizer: str,
        *,
        mesh=None,
        rules=None,
        precision=None,
        lora_path: str | None = None,
    ) -> "Editor":
        """Loads converted params checkpoints (and merges a LoRA, alpha 1.0). precision: a
        precision section (param_dtype, compute_dtype, residual_dtype, ...) for all three models."""
        check_checkpoints(
            dit=dit, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, lora_path=lora_path
        )
        model = wan_dit.load_dit(dit, mesh=mesh, rules=rules, precision=precision)
        identities = {
            "dit": fingerprint(dit),
            "vae": fingerprint(vae),
            "text_encoder": fingerprint(text_encoder),
            "tokenizer": fingerprint(tokenizer),
        }
        if lora_path:
            merged = lora_lib.merge_lora(model, lora_lib.read_lora(lora_path), alpha=1.0)
            identities["lora"] = dict(fingerprint(lora_path), modules=len(merged))
        kw = dict(mesh=mesh, rules=rules, precision=precision)
        return cls(
            model,
            wan_vae.load_vae(vae, **kw),
            umt5.load_text_encoder(text_encoder, **kw),
            text.load_tokenizer(tokenizer),
            mesh=mesh,
            rules=rules,
            identities=identities,
        )

    @classmethod
    def from_run(
        cls, workdir: str, *, use_ema: bool = True, mesh=None, rules=None, lora_path: str | None = None
    ) -> "Editor":
        """A sama-train run directory (sama_jax.run_dir): its EMA (or raw) DiT, the frozen VAE and
        text encoder it trained with and its tokenizer, in the run's own precision."""
        from sama_jax import encoders, run_dir

        if not run_dir.is_run_dir(workdir):
            raise FileNotFoundError(
                f"--run {workdir}: not a sama-train run directory (no "
                f"{run_dir.CONFIG_FILE} and {run_dir.CHECKPOINTS}/)"
            )
        run = run_dir.load_run(workdir, use_ema=use_ema, mesh=mesh, rules=rules)
        if run.encoders.vae is None or run.encoders.text_encoder is None or run.tokenizer is None:
            raise ValueError(
                f"--run {workdir}: the run has no VAE, text encoder or tokenizer recorded "
                f"({encoders.RECORD_FILE}); give --dit --vae --text-encoder --tokenizer"
            )
        checkpoint = os.path.join(workdir, run_dir.CHECKPOINTS, str(run.step))
        identities = {
            "run": os.path.abspath(workdir),
            "step": int(run.step),
            "weights": "ema" if use_ema else "raw",
            "dit": fingerprint(checkpoint) if os.path.isdir(checkpoint) else None,
        }
        if lora_path:
            merged = lora_lib.merge_lora(run.dit, lora_lib.read_lora(lora_path), alpha=1.0)
            identities["lora"] = dict(fingerprint(lora_path), modules=len(merged))
        return cls(
            run.dit,
            run.encoders.vae,
            run.encoders.text_encoder,
            run.tokenizer,
            mesh=mesh,
            rules=rules,
            identities=identities,
        )

    @classmethod
    def untrained(
        cls, preset: str, tokenizer: str | None, precision=None, *, mesh=None, rules=None
    ) -> "Editor":
        """Randomly initialised models of a preset (nnx.Rngs(0)): for timing and smoke runs; the edits
        are noise. tokenizer: a tokenizer directory (e.g. the synthetic set's)."""
        from sama_jax import presets

        if not tokenizer or not os.path.isdir(tokenizer):
            raise FileNotFoundError(
                f"--preset {preset} needs --tokenizer DIR (e.g. the synthetic set's "
                f"tokenizer, made by sama-smoke), got {tokenizer!r}"
            )
        model = presets.model_config(preset)
        rngs = nnx.Rngs(0)
        dit = wan_dit.WanDiT(wan_dit.WanDiTConfig.from_config(model.dit, precision), rngs=rngs)
        vae = wan_vae.WanVAE(wan_vae.WanVAEConfig.from_config(model.vae, precision), rngs=rngs)
        encoder = umt5.UMT5Encoder(umt5.UMT5Config.from_config(model.text_encoder, precision), rngs=rngs)
        if mesh is not None:
            for module in (dit, vae, encoder):
                sharding.shard_module(module, mesh, rules)
        identities = {"preset": preset, "weights": "untrained (nnx.Rngs(0))"}
        return cls(
            dit, vae, encoder, text.load_tokenizer(tokenizer), mesh=mesh, rules=rules, identities=identities
        )

    def _denoiser(self, settings: EditSettings) -> sampling.Denoiser:
        return denoiser_for(self._graphdef, settings.sampler, settings.cfg_mode, settings.guidance != 1.0)

    def _place(self, x):
        if self.mesh is None:
            return jnp.asarray(x)
        return jax.device_put(x, jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec()))

    def prompt_seen(self, prompt: str, settings: EditSettings) -> tuple[str, int, int]:
        """(the prompt with its prefix as the text encoder sees it, its tokens, the whole prompt's
        tokens): a prompt longer than text_len is cut, and the caller should say so."""
        positive, _ = edit_rules.edit_prompts(prompt, settings.prompt_prefix)
        return text.seen_by_encoder(self.text.tokenizer, positive, self.text.text_len)

    def edit(
        self,
        frames: np.ndarray,
        prompt: str,
        settings: EditSettings = EditSettings(),
        progress: Callable[[int, int, float], None] | None = None,
    ) -> EditResult:
        """frames: uint8 (N, H, W, 3), the source from its first frame. progress(step, steps, seconds)
        is called after each denoising step."""
        positive, negative = edit_rules.edit_prompts(prompt, settings.prompt_prefix)
        clip, kept = edit_rules.prepare_frames(
            frames, settings.max_frames, settings.height, settings.width, settings.exact_size
        )
        timings = {}
        context = (
            sharding.use_mesh(self.mesh, self.rules) if self.mesh is not None else contextlib.nullcontext()
        )
        with context:
            start = time.perf_counter()
            cond = {"text": self.text([positive])[0]}
            uncond = {"text": self.text([negative])[0]}
            jax.block_until_ready((cond, uncond))
            timings["text"] = time.perf_counter() - start

            start = time.perf_counter()
            video = self._place(transforms.to_model_range(clip)[None])
            source = wan_vae.encode_video(self.vae, video, tiled=settings.tiled)
            cond["source"] = uncond["source"] = source
            jax.block_until_ready(source)
            timings["vae_encode"] = time.perf_counter() - start

            start = time.perf_counter()
            schedule = sampling.make_schedule(settings.sampler, settings.steps, settings.shift)
            semantic_shape = None
            if settings.semantic_tokens:
                semantic_shape = (1, settings.semantic_tokens, self.dit.cfg.semantic_dim)
            noise, semantic_noise = sampling.initial_noise(
                jax.random.key(settings.seed), source.shape, semantic_shape, jnp.dtype(settings.dtype)
            )
            denoiser = self._denoiser(settings)
            _, state = nnx.split(self.dit)
            carry = denoiser.init(
                self._place(noise), None if semantic_noise is None else self._place(semantic_noise)
            )
            for step in range(schedule.steps):
                carry = denoiser.run(
                    state,
                    carry,
                    cond,
                    uncond if denoiser.guided else None,
                    schedule,
                    settings.guidance,
                    step,
                    step + 1,
                )
                if progress is not None:
                    jax.block_until_ready(carry)
                    progress(step + 1, schedule.steps, time.perf_counter() - start)
            latents, _ = denoiser.output(carry)
            jax.block_until_ready(latents)
            timings["denoise"] = time.perf_counter() - start

            start = time.perf_counter()
            decoded = wan_vae.decode_latents(self.vae, latents.astype(jnp.float32), tiled=settings.tiled)
            edited = to_uint8(decoded[0])
            timings["vae_decode"] = time.perf_counter() - start
        count = len(clip) if settings.keep_padding else kept
        return EditResult(
            frames=edited[:count],
            source=clip[:count],
            prompt=self.prompt_seen(prompt, settings)[0],
            negative_prompt=negative,
            source_frames=kept,
            model_frames=len(clip),
            timings=timings,
        )


def check_checkpoints(**paths) -> None:
    """Raises one FileNotFoundError naming every missing checkpoint part (None/'' parts are skipped
    only for lora_path)."""
    missing = []
    for name, path in paths.items():
        if name == "lora_path" and not path:
            continue
        if not path:
            missing.append(f"--{name.replace('_', '-')} not given")
        elif not os.path.exists(path):
            missing.append(f"--{name.replace('_', '-')} {path}: does not exist")
    if missing:
        raise FileNotFoundError("checkpoint parts missing:\n  " + "\n  ".join(missing))
