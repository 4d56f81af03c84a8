"""Device mesh, logical axis rules, and sharding of parameters, batches and activations.

One mesh with axes (data, fsdp, context, tensor). Model code names array dimensions with logical
names ('batch', 'embed', 'heads', ...); the rules from config map each logical name to a mesh axis,
a tuple of mesh axes, or None (replicated). Changing the parallelism of a run is a config change.

Logical names used by the models:
  batch            activations' batch dimension
  length           activations' token/sequence dimension (context parallelism)
  act_embed        activations' channel dimension
  act_heads        activations' attention-head dimension
  embed            parameters' model-width dimension (FSDP)
  mlp, heads, kv   parameters' FFN hidden, attention-head and head_dim/q-k-v output dimensions
  vocab            embedding tables' vocabulary dimension
  layers           the stacked-layer dimension of scanned parameters
  conv_in, conv_out, spatial   VAE convolution channels and activations' spatial dimensions
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, Mapping, Sequence

import jax
import numpy as np
from flax import nnx
from flax.core import spmd
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "context", "tensor")


DEFAULT_RULES: tuple[tuple[str, Any], ...] = (
    ("batch", ("data", "fsdp")),
    ("length", "context"),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", "tensor"),
    ("layers", None),
    ("conv_in", None),
    ("conv_out", "tensor"),
    ("spatial", None),
)


class ShardingError(ValueError):
    """A mesh or sharding that the config asks for but the devices or shapes cannot give."""


def resolve_mesh_shape(axis_sizes: Mapping[str, int], num_devices: int) -> tuple[int, ...]:
    """{axis: size} with at most one -1 ("fill with the remaining devices") -> sizes in MESH_AXES order."""
    unknown = set(axis_sizes) - set(MESH_AXES)
    if unknown:
        raise ShardingError(f"unknown mesh axes {sorted(unknown)}; axes are {MESH_AXES}")
    sizes = [int(axis_sizes.get(axis, 1)) for axis in MESH_AXES]
    fill = [i for i, s in enumerate(sizes) if s == -1]
    if len(fill) > 1:
        raise ShardingError(f"at most one mesh axis may be -1, got {dict(zip(MESH_AXES, sizes))}")
    if any(s == 0 or s < -1 for s in sizes):
        raise ShardingError(f"mesh axis sizes must be positive or -1, got {dict(zip(MESH_AXES, sizes))}")
    known = math.prod(s for s in sizes if s != -1)
    if fill:
        if num_devices % known:
            raise ShardingError(
                f"cannot fill mesh axis '{MESH_AXES[fill[0]]}': {num_devices} devices are not "
                f"divisible by the other axes' product {known}"
            )
        sizes[fill[0]] = num_devices // known
    if math.prod(sizes) != num_devices:
        raise ShardingError(
            f"mesh {dict(zip(MESH_AXES, sizes))} has {math.prod(sizes)} devices, but {num_devices} "
            "are available"
        )
    return tuple(sizes)


def create_mesh(mesh_config: Mapping[str, Any], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Builds the (data, fsdp, context, tensor) mesh from config.

    mesh_config.ici: {axis: size} within a slice (-1 fills). mesh_config.dcn: {axis: size} across
    slices (multi-slice TPU); its product must equal the number of slices.
    """
    devices = list(devices if devices is not None else jax.devices())
    dcn = resolve_mesh_shape(dict(mesh_config.get("dcn", {}) or {}), _num_slices(devices))
    ici = resolve_mesh_shape(dict(mesh_config.get("ici", {}) or {}), len(devices) // math.prod(dcn))
    if math.prod(dcn) > 1:
        device_array = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices=devices)
    elif devices[0].platform == "cpu":
        # No physical topology to follow: plain order.
        device_array = np.asarray(devices).reshape(ici)
    else:
        # TPU/GPU: place mesh axes along the interconnect's rings.
        device_array = mesh_utils.create_device_mesh(ici, devices=devices)
    return Mesh(device_array, MESH_AXES)


def _num_slices(devices: Sequence[jax.Device]) -> int:
    return len({getattr(d, "slice_index", 0) for d in devices})


def axis_rules(rules_config: Sequence[Sequence[Any]] | None) -> tuple[tuple[str, Any], ...]:
    """Normalises rules from config (lists from the command line become tuples)."""
    if rules_config is None:
        return DEFAULT_RULES
    out = []
    for name, target in rules_config:
        if isinstance(target, list):
            target = tuple(target)
        for axis in target if isinstance(target, tuple) else (target,):
            if axis is not None and axis not in MESH_AXES:
                raise ShardingError(f"rule ({name!r}, {target!r}) names unknown mesh axis {axis!r}")
        out.append((name, target))
    return tuple(out)


def annotated(initializer, names: Sequence[str | None]):
    """An initializer whose parameters carry logical axis names. Models build their parameters before
    a mesh exists and are placed afterwards from these names (shard_module, params_io.load_module),
    so flax is told not to shard them eagerly at creation."""
    return nnx.with_partitioning(initializer, tuple(names), eager_sharding=False)


