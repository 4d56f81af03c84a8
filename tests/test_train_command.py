"""sama-train through the command: exact resume after kill -9 and SIGTERM, a workdir of another
config refused, two processes equal one, the run directory loads alone; and a kill -9 during an
async Orbax save leaves the previous checkpoint loadable.

Every run shares the test run's generated tiny dataset and persistent compilation cache (conftest;
tests are slow on 2 cores: the first run compiles, the others mostly read the cache).
"""

import json
import os
import signal
import socket
import subprocess
import sys
import textwrap
import time

import jax
import numpy as np
import pytest
from helpers import command_environ, link_tiny_dataset, tiny_train_args

from sama_jax import checkpointing, encoders, run_dir

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
STEPS = 10
ARGS = [*tiny_train_args(STEPS), "--config.train.log_sample_ids=True"]


@pytest.fixture(scope="module")
def env(tmp_path_factory, tiny_dataset):
    root = tmp_path_factory.mktemp("train_command")
    link_tiny_dataset(tiny_dataset, root)
    # The test run's compilation cache (conftest) is inherited: the runs share compiled steps.
    return root, command_environ()


def start(env, workdir, *extra, devices=8, log="log", group=False):
    """group: in its own process group (session), as a terminal's Ctrl-C reaches it."""
    root, environ = env
    out = open(root / f"{os.path.basename(workdir)}.{log}.txt", "w")
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "sama_jax.train",
            f"--workdir={workdir}",
            f"--cpu-devices={devices}",
            *ARGS,
            *extra,
        ],
        cwd=root,
        env=environ,
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=group,
    )
    proc.log_path = out.name
    return proc


def finish(proc, timeout=1200):
    proc.wait(timeout=timeout)
    with open(proc.log_path) as f:
        return proc.returncode, f.read()


def steps_saved(workdir):
    path = os.path.join(workdir, run_dir.CHECKPOINTS)
    return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


def wait_for(predicate, proc, timeout=1200):
    deadline = time.time() + timeout
    while not predicate():
        assert proc.poll() is None, open(proc.log_path).read()[-3000:]
        assert time.time() < deadline, "timed out"
        time.sleep(0.1)


def final_state(workdir):
    """(latest step, {params, ema} as numpy), restored onto one device whatever the topology that
    saved them."""
    from sama_jax.models import wan_dit

    config = run_dir.read_config(workdir)
    _, abstract, _ = run_dir.abstract_params(
        wan_dit.WanDiTConfig.from_config(config.model.dit, config.precision)
    )
    items = {}
    for item in ("params", "ema"):
        items[item], step = run_dir.restore_params(workdir, abstract, use_ema=item == "ema")
    return step, jax.tree.map(np.asarray, items)


def sample_ids(workdir):
    """{step: sorted ids of the global batch}, the last record of a step winning (a resumed run
    repeats the steps after its checkpoint)."""
    ids = {}
    for name in sorted(os.listdir(workdir)):
        if name.startswith("sample_ids.p"):
            per_process = {}
            with open(os.path.join(workdir, name)) as f:
                for line in f:
                    record = json.loads(line)
                    per_process[record["step"]] = record["ids"]
            for step, step_ids in per_process.items():
                ids.setdefault(step, []).extend(step_ids)
    return {k: sorted(v) for k, v in ids.items()}


def assert_same_trees(a, b, exact=True):
    leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
    assert len(leaves_a) == len(leaves_b) > 0
    for x, y in zip(leaves_a, leaves_b):
        if exact:
            np.testing.assert_array_equal(x, y)
        else:
            np.testing.assert_allclose(x, y, rtol=1e-5, atol=1e-6)


@pytest.fixture(scope="module")
def uninterrupted(env):
    workdir = str(env[0] / "a")
    code, out = finish(start(env, workdir))
    assert code == 0, out[-3000:]
    assert f"done: step {STEPS}" in out
    return workdir


@pytest.mark.slow
def test_killed_and_resumed_run_is_bitwise_identical(env, uninterrupted):
    workdir = str(env[0] / "b")
    # 1. kill -9 once the checkpoint of step 2 is complete.
    proc = start(env, workdir, log="1")
    wait_for(lambda: 2 in steps_saved(workdir), proc)
    proc.kill()
    proc.wait()
    killed_at = max(steps_saved(workdir))
    assert killed_at < STEPS
    # 2. rerun: resumes; SIGTERM once it has saved a later step: it saves where it stopped.
    proc = start(env, workdir, log="2")
    wait_for(lambda: max(steps_saved(workdir)) > killed_at, proc)
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc)
    assert code == 0, out[-3000:]
    assert f"resumed from step {killed_at}" in out
    assert "stopped by signal" in out, out[-3000:]
    stopped_at = int(out.split("stopped by signal")[1].split("at step ")[1].split(";")[0])
    assert stopped_at < STEPS and max(steps_saved(workdir)) == stopped_at
    # 3. rerun to the end.
    code, out = finish(start(env, workdir, log="3"))
    assert code == 0 and f"resumed from step {stopped_at}" in out, out[-3000:]

    step_a, state_a = final_state(uninterrupted)
    step_b, state_b = final_state(workdir)
    assert step_a == step_b == STEPS
    assert_same_trees(state_a, state_b)
    ids_a, ids_b = sample_ids(uninterrupted), sample_ids(workdir)
    assert sorted(ids_a) == list(range(1, STEPS + 1)) and ids_a == ids_b


