"""sama-export: a benchmark's every case edited, named and laid out as its scorer reads it.

  sama-export --benchmark openve --cases OpenVE-Bench/benchmark_videos.csv --media-root OpenVE-Bench \
      --out exports/openve --dit ckpt/sama_14b --vae ckpt/wan_vae --text-encoder ckpt/umt5 \
      --tokenizer ckpt/google/umt5-xxl --max-frames 49 --prompt-prefix --tiled
  sama-export --benchmark manifest --cases data/synthetic/val/video_edits.jsonl --out exports/tiny \
      --run runs/tiny --steps 4 --height 64 --width 64 --exact-size --prompt-prefix --dtype float32

Benchmarks (formats: sama_jax.benchmarks_io): openve | reco | vie (--vie-columns names the case
list's columns) | manifest (our JSONL manifests; their targets are ground truth, so each case is
also scored: PSNR/SSIM inside and outside the edited region, temporal consistency; SigLIP frame
consistency with --siglip). The editing flags are sama-edit's; the models come from converted
checkpoints (--dit --vae --text-encoder --tokenizer), a sama-train run directory (--run DIR: its
EMA DiT, encoders and tokenizer) or, for timing and smoke runs, untrained models of a preset
(--preset tiny, outputs are noise).

The pieces: export_records.py (the record store: what is finished, refusing mixed runs), this file
(the case loop and the command), export_report.py (listing, scores, summary and report.html).

In --out: the edits (the benchmark's names), previews/<case>.png (source | ground truth | edit
frames), records/process-I-of-N.jsonl (one JSON line per attempt: instruction, seed, settings,
timings, checkpoint identity, output path, status, scores), and, once every case has a record,
records.jsonl (the latest record per case, case-list order), the benchmark's listing CSV,
scores.json (per case and per edit type), summary.json and report.html.

Resumable: a case is finished when its latest record says done and its output file exists with the
recorded size; finished cases are skipped, others (failed, interrupted) are redone. An output is
written under a temporary name and renamed, and its record is appended after the rename, so a
half-written output is never taken for a finished one. A failed case (unreadable video, a size the
model cannot take, an error in the editor) is recorded with its reason and the run goes on.
A rerun with other settings or checkpoints into the same --out is refused: finished results are
never mixed or replaced. Cases are split across processes: process I of N takes cases I, I+N, ...
(--process-index/--process-count, default jax's process index and count: on a TPU pod every host
runs the same command and edits its share on its own devices).
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import socket
import sys
import time
from typing import Callable

import numpy as np

from sama_jax import (
    benchmarks_io,
    cli,
    edit_flags,
    export_records,
    export_report,
    interrupts,
    previews,
    progress,
)
from sama_jax import scores as scores_lib

PREVIEWS_DIR = "previews"
SHEET_COLUMNS = 8
SHEET_HEIGHT = 96
DEFAULT_FPS = edit_flags.DEFAULT_FPS


# ----------------------------------------------------------------------------- one case


def shard(cases: list, process_index: int, process_count: int) -> list:
    if process_count < 1 or not 0 <= process_index < process_count:
        raise ValueError(f"--process-index {process_index} must be in [0, --process-count {process_count})")
    return cases[process_index::process_count]


def preview_name(case_id: str) -> str:
    return case_id.replace("/", "__") + ".png"


def _edit_frames(result) -> tuple[np.ndarray, dict]:
    """The editor's output: an array, or an object with .frames (and .timings)."""
    if isinstance(result, np.ndarray):
        return result, {}
    return np.asarray(result.frames), dict(getattr(result, "timings", {}) or {})


def _source_info(case: benchmarks_io.Case, frames: np.ndarray) -> dict:
    from sama_jax.data import video_io

    if video_io.is_image_ext(os.path.splitext(case.source)[1]):
        return dict(frames=1, fps=0.0, height=frames.shape[1], width=frames.shape[2])
    return video_io.video_info(case.source)


