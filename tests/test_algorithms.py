"""The GRPO math against a NumPy transcription of EasyR1's, on random and hand-made inputs.

Parity alone could pass by comparing a function with itself, so absolute expectations pin
the numbers the formulas give (ratio 1 and A = 1 is a loss of -1 per token, a tied group has
advantage 0, the dual clip caps a token's loss at -A * 3), and gradients are checked against
the PPO derivative by hand: -A * ratio where no clip binds, 0 where one does.
"""

from __future__ import annotations

import math
from collections import defaultdict

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cpt_jax.rl.algorithms import (
    aggregate,
    compute_kl,
    entropy_from_logits,
    grpo_advantages,
    kl_loss,
    masked_mean,
    policy_loss,
    rloo_advantages,
)

TOL = {"rtol": 1e-6, "atol": 1e-6}
SHAPES = [(1, 1), (5, 9), (16, 128)]
PAPER_REWARDS = np.array([0.0, 0.1, 0.9, 1.0])  # 0.9 * accuracy + 0.1 * format
AGG_MODES = ["token-mean", "seq-mean-token-sum", "seq-mean-token-mean"]
KL_KINDS = ["kl", "abs", "mse", "low_var_kl"]

# The checks call jitted functions (one compile per shape rather than one per op keeps the
# file fast, and runs everything the way training will); test_jit_matches_eager compares
# them with eager dispatch.
_grpo = jax.jit(grpo_advantages, static_argnums=1)
_rloo = jax.jit(rloo_advantages, static_argnums=1)
_policy_loss = jax.jit(
    policy_loss, static_argnames=("clip_low", "clip_high", "clip_dual", "loss_agg")
)
_compute_kl = jax.jit(compute_kl, static_argnums=2)
_kl_loss = jax.jit(kl_loss, static_argnames=("kind", "loss_agg"))
_aggregate = jax.jit(aggregate, static_argnums=2)
_entropy = jax.jit(entropy_from_logits)


# ---------------------------------------------------------------------------------------
# Transcribed from hiyouga/EasyR1 `verl/trainer/core_algos.py` (compute_grpo_outcome_advantage,
# compute_rloo_outcome_advantage, average_loss, compute_policy_loss with loss_type "default",
# compute_kl) and `verl/utils/torch_functional.py` (masked_mean), as read at commit
# 2a319e33f3937a7c8175c5618c970c1e674074ce, and in the v0.3.x form of mid 2025 (the paper's
# time) as forks carry it; torch ops are written as their NumPy equivalents, loops and dicts
# kept as EasyR1 has them. The one v0.3.x detail that later changed is kept: ppo_kl is taken
# after the +-20 clamp of the log-ratio (2a319e33 takes it before).
# "seq-mean-token-sum" is verl's `agg_loss` (volcengine/verl core_algos.py); EasyR1 only has
# "token" (= token-mean) and "seq" (= seq-mean-token-mean).
# ---------------------------------------------------------------------------------------
def _easyr1_grpo(scores: np.ndarray, index: np.ndarray, eps: float = 1e-6) -> np.ndarray:
    # float64: EasyR1's float32 mean of tied non-dyadic rewards rounds (see the tied-group
    # test); the formula itself is what the implementation follows.
    scores = scores.astype(np.float64).copy()
    id2score, id2mean, id2std = defaultdict(list), {}, {}
    for i in range(len(scores)):
        id2score[index[i]].append(scores[i])
    for idx in id2score:
        assert len(id2score[idx]) > 1, "GRPO needs rollout.n > 1."
        id2mean[idx] = np.mean(id2score[idx])
        id2std[idx] = np.std(id2score[idx], ddof=1)  # torch.std is unbiased
    for i in range(len(scores)):
        scores[i] = (scores[i] - id2mean[index[i]]) / (id2std[index[i]] + eps)
    return scores