@pytest.mark.slow
def test_a_workdir_of_another_config_is_refused(env, uninterrupted):
    code, out = finish(start(env, uninterrupted, "--config.optimizer.lr=0.5", log="changed"))
    assert code == 2
    assert "another config" in out and "optimizer.lr: 0.001 -> 0.5" in out and "--allow-config-change" in out


@pytest.mark.slow
def test_the_run_directory_loads_alone(uninterrupted):
    run = run_dir.load_run(uninterrupted)
    assert run.step == STEPS and run.tokenizer is not None
    assert run.encoders.vae is not None and run.encoders.text_encoder is not None
    _, state = final_state(uninterrupted)
    from flax import nnx

    params = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(run.dit, nnx.Param)))
    assert_same_trees(params, jax.tree.map(np.asarray, state["ema"]))
    with open(os.path.join(uninterrupted, encoders.RECORD_FILE)) as f:
        assert json.load(f)["vae"] == "encoders/vae"


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(env, uninterrupted):
    workdir = str(env[0] / "two")
    port = _free_port()
    procs = [
        start(
            env,
            workdir,
            f"--coordinator-address=localhost:{port}",
            "--num-processes=2",
            f"--process-id={i}",
            devices=4,
            log=f"p{i}",
        )
        for i in range(2)
    ]
    for proc in procs:
        code, out = finish(proc)
        assert code == 0, out[-3000:]
    _, one = final_state(uninterrupted)
    _, two = final_state(workdir)
    assert_same_trees(one["params"], two["params"], exact=False)
    assert sample_ids(uninterrupted) == sample_ids(workdir)


SAVE_THEN_DIE = textwrap.dedent("""
    import os, signal, sys
    import numpy as np
    from sama_jax import checkpointing
    ckpt = checkpointing.Checkpointer(sys.argv[1], async_save=True)
    def state(value, size):
        return dict(params={"w": np.full((size,), value, np.float32)}, ema={"w": np.zeros(1, np.float32)},
                    opt_state={"m": np.zeros(1, np.float32)}, rng=np.zeros(2, np.uint32),
                    step=np.int32(value), skipped_updates=np.int32(0), nonfinite_in_row=np.int32(0))
    ckpt.save(1, state(1, 10), {"next_position": 8}, {"c": 1})
    ckpt.wait()
    ckpt.save(2, state(2, 50_000_000), {"next_position": 16}, {"c": 1})   # 200 MB, async
    os.kill(os.getpid(), signal.SIGKILL)
""")


def test_kill_9_during_an_async_save_leaves_the_previous_checkpoint(tmp_path):
    directory = str(tmp_path / "checkpoints")
    environ = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-c", SAVE_THEN_DIE, directory],
        env=environ,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    checkpointer = checkpointing.Checkpointer(directory)
    assert checkpointer.latest_step() == 1
    import orbax.checkpoint as ocp

    restored = checkpointer.manager.restore(
        1, args=ocp.args.Composite(params=ocp.args.StandardRestore(), data=ocp.args.JsonRestore())
    )
    np.testing.assert_array_equal(restored["params"]["w"], np.ones(10, np.float32))
    assert restored["data"] == {"next_position": 8}
    # The run goes on: step 2 saves over the partial one.
    checkpointer.save(
        2,
        {
            "params": {"w": np.zeros(3, np.float32)},
            "ema": {"w": np.zeros(1, np.float32)},
            "opt_state": {"m": np.zeros(1, np.float32)},
            "rng": np.zeros(2, np.uint32),
            "step": np.int32(2),
            "skipped_updates": np.int32(0),
            "nonfinite_in_row": np.int32(0),
        },
        {},
        {"c": 1},
    )
    checkpointer.close()
    assert checkpointing.Checkpointer(directory, read_only=True).all_steps() == [1, 2]
    assert sorted(os.listdir(directory)) == ["1", "2"]


