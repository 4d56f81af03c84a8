"""The train state and the jitted, sharded train step of sama-train.

    parts = train_step.StepParts.build(config, mesh, rules, dit_graphdef, encoders)
    state = parts.init_state(params)                 # sharded; or checkpointing.restore(...)
    step = train_step.make_train_step(config, parts)
    state, metrics = step(state, parts.encoder_state, batch)   # batch: sharding.shard_batch(...)

The state is a dict of pytrees: params (the DiT parameters it trains, an nnx.State: every nnx.Param,
or a LoRA run's adapters and extra modules, lora_train.trainable_filter), opt_state (optax), ema
(fp32 copy of params), and scalars step, rng (the run's base key; step s uses fold_in(rng, s)),
skipped_updates and nonfinite_in_row. Everything the step needs is in it, so a resumed run repeats
an uninterrupted one bit for bit.

The step (jax.jit, explicit in/out shardings, state donated): the frozen encoders make the DiT inputs
from the batch (conditioning.dit_inputs), one shifted sigma per sample noises the target latents and
the semantic tokens, the loss is SAMA's (flow_matching.sama_loss, weighted by the batch's `valid`),
accumulated over train.grad_accum micro-batches with lax.scan (the same loss and gradient as the
whole batch at once: per-sample noise keys, micro-batches weighted by their valid samples),
clipped, AdamW, EMA. The frozen DiT parameters (a LoRA run's base) are an input the step holds
(TrainStep.frozen), like the encoders' state: no gradient, optimizer state or EMA. A step whose loss or
gradient norm is not finite leaves params, opt_state and ema as they were and is counted.

Abstract use (benchmarks): build the parts from an abstract DiT/encoders (nnx.eval_shape), then
step.lower(abstract_state, abstract_encoder_state, abstract_batch).compile().memory_analysis().
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import optax
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from sama_jax import conditioning, dit_cost, flow_matching, lora_train, optim, sharding
from sama_jax.config import ConfigError
from sama_jax.features import BATCH_PREFIX

LOSS_WEIGHTINGS = ("none", "gaussian_bump")
SCALARS = ("step", "skipped_updates", "nonfinite_in_row")


def batch_sizes(config) -> dict[str, int]:
    """The global batch sizes: {"video": train.batch_size, "image": train.image_batch_size} (image
    edits, single-frame batches; 0 = train.batch_size)."""
    batch = int(config.train.batch_size)
    return {"video": batch, "image": int(config.train.get("image_batch_size", 0)) or batch}


def check_config(config, num_batch_shards: int, num_processes: int = 1) -> None:
    """Bad train settings, named before anything is built."""
    train = config.train
    if train.loss_weighting not in LOSS_WEIGHTINGS:
        raise ConfigError(f"train.loss_weighting={train.loss_weighting!r}: use one of {LOSS_WEIGHTINGS}")
    lora_train.check_config(config)
    accum = int(train.grad_accum)
    if accum < 1:
        raise ConfigError(f"train.grad_accum={accum} must be >= 1")
    for kind, batch in batch_sizes(config).items():
        key = "train.batch_size" if kind == "video" else "train.image_batch_size"
        if batch < 1:
            raise ConfigError(f"{key}={batch} must be >= 1")
        if batch % accum:
            raise ConfigError(f"train.grad_accum={accum} must divide {key}={batch}")
        if (batch // accum) % num_batch_shards:
            raise ConfigError(
                f"{key} / train.grad_accum = {batch // accum} samples per "
                f"micro-batch is not divisible by the {num_batch_shards} devices the batch "
                f"is sharded over (mesh data x fsdp): change {key} or the mesh"
            )
        if batch % num_processes:
            raise ConfigError(f"{key}={batch} is not divisible by the {num_processes} processes")


def image_batch_warning(config) -> str:
    """A warning when an image-edit batch would hold more tokens than a video batch (an image is
    one latent frame, an F-frame video 1 + (F - 1) / 4): a layout sized for the video step may not
    hold the image step. Empty when it does not."""
    sizes = batch_sizes(config)
    latent_frames = dit_cost.latent_frames(int(config.data.num_frames))
    limit = sizes["video"] * latent_frames
    if sizes["image"] <= limit:
        return ""
    return (
        f"train.image_batch_size={sizes['image']} puts more tokens in an image batch than "
        f"train.batch_size={sizes['video']} puts in a video batch of data.num_frames="
        f"{config.data.num_frames} ({latent_frames} latent frames per video, 1 per image): a mesh "
        f"sized for the video step may run out of memory on image batches; at most {limit} keeps "
        "them within it"
    )


def batch_axes(rules) -> Any:
    return sharding.logical_to_mesh_spec(("batch",), rules)[0]


@dataclasses.dataclass
class StepParts:
    """What the step is built from: graph definitions, shardings, the frozen encoders' state."""

    mesh: jax.sharding.Mesh
    rules: Any
    dit_graphdef: Any
    dit_rest: Any  # the DiT's non-parameter variables (none today), unchanged
    # The DiT's parameters split by lora_train.trainable_filter: what the optimizer trains (values, or
    # abstract), and the frozen rest the step holds (a LoRA run's base, in frozen_param_dtype; empty
    # for a full fine-tune).
    dit_trainable: Any
    dit_frozen: Any
    dit_frozen_shardings: Any
    encoder_graphdef: Any
    encoder_state: Any  # sharded arrays (or abstract ones for a benchmark)
    encoder_shardings: Any
    state_shardings: dict
    batch_sharding: NamedSharding
    tx: optax.GradientTransformation
    seed: int

    @classmethod
    def build(cls, config, mesh, rules, dit: nnx.Module, encoders: nnx.Module) -> "StepParts":
        """dit, encoders: real (sharded) or abstract modules."""
        dit_graphdef, params, rest = nnx.split(dit, nnx.Param, ...)
        params, frozen = nnx.split_state(params, lora_train.trainable_filter(config), ...)
        params = lora_train.with_dtype(params, jnp.dtype(config.precision.param_dtype))
        frozen = lora_train.with_dtype(frozen, jnp.dtype(config.precision.frozen_param_dtype))
        encoder_graphdef, encoder_state = nnx.split(encoders)
        tx = optim.make_optimizer(config)
        abstract = jax.eval_shape(lambda p: _init(p, tx, 0), params)
        replicated = NamedSharding(mesh, PartitionSpec())
        param_shardings = sharding.state_shardings(params, mesh, rules)
        state_shardings = dict(
            params=param_shardings,
            ema=param_shardings,
            opt_state=sharding.logical_shardings(nnx.get_partition_spec(abstract["opt_state"]), mesh, rules),
            rng=replicated,
            **{k: replicated for k in SCALARS},
        )
        return cls(
            mesh,
            rules,
            dit_graphdef,
            rest,
            params,
            frozen,
            sharding.state_shardings(frozen, mesh, rules),
            encoder_graphdef,
            encoder_state,
            sharding.state_shardings(encoder_state, mesh, rules),
            state_shardings,
            NamedSharding(mesh, PartitionSpec(batch_axes(rules))),
            tx,
            int(config.seed),
        )

    def init_state(self, params) -> dict:
        """A fresh train state (optimizer, EMA, counters) around params, placed on the mesh."""
        return jax.jit(lambda p: _init(p, self.tx, self.seed), out_shardings=self.state_shardings)(params)

    def abstract_state(self, params) -> dict:
        """The state's ShapeDtypeStructs with their shardings (checkpoint restore, benchmarks);
        params: the DiT's nnx.Param state, real or abstract."""
        shapes = jax.eval_shape(lambda p: _init(p, self.tx, self.seed), params)
        return jax.tree.map(
            lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, self.state_shardings
        )