def _easyr1_rloo(scores: np.ndarray, index: np.ndarray) -> np.ndarray:
    scores = scores.astype(np.float64).copy()
    id2score, id2sum = defaultdict(list), {}
    for i in range(len(scores)):
        id2score[index[i]].append(scores[i])
    for idx in id2score:
        id2sum[idx] = np.sum(id2score[idx])
    for i in range(len(scores)):
        sample_num = len(id2score[index[i]])
        assert sample_num > 1, "RLOO needs rollout.n > 1."
        baseline = (id2sum[index[i]] - scores[i]) / (sample_num - 1)
        scores[i] = scores[i] - baseline
    return scores


def _easyr1_masked_mean(values, mask, axis=None, eps=1e-8):
    return (values * mask).sum(axis=axis) / (mask.sum(axis=axis) + eps)


def _easyr1_average_loss(values, mask, mode):
    if mode == "token-mean":  # EasyR1 "token"
        return _easyr1_masked_mean(values, mask)
    if mode == "seq-mean-token-mean":  # EasyR1 "seq"
        return ((values * mask).sum(-1) / (mask.sum(-1) + 1e-8)).mean()
    if mode == "seq-mean-token-sum":  # verl agg_loss
        return (values * mask).sum(-1).mean()
    raise NotImplementedError(mode)


def _easyr1_policy_loss(old_log_probs, log_probs, advantages, response_mask, low, high, dual, mode):
    negative_approx_kl = log_probs - old_log_probs
    negative_approx_kl = np.clip(negative_approx_kl, -20.0, 20.0)
    ratio = np.exp(negative_approx_kl)
    clipped_ratio = np.exp(
        np.clip(negative_approx_kl, float(np.log(1.0 - low)), float(np.log(1.0 + high)))
    )
    metrics = {"ppo_kl": -negative_approx_kl}
    pg_loss = -advantages * ratio
    pg_loss2 = -advantages * clipped_ratio
    pg_loss3 = -advantages * dual
    clipped_pg_loss_higher = np.maximum(pg_loss, pg_loss2)
    metrics["pg_clipfrac_higher"] = (pg_loss < pg_loss2).astype(np.float32)
    clipped_pg_loss_lower = np.minimum(clipped_pg_loss_higher, pg_loss3)
    final_pg_loss = np.where(advantages < 0, clipped_pg_loss_lower, clipped_pg_loss_higher)
    metrics["pg_clipfrac_lower"] = (clipped_pg_loss_higher > pg_loss3).astype(np.float32) * (
        advantages < 0
    ).astype(np.float32)
    final_pg_loss = _easyr1_average_loss(final_pg_loss, response_mask, mode)
    metrics = {k: _easyr1_masked_mean(v, response_mask) for k, v in metrics.items()}
    return final_pg_loss, metrics


def _easyr1_compute_kl(log_probs, ref_log_probs, kl_penalty):
    log_probs, ref_log_probs = log_probs.astype(np.float32), ref_log_probs.astype(np.float32)
    if kl_penalty == "kl":
        return log_probs - ref_log_probs
    if kl_penalty == "abs":
        return np.abs(log_probs - ref_log_probs)
    if kl_penalty == "mse":
        return 0.5 * np.square(log_probs - ref_log_probs)
    if kl_penalty == "low_var_kl":
        kl = np.clip(ref_log_probs - log_probs, -20.0, 20.0)
        kld = np.exp(kl) - kl - 1
        return np.clip(kld, -10.0, 10.0)
    raise NotImplementedError(kl_penalty)


def _verl_entropy_from_logits(logits):
    # verl torch_functional.entropy_from_logits: logsumexp(z) - sum(softmax(z) * z), in float64.
    logits = logits.astype(np.float64)
    top = logits.max(-1, keepdims=True)
    lse = top[..., 0] + np.log(np.exp(logits - top).sum(-1))
    pd = np.exp(logits - lse[..., None])
    return lse - (pd * logits).sum(-1)


# ---------------------------------------------------------------------------------------
# Inputs
# ---------------------------------------------------------------------------------------
def _rewards(rng: np.random.Generator, n_prompts: int, group: int) -> np.ndarray:
    """Paper-valued rewards (ties galore), some tied groups, some continuous groups."""
    rewards = rng.choice(PAPER_REWARDS, size=(n_prompts, group))
    rewards[0] = 0.9  # tied: all correct, none formatted
    rewards[1] = 0.0  # tied: all wrong
    rewards[2] = rng.normal(size=group)
    return rewards.reshape(-1).astype(np.float32)


