"""The GRPO step on the tiny preset and the synthetic benchmark: the update batch's log-probs
against the sampler's, the first update's loss against the formula, online filtering with
backfill, and one compilation for many steps."""

from __future__ import annotations

import dataclasses
import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from cpt_jax.data import build
from cpt_jax.data.pipeline import EncodeOptions, rl_dataset
from cpt_jax.data.sources import load_source
from cpt_jax.data.synthetic import SYNTHETIC_MAX_PIXELS, SYNTHETIC_MIN_PIXELS
from cpt_jax.data.tasks import reward_fn
from cpt_jax.data.tokenizer import build_tokenizer, preset_special_tokens
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, preset
from cpt_jax.optim import make_optimizer
from cpt_jax.rl import grpo
from cpt_jax.rl.groups import shared_prefix_batch
from cpt_jax.rl.grpo import GRPOConfig, GRPOTrainer, group_advantages, make_logprob_fn
from cpt_jax.sft import TrainState

TASK = "syn_count"
CONFIG = preset("tiny")
# One token bucket, and patch floors that hold every batch: one compiled program each.
OPTIONS = EncodeOptions(length_buckets=(384,), min_pixels=SYNTHETIC_MIN_PIXELS,
                        max_pixels=SYNTHETIC_MAX_PIXELS, min_patches=128)
GRPO = GRPOConfig(group_size=4, max_new_tokens=6, micro_batch_rows=4, min_patches=256,
                  kl_coef=0.01)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tfds")
    assert build.main(["--synthetic", "--train", "24", "--test", "4", "--data-dir",
                       str(path)]) == 0
    return path


@pytest.fixture(scope="module")
def tokenizer(data_dir):
    corpus = [e["problem"] for e in load_source(TASK, "train", data_dir=data_dir)]
    return build_tokenizer(vocab_size=CONFIG.text.vocab_size,
                           special_token_ids=preset_special_tokens(CONFIG), corpus=corpus)


def _prompt_batches(data_dir, tokenizer, seed=0):
    return iter(rl_dataset(load_source(TASK, "train", data_dir=data_dir), task=TASK,
                           tokenizer=tokenizer, batch_size=2, seed=seed, options=OPTIONS))


def _trainer(tokenizer, config=GRPO, score_fn=None, seed=0):
    model = Qwen2_5_VL(CONFIG, rngs=nnx.Rngs(seed))
    optimizer = make_optimizer(learning_rate=1e-3, total_steps=10)
    reference = nnx.split(model, nnx.Param, ...)[1:]
    reference = jax.tree.map(lambda x: x.copy(), reference)  # the state is donated
    trainer = GRPOTrainer(model, optimizer, config, tokenizer=tokenizer,
                          score_fn=score_fn or reward_fn(TASK), reference=reference)
    return model, trainer, TrainState.create(model, optimizer)


def test_update_batch_logprobs_equal_the_sampler(data_dir, tokenizer):
    """The training batch (each prompt re-padded once, its answers beside it) gives the
    sampled tokens the log-probs the sampler drew them with."""
    model, trainer, state = _trainer(tokenizer)
    groups = trainer.rollout_groups((state.params, state.rest),
                                    next(_prompt_batches(data_dir, tokenizer)), jax.random.key(1))
    assert len(groups) == 2 and all(len(g.grids) == 1 for g in groups)
    batch = shared_prefix_batch(groups, model, prompt_length=384, rows_per_micro_batch=4,
                                min_patches=256, pad_id=CONFIG.pad_token_id)
    assert batch["prompt_ids"].shape == (2, 1, 384)
    assert batch["answer_ids"].shape == (2, 4, GRPO.max_new_tokens)
    logprob_fn = make_logprob_fn(model, GRPO.temperature)
    logprobs = np.asarray(logprob_fn((state.params, state.rest), batch))
    mask = batch["response_mask"].astype(bool)
    diff = np.abs(logprobs - batch["sampler_logprobs"])[mask].max()
    print(f"max |update batch - sampler log-prob| = {diff:.2e} over {mask.sum()} tokens")
    assert diff <= 1e-4
    assert mask.sum() == sum(int(g.mask.sum()) for g in groups)


