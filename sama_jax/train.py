"""sama-train: both SAMA stages from one train loop, sharded over the (data, fsdp, context, tensor) mesh.

  sama-train --config=configs/stage1_sft.py:tiny --workdir=runs/tiny --cpu-devices=8
  sama-train --config=configs/stage0_pretrain.py:wan_14b --workdir=DIR \\
      --config.checkpoint.init_from=ckpt/wan2.1_t2v_14b_dit --config.model.checkpoints.vae=ckpt/vae \\
      --config.model.checkpoints.text_encoder=ckpt/umt5 --config.model.checkpoints.siglip=ckpt/siglip \\
      --config.model.checkpoints.tokenizer=ckpt/google/umt5-xxl
  (a GPU/CPU cluster: add --coordinator-address=HOST:PORT --num-processes=N --process-id=I on each
  process; on a TPU pod every worker runs the same command: launch/tpu_run.sh)

Rerunning the same command continues the run from its latest checkpoint (parameters, optimizer, EMA,
RNG and data position), exactly as if it had not stopped; a workdir of another config is refused
(--allow-config-change), as is a workdir another sama-train holds (WORKDIR/.lock). Ctrl-C or SIGTERM
saves the step it stopped at and exits (130 / 0); a second Ctrl-C exits at once. A newest checkpoint
that does not restore is moved aside and the newest good one resumed (--resume-step N: that step).
The tiny preset generates
its dataset, tokenizer and random frozen encoders (saved into the workdir) when absent. The workdir
layout is in sama_jax/run_dir.py; metrics go to TensorBoard events in the workdir and the console.
"""

from __future__ import annotations

import argparse
import faulthandler
import json
import os
import signal
import sys
import time
from typing import Any, Callable, NamedTuple

from sama_jax import cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sama-train", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--workdir", default="", help="the run directory (default: config.workdir)")
    parser.add_argument(
        "--allow-config-change",
        action="store_true",
        help="continue a run whose workdir holds a different config",
    )
    parser.add_argument(
        "--coordinator-address", default="", help="HOST:PORT of process 0, for multi-process runs off TPU"
    )
    parser.add_argument(
        "--resume-step",
        type=int,
        default=None,
        metavar="N",
        help="continue from checkpoint step N (later steps are moved aside; default: the newest "
        "step that restores completely)",
    )
    parser.add_argument("--num-processes", type=int, default=1)
    parser.add_argument("--process-id", type=int, default=0)
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli.run("sama-train", lambda: _main(*cli.parse(build_parser(), argv)))


def initialize_distributed(args) -> None:
    """jax.distributed: explicit coordinator flags (GPU/CPU clusters), or automatic on a TPU pod
    (launch/tpu_run.sh sets SAMA_DISTRIBUTED=1; JAX finds the other workers itself)."""
    import jax

    if args.coordinator_address:
        if jax.config.jax_platforms and "cpu" in jax.config.jax_platforms:
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
        jax.distributed.initialize(
            args.coordinator_address, num_processes=args.num_processes, process_id=args.process_id
        )
    elif os.environ.get("SAMA_DISTRIBUTED") == "1" or "," in os.environ.get("TPU_WORKER_HOSTNAMES", ""):
        jax.distributed.initialize()