def _mask(rng: np.random.Generator, batch: int, seq: int) -> np.ndarray:
    """Right padding with random lengths; a fully padded row when there are several rows."""
    lengths = rng.integers(1, seq + 1, size=batch)
    if batch > 1:
        lengths[-1] = 0
    return (np.arange(seq)[None, :] < lengths[:, None]).astype(np.float32)


def _log_ratios(rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Log-ratios inside the clip range, well outside it, and beyond EasyR1's +-20 clamp."""
    near = rng.normal(0.0, 0.1, size=shape)
    far = rng.normal(0.0, 1.5, size=shape)
    extreme = rng.choice([-25.0, 25.0], size=shape)
    pick = rng.choice(3, size=shape, p=[0.45, 0.45, 0.10])
    return np.choose(pick, [near, far, extreme])


def _policy_batch(rng: np.random.Generator, batch: int, seq: int):
    logprobs = -rng.exponential(1.5, size=(batch, seq))
    old = logprobs - _log_ratios(rng, (batch, seq))
    advantages = rng.normal(0.0, 1.5, size=batch)
    advantages[rng.random(batch) < 0.2] = 0.0
    mask = _mask(rng, batch, seq)
    return (
        logprobs.astype(np.float32),
        old.astype(np.float32),
        advantages.astype(np.float32),
        mask,
    )


# ---------------------------------------------------------------------------------------
# Advantages
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [2, 4, 8])
@pytest.mark.parametrize("n_prompts", [3, 16])
def test_grpo_matches_easyr1(group: int, n_prompts: int) -> None:
    rng = np.random.default_rng(group * 100 + n_prompts)
    rewards = _rewards(rng, n_prompts, group)
    index = np.repeat(np.arange(n_prompts), group)
    ours = np.asarray(_grpo(jnp.asarray(rewards), group))
    np.testing.assert_allclose(ours, _easyr1_grpo(rewards, index), **TOL)


@pytest.mark.parametrize("group", [2, 4, 8])
def test_rloo_matches_easyr1(group: int) -> None:
    rng = np.random.default_rng(group)
    rewards = _rewards(rng, 5, group)
    index = np.repeat(np.arange(5), group)
    ours = np.asarray(_rloo(jnp.asarray(rewards), group))
    np.testing.assert_allclose(ours, _easyr1_rloo(rewards, index), **TOL)


def test_advantages_absolute() -> None:
    # Half right: mean 0.5, unbiased std sqrt(1/3).
    adv = np.asarray(_grpo(jnp.array([1.0, 1.0, 0.0, 0.0]), 4))
    expected = 0.5 / (math.sqrt(1 / 3) + 1e-6)
    np.testing.assert_allclose(adv, [expected, expected, -expected, -expected], rtol=1e-6)
    # Pairs: std of {1, 0} is sqrt(1/2), so the advantages are +-1/sqrt(2).
    adv = np.asarray(_grpo(jnp.array([1.0, 0.0, 0.0, 1.0]), 2))
    np.testing.assert_allclose(adv, np.array([1, -1, -1, 1]) / math.sqrt(2), rtol=1e-5)
    # RLOO: the one success against a baseline of 0; each failure against 1/3.
    adv = np.asarray(_rloo(jnp.array([1.0, 0.0, 0.0, 0.0]), 4))
    np.testing.assert_allclose(adv, [1.0, -1 / 3, -1 / 3, -1 / 3], rtol=1e-6)


@pytest.mark.parametrize("group", [2, 3, 4, 5, 7, 8])
def test_tied_group_has_exactly_zero_advantage(group: int) -> None:
    for value in [0.0, 0.1, 0.3, 0.9, 1.0, -2.7]:
        rewards = jnp.full((2 * group,), value, jnp.float32)
        assert np.all(np.asarray(_grpo(rewards, group)) == 0.0), value
        assert np.all(np.asarray(_rloo(rewards, group)) == 0.0), value