def _init(params, tx, seed: int) -> dict:
    return dict(
        params=params,
        opt_state=tx.init(params),
        ema=optim.ema_init(params),
        rng=jax.random.PRNGKey(seed),
        step=jnp.zeros((), jnp.int32),
        skipped_updates=jnp.zeros((), jnp.int32),
        nonfinite_in_row=jnp.zeros((), jnp.int32),
    )


class TrainStep:
    """The jitted step; calls and lowerings run under the mesh and its logical rules, with the frozen
    DiT parameters (a LoRA run's base) it holds."""

    def __init__(self, jitted, mesh, rules, frozen):
        self.jitted, self.mesh, self.rules, self.frozen = jitted, mesh, rules, frozen

    def __call__(self, state, encoder_state, batch):
        with sharding.use_mesh(self.mesh, self.rules):
            return self.jitted(state, encoder_state, self.frozen, batch)

    def lower(self, state, encoder_state, batch):
        with sharding.use_mesh(self.mesh, self.rules):
            return self.jitted.lower(state, encoder_state, self.frozen, batch)


def make_objective(config, dit_graphdef, dit_rest, encoder_graphdef):
    """SAMA's objective in two parts: prepare(encoder_state, batch, key, sigma=None) runs the frozen
    encoders and noises (outside any gradient); loss(params, prepared) -> (loss, metrics) runs the
    DiT. The validation-loss evaluator uses them with fixed sigmas."""
    train = config.train
    shift, anchoring = float(train.timestep_shift), bool(train.semantic_anchoring)
    semantic_weight, weighting = float(train.semantic_loss_weight), train.loss_weighting

    def prepare(encoder_state, batch, key, sigma=None, sample_index=None) -> dict:
        """sample_index: (B,) positions of the samples in the step's whole batch (default 0..B-1).
        Each sample's sigma and noise come from fold_in(key, its position), so splitting a batch
        into micro-batches (train.grad_accum) changes memory, not the numbers."""
        encoders = nnx.merge(encoder_graphdef, encoder_state)
        if not anchoring:
            # No SigLIP in the run: an empty stand-in keeps dit_inputs from running one.
            batch = dict(batch, **{BATCH_PREFIX + "semantic": jnp.zeros((batch["valid"].shape[0], 0, 1))})
        inputs = conditioning.dit_inputs(encoders, batch)
        size = inputs.x0.shape[0]
        if sample_index is None:
            sample_index = jnp.arange(size)
        keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(key, i), 3))(sample_index)
        k_sigma, k_noise, k_semantic = keys[:, 0], keys[:, 1], keys[:, 2]

        def per_sample_normal(keys, like):
            return jax.vmap(lambda k: jax.random.normal(k, like.shape[1:], like.dtype))(keys)

        if sigma is None:
            sigma = jax.vmap(lambda k: flow_matching.sample_sigma(k, 1, shift)[0])(k_sigma)
        sigma = jnp.broadcast_to(sigma, (size,))
        noise = per_sample_normal(k_noise, inputs.x0)
        out = dict(
            x0=inputs.x0,
            noise=noise,
            x_t=flow_matching.add_noise(inputs.x0, noise, sigma),
            timesteps=flow_matching.NUM_TRAIN_TIMESTEPS * sigma,
            context=inputs.context,
            source_latents=inputs.source_latents,
            valid=batch["valid"],
        )
        if anchoring:
            semantic_noise = per_sample_normal(k_semantic, inputs.semantic_x0)
            out.update(
                semantic_x0=inputs.semantic_x0,
                semantic_noise=semantic_noise,
                semantic_t=flow_matching.add_noise(inputs.semantic_x0, semantic_noise, sigma),
            )
        return out

    def loss(params, p: dict):
        dit = nnx.merge(dit_graphdef, params, dit_rest)
        velocity, semantic_velocity = dit(
            p["x_t"],
            p["timesteps"],
            p["context"],
            source_latents=p["source_latents"],
            semantic_tokens=p.get("semantic_t"),
        )
        fm_weight = (
            flow_matching.gaussian_bump_weight(p["timesteps"], shift)
            if weighting == "gaussian_bump"
            else None
        )
        return flow_matching.sama_loss(
            velocity,
            p["noise"],
            p["x0"],
            semantic_velocity,
            p.get("semantic_noise"),
            p.get("semantic_x0"),
            semantic_weight,
            valid=p["valid"],
            fm_weight=fm_weight,
        )

    return prepare, loss


