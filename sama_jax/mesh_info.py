"""sama-mesh-info: builds the mesh a config asks for and checks a sharded step against one device.

  sama-mesh-info --config=configs/stage1_sft.py:tiny [--cpu-devices=8] [--config.mesh.ici.tensor=2]

Prints the mesh, where each logical axis lands, and the largest difference between a sharded jitted
two-layer MLP on a batch and the same computation on one device.
"""

from __future__ import annotations

import argparse
import sys

from sama_jax import cli


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="sama-mesh-info", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    return cli.run("sama-mesh-info", lambda: _main(*cli.parse(parser, argv)))


def _main(config, args) -> int:
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sama_jax import sharding

    mesh = sharding.create_mesh(config.mesh)
    rules = sharding.axis_rules(config.sharding_rules)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}; mesh {dict(mesh.shape)}")
    for name, _ in rules:
        print(f"  {name:>10} -> {sharding.logical_to_mesh_spec((name,), rules)[0]}")

    rng = np.random.default_rng(config.seed)
    width = 8 * mesh.size
    params = {
        "w1": rng.standard_normal((width, 2 * width), np.float32) / np.sqrt(width),
        "w2": rng.standard_normal((2 * width, width), np.float32) / np.sqrt(2 * width),
    }
    batch = rng.standard_normal((mesh.size, 4 * mesh.size, width), np.float32)

    def mlp(p, x):
        h = jax.nn.gelu(jnp.einsum("bld,df->blf", x, p["w1"]))
        return jnp.einsum("blf,fd->bld", h, p["w2"])

    reference = jax.jit(mlp)(params, batch)
    param_specs = {"w1": ("embed", "mlp"), "w2": ("mlp", "embed")}
    param_shardings = jax.tree.map(
        lambda names: jax.sharding.NamedSharding(mesh, sharding.logical_to_mesh_spec(names, rules)),
        param_specs,
        is_leaf=lambda x: isinstance(x, tuple),
    )
    sharded_params = jax.device_put(params, param_shardings)
    sharded_batch = sharding.shard_batch(batch, mesh, rules, ("batch", "length", "act_embed"))
    with sharding.use_mesh(mesh, rules):
        out = jax.jit(mlp)(sharded_params, sharded_batch)
    diff = float(jnp.max(jnp.abs(out - reference)))
    print(f"sharded MLP output sharding: {out.sharding.spec}; max |sharded - single| = {diff:.2e}")
    return 0 if diff < 1e-4 else 1


if __name__ == "__main__":
    sys.exit(main())
