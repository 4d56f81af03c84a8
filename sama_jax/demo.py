"""sama-demo: the whole product on the embedded default, on a CPU, in minutes.

    sama-demo --workdir runs/demo [--cpu-devices=8] [--quick]

Runs the real commands, one after the other, each printed before it runs:
  1. data      the synthetic moving-shapes dataset (training split, and a held-out split whose
               objects use (colour, shape) pairs never seen in training) and its tokenizer
  2. vae       sama-fit-vae: the demo's Wan VAE fitted on the training frames, then clips (a random
               VAE cannot reconstruct frames, so nothing decoded through it could be scored)
  3. features  the tiny random text encoder and SigLIP saved once, then sama-precompute: latents,
               text and semantic tokens of every manifest, so the DiT steps run no frozen encoder
  4. stage0    sama-train --config=configs/stage0_pretrain.py:demo (image edits + motion-aligned
               clips; their sources are made at train time, so only targets are precomputed)
  5. stage1    sama-train --config=configs/stage1_sft.py:demo, initialised from stage 0
  6. export    sama-export of the held-out edits with stage 1's EMA DiT ("trained"), with stage 0's
               ("stage 0 only": zero-shot after factorized pre-training) and with the same DiT
               untrained (same VAE, text encoder and tokenizer)
  7. report    PSNR/SSIM inside and outside the edited region per edit type for the three models,
               "copy through the VAE" (the source encoded and decoded: the ceiling outside the
               region) and "copy the source"; the VAE's reconstruction PSNR on the held-out clips;
               the demo's targets, met or missed and by how much; the wall time of each phase ->
               report.json, report.txt, sheet.png (labelled columns: source | ground truth |
               trained | stage 0 only | untrained, each case's instruction) and index.html
Rerunning continues from what is done: finished phases are skipped and the commands themselves
resume (sama-train from its last checkpoint, sama-export from its finished cases). --quick runs a
few steps of everything (the test of this command).
"""

from __future__ import annotations

import argparse
import html
import json
import os
import shlex
import signal
import subprocess
import sys
import time

import numpy as np

from sama_jax import child_processes, cli, interrupts

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
PRESET = "demo"
PHASES = ("data", "vae", "features", "stage0", "stage1", "export", "report")
EXPORTED = ("trained", "stage0", "untrained")  # DiTs that edit the held-out cases through sama-export
COLUMNS = ("trained", "stage0", "untrained", "copy_vae", "copy")
LABELS = dict(
    trained="trained",
    stage0="stage 0 only",
    untrained="untrained",
    copy_vae="copy through the VAE",
    copy="copy the source",
    source="source",
    target="ground truth",
)
EDIT_TYPES = ("recolour", "replace", "remove", "add", "restyle")
# What the demo must show (on the held-out cases); the report says which are met and by how much.
TARGETS = dict(
    vae_ceiling_db=30.0,  # the VAE's reconstruction PSNR of the held-out clips, every frame
    outside_of_copy_vae_db=2.0,  # outside the region: trained within this of copy-through-VAE
    inside_gain_db=6.0,  # inside: trained beats copy-the-source and untrained by this, per edit type
    inside_overall_db=20.0,  # inside, all edit types: trained at least this
    budget_seconds=900.0,  # the whole command on a quiet 2-core machine, cold compilation cache
)
# Steps of each phase: the full demo, and --quick (the test: the same commands, a few steps).
FULL = dict(vae_steps=800, stage0_steps=200, stage1_steps=600, edit_steps=20, cases=20)
QUICK = dict(vae_steps=4, stage0_steps=2, stage1_steps=2, edit_steps=2, cases=3)
# How every demo (and ablation) export edits: the world's 64x64 frames as they are, the run's prompt
# prefix, one device.
EXPORT_FLAGS = ("--height", "64", "--width", "64", "--exact-size", "--prompt-prefix", "--mesh", "none")
# Precomputed features per stage: stage 0's sources (motion-aligned clips, image-edit sources) and
# prompts (task tokens) are made at train time, so only its targets' features are stored.
STAGE_FEATURES = {
    0: ("target_latents", "semantic"),
    1: ("target_latents", "source_latents", "text", "semantic"),
}


