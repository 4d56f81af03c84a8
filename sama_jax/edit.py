"""sama-edit: instruction-guided video editing from the command line, as the released SAMA CLI.

  sama-edit --src-video clip.mp4 --prompt "Replace the seal with a red crab." \
      --dit ckpt/sama_14b --vae ckpt/wan_vae --text-encoder ckpt/umt5 --tokenizer ckpt/google/umt5-xxl \
      --output-dir out --max-frames 49 --prompt-prefix --tiled [--seed 1] [--steps 50] [--sampler euler]

The released infer_sh/run_sama.sh is the line above (SAMA-14B, 49 frames, seed 1). Flags and
defaults follow infer_sh/inference.py (--output-dir tmp, --height 480 --width 832 as the bucket
rule's pixel budget, --max-frames 81, --fps 20 used only when the source has none, --seed 1), plus
the sampler (--steps 50 --guidance 5 --shift 5 --sampler euler|unipc --cfg-mode batch|sequential)
and the checkpoints (--dit --vae --text-encoder --tokenizer). Several --src-video, or --list FILE
(lines "video<TAB>prompt", paths relative to the file; a line without a prompt uses --prompt), run
with the models loaded once.

Per source <stem>.<ext>, in --output-dir: <stem>.mp4 (H.264 at the source fps), <stem>.compare.mp4
(source | edit side by side), <stem>.sheet.png (source and edit frames, evenly spaced) and
<stem>.json (settings, prompts, seed, frame counts, checkpoint fingerprints, timings). The outputs
appear together when the edit is done (written in a hidden folder, then moved, <stem>.mp4 last);
a failed edit leaves none. Every input is checked before the models load: extension, readable
video with frames, a size the model takes, existing outputs (refused without --overwrite),
checkpoint parts present.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import json
import os
import shutil
import sys
import time

import jax
import numpy as np

from sama_jax import cli, edit_flags, edit_rules, inference, previews, progress, resolution
from sama_jax.data import video_io

SHEET_COLUMNS = 8
SHEET_HEIGHT = 128


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sama-edit",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    io = p.add_argument_group("inputs and outputs (the released CLI's flags)")
    io.add_argument("--src-video", nargs="+", default=[], help="source video(s): .mp4 .mov .mkv .avi .webm")
    io.add_argument("--list", help="file of 'video<TAB>prompt' lines (relative paths: to the file)")
    io.add_argument("--prompt", default="", help="edit instruction (for every --src-video)")
    io.add_argument("--output-dir", default="tmp")
    io.add_argument("--lora-path", default="", help="LoRA (released key format) merged with alpha 1.0")
    io.add_argument("--overwrite", action="store_true", help="replace existing outputs")
    s = p.add_argument_group("sampler")
    edit_flags.add_editing_flags(io, s)
    m = p.add_argument_group("models")
    m.add_argument("--dit", help="DiT params checkpoint (convert-wan-weights)")
    m.add_argument("--vae", help="Wan VAE params checkpoint")
    m.add_argument("--text-encoder", help="umT5 params checkpoint")
    m.add_argument("--tokenizer", help="umT5 tokenizer directory")
    m.add_argument("--run", help="a sama-train run directory instead of the four checkpoints")
    m.add_argument(
        "--params",
        default="ema",
        choices=("ema", "raw"),
        help="with --run: the EMA parameters (default) or the raw trained ones",
    )
    m.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="parameter and compute dtype of the models (the released pipeline: bfloat16)",
    )
    m.add_argument(
        "--mesh",
        default="fsdp=-1",
        help="device mesh 'axis=size,...' over (data, fsdp, context, tensor), or 'none' "
        "(one device); the CFG batch shards over 'data'",
    )
    return p


@dataclasses.dataclass
class Job:
    source: str
    prompt: str
    stem: str
    info: dict | None = None
    size: tuple[int, int] | None = None  # (height, width) of the edit


def output_paths(output_dir: str, stem: str) -> dict[str, str]:
    return {
        "video": os.path.join(output_dir, f"{stem}.mp4"),
        "compare": os.path.join(output_dir, f"{stem}.compare.mp4"),
        "sheet": os.path.join(output_dir, f"{stem}.sheet.png"),
        "sidecar": os.path.join(output_dir, f"{stem}.json"),
    }


def read_list(path: str) -> list[tuple[str, str]]:
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--list {path}: no such file")
    base, out = os.path.dirname(os.path.abspath(path)), []
    with open(path, encoding="utf-8") as f:
        for line in f:
            line = line.rstrip("\n")
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            video, _, prompt = line.partition("\t")
            out.append((os.path.join(base, video.strip()), prompt.strip()))
    if not out:
        raise ValueError(f"--list {path}: no 'video<TAB>prompt' lines")
    return out


def collect_jobs(args) -> list[Job]:
    pairs = [(v, args.prompt) for v in args.src_video]
    if args.list:
        pairs += [(v, p or args.prompt) for v, p in read_list(args.list)]
    if not pairs:
        raise edit_rules.EditInputError("no input: give --src-video or --list")
    jobs, stems = [], {}
    for source, prompt in pairs:
        stem = os.path.splitext(os.path.basename(source))[0]
        if stem in stems:
            raise edit_rules.EditInputError(
                f"{source} and {stems[stem]} would write the same outputs "
                f"({stem}.*): edit them into different --output-dir"
            )
        stems[stem] = source
        if not prompt.strip():
            raise edit_rules.EditInputError(f"{source}: no prompt (give --prompt or a prompt in --list)")
        jobs.append(Job(source, prompt, stem))
    return jobs


def check_jobs(jobs: list[Job], args, settings) -> None:
    """Every per-video check that needs no model; raises one EditInputError listing all problems."""
    problems = []
    where = args.output_dir
    while where and not os.path.exists(where):  # the nearest existing folder gets the new ones
        where = os.path.dirname(where.rstrip(os.sep))
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        problems.append(f"--output-dir {args.output_dir} is a file, not a folder")
    elif where and not os.path.isdir(where):
        problems.append(f"--output-dir {args.output_dir}: {where} is a file, not a folder")
    elif not os.access(where or ".", os.W_OK):
        problems.append(f"--output-dir {args.output_dir}: {where or '.'} is not writable")
    for job in jobs:
        ext = os.path.splitext(job.source)[1].lower()
        if ext not in edit_rules.SOURCE_EXTS:
            problems.append(
                f"{job.source}: unsupported extension {ext or '(none)'!r}; "
                f"sources are {' '.join(edit_rules.SOURCE_EXTS)}"
            )
            continue
        try:
            job.info = video_io.video_info(job.source)
            job.size = settings.output_size(job.info["height"], job.info["width"])
        except (video_io.MediaError, edit_rules.EditInputError, resolution.SizeError) as e:
            problems.append(str(e))
            continue
        existing = [p for p in output_paths(args.output_dir, job.stem).values() if os.path.exists(p)]
        if existing and not args.overwrite:
            problems.append(f"{existing[0]} exists: pass --overwrite to replace it")
    if problems:
        raise edit_rules.EditInputError("\n  ".join(["cannot edit:"] + problems))


def write_outputs(
    job: Job, result, fps: float, fps_from: str, args, settings, identities: dict, total_seconds: float
) -> dict[str, str]:
    """Writes the four outputs into a hidden folder, then moves them into place, the mp4 last."""
    paths = output_paths(args.output_dir, job.stem)
    partial = os.path.join(args.output_dir, f".{job.stem}.partial")
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        staged = {k: os.path.join(partial, os.path.basename(p)) for k, p in paths.items()}
        video_io.write_video(staged["video"], result.frames, fps, crf=args.crf)
        video_io.write_video(
            staged["compare"], np.concatenate([result.source, result.frames], axis=2), fps, crf=args.crf
        )
        video_io.write_image(
            staged["sheet"],
            previews.contact_sheet(
                [result.source, result.frames], columns=SHEET_COLUMNS, height=SHEET_HEIGHT
            ),
        )
        sidecar = {
            "source": os.path.abspath(job.source),
            "outputs": {k: os.path.abspath(p) for k, p in paths.items()},
            "prompt": job.prompt,
            "model_prompt": result.prompt,
            "negative_prompt": result.negative_prompt,
            "seed": settings.seed,
            "settings": dataclasses.asdict(settings),
            "latent_dtype": settings.dtype,
            "model_dtype": args.dtype,
            "frames": {
                "source": job.info["frames"],
                "used": result.source_frames,
                "model": result.model_frames,
                "output": int(len(result.frames)),
            },
            "size": {
                "source": [job.info["height"], job.info["width"]],
                "output": list(result.frames.shape[1:3]),
            },
            "fps": fps,
            "fps_from": fps_from,
            "checkpoints": identities,
            "timings": dict(
                {k: round(v, 4) for k, v in result.timings.items()}, total=round(total_seconds, 4)
            ),
            "devices": f"{jax.device_count()} x {jax.devices()[0].device_kind}",
            "jax": jax.__version__,
            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }
        with open(staged["sidecar"], "w") as f:
            json.dump(sidecar, f, indent=2)
        for key in ("compare", "sheet", "sidecar", "video"):
            os.replace(staged[key], paths[key])
    finally:
        shutil.rmtree(partial, ignore_errors=True)
    return paths


def settings_from_args(args, semantic_tokens: int | None = None) -> inference.EditSettings:
    """The EditSettings of sama-edit's editing flags (sama-export takes the same flags)."""
    return inference.EditSettings(
        steps=args.steps,
        guidance=args.guidance,
        shift=args.shift,
        sampler=args.sampler,
        cfg_mode=args.cfg_mode,
        seed=args.seed,
        max_frames=args.max_frames,
        height=args.height,
        width=args.width,
        exact_size=args.exact_size,
        tiled=args.tiled,
        prompt_prefix=edit_rules.PROMPT_PREFIX if args.prompt_prefix else "",
        keep_padding=args.keep_padding,
        latent_dtype=args.latent_dtype,
        semantic_tokens=args.semantic_tokens if semantic_tokens is None else semantic_tokens,
    )


