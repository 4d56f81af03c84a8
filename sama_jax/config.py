"""Loads a config file and applies command-line overrides.

Convention (absl/ml_collections config_flags): `--config=configs/x.py:arg` names the file and the
argument passed to its `get_config(arg)`; `--config.a.b=value` overrides a field. The value is parsed
to the type of the field it replaces; an override of a key the config does not have is an error that
names the key and the keys that do exist at that level.
"""

from __future__ import annotations

import ast
import dataclasses
import importlib.util
import os
import sys
from typing import Any, Mapping, Sequence

import ml_collections


class ConfigError(ValueError):
    """A config file or override that cannot be applied."""


def load_config_file(spec: str) -> ml_collections.ConfigDict:
    """`path.py` or `path.py:arg` -> the ConfigDict that the file's get_config(arg) returns."""
    path, _, arg = spec.partition(":")
    if not os.path.isfile(path):
        raise ConfigError(f"config file not found: {path}")
    module_spec = importlib.util.spec_from_file_location(
        "_sama_config_" + os.path.basename(path).removesuffix(".py"), path
    )
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"{path} has no get_config(arg) function")
    config = module.get_config(arg) if arg else module.get_config()
    if not isinstance(config, ml_collections.ConfigDict):
        raise ConfigError(f"{path}: get_config returned {type(config).__name__}, not a ConfigDict")
    return config


def _parse_value(text: str, old, key: str):
    """Parses `text` to the type of the value it replaces."""
    try:
        if isinstance(old, bool):
            lowered = text.strip().lower()
            if lowered in ("true", "1", "yes"):
                return True
            if lowered in ("false", "0", "no"):
                return False
            raise ValueError(text)
        if isinstance(old, int):
            return int(text)
        if isinstance(old, float):
            return float(text)
        if isinstance(old, str):
            return text
        if isinstance(old, (tuple, list)):
            value = ast.literal_eval(text)
            if not isinstance(value, (tuple, list)):
                value = (value,)
            return type(old)(value)
        # None or another literal: take a Python literal if it is one, else the string.
        try:
            return ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
    except (ValueError, SyntaxError) as e:
        raise ConfigError(f"config override {key}={text!r}: cannot parse as {type(old).__name__}") from e


def apply_override(config: ml_collections.ConfigDict, dotted_key: str, text: str) -> None:
    """Sets config[dotted_key] from the string `text`; unknown keys are an error naming them."""
    *parents, leaf = dotted_key.split(".")
    node = config
    for depth, name in enumerate(parents):
        if not isinstance(node, ml_collections.ConfigDict) or name not in node:
            where = ".".join(parents[:depth]) or "<top level>"
            raise ConfigError(f"unknown config key '{dotted_key}': '{name}' is not in {where}")
        node = node[name]
    if not isinstance(node, ml_collections.ConfigDict) or leaf not in node:
        where = ".".join(parents) or "<top level>"
        known = ", ".join(sorted(node.keys())) if isinstance(node, ml_collections.ConfigDict) else ""
        raise ConfigError(f"unknown config key '{dotted_key}': '{leaf}' is not in {where} (known: {known})")
    old = node[leaf]
    if isinstance(old, ml_collections.ConfigDict):
        raise ConfigError(f"config key '{dotted_key}' is a section; override one of its fields")
    with node.unlocked():
        node[leaf] = _parse_value(text, old, dotted_key)


def split_config_args(argv: Sequence[str]) -> tuple[str | None, list[tuple[str, str]], list[str]]:
    """argv -> (config spec, [(dotted key, value text)], the other args). Both `--config.a=v` and
    `--config.a v` are accepted, as absl does."""
    spec, overrides, rest = None, [], []
    args = list(argv)
    i = 0
    while i < len(args):
        arg = args[i]
        if arg == "--config" or arg.startswith("--config="):
            if arg == "--config":
                i += 1
                if i >= len(args):
                    raise ConfigError("--config has no value")
                spec = args[i]
            else:
                spec = arg.split("=", 1)[1]
        elif arg.startswith("--config."):
            key, eq, value = arg[len("--config.") :].partition("=")
            if not eq:
                i += 1
                if i >= len(args):
                    raise ConfigError(f"config override --config.{key} has no value")
                value = args[i]
            overrides.append((key, value))
        else:
            rest.append(arg)
        i += 1
    return spec, overrides, rest


def build_config(spec: str, overrides: Sequence[tuple[str, str]] = ()) -> ml_collections.ConfigDict:
    """The config file's config with the overrides applied, locked."""
    config = load_config_file(spec)
    for key, value in overrides:
        apply_override(config, key, value)
    config.lock()
    return config


def load_config(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, list[str]]:
    """Parses `--config=...` and `--config.a.b=v` from argv; returns (config, the other args)."""
    spec, overrides, rest = split_config_args(argv)
    if spec is None:
        raise ConfigError("no --config=path/to/config.py[:arg] given")
    return build_config(spec, overrides), rest


def simulate_cpu_devices(argv: Sequence[str]) -> list[str]:
    """Handles `--cpu_devices=N` / `--cpu-devices=N` (N simulated CPU devices, to try a mesh on a
    laptop) and returns the other arguments. XLA reads the flag when jax first starts its backends
    (the first jax.devices() or computation), so this must run before that; importing jax is fine."""
    rest, count = [], None
    for arg in argv:
        if arg.startswith(("--cpu_devices=", "--cpu-devices=")):
            count = int(arg.split("=", 1)[1])
        else:
            rest.append(arg)
    if count:
        if "jax" in sys.modules:
            from jax._src import xla_bridge

            if xla_bridge.backends_are_initialized():
                raise ConfigError("--cpu-devices must be handled before jax starts its backends")
        os.environ["XLA_FLAGS"] = (
            os.environ.get("XLA_FLAGS", "") + f" --xla_force_host_platform_device_count={count}"
        ).strip()
        os.environ["JAX_PLATFORMS"] = "cpu"
        if "jax" in sys.modules:  # imported already: its platform setting was read from the env
            sys.modules["jax"].config.update("jax_platforms", "cpu")
    return rest


def dataclass_from_section(
    cls, section: Mapping[str, Any], precision: Mapping[str, Any] | None = None, where: str = ""
):
    """A model config dataclass from a config section, rejecting keys the class does not have.

    `precision` (a config's precision section) sets those of its fields the class has (param_dtype,
    compute_dtype, ...), so one precision section reaches every model."""
    known = {f.name for f in dataclasses.fields(cls)}
    values = dict(section)
    unknown = sorted(set(values) - known)
    if unknown:
        raise ConfigError(f"{where or cls.__name__}: unknown keys {unknown}; known: {sorted(known)}")
    values.update({k: v for k, v in dict(precision or {}).items() if k in known})
    return cls(**values)
