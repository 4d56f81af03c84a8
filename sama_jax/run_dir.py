"""A training run directory: everything needed to continue the run or to edit with it.

WORKDIR/config.json        the resolved config (a resumed run must match it, key by key)
WORKDIR/checkpoints/<step>/  Orbax items params, ema, opt_state, train, data, config
WORKDIR/encoders.json      the frozen encoders and tokenizer the run used: {vae, text_encoder,
                           siglip, tokenizer} -> path (relative paths are inside WORKDIR)
WORKDIR/encoders/<name>/   params checkpoints of generated encoders (tiny preset: random ones)
WORKDIR/tokenizer/         the generated tokenizer (tiny preset)
WORKDIR/events.out.tfevents.*   TensorBoard metrics (clu)

run = run_dir.load_run("runs/x", use_ema=True, mesh=mesh, rules=rules)
run.config, run.dit, run.encoders, run.tokenizer, run.step
"""

from __future__ import annotations

import json
import os
from typing import Any, Mapping, NamedTuple

import jax
import ml_collections
import numpy as np
from flax import nnx

from sama_jax import encoders as encoders_lib
from sama_jax import lora_train, sharding
from sama_jax.config import ConfigError

CONFIG_FILE = "config.json"
CHECKPOINTS = "checkpoints"
# Keys that may differ between the runs of one workdir without changing what is trained.
IGNORED_KEYS = ("workdir",)


class Run(NamedTuple):
    config: ml_collections.ConfigDict
    dit: nnx.Module
    encoders: encoders_lib.Encoders
    tokenizer: Any
    step: int


def is_run_dir(path: str) -> bool:
    return os.path.isfile(os.path.join(path, CONFIG_FILE)) and os.path.isdir(os.path.join(path, CHECKPOINTS))


# ---------------------------------------------------------------------------------------------------
# The config


def config_json(config) -> dict:
    return json.loads(config.to_json_best_effort())


def read_config(workdir: str) -> ml_collections.ConfigDict:
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: {workdir} is not a sama-train run directory")
    with open(path) as f:
        config = ml_collections.ConfigDict(json.load(f))
    config.lock()
    return config


def _flat(tree: Any, prefix: str = "") -> dict:
    if isinstance(tree, Mapping):
        out = {}
        for k, v in tree.items():
            out.update(_flat(v, f"{prefix}{k}."))
        return out
    # A config read back from JSON holds lists where the config file wrote tuples.
    return {prefix[:-1]: list(tree) if isinstance(tree, tuple) else tree}


def config_differences(old: Mapping, new: Mapping) -> list[str]:
    """'key: old -> new' for every differing leaf of two config JSONs."""
    a, b = _flat(old), _flat(new)
    return [
        f"{k}: {a.get(k, '<absent>')!r} -> {b.get(k, '<absent>')!r}"
        for k in sorted(set(a) | set(b))
        if k not in IGNORED_KEYS and a.get(k, "<absent>") != b.get(k, "<absent>")
    ]


def check_and_write_config(workdir: str, config, allow_change: bool, write: bool = True) -> None:
    """Writes WORKDIR/config.json; a workdir holding another config is refused, its differing keys
    named (allow_change: accepted, and the new config is written). write=False: the check alone."""
    path = os.path.join(workdir, CONFIG_FILE)
    new = config_json(config)
    if os.path.isfile(path):
        with open(path) as f:
            differences = config_differences(json.load(f), new)
        if differences and not allow_change:
            raise ConfigError(
                f"{workdir} holds a run with another config ({len(differences)} differing keys: "
                + "; ".join(differences)
                + "); use another --workdir, or --allow-config-change to "
                "continue this run with the new config"
            )
    if not write:
        return
    os.makedirs(workdir, exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(new, f, indent=1, sort_keys=True)
    os.replace(tmp, path)


# encoders.json, encoders/ and tokenizer/ are sama_jax.encoders' (it records and loads them).


# ---------------------------------------------------------------------------------------------------
# Parameters


def abstract_params(dit_config, mesh=None, rules=None, lora=None):
    """(graphdef, abstract nnx.Param state with shardings, rest) of the DiT `dit_config` builds (with
    the adapters of a config.train.lora section whose rank is > 0)."""
    from sama_jax.models import wan_dit

    if lora is not None and int(lora.rank) > 0:
        abstract = lora_train.abstract_dit(dit_config, lora)
    else:
        abstract = wan_dit.abstract_dit(dit_config)
    graphdef, params, rest = nnx.split(abstract, nnx.Param, ...)
    if mesh is not None:
        shardings = sharding.state_shardings(params, mesh, rules or sharding.DEFAULT_RULES)
    else:
        device = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        shardings = jax.tree.map(lambda _: device, params)
    params = jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), params, shardings)
    return graphdef, params, rest


def check_same_architecture(run_config, config, where: str) -> None:
    old, new = dict(run_config.model.dit), dict(config.model.dit)
    differences = config_differences(old, new)
    if differences:
        raise ConfigError(f"{where}: its model.dit differs from this config's: " + "; ".join(differences))


