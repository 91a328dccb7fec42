"""Supervised fine-tuning: the response-only loss and one jitted, gradient-accumulating step.

The loss is the token-mean cross-entropy over the response tokens of the whole (global) batch,
as LLaMA-Factory computes it: every response token weighs the same, whatever the length of
its example or micro-batch. Gradient accumulation therefore sums per-token losses and token
counts over the micro-batches and divides once at the end (a mean of micro-batch means would
over-weight micro-batches with few response tokens).

One step is one `jax.jit` over (state, batch) with the state donated: the micro-batches are
stacked on a leading axis and scanned with `lax.scan`, so the step compiles once per bucket
shape (token length, patch count), never per batch. Only the `nnx.Param` variables are
trained; the model is merged from the split state inside the trace. `make_sft_steps` scans
several such updates in one call (Keras' `steps_per_execution`), which pays a call's fixed
costs once for all of them.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx, struct

from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, VisionInputs
from cpt_jax.models.qwen2_5_vl.layers import map_in_chunks
from cpt_jax.optim import current_learning_rate
from cpt_jax.sharding import constrain_state

Batch = dict[str, Any]
"""Jit inputs: input_ids [b, s], positions [3, b, s], attention_mask [b, s], loss_mask [b, s],
loss_positions [b, w] (`loss_windows`), vision (VisionInputs or None); stacked on a leading
micro-batch axis for the step."""


@struct.dataclass
class TrainState:
    """What a step reads and replaces: the trained parameters, the model's other variables,
    the optimiser state and the number of updates made."""

    graphdef: nnx.GraphDef = struct.field(pytree_node=False)
    params: nnx.State
    rest: nnx.State
    opt_state: optax.OptState
    step: jax.Array

    @classmethod
    def create(cls, model: nnx.Module, optimizer: optax.GradientTransformation) -> TrainState:
        """Takes the model's arrays without copying them: the first step donates them, so use
        `state.model()` afterwards, not `model`."""
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)
        return cls(graphdef=graphdef, params=params, rest=rest,
                   opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))

    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params, self.rest)


def _token_sums(model: Qwen2_5_VL, batch: Batch) -> dict[str, jax.Array]:
    """Summed cross-entropy, correct predictions and count over the batch's response tokens.

    The logits at t predict the id at t+1, so the target of position t is input_ids[t+1] and
    its weight loss_mask[t+1]; the last position predicts nothing. Logits are computed only at
    the batch's `loss_positions` (each row's response window, `loss_windows`): a prompt of
    image tokens needs no vocabulary projection. float32 throughout, with log-softmax as
    logsumexp minus the target logit, the projection taken a chunk of positions at a time
    (`per_position`).
    """
    ids, mask = batch["input_ids"], batch["attention_mask"]
    hidden, _ = model.hidden_states(ids, batch["positions"], mask, batch["vision"])
    targets = jnp.pad(ids[:, 1:], ((0, 0), (0, 1)))
    weights = (batch["loss_mask"][:, 1:] * mask[:, 1:]).astype(jnp.float32)
    weights = jnp.pad(weights, ((0, 0), (0, 1)))
    # Only the positions that predict a response token reach the vocabulary projection.
    window = batch["loss_positions"]
    hidden = jnp.take_along_axis(hidden, window[..., None], axis=1)
    targets, weights = (jnp.take_along_axis(x, window, axis=1) for x in (targets, weights))

    def stats(logits: jax.Array, chunk_targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        # The target is predicted when its logit is the largest: a max, not an argmax (whose
        # index reduction cost 1.5 % of a CPU step); an exact tie counts as predicted.
        target_logits = jnp.take_along_axis(logits, chunk_targets[..., None], axis=-1)[..., 0]
        correct = (target_logits >= jnp.max(logits, axis=-1)).astype(jnp.float32)
        return -target_logprobs(logits, chunk_targets), correct

    nll, correct = per_position(model, hidden, targets, stats)
    return {"loss_sum": jnp.sum(nll * weights), "correct": jnp.sum(correct * weights),
            "tokens": jnp.sum(weights)}


LOGIT_CHUNK = 1024


def per_position(model: Qwen2_5_VL, hidden: jax.Array, targets: jax.Array,
                 fn: Callable[[jax.Array, jax.Array], tuple[jax.Array, ...]],
                 chunk: int | None = None) -> tuple[jax.Array, ...]:
    """`fn(logits [b, c, vocab] float32, targets [b, c]) -> per-position arrays [b, c]` over
    the sequence, `chunk` positions at a time, each chunk's logits recomputed in the backward
    pass: a 7,168-token row of Qwen's 152k vocabulary would otherwise hold several float32
    [s, vocab] copies (4.4 GB each) through the loss and its gradient."""
    def position_major(rows: jax.Array, row_targets: jax.Array) -> tuple[jax.Array, ...]:
        outs = fn(model.logits(jnp.moveaxis(rows, 0, 1)), jnp.moveaxis(row_targets, 0, 1))
        return tuple(jnp.moveaxis(o, 1, 0) for o in outs)

    outs = map_in_chunks(position_major, (jnp.moveaxis(hidden, 1, 0), targets.T),
                         chunk or LOGIT_CHUNK)
    return tuple(o.T for o in outs)


def target_logprobs(logits: jax.Array, targets: jax.Array) -> jax.Array:
    """log softmax(logits)[target] per position, as the target logit minus logsumexp: float32
    [b, s] without materialising [b, s, vocab] log-probabilities."""
    target_logits = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]
    return target_logits - jax.nn.logsumexp(logits, axis=-1)


def _means(sums: dict[str, jax.Array]) -> dict[str, jax.Array]:
    tokens = jnp.maximum(sums["tokens"], 1.0)
    return {"loss": sums["loss_sum"] / tokens, "accuracy": sums["correct"] / tokens,
            "tokens": sums["tokens"]}


def sft_loss(model: Qwen2_5_VL, batch: Batch) -> tuple[jax.Array, dict[str, jax.Array]]:
    """Token-mean cross-entropy over the response tokens of one (unstacked) batch; metrics:
    loss, token accuracy (the target has the largest logit) and the number of response
    tokens."""
    metrics = _means(_token_sums(model, batch))
    return metrics["loss"], metrics


def sft_update(model: nnx.Module, optimizer: optax.GradientTransformation, *,
               micro_batches: int) -> Callable[[TrainState, Batch],
                                               tuple[TrainState, dict[str, jax.Array]]]:
    """`update(state, batch) -> (state, metrics)`: one optimiser update, not jitted.

    `batch` is `stack_micro_batches`' output: every array has a leading axis of
    `micro_batches`. Gradients accumulate in float32; metrics: loss, accuracy, tokens (of the
    whole batch), grad_norm (before clipping) and learning_rate (of this update).
    """
    if micro_batches < 1:
        raise ValueError(f"micro_batches must be >= 1, got {micro_batches}")
    graphdef = nnx.graphdef(model)

    def sums_and_grads(params: nnx.State, rest: nnx.State, micro: Batch):
        def loss_sum(p: nnx.State):
            sums = _token_sums(nnx.merge(graphdef, p, rest), micro)
            return sums["loss_sum"], sums
        (_, sums), grads = jax.value_and_grad(loss_sum, has_aux=True)(params)
        return sums, jax.tree.map(lambda g: g.astype(jnp.float32), grads)

    def update(state: TrainState, batch: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        _require_leading(batch, micro_batches, "micro-batches (use stack_micro_batches)")
        if micro_batches == 1:
            sums, grads = sums_and_grads(state.params, state.rest,
                                         jax.tree.map(lambda x: x[0], batch))
        else:
            def accumulate(carry, micro):
                sums, grads = sums_and_grads(state.params, state.rest, micro)
                sums, grads = jax.tree.map(jnp.add, carry, (sums, grads))
                return (sums, constrain_state(grads)), None

            zeros = (dict.fromkeys(("loss_sum", "correct", "tokens"), jnp.zeros((), jnp.float32)),
                     constrain_state(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32),
                                                  state.params)))
            (sums, grads), _ = jax.lax.scan(accumulate, zeros, batch)
        grads = jax.tree.map(lambda g: g / jnp.maximum(sums["tokens"], 1.0), grads)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**_means(sums), "grad_norm": optax.tree.norm(grads),
                   "learning_rate": current_learning_rate(opt_state)}
        return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

    return update


def make_sft_step(model: nnx.Module, optimizer: optax.GradientTransformation, *,
                  micro_batches: int) -> Callable[[TrainState, Batch],
                                                  tuple[TrainState, dict[str, jax.Array]]]:
    """`step(state, batch) -> (state, metrics)`: `sft_update` jitted with the state donated."""
    return jax.jit(sft_update(model, optimizer, micro_batches=micro_batches), donate_argnums=0)


def make_sft_steps(model: nnx.Module, optimizer: optax.GradientTransformation, *,
                   micro_batches: int, steps: int) -> Callable[
                       [TrainState, Batch], tuple[TrainState, dict[str, jax.Array]]]:
    """`steps(state, batches) -> (state, metrics)`: `steps` updates in one jitted call, the
    state donated, each update's batch from `stack_micro_batches(..., steps=steps)` (arrays
    [steps, micro_batches, ...]) and each metric stacked [steps].

    The same updates as `steps` calls of `make_sft_step`, for fewer calls. On the CPU, XLA's
    runtime maps each call's temporaries afresh and unmaps them at its end (close to 1 GB for
    the `small` model's step): the page faults and the unmapping then cost 13-20 % of a
    step, which a call of several steps pays once.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    update = sft_update(model, optimizer, micro_batches=micro_batches)

    def run(state: TrainState, batches: Batch) -> tuple[TrainState, dict[str, jax.Array]]:
        _require_leading(batches, steps, f"steps (use stack_micro_batches(..., steps={steps}))")
        return jax.lax.scan(update, state, batches)

    return jax.jit(run, donate_argnums=0)