def test_tied_group_where_easyr1s_float32_mean_rounds() -> None:
    """EasyR1 evaluates the formula in float32, where the mean of tied non-dyadic rewards can
    be off by an ulp: std ~1e-8, and every member gets the same spurious advantage (torch
    2.13 gives -0.056 for eight 0.9s; NumPy's summation order shows it for seven). The
    implementation follows the formula (and the paper's "zero variance: no gradient")."""
    tied = np.full(7, 0.9, np.float32)
    mean = tied.mean(dtype=np.float32)
    naive = (tied - mean) / (tied.std(ddof=1) + np.float32(1e-6))
    assert mean != tied[0] and np.all(np.abs(naive) > 1e-2)
    assert np.all(np.asarray(_grpo(jnp.asarray(tied), 7)) == 0.0)


def test_group_of_one_and_ragged_rewards_are_refused() -> None:
    with pytest.raises(ValueError, match="group size > 1"):
        grpo_advantages(jnp.ones(4), 1)
    with pytest.raises(ValueError, match="group size > 1"):
        rloo_advantages(jnp.ones(4), 1)
    with pytest.raises(ValueError, match="prompt-major"):
        grpo_advantages(jnp.ones(6), 4)


# ---------------------------------------------------------------------------------------
# Policy loss
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", AGG_MODES)
def test_policy_loss_matches_easyr1(shape: tuple[int, int], mode: str) -> None:
    rng = np.random.default_rng(shape[0] * 1000 + shape[1])
    logprobs, old, adv, mask = _policy_batch(rng, *shape)
    token_adv = adv[:, None] * mask  # EasyR1 stores advantages per token, zero on padding
    ref_loss, ref_metrics = _easyr1_policy_loss(old, logprobs, token_adv, mask, 0.2, 0.3, 3.0, mode)
    loss, metrics = _policy_loss(
        jnp.asarray(logprobs),
        jnp.asarray(old),
        jnp.asarray(adv),
        jnp.asarray(mask),
        loss_agg=mode,
    )
    np.testing.assert_allclose(float(loss), ref_loss, **TOL)
    assert set(metrics) == set(ref_metrics)
    for name, value in ref_metrics.items():
        np.testing.assert_allclose(float(metrics[name]), value, **TOL, err_msg=name)


def test_policy_loss_per_token_advantages() -> None:
    """Advantages that vary along the sequence (EasyR1's [batch, seq] input) work too."""
    rng = np.random.default_rng(1)
    logprobs, old, _, mask = _policy_batch(rng, 8, 33)
    adv = (rng.normal(0.0, 1.5, size=mask.shape) * mask).astype(np.float32)
    ref_loss, ref_metrics = _easyr1_policy_loss(
        old, logprobs, adv, mask, 0.2, 0.3, 3.0, "token-mean"
    )
    loss, metrics = _policy_loss(logprobs, old, adv, mask)
    np.testing.assert_allclose(float(loss), ref_loss, **TOL)
    for name, value in ref_metrics.items():
        np.testing.assert_allclose(float(metrics[name]), value, **TOL, err_msg=name)


def test_policy_loss_covers_every_regime() -> None:
    """The largest parity batch exercises every branch (else the parity test proves little)."""
    rng = np.random.default_rng(16 * 1000 + 128)
    logprobs, old, adv, mask = _policy_batch(rng, 16, 128)
    lr = logprobs - old
    a = adv[:, None] * np.ones_like(lr)
    on = mask > 0
    assert np.any(on & (np.abs(lr) < 0.2))  # inside the clip range
    assert np.any(on & (a > 0) & (lr > math.log(1.3)))  # upper clip binds
    assert np.any(on & (a < 0) & (lr < math.log(0.8)))  # lower clip binds
    assert np.any(on & (a < 0) & (lr > math.log(3.0)))  # dual clip binds
    assert np.any(on & (np.abs(lr) > 20))  # +-20 clamp
    assert np.any(on & (a == 0))