def _repeated_prompt_logprobs(model, groups, temperature):
    """The reference: every answer as its own row (prompt, left-padded, then the answer, with
    its own copy of the images) through the plain uncached forward; log-probs [answers,
    max_new] of the answer tokens, prompt-major."""
    new = groups[0].tokens.shape[1]
    rows = [(g, j) for g in groups for j in range(len(g.tokens))]
    length = 384 + new
    ids = np.full((len(rows), length), CONFIG.pad_token_id, np.int32)
    attention = np.zeros((len(rows), length), np.int32)
    for i, (g, j) in enumerate(rows):
        ids[i, 384 - len(g.prompt_ids):384] = g.prompt_ids
        attention[i, 384 - len(g.prompt_ids):384] = 1
        ids[i, 384:] = g.tokens[j]
        attention[i, 384:] = g.mask[j]
    ids, positions, mask, vision, _ = model.prepare_inputs(
        ids, attention_mask=attention, pixel_values=np.concatenate([g.patches for g, _ in rows]),
        image_grid_thw=np.concatenate([g.grids for g, _ in rows]))
    logits, _ = model.forward(ids, positions, mask, vision)
    logprobs = jax.nn.log_softmax(logits[:, 384 - 1:-1] / temperature, axis=-1)
    return jnp.take_along_axis(logprobs, ids[:, 384:, None], axis=-1)[..., 0]