def _require_leading(batch: Batch, size: int, what: str) -> None:
    leading = {x.shape[0] for x in jax.tree.leaves(batch)}
    if leading != {size}:
        raise ValueError(f"batch arrays have leading axes {sorted(leading)}, expected {size} "
                         f"{what}")


def stack_micro_batches(batches: Sequence[dict[str, np.ndarray]], model: Qwen2_5_VL, *,
                        steps: int = 1) -> Batch:
    """Pipeline SFT batches (one per micro-batch, same number of rows) -> the step's input.

    Each is padded on the right (SFT rows are right-padded) to the longest token bucket among
    them and its patches to the largest patch bucket, so that all stack; positions and the
    vision layout come from `model.prepare_inputs`. A text-only batch among image batches gets
    a blank 2x2-patch image that no token reads. Returns NumPy arrays (host memory), stacked
    [micro_batches, ...]; with `steps` > 1 the batches are `steps` updates' micro-batches in
    order, stacked [steps, micro_batches, ...] for `make_sft_steps`.
    """
    if not batches:
        raise ValueError("stack_micro_batches needs at least one batch")
    if steps < 1 or len(batches) % steps:
        raise ValueError(f"{len(batches)} batches do not split into {steps} steps")
    rows = {b["input_ids"].shape[0] for b in batches}
    if len(rows) != 1:
        raise ValueError(f"micro-batches must have the same number of rows, got {sorted(rows)}")
    length = max(b["input_ids"].shape[1] for b in batches)
    patches = max((b["pixel_values"].shape[0] for b in batches if len(b["image_grid_thw"])),
                  default=None)
    prepared = [_prepare(b, model, length, patches) for b in batches]
    windows = loss_windows(np.concatenate([p["loss_mask"] for p in prepared]))
    for p, rows in zip(prepared, np.split(windows, len(prepared)), strict=True):
        p["loss_positions"] = rows
    stacked = jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *prepared)
    if steps == 1:
        return stacked
    return jax.tree.map(lambda x: x.reshape(steps, -1, *x.shape[1:]), stacked)