def _main(config, args) -> int:
    # `kill -USR1 PID` prints every thread's stack (a hung multi-process run shows where it waits).
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    initialize_distributed(args)

    import jax
    from clu import metric_writers

    from sama_jax import checkpointing, conditioning, encoders, evaluators, interrupts, run_dir, sharding
    from sama_jax.data import pipeline
    from sama_jax.lora_train import Exporter
    from sama_jax.step_clock import StepClock

    started = time.time()
    workdir = config.workdir = os.path.abspath(args.workdir or config.workdir)
    primary = jax.process_index() == 0

    def say(message: str) -> None:
        if primary:
            print(f"sama-train [{time.time() - started:6.1f}s] {message}", flush=True)

    # -- Checks, mesh and the workdir ------------------------------------------------------------
    # The workdir lock is held until the process exits, however it exits.
    mesh, rules, workdir_lock = check_config_and_mesh(config, args.allow_config_change, say)  # noqa: F841

    # -- Frozen encoders, tokenizer and data sources -------------------------------------------
    tokenizer, tokenizer_path = encoders.training_tokenizer(config, workdir)
    # Every data path is checked (and named by its config key) before any model is built.
    sources = pipeline.open_sources(config.data.mixture, root=config.data.root)
    if primary:  # written once every input is checked: a corrected rerun is not "another config"
        run_dir.check_and_write_config(workdir, config, args.allow_config_change)
    frozen = encoders.resolve_for_training(config, workdir, mesh, rules, tokenizer_path, say)

    # -- Model, optimizer and train state ------------------------------------------------------
    model = build_model(config, mesh, rules, frozen, say)
    checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, run_dir.CHECKPOINTS),
        every_steps=int(config.checkpoint.every_steps),
        keep=int(config.checkpoint.keep),
        async_save=bool(config.checkpoint.async_save),
    )
    first_step, state, data_state = restore_or_init(
        config, model, checkpointer, args.resume_step, mesh, rules, say
    )
    say(f"SAMA DiT '{config.model.preset}': {model.num_params:,} parameters, {model.num_trained:,} trained")

    # -- Input ---------------------------------------------------------------------------------
    iterator = iter(build_input(config, sources, frozen))
    if data_state is not None:
        iterator.set_state(data_state)

    # -- Evaluators, metrics and hooks ---------------------------------------------------------
    evals = evaluators.build(config, mesh=mesh, rules=rules, encoders=frozen, tokenizer=tokenizer)
    writer = metric_writers.create_default_writer(workdir, just_logging=not primary)
    hooks = progress_hooks(config, writer, first_step, primary)
    ids_log = SampleIdLog(config, workdir)
    config_json = run_dir.config_json(config)  # saved with every checkpoint
    export_lora = Exporter(config, workdir, mesh, checkpointer)  # LoRA runs: WORKDIR/lora/
    total_steps = int(config.train.steps)
    # train.peak_tflops is an accelerator's; a CPU has no such figure, so its runs log no MFU.
    peak = float(config.train.peak_tflops) * 1e12 * jax.device_count()
    clock = StepClock(total_steps, None if jax.default_backend() == "cpu" else peak)
    # Ctrl-C and SIGTERM: the step and any save in flight finish, the state is saved, exit.
    stop = interrupts.StopRequest("sama-train", "stopping after this step and saving it").install()

    # -- Loop ----------------------------------------------------------------------------------
    say(f"training steps {first_step} -> {total_steps}")
    metrics_log = StepMetrics(clock, iterator, writer, config, say)
    step = saved_step = first_step
    while step < total_steps and not metrics_log.stop_reason and not stop.requested:
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            batch = next(iterator, None)
            if batch is None:
                metrics_log.stop_reason = "the data ran out"
                break
            arrays = conditioning.host_arrays(batch, tokenizer, config)
            dispatched = time.time()
            state, metrics = model.step_fn(
                state, model.parts.encoder_state, sharding.shard_batch(arrays, mesh, rules)
            )
            if clock.new_shape(batch["target"].shape):  # a jitted call compiles before it returns
                clock.compiled(time.time() - dispatched)
        step += 1
        ids_log.write(step, batch["id"])
        metrics_log.add(step, metrics, step_costs(batch, model.dit_cfg, config))
        if metrics_log.nonfinite_in_row or checkpointer.manager.should_save(step):
            # Read this step now, not one step late: a non-finite streak stops at exactly
            # max_nonfinite_in_row steps, and a save knows whether its step was finite.
            metrics_log.flush()
        for hook in hooks:
            hook(step)
        if step % int(config.eval.every_steps) == 0:
            metrics_log.flush()
            with clock.paused():
                evaluate(evals, model, state, step, writer, config, say)
        # A step of a non-finite streak holds the last good parameters with skipped updates: saving
        # it would only evict a healthy checkpoint.
        with clock.paused():
            if not metrics_log.nonfinite_in_row and checkpointer.save(
                step, state, iterator.get_state(), config_json
            ):
                saved_step = step
                export_lora(step, state)
    metrics_log.flush()

    # -- End: the last state is always saved (unless it is of a non-finite streak) -----------------
    if saved_step != step and not metrics_log.nonfinite_in_row:
        checkpointer.save(step, state, iterator.get_state(), config_json, force=True)
        export_lora(step, state)
    checkpointer.close()
    writer.flush()
    iterator.close()
    ids_log.close()
    if stop.requested and not metrics_log.stop_reason:
        say(
            f"stopped by signal {stop.name} at step {step}; checkpoint saved, rerun the same command to "
            "continue"
        )
        return stop.exit_code
    if metrics_log.stop_reason:
        print(f"sama-train: stopped at step {step}: {metrics_log.stop_reason}", file=sys.stderr, flush=True)
        return 1
    say(
        f"done: step {step}, skipped samples {iterator.skip_summary()['counts']}, "
        f"{time.time() - started:.1f}s"
    )
    return 0


