"""Logit parity with transformers' Qwen2_5_VLForConditionalGeneration (eager attention, fp32)."""

from __future__ import annotations

import numpy as np
from qwen_reference import hf_logits, hf_positions, multimodal_batch, text_batch

TOLERANCE = 1e-4


def _max_diff_on_real_tokens(reference: np.ndarray, ours: np.ndarray, mask: np.ndarray) -> float:
    real = mask.astype(bool)
    return float(np.abs(reference[real] - ours[real]).max())


def test_multimodal_logits_match(pair):
    """Two images in one row (windows split unevenly), a video + image row, a text-only row,
    left padding; positions computed by our get_rope_index."""
    variant, reference, model = pair
    batch = multimodal_batch()
    expected = hf_logits(reference, batch)
    got = np.asarray(model(batch.input_ids, **batch.ours()))
    diff = _max_diff_on_real_tokens(expected, got, batch.attention_mask)
    print(f"{variant.name}: multimodal max |logit diff| = {diff:.2e} "
          f"(logit std {expected[batch.attention_mask.astype(bool)].std():.2f})")
    assert diff <= TOLERANCE


def test_text_only_logits_match(pair):
    variant, reference, model = pair
    batch = text_batch()
    expected = hf_logits(reference, batch)
    got = np.asarray(model(batch.input_ids, attention_mask=batch.attention_mask))
    diff = _max_diff_on_real_tokens(expected, got, batch.attention_mask)
    print(f"{variant.name}: text-only max |logit diff| = {diff:.2e}")
    assert diff <= TOLERANCE


def test_positions_match_transformers(pair):
    _, reference, model = pair
    batch = multimodal_batch()
    _, positions, _, _, _ = model.prepare_inputs(batch.input_ids, **batch.ours())
    expected = hf_positions(reference, batch).numpy()
    real = batch.attention_mask.astype(bool)
    np.testing.assert_array_equal(np.asarray(positions)[:, real], expected[:, real])


def test_explicit_positions_are_used(pair):
    """Passing transformers' positions gives the same logits as computing them ourselves."""
    _, reference, model = pair
    batch = multimodal_batch()
    positions = hf_positions(reference, batch).numpy()
    a = np.asarray(model(batch.input_ids, **batch.ours()))
    b = np.asarray(model(batch.input_ids, **batch.ours(), position_ids=positions))
    real = batch.attention_mask.astype(bool)
    np.testing.assert_allclose(a[real], b[real], atol=1e-5)