# ---------------------------------------------------------------------------------------------------
# Reliability through the command: Ctrl-C, one run per workdir, dying with the parent, a corrupt
# checkpoint, startup checks, non-finite streaks. One long run (LONG steps) is interrupted, taken over
# and corrupted in turn. It runs on the 8 devices of the runs above: the tiny preset's learning rate
# is constant after warmup, so train.steps is not in the compiled step and every start reads the
# train step the first run compiled from the compilation cache.

LONG = ["--config.train.steps=1000"]


def start_in_group(env, workdir, *extra, log):
    return start(env, workdir, *LONG, *extra, log=log, group=True)


def alive(pid):
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has exited
    except FileNotFoundError:
        return False


def log_of(proc):
    with open(proc.log_path) as f:
        return f.read()


def assert_clean_stop(code, out, signal_name, expected_code):
    assert code == expected_code, out[-3000:]
    assert "Traceback" not in out and "KeyboardInterrupt" not in out, out[-3000:]
    assert f"stopped by signal {signal_name} at step" in out, out[-3000:]
    return int(out.split(f"stopped by signal {signal_name} at step ")[1].split(";")[0])


def no_partial_steps(workdir):
    return [d for d in os.listdir(os.path.join(workdir, run_dir.CHECKPOINTS)) if "tmp" in d]


@pytest.fixture(scope="module")
def interrupted(env):
    """A run stopped by Ctrl-C (SIGINT to its process group) after its step-4 checkpoint."""
    workdir = str(env[0] / "interrupted")
    proc = start_in_group(env, workdir, log="ctrl-c")
    wait_for(lambda: any(s >= 4 for s in steps_saved(workdir)), proc)
    os.killpg(proc.pid, signal.SIGINT)
    code, out = finish(proc, timeout=120)
    return workdir, code, out


@pytest.mark.slow
def test_ctrl_c_saves_the_step_it_stopped_at_and_exits_130(interrupted):
    workdir, code, out = interrupted
    stopped_at = assert_clean_stop(code, out, "SIGINT", 130)
    assert "SIGINT: stopping after this step and saving it" in out
    assert max(steps_saved(workdir)) == stopped_at >= 4 and not no_partial_steps(workdir)


DRIVER = textwrap.dedent("""
    import subprocess, sys
    from sama_jax import child_processes
    with open(sys.argv[1], "w") as log:
        child = child_processes.popen(sys.argv[2:], stdout=log, stderr=subprocess.STDOUT)
    print(child.pid, flush=True)
    child.wait()
""")


@pytest.mark.slow
def test_one_run_per_workdir_and_a_child_run_dies_with_its_parent(env, interrupted):
    """A second sama-train on a live workdir is refused in one line naming the pid, before any work;
    the run (started by child_processes.popen, as sama-demo's phases) stops and saves when its parent
    is killed with kill -9."""
    root, environ = env
    workdir = interrupted[0]
    child_log = str(root / "child.txt")
    command = [
        sys.executable,
        "-m",
        "sama_jax.train",
        f"--workdir={workdir}",
        "--cpu-devices=8",
        *ARGS,
        *LONG,
    ]
    parent = subprocess.Popen(
        [sys.executable, "-c", DRIVER, child_log, *command],
        cwd=root,
        env=environ,
        stdout=subprocess.PIPE,
        text=True,
    )
    child = int(parent.stdout.readline())
    parent.log_path = child_log
    before = max(steps_saved(workdir))
    wait_for(lambda: max(steps_saved(workdir)) > before, parent)
    config_mtime = os.path.getmtime(os.path.join(workdir, run_dir.CONFIG_FILE))

    began = time.time()
    code, out = finish(start(env, workdir, *LONG, log="second"), timeout=120)
    lines = out.strip().splitlines()
    assert code == 2 and len(lines) == 1, out[-3000:]
    assert lines[0] == (
        f"sama-train: error: {workdir} is in use by another sama-train, pid {child}; wait for it to "
        "finish or stop it"
    )
    assert time.time() - began < 60
    assert os.path.getmtime(os.path.join(workdir, run_dir.CONFIG_FILE)) == config_mtime

    parent.kill()  # kill -9: the child gets SIGTERM, saves and exits
    parent.wait()
    deadline = time.time() + 120
    while alive(child):
        assert time.time() < deadline, "the child outlived its parent"
        time.sleep(0.1)
    with open(child_log) as f:
        out = f.read()
    stopped_at = assert_clean_stop(0, out, "SIGTERM", 0)
    assert max(steps_saved(workdir)) == stopped_at and not no_partial_steps(workdir)
    # The lock file still names the dead child; the next run takes it over (next test).
    with open(os.path.join(workdir, ".lock")) as f:
        assert f.read() == str(child)


