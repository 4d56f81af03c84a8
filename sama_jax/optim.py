"""The optimizer of sama-train from config: optax AdamW under a warmup + constant|cosine schedule,
after global-norm clipping; and the fp32 EMA of the parameters.

    tx = optim.make_optimizer(config)              # config.optimizer, config.schedule, train.steps
    lr = optim.learning_rate(config)(step)
    ema = optim.ema_update(ema, params, decay)     # in the step, after the update
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from sama_jax.config import ConfigError

DECAYS = ("constant", "cosine")


def learning_rate(config) -> optax.Schedule:
    """Linear warmup from 0 to optimizer.lr over schedule.warmup_steps, then constant or a cosine
    decay to schedule.end_lr_fraction * lr at train.steps."""
    lr, sched, steps = float(config.optimizer.lr), config.schedule, int(config.train.steps)
    warmup = int(sched.warmup_steps)
    if sched.decay not in DECAYS:
        raise ConfigError(f"schedule.decay={sched.decay!r}: use one of {DECAYS}")
    if warmup < 0 or (warmup >= steps and sched.decay == "cosine"):
        raise ConfigError(f"schedule.warmup_steps={warmup} must be in [0, train.steps={steps}) "
                          "for a cosine decay")
    if sched.decay == "constant":
        after = optax.constant_schedule(lr)
    else:
        after = optax.cosine_decay_schedule(lr, steps - warmup, alpha=float(sched.end_lr_fraction))
    if warmup == 0:
        return after
    return optax.join_schedules([optax.linear_schedule(0.0, lr, warmup), after], [warmup])


def make_optimizer(config) -> optax.GradientTransformation:
    opt = config.optimizer
    if opt.name != "adamw":
        raise ConfigError(f"optimizer.name={opt.name!r}: only 'adamw' is implemented")
    return optax.chain(
        optax.clip_by_global_norm(float(opt.grad_clip_norm)),
        optax.adamw(learning_rate(config), b1=float(opt.b1), b2=float(opt.b2), eps=float(opt.eps),
                    weight_decay=float(opt.weight_decay)))


def ema_init(params):
    return jax.tree.map(lambda p: p.astype(jnp.float32), params)


def ema_update(ema, params, decay: float):
    """ema <- decay * ema + (1 - decay) * params, in fp32 whatever the parameters' dtype."""
    return jax.tree.map(lambda e, p: decay * e + (1.0 - decay) * p.astype(jnp.float32), ema, params)
