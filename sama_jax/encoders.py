"""The frozen encoders of a run (Wan VAE, umT5, SigLIP) and its tokenizer: the one owner.

    names = encoders.needed(config, training=True)         # which a run must build
    frozen = encoders.build(config, rngs, names)            # random (tests, benchmarks)
    frozen = encoders.load(config, paths, mesh=m, rules=r)  # converted checkpoints
    tokenizer, tokenizer_path = encoders.training_tokenizer(config, workdir)   # sama-train
    frozen = encoders.resolve_for_training(config, workdir, mesh, rules, tokenizer_path, say)
    frozen, tokenizer = encoders.load_recorded(config, workdir, mesh=m, rules=r)   # a run directory

Names are config.model.checkpoints' keys: "vae", "text_encoder", "siglip" (and "tokenizer"). An encoder
whose every output is precomputed (config.data.features) is not needed and stays None. A run records
what it used in WORKDIR/encoders.json ({name: path}, relative paths inside WORKDIR); generated encoders
(tiny preset: random, from config.seed) are saved as params checkpoints in WORKDIR/encoders/<name>.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Callable, Mapping

import jax
import numpy as np
from flax import nnx

from sama_jax import params_io, presets, sharding, text
from sama_jax import semantic as semantic_lib
from sama_jax.config import ConfigError
from sama_jax.models import siglip, umt5, wan_vae

NAMES = ("vae", "text_encoder", "siglip")
# The batch features ("features/<name>") that make an encoder unnecessary when all are precomputed.
FEATURES = {
    "vae": ("target_latents", "source_latents"),
    "text_encoder": ("text",),
    "siglip": ("semantic",),
}
RECORD_FILE = "encoders.json"
GENERATED_DIR = "encoders"
TOKENIZER_DIR = "tokenizer"


class Encoders(nnx.Module):
    """The frozen encoders of a run; an encoder whose outputs come precomputed is None."""

    def __init__(self, vae, text_encoder, siglip, semantic: semantic_lib.SemanticConfig):
        self.vae = vae
        self.text_encoder = text_encoder
        self.siglip = siglip
        self.semantic = semantic


def needed(config, training: bool = False) -> tuple[str, ...]:
    """The encoders a run must build: those whose outputs are not all precomputed (data.features);
    training without semantic anchoring (train.semantic_anchoring=False) needs no SigLIP."""
    precomputed = set(config.data.features)
    names = tuple(name for name, outputs in FEATURES.items() if not set(outputs) <= precomputed)
    if training and not config.train.semantic_anchoring:
        names = tuple(n for n in names if n != "siglip")
    return names


def semantic_config(config) -> semantic_lib.SemanticConfig:
    return semantic_lib.SemanticConfig(**config.model.semantic)


def frozen_precision(config) -> dict:
    """The precision policy of the frozen encoders: the run's, with frozen_param_dtype parameters."""
    precision = dict(config.precision)
    return dict(precision, param_dtype=precision.pop("frozen_param_dtype"))


def _model_configs(config) -> dict:
    model, precision = config.model, frozen_precision(config)
    return {
        "vae": (wan_vae.WanVAE, wan_vae.WanVAEConfig.from_config(model.vae, precision)),
        "text_encoder": (umt5.UMT5Encoder, umt5.UMT5Config.from_config(model.text_encoder, precision)),
        "siglip": (siglip.SiglipVisionModel, siglip.SiglipConfig.from_config(model.siglip, precision)),
    }


def build(config, rngs: nnx.Rngs, names: tuple[str, ...] | None = None) -> Encoders:
    """Randomly initialised encoders from config.model (the tiny preset and tests)."""
    names = needed(config) if names is None else names
    models = _model_configs(config)
    built = {n: models[n][0](models[n][1], rngs=rngs) for n in NAMES if n in names}
    return Encoders(*(built.get(n) for n in NAMES), semantic_config(config))


