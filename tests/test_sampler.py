"""The rollout sampler: greedy tokens against step-by-step full forward passes (ours and
transformers'), log-probabilities against the training forward pass, one prefill per group,
stop tokens, top-k / top-p, the sampling distribution, and one compilation per prompt shape."""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from qwen_reference import IMAGE, MERGE, PAD, VIDEO, Batch, hf_logits, multimodal_batch

from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, preset
from cpt_jax.models.qwen2_5_vl import text as text_module
from cpt_jax.rl import sampler as sampler_module
from cpt_jax.rl.sampler import Prompts, SamplingConfig, choose_tokens, make_sampler

NEW_TOKENS = 6


def _prompts(model: Qwen2_5_VL, batch: Batch) -> Prompts:
    ids, positions, mask, vision, _ = model.prepare_inputs(batch.input_ids, **batch.ours())
    return Prompts(ids, positions, mask, vision)


def _states(model: Qwen2_5_VL) -> tuple[nnx.State, ...]:
    return (nnx.state(model),)


def _extended(batch: Batch, tokens: np.ndarray) -> Batch:
    """The prompt batch with answer tokens appended (all treated as real tokens)."""
    return dataclasses.replace(
        batch, input_ids=np.concatenate([batch.input_ids, tokens], axis=1),
        attention_mask=np.concatenate([batch.attention_mask, np.ones_like(tokens)], axis=1))


def _greedy_by_full_forward(logits_of, batch: Batch, steps: int) -> np.ndarray:
    tokens = np.zeros((batch.input_ids.shape[0], 0), np.int64)
    for _ in range(steps):
        logits = logits_of(_extended(batch, tokens))
        tokens = np.concatenate([tokens, logits[:, -1].argmax(-1)[:, None]], axis=1)
    return tokens


def _cut_at_stop(tokens: np.ndarray, stop: int) -> np.ndarray:
    """Reference tokens with everything after the first stop token replaced by the pad id."""
    out = tokens.copy()
    for row in out:
        hits = np.flatnonzero(row == stop)
        if len(hits):
            row[hits[0] + 1:] = PAD
    return out


def test_greedy_equals_step_by_step_full_forward(pair):
    """Images, a video, left padding and a text-only row; ours and transformers' references.

    The stop token is row 0's third greedy token, so row 0 stops there (and any other row at
    its first occurrence) while the rest go on to the budget.
    """
    variant, reference, model = pair
    batch = multimodal_batch()
    ours = _greedy_by_full_forward(
        lambda b: np.asarray(model(b.input_ids, **b.ours())), batch, NEW_TOKENS)
    theirs = _greedy_by_full_forward(lambda b: hf_logits(reference, b), batch, NEW_TOKENS)
    np.testing.assert_array_equal(ours, theirs)
    stop = int(ours[0, 2])
    sample = make_sampler(model, SamplingConfig.greedy(NEW_TOKENS), stop_ids=[stop], pad_id=PAD)
    rollout = sample(_states(model), _prompts(model, batch))
    print(f"{variant.name}: greedy tokens {np.asarray(rollout.tokens).tolist()}, stop {stop}")

    expected = _cut_at_stop(ours, stop)
    np.testing.assert_array_equal(np.asarray(rollout.tokens), expected)
    lengths = [int(np.flatnonzero(r == stop)[0]) + 1 if stop in r else NEW_TOKENS for r in ours]
    assert np.asarray(rollout.lengths).tolist() == lengths and lengths[0] == 3
    assert np.asarray(rollout.finished).tolist() == [stop in r for r in ours]
    mask = np.asarray(rollout.mask)
    assert mask.sum(-1).tolist() == lengths and (np.asarray(rollout.logprobs)[mask == 0] == 0).all()


