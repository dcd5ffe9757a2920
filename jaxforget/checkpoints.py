"""Orbax checkpoint I/O (the one module that writes training state to disk).

``StepCheckpointer``: mid-run step checkpoints of a pytree of arrays (params, optimizer state,
EMA, step), so a crash loses at most ``every`` steps and re-running the same command resumes.
Orbax writes each step into a temporary folder and renames it when complete, so a killed process
never leaves a half-written checkpoint that a resume would pick up.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp


class StepCheckpointer:
    def __init__(self, directory: str | os.PathLike, *, every: int, keep: int = 2):
        self.directory = Path(directory).absolute()
        self.every = max(int(every), 1)
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=keep, create=True, enable_async_checkpointing=False),
        )

    def latest_step(self) -> int | None:
        return self._manager.latest_step()

    def restore(self, abstract_tree: Any, step: int | None = None) -> tuple[int, Any] | None:
        """(step, tree) of the given or latest checkpoint, shaped/sharded like ``abstract_tree``."""
        step = self.latest_step() if step is None else step
        if step is None:
            return None
        target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_tree)
        tree = self._manager.restore(step, args=ocp.args.StandardRestore(target))
        return step, tree

    def maybe_save(self, step: int, tree: Any, *, force: bool = False) -> bool:
        """Save at every ``every``-th step (or when forced, e.g. at the end of a stage)."""
        if not force and step % self.every:
            return False
        if self.latest_step() == step:
            return False
        self._manager.save(step, args=ocp.args.StandardSave(tree), force=True)
        self._manager.wait_until_finished()
        return True

    def close(self) -> None:
        self._manager.wait_until_finished()
        self._manager.close()
