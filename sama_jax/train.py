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
    import numpy as np
    from clu import metric_writers, periodic_actions
    from flax import nnx

    from sama_jax import (
        checkpointing,
        conditioning,
        dir_lock,
        dit_cost,
        evaluators,
        interrupts,
        run_dir,
        sharding,
        text,
        train_step,
    )
    from sama_jax.config import ConfigError
    from sama_jax.data import pipeline, synthetic
    from sama_jax.models import wan_dit

    started = time.time()
    workdir = os.path.abspath(args.workdir or config.workdir)
    config.workdir = workdir
    process, processes = jax.process_index(), jax.process_count()
    primary = process == 0
    tiny = config.model.preset == "tiny"

    def say(message: str) -> None:
        if primary:
            print(f"sama-train [{time.time() - started:6.1f}s] {message}", flush=True)

    # -- Mesh ----------------------------------------------------------------------------------
    mesh = sharding.create_mesh(config.mesh)
    rules = sharding.axis_rules(config.sharding_rules)
    batch_shards = int(
        np.prod([mesh.shape[a] for a in np.atleast_1d(train_step.batch_axes(rules)) if a is not None])
    )
    train_step.check_config(config, batch_shards, processes)
    image_warning = train_step.image_batch_warning(config)
    pipeline.check_data_config(
        config.data,
        int(config.seed),
        anchor_frames=int(config.model.semantic.num_anchor_frames),
        text_len=int(config.model.dit.text_len),
    )
    dit_cfg = wan_dit.WanDiTConfig.from_config(config.model.dit, config.precision)
    check_config_paths(config)
    if primary:
        # Claimed only once the startup checks pass; held until the process exits, however it exits.
        workdir_lock = dir_lock.acquire(workdir, busy="is in use by another sama-train,")  # noqa: F841
        run_dir.check_and_write_config(workdir, config, args.allow_config_change, write=False)
    say(
        f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices, "
        f"{processes} process(es); workdir {workdir}"
    )
    if image_warning:
        say("warning: " + image_warning)

    # -- Frozen encoders and tokenizer ---------------------------------------------------------
    checkpoints = config.model.checkpoints
    names = train_step.encoder_names(config)
    recorded = {}
    if checkpoints.tokenizer:
        tokenizer_dir = checkpoints.tokenizer
        recorded["tokenizer"] = os.path.abspath(tokenizer_dir)
    elif tiny:
        # The generated dataset lives where the mixture's manifests point (data/synthetic).
        data_dir = (
            os.path.dirname(
                os.path.join(config.data.root, config.data.mixture[0].get("manifest") or "data/synthetic/x")
            )
            or "."
        )
        if primary:
            tokenizer_dir = synthetic.ensure_dataset(
                data_dir, min(int(config.model.text_encoder.vocab_size), 400)
            )
        _sync("dataset")
        tokenizer_dir = os.path.join(data_dir, "tokenizer")
        recorded["tokenizer"] = (
            run_dir.copy_tokenizer(workdir, tokenizer_dir) if primary else run_dir.TOKENIZER_DIR
        )
    elif "text" not in config.data.features:
        raise ConfigError(
            "config.model.checkpoints.tokenizer is empty: give the umT5 tokenizer "
            "directory (only the tiny preset generates one)"
        )
    tokenizer = text.load_tokenizer(tokenizer_dir) if recorded.get("tokenizer") else None
    # Every data path is checked (and named by its config key) before any model is built.
    sources = pipeline.open_sources(config.data.mixture, root=config.data.root)
    if primary:  # written once every input is checked: a corrected rerun is not "another config"
        run_dir.check_and_write_config(workdir, config, args.allow_config_change)

    given = {n: checkpoints[n] for n in names if checkpoints[n]}
    saved = {
        n: os.path.join(workdir, run_dir.ENCODERS_DIR, n)
        for n in names
        if n not in given and os.path.isdir(os.path.join(workdir, run_dir.ENCODERS_DIR, n))
    }
    missing = tuple(n for n in names if n not in given and n not in saved)
    if missing and not tiny:
        raise ConfigError(
            f"no checkpoint for the frozen encoders {list(missing)}: set "
            + ", ".join(f"config.model.checkpoints.{n}" for n in missing)
            + " (random encoders are for the tiny preset only)"
        )
    loaded = conditioning.load_encoders(
        config, {**given, **saved}, mesh=mesh, rules=rules, names=tuple(given) + tuple(saved)
    )
    generated = generate_encoders(config, missing, mesh, rules)
    encoders = conditioning.Encoders(
        *[getattr(loaded, a) or getattr(generated, a) for a in ("vae", "text_encoder", "vision")],
        conditioning.semantic_config(config),
    )
    recorded.update({n: os.path.abspath(p) for n, p in given.items()})
    recorded.update(run_dir.save_generated_encoders(workdir, generated, config))
    recorded.update({n: os.path.join(run_dir.ENCODERS_DIR, n) for n in saved})
    if primary:
        run_dir.write_encoder_paths(workdir, recorded)
    _sync("encoders")
    say(
        "frozen encoders: "
        + ", ".join(
            f"{n} ({'given' if n in given else 'generated' if n in missing else 'from the workdir'})"
            for n in names
        )
        + (" (none: all precomputed)" if not names else "")
    )

    # -- Model, optimizer and train state ------------------------------------------------------
    graphdef, params_abstract, rest = run_dir.abstract_params(dit_cfg, mesh, rules)
    parts = train_step.StepParts.build(
        config, mesh, rules, nnx.merge(graphdef, params_abstract, rest), encoders
    )
    checkpointer = checkpointing.Checkpointer(
        os.path.join(workdir, run_dir.CHECKPOINTS),
        every_steps=int(config.checkpoint.every_steps),
        keep=int(config.checkpoint.keep),
        async_save=bool(config.checkpoint.async_save),
    )
    resume_step, state, data_state = checkpointer.resume_newest(
        parts.abstract_state(params_abstract), args.resume_step, log=say
    )
    if resume_step is not None:
        say(f"resumed from step {resume_step} ({checkpointer.directory}/{resume_step})")
    else:
        state = parts.init_state(initial_params(config, dit_cfg, graphdef, params_abstract, mesh, rules, say))
    num_params = sum(x.size for x in jax.tree.leaves(params_abstract))
    say(f"SAMA DiT '{config.model.preset}': {num_params:,} parameters")
    step_fn = train_step.make_train_step(config, parts)

    # -- Input ---------------------------------------------------------------------------------
    batch_sizes = train_step.batch_sizes(config)  # global, per kind
    data = pipeline.build_pipeline(
        config.data,
        sources,
        batch_size=batch_sizes["video"] // processes,
        image_batch_size=batch_sizes["image"] // processes,
        seed=int(config.seed),
        anchor_frames=encoders.semantic.num_anchor_frames,
        text_len=int(config.model.dit.text_len),
    )
    iterator = iter(data)
    if data_state is not None:
        iterator.set_state(data_state)

    # -- Evaluators and metrics ----------------------------------------------------------------
    evals = evaluators.build(config, mesh=mesh, rules=rules, encoders=encoders, tokenizer=tokenizer)
    writer = metric_writers.create_default_writer(workdir, just_logging=not primary)
    total_steps = int(config.train.steps)
    log_every = max(1, int(config.train.log_every))
    hooks = [
        periodic_actions.ReportProgress(num_train_steps=total_steps, writer=writer, every_steps=log_every)
    ]
    if int(config.train.profile_steps) > 0 and primary:
        hooks.append(
            periodic_actions.Profile(
                logdir=workdir,
                num_profile_steps=int(config.train.profile_steps),
                first_profile=(resume_step or 0) + log_every + 1,
            )
        )
    config_json = run_dir.config_json(config)
    ids_file = (
        open(os.path.join(workdir, f"sample_ids.p{process}.jsonl"), "a")
        if config.train.log_sample_ids
        else None
    )

    def evaluate(step: int) -> None:
        if not evals:
            return
        tree = state["ema"] if config.eval.use_ema else state["params"]
        tree = jax.tree.map(lambda x, a: x.astype(a.dtype), tree, params_abstract)
        dit = nnx.merge(graphdef, tree, rest)
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

    # Ctrl-C and SIGTERM: the step and any save in flight finish, the state is saved, exit.
    stop = interrupts.StopRequest("sama-train", "stopping after this step and saving it").install()

    # -- Loop ----------------------------------------------------------------------------------
    semantic_tokens = encoders.semantic.num_tokens if config.train.semantic_anchoring else 0
    first_step = resume_step or 0
    say(f"training steps {first_step} -> {total_steps}")
    window = []  # host metrics since the last log
    last_log = None  # (time, step) after the first completed step
    pending = None  # the previous step's (step, device metrics, samples, flops): read one
    exit_code, stop_reason = 0, ""  # step late, so the host never waits on the step just issued
    # Seconds since the last log spent compiling a new batch shape (a jitted call compiles before
    # it returns), evaluating or saving: left out of step_time, samples/s and MFU.
    paused = {"seconds": 0.0, "compile": 0.0}
    compiled_shapes = set()
    streak = {"in_row": 0}  # non-finite steps in a row up to the last finished step

    def finish_step(step, metrics, samples, flops, tokens):
        nonlocal last_log, exit_code, stop_reason
        metrics = {k: float(v) for k, v in jax.device_get(metrics).items()}
        window.append(dict(metrics, _samples=samples, _flops=flops, _tokens=tokens))
        now = time.time()
        if last_log is None:
            say(f"first step {step} done (includes compilation)")
            last_log = (now, step)
            window.clear()
            paused.update(seconds=0.0, compile=0.0)  # spent before the first timed window
        if step % log_every == 0 or step == total_steps:
            if window and step > last_log[1]:
                dt = max(1e-9, now - last_log[0] - paused["seconds"]) / (step - last_log[1])
                mean = {
                    k: float(np.mean([w[k] for w in window]))
                    for k in window[0]
                    if not k.startswith("_") and k not in ("skipped_updates", "nonfinite_in_row")
                }
                samples = np.mean([w["_samples"] for w in window])
                mean.update(
                    step_time=dt,
                    samples_per_sec=samples / dt,
                    tokens_per_sec=np.mean([w["_tokens"] for w in window]) / dt,
                    mfu=np.mean([w["_flops"] for w in window])
                    / dt
                    / (float(config.train.peak_tflops) * 1e12 * jax.device_count()),
                    skipped_updates=metrics["skipped_updates"],
                    compile_seconds=paused["compile"],
                )
                skips = iterator.skip_summary()
                mean.update({f"skipped_samples/{k}": v for k, v in skips["counts"].items()})
                mean["skipped_samples/total"] = skips["total"]
                writer.write_scalars(step, mean)
                eta = (total_steps - step) * dt
                say(
                    f"step {step}/{total_steps} "
                    + " ".join(
                        f"{k}={v:.4g}" for k, v in mean.items() if not k.startswith("skipped_samples/")
                    )
                    + f" ETA {eta // 3600:.0f}h{eta % 3600 / 60:04.1f}m"
                )
            last_log = (now, step)
            window.clear()
            paused.update(seconds=0.0, compile=0.0)
        streak["in_row"] = int(metrics["nonfinite_in_row"])
        if metrics["nonfinite_in_row"] >= int(config.train.max_nonfinite_in_row):
            exit_code = 1
            stop_reason = (
                f"{int(metrics['nonfinite_in_row'])} steps in a row up to step {step} had a "
                "non-finite loss or gradient (their updates were skipped; the saved "
                "state is the last good one): lower optimizer.lr, check the data, or raise "
                "train.max_nonfinite_in_row"
            )

    step = saved_step = first_step
    while step < total_steps and not stop_reason and not stop.requested:
        with jax.profiler.StepTraceAnnotation("train", step_num=step):
            try:
                batch = next(iterator)
            except StopIteration:
                stop_reason = "the data ran out"
                break
            arrays = conditioning.host_arrays(batch, tokenizer, config)
            dispatched = time.time()
            state, metrics = step_fn(state, parts.encoder_state, sharding.shard_batch(arrays, mesh, rules))
            if batch["target"].shape not in compiled_shapes:
                compiled_shapes.add(batch["target"].shape)
                compiling = time.time() - dispatched
                paused["compile"] += compiling
                paused["seconds"] += compiling
        step += 1
        if ids_file is not None:
            ids_file.write(json.dumps({"step": step, "ids": [str(i) for i in batch["id"]]}) + "\n")
            ids_file.flush()
        frames, height, width = batch["target"].shape[1:4]
        tokens = 2 * dit_cost.video_tokens(frames, height, width, dit_cfg.patch_size)
        samples = len(batch["valid"]) * processes
        current = (
            step,
            metrics,
            samples,
            samples * dit_cost.train_flops(dit_cfg, tokens + semantic_tokens, dit_cfg.text_len),
            samples * tokens,
        )
        if pending is not None:
            finish_step(*pending)
        pending = current
        if streak["in_row"] or checkpointer.manager.should_save(step):
            # Read this step now, not one step late: a non-finite streak stops at exactly
            # max_nonfinite_in_row steps, and a save knows whether its step was finite.
            finish_step(*pending)
            pending = None
        for hook in hooks:
            hook(step)
        if step % int(config.eval.every_steps) == 0:
            if pending is not None:
                finish_step(*pending)
                pending = None
            started_eval = time.time()
            evaluate(step)
            paused["seconds"] += time.time() - started_eval
        started_save = time.time()
        # A step of a non-finite streak holds the last good parameters with skipped updates: saving
        # it would only evict a healthy checkpoint.
        if not streak["in_row"] and checkpointer.save(step, state, iterator.get_state(), config_json):
            saved_step = step
        paused["seconds"] += time.time() - started_save
    if pending is not None:
        finish_step(*pending)

    # -- End: the last state is always saved -----------------------------------------------------
    if saved_step != step and not streak["in_row"]:
        checkpointer.save(step, state, iterator.get_state(), config_json, force=True)
    checkpointer.close()
    writer.flush()
    iterator.close()
    if ids_file is not None:
        ids_file.close()
    if stop.requested and not stop_reason:
        say(
            f"stopped by signal {stop.name} at step {step}; checkpoint saved, rerun the same command to "
            "continue"
        )
        return stop.exit_code
    if stop_reason:
        print(f"sama-train: stopped at step {step}: {stop_reason}", file=sys.stderr, flush=True)
        return exit_code or 1
    say(
        f"done: step {step}, skipped samples {iterator.skip_summary()['counts']}, "
        f"{time.time() - started:.1f}s"
    )
    return 0