def restore_params(workdir: str, params_abstract, *, use_ema: bool, step: int | None = None):
    """The params (or EMA) of a run directory's latest (or given) checkpoint, cast to the abstract
    target's dtypes; -> (params, step)."""
    from sama_jax import checkpointing

    checkpointer = checkpointing.Checkpointer(os.path.join(workdir, CHECKPOINTS), read_only=True)
    step = checkpointer.latest_step() if step is None else step
    if step is None:
        raise FileNotFoundError(f"{workdir}/{CHECKPOINTS} holds no checkpoint")
    item = "ema" if use_ema else "params"
    stored = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, np.float32 if use_ema else x.dtype, sharding=x.sharding),
        params_abstract,
    )
    params = checkpointer.restore_tree(step, item, stored)
    checkpointer.close()
    return jax.tree.map(lambda p, a: p.astype(a.dtype), params, params_abstract), step


def run_params(workdir: str, params_abstract, *, use_ema: bool, mesh=None, rules=None):
    """The DiT parameters a run trained, in params_abstract's dtypes and shardings (a LoRA run: its
    base with the adapters merged, merged_lora_params); -> (params, step)."""

    config = read_config(workdir)
    if lora_train.enabled(config):
        return merged_lora_params(config, workdir, params_abstract, use_ema=use_ema, mesh=mesh, rules=rules)
    return restore_params(workdir, params_abstract, use_ema=use_ema)


def initial_params(config, params_abstract, mesh, rules, say):
    """checkpoint.init_from: a run directory (its parameters), a params checkpoint (converted Wan2.1
    DiT or SAMA-14B), or empty: random initialisation from config.seed, created sharded. Loaded in
    params_abstract's dtype."""
    from sama_jax.models import wan_dit

    source = config.checkpoint.init_from
    dit_cfg = wan_dit.WanDiTConfig.from_config(config.model.dit, config.precision)
    if not source:

        def create():
            return nnx.state(wan_dit.WanDiT(dit_cfg, rngs=nnx.Rngs(int(config.seed))), nnx.Param)

        shardings = jax.tree.map(lambda x: x.sharding, params_abstract)
        say("DiT initialised at random (checkpoint.init_from is empty)")
        return jax.jit(create, out_shardings=shardings)()
    if is_run_dir(source):
        check_same_architecture(read_config(source), config, f"checkpoint.init_from={source}")
        params, step = run_params(source, params_abstract, use_ema=False, mesh=mesh, rules=rules)
        say(f"DiT parameters from run {source} step {step} (fresh optimizer)")
        return params
    dtype = jax.tree.leaves(params_abstract)[0].dtype
    precision = dict(config.precision, param_dtype=jax.numpy.dtype(dtype).name)
    dit = wan_dit.load_dit(source, mesh=mesh, rules=rules, precision=precision)
    differences = config_differences(dit.cfg.architecture(), dit_cfg.architecture())
    if differences:
        raise ValueError(
            f"checkpoint.init_from={source}: its DiT differs from config.model.dit: " + "; ".join(differences)
        )
    say(f"DiT parameters from {source}")
    return nnx.state(dit, nnx.Param)


def initial_lora_dit(config, dit_cfg, graphdef, params_abstract, rest, mesh, rules, say):
    """The DiT a LoRA run starts from: the base of checkpoint.init_from (in frozen_param_dtype) with
    the run's fresh adapters. params_abstract: the adapted DiT's (abstract_params with the lora section)."""
    _, base_abstract, _ = abstract_params(dit_cfg, mesh, rules)
    base_abstract = lora_train.with_dtype(base_abstract, jax.numpy.dtype(config.precision.frozen_param_dtype))
    base = initial_params(config, base_abstract, mesh, rules, say)
    adapters, _ = nnx.split_state(params_abstract, nnx.LoRAParam, ...)
    return nnx.merge(graphdef, base, lora_train.initial_adapters(adapters, int(config.seed)), rest)


def merged_lora_params(config, workdir: str, params_abstract, *, use_ema: bool, mesh=None, rules=None):
    """A LoRA run's DiT as edits use it: its base (checkpoint.init_from) with the adapters of the
    latest checkpoint (EMA or raw) merged and its extra modules in place; -> (params, step).
    params_abstract: the plain DiT's (abstract_params), the dtypes wanted."""
    base = config.checkpoint.init_from
    if not os.path.exists(base):
        raise FileNotFoundError(
            f"{workdir} is a LoRA run on the base checkpoint.init_from={base!r}, which does not exist "
            f"(a relative path is read from the current directory, {os.getcwd()})"
        )
    abstract = lora_train.trained_abstract(config, mesh, rules)
    trained, step = restore_params(workdir, abstract, use_ema=use_ema)
    params = initial_params(config, params_abstract, mesh, rules, say=lambda _: None)
    return lora_train.merge_trained(params, trained, config.train.lora), step


def load_run(workdir: str, *, use_ema: bool = True, mesh=None, rules=None) -> Run:
    """A run directory alone -> its config, DiT (EMA or raw parameters of the latest checkpoint),
    frozen encoders, tokenizer and step. With `mesh`, arrays are placed by `rules` (default: the
    run's sharding_rules)."""
    from sama_jax.models import wan_dit

    config = read_config(workdir)
    rules = rules if rules is not None else sharding.axis_rules(config.sharding_rules)
    graphdef, params_abstract, rest = abstract_params(
        wan_dit.WanDiTConfig.from_config(config.model.dit, config.precision), mesh, rules
    )
    params, step = run_params(workdir, params_abstract, use_ema=use_ema, mesh=mesh, rules=rules)
    dit = nnx.merge(graphdef, params, rest)
    encoders, tokenizer = encoders_lib.load_recorded(config, workdir, mesh=mesh, rules=rules)
    return Run(config, dit, encoders, tokenizer, step)
