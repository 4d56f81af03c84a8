"""sama-smoke: SAMA's training objective end to end on the embedded default, sharded, on a CPU.

  sama-smoke --config=configs/stage1_sft.py:tiny --cpu-devices=8 [--steps=3] [--config.data.root=DIR]

Generates the synthetic editing dataset and a tokenizer for it where the config's mixture points (its
first manifest's directory, under data.root) if absent, builds the
mesh, the frozen encoders (sama_jax.encoders) and the SAMA DiT of the config's preset with random
weights, shards them, reads batches through the Grain pipeline and, for each, makes the DiT inputs
(conditioning.dit_inputs), noises the target latents and the semantic tokens with one shifted sigma
per sample, runs the DiT on [source | semantic | target] and prints SAMA's loss and the norm of its
gradient with respect to the DiT parameters: sama-train's objective (train_step.make_objective). No update is applied: this checks that the pieces
compose, shard and differentiate (sama-train trains).
"""

from __future__ import annotations

import argparse
import os
import sys
import time

from sama_jax import cli


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="sama-smoke", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--steps", type=int, default=3, help="batches to run")
    return parser


def main(argv: list[str] | None = None) -> int:
    return cli.run("sama-smoke", lambda: _main(*cli.parse(build_parser(), argv)))


def _main(config, args) -> int:
    import jax
    import numpy as np
    import optax
    from flax import nnx

    from sama_jax import conditioning, sharding, text, train_step
    from sama_jax import encoders as encoders_lib
    from sama_jax.data import pipeline
    from sama_jax.models import wan_dit

    model_cfg = config.model
    # Everything checkable before a model is built: the data config, the mesh, the batch split.
    pipeline.check_data_config(
        config.data,
        config.seed,
        anchor_frames=model_cfg.semantic.num_anchor_frames,
        text_len=model_cfg.dit.text_len,
    )
    mesh = sharding.create_mesh(config.mesh)
    rules = sharding.axis_rules(config.sharding_rules)
    sharding.check_batch_size(config.train.batch_size, mesh, rules)
    data_dir = os.path.dirname(os.path.join(config.data.root, config.data.mixture[0]["manifest"]))
    tokenizer = text.load_tokenizer(encoders_lib.ensure_tiny_dataset(config, data_dir))
    sources = pipeline.open_sources(config.data.mixture, root=config.data.root)
    print(f"mesh {dict(mesh.shape)} over {jax.device_count()} {jax.devices()[0].platform} devices")

    rngs = nnx.Rngs(config.seed)
    dit = wan_dit.WanDiT(wan_dit.WanDiTConfig.from_config(model_cfg.dit, config.precision), rngs=rngs)
    encoders = encoders_lib.build(config, rngs, names=encoders_lib.needed(config, training=True))
    for model in (dit, encoders):
        sharding.shard_module(model, mesh, rules)
    num_params = sum(x.size for x in jax.tree.leaves(nnx.state(dit, nnx.Param)))
    print(f"SAMA DiT '{model_cfg.preset}': {num_params:,} parameters")

    data = pipeline.build_pipeline(
        config.data,
        sources,
        batch_size=config.train.batch_size,
        seed=config.seed,
        anchor_frames=encoders.semantic.num_anchor_frames,
        text_len=model_cfg.dit.text_len,
    )
    # sama-train's objective (train_step.make_objective): the same inputs, noise and loss.
    dit_graphdef, params, dit_rest = nnx.split(dit, nnx.Param, ...)
    encoder_graphdef, encoder_state = nnx.split(encoders)
    prepare, loss_fn = train_step.make_objective(config, dit_graphdef, dit_rest, encoder_graphdef)

    @jax.jit
    def loss_and_grad_norm(params, encoder_state, batch, key):
        inputs = prepare(encoder_state, batch, key)
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, inputs)
        return dict(metrics, grad_norm=optax.global_norm(grads))

    key = jax.random.key(config.seed)
    iterator = iter(data)
    for step in range(args.steps):
        batch = next(iterator)
        arrays = conditioning.host_arrays(batch, tokenizer, config)
        start = time.time()
        with sharding.use_mesh(mesh, rules):
            metrics = loss_and_grad_norm(
                params,
                encoder_state,
                sharding.shard_batch(arrays, mesh, rules),
                jax.random.fold_in(key, step),
            )
        metrics = {k: float(v) for k, v in metrics.items()}
        if not all(np.isfinite(list(metrics.values()))):
            print(f"step {step}: non-finite metrics {metrics}")
            return 1
        print(
            f"step {step}: {batch['kind'][0]} batch {tuple(batch['target'].shape)} "
            + " ".join(f"{k}={v:.4f}" for k, v in metrics.items())
            + f" ({time.time() - start:.1f}s)"
        )
    print(f"skipped samples: {iterator.skip_summary()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