MIN_LOSS_WINDOW = 32


def loss_windows(loss_mask: np.ndarray) -> np.ndarray:
    """Per row, the positions whose logits the loss needs: int32 [rows, W], consecutive, from
    the position before the row's first response token, W the longest response span rounded up
    to a power of two (at least MIN_LOSS_WINDOW, at most the row length), so that a step
    compiles once per (length, window) bucket. A window that would run past the row's end
    starts earlier; a row without response tokens gets the first W positions (weight 0)."""
    rows, length = loss_mask.shape
    has_loss = loss_mask.any(axis=1)
    first = np.where(has_loss, loss_mask.argmax(axis=1), 1)
    last = np.where(has_loss, length - 1 - loss_mask[:, ::-1].argmax(axis=1), 1)
    start = np.maximum(first, 1) - 1  # token 0 is never a target
    span = int(np.max(last - start, initial=1))
    width = min(length, max(MIN_LOSS_WINDOW, 1 << (span - 1).bit_length()))
    start = np.minimum(start, length - width)
    return (start[:, None] + np.arange(width)[None, :]).astype(np.int32)


def _prepare(batch: dict[str, np.ndarray], model: Qwen2_5_VL, length: int,
             patches: int | None) -> Batch:
    cfg = model.config
    pad_id = cfg.pad_token_id if cfg.pad_token_id is not None else 0

    def widen(x: np.ndarray, value: int) -> np.ndarray:
        return np.pad(x, ((0, 0), (0, length - x.shape[1])), constant_values=value)

    grid = batch["image_grid_thw"]
    images = {}
    if len(grid):
        images = {"pixel_values": batch["pixel_values"][:int(batch["num_patches"])],
                  "image_grid_thw": grid, "pad_patches_to": patches}
    ids, positions, mask, vision, _ = model.prepare_inputs(
        widen(batch["input_ids"], pad_id), attention_mask=widen(batch["attention_mask"], 0),
        **images)
    if vision is None and patches is not None:
        vision = VisionInputs.blank(cfg.vision, pad_to=patches)
    return {"input_ids": ids, "positions": positions, "attention_mask": mask,
            "loss_mask": widen(batch["loss_mask"], 0).astype(np.int32), "vision": vision}
