"""Flow-matching samplers: Euler as the released SAMA pipeline runs it, UniPC as Wan2.1 runs it.

    schedule = make_schedule("euler", steps=50, shift=5.0)
    noise, semantic_noise = initial_noise(jax.random.key(seed), (1, 13, 60, 104, 16), (1, 65, 1152))
    denoiser = Denoiser(dit_velocity_fn(graphdef), "euler", cfg_mode="batch", guided=True)
    carry = denoiser.init(noise, semantic_noise)
    carry = denoiser.run(state, carry, cond, uncond, schedule, guidance=5.0)      # all steps
    video_latents, semantic = denoiser.output(carry)

Model interface: velocity_fn(params, x, timesteps (B,), cond, semantic) -> (v, v_semantic or None),
with `cond` any pytree of batch-leading arrays (for SAMA {"text": umT5 context, "source": clean
source latents}); classifier-free guidance swaps `cond` for `uncond` and keeps x and the semantic
state, so only what differs between the two (the text) needs to differ. Guidance combines both
outputs, v = v_u + g (v_c - v_u), for the video velocity and for the semantic velocity (the released
pipeline applies the same formula to both, reference/sama-official.md 4). cfg_mode "batch" runs the
two passes as one doubled batch (one model call, twice the activations: faster, shards over 'data'),
"sequential" as two calls (half the activation memory).

Euler (SAMA, DiffSynth FlowMatchScheduler(shift=5, sigma_min=0, extra_one_step=True)):
    s = linspace(1, 0, steps + 1)[:-1], s' = k s / (1 + (k - 1) s), then 0 after the last step;
    the model sees timestep bfloat16(1000 s') (512..1024 round to multiples of 4), x += v (s'_next - s').
UniPC (Wan2.1 FlowUniPCMultistepScheduler(shift=1).set_timesteps(steps, shift=k); order 2, bh2,
predict-x0, lower order at the final step, corrector at every step after the first):
    s = linspace(0.999, 0, steps + 1)[:-1] (0.999 = float32 sigma_max of the 1000-step grid), shifted,
    then 0; the model sees int64(1000 s') (Wan truncates); x0 = x - s' v is the data prediction.
UniPC's coefficients depend only on the sigmas, so they are computed once on the host (float64) and
the compiled loop is a fixed linear combination of the current sample, the last corrected sample and
the last two data predictions.

The loop is one jitted function (lax.fori_loop over [start, stop) with traced bounds): compiled once
per shape, never per step, and callable in chunks of steps so a host loop can report progress.
Noise: the video noise and the semantic noise both come from one jax key. The released SAMA code
seeds only the video noise (torch CPU generator from --seed) and draws the 65 x 1152 semantic noise
from the unseeded device RNG, so its edits are not reproducible from --seed alone; ours are.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
from flax import nnx

from sama_jax.flow_matching import NUM_TRAIN_TIMESTEPS, shift_sigma

SAMPLERS = ("euler", "unipc")
CFG_MODES = ("batch", "sequential")
# float32(1 - 1/1000): the first sigma of Wan's 1000-step training grid, where its sampler starts.
WAN_SIGMA_MAX = float(np.float32(1.0 - 1.0 / NUM_TRAIN_TIMESTEPS))

VelocityFn = Callable[..., tuple[jax.Array, Any]]


@dataclasses.dataclass(frozen=True)
class Schedule:
    """Per-step constants of a sampler: sigmas (steps + 1,) ending in 0, the model timesteps
    (steps,), and the solver coefficients (steps, 8) (Euler: only column 0, s'_next - s')."""

    sampler: str
    shift: float
    sigmas: np.ndarray
    timesteps: np.ndarray
    coefficients: np.ndarray

    @property
    def steps(self) -> int:
        return len(self.timesteps)


def euler_sigmas(steps: int, shift: float) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas (steps+1,), timesteps (steps,)) of the released SAMA pipeline, computed in float32
    as DiffSynth does, the timestep rounded to bfloat16 as it is before the model call."""
    s = np.linspace(1.0, 0.0, steps + 1, dtype=np.float32)[:-1]
    # A Python float shift against float32 sigmas computes in float32, as torch does.
    s = shift_sigma(s, float(shift)).astype(np.float32)
    timesteps = (s * np.float32(NUM_TRAIN_TIMESTEPS)).astype(ml_dtypes.bfloat16).astype(np.float32)
    return np.concatenate([s, [0.0]]).astype(np.float32), timesteps


