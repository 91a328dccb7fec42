"""Checkpoints with Orbax: rolling in-stage checkpoints to resume from, and each stage's final
model, kept for good.

    <output_dir>/checkpoints/rolling/<n>/      state (params, optimiser, step) + meta JSON
    <output_dir>/checkpoints/stages/<stage>/   the stage's final parameters + meta JSON

`meta` holds what is not an array: the stage index, the data iterator's state, RIF pass
counts, the metrics so far. Orbax writes a checkpoint into a temporary folder and renames it
when it is complete (on GCS: marks it with a commit file), so a save cut short by a kill is
never listed, never restored. `output_dir` may be a `gs://` URL. Restoring
takes an abstract target (shapes, dtypes and the shardings wanted now), so a checkpoint
written on one mesh restores onto another; a target of another shape is an error that names
the array.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import Any

import jax
import orbax.checkpoint as ocp
from etils import epath

from cpt_jax.run_dir import CHECKPOINTS, as_path


class CheckpointError(ValueError):
    """A checkpoint that cannot be restored onto the requested target."""


def abstract(tree: Any, shardings: Any | None = None) -> Any:
    """Shapes, dtypes and shardings of a pytree of arrays: a restore target. The shardings are
    `shardings`, else each array's own, else this process's default device: never the saved
    ones, which name devices that may not be here (a checkpoint from a TPU pod on a laptop)."""
    if shardings is None:
        default = jax.sharding.SingleDeviceSharding(jax.devices()[0])
        return jax.tree.map(lambda x: jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=getattr(x, "sharding", None) or default), tree)
    return jax.tree.map(lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s),
                        tree, shardings)


class Checkpoints:
    """The run's two checkpoint managers."""

    def __init__(self, output_dir: os.PathLike | str, *, keep: int = 2):
        root = as_path(output_dir) / CHECKPOINTS
        # Each manager names its own multi-host barriers: rolling save n and stage n can be in
        # flight at once, and Orbax would otherwise give both the same barrier key.
        self.rolling = _manager(root / "rolling", ocp.CheckpointManagerOptions(
            max_to_keep=keep, create=True, multiprocessing_options=ocp.options.
            MultiprocessingOptions(barrier_sync_key_prefix="rolling")))
        self.stages = _manager(root / "stages", ocp.CheckpointManagerOptions(
            create=True, multiprocessing_options=ocp.options.MultiprocessingOptions(
                barrier_sync_key_prefix="stages")))

    def save(self, step: int, state: Any, meta: dict[str, Any]) -> None:
        """Rolling checkpoint number `step`, increasing (the oldest beyond `keep` are
        deleted)."""
        self.rolling.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
                                                        meta=ocp.args.JsonSave(_snapshot(meta))),
                          force=True)

    def latest_step(self) -> int | None:
        return self.rolling.latest_step()

    def meta(self, step: int) -> dict[str, Any]:
        """The metadata of rolling checkpoint `step` alone (to build the restore target)."""
        if step not in self.rolling.all_steps():
            raise CheckpointError(f"no checkpoint {step} in {self.rolling.directory}")
        return self.rolling.restore(step, args=ocp.args.Composite(
            meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, step: int, target: Any) -> tuple[Any, dict[str, Any]]:
        """The rolling checkpoint at `step` onto `target` (see `abstract`)."""
        return self._restore(self.rolling, step, target)

    def save_stage(self, stage: int, params: Any, meta: dict[str, Any]) -> None:
        """Stage `stage`'s final parameters, kept for good. A run killed after this save but
        before its next rolling checkpoint resumes inside the stage and ends it again: that
        save replaces the earlier one (Orbax refuses a step that exists)."""
        if stage in self.stages.all_steps():
            self.stages.delete(stage)
        self.stages.save(stage, args=ocp.args.Composite(state=ocp.args.StandardSave(params),
                                                        meta=ocp.args.JsonSave(_snapshot(meta))),
                         force=True)

    def saved_stages(self) -> list[int]:
        return list(self.stages.all_steps())

    def restore_stage(self, stage: int, target: Any) -> tuple[Any, dict[str, Any]]:
        return self._restore(self.stages, stage, target)

    def wait(self) -> None:
        """Block until every save has been written (saves may run in the background)."""
        self.rolling.wait_until_finished()
        self.stages.wait_until_finished()

    def close(self) -> None:
        self.rolling.close()
        self.stages.close()

    @staticmethod
    def _restore(manager: ocp.CheckpointManager, step: int,
                 target: Any) -> tuple[Any, dict[str, Any]]:
        if step not in manager.all_steps():
            raise CheckpointError(f"no checkpoint {step} in {manager.directory} (have "
                                  f"{list(manager.all_steps())})")
        _check_shapes(manager, step, target)
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()))
        return restored["state"], restored["meta"]


def _snapshot(meta: dict[str, Any]) -> dict[str, Any]:
    """A copy of the metadata as it is now. Orbax may write the JSON in the background, after
    `save` returns: a dict that the caller goes on changing (the trainer's progress) would be
    saved as it is then, ahead of the arrays (a resumed run then repeated a step)."""
    return copy.deepcopy(meta)


def _manager(directory: Path | epath.Path,
             options: ocp.CheckpointManagerOptions) -> ocp.CheckpointManager:
    """A manager that knows its items' handlers, so that a fresh one (a resumed run) can read
    the metadata of checkpoints it did not write."""
    return ocp.CheckpointManager(
        directory, options=options, item_names=("state", "meta"),
        item_handlers={"state": ocp.StandardCheckpointHandler(),
                       "meta": ocp.JsonCheckpointHandler()})


def _check_shapes(manager: ocp.CheckpointManager, step: int, target: Any) -> None:
    """Every array of the target exists in the checkpoint with the same shape; else one error
    naming the first that does not (a checkpoint of another model, say)."""
    saved = manager.item_metadata(step)["state"]
    saved_leaves = {_name(path): leaf
                    for path, leaf in jax.tree_util.tree_leaves_with_path(saved)}
    for path, leaf in jax.tree_util.tree_leaves_with_path(target):
        key = _name(path)
        if key not in saved_leaves:
            raise CheckpointError(f"{manager.directory}/{step}: no array {key} in the "
                                  f"checkpoint (another model or state layout?)")
        shape = tuple(getattr(saved_leaves[key], "shape", ()))
        if shape != tuple(leaf.shape):
            raise CheckpointError(f"{manager.directory}/{step}: {key} has shape {shape} in the "
                                  f"checkpoint, the target wants {tuple(leaf.shape)}")


def _name(path: tuple[Any, ...]) -> str:
    """A key path as "a/b/0/c", whether its parts are dict keys, attributes or indices (a
    saved named tuple reads back as a dict)."""
    parts = []
    for part in path:
        for attribute in ("key", "name", "idx"):
            if hasattr(part, attribute):
                parts.append(str(getattr(part, attribute)))
                break
        else:
            parts.append(str(part))
    return "/".join(parts)
