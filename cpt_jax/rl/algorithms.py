"""GRPO math with EasyR1's semantics: advantages, the clipped policy loss, KL, aggregation.

The paper trained with EasyR1 (`verl/trainer/core_algos.py`, v0.3.x of mid 2025; the
functions used here are unchanged in later releases except where noted). Pure functions of
arrays, float32, jit-able; string and number options are static Python values.

EasyR1's choices kept here:
- GRPO: (r - mean) / (std + 1e-6) per prompt group, std unbiased (torch.std, ddof=1); a
  group of one is refused ("GRPO needs rollout.n > 1"). Zero-variance groups give 0.
- RLOO: r_i - mean of the other members, i.e. n / (n - 1) * (r_i - mean), no std scaling.
- policy loss: the log-ratio is clamped to [-20, 20] before exp; the clipped ratio is
  exp(clamp(log-ratio, log(1 - low), log(1 + high))); dual clip -A * dual caps the loss of
  negative-advantage tokens; ppo_kl is the masked mean of -log-ratio after the +-20 clamp.
- low_var_kl (k3): ref - logp is clamped to [-20, 20] before exp, the result to [-10, 10].
- means: masked sums over (mask sum + 1e-8).

One deliberate difference: group means are taken about the group's first reward, so
identical rewards give an exactly zero advantage. EasyR1's float32 torch.mean of identical
non-dyadic rewards (eight 0.9s, say) can round, and the rounding divided by 1e-6 gives every
member of such a group the same spurious advantage (about -0.056 for eight 0.9s), where the
formula, and the paper's "zero variance: no gradient", say 0.
"""

from __future__ import annotations

import math
from typing import Literal

import jax
import jax.numpy as jnp