def unipc_sigmas(steps: int, shift: float, sigma_max: float = WAN_SIGMA_MAX) -> tuple[np.ndarray, np.ndarray]:
    """(sigmas, timesteps) as Wan2.1's FlowUniPCMultistepScheduler.set_timesteps(steps, shift):
    float64 schedule, timesteps truncated to integers, sigmas stored as float32."""
    s = shift_sigma(np.linspace(sigma_max, 0.0, steps + 1)[:-1], shift)
    timesteps = (s * NUM_TRAIN_TIMESTEPS).astype(np.int64).astype(np.float32)
    return np.concatenate([s, [0.0]]).astype(np.float32), timesteps


def _lambda(sigma: float) -> float:
    """log-SNR of the flow parameterisation: log(alpha) - log(sigma), alpha = 1 - sigma."""
    return float(np.log1p(-sigma) - np.log(sigma))


def unipc_coefficients(sigmas: np.ndarray) -> np.ndarray:
    """(steps, 8) float32: per step i, corrector (E, A, B, C, D) and predictor (P, Q, R) with

        m_i   = x_i - s_i v_i                                   (data prediction at the raw sample)
        xc_i  = E x_i + A xc_{i-1} + B m_{i-1} + C m_{i-2} + D m_i    (UniC; xc_0 = x_0)
        x_i+1 = P xc_i + Q m_i + R m_{i-1}                      (UniP)

    Orders as diffusers/Wan with solver_order 2 and lower_order_final: the predictor runs order
    min(2, i + 1, steps - i); the corrector at step i runs the order of the predictor at i - 1."""
    s = np.asarray(sigmas, np.float64)
    steps = len(s) - 1
    if steps < 1 or s[-1] != 0 or np.any(s[:-1] <= 0) or np.any(s[:-1] >= 1):
        raise ValueError(f"UniPC needs sigmas in (0, 1) ending in one 0, got {sigmas}")
    order = [min(2, i + 1, steps - i) for i in range(steps)]
    out = np.zeros((steps, 8), np.float64)
    for i in range(steps):
        if i == 0:
            out[i, 0] = 1.0
        else:  # UniC: corrects xc_{i-1} -> x_i with m_i, from sigma s_{i-1} to s_i.
            h = _lambda(s[i]) - _lambda(s[i - 1])
            hh = -h
            h_phi_1 = np.expm1(hh)
            b_h = np.expm1(hh)  # bh2
            alpha = 1.0 - s[i]
            if order[i - 1] == 1:
                rho_prev, rho_t, rk = 0.0, 0.5, 1.0
            else:
                rk = (_lambda(s[i - 2]) - _lambda(s[i - 1])) / h
                h_phi_k = h_phi_1 / hh - 1.0
                b = [h_phi_k / b_h]
                h_phi_k = h_phi_k / hh - 1.0 / 2.0
                b.append(h_phi_k * 2.0 / b_h)
                rho_prev, rho_t = np.linalg.solve(np.array([[1.0, 1.0], [rk, 1.0]]), np.array(b))
            out[i, 1] = s[i] / s[i - 1]
            out[i, 2] = -alpha * h_phi_1 + alpha * b_h * (rho_prev / rk + rho_t)
            out[i, 3] = -alpha * b_h * rho_prev / rk
            out[i, 4] = -alpha * b_h * rho_t
        if s[i + 1] == 0:  # the step to sigma 0 (order 1) lands on the data prediction
            out[i, 5:8] = (0.0, 1.0, 0.0)
            continue
        h = _lambda(s[i + 1]) - _lambda(s[i])
        h_phi_1 = np.expm1(-h)
        b_h = np.expm1(-h)
        alpha = 1.0 - s[i + 1]
        out[i, 5] = s[i + 1] / s[i]
        out[i, 6] = -alpha * h_phi_1
        if order[i] == 2:
            rk = (_lambda(s[i - 1]) - _lambda(s[i])) / h
            out[i, 6] += alpha * b_h * 0.5 / rk
            out[i, 7] = -alpha * b_h * 0.5 / rk
    return out.astype(np.float32)


