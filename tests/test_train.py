"""The train step as a library: it lowers the loss, skips non-finite updates, and the sharded step
equals the single-device one. Tiny preset, hand-made 1-frame batches with precomputed text features
(so the test builds no text encoder), 8 simulated devices."""

import os

import jax
import numpy as np
import pytest
from flax import nnx

from sama_jax import config as config_lib
from sama_jax import dit_cost, optim, run_dir, sharding, train_step
from sama_jax import encoders as encoders_lib
from sama_jax.models import wan_dit

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "configs")
BATCH = 8


def tiny_config(**overrides):
    config = config_lib.build_config(
        f"{CONFIGS}/stage1_sft.py:tiny",
        [("data.features", "('text',)"), ("train.steps", "8"), ("optimizer.lr", "3e-3"), *overrides.items()],
    )
    return config


def make_batch(config, seed=0, nan=False):
    rng = np.random.default_rng(seed)
    dit = config.model.dit
    text = rng.standard_normal((BATCH, dit.text_len, dit.text_dim)).astype(np.float32)
    if nan:
        text[3, 0, 0] = np.nan
    return {
        "source": rng.integers(0, 255, (BATCH, 1, 32, 32, 3), dtype=np.uint8),
        "target": rng.integers(0, 255, (BATCH, 1, 32, 32, 3), dtype=np.uint8),
        "anchors": rng.integers(0, 255, (BATCH, 1, 32, 32, 3), dtype=np.uint8),
        "valid": np.ones((BATCH,), bool),
        "features/text": text,
    }


def build(config, devices=None):
    mesh = sharding.create_mesh(config.mesh, devices=devices)
    rules = sharding.axis_rules(config.sharding_rules)
    encoders = encoders_lib.build(config, nnx.Rngs(1), names=encoders_lib.needed(config, training=True))
    sharding.shard_module(encoders, mesh, rules)
    dit_cfg = wan_dit.WanDiTConfig.from_config(config.model.dit, config.precision)
    graphdef, abstract, rest = run_dir.abstract_params(dit_cfg, mesh, rules)
    parts = train_step.StepParts.build(config, mesh, rules, nnx.merge(graphdef, abstract, rest), encoders)
    params = run_dir.initial_params(config, abstract, mesh, rules, say=lambda m: None)
    return parts, parts.init_state(params), train_step.make_train_step(config, parts), mesh, rules


@pytest.fixture(scope="module")
def trained():
    """8 steps on one fixed batch, with the fixed-sigma loss before and after."""
    config = tiny_config()
    parts, state, step, mesh, rules = build(config)
    batch = sharding.shard_batch(make_batch(config), mesh, rules)
    prepare, loss_fn = train_step.make_objective(
        config, parts.dit_graphdef, parts.dit_rest, parts.encoder_graphdef
    )

    @jax.jit
    def fixed_loss(params, encoder_state):
        return loss_fn(params, prepare(encoder_state, batch, jax.random.PRNGKey(7), 0.5))[0]

    with sharding.use_mesh(mesh, rules):
        before = float(fixed_loss(state["params"], parts.encoder_state))
    initial = jax.device_get(state["params"])
    fresh = jax.tree.map(lambda x: x.copy(), state)  # the step donates its input state
    metrics = []
    for _ in range(8):
        state, m = step(state, parts.encoder_state, batch)
        metrics.append(jax.device_get(m))
    with sharding.use_mesh(mesh, rules):
        after = float(fixed_loss(state["params"], parts.encoder_state))
    return dict(
        config=config,
        parts=parts,
        state=state,
        step=step,
        mesh=mesh,
        rules=rules,
        before=before,
        after=after,
        initial=initial,
        metrics=metrics,
        fresh=fresh,
    )


@pytest.mark.slow
def test_steps_lower_the_loss_on_a_fixed_batch(trained):
    assert trained["after"] < 0.9 * trained["before"], (trained["before"], trained["after"])
    metrics = trained["metrics"]
    assert all(m["finite"] == 1.0 and m["skipped_updates"] == 0 for m in metrics)
    assert int(trained["state"]["step"]) == 8
    # Warmup of 2 steps, then constant: the rates the updates used.
    np.testing.assert_allclose([m["lr"] for m in metrics[:3]], [0.0, 1.5e-3, 3e-3], rtol=1e-6)
    assert all(m["update_norm"] > 0 and m["grad_norm"] > 0 for m in metrics[1:])