def check_config_and_mesh(config, allow_config_change: bool, say):
    """Bad settings and missing paths named before anything is built; the workdir claimed and its
    config checked (process 0); -> (mesh, rules, the workdir lock or None)."""
    import jax
    import numpy as np

    from sama_jax import dir_lock, run_dir, sharding, train_step
    from sama_jax.data import pipeline

    mesh = sharding.create_mesh(config.mesh)
    rules = sharding.axis_rules(config.sharding_rules)
    batch_axes = np.atleast_1d(train_step.batch_axes(rules))
    batch_shards = int(np.prod([mesh.shape[a] for a in batch_axes if a is not None]))
    train_step.check_config(config, batch_shards, jax.process_count())
    pipeline.check_data_config(
        config.data,
        int(config.seed),
        anchor_frames=int(config.model.semantic.num_anchor_frames),
        text_len=int(config.model.dit.text_len),
    )
    check_config_paths(config)
    lock = None
    if jax.process_index() == 0:
        # Claimed only once the startup checks pass.
        lock = dir_lock.acquire(config.workdir, busy="is in use by another sama-train,")
        run_dir.check_and_write_config(config.workdir, config, allow_config_change, write=False)
    say(
        f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{jax.process_count()} process(es); workdir {config.workdir}"
    )
    image_warning = train_step.image_batch_warning(config)
    if image_warning:
        say("warning: " + image_warning)
    return mesh, rules, lock


def check_config_paths(config) -> None:
    """Every path the config names exists, checked before the run writes anything (a typo is
    named at once, not after the encoders are built, and a corrected rerun is not a changed config)."""
    named = {"checkpoint.init_from": config.checkpoint.init_from}
    named.update({f"model.checkpoints.{k}": v for k, v in config.model.checkpoints.items()})
    for key, path in named.items():
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"config.{key}={path!r} does not exist")


class Model(NamedTuple):
    """The DiT being trained: its config, abstract (sharded) trainable parameters and the jitted step."""

    dit_cfg: Any
    graphdef: Any
    params_abstract: Any  # what the optimizer trains: every parameter, or a LoRA run's adapters + extras
    rest: Any
    parts: Any  # train_step.StepParts (a LoRA run's frozen base: parts.dit_frozen)
    step_fn: Callable
    num_params: int
    num_trained: int


def build_model(config, mesh, rules, frozen, say) -> Model:
    import jax
    from flax import nnx

    from sama_jax import lora_train, run_dir, train_step
    from sama_jax.models import wan_dit

    dit_cfg = wan_dit.WanDiTConfig.from_config(config.model.dit, config.precision)
    graphdef, params_abstract, rest = run_dir.abstract_params(dit_cfg, mesh, rules, config.train.get("lora"))
    dit = nnx.merge(graphdef, params_abstract, rest)
    if lora_train.enabled(config):
        # The frozen base is loaded for a fresh and a resumed run alike: the step holds it, as it
        # holds the frozen encoders; the fresh adapters are the start of a new run.
        dit = run_dir.initial_lora_dit(config, dit_cfg, graphdef, params_abstract, rest, mesh, rules, say)
    parts = train_step.StepParts.build(config, mesh, rules, dit, frozen)
    trained = jax.tree.map(
        lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
        parts.dit_trainable,
        parts.state_shardings["params"],
    )
    num_trained = sum(x.size for x in jax.tree.leaves(trained))
    num_params = num_trained + sum(x.size for x in jax.tree.leaves(parts.dit_frozen))
    step_fn = train_step.make_train_step(config, parts)
    return Model(dit_cfg, graphdef, trained, rest, parts, step_fn, num_params, num_trained)


def restore_or_init(config, model: Model, checkpointer, resume_step: int | None, mesh, rules, say):
    """-> (step, state, data iterator state): the newest checkpoint of the workdir that restores (or
    --resume-step's), else step 0 and a fresh state."""
    from sama_jax import lora_train, run_dir

    abstract = model.parts.abstract_state(model.params_abstract)
    step, state, data_state = checkpointer.resume_newest(abstract, resume_step, log=say)
    if step is not None:
        say(f"resumed from step {step} ({checkpointer.directory}/{step})")
        return step, state, data_state
    if lora_train.enabled(config):  # the adapters and extras build_model made with the base
        params = model.parts.dit_trainable
    else:
        params = run_dir.initial_params(config, model.params_abstract, mesh, rules, say)
    return 0, model.parts.init_state(params), None


def build_input(config, sources, frozen):
    """The grain pipeline of this process's share of the global batch."""
    import jax

    from sama_jax import train_step
    from sama_jax.data import pipeline

    batch_sizes = train_step.batch_sizes(config)  # global, per kind
    return pipeline.build_pipeline(
        config.data,
        sources,
        batch_size=batch_sizes["video"] // jax.process_count(),
        image_batch_size=batch_sizes["image"] // jax.process_count(),
        seed=int(config.seed),
        anchor_frames=frozen.semantic.num_anchor_frames,
        text_len=int(config.model.dit.text_len),
    )


