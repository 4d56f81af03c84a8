import itertools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from jax.sharding import PartitionSpec as P

from sama_jax import sharding


def all_mesh_shapes(num_devices=8):
    sizes = [d for d in range(1, num_devices + 1) if num_devices % d == 0]
    return [s for s in itertools.product(sizes, repeat=4) if math.prod(s) == num_devices]


class TinyBlock(nnx.Module):
    """Attention-free transformer-ish block whose params carry logical axis names."""

    def __init__(self, dim, hidden, rngs):
        init = nnx.initializers.normal(0.1)
        self.up = nnx.Linear(
            dim,
            hidden,
            rngs=rngs,
            kernel_init=sharding.annotated(init, ("embed", "mlp")),
            bias_init=sharding.annotated(nnx.initializers.normal(0.1), ("mlp",)),
        )
        self.down = nnx.Linear(hidden, dim, rngs=rngs, kernel_init=sharding.annotated(init, ("mlp", "embed")))
        self.table = nnx.Param(
            init(rngs.params(), (32, dim)), eager_sharding=False, out_sharding=("vocab", "embed")
        )

    def __call__(self, x):
        x = sharding.constrain(x, ("batch", "length", "act_embed"))
        h = jax.nn.gelu(self.up(x))
        h = sharding.constrain(h, ("batch", "length", "mlp"))
        y = x + self.down(h) + self.table[...][: x.shape[1]][None]
        return sharding.constrain(y, ("batch", "length", "act_embed"))


def test_there_are_twenty_four_axis_meshes_of_eight():
    assert len(all_mesh_shapes()) == 20


@pytest.mark.parametrize("shape", all_mesh_shapes())
def test_sharded_forward_equals_unsharded_on_every_mesh(shape):
    mesh_config = dict(ici=dict(zip(sharding.MESH_AXES, shape)))
    mesh = sharding.create_mesh(mesh_config)
    assert tuple(mesh.shape.values()) == shape
    rules = sharding.DEFAULT_RULES
    model = TinyBlock(16, 32, nnx.Rngs(0))
    x = np.random.default_rng(0).standard_normal((8, 16, 16)).astype(np.float32)
    expected = jax.jit(lambda m, x: m(x))(model, x)

    sharding.shard_module(model, mesh, rules)
    kernel = model.up.kernel[...]
    assert kernel.sharding.spec == sharding.logical_to_mesh_spec(("embed", "mlp"), rules)
    xs = sharding.shard_batch(x, mesh, rules, ("batch", "length", "act_embed"))
    assert xs.sharding.spec == sharding.logical_to_mesh_spec(("batch", "length", "act_embed"), rules)

    @jax.jit
    def forward(m, x):
        return m(x)

    with sharding.use_mesh(mesh, rules):
        got = forward(model, xs)
    np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=1e-5, atol=1e-6)


def test_fill_axis_and_errors():
    assert sharding.resolve_mesh_shape({"fsdp": -1, "tensor": 2}, 8) == (1, 4, 1, 2)
    assert sharding.resolve_mesh_shape({}, 1) == (1, 1, 1, 1)
    with pytest.raises(sharding.ShardingError, match="at most one"):
        sharding.resolve_mesh_shape({"fsdp": -1, "data": -1}, 8)
    with pytest.raises(sharding.ShardingError, match="not divisible"):
        sharding.resolve_mesh_shape({"fsdp": -1, "tensor": 3}, 8)
    with pytest.raises(sharding.ShardingError, match="has 4 devices, but 8"):
        sharding.resolve_mesh_shape({"fsdp": 4}, 8)
    with pytest.raises(sharding.ShardingError, match="unknown mesh axes"):
        sharding.resolve_mesh_shape({"pipeline": 2}, 8)


def test_dcn_factors_multiply_with_ici():
    # On CPU every device is in one slice, so a DCN factor above 1 cannot be satisfied.
    with pytest.raises(sharding.ShardingError):
        sharding.create_mesh(dict(ici=dict(fsdp=-1), dcn=dict(data=2)))
    mesh = sharding.create_mesh(dict(ici=dict(fsdp=-1), dcn=dict(data=1)))
    assert mesh.shape["fsdp"] == 8


def test_logical_rules():
    rules = sharding.axis_rules([["batch", ["data", "fsdp"]], ["embed", "fsdp"], ["mlp", None]])
    assert sharding.logical_to_mesh_spec(("batch", "embed", "mlp"), rules) == P(("data", "fsdp"), None, None)
    assert sharding.logical_to_mesh_spec(("embed", "batch"), rules) == P("fsdp", "data")
    assert sharding.logical_to_mesh_spec((None, "embed"), rules) == P(None, "fsdp")
    with pytest.raises(sharding.ShardingError, match="has no rule"):
        sharding.logical_to_mesh_spec(("nope",), rules)
    with pytest.raises(sharding.ShardingError, match="unknown mesh axis"):
        sharding.axis_rules([["batch", "pipeline"]])


def test_indivisible_parameter_is_named():
    mesh = sharding.create_mesh(dict(ici=dict(fsdp=8)))
    model = TinyBlock(12, 32, nnx.Rngs(0))
    with pytest.raises(sharding.ShardingError, match=r"up.*kernel.*size 12.*fsdp"):
        sharding.shard_module(model, mesh, sharding.DEFAULT_RULES)


def test_constrain_is_a_noop_without_mesh():
    x = jnp.ones((2, 3))
    assert sharding.constrain(x, ("batch", "act_embed")) is x


def test_batch_size_the_mesh_cannot_split_is_named_up_front():
    mesh = sharding.create_mesh(dict(ici=dict(data=2, fsdp=-1)))
    rules = sharding.DEFAULT_RULES
    sharding.check_batch_size(8, mesh, rules)
    with pytest.raises(
        sharding.ShardingError,
        match=r"train.batch_size=6 must be a positive multiple of 8: .*data=2 x fsdp=4",
    ):
        sharding.check_batch_size(6, mesh, rules)
