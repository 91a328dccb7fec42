"""Logit and gradient parity with transformers' Qwen2_5_VLForConditionalGeneration (eager attention,
fp32)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import nnx
from qwen_reference import (
    hf_logits,
    hf_positions,
    many_images_batch,
    multimodal_batch,
    same_size_images_batch,
    text_batch,
)
from safetensors.numpy import load_file

from cpt_jax.models.qwen2_5_vl import from_pretrained, save_pretrained
from cpt_jax.models.qwen2_5_vl.vision import segments_in_blocks
from cpt_jax.models.qwen2_5_vl.weights import canonical_key

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


@pytest.mark.parametrize("images", ["mixed", "same_size"])
def test_parameter_gradients_match_transformers_backward(pair, tmp_path, images):
    """Every parameter's gradient equals torch's backward through transformers' model. Mixed
    images (uneven windows, a video) take the vision tower's neighbouring-chunk attention;
    same-size images with the frame bound at their size take its exact blocks; both take the
    attention's hand-written gradient (`layers._grouped_attention`)."""
    variant, reference, _ = pair
    if images == "mixed":
        batch, bound = multimodal_batch(), None
    else:
        batch = same_size_images_batch(variant.window_size)
        bound = int(batch.image_grid_thw[0].prod())
    reference.save_pretrained(tmp_path / "reference")
    model = from_pretrained(tmp_path / "reference", max_frame_patches=bound)

    reference.zero_grad()
    logits = reference(**batch.torch(), position_ids=hf_positions(reference, batch)).logits
    mask = torch.from_numpy(batch.attention_mask).bool()
    torch.where(mask[..., None], torch.tanh(logits), 0.0).sum().backward()
    expected = {canonical_key(name): p.grad.numpy() for name, p in reference.named_parameters()}

    ids, positions, attention, vision, _ = model.prepare_inputs(batch.input_ids, **batch.ours())
    window = model.config.vision.window_patches
    assert bool(segments_in_blocks(vision.window_segment_ids, window)) is (images == "same_size")
    if bound is not None:
        assert bool(segments_in_blocks(vision.frame_segment_ids, bound))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)

    def loss(p):
        out, _ = nnx.merge(graphdef, p, rest).forward(ids, positions, attention, vision)
        return jnp.sum(jnp.where(attention[..., None], jnp.tanh(out), 0.0))

    nnx.update(model, jax.grad(loss)(params))  # the gradients, written out as weights would be
    save_pretrained(model, tmp_path / "grads")
    got = {}
    for shard in (tmp_path / "grads").glob("*.safetensors"):
        got.update(load_file(shard))
    assert sorted(got) == sorted(expected)
    for name, want in expected.items():
        np.testing.assert_allclose(got[name], want, atol=1e-4 * float(np.abs(want).max()) + 1e-6,
                                   err_msg=name)


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