def _repeat_rows(batch: Batch, n: int) -> Batch:
    """Each row n times in a row, with its own images and videos (packed row-major)."""
    images = _split_by_row(batch.input_ids, batch.image_grid_thw, batch.pixel_values, IMAGE)
    videos = _split_by_row(batch.input_ids, batch.video_grid_thw, batch.pixel_values_videos,
                           VIDEO)
    rows = np.repeat(np.arange(batch.input_ids.shape[0]), n)
    return Batch(batch.input_ids[rows], batch.attention_mask[rows],
                 pixel_values=np.concatenate([images[r][0] for r in rows]),
                 image_grid_thw=np.concatenate([images[r][1] for r in rows]),
                 pixel_values_videos=np.concatenate([videos[r][0] for r in rows]),
                 video_grid_thw=np.concatenate([videos[r][1] for r in rows]))


def _split_by_row(ids: np.ndarray, grids: np.ndarray, pixels: np.ndarray,
                  token: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """(pixels, grids) of each row, cut from the packed arrays by its placeholder count."""
    out, g, p = [], 0, 0
    for row in ids:
        want, taken = int((row == token).sum()), []
        while want:
            taken.append(grids[g])
            want -= int(np.prod(grids[g])) // MERGE**2
            g += 1
        count = int(sum(np.prod(t) for t in taken))
        out.append((pixels[p:p + count], np.asarray(taken, np.int64).reshape(-1, 3)))
        p += count
    return out


def _training_logprobs(model: Qwen2_5_VL, batch: Batch, tokens: np.ndarray,
                       temperature: float) -> np.ndarray:
    """log softmax(logits / T) of each answer token from one forward over prompt + answer."""
    full = _extended(batch, tokens)
    logits = np.asarray(model(full.input_ids, **full.ours()), np.float64)
    prompt_len = batch.input_ids.shape[1]
    scaled = logits[:, prompt_len - 1:-1] / temperature
    scaled -= scaled.max(-1, keepdims=True)
    logprobs = scaled - np.log(np.exp(scaled).sum(-1, keepdims=True))
    return np.take_along_axis(logprobs, tokens[..., None], -1)[..., 0]


@pytest.mark.parametrize("config", [
    SamplingConfig(max_new_tokens=NEW_TOKENS, group_size=3, temperature=1.0),
    SamplingConfig(max_new_tokens=NEW_TOKENS, group_size=2, temperature=0.7, top_p=0.9,
                   top_k=20),
], ids=["t1", "t0.7-top_p-top_k"])
def test_logprobs_equal_the_training_forward(pair, config):
    """Every answer token's log-prob (prompt-major rows) against one forward pass over the
    prompt + answer, the images repeated per answer as the GRPO update sees them."""
    _, _, model = pair
    batch = multimodal_batch()
    rollout = make_sampler(model, config, stop_ids=[PAD], pad_id=PAD)(
        _states(model), _prompts(model, batch), jax.random.key(3))
    tokens, mask = np.asarray(rollout.tokens), np.asarray(rollout.mask).astype(bool)
    expected = _training_logprobs(model, _repeat_rows(batch, config.group_size), tokens,
                                  config.temperature)
    diff = np.abs(np.asarray(rollout.logprobs) - expected)[mask].max()
    print(f"max |sampler - training log-prob| = {diff:.2e}")
    assert diff <= 1e-4
    groups = tokens.reshape(-1, config.group_size, NEW_TOKENS)
    assert all(len({tuple(a) for a in g}) > 1 for g in groups), "a group's answers all agree"


def _tiny() -> Qwen2_5_VL:
    return Qwen2_5_VL(preset("tiny"), rngs=nnx.Rngs(0))


def _tiny_prompts(model: Qwen2_5_VL, seed: int = 0) -> Prompts:
    """Two left-padded text prompts of the tiny preset's vocabulary."""
    rng = np.random.default_rng(seed)
    ids = rng.integers(0, 490, (2, 12))
    mask = np.ones_like(ids)
    mask[1, :5] = 0
    ids, positions, mask, vision, _ = model.prepare_inputs(ids, attention_mask=mask)
    return Prompts(ids, positions, mask, vision)


def test_the_prompt_is_prefilled_and_its_image_encoded_once_per_group(pair, monkeypatch):
    """The model's body runs once over the [prompts, length] batch and then only on one-token
    steps of [prompts * group, 1]; the vision tower once over the prompts' own patches."""
    _, _, model = pair
    calls: list[tuple[int, ...]] = []
    vision_calls: list[int] = []
    hidden_states, visual = Qwen2_5_VL.hidden_states, type(model.visual).__call__

    def counted(self, input_ids, *args, **kwargs):
        calls.append(tuple(input_ids.shape))  # once per trace: the program's calls
        return hidden_states(self, input_ids, *args, **kwargs)

    def counted_visual(self, vision):
        vision_calls.append(vision.pixel_values.shape[0])
        return visual(self, vision)

    monkeypatch.setattr(Qwen2_5_VL, "hidden_states", counted)
    monkeypatch.setattr(type(model.visual), "__call__", counted_visual)
    batch = multimodal_batch()
    prompts = _prompts(model, batch)
    config = SamplingConfig(max_new_tokens=4, group_size=5)
    make_sampler(model, config, stop_ids=[PAD], pad_id=PAD)(_states(model), prompts)
    rows, length = batch.input_ids.shape
    assert calls == [(rows, length), (rows * 5, 1)]
    assert vision_calls == [prompts.vision.pixel_values.shape[0]]


def test_top_k_1_and_a_tiny_top_p_are_greedy():
    model = _tiny()
    prompts = _tiny_prompts(model)
    greedy = make_sampler(model, SamplingConfig.greedy(8), stop_ids=[501], pad_id=511)(
        _states(model), prompts)
    for config in (SamplingConfig(8, group_size=3, temperature=1.5, top_k=1),
                   SamplingConfig(8, group_size=3, temperature=1.5, top_p=1e-6)):
        rollout = make_sampler(model, config, stop_ids=[501], pad_id=511)(
            _states(model), prompts, jax.random.key(1))
        np.testing.assert_array_equal(np.asarray(rollout.tokens),
                                      np.repeat(np.asarray(greedy.tokens), 3, axis=0))


def test_same_key_same_answers_other_key_other_answers():
    model = _tiny()
    prompts = _tiny_prompts(model)
    sample = make_sampler(model, SamplingConfig(8, group_size=4), stop_ids=[501], pad_id=511)
    a, b, c = (np.asarray(sample(_states(model), prompts, jax.random.key(k)).tokens)
               for k in (5, 5, 6))
    np.testing.assert_array_equal(a, b)
    assert (a != c).any()


def test_draws_follow_the_tempered_truncated_distribution():
    """200k draws from fixed logits: frequencies match softmax(logits / T) restricted to the
    top-p nucleus (renormalised), and nothing outside the nucleus or the top-k is drawn."""
    logits = jnp.asarray([[2.0, 1.5, 1.0, 0.0, -1.0, -3.0]])
    draws = 200_000
    for config, allowed in ((SamplingConfig(1, temperature=0.8), 6),
                            (SamplingConfig(1, temperature=1.0, top_p=0.8), 3),
                            (SamplingConfig(1, temperature=2.0, top_k=2), 2)):
        probs = np.asarray(jax.nn.softmax(logits[0] / config.temperature), np.float64)
        expected = np.where(np.arange(6) < allowed, probs, 0)
        expected /= expected.sum()
        keys = jax.random.split(jax.random.key(0), draws)
        tokens, logprobs = jax.vmap(lambda k, c=config: choose_tokens(logits, k, c))(keys)
        counts = np.bincount(np.asarray(tokens).ravel(), minlength=6) / draws
        np.testing.assert_allclose(counts, expected, atol=4e-3)
        assert counts[allowed:].sum() == 0, config
        np.testing.assert_allclose(np.asarray(logprobs).ravel(),
                                   np.log(probs[np.asarray(tokens).ravel()]), rtol=1e-5)


def test_new_prompts_of_the_same_shape_reuse_the_compiled_sampler(monkeypatch):
    traces: list[int] = []
    choose = sampler_module.choose_tokens

    def counted(*args):
        traces.append(1)  # twice per trace: the first token and the loop body
        return choose(*args)

    monkeypatch.setattr(sampler_module, "choose_tokens", counted)
    model = _tiny()
    sample = make_sampler(model, SamplingConfig(6, group_size=2), stop_ids=[501], pad_id=511)
    outputs = [np.asarray(sample(_states(model), _tiny_prompts(model, seed),
                                 jax.random.key(seed)).tokens) for seed in range(4)]
    assert len(traces) == 2
    assert len({o.tobytes() for o in outputs}) == 4


def test_bad_sampling_configs_name_the_field():
    for kwargs, field in (({"max_new_tokens": 0}, "max_new_tokens"),
                          ({"max_new_tokens": 4, "group_size": 0}, "group_size"),
                          ({"max_new_tokens": 4, "temperature": -1}, "temperature"),
                          ({"max_new_tokens": 4, "top_p": 0}, "top_p"),
                          ({"max_new_tokens": 4, "top_k": -2}, "top_k")):
        with pytest.raises(ValueError, match=field):
            SamplingConfig(**kwargs)


@pytest.mark.parametrize("top_p", [1e-6, 0.3, 0.9, 0.99, 0.9999])
def test_nucleus_equals_the_sorted_cumulative_definition(top_p):
    """The bisection nucleus against the textbook one: sort, keep tokens until the mass
    before them reaches top_p. Peaked and flat rows, a vocabulary of 8192."""
    rng = np.random.default_rng(0)
    logits = rng.standard_normal((64, 8192)) * rng.choice([0.1, 1.0, 5.0], (64, 1))
    probs = np.asarray(jax.nn.softmax(jnp.asarray(logits, jnp.float32), axis=-1))
    order = np.argsort(-probs, axis=-1, kind="stable")
    ordered = np.take_along_axis(probs, order, -1).astype(np.float64)
    kept_sorted = (np.cumsum(ordered, -1) - ordered) < top_p
    expected = np.zeros_like(kept_sorted)
    np.put_along_axis(expected, order, kept_sorted, -1)
    mask = np.asarray(sampler_module._nucleus(jnp.asarray(probs), top_p))
    if top_p <= 0.99:
        assert (mask == expected).all()
    # Near 1 the tail's tokens are closer than float32 sums resolve: check the definition
    # itself (enough mass, and none to spare beyond the smallest kept token) within 1e-6.
    mass = np.where(mask, probs, 0).astype(np.float64).sum(-1)
    smallest = np.where(mask, probs, np.inf).min(-1)
    assert (mass >= top_p - 1e-6).all() and (mass - smallest < top_p + 1e-6).all()


def test_an_unrolled_model_samples_what_the_scanned_one_does(scanned_and_unrolled, monkeypatch):
    """Same key, same answers and log-probs; the stacked layer weights are split once per
    rollout (before the decode loop), not once per cached pass."""
    model, unrolled = scanned_and_unrolled
    splits: list[int] = []
    unstack = text_module.unstack_layers

    def counted(layers):
        splits.append(1)
        return unstack(layers)

    monkeypatch.setattr(text_module, "unstack_layers", counted)
    batch = multimodal_batch()
    config = SamplingConfig(max_new_tokens=NEW_TOKENS, group_size=3, temperature=1.0)
    scanned, per_layer = (
        make_sampler(m, config, stop_ids=[PAD], pad_id=PAD)(_states(m), _prompts(m, batch),
                                                             jax.random.key(3))
        for m in (model, unrolled))
    assert splits == [1]
    np.testing.assert_array_equal(np.asarray(per_layer.tokens), np.asarray(scanned.tokens))
    np.testing.assert_allclose(np.asarray(per_layer.logprobs), np.asarray(scanned.logprobs),
                               atol=1e-5)


def test_a_draw_at_the_top_of_the_cumulative_mass_stays_in_the_support(monkeypatch):
    """u rounded up to the total mass (float32) still draws the last allowed token."""
    monkeypatch.setattr(sampler_module.jax.random, "uniform",
                        lambda key, shape, dtype: jnp.ones(shape, dtype))
    logits = jnp.asarray([[0.0, 1.0, 2.0, -jnp.inf, -jnp.inf], [3.0, -jnp.inf, 0.0, 1.0, -5.0]])
    tokens = sampler_module._draw(jax.random.key(0), logits)
    np.testing.assert_array_equal(np.asarray(tokens), [2, 4])