def edit_case(
    case: benchmarks_io.Case,
    editor,
    *,
    benchmark: str,
    out_dir: str,
    seed: int,
    max_frames: int | None,
    fps: float,
    crf: int,
    region_threshold: float,
    siglip=None,
) -> dict:
    """Edits one case and writes its output and preview; returns the fields of its done record.
    Raises on any failure (the caller records it)."""
    from sama_jax.data import video_io

    timings = {}
    start = time.perf_counter()
    source = benchmarks_io.read_source(case, max_frames)
    info = _source_info(case, source)
    target = None
    if case.target:
        target = video_io.decode_media(case.target, os.path.splitext(case.target)[1])
    timings["decode"] = time.perf_counter() - start

    start = time.perf_counter()
    edited, editor_timings = _edit_frames(editor.edit(source, case.instruction, seed=seed))
    timings["edit"] = time.perf_counter() - start
    timings.update({f"edit_{k}": v for k, v in editor_timings.items()})
    if edited.dtype != np.uint8 or edited.ndim != 4 or edited.shape[-1] != 3 or not len(edited):
        raise ValueError(f"the editor returned {edited.dtype} {edited.shape}, not uint8 (T, H, W, 3) frames")
    edited = benchmarks_io.fit_to_source(benchmark, edited, info["frames"], info["height"])

    start = time.perf_counter()
    case_scores = None
    if target is not None:
        case_scores = scores_lib.score_edit(edited, target, source[: len(target)], threshold=region_threshold)
        if siglip is not None:
            case_scores["siglip_consistency"] = scores_lib.siglip_consistency(siglip, edited)
            case_scores["siglip_consistency_target"] = scores_lib.siglip_consistency(siglip, target)
    timings["score"] = time.perf_counter() - start

    start = time.perf_counter()
    path = os.path.join(out_dir, case.output)
    rows = [source] + ([target] if target is not None else []) + [edited]
    size = edited.shape[1:3]
    sheet = previews.contact_sheet(
        [scores_lib.resize_frames(v, *size) for v in rows], columns=SHEET_COLUMNS, height=SHEET_HEIGHT
    )
    video_io.write_image(os.path.join(out_dir, PREVIEWS_DIR, preview_name(case.case_id)), sheet)
    out_fps = info["fps"] if info["fps"] > 0 else fps
    # Both writers write a temporary file and rename it, so `path` is always a whole file.
    if video_io.is_image_ext(os.path.splitext(path)[1]):
        video_io.write_image(path, edited[0])
    else:
        video_io.write_video(path, edited, out_fps, crf=crf)
    timings["write"] = time.perf_counter() - start
    return dict(
        output_bytes=os.path.getsize(path),
        fps=out_fps,
        frames=dict(source=int(info["frames"]), used=int(len(source)), output=int(len(edited))),
        size=dict(source=[int(info["height"]), int(info["width"])], output=[int(s) for s in size]),
        scores=case_scores,
        preview=f"{PREVIEWS_DIR}/{preview_name(case.case_id)}",
        timings=timings,
    )


def _failure(error: BaseException) -> dict:
    reason = getattr(error, "reason", None) or type(error).__name__
    return dict(
        error=str(error).strip().splitlines()[0][:2000] if str(error).strip() else type(error).__name__,
        reason=reason,
    )


# ----------------------------------------------------------------------------- a run


