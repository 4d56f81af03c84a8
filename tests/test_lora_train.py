"""LoRA fine-tuning (sama_jax/lora_train.py): bad settings named at start; the train step of the
tiny preset on a random base (tests/model_helpers.py's tiny DiT): step 0 is the base model, only
the adapters and the extra modules train, the released file round-trips through lora.merge_lora;
and through sama-train: the tiny preset trains a LoRA, writes its released files, resumes bitwise
after kill -9, and its run directory loads merged (what sama-edit / sama-export --run edit with).
"""

import dataclasses
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from helpers import command_environ, link_tiny_dataset, tiny_train_args
from model_helpers import random_params

from sama_jax import config as config_lib
from sama_jax import encoders as encoders_lib
from sama_jax import lora as lora_lib
from sama_jax import lora_train, params_io, presets, run_dir, sharding, train_step
from sama_jax.models import siglip, wan_dit

ROOT = os.path.abspath(os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
EXTRA = "semantic_head"
# Our paths of the default targets (q, k, v, o of both attentions, ffn.0, ffn.2: stacked blocks).
TARGETED = [f"blocks.{a}.{m}.kernel" for a in ("self_attn", "cross_attn") for m in "qkvo"] + [
    "blocks.ffn.fc1.kernel",
    "blocks.ffn.fc2.kernel",
]


BATCH = 8


def lora_config(base, **overrides):
    settings = {
        "data.features": "('text', 'semantic', 'target_latents', 'source_latents')",
        "train.lora.rank": "4",
        "train.lora.alpha": "8.0",
        "train.lora.extra_trainable": f"('{EXTRA}',)",
        "checkpoint.init_from": str(base),
        "schedule.warmup_steps": "0",
        "optimizer.lr": "3e-3",
        **overrides,
    }
    return config_lib.build_config(f"{ROOT}/configs/stage1_sft.py:tiny", list(settings.items()))


def feature_batch(config, seed=0):
    """A batch of precomputed features (no frozen encoder to build): 1-frame 32x32 latents."""
    rng = np.random.default_rng(seed)
    dit = config.model.dit
    shapes = {
        "target_latents": (BATCH, 1, 4, 4, dit.in_dim),
        "source_latents": (BATCH, 1, 4, 4, dit.in_dim),
        "text": (BATCH, dit.text_len, dit.text_dim),
        "semantic": (BATCH, 5, dit.semantic_dim),
    }
    batch = {f"features/{k}": rng.standard_normal(v).astype(np.float32) for k, v in shapes.items()}
    return dict(batch, valid=np.ones((BATCH,), bool))


def flat(state) -> dict:
    return {".".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.to_flat_state(state)}


def test_bad_lora_settings_are_named_at_start(tiny_models):
    base = tiny_models[0] / "dit"
    bad = [
        ({"train.lora.rank": "-1"}, r"train.lora.rank=-1 must be >= 0"),
        (
            {"train.lora.targets": "('blocks.*.attn.q',)"},
            r"train.lora.targets: 'blocks.\*.attn.q' matches no",
        ),
        ({"train.lora.targets": "('blocks.0.ffn.0',)"}, r"\['blocks.ffn.fc1'\] in some layers only"),
        (
            {"train.lora.extra_trainable": "('projector',)"},
            r"train.lora.extra_trainable: 'projector' matches no",
        ),
        ({"checkpoint.init_from": ""}, r"train.lora.rank=4 .* config.checkpoint.init_from is empty"),
        ({"train.lora.alpha": "0.0"}, r"train.lora.alpha=0.0 must be > 0"),
    ]
    for overrides, message in bad:
        with pytest.raises(config_lib.ConfigError, match=message):
            train_step.check_config(lora_config(base, **overrides), 8)
    train_step.check_config(lora_config(base), 8)
    train_step.check_config(lora_config("", **{"train.lora.rank": "0"}), 8)  # full fine-tuning


@pytest.fixture(scope="module")
def stepped(tiny_models):
    """Two LoRA steps from the tiny random base on one batch (one device: the sharded step is the
    command's, below), and the base's own loss of step 0's noise and sigma."""
    config = lora_config(tiny_models[0] / "dit")
    mesh = sharding.create_mesh(config.mesh, jax.devices()[:1])
    rules = sharding.axis_rules(config.sharding_rules)
    encoders = encoders_lib.build(config, nnx.Rngs(1), names=encoders_lib.needed(config, training=True))
    sharding.shard_module(encoders, mesh, rules)
    dit_cfg = wan_dit.WanDiTConfig.from_config(config.model.dit, config.precision)
    graphdef, abstract, rest = run_dir.abstract_params(dit_cfg, mesh, rules, config.train.lora)
    dit = run_dir.initial_lora_dit(config, dit_cfg, graphdef, abstract, rest, mesh, rules, say=lambda m: None)
    parts = train_step.StepParts.build(config, mesh, rules, dit, encoders)
    step = train_step.make_train_step(config, parts)
    batch = sharding.shard_batch(feature_batch(config), mesh, rules)

    base_graphdef, base_abstract, base_rest = run_dir.abstract_params(dit_cfg, mesh, rules)
    base = run_dir.initial_params(config, base_abstract, mesh, rules, say=lambda m: None)
    prepare, loss_fn = train_step.make_objective(config, base_graphdef, base_rest, parts.encoder_graphdef)
    key = jax.random.fold_in(jax.random.PRNGKey(int(config.seed)), 0)  # step 0's key
    with sharding.use_mesh(mesh, rules):
        base_loss = float(
            jax.jit(lambda p, e: loss_fn(p, prepare(e, batch, key))[0])(base, parts.encoder_state)
        )

    state = parts.init_state(parts.dit_trainable)
    metrics = []
    for _ in range(2):
        state, m = step(state, parts.encoder_state, batch)
        metrics.append(jax.device_get(m))
    return dict(config=config, parts=parts, state=state, base=base, base_loss=base_loss, metrics=metrics)


def test_step_zero_is_the_base_model(stepped):
    metrics = stepped["metrics"]
    assert metrics[0]["loss"] == pytest.approx(stepped["base_loss"], rel=1e-6)
    assert metrics[1]["loss"] != metrics[0]["loss"] and metrics[1]["update_norm"] > 0


def test_only_the_adapters_and_the_extra_module_train(stepped):
    parts, state, base = stepped["parts"], stepped["state"], stepped["base"]
    extras = {p for p in flat(base) if p.startswith(EXTRA + ".")}
    adapters = {p[: -len(".kernel")] + f".lora.{s}" for p in TARGETED for s in "ab"}
    trained = flat(state["params"])
    assert set(trained) == adapters | extras
    # The optimizer and the EMA hold the trainable tree alone (AdamW: mu and nu).
    assert len(jax.tree.leaves(state["ema"])) == len(trained)
    assert len(jax.tree.leaves(state["opt_state"])) == 2 * len(trained) + 2  # + counts
    # The frozen base is the loaded one, bit for bit, and is all the rest.
    frozen, loaded = flat(parts.dit_frozen), flat(base)
    assert set(frozen) == set(loaded) - extras
    for path, value in frozen.items():
        np.testing.assert_array_equal(value, loaded[path], err_msg=path)
    # Merged, the step changed exactly the targeted kernels and the extra module.
    merged = lora_train.merge_trained(
        jax.tree.map(lambda x: x.copy(), base), state["params"], stepped["config"].train.lora
    )
    changed = {p for p, v in flat(merged).items() if not np.array_equal(v, loaded[p])}
    assert changed == set(TARGETED) | extras
    # B started at zero (step 0 = the base) and has moved.
    assert np.abs(trained["blocks.ffn.fc1.lora.b"]).max() > 1e-4


def test_the_released_file_round_trips_through_merge_lora(stepped, tiny_models, tmp_path):
    from safetensors.numpy import save_file

    config, state = stepped["config"], stepped["state"]
    adapters, modules = lora_train.released_tensors(flat(jax.device_get(state["params"])), config)
    assert adapters["blocks.1.self_attn.q.lora_A.default.weight"].shape == (4, 64)  # (rank, in)
    assert adapters["blocks.0.ffn.0.lora_B.default.weight"].shape == (128, 4)  # (out, rank)
    assert modules["semantic_head.proj.weight"].shape == (32, 64)  # torch (out, in)
    save_file(adapters, str(tmp_path / "lora.safetensors"))
    dit = wan_dit.load_dit(str(tiny_models[0] / "dit"))
    merged_names = lora_lib.merge_lora(dit, lora_lib.read_lora(str(tmp_path / "lora.safetensors")), alpha=1.0)
    assert len(merged_names) == 2 * 10  # 2 layers x 10 targeted Linears
    released = flat(nnx.state(dit, nnx.Param))
    ours = flat(
        lora_train.merge_trained(
            jax.tree.map(lambda x: x.copy(), stepped["base"]), state["params"], config.train.lora
        )
    )
    for path in TARGETED:
        np.testing.assert_allclose(released[path], ours[path], rtol=1e-5, atol=1e-6, err_msg=path)
        assert not np.array_equal(released[path], flat(stepped["base"])[path])
    np.testing.assert_allclose(
        modules["semantic_head.proj.weight"].T, ours["semantic_head.proj.kernel"], rtol=0
    )


# -- through the command ------------------------------------------------------------------------------

STEPS = 4


@pytest.fixture(scope="module")
def command_env(tmp_path_factory, tiny_dataset, tiny_models):
    """The runs' working directory, environment and flags: the frozen encoders are random checkpoints
    made by shape (tiny_models' VAE and umT5, a SigLIP here), not generated by each run (minutes)."""
    root = tmp_path_factory.mktemp("lora_command")
    link_tiny_dataset(tiny_dataset, root)
    models = tiny_models[0]
    siglip_cfg = siglip.SiglipConfig.from_config(presets.SIGLIP["tiny"])
    params_io.save_params(
        str(root / "siglip"),
        random_params(lambda: siglip.SiglipVisionModel(siglip_cfg, rngs=nnx.Rngs(0)), 3),
        siglip.KIND,
        dataclasses.asdict(siglip_cfg),
    )
    environ = command_environ()
    args = [
        *tiny_train_args(STEPS),
        "--config.train.lora.rank=4",
        f"--config.checkpoint.init_from={models / 'dit'}",
        f"--config.model.checkpoints.vae={models / 'vae'}",
        f"--config.model.checkpoints.text_encoder={models / 'umt5'}",
        f"--config.model.checkpoints.siglip={root / 'siglip'}",
        "--config.model.checkpoints.tokenizer=data/synthetic/tokenizer",
        "--cpu-devices=2",
    ]
    return root, environ, args


def start(command_env, workdir):
    root, environ, args = command_env
    log = open(root / f"{os.path.basename(workdir)}.log.txt", "a")
    proc = subprocess.Popen(
        [sys.executable, "-m", "sama_jax.train", f"--workdir={workdir}", *args],
        cwd=root,
        env=environ,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    proc.log_path = log.name
    return proc


def finish(proc):
    proc.wait(timeout=900)
    with open(proc.log_path) as f:
        return proc.returncode, f.read()


def saved(workdir):
    path = os.path.join(workdir, run_dir.CHECKPOINTS)
    return sorted(int(d) for d in os.listdir(path) if d.isdigit()) if os.path.isdir(path) else []


@pytest.fixture(scope="module")
def lora_run(command_env):
    workdir = str(command_env[0] / "lora")
    code, out = finish(start(command_env, workdir))
    assert code == 0, out[-3000:]
    return workdir, out


def trained_items(workdir):
    """{params, ema: {path: array}} of a LoRA run's latest checkpoint, restored onto one device."""
    config = run_dir.read_config(workdir)
    abstract = lora_train.trained_abstract(config)
    items = {}
    for item in ("params", "ema"):
        tree, step = run_dir.restore_params(workdir, abstract, use_ema=item == "ema")
        items[item] = flat(tree)
    return step, items


@pytest.mark.slow
def test_the_tiny_preset_trains_a_lora_through_the_command(lora_run):
    workdir, out = lora_run
    assert f"done: step {STEPS}" in out
    # tiny: 2 layers x 10 Linears of rank 4 (64 -> 64, or 64 <-> 128 for the FFN).
    adapter_params = 2 * (8 * 4 * (64 + 64) + 2 * 4 * (64 + 128))
    assert f"{adapter_params:,} trained" in out
    step, items = trained_items(workdir)
    assert step == STEPS
    paths = set(items["params"])
    assert paths == {p[: -len(".kernel")] + f".lora.{s}" for p in TARGETED for s in "ab"}
    assert sorted(os.listdir(os.path.join(workdir, lora_train.LORA_DIR))) == [
        f"{s}.safetensors" for s in sorted(saved(workdir), key=str)
    ]


@pytest.mark.slow
def test_the_run_loads_merged_as_its_released_file_gives(lora_run, tiny_models):
    workdir, _ = lora_run
    run = run_dir.load_run(workdir)  # what sama-edit --run and sama-export --run edit with
    assert run.step == STEPS
    ours = flat(nnx.state(run.dit, nnx.Param))
    released = wan_dit.load_dit(str(tiny_models[0] / "dit"))
    base = flat(nnx.state(released, nnx.Param))
    lora_lib.merge_lora(released, lora_lib.read_lora(os.path.join(workdir, "lora", f"{STEPS}.safetensors")))
    released = flat(nnx.state(released, nnx.Param))
    for path, value in ours.items():
        np.testing.assert_allclose(value, released[path], rtol=1e-5, atol=1e-6, err_msg=path)
        assert np.array_equal(value, base[path]) == (path not in TARGETED), path


@pytest.mark.slow
def test_a_killed_lora_run_resumes_bitwise(command_env, lora_run):
    import time

    workdir = str(command_env[0] / "killed")
    proc = start(command_env, workdir)
    while 2 not in saved(workdir):
        assert proc.poll() is None, open(proc.log_path).read()[-3000:]
        time.sleep(0.1)
    proc.kill()
    proc.wait()
    assert max(saved(workdir)) < STEPS
    code, out = finish(start(command_env, workdir))
    assert code == 0 and "resumed from step 2" in out, out[-3000:]
    (step_a, a), (step_b, b) = trained_items(lora_run[0]), trained_items(workdir)
    assert step_a == step_b == STEPS
    for item in ("params", "ema"):
        assert set(a[item]) == set(b[item]) and len(a[item]) == 20
        for path in a[item]:
            np.testing.assert_array_equal(a[item][path], b[item][path], err_msg=f"{item} {path}")
    files = [
        lora_lib.read_lora(os.path.join(w, "lora", f"{STEPS}.safetensors")) for w in (lora_run[0], workdir)
    ]
    assert sorted(files[0]) == sorted(files[1]) and len(files[0]) == 40
    for key in files[0]:
        np.testing.assert_array_equal(files[0][key], files[1][key], err_msg=key)
