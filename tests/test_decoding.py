"""KV-cache decoding: prefill + one-token steps equal one full forward over the whole sequence."""

from __future__ import annotations

import numpy as np
from qwen_reference import multimodal_batch

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