class DemoError(ValueError):
    """A phase's command failed: the demo stops; a rerun continues from the finished phases."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sama-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="runs/demo", help="everything the demo makes (resumable)")
    parser.add_argument("--quick", action="store_true", help="a few steps of every phase")
    add_step_flags(parser, FULL, QUICK)
    return parser


def add_step_flags(parser: argparse.ArgumentParser, full: dict, quick: dict) -> None:
    """--<name> for every step count of `full` (default None: full's, or quick's with --quick)."""
    for name, value in full.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=None,
            help=f"default {value} ({quick[name]} with --quick)",
        )


class Demo:
    def __init__(self, workdir: str, steps: dict, cpu_devices: int, quick: bool = False):
        self.workdir = os.path.abspath(workdir)
        self.steps = steps
        self.quick = quick
        self.cpu_devices = cpu_devices
        self.data_dir = os.path.join(self.workdir, "data", "synthetic")
        self.held_out = os.path.join(self.data_dir, "val", "video_edits.jsonl")
        self.phases_dir = os.path.join(self.workdir, "phases")
        self.prog = "sama-demo"  # the command that runs the phases, in its messages

    # -- bookkeeping ------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

    def config_arg(self, stage: int) -> str:
        return f"--config={CONFIGS}/{('stage0_pretrain', 'stage1_sft')[stage]}.py:{PRESET}"

    def done(self, phase: str) -> dict | None:
        path = os.path.join(self.phases_dir, phase + ".json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def mark(self, phase: str, record: dict) -> None:
        os.makedirs(self.phases_dir, exist_ok=True)
        tmp = os.path.join(self.phases_dir, f".{phase}.json.tmp")
        with open(tmp, "w") as f:
            json.dump(record, f, indent=1)
        os.replace(tmp, os.path.join(self.phases_dir, phase + ".json"))

    def command(self, module: str, *args: str, log: str | None = None) -> None:
        """Runs one of our commands as a user would, printing it first; a failure stops the demo.
        log: a file that takes the command's output (appended) instead of the console."""
        argv = [sys.executable, "-m", module, *args]
        if self.cpu_devices:
            argv.append(f"--cpu-devices={self.cpu_devices}")
        print("+ " + " ".join(shlex.quote(a) for a in argv[2:]), flush=True)
        # One persistent compilation cache for every phase (unless the user set one): stage 1
        # reuses stage 0's compiled train steps, the second export the first's sampling loop,
        # and a rerun of the demo compiles almost nothing.
        env = dict(os.environ)
        env.setdefault("JAX_COMPILATION_CACHE_DIR", self.path("jax_cache"))
        # The phase dies with the demo (a kill -9 leaves no orphan training in the workdir). Ctrl-C
        # reaches the whole process group, so the phase itself stops cleanly (sama-train saves);
        # the demo waits for it, and passes a SIGTERM sent to the demo alone on to it.
        output = open(log, "a") if log else None
        try:
            proc = child_processes.popen(argv, env=env, stdout=output, stderr=output and subprocess.STDOUT)
        finally:
            if output:
                output.close()  # the child holds its own copy
        with interrupts.StopRequest(self.prog, f"waiting for {module} to stop cleanly") as stop:
            passed_on = False
            while proc.poll() is None:
                if stop.signal == signal.SIGTERM and not passed_on:
                    proc.send_signal(signal.SIGTERM)
                    passed_on = True
                time.sleep(0.2)
        rc = proc.returncode
        if stop.requested:
            raise interrupts.Stopped(
                f"{self.prog}: {stop.name} during {module} (exit status {rc}); rerun the same command to "
                f"continue (finished phases are kept)",
                stop.exit_code,
            )
        if rc:
            raise DemoError(
                f"{module} exited with status {rc}{f' (its output: {log})' if log else ''}; fix the cause "
                f"and rerun {self.prog} "
                f"(finished phases are kept)"
            )

    def encoder_paths(self) -> dict:
        return dict(
            vae=self.path("vae"),
            text_encoder=self.path("encoders", "text_encoder"),
            siglip=self.path("encoders", "siglip"),
            tokenizer=os.path.join(self.data_dir, "tokenizer"),
        )

    def train_overrides(self, stage: int, steps: int) -> list[str]:
        # Validation loss and checkpoints a few times per stage, not every 10 steps.
        from sama_jax import config as config_lib

        every = str(max(1, steps // 4))
        features = STAGE_FEATURES[stage]
        config = config_lib.build_config(self.config_arg(stage).removeprefix("--config="))
        return [
            f"--config.data.root={self.workdir}",
            f"--config.data.mixture={self.shard_mixture(config.data.mixture)}",
            f"--config.eval.val_loss.mixture={self.shard_mixture(config.eval.val_loss.mixture)}",
            *(f"--config.model.checkpoints.{k}={v}" for k, v in self.encoder_paths().items()),
            f"--config.data.features={features!r}",
            f"--config.train.steps={steps}",
            f"--config.schedule.warmup_steps={min(50, steps // 5)}",
            f"--config.eval.every_steps={every}",
            f"--config.checkpoint.every_steps={every}",
        ]

    # -- phases -----------------------------------------------------------------------------------
    def data(self) -> dict:
        from sama_jax import config as config_lib
        from sama_jax.data import synthetic

        config = config_lib.build_config(f"{CONFIGS}/stage1_sft.py:{PRESET}")
        counts = synthetic.DEFAULT_COUNTS if self.quick else synthetic.DEMO_COUNTS
        synthetic.ensure_dataset(self.data_dir, min(config.model.text_encoder.vocab_size, 400), counts=counts)
        return dict(train=self.data_dir, held_out=os.path.dirname(self.held_out))

    def vae(self) -> dict:
        self.command(
            "sama_jax.vae_fit",
            self.config_arg(1),
            f"--config.data.root={self.workdir}",
            "--out",
            self.path("vae"),
            "--steps",
            str(self.steps["vae_steps"]),
        )
        with open(self.path("vae", "fit.json")) as f:
            return json.load(f)

    def features(self) -> dict:
        """The random tiny text encoder and SigLIP of the demo, saved once (the same ones every phase
        uses), every manifest's features through sama-precompute, then each manifest with its
        features as a shard dataset (sama-build-shards), which is what training reads."""
        import glob

        from sama_jax import config as config_lib
        from sama_jax import encoders

        config = config_lib.build_config(f"{CONFIGS}/stage1_sft.py:{PRESET}")
        missing = tuple(n for n in ("text_encoder", "siglip") if not os.path.isdir(self.path("encoders", n)))
        if missing:
            encoders.save_generated(self.workdir, encoders.build_random(config, missing), config)
        paths = self.encoder_paths()
        manifests = sorted(glob.glob(os.path.join(self.data_dir, "*.jsonl")))
        manifests += sorted(glob.glob(os.path.join(self.data_dir, "val", "*.jsonl")))
        self.command(
            "sama_jax.precompute",
            self.config_arg(1),
            f"--config.data.root={self.workdir}",
            *(a for k, v in paths.items() for a in (f"--{k.replace('_', '-')}", v)),
            *(a for m in manifests for a in ("--manifest", m)),
        )
        for manifest in manifests:
            self.command(
                "sama_jax.data.build_shards",
                "--manifest",
                manifest,
                "--out",
                self.shards_of(manifest),
                "--features",
                ",".join(STAGE_FEATURES[1]),
            )
        return dict(manifests=manifests, shards=[self.shards_of(m) for m in manifests], **paths)

    def shards_of(self, manifest: str) -> str:
        """The shard dataset sama-build-shards makes of a manifest: data/shards/[val_]<stem>."""
        split = "val_" if os.path.basename(os.path.dirname(manifest)) == "val" else ""
        stem = os.path.splitext(os.path.basename(manifest))[0]
        return self.path("data", "shards", split + stem)

    def shard_mixture(self, mixture) -> str:
        """A config mixture of the generated manifests, as the same mixture of their shard datasets."""
        entries = [
            dict(
                kind=e["kind"],
                shards=self.shards_of(os.path.join(self.workdir, e["manifest"])),
                weight=float(e["weight"]),
            )
            for e in mixture
        ]
        return repr(entries)

    def stage0(self) -> dict:
        self.command(
            "sama_jax.train",
            self.config_arg(0),
            f"--workdir={self.path('stage0')}",
            *self.train_overrides(0, self.steps["stage0_steps"]),
        )
        return dict(workdir=self.path("stage0"), steps=self.steps["stage0_steps"])

    def stage1(self) -> dict:
        self.command(
            "sama_jax.train",
            self.config_arg(1),
            f"--workdir={self.path('stage1')}",
            *self.train_overrides(1, self.steps["stage1_steps"]),
            f"--config.checkpoint.init_from={self.path('stage0')}",
        )
        return dict(workdir=self.path("stage1"), steps=self.steps["stage1_steps"])

    def export(self) -> dict:
        edit = [
            "--benchmark",
            "manifest",
            "--cases",
            self.held_out,
            "--limit",
            str(self.steps["cases"]),
            "--steps",
            str(self.steps["edit_steps"]),
            *EXPORT_FLAGS,
        ]
        for model, run in (("trained", "stage1"), ("stage0", "stage0")):
            self.command(
                "sama_jax.export", *edit, "--out", self.path("export", model), "--run", self.path(run)
            )
        untrained = self.path("untrained_dit")
        if not os.path.isdir(untrained):
            save_untrained_dit(self.path("stage1"), untrained)
        paths = self.encoder_paths()
        self.command(
            "sama_jax.export",
            *edit,
            "--out",
            self.path("export", "untrained"),
            "--dit",
            untrained,
            *(
                a
                for k in ("vae", "text_encoder", "tokenizer")
                for a in (f"--{k.replace('_', '-')}", paths[k])
            ),
            "--dtype",
            "float32",
        )
        return {model: self.path("export", model) for model in EXPORTED}

    def report(self, times: dict) -> dict:
        from sama_jax import scores as scores_lib

        tables, per_case = {}, {}
        for model in EXPORTED:
            with open(self.path("export", model, "scores.json")) as f:
                scored = json.load(f)
            tables[model], per_case[model] = scored["per_edit_type"], scored["per_case"]
        roundtrip = VaeRoundTrip(self.path("vae"))
        rows = {"copy": [], "copy_vae": []}
        per_case["copy"], per_case["copy_vae"] = {}, {}
        clips, recons = [], []
        for case_id, row in per_case["trained"].items():
            source, target = self.case_videos(case_id)
            source = source[: len(target)]
            through_vae = roundtrip(source)
            clips += [source, target]
            recons += [through_vae, roundtrip(target)]
            for model, edit in (("copy", source), ("copy_vae", through_vae)):
                scores = scores_lib.score_edit(edit, target, source)
                rows[model].append((row["edit_type"], scores))
                per_case[model][case_id] = dict(edit_type=row["edit_type"], **scores)
        for model in ("copy", "copy_vae"):
            tables[model] = scores_lib.aggregate(rows[model])
        ceiling = scores_lib.psnr(np.concatenate(recons), np.concatenate(clips))
        fit = self.done("vae") or {}
        report = dict(
            tables=tables,
            per_case=per_case,
            vae_ceiling_psnr=ceiling,
            vae_fit=fit,
            phase_seconds=times,
            total_seconds=round(sum(times.values()), 1),
            steps=self.steps,
        )
        report["targets"] = targets(report)
        with open(self.path("report.json"), "w") as f:
            json.dump(report, f, indent=1)
        text = format_report(report)
        with open(self.path("report.txt"), "w") as f:
            f.write(text + "\n")
        print(text)
        case_ids = list(per_case["trained"])
        self.write_sheet(case_ids)
        self.write_html(case_ids, text)
        return dict(
            report=self.path("report.json"), sheet=self.path("sheet.png"), page=self.path("index.html")
        )

    # -- pictures ---------------------------------------------------------------------------------
    def held_out_samples(self) -> dict:
        from sama_jax.data import manifest as manifest_lib

        return {s["id"]: s for s in manifest_lib.read_manifest(self.held_out)}

    def case_videos(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        from sama_jax.data import manifest as manifest_lib
        from sama_jax.data import video_io

        sample = self.held_out_samples()[case_id]
        read = lambda p: video_io.decode_media(manifest_lib.resolve(self.held_out, p), os.path.splitext(p)[1])
        return read(sample["source"]), read(sample["target"])

    def edited(self, model: str, case_id: str) -> np.ndarray:
        from sama_jax.data import video_io

        return video_io.decode_video(self.path("export", model, case_id + ".mp4"))

    def write_sheet(self, case_ids: list[str], frames: int = 3, scale: int = 2) -> None:
        """Rows of cases under their instruction; columns source | ground truth | trained |
        stage 0 only | untrained, `frames` frames each."""
        from sama_jax import previews
        from sama_jax.data import video_io

        samples = self.held_out_samples()
        columns = ("source", "target", *EXPORTED)
        rows = []
        for case_id in case_ids:
            source, target = self.case_videos(case_id)
            videos = [source, target, *(self.edited(m, case_id) for m in EXPORTED)]
            rows.append((f"{case_id}: {samples[case_id]['text']}", videos))
        sheet = previews.labelled_sheet(rows, [LABELS[c] for c in columns], frames=frames, scale=scale)
        video_io.write_image(self.path("sheet.png"), sheet)

    def write_html(self, case_ids: list[str], table: str) -> None:
        from sama_jax.data import manifest as manifest_lib

        samples = self.held_out_samples()
        rel = lambda p: os.path.relpath(p, self.workdir)
        columns = ("source", "target", *EXPORTED)
        rows = []
        for case_id in case_ids:
            sample = samples[case_id]
            videos = [
                manifest_lib.resolve(self.held_out, sample["source"]),
                manifest_lib.resolve(self.held_out, sample["target"]),
                *(self.path("export", m, case_id + ".mp4") for m in EXPORTED),
            ]
            cells = "".join(
                f'<td><video src="{html.escape(rel(v))}" autoplay loop muted playsinline></video></td>'
                for v in videos
            )
            rows.append(
                f'<tr><td class="case"><b>{html.escape(case_id)}</b><br>{html.escape(sample["text"])}</td>'
                f"{cells}</tr>"
            )
        head = "".join(f"<th>{html.escape(LABELS[c])}</th>" for c in columns)
        page = (
            "<!doctype html><meta charset=utf-8><title>sama-demo</title>"
            "<style>body{font-family:sans-serif;margin:16px}video{width:128px;height:128px;"
            "image-rendering:pixelated}td,th{padding:2px 6px;text-align:center}"
            "td.case{max-width:260px;text-align:left;font-size:13px}pre{font-size:12px}</style>"
            "<h1>sama-demo: held-out synthetic edits</h1>"
            "<p>Each row is a held-out case (its objects use colour-shape pairs never seen in "
            "training): the source, the exact ground truth, and the edits of the trained model "
            "(stage 0 then stage 1), of the stage-0 model alone (zero-shot) and of the untrained DiT.</p>"
            f"<table><tr><th>case and instruction</th>{head}</tr>" + "".join(rows) + "</table>"
            f"<h2>Scores</h2><pre>{html.escape(table)}</pre>"
            "<h2>Contact sheet</h2><img src=sheet.png style='max-width:100%'>"
        )
        with open(self.path("index.html"), "w") as f:
            f.write(page)

    # -- the whole run ----------------------------------------------------------------------------
    def run(self) -> int:
        times = {}
        for phase in PHASES:
            record = self.done(phase)
            if record is not None and phase != "report":
                print(f"sama-demo: {phase} done before ({record['seconds']:.0f} s), skipped")
                times[phase] = record["seconds"]
                continue
            print(f"sama-demo: {phase} ...", flush=True)
            start = time.time()
            result = self.report(times) if phase == "report" else getattr(self, phase)()
            times[phase] = round(time.time() - start, 1)
            self.mark(phase, dict(result, seconds=times[phase]))
        print(f"sama-demo: done in {sum(times.values()):.0f} s of phases; open {self.path('index.html')}")
        return 0


class VaeRoundTrip:
    """uint8 video -> the same video encoded and decoded by a params checkpoint of the Wan VAE."""

    def __init__(self, path: str):
        from flax import nnx

        from sama_jax.data import transforms
        from sama_jax.models import wan_vae

        vae = wan_vae.load_vae(path, precision=dict(compute_dtype="float32", param_dtype="float32"))
        self._run = nnx.jit(lambda vae, x: vae.decode(vae.encode(x)))
        self.vae, self.to_model_range = vae, transforms.to_model_range

    def __call__(self, video: np.ndarray) -> np.ndarray:
        y = np.asarray(self._run(self.vae, self.to_model_range(video[None])))[0]
        return np.clip(np.round((y + 1.0) * 127.5), 0, 255).astype(np.uint8)


def save_untrained_dit(run: str, out: str) -> None:
    """The run's DiT as sama-train initialises it (its config and seed), before any step."""
    from flax import nnx

    from sama_jax import run_dir
    from sama_jax.models import wan_dit

    config = run_dir.read_config(run)
    model = wan_dit.WanDiT(
        wan_dit.WanDiTConfig.from_config(config.model.dit, config.precision), rngs=nnx.Rngs(int(config.seed))
    )
    wan_dit.save_dit(out, model)


def _margin(value: float | None, threshold: float, strict: bool = False) -> dict:
    """A target `value >= threshold` (`>` when strict): met or not, and by how much (value -
    threshold)."""
    if value is None:
        return dict(met=False, margin=None)
    met = value > threshold if strict else value >= threshold
    return dict(met=bool(met), margin=round(float(value - threshold), 2))


def targets(report: dict) -> dict:
    """Every target of the demo (TARGETS) on the held-out cases: {name: {met, margin}}; a margin is
    in dB (seconds for the budget, where negative is under it and so met)."""
    tables = report["tables"]
    out = {"vae_ceiling": _margin(report["vae_ceiling_psnr"], TARGETS["vae_ceiling_db"])}
    for edit_type in (*EDIT_TYPES, "all"):
        if edit_type not in tables["trained"]:
            continue
        get = lambda model, key: tables[model].get(edit_type, {}).get(key)
        trained_in = get("trained", "psnr_in")
        for other in ("copy", "untrained"):
            base = get(other, "psnr_in")
            out[f"{edit_type}: inside beats {other} by {TARGETS['inside_gain_db']:g} dB"] = (
                _margin(trained_in, base + TARGETS["inside_gain_db"])
                if base is not None
                else _margin(None, 0)
            )
        ceiling_out = get("copy_vae", "psnr_out")
        out[
            f"{edit_type}: outside within {TARGETS['outside_of_copy_vae_db']:g} dB of copy through the VAE"
        ] = (
            _margin(get("trained", "psnr_out"), ceiling_out - TARGETS["outside_of_copy_vae_db"])
            if ceiling_out is not None
            else _margin(None, 0)
        )
    all_in = tables["trained"].get("all", {}).get("psnr_in")
    out[f"all: inside at least {TARGETS['inside_overall_db']:g} dB"] = _margin(
        all_in, TARGETS["inside_overall_db"]
    )
    stage0, untrained = (tables[m].get("all", {}).get("psnr_in") for m in ("stage0", "untrained"))
    out["all: stage 0 only beats untrained inside"] = (
        _margin(stage0, untrained, strict=True) if untrained is not None else _margin(None, 0)
    )
    seconds = report["total_seconds"]
    out[f"whole command within {TARGETS['budget_seconds']:.0f} s"] = dict(
        met=seconds <= TARGETS["budget_seconds"], margin=round(seconds - TARGETS["budget_seconds"], 1)
    )
    return out


def format_report(report: dict) -> str:
    tables = report["tables"]
    types = [t for t in (*EDIT_TYPES, "all") if t in tables["trained"]]
    names = [LABELS[m] for m in COLUMNS]
    width = max(map(len, names))
    lines = ["PSNR dB / SSIM of the held-out edits against their ground truth"]
    for where, title in (("in", "inside the edited region"), ("out", "outside the edited region")):
        head = f"{title:<26} {'cases':>5} | " + " | ".join(f"{n:>{width}}" for n in names)
        lines += ["", head, "-" * len(head)]
        for t in types:
            cells = []
            for m in COLUMNS:
                row = tables[m].get(t, {})
                p, s = row.get(f"psnr_{where}"), row.get(f"ssim_{where}")
                cell = f"{p:6.2f} / {s:5.3f}" if p is not None and s is not None else "-"
                cells.append(f"{cell:>{width}}")
            lines.append(f"{t:<26} {tables['trained'][t]['cases']:>5} | " + " | ".join(cells))
    lines.append("")
    if report.get("vae_ceiling_psnr") is not None:
        lines.append(
            f"VAE reconstruction PSNR of the held-out clips, every frame (the ceiling of any edit): "
            f"{report['vae_ceiling_psnr']:.2f} dB"
        )
    lines.append(
        "phase seconds: "
        + ", ".join(f"{k} {v:.0f}" for k, v in report["phase_seconds"].items())
        + f"; total {report['total_seconds']:.0f}"
    )
    met = [k for k, v in report["targets"].items() if v["met"]]
    lines.append(f"targets met: {len(met)} of {len(report['targets'])}")
    for name, v in report["targets"].items():
        margin = "n/a" if v["margin"] is None else f"{v['margin']:+.2f}"
        lines.append(f"  [{'met' if v['met'] else 'MISSED'}] {name} (margin {margin})")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def run(_, args):
        base = QUICK if args.quick else FULL
        steps = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
        try:
            return Demo(args.workdir, steps, args.cpu_devices, quick=args.quick).run()
        except interrupts.Stopped as stopped:
            print(stopped, file=sys.stderr)
            return stopped.exit_code

    return cli.run("sama-demo", lambda: run(*cli.parse(build_parser(), argv, config=False)))


if __name__ == "__main__":
    sys.exit(main())