def make_schedule(sampler: str, steps: int, shift: float) -> Schedule:
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler {sampler!r} is not one of {SAMPLERS}")
    if int(steps) < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if shift <= 0:
        raise ValueError(f"shift must be positive, got {shift}")
    if sampler == "euler":
        sigmas, timesteps = euler_sigmas(int(steps), shift)
        coefficients = np.zeros((int(steps), 8), np.float32)
        coefficients[:, 0] = sigmas[1:] - sigmas[:-1]
    else:
        sigmas, timesteps = unipc_sigmas(int(steps), shift)
        coefficients = unipc_coefficients(sigmas)
    return Schedule(sampler, float(shift), sigmas, timesteps, coefficients)


def initial_noise(key: jax.Array, latent_shape, semantic_shape=None, dtype=jnp.float32):
    """(video noise, semantic noise or None) ~ N(0, I), both from `key`, drawn in float32 and cast
    (the released code draws float32 and casts to bf16)."""
    video_key, semantic_key = jax.random.split(key)
    x = jax.random.normal(video_key, tuple(latent_shape), jnp.float32).astype(dtype)
    semantic = None
    if semantic_shape is not None:
        semantic = jax.random.normal(semantic_key, tuple(semantic_shape), jnp.float32).astype(dtype)
    return x, semantic


def dit_velocity_fn(graphdef) -> VelocityFn:
    """velocity_fn for a WanDiT split as (graphdef, state): params is the state, cond holds "text"
    and optionally "source" (clean source latents)."""

    def velocity(state, x, timesteps, cond, semantic):
        model = nnx.merge(graphdef, state)
        return model(x, timesteps, cond["text"], source_latents=cond.get("source"), semantic_tokens=semantic)

    return velocity


def _tmap(fn, *trees):
    return jax.tree.map(fn, *trees)


