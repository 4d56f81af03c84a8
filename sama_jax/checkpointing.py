"""sama-train's checkpoints: an Orbax CheckpointManager over WORKDIR/checkpoints/<step>/.

Items of a step: params, ema, opt_state (the train state's pytrees, each its own item so that
sama-edit can restore the EMA alone), train (step, rng, skip counters), data (the Grain iterator
state, JSON) and config (the resolved config, JSON). Saves are asynchronous when asked; Orbax writes
a step into a temporary directory and renames it when complete, so a process killed during a save
leaves the previous step as the latest loadable one (the partial directory is removed at the next
start).
"""
from __future__ import annotations

import os
from typing import Any

import orbax.checkpoint as ocp

from sama_jax.train_step import SCALARS

TREE_ITEMS = ("params", "ema", "opt_state")


def split_state(state: dict) -> dict:
    """Train state -> {item: pytree}."""
    items = {name: state[name] for name in TREE_ITEMS}
    items["train"] = {k: state[k] for k in SCALARS + ("rng",)}
    return items


def join_state(items: dict) -> dict:
    return dict({name: items[name] for name in TREE_ITEMS}, **items["train"])


class Checkpointer:
    def __init__(self, directory: str, *, every_steps: int = 1, keep: int | None = None,
                 async_save: bool = False, read_only: bool = False):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(self.directory, options=ocp.CheckpointManagerOptions(
            save_interval_steps=max(1, int(every_steps)), max_to_keep=keep,
            enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
            cleanup_tmp_directories=not read_only))

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, data_state: dict, config_json: dict,
             force: bool = False) -> bool:
        """Starts saving (async when configured); False when the step is not a save step."""
        items = {name: ocp.args.StandardSave(tree) for name, tree in split_state(state).items()}
        items["data"] = ocp.args.JsonSave(data_state)
        items["config"] = ocp.args.JsonSave(config_json)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        """-> (train state placed as abstract_state's shardings say, data iterator state)."""
        items = {name: ocp.args.StandardRestore(tree)
                 for name, tree in split_state(abstract_state).items()}
        items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return join_state({k: restored[k] for k in TREE_ITEMS + ("train",)}), restored["data"]

    def restore_tree(self, step: int, item: str, abstract: Any) -> Any:
        """One item (e.g. 'ema' or 'params') alone."""
        return self.manager.restore(step, args=ocp.args.Composite(
            **{item: ocp.args.StandardRestore(abstract)}))[item]

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
