"""sama-ablate: SAMA's ablation at toy scale - baseline / +SA / +MA / full, over seeds.

    sama-ablate --workdir runs/ablate [--seeds 3] [--quick] [--config.KEY=VALUE ...]
    sama-ablate --workdir runs/ablate --demo-workdir runs/demo     # reuse a finished sama-demo

The four arms differ in two switches and nothing else:
    baseline  train.semantic_anchoring=False, data.motion_alignment=False (stage 0's raw clips are
              plain text-to-video, no pretext source)
    +SA       semantic anchoring on;  +MA  the motion-alignment pretext in stage 0;  full  both
Every arm and seed runs the real commands, as sama-demo does: sama-train stage 0, sama-train stage 1
from it, then sama-export of the cases with stage 1's EMA DiT and with stage 0's (zero-shot), and
per seed once with the untrained DiT. Data, steps, model and seeds (--config.seed) are the same in
every arm; any --config.KEY=VALUE goes to every sama-train command, so other keys ablate the same way.

The world is sama-demo's: its data, VAE and features phases run in --workdir (a workdir sama-demo
finished already has them), or come read-only from --demo-workdir; one VAE fit serves every arm.
The cases: the held-out split's video edits (colour-shape pairs never seen in training) and a
fast-motion split (sama_jax.data.synthetic.ensure_fast_split: objects at 2-3x the fastest training
speed), one sama-export per model. The report (ablation_report.py) -> WORKDIR/ablation/report.json,
report.txt, curves.png (validation loss, a band of one std over seeds) and index.html.

Rerunning continues from what is done: finished runs are skipped, and sama-train / sama-export
resume their own work. Ctrl-C stops the running command cleanly (sama-train saves), then exits.
Each command's output goes to a log beside its run (named when it fails); the console shows the
commands and the progress with an ETA measured on runs that compiled nothing new.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time

from sama_jax import ablation_report, cli, interrupts, progress
from sama_jax import config as config_lib
from sama_jax import demo as demo_lib

# arm -> (train.semantic_anchoring, data.motion_alignment of stage 0), in the paper's order
ARMS = {"baseline": (False, False), "+SA": (True, False), "+MA": (False, True), "full": (True, True)}
assert tuple(ARMS) == tuple(ablation_report.PAPER)
ARM_DIRS = {"baseline": "baseline", "+SA": "sa", "+MA": "ma", "full": "full"}
# Config keys the ablation sets itself, and what to use instead.
OWN_KEYS = {
    "train.semantic_anchoring": "the arms set it",
    "data.motion_alignment": "the arms set it",
    "seed": "use --seeds",
    "train.steps": "use --stage0-steps / --stage1-steps",
    "checkpoint.init_from": "stage 1 starts from the arm's stage 0",
}
# The defaults fit the 60-minute budget on a quiet 2-core machine (the shared phases ~15 minutes).
FULL = dict(seeds=3, stage0_steps=100, stage1_steps=300, edit_steps=12, cases=12, fast_cases=12)
QUICK = dict(seeds=1, stage0_steps=2, stage1_steps=2, edit_steps=2, cases=2, fast_cases=2)
EVALS_PER_STAGE = 5  # validation-loss points of each stage (the curves' steps)
FAST_PREFIX = ablation_report.FAST_PREFIX  # case ids of the fast-motion split in the cases manifest


class AblationError(ValueError):
    """Bad flags, or a command that failed (a rerun continues from the finished runs)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sama-ablate", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="runs/ablate", help="everything the ablation makes (resumable)")
    parser.add_argument(
        "--demo-workdir", default="", help="a finished sama-demo's workdir: its data, VAE and features"
    )
    parser.add_argument("--quick", action="store_true", help="a few steps of every arm, one seed")
    demo_lib.add_step_flags(parser, FULL, QUICK)
    return parser