def _loss_of(log_ratio: float, advantage: float, **kw) -> tuple[float, dict[str, float]]:
    logprobs = jnp.full((1, 3), -1.0)
    loss, metrics = _policy_loss(
        logprobs, logprobs - log_ratio, jnp.array([advantage]), jnp.ones((1, 3)), **kw
    )
    return float(loss), {k: float(v) for k, v in metrics.items()}


def test_policy_loss_absolute() -> None:
    loss, m = _loss_of(0.0, 1.0)  # on-policy, A = 1: -1 per token
    assert loss == pytest.approx(-1.0, abs=1e-6)
    assert m == pytest.approx({"pg_clipfrac_higher": 0, "pg_clipfrac_lower": 0, "ppo_kl": 0})
    loss, m = _loss_of(math.log(2.0), 1.0)  # ratio 2, A > 0: clipped to 1.3
    assert loss == pytest.approx(-1.3, rel=1e-6) and m["pg_clipfrac_higher"] == pytest.approx(1)
    assert m["ppo_kl"] == pytest.approx(-math.log(2.0), rel=1e-6)
    loss, m = _loss_of(math.log(0.5), -1.0)  # ratio 0.5, A < 0: clipped to 0.8
    assert loss == pytest.approx(0.8, rel=1e-6) and m["pg_clipfrac_higher"] == pytest.approx(1)
    loss, m = _loss_of(math.log(2.0), -1.0)  # ratio 2, A < 0: no clip binds
    assert loss == pytest.approx(2.0, rel=1e-6) and m["pg_clipfrac_lower"] == 0
    loss, m = _loss_of(math.log(5.0), -2.0)  # ratio 5 > dual 3, A < 0: capped at -A * 3
    assert loss == pytest.approx(6.0, rel=1e-6) and m["pg_clipfrac_lower"] == pytest.approx(1)
    loss, m = _loss_of(30.0, -1.0)  # beyond the +-20 clamp: dual clip, ppo_kl from -20
    assert loss == pytest.approx(3.0, rel=1e-6) and m["ppo_kl"] == pytest.approx(-20.0)
    loss, _ = _loss_of(-30.0, 1.0)  # ratio e^-20, A > 0: the loss vanishes
    assert loss == pytest.approx(-math.exp(-20.0), rel=1e-5)
    loss, _ = _loss_of(math.log(5.0), -1.0, clip_dual=10.0)  # dual set above the ratio
    assert loss == pytest.approx(5.0, rel=1e-6)


def test_padding_with_nan_does_not_leak() -> None:
    rng = np.random.default_rng(7)
    logprobs, old, adv, mask = _policy_batch(rng, 8, 33)
    clean, _ = _policy_loss(logprobs, old, adv, mask)
    dirty_lp = np.where(mask > 0, logprobs, np.nan).astype(np.float32)
    dirty_old = np.where(mask > 0, old, np.inf).astype(np.float32)
    for mode in AGG_MODES:
        loss, metrics = _policy_loss(dirty_lp, dirty_old, adv, mask, loss_agg=mode)
        assert np.isfinite(float(loss)) and all(np.isfinite(float(v)) for v in metrics.values())
    np.testing.assert_allclose(
        float(_policy_loss(dirty_lp, dirty_old, adv, mask)[0]), float(clean), **TOL
    )