@pytest.mark.parametrize("rows", [4, 8, 2])
def test_shared_prefix_logprobs_and_gradients_equal_the_repeated_prompt_forward(
        data_dir, tokenizer, rows):
    """Each prompt once per group (micro-batches of one group, two groups, half a group):
    the answer tokens' log-probs and the gradient of a loss on them equal those of the plain
    forward over every answer's own copy of its prompt and images."""
    model, trainer, state = _trainer(tokenizer)
    groups = trainer.rollout_groups((state.params, state.rest),
                                    next(_prompt_batches(data_dir, tokenizer)), jax.random.key(1))
    shared = shared_prefix_batch(groups, model, prompt_length=384, rows_per_micro_batch=rows,
                                 min_patches=256, pad_id=CONFIG.pad_token_id)
    assert shared["prompt_ids"].shape == (8 // rows, max(rows // 4, 1), 384)
    assert shared["answer_ids"].shape == (8 // rows, rows, GRPO.max_new_tokens)
    mask = shared["response_mask"].reshape(8, -1)
    weights = np.random.default_rng(0).standard_normal(mask.shape).astype(np.float32) * mask
    graphdef = nnx.graphdef(model)

    def reference(params):
        logprobs = _repeated_prompt_logprobs(nnx.merge(graphdef, params, state.rest), groups,
                                             GRPO.temperature)
        return jnp.sum(logprobs * weights), logprobs

    def ours(params):
        model = nnx.merge(graphdef, params, state.rest)
        logprobs = jax.lax.map(
            lambda micro: grpo.shared_prefix_logprobs(model, micro, GRPO.temperature)[0],
            shared).reshape(8, -1)
        return jnp.sum(logprobs * weights), logprobs

    (loss_a, lp_a), grad_a = jax.jit(jax.value_and_grad(reference, has_aux=True))(state.params)
    (loss_b, lp_b), grad_b = jax.jit(jax.value_and_grad(ours, has_aux=True))(state.params)
    on = mask.astype(bool)
    assert np.abs(np.asarray(lp_a) - np.asarray(lp_b))[on].max() <= 1e-5
    np.testing.assert_allclose(float(loss_a), float(loss_b), rtol=1e-5)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(grad_a))
    assert _largest_difference(grad_a, grad_b) <= 1e-4 * scale


def test_the_update_gradient_equals_autodiff_of_the_summed_loss(data_dir, tokenizer):
    """The update differentiates the answers' pass, adds that gradient to the sum, and only
    then the prompts' pass (so one parameter-sized gradient is alive beside the sum, not two):
    with SGD its step over the rate is minus jax.grad of the micro-batches' mean loss, taken
    through the whole loss at once. Two micro-batches, old log-probs off the current policy."""
    model, trainer, state = _trainer(tokenizer)
    groups = trainer.rollout_groups((state.params, state.rest),
                                    next(_prompt_batches(data_dir, tokenizer)), jax.random.key(1))
    batch = shared_prefix_batch(groups, model, prompt_length=384, rows_per_micro_batch=4,
                                min_patches=256, pad_id=CONFIG.pad_token_id)
    batch.pop("sampler_logprobs")
    rng = np.random.default_rng(0)
    shape = batch["answer_ids"].shape
    batch["advantages"] = rng.standard_normal(shape[:2]).astype(np.float32)
    batch["old_logprobs"] = -rng.uniform(0.5, 3.0, shape).astype(np.float32)
    batch["ref_logprobs"] = -rng.uniform(0.5, 3.0, shape).astype(np.float32)
    batch = trainer.place(batch)
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    before = jax.tree.map(np.array, params)

    def mean_loss(params):
        model = nnx.merge(graphdef, params, rest)
        return jax.lax.map(lambda micro: grpo.grpo_loss(model, micro, GRPO)[0], batch).mean()

    expected = jax.jit(jax.grad(mean_loss))(params)
    rate = 1e3  # steps far above the parameters' float32 rounding
    sgd = optax.inject_hyperparams(optax.sgd)(learning_rate=rate)  # the metrics read the rate
    after, _ = grpo.make_grpo_update(model, sgd, GRPO)(TrainState.create(model, sgd), batch)
    step = jax.tree.map(lambda b, a: (b - np.asarray(a)) / rate, before, after.params)
    scale = max(float(np.abs(g).max()) for g in jax.tree.leaves(expected))
    assert scale > 0
    assert _largest_difference(step, expected) <= 1e-5 * scale


def _rigged_scores(texts, answers):
    """Even answers: every reply scores 0 (a zero-variance group); odd: 1, 0, 1, 0."""
    if int(answers[0]) % 2 == 0:
        return [{"overall": 0.0, "format": 0.0, "accuracy": 0.0} for _ in texts]
    return [{"overall": float(i % 2 == 0), "format": 0.0, "accuracy": float(i % 2 == 0)}
            for i in range(len(texts))]


def test_first_update_matches_the_formula(data_dir, tokenizer):
    """Old policy = reference = current, so the ratio is 1 and the KL 0: the policy loss of
    each micro-batch is minus the token mean of its advantages, nothing is clipped."""
    _, trainer, state = _trainer(tokenizer, score_fn=_rigged_scores)
    state, metrics, groups = trainer.step(state, _prompt_batches(data_dir, tokenizer),
                                          jax.random.key(2))
    advantages = group_advantages(groups, GRPO).reshape(-1, 4)  # one group per micro-batch
    expected = [-np.repeat(a, g.mask.sum(-1)).mean()
                for a, g in zip(advantages, groups, strict=True)]
    assert metrics["actor/pg_loss"] == pytest.approx(float(np.mean(expected)), abs=1e-5)
    assert metrics["actor/ppo_kl"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["actor/kl_loss"] == pytest.approx(0.0, abs=1e-6)
    assert metrics["actor/pg_clipfrac_higher"] == metrics["actor/pg_clipfrac_lower"] == 0.0
    assert int(state.step) == 1 and np.isfinite(metrics["actor/grad_norm"])
    for key in ("reward/mean", "reward/std", "reward/accuracy", "reward/format",
                "response/length", "actor/entropy", "actor/learning_rate"):
        assert np.isfinite(metrics[key]), key


def test_on_policy_update_skips_the_old_forward_and_matches_it(data_dir, tokenizer):
    """One update per rollout: the update's own log-probs, held constant, stand in for the old
    policy's forward. The update equals the one fed that forward's log-probs, and a step runs
    the log-prob program for the reference only (twice a step with two epochs)."""
    model, trainer, state = _trainer(tokenizer, score_fn=_rigged_scores)
    states = (state.params, state.rest)
    groups = trainer.rollout_groups(states, next(_prompt_batches(data_dir, tokenizer)),
                                    jax.random.key(3))
    batch = shared_prefix_batch(groups, model, prompt_length=384, rows_per_micro_batch=4,
                                min_patches=256, pad_id=CONFIG.pad_token_id)
    batch.pop("sampler_logprobs")
    batch["advantages"] = group_advantages(groups, GRPO).reshape(batch["answer_ids"].shape[:2])
    inputs = {name: batch[name] for name in grpo.MODEL_INPUTS}
    batch["ref_logprobs"] = trainer.logprobs(trainer.reference, inputs)
    with_old = {**batch, "old_logprobs": trainer.logprobs(states, inputs)}
    fed, fed_metrics = trainer.update(_copy(state), with_old)  # update donates its state
    own, own_metrics = trainer.update(_copy(state), batch)
    assert GRPO.on_policy
    assert float(own_metrics["loss"]) == pytest.approx(float(fed_metrics["loss"]), abs=1e-6)
    assert float(own_metrics["ppo_kl"]) == 0.0
    assert float(own_metrics["grad_norm"]) == pytest.approx(float(fed_metrics["grad_norm"]),
                                                            rel=1e-5)
    moved = _largest_difference(own.params, state.params)
    apart = _largest_difference(own.params, fed.params)
    print(f"update moved the weights by up to {moved:.2e}; the two updates differ by {apart:.2e}")
    assert moved > 1e-5 and apart <= 1e-7

    # A step's log-prob forwards: the reference's, plus the old policy's with two epochs.
    two_epochs = GRPOConfig(**{**GRPO.__dict__, "ppo_epochs": 2})
    assert GRPO.ppo_epochs == 1 and not two_epochs.on_policy
    for epochs, forwards in ((1, 1), (2, 2)):
        if epochs == 2:
            _, trainer, state = _trainer(tokenizer, config=two_epochs, score_fn=_rigged_scores)
        calls = []
        trainer.logprobs = functools.partial(_counted, trainer.logprobs, calls)
        trainer.step(state, _prompt_batches(data_dir, tokenizer), jax.random.key(4))
        assert len(calls) == forwards, epochs


def _copy(tree):
    return jax.tree.map(lambda x: x.copy(), tree)


def _largest_difference(a, b) -> float:
    return max(jax.tree.leaves(jax.tree.map(lambda x, y: float(np.abs(x - y).max()), a, b)))


def _counted(fn, calls, *args):
    calls.append(1)
    return fn(*args)


def test_online_filter_drops_zero_variance_groups_and_backfills(data_dir, tokenizer):
    config = GRPOConfig(**{**GRPO.__dict__, "online_filter": True, "max_fill_batches": 12})
    _, trainer, state = _trainer(tokenizer, config=config, score_fn=_rigged_scores)
    answers = [int(a) for b in itertools.islice(_prompt_batches(data_dir, tokenizer), 12)
               for a in b["answer"]]
    groups, stats, _ = trainer.collect(state, _prompt_batches(data_dir, tokenizer),
                                       jax.random.key(0))
    odd_positions = [i for i, a in enumerate(answers) if a % 2]
    assert len(odd_positions) >= 2, answers
    assert [int(g.answer) % 2 for g in groups] == [1, 1]
    assert stats["filter/prompt_batches"] == odd_positions[1] // 2 + 1
    assert stats["filter/filled"] == 0
    state, metrics, groups = trainer.step(state, _prompt_batches(data_dir, tokenizer),
                                          jax.random.key(0))
    assert metrics["reward/zero_variance_groups"] == 0.0


def test_filter_fills_with_dropped_groups_when_the_budget_runs_out(data_dir, tokenizer):
    config = GRPOConfig(**{**GRPO.__dict__, "online_filter": True, "max_fill_batches": 1})
    _, trainer, state = _trainer(tokenizer, config=config,
                                 score_fn=lambda t, a: _rigged_scores(t, ["0"] * len(a)))
    groups, stats, _ = trainer.collect(state, _prompt_batches(data_dir, tokenizer),
                                       jax.random.key(0))
    assert len(groups) == 2 and stats["filter/filled"] == 2
    assert stats["filter/kept_fraction"] == 0.0


def test_steps_compile_once(data_dir, tokenizer, monkeypatch):
    """Three steps on new prompts: the log-prob program and the update trace once each."""
    traces: list[int] = []
    prompt_pass = grpo.prompt_pass

    def counted(*args):
        traces.append(1)
        return prompt_pass(*args)

    monkeypatch.setattr(grpo, "prompt_pass", counted)
    _, trainer, state = _trainer(tokenizer)
    batches = _prompt_batches(data_dir, tokenizer)
    rewards = []
    for step in range(3):
        state, metrics, _ = trainer.step(state, batches, jax.random.key(step))
        rewards.append(metrics["reward/mean"])
    assert len(traces) == 2  # the reference's log-probs, the update's prompts
    assert int(state.step) == 3


def test_rloo_and_several_mini_batches_and_epochs(data_dir, tokenizer):
    """4 prompts, 2 mini-batches, 2 epochs: 4 optimizer updates; the second epoch's ratios
    move away from 1 (ppo_kl > 0)."""
    config = GRPOConfig(**{**GRPO.__dict__, "advantage": "rloo", "mini_batches": 2,
                           "ppo_epochs": 2, "kl_coef": 0.0})
    model = Qwen2_5_VL(CONFIG, rngs=nnx.Rngs(0))
    optimizer = make_optimizer(learning_rate=1e-2, total_steps=10)
    trainer = GRPOTrainer(model, optimizer, config, tokenizer=tokenizer,
                          score_fn=_rigged_scores)
    state = TrainState.create(model, optimizer)
    prompts = rl_dataset(load_source(TASK, "train", data_dir=data_dir), task=TASK,
                         tokenizer=tokenizer, batch_size=4, seed=3, options=OPTIONS)
    state, metrics, _ = trainer.step(state, iter(prompts), jax.random.key(0))
    assert int(state.step) == 4
    assert metrics["actor/ppo_kl"] != 0.0 and "actor/kl_loss" not in metrics


def test_bad_configs_name_the_field():
    for kwargs, field in (({"group_size": 1}, "group_size"), ({"advantage": "ppo"}, "advantage"),
                          ({"mini_batches": 0}, "mini_batches"), ({"kl_coef": -1}, "kl_coef")):
        with pytest.raises(ValueError, match=field):
            GRPOConfig(**kwargs)
    with pytest.raises(ValueError, match="mini_batches"):
        GRPOConfig(mini_batches=3).check_batch(4)
    with pytest.raises(ValueError, match="micro_batch_rows"):
        GRPOConfig(group_size=4, micro_batch_rows=3).check_batch(2)


def _gradient_temp_bytes(layers: int, prompt_length: int = 1024) -> int:
    """XLA's temporary bytes for the gradient of `shared_prefix_logprobs` (remat on, as the
    paper configs), for the tiny model with `layers` text layers and one long prompt whose 4
    answers are 64 tokens."""
    text = dataclasses.replace(CONFIG.text, num_hidden_layers=layers)
    model = nnx.eval_shape(lambda: Qwen2_5_VL(dataclasses.replace(CONFIG, text=text),
                                              remat=True, rngs=nnx.Rngs(0)))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    shape = jax.ShapeDtypeStruct
    micro = {"prompt_ids": shape((1, prompt_length), jnp.int32),
             "prompt_positions": shape((3, 1, prompt_length), jnp.int32),
             "prompt_mask": shape((1, prompt_length), jnp.bool_),
             "answer_ids": shape((4, 64), jnp.int32), "response_mask": shape((4, 64), jnp.int32)}

    def total(params, micro):
        model = nnx.merge(graphdef, params, rest)
        return grpo.shared_prefix_logprobs(model, micro, 1.0)[0].sum()

    compiled = jax.jit(jax.grad(total)).lower(params, micro).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def test_the_update_memory_grows_linearly_with_the_layers():
    """Each further layer costs the update the same memory. When the prompt's keys and values
    were a cache carried through the layer scan, the gradient saved the whole cache once per
    layer, so each layer cost more than the last (the 3B update grew by 5 GiB per chip, and
    no longer fitted a v5e-8): 2 -> 5 -> 8 layers took 10.3 then 16.2 MB here."""
    two, five, eight = (_gradient_temp_bytes(layers) for layers in (2, 5, 8))
    assert five > two
    assert eight - five <= 1.25 * (five - two), (two, five, eight)