def load(config, paths: Mapping[str, str], *, mesh=None, rules=None, names: tuple[str, ...] | None = None):
    """Encoders from converted checkpoints: paths = {"vae": dir, "text_encoder": dir, "siglip": dir};
    only the `names` needed (default: needed(config)) must be given."""
    names = needed(config) if names is None else names
    missing = [n for n in names if not paths.get(n)]
    if missing:
        raise ValueError(
            f"no checkpoint given for the encoders {missing} (the run needs them: "
            f"data.features={list(config.data.features)} does not provide their outputs)"
        )
    kw = dict(mesh=mesh, rules=rules, precision=frozen_precision(config))
    loaders = {"vae": wan_vae.load_vae, "text_encoder": umt5.load_text_encoder, "siglip": siglip.load_siglip}
    return Encoders(
        *(loaders[n](paths[n], **kw) if n in names else None for n in NAMES), semantic_config(config)
    )


def build_random(config, names: tuple[str, ...]) -> Encoders:
    """The random frozen encoders of a CPU preset: the same values wherever they are made (from
    config.seed), in sama-train and in sama-demo."""
    return build(config, nnx.Rngs(int(config.seed) + 1), names=names)


def generate(config, names: tuple[str, ...], mesh, rules) -> Encoders:
    """Random frozen encoders (tiny preset), sharded. Every process makes the same values from
    config.seed and places its own shards of them (no transfer or collective per array)."""
    graphdef, state = nnx.split(build_random(config, names))

    def place(x, where):
        host = np.asarray(x)
        return jax.make_array_from_callback(host.shape, where, lambda index: host[index])

    return nnx.merge(graphdef, jax.tree.map(place, state, sharding.state_shardings(state, mesh, rules)))


def save_generated(workdir: str, generated: Encoders, config) -> dict[str, str]:
    """Writes generated encoders into WORKDIR/encoders/<name>; -> {name: relative path}. Every process
    calls it (the arrays are gathered; Orbax's save is collective)."""
    from jax.experimental import multihost_utils

    kinds = {"vae": wan_vae.KIND, "text_encoder": umt5.KIND, "siglip": siglip.KIND}
    sections = {
        "vae": config.model.vae,
        "text_encoder": config.model.text_encoder,
        "siglip": config.model.siglip,
    }
    paths = {}
    for name in NAMES:
        module = getattr(generated, name)
        if module is None:
            continue
        relative = os.path.join(GENERATED_DIR, name)
        target = os.path.join(workdir, relative)
        if not os.path.isdir(target):
            params = jax.tree.map(
                lambda x: np.asarray(multihost_utils.process_allgather(x, tiled=True)),
                nnx.to_pure_dict(nnx.state(module)),
            )
            params_io.save_params(target, params, kinds[name], sections[name].to_dict())
        paths[name] = relative
    return paths


def write_record(workdir: str, paths: Mapping[str, str]) -> None:
    with open(os.path.join(workdir, RECORD_FILE), "w") as f:
        json.dump(dict(paths), f, indent=1, sort_keys=True)


def read_record(workdir: str) -> dict[str, str]:
    """WORKDIR/encoders.json -> {name: absolute path} of the encoders and tokenizer a run used."""
    path = os.path.join(workdir, RECORD_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path} not found: the run did not record its encoders")
    with open(path) as f:
        paths = json.load(f)
    return {k: (v if not v or os.path.isabs(v) else os.path.join(workdir, v)) for k, v in paths.items()}


def load_recorded(config, workdir: str, *, mesh=None, rules=None):
    """The encoders and tokenizer a run directory recorded; -> (Encoders, tokenizer or None)."""
    paths = read_record(workdir)
    names = tuple(n for n in NAMES if paths.get(n))
    frozen = load(config, paths, mesh=mesh, rules=rules, names=names)
    return frozen, text.load_tokenizer(paths["tokenizer"]) if paths.get("tokenizer") else None


def _sync(name: str) -> None:
    from jax.experimental import multihost_utils

    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)