def run_export(
    cases: list[benchmarks_io.Case],
    editor,
    out_dir: str,
    *,
    benchmark: str,
    seed: int,
    settings: dict,
    identity: dict,
    process_index: int = 0,
    process_count: int = 1,
    max_frames: int | None = None,
    fps: float = DEFAULT_FPS,
    crf: int = 17,
    region_threshold: float = scores_lib.REGION_THRESHOLD,
    siglip=None,
    log: Callable[[str], None] = print,
) -> dict:
    """Edits this process's share of the cases that are not finished; returns this process's
    summary, and finalizes the run (finalize) when every case has a record.

    editor.edit(frames uint8 (T, H, W, 3), instruction, *, seed) -> uint8 (T', H', W', 3) frames,
    or an object with .frames and .timings (the Editor's EditResult)."""
    os.makedirs(out_dir, exist_ok=True)
    records = export_records.load_records(out_dir)
    export_records.check_same_run(records, settings, identity, out_dir)
    mine = shard(cases, process_index, process_count)
    todo = [c for c in mine if not export_records.is_finished(records.get(c.case_id), out_dir)]
    skipped = len(mine) - len(todo)
    log(
        f"sama-export: process {process_index}/{process_count}: {len(mine)} of {len(cases)} cases, "
        f"{skipped} finished already, {len(todo)} to edit -> {out_dir}"
    )
    path = export_records.record_path(out_dir, process_index, process_count)
    common = dict(
        benchmark=benchmark,
        seed=seed,
        settings=settings,
        identity=identity,
        process=f"{process_index}/{process_count}",
        host=socket.gethostname(),
    )
    done, failed, seconds = 0, 0, []
    began = time.perf_counter()
    # Ctrl-C / SIGTERM: the case in flight is finished and recorded, then the run stops (resumable).
    stop = interrupts.StopRequest("sama-export", "finishing the case in flight, then stopping").install()
    for n, case in enumerate(todo, 1):
        if stop.requested:
            break
        start = time.perf_counter()
        record = dict(
            case_id=case.case_id,
            instruction=case.instruction,
            edit_type=case.edit_type,
            source=os.path.abspath(case.source),
            target=case.target and os.path.abspath(case.target),
            output=case.output,
            **({"note": case.note} if case.note else {}),
            **common,
        )
        try:
            fields = edit_case(
                case,
                editor,
                benchmark=benchmark,
                out_dir=out_dir,
                seed=seed,
                max_frames=max_frames,
                fps=fps,
                crf=crf,
                region_threshold=region_threshold,
                siglip=siglip,
            )
        except Exception as e:  # any failure of one case is that case's: record it and go on
            failed += 1
            record.update(status="failed", **_failure(e))
            record["timings"] = dict(total=time.perf_counter() - start)
            record["finished"] = export_records.timestamp()
            export_records.append_record(path, record)
            log(f"[{n}/{len(todo)}] {case.case_id}: FAILED ({record['reason']}): {record['error']}")
            continue
        fields["timings"]["total"] = time.perf_counter() - start
        record.update(status="done", **fields, finished=export_records.timestamp())
        export_records.append_record(path, record)
        done += 1
        seconds.append(fields["timings"]["total"])
        # The first edit compiles the sampler: later ones predict the rest better.
        per_case = float(np.mean(seconds[1:] if len(seconds) > 1 else seconds))
        rate = 60 / per_case
        note = ""
        if case.target and fields["scores"]:
            s = fields["scores"]
            note = f" psnr in/out {export_report.fmt(s['psnr_in'])}/{export_report.fmt(s['psnr_out'])} dB"
        log(
            f"[{n}/{len(todo)}] {case.case_id}: done in {seconds[-1]:.1f} s{note} | "
            f"{rate:.2f} cases/min, {progress.eta(n, len(todo), per_case)}"
        )
    stop.restore()
    if stop.requested:
        log(
            f"sama-export: stopped by signal {stop.name} after {done + failed} of {len(todo)} cases; "
            "rerun the same command to continue"
        )
    summary = dict(
        stopped=stop.name,
        exit_code=stop.exit_code,
        process=f"{process_index}/{process_count}",
        cases=len(mine),
        done=done,
        skipped=skipped,
        failed=failed,
        seconds=time.perf_counter() - began,
        seconds_per_case=float(np.mean(seconds)) if seconds else None,
        seconds_per_case_after_first=float(np.mean(seconds[1:])) if len(seconds) > 1 else None,
    )
    per_case = (
        ""
        if not seconds
        else (
            f", {summary['seconds_per_case']:.2f} s per case"
            + (
                f" ({summary['seconds_per_case_after_first']:.2f} s after the first, "
                f"{60 / summary['seconds_per_case_after_first']:.2f} cases/min)"
                if summary["seconds_per_case_after_first"]
                else ""
            )
        )
    )
    log(
        f"sama-export: process {process_index}/{process_count}: {done} done, {skipped} skipped, "
        f"{failed} failed of {len(mine)}{per_case}"
    )
    final = export_report.finalize(out_dir, benchmark, cases)
    if final is None:
        missing = sum(1 for c in cases if c.case_id not in export_records.load_records(out_dir))
        log(
            f"sama-export: {missing} cases of other processes have no record yet; the last process "
            "to finish writes the run's listing, scores and report"
        )
    else:
        log(
            f"sama-export: run complete: {final['done']} done, {final['failed']} failed of "
            f"{final['cases']} -> {os.path.join(out_dir, 'summary.json')}"
        )
    summary["run"] = final
    return summary


