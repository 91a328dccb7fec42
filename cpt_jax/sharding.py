"""Device mesh and logical-axis rules, as MaxText does it: the model names its axes
(`out_sharding` metadata on every parameter), the rules here map those names onto the mesh
axes `data`, `fsdp` and `tp`, and `NamedSharding`s place the arrays.

A logical axis whose size the mesh axes do not divide (two KV heads on four `tp` devices, say)
is replicated instead of failing, and a mesh axis is used at most once per array.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import jax
import numpy as np
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tp")
MeshAxes = str | tuple[str, ...] | None

# Logical axis -> mesh axes. Weights shard their model dimension over fsdp (ZeRO-3 style)
# and their heads / MLP / vocabulary over tp; batches shard over data and fsdp.
DEFAULT_RULES: tuple[tuple[str, MeshAxes], ...] = (
    ("batch", ("data", "fsdp")),
    ("layers", None),
    ("embed", "fsdp"),
    ("vision_embed", "fsdp"),
    ("mlp", "tp"),
    ("vision_mlp", "tp"),
    ("heads", "tp"),
    ("kv_heads", "tp"),
    ("vision_heads", "tp"),
    ("vocab", "tp"),
    ("head_dim", None),
)


def make_mesh(shape: Sequence[int], devices: Sequence[jax.Device] | None = None) -> Mesh:
    """A (data, fsdp, tp) mesh over `devices` (default: all)."""
    devices = list(devices if devices is not None else jax.devices())
    if int(np.prod(shape)) != len(devices):
        raise ValueError(f"mesh shape {tuple(shape)} needs {int(np.prod(shape))} devices, "
                         f"got {len(devices)}")
    return Mesh(np.asarray(devices).reshape(tuple(shape)), MESH_AXES)


def logical_spec(axes: Sequence[str | None], shape: Sequence[int], mesh: Mesh,
                 rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> PartitionSpec:
    """The PartitionSpec of an array with these logical axes and shape."""
    table = dict(rules)
    used: set[str] = set()
    spec: list[MeshAxes] = []
    for name, size in zip(axes, shape, strict=True):
        wanted = table.get(name) if name is not None else None
        wanted = (wanted,) if isinstance(wanted, str) else tuple(wanted or ())
        kept = tuple(a for a in wanted if a not in used and mesh.shape[a] > 1)
        if kept and size % int(np.prod([mesh.shape[a] for a in kept])) == 0:
            used.update(kept)
            spec.append(kept[0] if len(kept) == 1 else kept)
        else:
            spec.append(None)
    return PartitionSpec(*spec)


def constrain(x: jax.Array, axes: Sequence[str | None],
              rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> jax.Array:
    """Pins an activation's sharding by its logical axes under a mesh set with `jax.set_mesh`
    (a no-op without one): left to itself, XLA's propagation may gather a batch onto every
    device to match the fsdp-sharded weights, which multiplies activation memory."""
    mesh = jax.sharding.get_abstract_mesh()
    if mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names):
        return x
    return jax.lax.with_sharding_constraint(x, logical_spec(axes, x.shape, mesh, rules))


def constrain_state(state: Any, rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> Any:
    """`constrain` every variable of a state by its own logical axes: a gradient accumulator
    built inside a step (zeros shaped like the parameters) has no sharding of its own, and XLA
    may otherwise keep a full fp32 copy on every device."""

    def one(leaf: Any) -> Any:
        if not isinstance(leaf, nnx.Variable):
            return leaf
        axes = leaf.get_metadata().get("out_sharding")
        return leaf.replace(constrain(leaf.get_value(), axes, rules)) if axes else leaf

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def state_shardings(state: Any, mesh: Mesh,
                    rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> Any:
    """The tree with each variable's array replaced by its NamedSharding (same structure, for
    `jax.device_put`, restore targets and ahead-of-time lowering), from the variables' logical
    axes. Arrays without axis names, and plain arrays (an optimiser's step count), are
    replicated; an optimiser state's moments are variables that carry their parameter's axes.
    """

    def sharding(leaf: Any) -> Any:
        if not isinstance(leaf, nnx.Variable):
            return NamedSharding(mesh, PartitionSpec())
        value = leaf.get_value()
        axes = leaf.get_metadata().get("out_sharding") or (None,) * np.ndim(value)
        return leaf.replace(NamedSharding(mesh, logical_spec(axes, np.shape(value), mesh,
                                                             rules)))

    return jax.tree.map(sharding, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def shard_state(state: nnx.State, mesh: Mesh,
                rules: Sequence[tuple[str, MeshAxes]] = DEFAULT_RULES) -> nnx.State:
    """The state's arrays placed on the mesh by their logical axes."""
    return jax.device_put(state, state_shardings(state, mesh, rules))


# Where the batch (rows) axis sits in each array of a step's stacked batch
# ([micro_batches, rows, ...]; positions are [micro_batches, 3, rows, length]; a GRPO batch's
# prompt arrays have a row per prompt, its answer arrays a row per answer).
BATCH_AXIS = {"input_ids": 1, "attention_mask": 1, "loss_mask": 1, "loss_positions": 1,
              "response_mask": 1, "old_logprobs": 1, "ref_logprobs": 1, "advantages": 1,
              "positions": 2, "prompt_ids": 1, "prompt_mask": 1, "prompt_positions": 2,
              "answer_ids": 1}


def batch_shardings(batch: dict, mesh: Mesh, *, steps_axis: bool = False) -> dict:
    """The NamedSharding of each array of a stacked step batch: rows split over data x fsdp
    (where they divide), the packed image patches split over the same devices by patch (they
    do not align with the rows; the vision tower works on them spread the same way), the rest
    (the patches' layout) replicated. `steps_axis`: the arrays have one more leading axis,
    the updates of a `make_sft_steps` call."""
    shift = int(steps_axis)

    def sharding(key: str, value) -> NamedSharding:
        if key == "pixel_values":  # [..., patches, patch_dim]: patches over the devices
            axes = [None] * np.ndim(value)
            axes[-2] = "batch"
            return NamedSharding(mesh, logical_spec(axes, np.shape(value), mesh))
        if key not in BATCH_AXIS:
            return NamedSharding(mesh, PartitionSpec())
        axes = [None] * np.ndim(value)
        axes[BATCH_AXIS[key] + shift] = "batch"
        return NamedSharding(mesh, logical_spec(axes, np.shape(value), mesh))

    def place(key: str, value):
        if hasattr(value, "_fields"):  # VisionInputs: its pixel values spread, layout replicated
            return type(value)(*(place(field, v) for field, v in zip(value._fields, value,
                                                                     strict=True)))
        return jax.tree.map(lambda v: sharding(key, v), value)

    return {key: place(key, value) for key, value in batch.items()}


def shard_batch(batch: dict, mesh: Mesh, *, steps_axis: bool = False) -> dict:
    """A stacked step batch placed on the mesh by `batch_shardings`."""
    return jax.device_put(batch, batch_shardings(batch, mesh, steps_axis=steps_axis))


def to_host(array: Any) -> np.ndarray:
    """A device array's whole value as NumPy on this process. An array spread over other
    processes' devices too (a multi-host run's rollout tokens) is gathered from them, a
    collective: every process must call it for the same array."""
    if isinstance(array, jax.Array) and not array.is_fully_addressable:
        from jax.experimental import multihost_utils
        return np.asarray(multihost_utils.process_allgather(array, tiled=True))
    return np.asarray(array)
