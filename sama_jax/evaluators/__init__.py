"""Evaluators that sama-train runs every config.eval.every_steps, named by config.eval.evaluators.

Each is a module here with one class: built as Class(config, mesh=, rules=, encoders=, tokenizer=),
its `run(dit, step)` yields (metric name, value) pairs, written to TensorBoard under those names:
a number as a scalar, an (H, W, 3) uint8 array as an image.
    val_loss      SAMA's loss at fixed sigmas and noise on held-out data (evaluators/val_loss.py)
    edit_scores   held-out synthetic edits by the current DiT, scored against exact targets, and
                  the first few as pictures (evaluators/edit_scores.py)
"""

from __future__ import annotations

import importlib

from sama_jax.config import ConfigError

# name -> "module:Class"
REGISTRY = {
    "val_loss": "sama_jax.evaluators.val_loss:ValLoss",
    "edit_scores": "sama_jax.evaluators.edit_scores:EditScores",
}


def build(config, *, mesh, rules, encoders, tokenizer) -> list:
    evaluators = []
    for name in config.eval.evaluators:
        if name not in REGISTRY:
            raise ConfigError(f"config.eval.evaluators names {name!r}; known: {sorted(REGISTRY)}")
        module_name, class_name = REGISTRY[name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            raise ConfigError(f"config.eval.evaluators: {name!r} is not available ({e})") from e
        evaluators.append(
            getattr(module, class_name)(
                config, mesh=mesh, rules=rules, encoders=encoders, tokenizer=tokenizer
            )
        )
    return evaluators