def _micro_batches(batch, accum: int):
    """(B, ...) -> (accum, B / accum, ...), micro-batch i = samples i, i + accum, ...: each device
    keeps its own samples (no data movement), and every micro-batch stays sharded on 'batch'."""

    def split(x):
        x = x.reshape((x.shape[0] // accum, accum) + x.shape[1:]).swapaxes(0, 1)
        return sharding.constrain(x, (None, "batch") + (None,) * (x.ndim - 2))

    return jax.tree.map(split, batch)


def make_train_step(config, parts: StepParts) -> TrainStep:
    prepare, loss_fn = make_objective(config, parts.dit_graphdef, parts.dit_rest, parts.encoder_graphdef)
    accum = int(config.train.grad_accum)
    ema_decay = float(config.optimizer.ema_decay)
    schedule = optim.learning_rate(config)

    # The gradient is taken of the trainable parameters only: the frozen ones get none. Their
    # Variables are rebuilt in here (tree.map): nnx refuses a module whose Variables come from two
    # trace levels (the step's and the gradient's).
    def frozen_and_trained_loss(params, frozen, p):
        return loss_fn(nnx.merge_state(params, jax.tree.map(lambda x: x, frozen)), p)

    grad_fn = jax.value_and_grad(frozen_and_trained_loss, has_aux=True)

    def micro_step(params, frozen, encoder_state, batch, key, sample_index=None):
        return grad_fn(params, frozen, prepare(encoder_state, batch, key, sample_index=sample_index))

    def step_fn(state, encoder_state, frozen, batch):
        params = state["params"]
        key = jax.random.fold_in(state["rng"], state["step"])
        if accum == 1:
            (_, metrics), grads = micro_step(params, frozen, encoder_state, batch, key)
        else:
            # The loss is a mean over the valid samples of the whole batch: micro-batch i's mean
            # (and gradient) enters weighted by its share of the valid samples, so the sum equals
            # the whole batch's mean even when padding leaves the micro-batches unequal.
            size = batch["valid"].shape[0]
            micro = _micro_batches(batch, accum)
            counts = jnp.sum(micro["valid"].astype(jnp.float32), axis=1)
            weights = counts / jnp.maximum(jnp.sum(counts), 1.0)
            # Micro-batch i holds samples i, i + accum, ... (_micro_batches): their noise keys.
            indices = jnp.arange(size).reshape(size // accum, accum).T

            def weighted(held, one, index, weight):
                (_, m), g = micro_step(params, held[1], held[0], one, key, index)
                return jax.tree.map(lambda x: weight * x, (g, m))

            # The encoders' state and the frozen parameters ride in the carry: nnx modules merged
            # inside the body must be built from the body's own tracers (flax refuses outer-trace
            # values in nnx.scan).
            def body(carry, xs):
                sums, held = carry
                return (jax.tree.map(jnp.add, sums, weighted(held, *xs)), held), None

            # Micro-batch 0 starts the sums (it gives their structure); the scan adds the others.
            xs = (micro, indices, weights)
            first = jax.tree.map(lambda x: x[0], xs)
            rest = jax.tree.map(lambda x: x[1:], xs)
            held = (encoder_state, frozen)
            ((grads, metrics), _), _ = jax.lax.scan(body, (weighted(held, *first), held), rest)

        grad_norm = optax.global_norm(grads)
        finite = jnp.isfinite(metrics["loss"]) & jnp.isfinite(grad_norm)
        updates, opt_state = parts.tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        ema = optim.ema_update(state["ema"], new_params, ema_decay)

        def keep_if_finite(new, old):
            return jax.tree.map(lambda n, o: jnp.where(finite, n, o), new, old)

        skipped = state["skipped_updates"] + (~finite).astype(jnp.int32)
        new_state = dict(
            params=keep_if_finite(new_params, params),
            opt_state=keep_if_finite(opt_state, state["opt_state"]),
            ema=keep_if_finite(ema, state["ema"]),
            rng=state["rng"],
            step=state["step"] + 1,
            skipped_updates=skipped,
            nonfinite_in_row=jnp.where(finite, 0, state["nonfinite_in_row"] + 1),
        )
        metrics = dict(
            metrics,
            grad_norm=grad_norm,
            update_norm=optax.global_norm(updates),
            param_norm=optax.global_norm(new_state["params"]),
            # The rate of the update this step applied: AdamW's count skips skipped steps.
            lr=schedule(state["step"] - state["skipped_updates"]),
            valid_fraction=jnp.mean(batch["valid"].astype(jnp.float32)),
            finite=finite.astype(jnp.float32),
            skipped_updates=skipped,
            nonfinite_in_row=new_state["nonfinite_in_row"],
        )
        return new_state, metrics

    replicated = NamedSharding(parts.mesh, PartitionSpec())
    jitted = jax.jit(
        step_fn,
        in_shardings=(
            parts.state_shardings,
            parts.encoder_shardings,
            parts.dit_frozen_shardings,
            parts.batch_sharding,
        ),
        out_shardings=(parts.state_shardings, replicated),
        donate_argnums=(0,),
    )
    return TrainStep(jitted, parts.mesh, parts.rules, parts.dit_frozen)