KLKind = Literal["kl", "abs", "mse", "low_var_kl"]
LossAgg = Literal["token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "token", "seq"]

_MEAN_EPS = 1e-8  # EasyR1's masked_mean / average_loss denominator epsilon
_LOG_RATIO_CLAMP = 20.0  # EasyR1 clamps log-ratios to +-20 before exp (nan-free gradients)
_LOW_VAR_KL_CLAMP = 10.0
# EasyR1's `loss_avg_mode` names ("token", "seq") for the verl names used here.
_AGG_ALIASES = {"token": "token-mean", "seq": "seq-mean-token-mean"}


def _f32(x: jax.Array) -> jax.Array:
    return jnp.asarray(x, jnp.float32)


def _grouped_centered(rewards: jax.Array, group_size: int, name: str) -> jax.Array:
    """[n_prompts, group] rewards minus their group mean; exact zeros for tied groups."""
    if group_size < 2:
        raise ValueError(f"{name} needs a group size > 1 (EasyR1: rollout.n > 1), got {group_size}")
    rewards = _f32(rewards)
    if rewards.ndim != 1 or rewards.shape[0] % group_size:
        raise ValueError(
            f"rewards must be flat [n_prompts * {group_size}], prompt-major; got {rewards.shape}"
        )
    groups = rewards.reshape(-1, group_size)
    shifted = groups - groups[:, :1]  # exact zeros when the group is tied
    return shifted - shifted.mean(axis=1, keepdims=True)


def grpo_advantages(rewards: jax.Array, group_size: int, eps: float = 1e-6) -> jax.Array:
    """Per-response GRPO advantage (r - group mean) / (unbiased group std + eps).

    `rewards` is flat and prompt-major: rows [k * group_size, (k + 1) * group_size) are the
    responses to prompt k. Returns the same shape.
    """
    centered = _grouped_centered(rewards, group_size, "GRPO")
    std = jnp.sqrt(jnp.sum(centered**2, axis=1, keepdims=True) / (group_size - 1))
    return (centered / (std + eps)).reshape(-1)


def rloo_advantages(rewards: jax.Array, group_size: int) -> jax.Array:
    """Per-response RLOO advantage r_i - mean(r_j, j != i), as EasyR1 (no std scaling)."""
    centered = _grouped_centered(rewards, group_size, "RLOO")
    return (centered * (group_size / (group_size - 1))).reshape(-1)


def masked_mean(values: jax.Array, mask: jax.Array) -> jax.Array:
    """Mean of `values` over mask == 1 (EasyR1's masked_mean, eps 1e-8 in the denominator).

    Masked-out entries are selected away rather than multiplied by 0, so padding that holds
    inf or nan cannot leak into the result.
    """
    keep = jnp.asarray(mask) != 0
    total = jnp.sum(jnp.where(keep, _f32(values), 0.0))
    return total / (jnp.sum(keep, dtype=jnp.float32) + _MEAN_EPS)


def aggregate(values: jax.Array, mask: jax.Array, mode: LossAgg = "token-mean") -> jax.Array:
    """Reduce per-token values [batch, seq] to a scalar loss.

    - "token-mean" (EasyR1 "token"): mean over all unmasked tokens of the batch.
    - "seq-mean-token-mean" (EasyR1 "seq"): per-sequence token mean, then the mean over ALL
      rows, so fully masked (padding) rows count as 0 and dilute the mean, as in EasyR1.
    - "seq-mean-token-sum": per-sequence token sum, then the mean over rows (verl; EasyR1
      has no such mode).
    """
    mode = _AGG_ALIASES.get(mode, mode)
    if mode == "token-mean":
        return masked_mean(values, mask)
    keep = jnp.asarray(mask) != 0
    seq_sum = jnp.sum(jnp.where(keep, _f32(values), 0.0), axis=-1)
    if mode == "seq-mean-token-sum":
        return jnp.mean(seq_sum)
    if mode == "seq-mean-token-mean":
        return jnp.mean(seq_sum / (jnp.sum(keep, axis=-1, dtype=jnp.float32) + _MEAN_EPS))
    raise ValueError(f"unknown loss aggregation {mode!r}")


def compute_kl(logprobs: jax.Array, ref_logprobs: jax.Array, kind: KLKind) -> jax.Array:
    """Per-token KL estimate of the policy from the reference, elementwise.

    "kl" k1 = logp - ref; "abs" |logp - ref|; "mse" k2 = 0.5 (logp - ref)^2; "low_var_kl"
    k3 = exp(d) - d - 1 with d = clamp(ref - logp, -20, 20), then clamped to [-10, 10]. The
    inner clamp only keeps gradients finite (beyond |d| = 20 the outer clamp already binds);
    where either clamp binds the gradient is 0.
    """
    logprobs, ref_logprobs = _f32(logprobs), _f32(ref_logprobs)
    if kind == "kl":
        return logprobs - ref_logprobs
    if kind == "abs":
        return jnp.abs(logprobs - ref_logprobs)
    if kind == "mse":
        return 0.5 * jnp.square(logprobs - ref_logprobs)
    if kind == "low_var_kl":
        d = jnp.clip(ref_logprobs - logprobs, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
        return jnp.clip(jnp.exp(d) - d - 1.0, -_LOW_VAR_KL_CLAMP, _LOW_VAR_KL_CLAMP)
    raise ValueError(f"unknown KL kind {kind!r}")


def kl_loss(
    logprobs: jax.Array,
    ref_logprobs: jax.Array,
    mask: jax.Array,
    *,
    kind: KLKind = "low_var_kl",
    loss_agg: LossAgg = "token-mean",
) -> jax.Array:
    """The KL loss term EasyR1 adds as `kl_coef * kl_loss`: aggregate(compute_kl(...))."""
    return aggregate(compute_kl(logprobs, ref_logprobs, kind), mask, loss_agg)


def policy_loss(
    logprobs: jax.Array,
    old_logprobs: jax.Array,
    advantages: jax.Array,
    mask: jax.Array,
    *,
    clip_low: float = 0.2,
    clip_high: float = 0.3,
    clip_dual: float = 3.0,
    loss_agg: LossAgg = "token-mean",
) -> tuple[jax.Array, dict[str, jax.Array]]:
    """EasyR1's dual-clip PPO loss over [batch, seq] tokens; gradients flow into `logprobs` only.

    `advantages` is per sequence [batch] (broadcast over tokens) or per token [batch, seq].
    Per token, with r = exp(clamp(logp - old, -20, 20)) and r_c the ratio clipped to
    [1 - low, 1 + high] (clamped in log space): pg = max(-A r, -A r_c), and where A < 0,
    min(pg, -A dual). Returns (aggregated loss, metrics) with the masked token means
    pg_clipfrac_higher (-A r < -A r_c: the PPO clip binds), pg_clipfrac_lower (A < 0 and the
    dual clip binds) and ppo_kl (mean of old - logp after the +-20 clamp).
    """
    logprobs = _f32(logprobs)
    old_logprobs = jax.lax.stop_gradient(_f32(old_logprobs))
    advantages = jax.lax.stop_gradient(_f32(advantages))
    if advantages.ndim == 1:
        advantages = advantages[:, None]
    log_ratio = jnp.clip(logprobs - old_logprobs, -_LOG_RATIO_CLAMP, _LOG_RATIO_CLAMP)
    ratio = jnp.exp(log_ratio)
    low, high = math.log(1.0 - clip_low), math.log(1.0 + clip_high)
    clipped_ratio = jnp.exp(jnp.clip(log_ratio, low, high))

    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * clipped_ratio
    pg_dual = -advantages * clip_dual
    pg_higher = jnp.maximum(pg_unclipped, pg_clipped)
    negative = advantages < 0
    pg = jnp.where(negative, jnp.minimum(pg_higher, pg_dual), pg_higher)

    metrics = {
        "pg_clipfrac_higher": masked_mean(pg_unclipped < pg_clipped, mask),
        "pg_clipfrac_lower": masked_mean((pg_higher > pg_dual) & negative, mask),
        "ppo_kl": masked_mean(jax.lax.stop_gradient(-log_ratio), mask),
    }
    return aggregate(pg, mask, loss_agg), metrics


def entropy_from_logits(logits: jax.Array) -> jax.Array:
    """Entropy of softmax(logits) over the last axis, in float32 (a training metric).

    H = logsumexp(z) - sum(p z) as verl/EasyR1 write it, but over z = logits - max: unshifted,
    float32 loses the whole entropy to rounding once logits reach ~1e4. Tokens the model rules
    out (logit -inf) contribute 0.
    """
    logits = _f32(logits)
    shifted = logits - jnp.max(logits, axis=-1, keepdims=True)
    lse = jnp.log(jnp.sum(jnp.exp(shifted), axis=-1, keepdims=True))
    probs = jnp.exp(shifted - lse)
    expected = jnp.sum(probs * jnp.where(probs > 0, shifted, 0.0), axis=-1)
    return lse[..., 0] - expected
