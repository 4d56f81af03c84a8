"""Per-device memory of the real sama-train step, from XLA's compiled memory analysis, lowered with
abstract inputs for a simulated slice (nothing is allocated; CPU only).

    .venv/bin/python benchmarks/train_step_memory.py --devices 32 --frames 49     # v5p-64 = 32 chips
    .venv/bin/python benchmarks/train_step_memory.py --devices 64 --frames 81     # v6e-64 = 64 chips
    .venv/bin/python benchmarks/train_step_memory.py --devices 8 --preset tiny --frames 5 --height 64 --width 64

The step is train_step.make_train_step of the config (default configs/stage1_sft.py:wan_14b, remat
and bf16 compute from its precision section) with every frozen-encoder output precomputed
(data.features = all), so it measures the DiT's parameters, AdamW state, EMA and activations at a
global batch of one sample per device over the data x fsdp axes. Overrides as on the command line
(--config.mesh.ici.fsdp=16 --config.mesh.ici.data=2 ...). Prints the analysis per device: argument
(state) bytes, output bytes, temporaries (activations + gradients), and the analytic split of the
state (parameters, optimizer, EMA).
"""
from __future__ import annotations

import argparse
import os
import sys
import time


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--devices", type=int, default=32)
    parser.add_argument("--config", default=os.path.join(os.path.dirname(__file__), "..", "configs",
                                                         "stage1_sft.py"))
    parser.add_argument("--preset", default="wan_14b")
    parser.add_argument("--frames", type=int, default=49)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--batch-per-device", type=float, default=1.0,
                        help="global batch = this x devices on the data x fsdp axes")
    args, rest = parser.parse_known_args(argv)
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                               f" --xla_force_host_platform_device_count={args.devices}")
    os.environ.setdefault("JAX_PLATFORMS", "cpu")

    import jax
    import jax.numpy as jnp
    import numpy as np
    from flax import nnx

    from sama_jax import config as config_lib, conditioning, features, run_dir, sharding, train_step
    from sama_jax.models import wan_dit

    spec, overrides, unknown = config_lib.split_config_args(rest)
    if unknown:
        parser.error(f"unknown arguments {unknown}")
    batch = int(args.batch_per_device * args.devices)
    config = config_lib.build_config(f"{args.config}:{args.preset}", [
        ("data.features", repr(features.NAMES)), ("train.batch_size", str(batch)), *overrides])
    mesh = sharding.create_mesh(config.mesh)
    rules = sharding.axis_rules(config.sharding_rules)
    dit_cfg = wan_dit.WanDiTConfig.from_config(config.model.dit, config.precision)
    graphdef, params, rest_state = run_dir.abstract_params(dit_cfg, mesh, rules)
    encoders = conditioning.Encoders(None, None, None, conditioning.semantic_config(config))
    parts = train_step.StepParts.build(config, mesh, rules, nnx.merge(graphdef, params, rest_state),
                                       encoders)
    state = parts.abstract_state(params)
    lat = (1 + (args.frames - 1) // 4, args.height // 8, args.width // 8, 16)
    cd = jnp.dtype(config.precision.compute_dtype)
    sem = conditioning.semantic_config(config).num_tokens
    shapes = {"features/target_latents": ((batch,) + lat, cd),
              "features/source_latents": ((batch,) + lat, cd),
              "features/text": ((batch, dit_cfg.text_len, dit_cfg.text_dim), cd),
              "features/semantic": ((batch, sem, dit_cfg.semantic_dim), cd),
              "valid": ((batch,), jnp.bool_)}
    abstract_batch = {k: jax.ShapeDtypeStruct(s, d, sharding=parts.batch_sharding)
                      for k, (s, d) in shapes.items()}
    step = train_step.make_train_step(config, parts)
    start = time.time()
    compiled = step.lower(state, parts.encoder_state, abstract_batch).compile()
    analysis = compiled.memory_analysis()
    gib = 2.0 ** 30
    num_params = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(params))
    param_bytes = sum(int(np.prod(p.shape)) * p.dtype.itemsize for p in jax.tree.leaves(params))
    tokens = 2 * int(np.prod(lat[:1])) * (lat[1] // 2) * (lat[2] // 2) + sem
    print(f"{args.preset} train step, {args.frames} frames {args.height}x{args.width} "
          f"({tokens:,} tokens/sample), global batch {batch}, mesh {dict(mesh.shape)}, "
          f"remat={config.precision.remat}, compute {config.precision.compute_dtype}; "
          f"compiled in {time.time() - start:.0f}s")
    shards = mesh.shape["fsdp"] * mesh.shape["tensor"]   # parameters are replicated over data
    print(f"  state per device (analytic, fully sharded): params {param_bytes / shards / gib:.2f} GiB, "
          f"AdamW mu+nu {2 * num_params * 4 / shards / gib:.2f} GiB, EMA {num_params * 4 / shards / gib:.2f} GiB")
    if analysis is None:
        print("  the backend gives no memory analysis")
        return 1
    print(f"  XLA per device: arguments {analysis.argument_size_in_bytes / gib:.2f} GiB, outputs "
          f"{analysis.output_size_in_bytes / gib:.2f} GiB (aliased {analysis.alias_size_in_bytes / gib:.2f}), "
          f"temporaries {analysis.temp_size_in_bytes / gib:.2f} GiB, generated code "
          f"{analysis.generated_code_size_in_bytes / gib:.3f} GiB")
    peak = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes
            - analysis.alias_size_in_bytes + analysis.temp_size_in_bytes)
    print(f"  peak per device ~ {peak / gib:.2f} GiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
