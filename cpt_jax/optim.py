"""The optimiser of both trainers: global-norm clipping, then AdamW on a warm-up schedule.

The paper's settings: SFT (LLaMA-Factory) AdamW at lr 1e-5 on a cosine schedule with warm-up
ratio 0.1; GRPO (EasyR1) AdamW at lr 1e-6, constant, no warm-up, weight decay 0.01, grad-norm
clip 1.0 and bf16 AdamW state (`adamw_bf16`, here `moments_dtype=jnp.bfloat16`).

The schedule follows Hugging Face's `get_cosine_schedule_with_warmup` /
`get_constant_schedule_with_warmup` step for step (the first update uses the value at step 0,
so 0 under a warm-up), with `ceil(warmup_ratio * total_steps)` warm-up steps as the HF
Trainer counts them. The learning rate, weight decay and clip norm are injected
hyperparameters: the optimiser state carries the learning rate of its last update, which
`current_learning_rate` reads for logging.

`vision_lr_scale` gives the vision tower (the parameters under `visual`) its own learning rate,
that many times the schedule's: a vision tower trained from random init at the language model's
rate collapses (every image token alike, huge feature norms), as the CPU experiments found.
"""

from __future__ import annotations

import math
from typing import Any, Literal

import jax
import jax.numpy as jnp
import optax


def make_schedule(*, learning_rate: float, total_steps: int, warmup_ratio: float = 0.0,
                  schedule: Literal["cosine", "constant"] = "cosine") -> optax.Schedule:
    """Learning rate at each update count: linear warm-up from 0, then cosine to 0 at
    `total_steps` (or constant)."""
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps}")
    if not 0.0 <= warmup_ratio <= 1.0:
        raise ValueError(f"warmup_ratio must be in [0, 1], got {warmup_ratio}")
    if schedule not in ("cosine", "constant"):
        raise ValueError(f"schedule must be 'cosine' or 'constant', got {schedule!r}")
    warmup = math.ceil(warmup_ratio * total_steps)
    decay = max(1, total_steps - warmup)

    def value(count: jax.Array) -> jax.Array:
        count = jnp.asarray(count, jnp.float32)
        warm = count / max(1, warmup)
        if schedule == "constant":
            after = jnp.ones_like(count)
        else:
            progress = jnp.clip((count - warmup) / decay, 0.0, 1.0)
            after = 0.5 * (1.0 + jnp.cos(jnp.pi * progress))
        return learning_rate * jnp.where(count < warmup, warm, after)

    return value


def make_optimizer(*, learning_rate: float, total_steps: int, warmup_ratio: float = 0.0,
                   schedule: Literal["cosine", "constant"] = "cosine",
                   weight_decay: float = 0.01, grad_clip: float = 1.0, b1: float = 0.9,
                   b2: float = 0.999, eps: float = 1e-8,
                   moments_dtype: jnp.dtype | None = None,
                   vision_lr_scale: float = 1.0) -> optax.GradientTransformation:
    """Clip by global norm, then AdamW (decoupled weight decay, as torch's AdamW).

    With `vision_lr_scale` s != 1, the updates of the parameters under `visual` are scaled by s
    after the learning rate (so their weight decay too, as a torch parameter group with lr * s);
    clipping still takes the global norm over all gradients. With s == 1 the optimiser and its
    state are exactly those without the option.

    `moments_dtype` stores BOTH Adam moments in that dtype (optax's `mu_dtype` covers only the
    first); the update itself is computed in float32 and the moments are rounded on storage.
    Caveat of bf16 storage: with b2 = 0.999 an increment of the second moment below its
    half-ulp (about 0.2 %) is lost, as in the paper's bf16 state.
    """
    if vision_lr_scale < 0:
        raise ValueError(f"vision_lr_scale must be >= 0, got {vision_lr_scale}")
    lr = make_schedule(learning_rate=learning_rate, total_steps=total_steps,
                       warmup_ratio=warmup_ratio, schedule=schedule)
    optimizer = optax.inject_hyperparams(
        _clipped_adamw, static_args=("b1", "b2", "eps", "moments_dtype"))(
        learning_rate=lr, weight_decay=weight_decay, grad_clip=grad_clip, b1=b1, b2=b2,
        eps=eps, moments_dtype=moments_dtype)
    if vision_lr_scale == 1.0:
        return optimizer
    return optax.chain(optimizer, _scale_subtree("visual", vision_lr_scale))


def current_learning_rate(opt_state: optax.OptState) -> jax.Array:
    """The learning rate of the last update made with a `make_optimizer` state (the schedule's;
    the vision tower's is `vision_lr_scale` times it)."""
    if not hasattr(opt_state, "hyperparams"):
        opt_state = opt_state[0]  # chained with _scale_subtree: (AdamW's state, empty state)
    return opt_state.hyperparams["learning_rate"]


def _scale_subtree(key: str, scale: float) -> optax.GradientTransformation:
    """Multiply the updates under the top-level `key` by `scale` (stateless)."""
    def factor(path: tuple[Any, ...]) -> float:
        name = getattr(path[0], "key", getattr(path[0], "name", None)) if path else None
        return scale if name == key else 1.0

    return optax.stateless(lambda updates, params: jax.tree_util.tree_map_with_path(
        lambda path, u: u * jnp.asarray(factor(path), u.dtype), updates))


def _clipped_adamw(learning_rate: float, weight_decay: float, grad_clip: float, b1: float,
                   b2: float, eps: float, moments_dtype: jnp.dtype | None
                   ) -> optax.GradientTransformation:
    """optax.adamw's chain with clipping first and the moments' storage dtype."""
    return optax.chain(
        optax.clip_by_global_norm(grad_clip),
        _scale_by_adam(b1, b2, eps, moments_dtype),
        optax.add_decayed_weights(weight_decay),
        optax.scale_by_learning_rate(learning_rate),
    )


def _scale_by_adam(b1: float, b2: float, eps: float,
                   moments_dtype: jnp.dtype | None) -> optax.GradientTransformation:
    """optax.scale_by_adam with mu and nu both stored in `moments_dtype`."""
    adam = optax.scale_by_adam(b1=b1, b2=b2, eps=eps)
    if moments_dtype is None:
        return adam

    def cast(state: optax.ScaleByAdamState) -> optax.ScaleByAdamState:
        return state._replace(mu=optax.tree.cast(state.mu, moments_dtype),
                              nu=optax.tree.cast(state.nu, moments_dtype))

    def init(params: optax.Params) -> optax.ScaleByAdamState:
        return cast(adam.init(params))

    def update(updates: optax.Updates, state: optax.ScaleByAdamState,
               params: optax.Params | None = None
               ) -> tuple[optax.Updates, optax.ScaleByAdamState]:
        updates, state = adam.update(updates, state, params)
        return updates, cast(state)

    return optax.GradientTransformation(init, update)