class Denoiser:
    """The denoising loop of one sampler around one velocity function, jitted once.

    `run(params, carry, cond, uncond, schedule, guidance, start, stop)` advances steps [start, stop)
    (default all) and returns the new carry; the carry's buffers are donated. `traces` counts how
    often the loop was traced (compiled), for tests and for spotting shape churn."""

    def __init__(
        self, velocity_fn: VelocityFn, sampler: str = "euler", cfg_mode: str = "batch", guided: bool = True
    ):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler {sampler!r} is not one of {SAMPLERS}")
        if cfg_mode not in CFG_MODES:
            raise ValueError(f"cfg_mode {cfg_mode!r} is not one of {CFG_MODES}")
        self.velocity_fn = velocity_fn
        self.sampler = sampler
        self.cfg_mode = cfg_mode
        self.guided = guided
        self.traces = 0
        self._run = jax.jit(self._steps, donate_argnums=(1,))

    # -- state ---------------------------------------------------------------------------------
    def init(self, noise: jax.Array, semantic_noise: jax.Array | None = None) -> dict:
        """The carry before step 0. Euler keeps the sample in the noise's dtype (the released SAMA
        runs its latents and semantic state in bf16); UniPC runs in float32, as Wan does."""
        # Copies, so that donating the carry never invalidates the caller's noise arrays.
        state = _tmap(lambda t: jnp.array(t, copy=True), (noise, semantic_noise))
        if self.sampler == "euler":
            return {"x": state}
        zeros = lambda t: jnp.zeros(t.shape, jnp.float32)
        return {
            "x": _tmap(lambda t: t.astype(jnp.float32), state),
            "xc": _tmap(zeros, state),
            "m1": _tmap(zeros, state),
            "m2": _tmap(zeros, state),
        }

    def output(self, carry: dict):
        """(video latents, semantic state or None) after the last step."""
        return carry["x"]

    # -- one step ------------------------------------------------------------------------------
    def conditioning(self, cond, uncond):
        """What the model passes see, built once per call: cond alone (unguided), cond and uncond
        stacked on the batch axis (batch CFG), or both as they are (sequential CFG)."""
        if not self.guided:
            return cond
        if self.cfg_mode == "batch":
            return _tmap(lambda c, u: jnp.concatenate([c, u], axis=0), cond, uncond)
        return cond, uncond

    def velocity(self, params, state, timestep, passes, guidance):
        """Guided (video, semantic) velocities in float32 at one timestep; `passes` from
        `conditioning`. v = v_u + g (v_c - v_u), computed in float32."""
        x, semantic = state
        t = jnp.full((x.shape[0],), timestep, jnp.float32)
        f32 = lambda v: None if v is None else v.astype(jnp.float32)
        if not self.guided:
            v, vs = self.velocity_fn(params, x, t, passes, semantic)
            return f32(v), f32(vs)
        if self.cfg_mode == "batch":
            double = lambda a: None if a is None else jnp.concatenate([a, a], axis=0)
            v, vs = self.velocity_fn(params, double(x), double(t), passes, double(semantic))
            halves = lambda a: (None, None) if a is None else (a[: x.shape[0]], a[x.shape[0] :])
            (vc, vu), (vsc, vsu) = halves(v), halves(vs)
        else:
            vc, vsc = self.velocity_fn(params, x, t, passes[0], semantic)
            vu, vsu = self.velocity_fn(params, x, t, passes[1], semantic)
        combine = lambda c, u: None if c is None else f32(u) + guidance * (f32(c) - f32(u))
        return combine(vc, vu), combine(vsc, vsu)

    def _steps(self, params, carry, cond, uncond, sigmas, timesteps, coefficients, guidance, start, stop):
        self.traces += 1  # runs only while tracing
        passes = self.conditioning(cond, uncond)

        def euler(params, i, carry):
            x = carry["x"]
            v = self.velocity(params, x, timesteps[i], passes, guidance)
            dt = coefficients[i, 0]
            step = lambda a, u: (a.astype(jnp.float32) + u * dt).astype(a.dtype)
            return {"x": _tmap(step, x, v)}

        def unipc(params, i, carry):
            x = carry["x"]
            v = self.velocity(params, x, timesteps[i], passes, guidance)
            e, a, b, c, d, p, q, r = (coefficients[i, k] for k in range(8))
            m = _tmap(lambda xi, vi: xi - sigmas[i] * vi, x, v)
            xc = _tmap(
                lambda xi, xp, m1, m2, mi: e * xi + a * xp + b * m1 + c * m2 + d * mi,
                x,
                carry["xc"],
                carry["m1"],
                carry["m2"],
                m,
            )
            nxt = _tmap(lambda xci, mi, m1: p * xci + q * mi + r * m1, xc, m, carry["m1"])
            return {"x": nxt, "xc": xc, "m1": m, "m2": carry["m1"]}

        step = euler if self.sampler == "euler" else unipc

        # The parameters travel in the loop carry, unchanged: NNX refuses to use variables whose
        # values are tracers of the enclosing jit inside the loop body.
        def body(i, loop):
            params, carry = loop
            return params, step(params, i, carry)

        return jax.lax.fori_loop(start, stop, body, (params, carry))[1]

    def run(
        self,
        params,
        carry: dict,
        cond,
        uncond,
        schedule: Schedule,
        guidance: float = 5.0,
        start: int = 0,
        stop: int | None = None,
    ) -> dict:
        if schedule.sampler != self.sampler:
            raise ValueError(f"schedule is for {schedule.sampler!r}, this denoiser runs {self.sampler!r}")
        stop = schedule.steps if stop is None else stop
        if not 0 <= start <= stop <= schedule.steps:
            raise ValueError(f"steps [{start}, {stop}) are outside the schedule's {schedule.steps}")
        if self.guided and uncond is None:
            raise ValueError("guided sampling needs uncond (the negative-prompt conditioning)")
        return self._run(
            params,
            carry,
            cond,
            uncond,
            jnp.asarray(schedule.sigmas),
            jnp.asarray(schedule.timesteps),
            jnp.asarray(schedule.coefficients),
            jnp.float32(guidance),
            jnp.int32(start),
            jnp.int32(stop),
        )


def sample(
    velocity_fn: VelocityFn,
    params,
    noise,
    semantic_noise,
    cond,
    uncond,
    schedule: Schedule,
    guidance: float = 5.0,
    cfg_mode: str = "batch",
):
    """All steps in one call: -> (video latents, semantic state or None). guidance 1 (or uncond
    None) runs the conditional pass only."""
    guided = uncond is not None and guidance != 1.0
    denoiser = Denoiser(velocity_fn, schedule.sampler, cfg_mode, guided)
    carry = denoiser.run(params, denoiser.init(noise, semantic_noise), cond, uncond, schedule, guidance)
    return denoiser.output(carry)