def ensure_tiny_dataset(config, data_dir: str) -> str:
    """The tiny preset's generated dataset and tokenizer under data_dir (made when absent);
    -> the tokenizer directory."""
    from sama_jax.data import synthetic

    return synthetic.ensure_dataset(data_dir, min(int(config.model.text_encoder.vocab_size), 400))


def training_tokenizer(config, workdir: str):
    """The tokenizer of a training run -> (tokenizer or None, path to record or None):
    config.model.checkpoints.tokenizer, or the tiny preset's generated one (made with its dataset,
    which this generates when absent, and copied into the workdir), or None when the text is
    precomputed."""
    checkpoints = config.model.checkpoints
    if checkpoints.tokenizer:
        return text.load_tokenizer(checkpoints.tokenizer), os.path.abspath(checkpoints.tokenizer)
    if config.model.preset in presets.CPU_PRESETS:
        # The generated dataset lives where the mixture's manifests point (data/synthetic).
        manifest = config.data.mixture[0].get("manifest") or "data/synthetic/x"
        data_dir = os.path.dirname(os.path.join(config.data.root, manifest)) or "."
        if jax.process_index() == 0:
            ensure_tiny_dataset(config, data_dir)
            if not os.path.isdir(os.path.join(workdir, TOKENIZER_DIR)):
                shutil.copytree(os.path.join(data_dir, "tokenizer"), os.path.join(workdir, TOKENIZER_DIR))
        _sync("dataset")
        return text.load_tokenizer(os.path.join(data_dir, "tokenizer")), TOKENIZER_DIR
    if "text" not in config.data.features:
        raise ConfigError(
            "config.model.checkpoints.tokenizer is empty: give the umT5 tokenizer "
            "directory (only the tiny preset generates one)"
        )
    return None, None


def resolve_for_training(
    config, workdir: str, mesh, rules, tokenizer_path: str | None, say: Callable[[str], None] = print
) -> Encoders:
    """The frozen encoders of a training run, recorded (with tokenizer_path) in WORKDIR/encoders.json.
    Each comes from config.model.checkpoints.<name>, else from the workdir (saved by an earlier
    run), else (tiny preset only) is generated and saved there."""
    checkpoints = config.model.checkpoints
    names = needed(config, training=True)
    given = {n: checkpoints[n] for n in names if checkpoints[n]}
    saved = {
        n: os.path.join(workdir, GENERATED_DIR, n)
        for n in names
        if n not in given and os.path.isdir(os.path.join(workdir, GENERATED_DIR, n))
    }
    missing = tuple(n for n in names if n not in given and n not in saved)
    if missing and config.model.preset not in presets.CPU_PRESETS:
        raise ConfigError(
            f"no checkpoint for the frozen encoders {list(missing)}: set "
            + ", ".join(f"config.model.checkpoints.{n}" for n in missing)
            + " (random encoders are for the tiny preset only)"
        )
    loaded = load(config, {**given, **saved}, mesh=mesh, rules=rules, names=tuple(given) + tuple(saved))
    generated = generate(config, missing, mesh, rules)
    frozen = Encoders(*(getattr(loaded, n) or getattr(generated, n) for n in NAMES), semantic_config(config))
    record = {"tokenizer": tokenizer_path} if tokenizer_path else {}
    # Every encoder checkpoint the config gives is recorded, also one whose outputs all come
    # precomputed: the run directory stays enough for sama-edit / sama-export --run.
    record.update({n: os.path.abspath(checkpoints[n]) for n in NAMES if checkpoints[n]})
    record.update(save_generated(workdir, generated, config))
    record.update({n: os.path.join(GENERATED_DIR, n) for n in saved})
    if jax.process_index() == 0:
        write_record(workdir, record)
    _sync("encoders")
    origin = {
        n: "given" if n in given else "generated" if n in missing else "from the workdir" for n in names
    }
    say("frozen encoders: " + (", ".join(f"{n} ({o})" for n, o in origin.items()) or "none: all precomputed"))
    return frozen