def _sync(name: str) -> None:
    import jax
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def generate_encoders(config, names, mesh, rules):
    """Random frozen encoders (tiny preset). Every process makes the same values from config.seed
    and places its own shards of them (no transfer or collective per array)."""
    import jax
    import numpy as np
    from flax import nnx

    from sama_jax import conditioning, sharding

    generated = conditioning.build_encoders(config, nnx.Rngs(int(config.seed) + 1), names=names)
    graphdef, state = nnx.split(generated)

    def place(x, where):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, where, lambda index: host[index])

    return nnx.merge(graphdef, jax.tree.map(place, state, sharding.state_shardings(state, mesh, rules)))


def check_config_paths(config) -> None:
    """Every path the config names exists, checked before the run writes anything (a typo is
    named at once, not after the encoders are built, and a corrected rerun is not a changed config)."""
    named = {"checkpoint.init_from": config.checkpoint.init_from}
    named.update({f"model.checkpoints.{k}": v for k, v in config.model.checkpoints.items()})
    for key, path in named.items():
        if path and not os.path.exists(path):
            raise FileNotFoundError(f"config.{key}={path!r} does not exist")


def initial_params(config, dit_cfg, graphdef, params_abstract, mesh, rules, say):
    """checkpoint.init_from: a run directory (its parameters), a params checkpoint (converted Wan2.1
    DiT or SAMA-14B), or empty: random initialisation from config.seed, created sharded."""
    import jax
    from flax import nnx

    from sama_jax import run_dir
    from sama_jax.models import wan_dit

    source = config.checkpoint.init_from
    if not source:

        def create():
            return nnx.state(wan_dit.WanDiT(dit_cfg, rngs=nnx.Rngs(int(config.seed))), nnx.Param)

        shardings = jax.tree.map(lambda x: x.sharding, params_abstract)
        say("DiT initialised at random (checkpoint.init_from is empty)")
        return jax.jit(create, out_shardings=shardings)()
    if run_dir.is_run_dir(source):
        run_dir.check_same_architecture(run_dir.read_config(source), config, f"checkpoint.init_from={source}")
        params, step = run_dir.restore_params(source, params_abstract, use_ema=False)
        say(f"DiT parameters from run {source} step {step} (fresh optimizer)")
        return params
    dit = wan_dit.load_dit(source, mesh=mesh, rules=rules, precision=config.precision)
    differences = run_dir.config_differences(dit.cfg.architecture(), dit_cfg.architecture())
    if differences:
        raise ValueError(
            f"checkpoint.init_from={source}: its DiT differs from config.model.dit: " + "; ".join(differences)
        )
    say(f"DiT parameters from {source}")
    return nnx.state(dit, nnx.Param)


if __name__ == "__main__":
    sys.exit(main())
