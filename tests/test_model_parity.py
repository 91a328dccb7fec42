"""Logit parity with transformers' Qwen2_5_VLForConditionalGeneration (eager attention, fp32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from qwen_reference import hf_logits, hf_positions, many_images_batch, multimodal_batch, text_batch

from cpt_jax.models.qwen2_5_vl import from_pretrained

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


def test_frame_bounded_vision_matches_transformers(pair, tmp_path):
    """With `max_frame_patches` the full-attention blocks attend over neighbouring chunks of
    the packed patches (seven frames of 8-60 patches, 344 in all, bound 64) instead of all of
    them; the logits still equal transformers', which attends image by image."""
    variant, reference, _ = pair
    reference.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, max_frame_patches=64)
    batch = many_images_batch()
    expected = hf_logits(reference, batch)
    got = np.asarray(model(batch.input_ids, **batch.ours()))
    diff = _max_diff_on_real_tokens(expected, got, batch.attention_mask)
    print(f"{variant.name}: frame-bounded max |logit diff| = {diff:.2e}")
    assert diff <= TOLERANCE
    with pytest.raises(ValueError, match=r"image grid \[1, 8, 8\] has 64 patches per frame, "
                                         r"more than the model's max_frame_patches \(60\)"):
        from_pretrained(tmp_path, max_frame_patches=60).prepare_inputs(
            batch.input_ids, **batch.ours())


def test_unrolled_layers_match_transformers_and_the_scan(pair, tmp_path):
    """`scan_layers=False` (the stacked layers split and run in a Python loop): the same
    logits as transformers, and the same parameter gradients as the scanned model."""
    variant, reference, scanned = pair
    reference.save_pretrained(tmp_path)
    model = from_pretrained(tmp_path, scan_layers=False)
    batch = multimodal_batch()
    expected = hf_logits(reference, batch)
    got = np.asarray(model(batch.input_ids, **batch.ours()))
    assert _max_diff_on_real_tokens(expected, got, batch.attention_mask) <= TOLERANCE

    ids, positions, mask, vision, _ = scanned.prepare_inputs(batch.input_ids, **batch.ours())
    grads = []
    for m in (scanned, model):
        graphdef, params, rest = nnx.split(m, nnx.Param, ...)

        def loss(p, graphdef=graphdef, rest=rest):
            logits, _ = nnx.merge(graphdef, p, rest).forward(ids, positions, mask, vision)
            return jnp.sum(jnp.where(mask[..., None], jnp.tanh(logits), 0.0))

        grads.append(jax.tree.leaves(jax.grad(loss)(params)))
    for want, have in zip(*grads, strict=True):  # float32 sums in another order
        np.testing.assert_allclose(have, want, atol=1e-3 * float(np.abs(want).max()) + 1e-6)


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