def test_policy_gradient_is_ppos() -> None:
    """d loss / d logp = -A * ratio / n_tokens where no clip binds, 0 where one does."""
    rng = np.random.default_rng(3)
    shape = (6, 40)
    regimes = [  # (advantage sign, log-ratio low, high, a clip binds)
        (+1, -0.2, 0.2, False),  # inside the clip range
        (-1, -0.2, 0.2, False),
        (+1, 0.3, 3.0, True),  # above 1 + high, A > 0
        (-1, -3.0, -0.3, True),  # below 1 - low, A < 0
        (+1, -3.0, -0.3, False),  # below 1 - low, A > 0: PPO does not clip
        (-1, 0.3, math.log(3.0) - 0.1, False),  # above 1 + high, A < 0, under the dual cap
        (-1, math.log(3.0) + 0.1, 5.0, True),  # dual clip
        (+1, 21.0, 30.0, True),  # +-20 clamp
        (-1, -30.0, -21.0, True),
    ]
    pick = rng.integers(len(regimes), size=shape)
    sign = np.array([r[0] for r in regimes])[pick]
    lo, hi = np.array([r[1] for r in regimes])[pick], np.array([r[2] for r in regimes])[pick]
    clipped = np.array([r[3] for r in regimes])[pick]
    log_ratio = rng.uniform(lo, hi)
    adv = (sign * rng.uniform(0.5, 2.0, size=shape)).astype(np.float32)
    logprobs = (-rng.exponential(1.0, size=shape)).astype(np.float32)
    old = (logprobs - log_ratio).astype(np.float32)
    mask = _mask(rng, *shape)

    def loss_fn(lp):
        return policy_loss(lp, old, adv, mask)[0]

    grad = np.asarray(jax.jit(jax.grad(loss_fn))(jnp.asarray(logprobs)))
    assert np.all(np.isfinite(grad))
    ratio = np.exp(logprobs.astype(np.float64) - old)
    expected = np.where((mask > 0) & ~clipped, -adv * ratio / (mask.sum() + 1e-8), 0.0)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-9)
    assert np.any(expected != 0) and np.any((mask > 0) & clipped)
    # Old log-probs and advantages are constants of the loss.
    g_old, g_adv = jax.jit(jax.grad(lambda o, a: policy_loss(logprobs, o, a, mask)[0], (0, 1)))(
        old, adv
    )
    assert not np.any(np.asarray(g_old)) and not np.any(np.asarray(g_adv))


# ---------------------------------------------------------------------------------------
# KL, aggregation, entropy
# ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", KL_KINDS)
@pytest.mark.parametrize("shape", SHAPES)
def test_kl_matches_easyr1(kind: str, shape: tuple[int, int]) -> None:
    rng = np.random.default_rng(shape[0] + shape[1])
    logprobs = (-rng.exponential(1.5, size=shape)).astype(np.float32)
    ref = (logprobs + _log_ratios(rng, shape)).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(_compute_kl(logprobs, ref, kind)), _easyr1_compute_kl(logprobs, ref, kind), **TOL
    )


def test_kl_absolute_and_clamp_boundaries() -> None:
    # d = ref - logp, in the order k3 = exp(d) - d - 1 sees it.
    d = np.array([0.0, 1.0, -1.0, 2.5, 3.0, -10.5, -11.0, 25.0, -25.0, 100.0, -100.0], np.float32)
    logprobs = np.full_like(d, -2.0)
    k3 = np.asarray(_compute_kl(logprobs, logprobs + d, "low_var_kl"))
    expected = [
        0.0,
        math.e - 2.0,
        1 / math.e,
        math.exp(2.5) - 3.5,
        10.0,
        9.5 + math.exp(-10.5),
        10.0,
        10.0,
        10.0,
        10.0,
        10.0,
    ]
    np.testing.assert_allclose(k3, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(np.asarray(_compute_kl(logprobs, logprobs + d, "kl")), -d)
    np.testing.assert_allclose(np.asarray(_compute_kl(logprobs, logprobs + d, "abs")), np.abs(d))
    np.testing.assert_allclose(
        np.asarray(_compute_kl(logprobs, logprobs + d, "mse")),
        0.5 * d.astype(np.float64) ** 2,
        rtol=1e-6,
    )
    with pytest.raises(ValueError, match="unknown KL"):
        compute_kl(logprobs, logprobs, "full")


def test_kl_loss_gradient_finite_and_zero_where_clamped() -> None:
    d = jnp.array([[0.5, -0.5, 2.0, 3.0, 30.0, -30.0, 200.0, -200.0]])
    logprobs = jnp.full(d.shape, -3.0)
    mask = jnp.ones(d.shape)
    grad = np.asarray(jax.jit(jax.grad(lambda lp: kl_loss(lp, logprobs + d, mask)))(logprobs))
    assert np.all(np.isfinite(grad))
    dd = np.asarray(d, np.float64)
    unclamped = np.exp(dd) - dd - 1 < 10
    expected = np.where(unclamped, (1.0 - np.exp(np.minimum(dd, 20))) / d.size, 0.0)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-9)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("mode", AGG_MODES)
