"""The jit-able core: padded patches give the same logits, and new data does not recompile."""

from __future__ import annotations

import numpy as np
from flax import nnx
from qwen_reference import IMAGE, PATCH_DIM, VEND, VSTART, multimodal_batch, pad_left

TOLERANCE = 1e-4


def _jitted_forward(counter: list[int]):
    @nnx.jit
    def forward(model, ids, positions, mask, vision):
        counter.append(1)  # runs once per trace
        logits, _ = model.forward(ids, positions, mask, vision)
        return logits
    return forward


def test_padded_patches_under_jit_match_eager_logits(pair):
    _, _, model = pair
    batch = multimodal_batch()
    expected = np.asarray(model(batch.input_ids, **batch.ours()))
    n_patches = batch.pixel_values.shape[0] + batch.pixel_values_videos.shape[0]
    ids, positions, mask, vision, _ = model.prepare_inputs(
        batch.input_ids, **batch.ours(), pad_patches_to=n_patches + 4 * 13)
    assert vision.pixel_values.shape[0] == n_patches + 52
    got = np.asarray(_jitted_forward([])(model, ids, positions, mask, vision))
    real = batch.attention_mask.astype(bool)
    assert np.abs(got[real] - expected[real]).max() <= TOLERANCE


def _one_image_batch(rng, grid):
    t, h, w = grid
    n_tokens = t * h * w // 4
    rows = [[5, 6, VSTART] + [IMAGE] * n_tokens + [VEND, 7, 8]]
    ids, mask = pad_left(rows)
    pad = 40 - ids.shape[1]  # same sequence length for every grid
    ids = np.pad(ids, ((0, 0), (pad, 0)))
    mask = np.pad(mask, ((0, 0), (pad, 0)))
    pixels = rng.standard_normal((t * h * w, PATCH_DIM)).astype(np.float32)
    return ids, mask, pixels, np.asarray([grid])


def test_new_image_sizes_reuse_the_compiled_program(pair):
    _, _, model = pair
    rng = np.random.default_rng(0)
    traces: list[int] = []
    forward = _jitted_forward(traces)
    for grid in [(1, 8, 12), (1, 10, 10), (1, 4, 14), (1, 12, 8)]:
        ids, mask, pixels, grid_thw = _one_image_batch(rng, grid)
        expected = np.asarray(model(ids, attention_mask=mask, pixel_values=pixels,
                                    image_grid_thw=grid_thw))
        inputs = model.prepare_inputs(ids, attention_mask=mask, pixel_values=pixels,
                                      image_grid_thw=grid_thw, pad_patches_to=128)
        got = np.asarray(forward(model, *inputs[:4]))
        real = mask.astype(bool)
        assert np.abs(got[real] - expected[real]).max() <= TOLERANCE, grid
    assert len(traces) == 1