class Ablation:
    def __init__(self, workdir: str, settings: dict, overrides: list, cpu_devices: int, world: str = ""):
        self.settings, self.overrides = settings, [list(o) for o in overrides]
        self.quick = settings["quick"]
        # The runner: every command of the ablation, its compilation cache in --workdir. The world:
        # data, VAE and features (the same Demo when they live in --workdir).
        steps = demo_lib.QUICK if self.quick else demo_lib.FULL
        self.runner = demo_lib.Demo(workdir, steps, cpu_devices, quick=self.quick)
        self.runner.prog = "sama-ablate"
        self.world = self.runner if not world else demo_lib.Demo(world, {}, cpu_devices)
        self.root = self.runner.path("ablation")
        self.timings: dict[str, list[float]] = {}  # timing_key -> seconds of runs that compiled nothing
        self.compiled: set[str] = set()  # timing keys of the runs so far
        self.cold: dict[str, float] = {}  # timing_key -> seconds of its first run (it compiled)

    # -- bookkeeping ------------------------------------------------------------------------------
    def path(self, *parts: str) -> str:
        return os.path.join(self.root, *parts)

    def run_dir(self, arm: str, seed: int, *parts: str) -> str:
        return self.path(ARM_DIRS[arm], f"seed{seed}", *parts)

    def done(self, unit: str) -> dict | None:
        path = self.path("phases", unit + ".json")
        if not os.path.exists(path):
            return None
        with open(path) as f:
            return json.load(f)

    def mark(self, unit: str, record: dict) -> None:
        write_json(self.path("phases", unit + ".json"), record)

    def check_settings(self) -> None:
        """A workdir keeps the settings it started with (steps, cases, overrides): a rerun with others
        would mix runs. More seeds may be added later."""
        path = self.path("settings.json")
        mine = dict(self.settings, overrides=self.overrides)
        mine.pop("seeds")
        if os.path.exists(path):
            with open(path) as f:
                old = json.load(f)
            changed = sorted(k for k in set(old) | set(mine) if old.get(k) != mine.get(k))
            if changed:
                raise AblationError(
                    f"{self.root} holds an ablation with other settings ({', '.join(changed)}: "
                    f"{', '.join(f'{k}={old.get(k)!r}' for k in changed)}); use another --workdir"
                )
        else:
            write_json(path, mine)

    # -- the world --------------------------------------------------------------------------------
    def prepare_world(self) -> None:
        if self.world is not self.runner:
            missing = [p for p in ("data", "vae", "features") if self.world.done(p) is None]
            if missing:
                raise AblationError(
                    f"--demo-workdir={self.world.workdir}: sama-demo has not finished its "
                    f"{', '.join(missing)} phase(s) there; run sama-demo first or leave --demo-workdir out"
                )
        else:
            for phase in ("data", "vae", "features"):
                record = self.world.done(phase)
                if record is not None:
                    print(f"sama-ablate: {phase} done before ({record['seconds']:.0f} s), skipped")
                    continue
                print(f"sama-ablate: {phase} (sama-demo's phase) ...", flush=True)
                start = time.time()
                result = getattr(self.world, phase)()
                self.world.mark(phase, dict(result, seconds=round(time.time() - start, 1)))
        self.write_cases()

    def write_cases(self) -> None:
        """One manifest of every case: the first `cases` held-out video edits, then the first
        `fast_cases` of the fast-motion split (ids prefixed FAST_PREFIX), media paths absolute."""
        from sama_jax.data import manifest as manifest_lib
        from sama_jax.data import synthetic

        path = self.path("cases.jsonl")
        if os.path.exists(path):
            return
        fast = synthetic.ensure_fast_split(
            self.runner.path("data", "fast_motion"), self.settings["fast_cases"]
        )
        rows = []
        for manifest, prefix, count in (
            (self.world.held_out, "", self.settings["cases"]),
            (fast, FAST_PREFIX, self.settings["fast_cases"]),
        ):
            samples = manifest_lib.read_manifest(manifest)
            if len(samples) < count:
                raise AblationError(
                    f"{manifest} has {len(samples)} video edits, fewer than the {count} asked"
                )
            for sample in samples[:count]:
                rows.append(
                    dict(
                        sample,
                        id=prefix + sample["id"],
                        source=manifest_lib.resolve(manifest, sample["source"]),
                        target=manifest_lib.resolve(manifest, sample["target"]),
                    )
                )
        manifest_lib.write_manifest(path, rows)

    # -- one arm and seed -------------------------------------------------------------------------
    def train_args(self, arm: str, seed: int, stage: int) -> list[str]:
        semantic, motion = ARMS[arm]
        steps = self.settings[f"stage{stage}_steps"]
        return [
            self.world.config_arg(stage),
            f"--workdir={self.run_dir(arm, seed, f'stage{stage}')}",
            *self.world.train_overrides(stage, steps),
            f"--config.eval.every_steps={max(1, steps // EVALS_PER_STAGE)}",
            "--config.train.log_every=1",  # every step's loss: the variance over stage 1's last half
            f"--config.seed={seed}",
            f"--config.train.semantic_anchoring={semantic}",
            *([f"--config.data.motion_alignment={motion}"] if stage == 0 else []),
            *(f"--config.{k}={v}" for k, v in self.overrides),
        ]

    def export_args(self, out: str) -> list[str]:
        return [
            "--benchmark",
            "manifest",
            "--cases",
            self.path("cases.jsonl"),
            "--steps",
            str(self.settings["edit_steps"]),
            *demo_lib.EXPORT_FLAGS,
            "--allow-outside-media-root",  # the cases name media of two splits by absolute paths
            "--out",
            out,
        ]

    def units(self, seeds: int) -> list[tuple[str, str, int]]:
        """(unit, arm, seed) in order; seeds outermost, so a stopped ablation has whole seeds."""
        out = []
        for seed in range(seeds):
            for arm in ARMS:
                out += [
                    (f"{ARM_DIRS[arm]}.seed{seed}.{u}", arm, seed) for u in ("stage0", "stage1", "export")
                ]
            out.append((f"untrained.seed{seed}.export", "", seed))
        return out

    def run_unit(self, unit: str, arm: str, seed: int) -> dict:
        kind = unit.rsplit(".", 1)[1]
        if not arm:  # the untrained DiT of this seed (the baseline's config: the same architecture)
            out = self.path("untrained", f"seed{seed}")
            dit = os.path.join(out, "dit")
            if not os.path.isdir(dit):
                demo_lib.save_untrained_dit(self.run_dir("baseline", seed, "stage1"), dit)
            paths = self.world.encoder_paths()
            models = ["--dit", dit, "--dtype", "float32"]
            models += [
                a
                for k in ("vae", "text_encoder", "tokenizer")
                for a in (f"--{k.replace('_', '-')}", paths[k])
            ]
            self.command("sama_jax.export", *self.export_args(os.path.join(out, "export")), *models, out=out)
            return dict(export=os.path.join(out, "export"))
        if kind.startswith("stage"):
            stage = int(kind[-1])
            args = self.train_args(arm, seed, stage)
            if stage == 1:
                args.append(f"--config.checkpoint.init_from={self.run_dir(arm, seed, 'stage0')}")
            self.command("sama_jax.train", *args, out=self.run_dir(arm, seed))
            return dict(workdir=self.run_dir(arm, seed, kind))
        exports = {}
        for model, run in (("stage1", "stage1"), ("stage0", "stage0")):
            exports[model] = self.run_dir(arm, seed, f"export_{model}")
            run_args = ["--run", self.run_dir(arm, seed, run)]
            self.command(
                "sama_jax.export", *self.export_args(exports[model]), *run_args, out=self.run_dir(arm, seed)
            )
        return exports

    def command(self, module: str, *args: str, out: str) -> None:
        os.makedirs(out, exist_ok=True)
        log = os.path.join(out, "log.txt")
        try:
            self.runner.command(module, *args, log=log)
        except demo_lib.DemoError as e:
            with open(log) as f:
                tail = f.read().splitlines()[-15:]
            print("\n".join(f"  | {line}" for line in tail), file=sys.stderr)
            raise AblationError(str(e)) from None

    # -- the whole run ----------------------------------------------------------------------------
    def run(self) -> int:
        self.check_settings()
        self.prepare_world()
        units = self.units(self.settings["seeds"])
        started = time.time()
        for number, (unit, arm, seed) in enumerate(units, 1):
            record = self.done(unit)
            if record is not None:
                continue
            print(f"sama-ablate: [{number}/{len(units)}] {unit} ...", flush=True)
            start = time.time()
            result = self.run_unit(unit, arm, seed)
            seconds = round(time.time() - start, 1)
            self.mark(unit, dict(result, seconds=seconds))
            # A run whose programs an earlier run compiled (the persistent cache holds them) times
            # the work alone: those give the ETA.
            key = self.timing_key(unit, arm)
            if key in self.compiled:
                self.timings.setdefault(key, []).append(seconds)
            else:
                self.cold.setdefault(key, seconds)
            self.compiled.add(key)
            print(f"sama-ablate: [{number}/{len(units)}] {unit} done in {progress.duration(seconds)}; "
                  f"{self.eta(units[number:])}", flush=True)  # fmt: skip
        ablation_report.write(self)
        print(
            f"sama-ablate: done ({progress.duration(time.time() - started)} this time); "
            f"open {self.path('index.html')}"
        )
        return 0

    @staticmethod
    def timing_key(unit: str, arm: str) -> str:
        """Runs with the same key run the same compiled programs: a stage's depend on semantic
        anchoring (its tokens and loss), an export's on nothing that differs between the arms."""
        kind = unit.rsplit(".", 1)[1]
        if not arm:
            return kind + " (untrained)"  # one export, not two
        return kind + ("+SA" if kind.startswith("stage") and ARMS[arm][0] else "")

    def eta(self, left: list) -> str:
        keys = [self.timing_key(u, arm) for u, arm, _ in left if not self.done(u)]
        if not keys:
            return "the report is next"
        if any(k not in self.timings and k not in self.cold for k in keys):
            return "ETA once each kind of run has run"
        warm = {k: sum(v) / len(v) for k, v in self.timings.items()}
        seconds = sum(warm.get(k, self.cold.get(k, 0.0)) for k in keys)
        bound = any(k not in warm for k in keys)
        return f"{len(keys)} runs left, ETA {'at most ' if bound else ''}{progress.duration(seconds)}" + (
            " (some runs timed with their compilation)" if bound else ""
        )