@pytest.mark.slow
def test_ema_follows_the_parameters_in_fp32(trained):
    state, initial = trained["state"], trained["initial"]
    decay = trained["config"].optimizer.ema_decay
    params, ema = jax.device_get(state["params"]), jax.device_get(state["ema"])
    for e, _p, _p0 in zip(jax.tree.leaves(ema), jax.tree.leaves(params), jax.tree.leaves(initial)):
        assert e.dtype == np.float32
    # After 8 updates with decay 0.99 the EMA has moved from the start, far less than the params.
    moved = lambda a, b: float(
        np.sqrt(sum(np.sum((x - y) ** 2) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))))
    )
    assert 0 < moved(ema, initial) < 0.2 * moved(params, initial)
    assert decay == 0.99


@pytest.mark.slow
def test_a_nan_in_the_batch_is_skipped_and_counted(trained):
    config, parts, mesh, rules = trained["config"], trained["parts"], trained["mesh"], trained["rules"]
    state = jax.tree.map(lambda x: x.copy(), trained["state"])  # the fixture's state stays valid
    before = jax.device_get(state)
    bad = sharding.shard_batch(make_batch(config, nan=True), mesh, rules)
    for n in (1, 2):
        state, metrics = trained["step"](state, parts.encoder_state, bad)
        metrics = jax.device_get(metrics)
        assert metrics["finite"] == 0.0 and metrics["skipped_updates"] == n
        assert metrics["nonfinite_in_row"] == n
    after = jax.device_get(state)
    for name in ("params", "opt_state", "ema"):
        for a, b in zip(jax.tree.leaves(before[name]), jax.tree.leaves(after[name])):
            np.testing.assert_array_equal(a, b)
    assert int(after["step"]) == int(before["step"]) + 2
    good = sharding.shard_batch(make_batch(config, seed=1), mesh, rules)
    state, metrics = trained["step"](state, parts.encoder_state, good)
    metrics = jax.device_get(metrics)
    assert metrics["finite"] == 1.0 and metrics["nonfinite_in_row"] == 0 and metrics["skipped_updates"] == 2
    # AdamW's count skipped the two bad steps: the good one ran at the rate of update 9.
    assert metrics["lr"] == pytest.approx(float(optim.learning_rate(config)(8)))


@pytest.mark.slow
def test_sharded_step_equals_single_device_step(trained):
    config = trained["config"]
    batch = make_batch(config, seed=2)
    results = []
    # 8 devices: the fixture's compiled step from its initial state; then the same on one device.
    runs = [
        (
            trained["parts"],
            jax.tree.map(lambda x: x.copy(), trained["fresh"]),
            trained["step"],
            trained["mesh"],
            trained["rules"],
        ),
        build(config, jax.devices()[:1]),
    ]
    for parts, state, step, mesh, rules in runs:
        for _ in range(2):
            state, metrics = step(state, parts.encoder_state, sharding.shard_batch(batch, mesh, rules))
        results.append((jax.device_get(state["params"]), jax.device_get(metrics)))
    (p8, m8), (p1, m1) = results
    assert m8["loss"] == pytest.approx(m1["loss"], rel=1e-5)
    for a, b in zip(jax.tree.leaves(p8), jax.tree.leaves(p1)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


@pytest.mark.slow
def test_gradient_accumulation_equals_the_whole_batch(trained):
    """grad_accum=2 (micro-batches of 4 on 4 devices) against the fixture's whole-batch step on 8:
    the same loss, gradient norm and parameters, with a padded sample making the two micro-batches'
    valid counts unequal (sample 0 is in micro-batch 0)."""
    batch = make_batch(trained["config"], seed=3)
    batch["valid"][0] = False
    whole = jax.tree.map(lambda x: x.copy(), trained["fresh"])
    accumulated = build(tiny_config(**{"train.grad_accum": "2"}), jax.devices()[:4])
    results = []
    for parts, state, step, mesh, rules in [
        (trained["parts"], whole, trained["step"], trained["mesh"], trained["rules"]),
        accumulated,
    ]:
        for _ in range(2):  # the first update runs at warmup's rate 0
            state, metrics = step(state, parts.encoder_state, sharding.shard_batch(batch, mesh, rules))
        results.append((jax.device_get(state["params"]), jax.device_get(metrics)))
    (p1, m1), (p2, m2) = results
    assert m1["update_norm"] > 0
    for name in ("loss", "loss_fm", "loss_semantic", "grad_norm"):
        assert m2[name] == pytest.approx(m1[name], rel=1e-5), name
    assert m1["valid_fraction"] == m2["valid_fraction"] == 7 / 8
    for a, b in zip(jax.tree.leaves(p1), jax.tree.leaves(p2)):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6)


