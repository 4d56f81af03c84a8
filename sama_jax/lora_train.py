"""LoRA fine-tuning in sama-train (config.train.lora.rank > 0): low-rank adapters on the DiT's Linear
layers, a few modules trained in full beside them, the rest of the DiT frozen.

    config.train.lora = dict(rank=32, alpha=32.0,
                             targets=("blocks.*.self_attn.[qkvo]", ...),   # official module names
                             extra_trainable=("semantic_head",))           # official module/param names

A targeted Linear computes x W + b + alpha / rank * (x A) B, A (in, rank) uniform in +-1/sqrt(in) (as
peft), B (rank, out) zero, so step 0 is exactly the base model (checkpoint.init_from, which LoRA
requires). A and B are nnx.LoRAParam variables held by the Linear (wan_dit.Linear.lora); the trainable
filter (the adapters and the extra modules) splits the DiT's parameters into what the optimizer, the
EMA and the checkpoints hold and the frozen base, which the train step holds like the frozen encoders,
in precision.frozen_param_dtype. Patterns are fnmatch patterns over the names of the released
checkpoint (sama_jax/models/wan_dit_params.py): "blocks.*.ffn.0" is every block's first FFN Linear;
the blocks are stacked, so a pattern takes a block module in every layer or in none.

With every checkpoint, sama-train writes WORKDIR/lora/<step>.safetensors in the released format:
<official module>.lora_A.default.weight (rank, in) and .lora_B.default.weight (out, rank) with
alpha / rank folded into lora_B, so the released loader (alpha 1.0; lora.merge_lora) gives our model;
the extra modules go to <step>.modules.safetensors under their official keys and layouts (a PyTorch
state dict). Both hold the EMA when eval.use_ema (the weights sama-edit --run edits with), else the
raw parameters. run_dir.load_run (sama-edit/sama-export --run) merges a LoRA run into its base.
"""

from __future__ import annotations

import fnmatch
import math
import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sama_jax import lora as lora_lib
from sama_jax import sharding
from sama_jax.config import ConfigError
from sama_jax.models import params_table
from sama_jax.models import wan_dit_params as dit_table

LORA_DIR = "lora"
_ADAPTER = re.compile(r"^(?P<module>.+)\.lora\.(?P<side>[ab])$")


def enabled(config) -> bool:
    lora = config.train.get("lora")
    return lora is not None and int(lora.rank) > 0


def scale(lora) -> float:
    return float(lora.alpha) / int(lora.rank)


# -- names ------------------------------------------------------------------------------------------


def _linear_modules(num_layers: int) -> dict[str, tuple[str, int | None]]:
    """Official Linear module name -> (our module path, layer index or None): lora.py's table."""
    targets = lora_lib.linear_targets(num_layers)
    return {name: (kernel[: -len(".kernel")], layer) for name, (kernel, layer) in targets.items()}


def _select(patterns, names: dict[str, tuple[str, int | None]], key: str, what: str, match) -> set[str]:
    """Our paths whose official names some pattern matches; a pattern matching none, or a stacked
    path matched in some layers only, is a ConfigError naming `key`."""
    chosen: dict[str, set] = {}
    for pattern in patterns:
        hits = [name for name in names if match(name, str(pattern))]
        if not hits:
            examples = ", ".join(list(names)[:3])
            raise ConfigError(
                f"config.{key}: {pattern!r} matches no {what} of the DiT (names like {examples})"
            )
        for name in hits:
            ours, layer = names[name]
            chosen.setdefault(ours, set()).add(layer)
    layers = {ours: {layer for ours2, layer in names.values() if ours2 == ours} for ours in chosen}
    partial = sorted(ours for ours, got in chosen.items() if got != layers[ours])
    if partial:
        raise ConfigError(
            f"config.{key}: {patterns} select {partial} in some layers only: the blocks are stacked, so a "
            "block module is chosen in every layer or in none"
        )
    return set(chosen)


def target_modules(lora, num_layers: int) -> set[str]:
    """Our module paths of the Linears that get adapters (e.g. 'blocks.self_attn.q')."""
    return _select(
        lora.targets,
        _linear_modules(num_layers),
        "train.lora.targets",
        "Linear module",
        fnmatch.fnmatchcase,
    )


def extra_params(lora, num_layers: int) -> set[str]:
    """Our parameter paths trained in full: a pattern names a module ('semantic_head') or a parameter
    ('segment_embedding.weight')."""
    names = {}
    for ours, template, _ in dit_table.TOP_PARAMS + dit_table.SAMA_PARAMS + dit_table.BLOCK_PARAMS:
        for i in range(num_layers) if "{i}" in template else [None]:
            names[template.format(i=i)] = (ours, i)
    return _select(
        lora.extra_trainable,
        names,
        "train.lora.extra_trainable",
        "module or parameter",
        lambda name, p: fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(name, p + ".*"),
    )


