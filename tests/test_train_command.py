"""sama-train through the command: exact resume after kill -9 and SIGTERM, a workdir of another
config refused, two processes equal one, the run directory loads alone; and a kill -9 during an
async Orbax save leaves the previous checkpoint loadable.

Every run shares one generated dataset and one persistent compilation cache (tests are slow on 2
cores: the first run compiles, the others mostly read the cache).
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

from sama_jax import checkpointing, run_dir

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
STEPS = 10
ARGS = [
    f"--config={ROOT}/configs/stage1_sft.py:tiny",
    "--config.data.mixture=[{'kind': 'image_edit', 'manifest': 'data/synthetic/image_edits.jsonl', "
    "'weight': 1.0}]",
    "--config.data.pixels=1024", "--config.eval.evaluators=()", f"--config.train.steps={STEPS}",
    "--config.checkpoint.every_steps=2", "--config.train.log_every=2",
    "--config.train.log_sample_ids=True",
]


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    root = tmp_path_factory.mktemp("train_command")
    environ = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
    environ.update(PYTHONPATH=ROOT, JAX_COMPILATION_CACHE_DIR=str(root / "jax_cache"),
                   JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0", JAX_PLATFORMS="cpu")
    return root, environ


def start(env, workdir, *extra, devices=8, log="log"):
    root, environ = env
    out = open(root / f"{os.path.basename(workdir)}.{log}.txt", "w")
    proc = subprocess.Popen([sys.executable, "-m", "sama_jax.train", f"--workdir={workdir}",
                             f"--cpu-devices={devices}", *ARGS, *extra], cwd=root, env=environ,
                            stdout=out, stderr=subprocess.STDOUT)
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
        wan_dit.WanDiTConfig.from_config(config.model.dit, config.precision))
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
    with open(os.path.join(uninterrupted, run_dir.ENCODERS_FILE)) as f:
        assert json.load(f)["vae"] == "encoders/vae"


def _free_port():
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


@pytest.mark.slow
def test_two_processes_train_like_one(env, uninterrupted):
    workdir = str(env[0] / "two")
    port = _free_port()
    procs = [start(env, workdir, f"--coordinator-address=localhost:{port}", "--num-processes=2",
                   f"--process-id={i}", devices=4, log=f"p{i}") for i in range(2)]
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
    result = subprocess.run([sys.executable, "-c", SAVE_THEN_DIE, directory], env=environ,
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == -signal.SIGKILL, result.stderr[-2000:]
    checkpointer = checkpointing.Checkpointer(directory)
    assert checkpointer.latest_step() == 1
    import orbax.checkpoint as ocp
    restored = checkpointer.manager.restore(1, args=ocp.args.Composite(
        params=ocp.args.StandardRestore(), data=ocp.args.JsonRestore()))
    np.testing.assert_array_equal(restored["params"]["w"], np.ones(10, np.float32))
    assert restored["data"] == {"next_position": 8}
    # The run goes on: step 2 saves over the partial one.
    checkpointer.save(2, {
        "params": {"w": np.zeros(3, np.float32)}, "ema": {"w": np.zeros(1, np.float32)},
        "opt_state": {"m": np.zeros(1, np.float32)}, "rng": np.zeros(2, np.uint32), "step": np.int32(2),
        "skipped_updates": np.int32(0), "nonfinite_in_row": np.int32(0)}, {}, {"c": 1})
    checkpointer.close()
    assert checkpointing.Checkpointer(directory, read_only=True).all_steps() == [1, 2]
    assert sorted(os.listdir(directory)) == ["1", "2"]