def test_aggregate_and_kl_loss_match_easyr1(shape: tuple[int, int], mode: str) -> None:
    rng = np.random.default_rng(shape[0] * shape[1])
    values = rng.normal(size=shape).astype(np.float32)
    mask = _mask(rng, *shape)
    np.testing.assert_allclose(
        float(_aggregate(values, mask, mode)), _easyr1_average_loss(values, mask, mode), **TOL
    )
    logprobs = (-rng.exponential(1.5, size=shape)).astype(np.float32)
    ref = (logprobs + rng.normal(0.0, 0.5, size=shape)).astype(np.float32)
    expected = _easyr1_average_loss(_easyr1_compute_kl(logprobs, ref, "low_var_kl"), mask, mode)
    np.testing.assert_allclose(float(_kl_loss(logprobs, ref, mask, loss_agg=mode)), expected, **TOL)


def test_aggregate_absolute_and_easyr1_names() -> None:
    values = jnp.ones((3, 4))
    mask = jnp.array([[1, 1, 0, 0], [0, 0, 0, 0], [1, 1, 1, 1]])  # lengths 2, 0, 4
    assert float(_aggregate(values, mask, "token-mean")) == pytest.approx(1.0, abs=1e-6)
    assert float(_aggregate(values, mask, "seq-mean-token-mean")) == pytest.approx(2 / 3, abs=1e-6)
    assert float(_aggregate(values, mask, "seq-mean-token-sum")) == pytest.approx(2.0, abs=1e-6)
    assert float(_aggregate(values, mask, "token")) == float(_aggregate(values, mask, "token-mean"))
    assert float(_aggregate(values, mask, "seq")) == float(
        _aggregate(values, mask, "seq-mean-token-mean")
    )
    assert float(masked_mean(values, jnp.zeros((3, 4)))) == 0.0  # empty mask: 0, not nan
    with pytest.raises(ValueError, match="unknown loss aggregation"):
        aggregate(values, mask, "seq-mean-token-sum-norm")


def test_entropy_from_logits() -> None:
    rng = np.random.default_rng(11)
    logits = (rng.normal(0.0, 3.0, size=(4, 5, 64))).astype(np.float32)
    np.testing.assert_allclose(
        np.asarray(_entropy(logits)), _verl_entropy_from_logits(logits), rtol=1e-5, atol=1e-5
    )
    # Uniform over V: log V; shifted by a huge constant: the same (stable in float32).
    uniform = _entropy(jnp.zeros((2, 1000)) + 1e4)
    np.testing.assert_allclose(np.asarray(uniform), math.log(1000), rtol=1e-6)
    # A certain token, the rest ruled out with -inf: 0, not nan.
    certain = jnp.array([0.0, -jnp.inf, -jnp.inf])
    assert float(_entropy(certain)) == 0.0
    assert _entropy(jnp.zeros((2, 3), jnp.bfloat16)).dtype == jnp.float32


# ---------------------------------------------------------------------------------------
# jit against eager dispatch
# ---------------------------------------------------------------------------------------
def test_jit_matches_eager() -> None:
    """The jitted functions the other tests call agree with op-by-op dispatch."""
    rng = np.random.default_rng(5)
    rewards = jnp.asarray(_rewards(rng, 4, 8))
    np.testing.assert_allclose(
        np.asarray(_grpo(rewards, 8)), np.asarray(grpo_advantages(rewards, 8)), **TOL
    )
    logprobs, old, adv, mask = (jnp.asarray(x) for x in _policy_batch(rng, 8, 33))
    loss, metrics = _policy_loss(logprobs, old, adv, mask, clip_high=0.28)
    eager, eager_metrics = policy_loss(logprobs, old, adv, mask, clip_high=0.28)
    np.testing.assert_allclose(float(loss), float(eager), **TOL)
    for name in metrics:
        np.testing.assert_allclose(float(metrics[name]), float(eager_metrics[name]), **TOL)
    np.testing.assert_allclose(
        float(_kl_loss(logprobs, old, mask)), float(kl_loss(logprobs, old, mask)), **TOL
    )
