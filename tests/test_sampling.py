"""Samplers against diffusers' schedulers configured as the SAMA / Wan pipelines use them, and
against hand computations, on a toy linear velocity field."""

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from sama_jax import sampling

SHAPE = (1, 2, 4, 4, 3)  # (B, F, H, W, C) latents
SEM_SHAPE = (1, 5, 6)  # (B, N, semantic_dim)


def toy_params(rng):
    c, d = SHAPE[-1], SEM_SHAPE[-1]
    return dict(
        a=(-0.4 * np.eye(c) + 0.1 * rng.standard_normal((c, c))).astype(np.float32),
        b=rng.standard_normal(c).astype(np.float32),
        a_sem=(-0.3 * np.eye(d) + 0.1 * rng.standard_normal((d, d))).astype(np.float32),
    )


def toy_velocity(params, x, t, cond, semantic):
    """v = x A + (t/1000) b + mean(text); semantic v = s A_sem + mean(text). Works on numpy and jax."""
    xp = jnp if isinstance(x, jax.Array) else np
    shift = xp.mean(cond["text"], axis=(1, 2))
    scale = (t / 1000.0).reshape(-1, 1, 1, 1, 1)
    v = x @ params["a"] + scale * params["b"] + shift.reshape(-1, 1, 1, 1, 1)
    vs = None if semantic is None else semantic @ params["a_sem"] + shift.reshape(-1, 1, 1)
    return v, vs


def bf16(t):
    return np.asarray(np.float32(t)).astype(ml_dtypes.bfloat16).astype(np.float32)


@pytest.fixture
def problem(rng):
    params = toy_params(rng)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    sem = rng.standard_normal(SEM_SHAPE).astype(np.float32)
    cond = {"text": rng.standard_normal((1, 3, 4)).astype(np.float32)}
    uncond = {"text": rng.standard_normal((1, 3, 4)).astype(np.float32)}
    return params, noise, sem, cond, uncond


def run_ours(problem, sampler, steps, shift=5.0, per_step=False, guided=False, guidance=1.0):
    params, noise, sem, cond, uncond = problem
    schedule = sampling.make_schedule(sampler, steps, shift)
    den = sampling.Denoiser(toy_velocity, sampler, guided=guided)
    carry = den.init(jnp.asarray(noise), jnp.asarray(sem))
    if not per_step:
        return den.output(den.run(params, carry, cond, uncond, schedule, guidance)), den
    out = []
    for i in range(steps):
        carry = den.run(params, carry, cond, uncond, schedule, guidance, start=i, stop=i + 1)
        out.append(jax.tree.map(np.asarray, den.output(carry)))
    return out, den


def test_euler_schedule_is_the_released_one():
    s = sampling.make_schedule("euler", 50, 5.0)
    assert s.sigmas.shape == (51,) and s.sigmas[0] == 1.0 and s.sigmas[-1] == 0.0
    np.testing.assert_allclose(s.sigmas[[1, 49]], [0.99593, 0.09259], atol=1e-5)
    # bf16 timestep: multiples of 4 in [512, 1024), of 2 in [256, 512), rounded to nearest.
    t = s.timesteps
    assert t[0] == 1000.0 and t[1] == 996.0  # 995.93 -> 996
    np.testing.assert_array_equal(t[t >= 512] % 4, 0)
    np.testing.assert_array_equal(t[(t >= 256) & (t < 512)] % 2, 0)
    np.testing.assert_allclose(t, 1000 * s.sigmas[:-1], atol=2.0)
    assert np.any(t != 1000 * s.sigmas[:-1])  # the quantisation is not a no-op
    np.testing.assert_array_equal(t, [bf16(1000 * x) for x in s.sigmas[:-1]])


def test_unipc_schedule_is_wans():
    s = sampling.make_schedule("unipc", 50, 5.0)
    first = 5 * 0.999 / (1 + 4 * 0.999)
    np.testing.assert_allclose(s.sigmas[0], first, rtol=1e-6)
    assert s.timesteps[0] == np.floor(1000 * first) == 999.0 and s.sigmas[-1] == 0.0
    np.testing.assert_array_equal(s.timesteps, np.floor(s.timesteps))