def check_config(config) -> None:
    """Bad LoRA settings, named before anything is built."""
    lora = config.train.get("lora")
    if lora is None:
        return
    rank = int(lora.rank)
    if rank < 0:
        raise ConfigError(f"config.train.lora.rank={rank} must be >= 0 (0: full fine-tuning)")
    if rank == 0:
        return
    if not float(lora.alpha) > 0:
        raise ConfigError(
            f"config.train.lora.alpha={lora.alpha} must be > 0 (the update is alpha / rank * x A B)"
        )
    if not config.checkpoint.init_from:
        raise ConfigError(
            f"config.train.lora.rank={rank} trains adapters on a frozen base, but config.checkpoint.init_from "
            "is empty: name a converted DiT or a run directory"
        )
    num_layers = int(config.model.dit.num_layers)
    target_modules(lora, num_layers)
    extra_params(lora, num_layers)


def trainable_filter(config):
    """The nnx filter of the DiT parameters the optimizer trains: all of them (full fine-tuning), or
    the adapters and the extra modules."""
    if not enabled(config):
        return nnx.Param
    extras = extra_params(config.train.lora, int(config.model.dit.num_layers))
    return nnx.Any(nnx.LoRAParam, lambda path, _: ".".join(map(str, path)) in extras)


# -- the adapters ---------------------------------------------------------------------------------


class Adapter(nnx.Module):
    """x -> scale * (x A) B: A (in, rank), B (rank, out), with a leading layers axis on a stacked
    block's Linear (nnx.scan slices it with the kernel)."""

    def __init__(self, a, b, scale: float):
        self.a = nnx.LoRAParam(a)
        self.b = nnx.LoRAParam(b)
        self.scale = scale

    def __call__(self, x):
        return self.scale * ((x @ self.a.get_value().astype(x.dtype)) @ self.b.get_value().astype(x.dtype))


def _init_a(key, shape, dtype):
    # peft's kaiming_uniform(a=sqrt(5)) of a Linear(in, rank): U(-1/sqrt(in), 1/sqrt(in)).
    bound = 1.0 / math.sqrt(shape[-2])
    return jax.random.uniform(key, shape, dtype, -bound, bound)


def add_adapters(dit, lora):
    """Puts an Adapter (A as _init_a from nnx.Rngs(0), B zero; initial_adapters gives the run's own
    values) on every targeted Linear of `dit`, in place; -> dit. Meant for nnx.eval_shape."""
    rank, rngs = int(lora.rank), nnx.Rngs(0)
    for path in sorted(target_modules(lora, dit.cfg.num_layers)):
        linear = dit
        for name in path.split("."):
            linear = getattr(linear, name)
        kernel = linear.kernel
        *lead, din, dout = kernel.get_value().shape
        *names_lead, in_name, out_name = kernel.get_metadata()["out_sharding"]
        dtype = kernel.get_value().dtype
        a = sharding.annotated(_init_a, (*names_lead, in_name, None))(
            rngs.params(), (*lead, din, rank), dtype
        )
        b = sharding.annotated(nnx.initializers.zeros_init(), (*names_lead, None, out_name))(
            rngs.params(), (*lead, rank, dout), dtype
        )
        linear.lora = Adapter(a, b, scale(lora))
    return dit


def abstract_dit(dit_cfg, lora):
    """The DiT with its adapters, shapes only (as wan_dit.abstract_dit)."""
    from sama_jax.models import wan_dit

    return nnx.eval_shape(lambda: add_adapters(wan_dit.WanDiT(dit_cfg, rngs=nnx.Rngs(0)), lora))


def initial_adapters(adapters_abstract, seed: int):
    """A and B of a fresh run, placed as the abstract state's shardings say: each A from its own key
    (fold_in(PRNGKey(seed), its index in path order)), every B zero."""
    flat = list(nnx.to_flat_state(adapters_abstract))

    def create():
        key = jax.random.PRNGKey(seed)
        return [
            _init_a(jax.random.fold_in(key, i), var.get_value().shape, var.get_value().dtype)
            if path[-1] == "a"
            else jnp.zeros(var.get_value().shape, var.get_value().dtype)
            for i, (path, var) in enumerate(flat)
        ]

    values = jax.jit(create, out_shardings=[var.get_value().sharding for _, var in flat])()
    return nnx.from_flat_state([(path, var.replace(v)) for (path, var), v in zip(flat, values)])


def with_dtype(tree, dtype):
    """Arrays cast to dtype; ShapeDtypeStructs re-typed (their shardings kept)."""

    def cast(x):
        if isinstance(x, jax.ShapeDtypeStruct):
            return jax.ShapeDtypeStruct(x.shape, dtype, sharding=x.sharding)
        return x.astype(dtype)

    return jax.tree.map(cast, tree)


# -- a trained run --------------------------------------------------------------------------------


def _flat(state) -> dict:
    return {".".join(map(str, p)): v for p, v in nnx.to_flat_state(state)}


@jax.jit
def _merged(kernel, a, b, scale):
    delta = jnp.einsum("...ir,...ro->...io", a.astype(jnp.float32), b.astype(jnp.float32))
    return (kernel.astype(jnp.float32) + scale * delta).astype(kernel.dtype)