def progress_hooks(config, writer, first_step: int, primary: bool) -> list:
    """clu's periodic actions: progress reports, and a profile after the first logged steps."""
    from clu import periodic_actions

    log_every = max(1, int(config.train.log_every))
    hooks = [
        periodic_actions.ReportProgress(
            num_train_steps=int(config.train.steps), writer=writer, every_steps=log_every
        )
    ]
    if int(config.train.profile_steps) > 0 and primary:
        hooks.append(
            periodic_actions.Profile(
                logdir=config.workdir,
                num_profile_steps=int(config.train.profile_steps),
                first_profile=first_step + log_every + 1,
            )
        )
    return hooks


class SampleIdLog:
    """train.log_sample_ids: WORKDIR/sample_ids.p<process>.jsonl, one line per step with its sample ids."""

    def __init__(self, config, workdir: str):
        import jax

        self.file = None
        if config.train.log_sample_ids:
            self.file = open(os.path.join(workdir, f"sample_ids.p{jax.process_index()}.jsonl"), "a")

    def write(self, step: int, ids) -> None:
        if self.file is not None:
            self.file.write(json.dumps({"step": step, "ids": [str(i) for i in ids]}) + "\n")
            self.file.flush()

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


def step_costs(batch, dit_cfg, config) -> dict:
    """A step's global samples, tokens and FLOPs (for throughput and MFU)."""
    import jax

    from sama_jax import dit_cost, encoders

    semantic_tokens = encoders.semantic_config(config).num_tokens if config.train.semantic_anchoring else 0
    frames, height, width = batch["target"].shape[1:4]
    tokens = 2 * dit_cost.video_tokens(frames, height, width, dit_cfg.patch_size)
    samples = len(batch["valid"]) * jax.process_count()
    flops = samples * dit_cost.train_flops(dit_cfg, tokens + semantic_tokens, dit_cfg.text_len)
    return dict(samples=samples, flops=flops, tokens=samples * tokens)


class StepMetrics:
    """The train step's metrics, read on the host one step late (so the host never waits on the step
    just issued) or at once (flush): into the clock, the log and TensorBoard every train.log_every
    steps; the non-finite streak and the reason to stop (stop_reason, "" to go on)."""

    def __init__(self, clock, iterator, writer, config, say):
        self.clock, self.iterator, self.writer, self.config, self.say = clock, iterator, writer, config, say
        self.pending = None  # (step, device metrics, costs)
        self.nonfinite_in_row = 0  # up to the last step read
        self.stop_reason = ""

    def add(self, step: int, metrics, costs: dict) -> None:
        self.flush()
        self.pending = (step, metrics, costs)

    def flush(self) -> None:
        if self.pending is not None:
            self._read(*self.pending)
            self.pending = None

    def _read(self, step: int, metrics, costs: dict) -> None:
        import jax

        config, total_steps = self.config, int(self.config.train.steps)
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if self.clock.record(step, metrics, **costs):
            self.say(f"first step {step} done (includes compilation)")
        if step % max(1, int(config.train.log_every)) == 0 or step == total_steps:
            summary = self.clock.summary(step)
            if summary is not None:
                self.say(self.clock.line(step, summary))
                skips = self.iterator.skip_summary()
                summary.update({f"skipped_samples/{k}": v for k, v in skips["counts"].items()})
                summary["skipped_samples/total"] = skips["total"]
                self.writer.write_scalars(step, summary)
        self.nonfinite_in_row = int(metrics["nonfinite_in_row"])
        if self.nonfinite_in_row >= int(config.train.max_nonfinite_in_row) and not self.stop_reason:
            self.stop_reason = (
                f"{self.nonfinite_in_row} steps in a row up to step {step} had a "
                "non-finite loss or gradient (their updates were skipped; the saved "
                "state is the last good one): lower optimizer.lr, check the data, or raise "
                "train.max_nonfinite_in_row"
            )


def evaluate(evals, model: Model, state, step: int, writer, config, say) -> None:
    """The evaluators on the EMA (eval.use_ema) or raw parameters: scalars and sample images."""
    import jax
    import numpy as np
    from flax import nnx

    if not evals:
        return
    tree = state["ema"] if config.eval.use_ema else state["params"]
    tree = jax.tree.map(lambda x, a: x.astype(a.dtype), tree, model.params_abstract)
    dit = nnx.merge(model.graphdef, tree, model.parts.dit_frozen, model.rest)
    scalars, images = {}, {}
    for evaluator in evals:
        for name, value in evaluator.run(dit, step):
            if np.ndim(value) == 0:
                scalars[name] = float(value)
            else:
                images[name] = np.asarray(value)[None]  # [N=1, H, W, 3]
    writer.write_scalars(step, scalars)
    if images:
        writer.write_images(step, images)
    say(
        f"step {step} eval: "
        + " ".join(f"{k}={v:.4f}" for k, v in scalars.items())
        + (f" (+{len(images)} sample images)" if images else "")
    )


if __name__ == "__main__":
    sys.exit(main())