def test_euler_matches_diffusers_and_the_hand_computation(problem):
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler

    params, noise, sem, cond, _ = problem
    steps = 6
    ours, den = run_ours(problem, "euler", steps, per_step=True)
    assert den.traces == 1  # six chunked calls, one compilation

    sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=5.0)
    sched.set_timesteps(sigmas=np.linspace(1, 0, steps + 1)[:-1].tolist())
    x, s = torch.from_numpy(noise.copy()), torch.from_numpy(sem.copy())
    hand_x, hand_s = noise.astype(np.float64), sem.astype(np.float64)
    sig = np.linspace(1, 0, steps + 1)
    sig = np.append(5 * sig[:-1] / (1 + 4 * sig[:-1]), 0.0)
    for i, t in enumerate(sched.timesteps):
        tb = bf16(float(t))  # the released pipeline's cast
        v, vs = toy_velocity(params, x.numpy(), np.array([tb]), cond, s.numpy())
        x = sched.step(torch.from_numpy(v), t, x).prev_sample
        sched._step_index -= 1  # the same step for the semantic state
        s = sched.step(torch.from_numpy(vs), t, s).prev_sample
        hv, hvs = toy_velocity(params, hand_x, np.array([bf16(1000 * sig[i])]), cond, hand_s)
        hand_x = hand_x + hv * (sig[i + 1] - sig[i])
        hand_s = hand_s + hvs * (sig[i + 1] - sig[i])
        np.testing.assert_allclose(ours[i][0], x.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours[i][1], s.numpy(), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ours[i][0], hand_x, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(ours[i][1], hand_s, rtol=1e-4, atol=1e-5)


def diffusers_unipc(problem, steps, sigmas=None):
    """diffusers' UniPCMultistepScheduler as diffusers' WanPipeline configures it (flow sigmas,
    flow_prediction), optionally on Wan's own sigma list; the semantic state stepped alongside."""
    import torch
    from diffusers import UniPCMultistepScheduler

    params, noise, sem, cond, _ = problem
    make = lambda: UniPCMultistepScheduler(
        num_train_timesteps=1000,
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=5.0,
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
        lower_order_final=True,
        final_sigmas_type="zero",
    )
    video, semantic = make(), make()
    for sched in (video, semantic):
        sched.set_timesteps(steps, sigmas=sigmas)
    x, s = torch.from_numpy(noise.copy()), torch.from_numpy(sem.copy())
    out = []
    for t in video.timesteps:
        v, vs = toy_velocity(params, x.numpy(), np.array([float(t)]), cond, s.numpy())
        x = video.step(torch.from_numpy(v), t, x).prev_sample
        s = semantic.step(torch.from_numpy(vs), t, s).prev_sample
        out.append((x.numpy(), s.numpy()))
    return out, video


@pytest.mark.parametrize("steps", [1, 2, 7])
def test_unipc_matches_diffusers_on_wans_schedule(problem, steps):
    wan_unshifted = np.linspace(sampling.WAN_SIGMA_MAX, 0, steps + 1)[:-1]
    ref, sched = diffusers_unipc(problem, steps, sigmas=wan_unshifted)
    ours, den = run_ours(problem, "unipc", steps, per_step=True)
    schedule = sampling.make_schedule("unipc", steps, 5.0)
    np.testing.assert_allclose(schedule.sigmas, sched.sigmas.numpy(), rtol=1e-7)
    np.testing.assert_array_equal(schedule.timesteps, sched.timesteps.numpy())
    assert den.traces == 1
    for (x, s), (rx, rs) in zip(ours, ref):
        np.testing.assert_allclose(x, rx, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(s, rs, rtol=1e-4, atol=1e-5)


def test_unipc_coefficients_match_diffusers_on_its_default_schedule(problem):
    """The solver is schedule-agnostic: diffusers' own flow sigmas (linspace(1, 1/1000)) too."""
    steps = 5
    ref, sched = diffusers_unipc(problem, steps)
    params, noise, sem, cond, uncond = problem
    sigmas = sched.sigmas.numpy()
    schedule = sampling.Schedule(
        "unipc", 5.0, sigmas, sched.timesteps.numpy().astype(np.float32), sampling.unipc_coefficients(sigmas)
    )
    den = sampling.Denoiser(toy_velocity, "unipc", guided=False)
    x, s = den.output(den.run(params, den.init(jnp.asarray(noise), jnp.asarray(sem)), cond, None, schedule))
    np.testing.assert_allclose(x, ref[-1][0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(s, ref[-1][1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("mode", sampling.CFG_MODES)
def test_cfg_combines_video_and_semantic_velocities(problem, mode):
    params, noise, sem, cond, uncond = problem
    g = 4.0
    den = sampling.Denoiser(toy_velocity, "euler", cfg_mode=mode, guided=True)
    sched = sampling.make_schedule("euler", 3, 5.0)
    x, s = den.output(
        den.run(params, den.init(jnp.asarray(noise), jnp.asarray(sem)), cond, uncond, sched, g, stop=1)
    )
    t = np.array([sched.timesteps[0]])
    vc, vsc = toy_velocity(params, noise, t, cond, sem)
    vu, vsu = toy_velocity(params, noise, t, uncond, sem)
    dt = sched.sigmas[1] - sched.sigmas[0]
    np.testing.assert_allclose(x, noise + (vu + g * (vc - vu)) * dt, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(s, sem + (vsu + g * (vsc - vsu)) * dt, rtol=1e-5, atol=1e-6)
    # Guidance really differs from the conditional pass alone.
    assert np.abs(np.asarray(x) - (noise + vc * dt)).max() > 1e-3


def test_batch_and_sequential_cfg_agree_and_compile_once(problem):
    params, noise, sem, cond, uncond = problem
    sched = sampling.make_schedule("unipc", 4, 5.0)
    outs = []
    for mode in sampling.CFG_MODES:
        den = sampling.Denoiser(toy_velocity, "unipc", cfg_mode=mode)
        carry = den.init(jnp.asarray(noise), jnp.asarray(sem))
        for start, stop in ((0, 1), (1, 3), (3, 4)):
            carry = den.run(params, carry, cond, uncond, sched, 5.0, start, stop)
        assert den.traces == 1
        outs.append(den.output(carry))
        # A different guidance value reuses the compiled loop too.
        den.run(params, den.init(jnp.asarray(noise), jnp.asarray(sem)), cond, uncond, sched, 2.0)
        assert den.traces == 1
    np.testing.assert_allclose(outs[0][0], outs[1][0], rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(outs[0][1], outs[1][1], rtol=1e-5, atol=1e-6)


def test_bf16_state_and_no_semantic_tokens(problem):
    params, noise, _, cond, uncond = problem
    sched = sampling.make_schedule("euler", 4, 5.0)
    x, s = sampling.sample(
        toy_velocity, params, jnp.asarray(noise, jnp.bfloat16), None, cond, uncond, sched, 5.0
    )
    assert s is None and x.dtype == jnp.bfloat16
    x32, _ = sampling.sample(toy_velocity, params, jnp.asarray(noise), None, cond, uncond, sched, 5.0)
    np.testing.assert_allclose(np.asarray(x, np.float32), x32, rtol=0.05, atol=0.05)


def test_noise_is_seeded_for_video_and_semantic_tokens():
    a = sampling.initial_noise(jax.random.key(1), (1, 2, 4, 4, 16), (1, 65, 32))
    b = sampling.initial_noise(jax.random.key(1), (1, 2, 4, 4, 16), (1, 65, 32))
    c = sampling.initial_noise(jax.random.key(2), (1, 2, 4, 4, 16), (1, 65, 32))
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.allclose(a[0], c[0]) and not np.allclose(a[1], c[1])
    assert abs(float(jnp.std(a[1])) - 1) < 0.1


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="sampler 'ddim'"):
        sampling.make_schedule("ddim", 10, 5.0)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        sampling.make_schedule("euler", 0, 5.0)
    with pytest.raises(ValueError, match="cfg_mode"):
        sampling.Denoiser(toy_velocity, "euler", cfg_mode="parallel")
