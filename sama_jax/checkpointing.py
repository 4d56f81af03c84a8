"""sama-train's checkpoints: an Orbax CheckpointManager over WORKDIR/checkpoints/<step>/.

Items of a step: params, ema, opt_state (the train state's pytrees, each its own item so that
sama-edit can restore the EMA alone), train (step, rng, skip counters), data (the Grain iterator
state, JSON) and config (the resolved config, JSON). Saves are asynchronous when asked; Orbax writes
a step into a temporary directory and renames it when complete, so a process killed during a save
leaves the previous step as the latest loadable one (the partial directory is removed at the next
start).

A step that no longer restores (a file lost or truncated on disk) is never deleted: resume_newest
moves it aside, into checkpoints.aside/ beside the checkpoints, and resumes from the newest step that
restores completely; a chosen step (sama-train --resume-step N) moves the steps after it aside too,
so the run goes on from N without an older future in its way.
"""

from __future__ import annotations

import os
import sys
from typing import Any, Callable

import orbax.checkpoint as ocp

TREE_ITEMS = ("params", "ema", "opt_state")
ASIDE = "checkpoints.aside"


class CheckpointError(ValueError):
    """No checkpoint of a run can be resumed from; the message names the steps and why."""


def _quiet_abandoned_reads() -> None:
    """A failed restore leaves TensorStore reads of the other items in flight; their callbacks find
    Orbax's event loop closed and print 'RuntimeError: Event loop is closed' tracebacks (through
    sys.unraisablehook), seconds later. Those and only those are dropped from now on."""
    previous = sys.unraisablehook
    if getattr(previous, "quiet_abandoned_reads", False):
        return

    def hook(unraisable):
        error = unraisable.exc_value
        if not (isinstance(error, RuntimeError) and str(error) == "Event loop is closed"):
            previous(unraisable)

    hook.quiet_abandoned_reads = True
    sys.unraisablehook = hook


def _first_line(error: BaseException, limit: int = 200) -> str:
    """TensorStore's errors run to thousands of characters: the start says which file and what."""
    text = " ".join(str(error).split()) or type(error).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."


def split_state(state: dict) -> dict:
    """Train state -> {item: pytree}: the TREE_ITEMS, and "train" for the rest (step, counters, rng)."""
    items = {name: state[name] for name in TREE_ITEMS}
    items["train"] = {k: v for k, v in state.items() if k not in TREE_ITEMS}
    return items


def join_state(items: dict) -> dict:
    return dict({name: items[name] for name in TREE_ITEMS}, **items["train"])


class Checkpointer:
    def __init__(
        self,
        directory: str,
        *,
        every_steps: int = 1,
        keep: int | None = None,
        async_save: bool = False,
        read_only: bool = False,
    ):
        self.directory = os.path.abspath(directory)
        self.manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(
                save_interval_steps=max(1, int(every_steps)),
                max_to_keep=keep,
                enable_async_checkpointing=async_save,
                create=not read_only,
                read_only=read_only,
                cleanup_tmp_directories=not read_only,
            ),
        )

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def all_steps(self) -> list[int]:
        return list(self.manager.all_steps())

    def save(self, step: int, state: dict, data_state: dict, config_json: dict, force: bool = False) -> bool:
        """Starts saving (async when configured); False when the step is not a save step."""
        items = {name: ocp.args.StandardSave(tree) for name, tree in split_state(state).items()}
        items["data"] = ocp.args.JsonSave(data_state)
        items["config"] = ocp.args.JsonSave(config_json)
        return self.manager.save(step, args=ocp.args.Composite(**items), force=force)

    def restore(self, step: int, abstract_state: dict) -> tuple[dict, dict]:
        """-> (train state placed as abstract_state's shardings say, data iterator state)."""
        items = {name: ocp.args.StandardRestore(tree) for name, tree in split_state(abstract_state).items()}
        items["data"] = ocp.args.JsonRestore()
        restored = self.manager.restore(step, args=ocp.args.Composite(**items))
        return join_state({k: restored[k] for k in TREE_ITEMS + ("train",)}), restored["data"]

    def resume_newest(
        self, abstract_state: dict, step: int | None = None, log: Callable[[str], None] = print
    ) -> tuple[int | None, dict | None, dict | None]:
        """-> (step, train state, data state) of the newest step that restores completely, or of
        `step`; (None, None, None) when there is no checkpoint. Newer steps that fail are moved aside
        (each named in one line) only once an older one restores: a failure of every step (a config
        that no longer matches, say) moves nothing and raises CheckpointError."""
        steps = sorted(self.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise CheckpointError(
                    f"--resume-step {step}: {self.directory} holds no step {step} (steps: {sorted(steps)})"
                )
            try:
                state, data = self.restore(step, abstract_state)
            except Exception as e:  # noqa: BLE001 - any failure of a chosen step is the user's to see
                _quiet_abandoned_reads()
                raise CheckpointError(
                    f"--resume-step {step}: {self.directory}/{step} does not restore: {_first_line(e)}"
                ) from e
            later = [s for s in steps if s > step]
            if later:
                moved = [self.set_aside(s) for s in sorted(later)]
                log(f"steps {sorted(later)} are newer than --resume-step {step}: moved aside to {moved}")
            return step, state, data
        failed = []
        for candidate in steps:
            try:
                state, data = self.restore(candidate, abstract_state)
            except Exception as e:  # noqa: BLE001 - a step that does not restore is set aside below
                _quiet_abandoned_reads()
                failed.append((candidate, e))
                continue
            for bad, error in failed:
                log(
                    f"checkpoint step {bad} does not restore ({_first_line(error)}); "
                    f"moved aside to {self.set_aside(bad)}"
                )
            return candidate, state, data
        if failed:
            bad, error = failed[0]
            raise CheckpointError(
                f"no checkpoint in {self.directory} restores (steps {[s for s, _ in failed]}; step {bad}: "
                f"{_first_line(error)}); nothing was moved; a changed config? see --resume-step"
            )
        return None, None, None

    def set_aside(self, step: int) -> str:
        """Moves a step's directory into ASIDE beside the checkpoints (never deleted); -> its new path."""
        aside = os.path.join(os.path.dirname(self.directory), ASIDE)
        os.makedirs(aside, exist_ok=True)
        target = os.path.join(aside, str(step))
        n = 1
        while os.path.exists(target):  # the same step set aside twice
            target = os.path.join(aside, f"{step}.{n}")
            n += 1
        os.rename(os.path.join(self.directory, str(step)), target)
        self.manager.reload()
        return target

    def restore_tree(self, step: int, item: str, abstract: Any) -> Any:
        """One item (e.g. 'ema' or 'params') alone."""
        return self.manager.restore(
            step, args=ocp.args.Composite(**{item: ocp.args.StandardRestore(abstract)})
        )[item]

    def restore_config(self, step: int) -> dict:
        return self.manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))["config"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()
