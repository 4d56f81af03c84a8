"""sama-demo: the whole product on the embedded default, on a CPU, in minutes.

    sama-demo --workdir runs/demo [--cpu-devices=8] [--quick]

Runs the real commands, one after the other, each printed before it runs:
  1. data     the synthetic moving-shapes dataset (training split, and a held-out split whose
              objects use (colour, shape) pairs never seen in training) and its tokenizer
  2. vae      sama-fit-vae: the tiny Wan VAE fitted on the training frames (a random VAE cannot
              reconstruct frames, so nothing decoded through it could be scored)
  3. stage0   sama-train --config=configs/stage0_pretrain.py:tiny (image edits + motion-aligned clips)
  4. stage1   sama-train --config=configs/stage1_sft.py:tiny, initialised from stage 0; its
              evaluations also edit held-out cases (scores and pictures in TensorBoard:
              tensorboard --logdir WORKDIR/stage1)
  5. export   sama-export of the held-out edits with the trained run's EMA DiT, and with the same
              DiT untrained (same VAE, text encoder and tokenizer)
  6. report   PSNR/SSIM inside and outside the edited region per edit type for the trained model,
              the untrained model and "copy the source"; the VAE's own reconstruction PSNR (the
              ceiling); the wall time of each phase -> report.json, report.txt, sheet.png (source |
              ground truth | trained | untrained, a few frames per case) and index.html (the videos
              side by side)
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
import subprocess
import sys
import time

import numpy as np

from sama_jax import cli

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
PHASES = ("data", "vae", "stage0", "stage1", "export", "report")
MODELS = ("trained", "untrained", "copy")
EDIT_TYPES = ("recolour", "replace", "remove", "add", "restyle")
# Steps of each phase: the full demo, and --quick (the test: the same commands, a few steps).
# eval_cases: held-out edits that stage 1's edit_scores evaluator scores at each evaluation (the
# first two also go to TensorBoard as pictures).
FULL = dict(vae_steps=150, stage0_steps=60, stage1_steps=150, edit_steps=20, cases=20, eval_cases=4)
QUICK = dict(vae_steps=4, stage0_steps=2, stage1_steps=2, edit_steps=2, cases=3, eval_cases=1)


class DemoError(ValueError):
    """A phase's command failed: the demo stops; a rerun continues from the finished phases."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sama-demo", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="runs/demo", help="everything the demo makes (resumable)")
    parser.add_argument("--quick", action="store_true", help="a few steps of every phase")
    for name, value in FULL.items():
        parser.add_argument(
            "--" + name.replace("_", "-"),
            type=int,
            default=None,
            help=f"default {value} ({QUICK[name]} with --quick)",
        )
    return parser