def merge_trained(base, trained, lora):
    """The base parameters with the adapters folded in (W + alpha / rank * A B) and the extra
    modules replaced by the trained ones; base: the plain DiT's nnx.Param state (changed in place)."""
    flat, adapters = _flat(base), _flat(trained)
    for path, var in adapters.items():
        match = _ADAPTER.match(path)
        if match is None:  # an extra module's parameter
            flat[path].set_value(var.get_value().astype(flat[path].get_value().dtype))
        elif match["side"] == "a":
            module = match["module"]
            kernel = flat[module + ".kernel"]
            b = adapters[module + ".lora.b"].get_value()
            kernel.set_value(_merged(kernel.get_value(), var.get_value(), b, scale(lora)))
    return base


def trained_abstract(config, mesh=None, rules=None):
    """The trainable tree of a LoRA run (adapters and extras) as ShapeDtypeStructs in param_dtype,
    placed by `rules` on `mesh`, or on the first device."""
    from sama_jax.models import wan_dit

    dit_cfg = wan_dit.WanDiTConfig.from_config(config.model.dit, config.precision)
    _, adapted, _ = nnx.split(abstract_dit(dit_cfg, config.train.lora), nnx.Param, ...)
    trained, _ = nnx.split_state(adapted, trainable_filter(config), ...)
    if mesh is not None:
        shardings = sharding.state_shardings(trained, mesh, rules or sharding.DEFAULT_RULES)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, trained)
    dtype = jnp.dtype(config.precision.param_dtype)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, dtype, sharding=s), trained, shardings)


# -- the released format ----------------------------------------------------------------------------


def released_tensors(trained_flat: dict, config) -> tuple[dict, dict]:
    """Host arrays of the trainable tree {our path: array} -> ({<module>.lora_A/B.default.weight:
    array} with alpha / rank folded into lora_B, {official key: array} of the extra modules in the
    released layout)."""
    lora, num_layers = config.train.lora, int(config.model.dit.num_layers)
    official = {}
    for name, (module, layer) in _linear_modules(num_layers).items():
        official.setdefault(module, {})[layer] = name
    adapters, modules = {}, {}
    for path, a in trained_flat.items():
        match = _ADAPTER.match(path)
        if match is None or match["side"] != "a":
            continue
        b = trained_flat[match["module"] + ".lora.b"]
        for layer, name in official[match["module"]].items():
            a_i, b_i = (a, b) if layer is None else (a[layer], b[layer])
            adapters[f"{name}.lora_A.default.weight"] = np.ascontiguousarray(a_i.T, np.float32)
            adapters[f"{name}.lora_B.default.weight"] = np.ascontiguousarray(scale(lora) * b_i.T, np.float32)
    for ours, template, how in dit_table.TOP_PARAMS + dit_table.SAMA_PARAMS + dit_table.BLOCK_PARAMS:
        if ours not in trained_flat:
            continue
        value = trained_flat[ours]
        layers = (
            [(template.format(i=i), value[i]) for i in range(num_layers)]
            if "{i}" in template
            else [(template, value)]
        )
        for key, array in layers:
            modules[key] = np.ascontiguousarray(params_table.to_released(np.asarray(array), how), np.float32)
    return adapters, modules


class Exporter:
    """Writes the released-format files of a LoRA run beside each checkpoint (a no-op for a full
    fine-tune): exporter(step, state) on every process (the adapters are gathered), written by
    process 0 atomically; files of steps the checkpoints no longer hold are removed."""

    def __init__(self, config, workdir: str, mesh, checkpointer):
        self.on = enabled(config)
        self.config, self.checkpointer = config, checkpointer
        self.directory = os.path.join(workdir, LORA_DIR)
        self.replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())

    def path(self, step: int, modules: bool = False) -> str:
        return os.path.join(
            self.directory, f"{step}.modules.safetensors" if modules else f"{step}.safetensors"
        )

    def __call__(self, step: int, state) -> None:
        if not self.on:
            return
        from safetensors.numpy import save_file

        tree = state["ema"] if self.config.eval.use_ema else state["params"]
        tree = jax.jit(lambda t: t, out_shardings=self.replicated)(tree)
        flat = {path: np.asarray(jax.device_get(v.get_value())) for path, v in _flat(tree).items()}
        if jax.process_index() != 0:
            return
        adapters, modules = released_tensors(flat, self.config)
        os.makedirs(self.directory, exist_ok=True)
        for tensors, path in ((adapters, self.path(step)), (modules, self.path(step, modules=True))):
            if tensors:
                save_file(tensors, path + ".tmp", metadata={"format": "pt", "step": str(step)})
                os.replace(path + ".tmp", path)
        kept = set(self.checkpointer.all_steps()) | {step}
        for name in os.listdir(self.directory):
            head = name.split(".")[0]
            if head.isdigit() and int(head) not in kept:
                os.remove(os.path.join(self.directory, name))