def test_bad_train_settings_are_named_before_building():
    with pytest.raises(config_lib.ConfigError, match="train.grad_accum=3"):
        train_step.check_config(tiny_config(**{"train.grad_accum": "3"}), 8)
    with pytest.raises(config_lib.ConfigError, match="not divisible by the 8 devices"):
        train_step.check_config(tiny_config(**{"train.grad_accum": "2"}), 8)
    with pytest.raises(config_lib.ConfigError, match="train.loss_weighting='bump'"):
        train_step.check_config(tiny_config(**{"train.loss_weighting": "bump"}), 8)
    with pytest.raises(
        config_lib.ConfigError, match=r"train.image_batch_size / train.grad_accum = 6 .* 4 devices"
    ):
        train_step.check_config(tiny_config(**{"train.image_batch_size": "12", "train.grad_accum": "2"}), 4)
    with pytest.raises(
        config_lib.ConfigError, match="train.image_batch_size=20 is not divisible by the 8 proc"
    ):
        train_step.check_config(tiny_config(**{"train.image_batch_size": "20"}), 4, 8)
    sizes = train_step.batch_sizes(tiny_config(**{"train.image_batch_size": "0"}))
    assert sizes == {"video": 8, "image": 8}
    # Tiny: 5 frames = 2 latent frames, so 16 images per batch of 8 videos hold as many tokens.
    assert train_step.image_batch_warning(tiny_config()) == ""
    too_many = train_step.image_batch_warning(tiny_config(**{"train.image_batch_size": "24"}))
    assert "train.image_batch_size=24" in too_many and "at most 16" in too_many


def test_schedule_warmup_then_cosine():
    config = tiny_config(
        **{
            "schedule.decay": "cosine",
            "schedule.warmup_steps": "2",
            "train.steps": "10",
            "optimizer.lr": "1.0",
        }
    )
    lr = optim.learning_rate(config)
    np.testing.assert_allclose([float(lr(s)) for s in (0, 1, 2, 6, 10)], [0.0, 0.5, 1.0, 0.5, 0.0], atol=1e-6)


def test_gaussian_bump_weight_has_mean_one_on_the_training_grid():
    from sama_jax import flow_matching

    sigmas = np.linspace(1.0, 0.0, 1001)[:-1]
    t = 1000 * np.asarray(flow_matching.shift_sigma(sigmas, 5.0))
    w = np.asarray(flow_matching.gaussian_bump_weight(t, 5.0))
    assert w.mean() == pytest.approx(1.0, rel=1e-5) and w.min() == pytest.approx(0.0, abs=1e-6)
    assert np.argmax(w) == np.argmin(np.abs(t - 500))


def test_flops_formula_matches_the_anchor():
    # anchors.md: 1.3B, 15,600 video tokens, L = 512: forward 0.215 s at 50% of 800 TFLOP/s.
    cfg = wan_dit.WanDiTConfig.from_config(
        dict(config_lib.build_config(f"{CONFIGS}/stage1_sft.py:wan_1_3b").model.dit)
    )
    forward = dit_cost.train_flops(cfg, 15_600, cfg.text_len) / 3
    assert forward / 0.215 / 800e12 == pytest.approx(0.50, abs=0.02)
    assert dit_cost.video_tokens(17, 480, 832, (1, 2, 2)) == 5 * 30 * 52