def _main(args) -> int:
    settings = settings_from_args(args)
    if args.fps <= 0:
        raise edit_rules.EditInputError(f"--fps must be positive, got {args.fps}")
    jobs = collect_jobs(args)
    check_jobs(jobs, args, settings)
    if args.run:
        if any((args.dit, args.vae, args.text_encoder, args.tokenizer)):
            raise edit_rules.EditInputError(
                "give --run DIR or the checkpoints (--dit --vae --text-encoder --tokenizer), not both"
            )
        from sama_jax import run_dir

        if not run_dir.is_run_dir(args.run):
            raise edit_rules.EditInputError(
                f"--run {args.run}: not a sama-train run directory (no "
                f"{run_dir.CONFIG_FILE} and {run_dir.CHECKPOINTS}/)"
            )
    else:
        paths = dict(dit=args.dit, vae=args.vae, text_encoder=args.text_encoder, tokenizer=args.tokenizer)
        inference.check_checkpoints(**paths, lora_path=args.lora_path)
    start = time.perf_counter()
    editor = edit_flags.editor_from_flags(args)
    mesh = editor.mesh
    print(
        f"models loaded in {time.perf_counter() - start:.1f} s"
        + (f" on mesh {dict(mesh.shape)}" if mesh is not None else ""),
        flush=True,
    )

    failed, done_seconds = 0, []
    for n, job in enumerate(jobs, 1):
        label = f"[{n}/{len(jobs)}] {os.path.basename(job.source)}"
        report = progress.step_reporter(
            lambda line: print(line, flush=True), f"{label}: ", every=max(1, settings.steps // 10)
        )

        seen, kept, total = editor.prompt_seen(job.prompt, settings)
        if kept < total:
            print(
                f"{label}: warning: the prompt is {total} tokens, the text encoder takes {kept}: "
                f"the model sees its first {kept} tokens, ending {seen[-40:]!r}",
                file=sys.stderr,
                flush=True,
            )
        began = time.perf_counter()
        try:
            frames = video_io.decode_video(job.source, max_frames=settings.max_frames)
            result = editor.edit(frames, job.prompt, settings, report)
            fps, fps_from = (job.info["fps"], "source") if job.info["fps"] > 0 else (args.fps, "--fps")
            total = time.perf_counter() - began
            paths_out = write_outputs(job, result, fps, fps_from, args, settings, editor.identities, total)
        except (video_io.MediaError, edit_rules.EditInputError, resolution.SizeError) as e:
            failed += 1
            print(f"{label}: error: {e}", file=sys.stderr, flush=True)
            continue
        done_seconds.append(time.perf_counter() - began)
        left = len(jobs) - n
        eta = (
            f", {progress.eta(n, len(jobs), sum(done_seconds) / len(done_seconds))} for {left} more"
            if left
            else ""
        )
        print(
            f"{label}: {len(result.frames)} frames {result.frames.shape[2]}x{result.frames.shape[1]} "
            f"at {fps:g} fps -> {paths_out['video']} in {done_seconds[-1]:.1f} s{eta}",
            flush=True,
        )
    return 1 if failed else 0


def main(argv: list[str] | None = None) -> int:
    return cli.run("sama-edit", lambda: _main(cli.parse(build_parser(), argv, config=False)[1]))


if __name__ == "__main__":
    sys.exit(main())
