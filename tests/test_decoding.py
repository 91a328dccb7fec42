"""KV-cache decoding: prefill + one-token steps equal one full forward over the whole sequence."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from qwen_reference import multimodal_batch

from cpt_jax.models.qwen2_5_vl import GroupCache
from cpt_jax.models.qwen2_5_vl.layers import dot_product_attention, shared_prefix_attention

TOLERANCE = 1e-4


def _prompt_and_continuation(steps: int):
    batch = multimodal_batch()
    rng = np.random.default_rng(7)
    continuation = rng.integers(3, 240, size=(batch.input_ids.shape[0], steps))
    return batch, continuation


def _full_logits(model, batch, continuation):
    ids = np.concatenate([batch.input_ids, continuation], axis=1)
    mask = np.concatenate([batch.attention_mask, np.ones_like(continuation)], axis=1)
    kwargs = {k: v for k, v in batch.ours().items() if k != "attention_mask"}
    return np.asarray(model(ids, attention_mask=mask, **kwargs))


def test_prefill_then_single_token_steps_match_full_forward(pair):
    variant, _, model = pair
    steps = 5
    batch, continuation = _prompt_and_continuation(steps)
    prompt_len = batch.input_ids.shape[1]
    full = _full_logits(model, batch, continuation)

    logits, cache = model.prefill(batch.input_ids, max_len=prompt_len + steps + 3, **batch.ours())
    real = batch.attention_mask.astype(bool)
    diffs = [np.abs(np.asarray(logits)[real] - full[:, :prompt_len][real]).max()]
    for step in range(steps):
        logits, cache = model.decode(continuation[:, step:step + 1], cache)
        diffs.append(np.abs(np.asarray(logits)[:, 0] - full[:, prompt_len + step]).max())
    print(f"{variant.name}: prefill + {steps} steps, max |logit diff| per call = "
          + ", ".join(f"{d:.1e}" for d in diffs))
    assert max(diffs) <= TOLERANCE
    assert int(cache.index) == prompt_len + steps


def test_multi_token_decode_chunk(pair):
    """Appending several tokens in one call (as a sampler's forced prefix would) also matches."""
    _, _, model = pair
    batch, continuation = _prompt_and_continuation(4)
    prompt_len = batch.input_ids.shape[1]
    full = _full_logits(model, batch, continuation)
    _, cache = model.prefill(batch.input_ids, max_len=prompt_len + 4, **batch.ours())
    logits, _ = model.decode(continuation, cache)
    np.testing.assert_allclose(np.asarray(logits), full[:, prompt_len:], atol=TOLERANCE)


def test_decode_positions_continue_after_rope_delta(pair):
    """After an image the next text position is max(position) + 1, not the sequence length."""
    _, _, model = pair
    batch = multimodal_batch()
    _, positions, _, _, deltas = model.prepare_inputs(batch.input_ids, **batch.ours())
    _, cache = model.prefill(batch.input_ids, max_len=batch.input_ids.shape[1] + 1, **batch.ours())
    real_lengths = batch.attention_mask.sum(-1)
    np.testing.assert_array_equal(np.asarray(cache.next_position), real_lengths + deltas[:, 0])
    np.testing.assert_array_equal(np.asarray(cache.next_position),
                                  np.asarray(positions).max(axis=(0, 2)) + 1)


def test_an_unrolled_model_decodes_with_one_cache_array_per_layer(scanned_and_unrolled):
    """Prefill + one-token steps of the unrolled model (per-layer cache, layers split once and
    passed to every step) equal the full forward, as the scanned model's do."""
    model, unrolled = scanned_and_unrolled
    steps = 3
    batch, continuation = _prompt_and_continuation(steps)
    prompt_len = batch.input_ids.shape[1]
    full = _full_logits(model, batch, continuation)
    _, cache = unrolled.prefill(batch.input_ids, max_len=prompt_len + steps, **batch.ours())
    text = model.config.text
    assert cache.per_layer and len(cache.k) == len(cache.v) == text.num_hidden_layers
    assert cache.k[0].shape == (batch.input_ids.shape[0], text.num_key_value_heads,
                                prompt_len + steps, text.head_dim)
    layers = unrolled.decoder_layers()
    for step in range(steps):
        logits, cache = unrolled.decode(continuation[:, step:step + 1], cache, layers)
        np.testing.assert_allclose(np.asarray(logits)[:, 0], full[:, prompt_len + step],
                                   atol=TOLERANCE)


@pytest.mark.parametrize("heads_major", [False, True])
@pytest.mark.parametrize("q_len", [1, 3])
def test_shared_prefix_attention_equals_attention_over_each_rows_copy(heads_major, q_len):
    """One softmax over the prompt's keys (held once per group) and the row's own equals
    attention over the prompt's keys copied into every row, masks included: left padding in
    the prompt, unwritten answer slots, a row whose own slots are all hidden. So do the
    gradients (autodiff through the shared form against `dot_product_attention`'s own
    gradient through the copies)."""
    prompts, n, heads, kv_heads, head_dim, prefix_len, own_len = 2, 3, 4, 2, 8, 7, 5
    rows = prompts * n
    keys = jax.random.split(jax.random.key(3), 6)
    q = jax.random.normal(keys[0], (rows, q_len, heads, head_dim))
    prefix_k, prefix_v = (jax.random.normal(key, (prompts, prefix_len, kv_heads, head_dim))
                          for key in keys[1:3])
    k, v = (jax.random.normal(key, (rows, own_len, kv_heads, head_dim)) for key in keys[3:5])
    weights = jax.random.normal(keys[5], (rows, q_len, heads, head_dim))
    prefix_mask = jnp.arange(prefix_len)[None, :] >= jnp.asarray([[0], [3]])  # left padding
    mask = jax.random.bernoulli(jax.random.key(4), 0.6, (rows, q_len, own_len)).at[1].set(False)
    full_mask = jnp.concatenate([jnp.broadcast_to(jnp.repeat(prefix_mask, n, axis=0)[:, None],
                                                  (rows, q_len, prefix_len)), mask], axis=-1)

    def copied(q, k, v, prefix_k, prefix_v):
        copies = jnp.repeat(prefix_k, n, axis=0), jnp.repeat(prefix_v, n, axis=0)
        return dot_product_attention(q, jnp.concatenate([copies[0], k], axis=1),
                                     jnp.concatenate([copies[1], v], axis=1), full_mask)

    def shared(q, k, v, prefix_k, prefix_v):
        if heads_major:
            prefix_k, prefix_v, k, v = (jnp.swapaxes(x, 1, 2) for x in (prefix_k, prefix_v, k, v))
        return shared_prefix_attention(q, k, v, mask, prefix_k, prefix_v, prefix_mask,
                                       heads_major)

    inputs = (q, k, v, prefix_k, prefix_v)
    np.testing.assert_allclose(np.asarray(shared(*inputs)), np.asarray(copied(*inputs)),
                               atol=1e-6)
    grads = [jax.grad(lambda *x, f=f: jnp.sum(f(*x) * weights), argnums=(0, 1, 2, 3, 4))(*inputs)
             for f in (copied, shared)]
    for expected, got in zip(*grads, strict=True):
        np.testing.assert_allclose(np.asarray(got), np.asarray(expected), atol=1e-5)


@pytest.mark.parametrize("layout", ["scanned", "unrolled"])
def test_a_group_decodes_over_one_shared_prompt_cache(scanned_and_unrolled, layout):
    """Prefill once, then n answers per prompt with different tokens over a `GroupCache` (the
    prompt's keys stored once, `steps` answer slots each): every answer's logits equal the full
    forward of its prompt + its own tokens, whether tokens come one or two per call."""
    model = dict(zip(("scanned", "unrolled"), scanned_and_unrolled, strict=True))[layout]
    n, steps = 3, 4
    batch = multimodal_batch()
    prompts, prompt_len = batch.input_ids.shape
    answers = np.random.default_rng(11).integers(3, 240, size=(prompts, n, steps))
    full = np.stack([_full_logits(model, batch, answers[:, j]) for j in range(n)], axis=1)
    expected = full[:, :, prompt_len:].reshape(prompts * n, steps, -1)  # prompt-major rows

    _, prompt_cache = model.prefill(batch.input_ids, max_len=prompt_len, **batch.ours())
    cache = GroupCache.after_prefill(prompt_cache, n, steps)
    assert cache.answers.valid.shape == (prompts * n, steps)
    rows = answers.reshape(prompts * n, steps)
    layers = model.decoder_layers()
    logits, cache = model.decode(rows[:, :2], cache, layers)
    got = [np.asarray(logits)]
    for step in range(2, steps):
        logits, cache = model.decode(rows[:, step:step + 1], cache, layers)
        got.append(np.asarray(logits))
    np.testing.assert_allclose(np.concatenate(got, axis=1), expected, atol=TOLERANCE)
    assert int(cache.answers.index) == steps
    assert jax.tree.all(jax.tree.map(lambda a, b: a is b, cache.prompt, prompt_cache))