def write_json(path: str, record) -> None:
    """Atomically: a reader sees the old file or the new one, never half of one."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = os.path.join(os.path.dirname(path), "." + os.path.basename(path) + ".tmp")
    with open(tmp, "w") as f:
        json.dump(record, f, indent=1)
    os.replace(tmp, path)


def check_overrides(overrides: list) -> None:
    """Every override applies to both stages' demo configs; the arms' own keys are refused."""
    for key, _ in overrides:
        if key in OWN_KEYS:
            raise AblationError(f"--config.{key}: the ablation sets it itself ({OWN_KEYS[key]})")
    for name in ("stage0_pretrain", "stage1_sft"):
        config_lib.build_config(f"{demo_lib.CONFIGS}/{name}.py:{demo_lib.PRESET}", overrides)


def main(argv: list[str] | None = None) -> int:
    def run():
        argv_ = list(sys.argv[1:] if argv is None else argv)
        _, overrides, rest = config_lib.split_config_args(argv_)
        _, args = cli.parse(build_parser(), rest, config=False)
        base = QUICK if args.quick else FULL
        settings = {k: (getattr(args, k) if getattr(args, k) is not None else v) for k, v in base.items()}
        for name, value in settings.items():
            if value < 1:
                raise AblationError(f"--{name.replace('_', '-')}={value}: give at least 1")
        if args.demo_workdir and not os.path.isdir(args.demo_workdir):
            raise AblationError(f"--demo-workdir={args.demo_workdir} is not a directory")
        check_overrides(overrides)
        settings["quick"] = args.quick
        # The world the runs trained on: a rerun on another one would mix them.
        settings["world"] = os.path.abspath(args.demo_workdir or args.workdir)
        ablation = Ablation(args.workdir, settings, overrides, args.cpu_devices, args.demo_workdir)
        try:
            return ablation.run()
        except interrupts.Stopped as stopped:
            print(stopped, file=sys.stderr)
            return stopped.exit_code

    return cli.run("sama-ablate", run)


if __name__ == "__main__":
    sys.exit(main())