@pytest.mark.slow
def test_a_corrupt_newest_checkpoint_is_moved_aside_and_the_previous_step_resumed(env, interrupted):
    workdir = interrupted[0]
    steps = steps_saved(workdir)
    newest, previous = steps[-1], steps[-2]
    os.remove(os.path.join(workdir, run_dir.CHECKPOINTS, str(newest), "params", "manifest.ocdbt"))
    proc = start_in_group(env, workdir, log="corrupt")
    wait_for(lambda: "training steps" in log_of(proc), proc)
    with open(os.path.join(workdir, ".lock")) as f:
        assert f.read() == str(proc.pid)  # a stale lock (its holder gone) is taken over
    # Ctrl-C twice: the second exits at once.
    os.killpg(proc.pid, signal.SIGINT)
    wait_for(lambda: "SIGINT: stopping" in log_of(proc), proc)
    os.killpg(proc.pid, signal.SIGINT)
    code, out = finish(proc, timeout=120)
    assert code == 130 and "sama-train: second interrupt: exiting now" in out, out[-3000:]
    assert "Traceback" not in out
    aside = os.path.join(workdir, checkpointing.ASIDE, str(newest))
    bad = [line for line in out.splitlines() if "does not restore" in line]
    assert len(bad) == 1 and f"checkpoint step {newest} does not restore" in bad[0] and aside in bad[0]
    assert len(bad[0]) < 500 and "Event loop is closed" not in out
    assert f"resumed from step {previous} " in out
    assert os.path.isfile(os.path.join(aside, "params", "_METADATA"))  # moved, not deleted

    # --resume-step N: that step, the later ones moved aside (named).
    first = steps_saved(workdir)[0]
    later = [s for s in steps_saved(workdir) if s > first]
    proc = start_in_group(env, workdir, f"--resume-step={first}", log="resume-step")
    wait_for(lambda: "training steps" in log_of(proc), proc)
    proc.send_signal(signal.SIGTERM)
    code, out = finish(proc, timeout=120)
    assert code == 0, out[-3000:]
    assert f"steps {later} are newer than --resume-step {first}: moved aside" in out
    assert f"resumed from step {first} " in out
    for s in later:
        assert any(
            name.split(".")[0] == str(s) for name in os.listdir(os.path.join(workdir, checkpointing.ASIDE))
        )


def test_startup_checks_name_the_path_before_the_workdir_is_claimed(env, tmp_path):
    """A missing config path is named at once and nothing is written (the corrected command is not
    'another config'); a --workdir that is a file is named as such."""
    workdir = tmp_path / "new"
    began = time.time()
    code, out = finish(start(env, str(workdir), "--config.checkpoint.init_from=/no/such/path", log="x"), 120)
    assert code == 2 and out.strip() == (
        "sama-train: error: config.checkpoint.init_from='/no/such/path' does not exist"
    ), out[-3000:]
    assert time.time() - began < 60 and not workdir.exists()
    # A data path: found before config.json is written, so the corrected command is not refused.
    mixture = "[{'kind': 'image_edit', 'manifest': 'data/synthetic/nope.jsonl', 'weight': 1.0}]"
    code, out = finish(start(env, str(workdir), f"--config.data.mixture={mixture}", log="x"), 120)
    last = out.strip().splitlines()[-1]
    assert code == 2 and last.startswith("sama-train: error:") and "nope.jsonl" in last, out[-3000:]
    assert "Traceback" not in out
    assert not (workdir / run_dir.CONFIG_FILE).exists()
    afile = tmp_path / "afile"
    afile.write_text("")
    code, out = finish(start(env, str(afile), log="x"), 120)
    assert code == 2 and out.strip() == f"sama-train: error: {afile} is a file, not a directory", out


@pytest.mark.slow
def test_a_non_finite_streak_stops_at_its_count_and_keeps_the_healthy_checkpoints(env):
    workdir = str(env[0] / "nonfinite")
    extra = [
        "--config.optimizer.lr=1e10",
        "--config.train.max_nonfinite_in_row=3",
        "--config.checkpoint.every_steps=1",
        "--config.checkpoint.keep=3",
        "--config.train.steps=20",
    ]
    code, out = finish(start(env, workdir, *extra, devices=1, log="nonfinite"))
    assert code == 1, out[-3000:]
    stopped = out.split("sama-train: stopped at step ")[1]
    stop_step = int(stopped.split(":")[0])
    assert stopped.split(": ", 1)[1].startswith(f"3 steps in a row up to step {stop_step} had a non-finite")
    # Only finite steps were saved: the newest checkpoint is the step before the streak.
    assert steps_saved(workdir)[-1] == stop_step - 3
    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, run_dir.CHECKPOINTS), read_only=True)
    import orbax.checkpoint as ocp

    for step in checkpointer.all_steps():
        train = checkpointer.manager.restore(step, args=ocp.args.Composite(train=ocp.args.StandardRestore()))
        assert int(train["train"]["skipped_updates"]) == 0
    checkpointer.close()