def logical_to_mesh_spec(logical: Sequence[str | None] | None, rules) -> PartitionSpec:
    """('batch', 'length', 'act_embed') -> PartitionSpec of mesh axes, by the first matching rule.

    A mesh axis already used by an earlier dimension is not used twice (the dimension replicates),
    so e.g. ('embed', 'embed') is valid.
    """
    if logical is None:
        return PartitionSpec()
    table: dict[str, Any] = {}
    for name, target in rules:
        table.setdefault(name, target)
    used: set[str] = set()
    out = []
    for name in logical:
        if name is None:
            out.append(None)
            continue
        if name not in table:
            raise ShardingError(f"logical axis {name!r} has no rule; rules cover {sorted(table)}")
        target = table[name]
        axes = tuple(
            a for a in (target if isinstance(target, tuple) else (target,)) if a is not None and a not in used
        )
        used.update(axes)
        out.append(axes[0] if len(axes) == 1 else (axes or None))
    return PartitionSpec(*out)


def logical_shardings(logical_specs: Any, mesh: Mesh, rules) -> Any:
    """A pytree of logical PartitionSpecs (e.g. nnx.get_partition_spec(state)) -> NamedShardings."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, logical_to_mesh_spec(tuple(spec), rules)),
        logical_specs,
        is_leaf=lambda x: isinstance(x, PartitionSpec),
    )


def check_divisible(shapes: Any, shardings: Any) -> None:
    """Raises a ShardingError naming every array whose dimensions the mesh does not divide."""
    problems = []

    def check(path, shape_like, sharding):
        shape = getattr(shape_like, "shape", shape_like)
        mesh_shape = dict(sharding.mesh.shape)
        for dim, (size, axes) in enumerate(zip(shape, tuple(sharding.spec) + (None,) * len(shape))):
            if axes is None:
                continue
            parts = math.prod(mesh_shape[a] for a in (axes if isinstance(axes, tuple) else (axes,)))
            if size % parts:
                problems.append(
                    f"{jax.tree_util.keystr(path)}: dim {dim} of size {size} is not "
                    f"divisible by mesh axes {axes} = {parts}"
                )

    jax.tree_util.tree_map_with_path(check, shapes, shardings)
    if problems:
        raise ShardingError("arrays the mesh cannot shard:\n  " + "\n  ".join(problems))


def check_batch_size(batch_size: int, mesh: Mesh, rules, key: str = "train.batch_size") -> None:
    """Refuses, before anything is built, a global batch that the mesh axes of 'batch' do not split."""
    axes = logical_to_mesh_spec(("batch",), rules)[0]
    axes = () if axes is None else (axes if isinstance(axes, tuple) else (axes,))
    parts = math.prod(dict(mesh.shape)[a] for a in axes)
    if batch_size < 1 or batch_size % parts:
        sizes = " x ".join(f"{a}={dict(mesh.shape)[a]}" for a in axes) or "none"
        raise ShardingError(
            f"{key}={batch_size} must be a positive multiple of {parts}: the batch is "
            f"split over the mesh axes {sizes} (config.mesh.ici / sharding_rules)"
        )


def state_shardings(state: nnx.State, mesh: Mesh, rules) -> nnx.State:
    """NamedShardings for an nnx State from the logical names its Variables carry."""
    return logical_shardings(nnx.get_partition_spec(state), mesh, rules)


def shard_module(module: nnx.Module, mesh: Mesh, rules) -> nnx.Module:
    """Places a module's variables on the mesh according to their logical annotations (in place)."""
    state = nnx.state(module)
    shardings = state_shardings(state, mesh, rules)
    check_divisible(state, shardings)
    nnx.update(module, jax.device_put(state, shardings))
    return module


def shard_batch(batch: Any, mesh: Mesh, rules, logical_axes: Any = None) -> Any:
    """Host-local numpy batch -> global jax Arrays sharded over the batch axes of the mesh.

    Each process passes its own slice of the global batch (as grain's per-process sharding gives
    it); on one host this is the whole batch. `logical_axes` is a pytree matching `batch` of
    logical-name tuples; by default every leaf is sharded on its leading dimension as 'batch'.
    """
    if logical_axes is None:
        logical_axes = jax.tree.map(lambda x: ("batch",) + (None,) * (np.ndim(x) - 1), batch)

    def put(x, names):
        sharding = NamedSharding(mesh, logical_to_mesh_spec(names, rules))
        return jax.make_array_from_process_local_data(sharding, np.asarray(x))

    return jax.tree.map(put, batch, logical_axes, is_leaf=lambda x: isinstance(x, (np.ndarray, jax.Array)))


@contextlib.contextmanager
def use_mesh(mesh: Mesh, rules):
    """Context in which `constrain` places activations: the mesh and the logical rules."""
    with jax.set_mesh(mesh), spmd.logical_axis_rules(rules):
        yield


def constrain(x: jax.Array, logical: Sequence[str | None]) -> jax.Array:
    """Sharding constraint on an activation by logical names; a no-op outside `use_mesh`."""
    mesh = jax.sharding.get_abstract_mesh()
    rules = spmd.get_logical_axis_rules()
    if mesh.empty or not rules:
        return x
    return jax.lax.with_sharding_constraint(x, logical_to_mesh_spec(logical, rules))