# ----------------------------------------------------------------------------- the command


class EditorAdapter:
    """The Editor (sama_jax.inference) behind run_export's contract: edit(frames, instruction, *, seed)."""

    def __init__(self, editor, settings, log: Callable[[str], None] = print):
        self.editor, self._settings, self.log = editor, settings, log
        self.settings = dataclasses.asdict(settings)
        self.identity = dict(getattr(editor, "identities", {}) or {})

    def edit(self, frames: np.ndarray, instruction: str, *, seed: int):
        steps = self._settings.steps
        # Only long edits report their steps: a tiny edit's per-case line is enough.
        report = progress.step_reporter(self.log, "  ", every=max(1, steps // 5), quiet_seconds=30)
        return self.editor.edit(frames, instruction, dataclasses.replace(self._settings, seed=seed), report)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="sama-export", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    b = p.add_argument_group("benchmark")
    b.add_argument("--benchmark", required=True, choices=benchmarks_io.BENCHMARKS)
    b.add_argument(
        "--cases",
        required=True,
        help="openve: benchmark_videos.csv; reco: configs/ folder or a {task}.txt; "
        "vie: .csv/.json/.jsonl case list; manifest: a JSONL manifest",
    )
    b.add_argument(
        "--media-root",
        default=None,
        help="folder the case list's video paths are relative to (default: the case list's folder)",
    )
    b.add_argument(
        "--allow-outside-media-root",
        action="store_true",
        help="read sources the case list places outside --media-root (absolute paths, '..', symlinks); "
        "by default such a case fails (reason outside_media_root)",
    )
    b.add_argument("--out", required=True, help="output folder (resumed when it holds a run)")
    b.add_argument(
        "--vie-columns",
        default="",
        help="VIE-Bench column names, e.g. 'video=src_video,prompt=instruction,type=category,id=id' "
        f"(default {','.join(f'{k}={v}' for k, v in benchmarks_io.VIE_COLUMNS.items())})",
    )
    b.add_argument("--limit", type=int, default=0, help="only the first N cases (0: all)")
    b.add_argument("--process-index", type=int, default=None, help="this process's share (default: jax's)")
    b.add_argument(
        "--process-count", type=int, default=None, help="processes sharing the cases (default: jax's)"
    )
    b.add_argument(
        "--region-threshold",
        type=float,
        default=scores_lib.REGION_THRESHOLD,
        help="|source - target| above this marks the edited region for the scores",
    )
    b.add_argument("--siglip", default="", help="SigLIP params checkpoint: adds SigLIP frame consistency")
    e = p.add_argument_group("editing (sama-edit's flags)")
    edit_flags.add_editing_flags(
        e,
        e,
        semantic_tokens=None,
        semantic_help="semantic tokens denoised with the video (default: 65, the released "
        "model's; with --run or --preset, the model's)",
    )
    m = p.add_argument_group("models")
    m.add_argument("--dit", help="DiT params checkpoint (convert-wan-weights)")
    m.add_argument("--vae", help="Wan VAE params checkpoint")
    m.add_argument("--text-encoder", help="umT5 params checkpoint")
    m.add_argument("--tokenizer", help="tokenizer directory")
    m.add_argument("--lora-path", default="", help="LoRA (released key format) merged with alpha 1.0")
    m.add_argument(
        "--run",
        default="",
        help="a sama-train run directory: its EMA DiT, encoders and tokenizer "
        "(instead of --dit --vae --text-encoder --tokenizer)",
    )
    m.add_argument(
        "--preset",
        default="",
        help="untrained models of this preset instead of checkpoints "
        "(tiny: timing and smoke runs; the edits are noise)",
    )
    m.add_argument(
        "--dtype",
        default="bfloat16",
        choices=("bfloat16", "float32"),
        help="parameter and compute dtype of checkpoints and --preset models (--run: the run's)",
    )
    m.add_argument(
        "--mesh", default="fsdp=-1", help="mesh 'axis=size,...' over this process's devices, or 'none'"
    )
    return p


def edit_settings(args):
    from sama_jax import presets, semantic

    if args.fps <= 0:
        raise ValueError(f"--fps must be positive, got {args.fps}")
    semantic_tokens = args.semantic_tokens
    if semantic_tokens is None:  # the model's own count
        semantic_tokens = 65
        if args.run:
            from sama_jax import run_dir

            semantic_tokens = semantic.SemanticConfig(
                **run_dir.read_config(args.run).model.semantic
            ).num_tokens
        elif args.preset:
            semantic_tokens = semantic.SemanticConfig(**presets.model_config(args.preset).semantic).num_tokens
    from sama_jax import edit

    return edit.settings_from_args(args, semantic_tokens)


def build_editor(args, settings, log):
    """The Editor the model flags name (edit_flags.editor_from_flags), behind run_export's contract."""
    return EditorAdapter(edit_flags.editor_from_flags(args), settings, log)


def check_sources(cases: list[benchmarks_io.Case], media_root: str | None) -> None:
    """One line before any model loads when no source exists at all (a wrong --media-root); single
    missing sources become failed cases."""
    if not any(os.path.exists(c.source) for c in cases):
        raise FileNotFoundError(
            f"none of the {len(cases)} source videos exists (first: {cases[0].source}, "
            f"from {cases[0].where}): check --media-root "
            f"({media_root or 'default: the case list folder'})"
        )


def main(argv: list[str] | None = None) -> int:
    return cli.run("sama-export", lambda: _main(*cli.parse(build_parser(), argv, config=False)))


def _main(_, args) -> int:
    if args.run:
        from sama_jax import run_dir

        if not run_dir.is_run_dir(args.run):
            raise FileNotFoundError(
                f"--run {args.run}: not a sama-train run directory (no "
                f"{run_dir.CONFIG_FILE} and {run_dir.CHECKPOINTS}/)"
            )
    elif not args.preset:
        from sama_jax import inference

        inference.check_checkpoints(
            dit=args.dit,
            vae=args.vae,
            text_encoder=args.text_encoder,
            tokenizer=args.tokenizer,
            lora_path=args.lora_path,
        )
    columns = benchmarks_io.parse_columns(args.vie_columns)
    cases = benchmarks_io.read_cases(
        args.benchmark, args.cases, args.media_root, columns, allow_outside=args.allow_outside_media_root
    )
    if args.limit > 0:
        cases = cases[: args.limit]
    for case in cases:
        if case.note:
            print(f"sama-export: {case.where}: {case.note}", flush=True)
    check_sources(cases, args.media_root)
    settings = edit_settings(args)
    if args.siglip and not os.path.exists(args.siglip):
        raise FileNotFoundError(f"--siglip {args.siglip}: does not exist")

    import jax

    index = jax.process_index() if args.process_index is None else args.process_index
    count = jax.process_count() if args.process_count is None else args.process_count
    shard(cases, index, count)  # checks the pair before the models load
    # The settings are known before the models: a refused resume costs no model load.
    export_records.check_same_run(
        export_records.load_records(args.out), dataclasses.asdict(settings), None, args.out
    )
    start = time.perf_counter()
    editor = build_editor(args, settings, print)
    siglip = None
    if args.siglip:
        from sama_jax.models import siglip as siglip_lib

        siglip = siglip_lib.load_siglip(args.siglip)
    print(f"sama-export: models ready in {time.perf_counter() - start:.1f} s", flush=True)
    summary = run_export(
        cases,
        editor,
        args.out,
        benchmark=args.benchmark,
        seed=args.seed,
        settings=editor.settings,
        identity=editor.identity,
        process_index=index,
        process_count=count,
        max_frames=args.max_frames,
        fps=args.fps,
        crf=args.crf,
        region_threshold=args.region_threshold,
        siglip=siglip,
        log=lambda line: print(line, flush=True),
    )
    if summary["stopped"]:
        return summary["exit_code"]
    return 1 if summary["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