class Demo:
    def __init__(self, workdir: str, steps: dict, cpu_devices: int):
        self.workdir = os.path.abspath(workdir)
        self.steps = steps
        self.cpu_devices = cpu_devices
        self.data_dir = os.path.join(self.workdir, "data", "synthetic")
        self.held_out = os.path.join(self.data_dir, "val", "video_edits.jsonl")
        self.phases_dir = os.path.join(self.workdir, "phases")

    # -- bookkeeping ------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return os.path.join(self.workdir, *parts)

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

    def command(self, module: str, *args: str) -> None:
        """Runs one of our commands as a user would, printing it first; a failure stops the demo."""
        argv = [sys.executable, "-m", module, *args]
        if self.cpu_devices:
            argv.append(f"--cpu-devices={self.cpu_devices}")
        print("+ " + " ".join(shlex.quote(a) for a in argv[2:]), flush=True)
        # One persistent compilation cache for every phase (unless the user set one): stage 1
        # reuses stage 0's compiled train steps, the second export the first's sampling loop,
        # and a rerun of the demo compiles almost nothing.
        env = dict(os.environ)
        env.setdefault("JAX_COMPILATION_CACHE_DIR", self.path("jax_cache"))
        rc = subprocess.call(argv, env=env)
        if rc:
            raise DemoError(
                f"{module} exited with status {rc}; fix the cause and rerun sama-demo "
                f"(finished phases are kept)"
            )

    def common_overrides(self, steps: int) -> list[str]:
        # Validation loss and checkpoints a few times per stage, not every 10 steps.
        every = str(max(1, steps // 3))
        return [
            f"--config.data.root={self.workdir}",
            f"--config.model.checkpoints.vae={self.path('vae')}",
            f"--config.train.steps={steps}",
            f"--config.eval.every_steps={every}",
            f"--config.checkpoint.every_steps={every}",
        ]

    # -- phases -----------------------------------------------------------------------------------
    def data(self) -> dict:
        from sama_jax import config as config_lib
        from sama_jax.data import synthetic

        config = config_lib.build_config(f"{CONFIGS}/stage1_sft.py:tiny")
        synthetic.ensure_dataset(self.data_dir, min(config.model.text_encoder.vocab_size, 400))
        return dict(train=self.data_dir, held_out=os.path.dirname(self.held_out))

    def vae(self) -> dict:
        self.command(
            "sama_jax.vae_fit",
            f"--config={CONFIGS}/stage1_sft.py:tiny",
            f"--config.data.root={self.workdir}",
            "--out",
            self.path("vae"),
            "--steps",
            str(self.steps["vae_steps"]),
        )
        with open(self.path("vae", "fit.json")) as f:
            return json.load(f)

    def stage0(self) -> dict:
        self.command(
            "sama_jax.train",
            f"--config={CONFIGS}/stage0_pretrain.py:tiny",
            f"--workdir={self.path('stage0')}",
            *self.common_overrides(self.steps["stage0_steps"]),
        )
        return dict(workdir=self.path("stage0"), steps=self.steps["stage0_steps"])

    def stage1(self) -> dict:
        self.command(
            "sama_jax.train",
            f"--config={CONFIGS}/stage1_sft.py:tiny",
            f"--workdir={self.path('stage1')}",
            *self.common_overrides(self.steps["stage1_steps"]),
            f"--config.checkpoint.init_from={self.path('stage0')}",
            "--config.eval.evaluators=('val_loss', 'edit_scores')",
            f"--config.eval.num_steps={self.steps['edit_steps']}",
            f"--config.eval.edit_scores.num_cases={self.steps['eval_cases']}",
            f"--config.eval.edit_scores.sample_images={min(2, self.steps['eval_cases'])}",
        )
        return dict(workdir=self.path("stage1"), steps=self.steps["stage1_steps"])

    def export(self) -> dict:
        from sama_jax import run_dir

        edit = [
            "--benchmark",
            "manifest",
            "--cases",
            self.held_out,
            "--limit",
            str(self.steps["cases"]),
            "--steps",
            str(self.steps["edit_steps"]),
            "--height",
            "64",
            "--width",
            "64",
            "--exact-size",
            "--prompt-prefix",
            "--mesh",
            "none",
        ]
        self.command(
            "sama_jax.export", *edit, "--out", self.path("export", "trained"), "--run", self.path("stage1")
        )
        untrained = self.path("untrained_dit")
        paths = run_dir.read_encoder_paths(self.path("stage1"))
        if not os.path.isdir(untrained):
            save_untrained_dit(self.path("stage1"), untrained)
        self.command(
            "sama_jax.export",
            *edit,
            "--out",
            self.path("export", "untrained"),
            "--dit",
            untrained,
            "--vae",
            paths["vae"],
            "--text-encoder",
            paths["text_encoder"],
            "--tokenizer",
            paths["tokenizer"],
            "--dtype",
            "float32",
        )
        return dict(trained=self.path("export", "trained"), untrained=self.path("export", "untrained"))

    def report(self, times: dict) -> dict:
        from sama_jax import scores as scores_lib

        tables, per_case = {}, {}
        for model in ("trained", "untrained"):
            with open(self.path("export", model, "scores.json")) as f:
                scored = json.load(f)
            tables[model], per_case[model] = scored["per_edit_type"], scored["per_case"]
        copy_rows, copy_cases = [], {}
        for case_id, row in per_case["trained"].items():
            source, target = self.case_videos(case_id)
            scores = scores_lib.score_edit(source[: len(target)], target, source)
            copy_rows.append((row["edit_type"], scores))
            copy_cases[case_id] = dict(edit_type=row["edit_type"], **scores)
        tables["copy"], per_case["copy"] = scores_lib.aggregate(copy_rows), copy_cases
        vae = self.done("vae") or {}
        report = dict(
            tables=tables,
            per_case=per_case,
            vae_ceiling_psnr=vae.get("psnr_held_out"),
            phase_seconds=times,
            steps=self.steps,
            targets=targets_met(tables),
        )
        with open(self.path("report.json"), "w") as f:
            json.dump(report, f, indent=1)
        text = format_table(report)
        with open(self.path("report.txt"), "w") as f:
            f.write(text + "\n")
        print(text)
        self.write_sheet(list(per_case["trained"]))
        self.write_html(list(per_case["trained"]), text)
        return dict(
            report=self.path("report.json"), sheet=self.path("sheet.png"), page=self.path("index.html")
        )

    # -- pictures ---------------------------------------------------------------------------------
    def case_videos(self, case_id: str) -> tuple[np.ndarray, np.ndarray]:
        from sama_jax.data import manifest as manifest_lib
        from sama_jax.data import video_io

        for sample in manifest_lib.read_manifest(self.held_out):
            if sample["id"] == case_id:
                read = lambda p: video_io.decode_media(
                    manifest_lib.resolve(self.held_out, p), os.path.splitext(p)[1]
                )
                return read(sample["source"]), read(sample["target"])
        raise KeyError(case_id)

    def edited(self, model: str, case_id: str) -> np.ndarray:
        from sama_jax.data import video_io

        return video_io.decode_video(self.path("export", model, case_id + ".mp4"))

    def write_sheet(self, case_ids: list[str], frames: int = 3) -> None:
        from sama_jax.data import video_io

        rows = []
        for case_id in case_ids:
            source, target = self.case_videos(case_id)
            videos = [source, target, self.edited("trained", case_id), self.edited("untrained", case_id)]
            picks = np.linspace(0, min(len(v) for v in videos) - 1, frames).round().astype(int)
            h, w = target.shape[1:3]
            gap = np.full((h, 4, 3), 255, np.uint8)
            row = []
            for video in videos:
                row += [np.concatenate([video[i, :h, :w] for i in picks], axis=1), gap]
            rows.append(np.concatenate(row[:-1], axis=1))
            rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
        video_io.write_image(self.path("sheet.png"), np.concatenate(rows[:-1], axis=0))

    def write_html(self, case_ids: list[str], table: str) -> None:
        from sama_jax.data import manifest as manifest_lib

        samples = {s["id"]: s for s in manifest_lib.read_manifest(self.held_out)}
        rel = lambda p: os.path.relpath(p, self.workdir)
        rows = []
        for case_id in case_ids:
            sample = samples[case_id]
            videos = [
                manifest_lib.resolve(self.held_out, sample["source"]),
                manifest_lib.resolve(self.held_out, sample["target"]),
                self.path("export", "trained", case_id + ".mp4"),
                self.path("export", "untrained", case_id + ".mp4"),
            ]
            cells = "".join(
                f'<td><video src="{html.escape(rel(v))}" autoplay loop muted width="192"></video></td>'
                for v in videos
            )
            rows.append(f"<tr><td>{html.escape(case_id)}<br>{html.escape(sample['text'])}</td>{cells}</tr>")
        page = (
            "<!doctype html><meta charset=utf-8><title>sama-demo</title>"
            "<h1>sama-demo: held-out synthetic edits</h1>"
            f"<pre>{html.escape(table)}</pre><img src=sheet.png style='max-width:100%'>"
            "<table><tr><th>case</th><th>source</th><th>ground truth</th><th>trained</th>"
            "<th>untrained</th></tr>" + "".join(rows) + "</table>"
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


def targets_met(tables: dict) -> dict:
    """The demo's targets per edit type: inside the edited region the trained model beats copying
    the source and the untrained model (PSNR); outside it, it is within 3 dB of copying."""
    out = {}
    for edit_type in tables["trained"]:
        t, u, c = (tables[m].get(edit_type, {}) for m in MODELS)
        if "psnr_in" not in t:
            continue
        out[edit_type] = dict(
            beats_copy_inside=t["psnr_in"] > c.get("psnr_in", float("inf")),
            beats_untrained_inside=t["psnr_in"] > u.get("psnr_in", float("inf")),
            outside_within_3db_of_copy=t.get("psnr_out", 0) >= c.get("psnr_out", 0) - 3.0,
        )
    return out


def format_table(report: dict) -> str:
    tables = report["tables"]
    types = [t for t in (*EDIT_TYPES, "all") if t in tables["trained"]]
    head = (
        f"{'edit type':<10} {'cases':>5} | "
        + " | ".join(f"{m + ' in':>16}" for m in MODELS)
        + " | "
        + " | ".join(f"{m + ' out':>16}" for m in MODELS)
    )
    lines = ["PSNR dB / SSIM, inside and outside the edited region (held-out cases)", head, "-" * len(head)]
    for t in types:
        cells = []
        for where in ("in", "out"):
            for m in MODELS:
                row = tables[m].get(t, {})
                p, s = row.get(f"psnr_{where}"), row.get(f"ssim_{where}")
                cells.append(f"{p:7.2f} / {s:6.3f}" if p is not None and s is not None else f"{'-':>16}")
        lines.append(f"{t:<10} {tables['trained'][t]['cases']:>5} | " + " | ".join(cells))
    if report.get("vae_ceiling_psnr") is not None:
        lines.append(
            f"VAE reconstruction PSNR (the ceiling of any edit): {report['vae_ceiling_psnr']:.2f} dB"
        )
    lines.append("phase seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in report["phase_seconds"].items()))
    missed = [f"{t}: {k}" for t, flags in report["targets"].items() for k, ok in flags.items() if not ok]
    lines.append("targets: all met" if not missed else "targets missed: " + "; ".join(missed))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    def run(_, args):
        base = QUICK if args.quick else FULL
        steps = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
        return Demo(args.workdir, steps, args.cpu_devices).run()

    return cli.run("sama-demo", lambda: run(*cli.parse(build_parser(), argv, config=False)))


if __name__ == "__main__":
    sys.exit(main())
