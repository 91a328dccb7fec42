"""Compare the NumPy M-RoPE index against transformers' Qwen2_5_VLModel.get_rope_index."""

from __future__ import annotations

import numpy as np
import pytest
import torch  # noqa: E402
import transformers  # noqa: E402

from cpt_jax.models.qwen2_5_vl.rope_index import decode_positions, get_rope_index  # noqa: E402

IMAGE, VIDEO, VSTART, VEND = 90, 91, 92, 93
MERGE = 2


def _tiny_model(tokens_per_second: int):
    config = transformers.Qwen2_5_VLConfig(
        text_config=dict(
            vocab_size=128,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            rope_parameters={
                "rope_type": "default",
                "rope_theta": 10000.0,
                "mrope_section": [1, 1, 2],
            },
        ),
        vision_config=dict(
            depth=1,
            hidden_size=16,
            intermediate_size=32,
            num_heads=2,
            out_hidden_size=16,
            spatial_merge_size=MERGE,
            tokens_per_second=tokens_per_second,
            fullatt_block_indexes=[0],
        ),
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        vision_start_token_id=VSTART,
        vision_end_token_id=VEND,
    )
    return transformers.Qwen2_5_VLModel(config).eval()


@pytest.fixture(scope="module", params=[2, 4], ids=lambda tps: f"tps{tps}")
def model(request):
    return _tiny_model(request.param)


def _text(n: int, seed: int = 0) -> list[int]:
    return list(np.random.default_rng(seed).integers(1, 80, size=n))


def _vision(token: int, grid: tuple[int, int, int]) -> list[int]:
    t, h, w = grid
    return [VSTART] + [token] * (t * (h // MERGE) * (w // MERGE)) + [VEND]


def _batch(rows: list[list[int]], side: str) -> tuple[np.ndarray, np.ndarray]:
    width = max(len(r) for r in rows)
    ids = np.zeros((len(rows), width), dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for i, r in enumerate(rows):
        sl = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[i, sl] = r
        mask[i, sl] = 1
    return ids, mask


def _compare(model, ids, *, image_grid=None, video_grid=None, seconds=None, mask=None):
    def tensor(x, dtype=torch.long):
        return None if x is None else torch.tensor(np.asarray(x), dtype=dtype)

    token_types = np.where(ids == IMAGE, 1, np.where(ids == VIDEO, 2, 0))
    with torch.no_grad():
        ref_pos, ref_delta = model.get_rope_index(
            tensor(ids),
            mm_token_type_ids=tensor(token_types, torch.int),
            image_grid_thw=tensor(image_grid),
            video_grid_thw=tensor(video_grid),
            second_per_grid_ts=tensor(seconds, torch.float32),
            attention_mask=tensor(mask),
        )
    pos, delta = get_rope_index(
        ids,
        image_token_id=IMAGE,
        video_token_id=VIDEO,
        spatial_merge_size=MERGE,
        tokens_per_second=model.config.vision_config.tokens_per_second,
        image_grid_thw=image_grid,
        video_grid_thw=video_grid,
        second_per_grid_ts=seconds,
        attention_mask=mask,
    )
    assert pos.dtype == np.int32 and pos.shape == (3, *ids.shape)
    assert delta.dtype == np.int32 and delta.shape == (ids.shape[0], 1)
    np.testing.assert_array_equal(pos, ref_pos.numpy())
    np.testing.assert_array_equal(delta, ref_delta.numpy())
    return pos, delta


def test_one_image(model):
    grid = (1, 6, 4)
    ids = np.array([_text(3) + _vision(IMAGE, grid) + _text(5, 1)])
    _compare(model, ids, image_grid=[grid])


def test_two_images_one_sample(model):
    grids = [(1, 4, 8), (1, 10, 2)]
    ids = np.array(
        [_text(2) + _vision(IMAGE, grids[0]) + _text(3, 1) + _vision(IMAGE, grids[1]) + _text(4, 2)]
    )
    _compare(model, ids, image_grid=grids)


@pytest.mark.parametrize("seconds", [0.5, 1.0, 0.7])
def test_video_t3(model, seconds):
    grid = (3, 4, 6)
    ids = np.array([_text(4) + _vision(VIDEO, grid) + _text(6, 1)])
    _compare(model, ids, video_grid=[grid], seconds=[seconds])


def test_video_default_seconds(model):
    grid = (3, 2, 2)
    ids = np.array([_text(2) + _vision(VIDEO, grid) + _text(2, 1)])
    _compare(model, ids, video_grid=[grid])


def test_image_and_video_one_sample(model):
    image_grid, video_grid = (1, 4, 4), (2, 6, 4)
    ids = np.array(
        [
            _text(3)
            + _vision(IMAGE, image_grid)
            + _text(2, 1)
            + _vision(VIDEO, video_grid)
            + _text(3, 2)
        ]
    )
    _compare(model, ids, image_grid=[image_grid], video_grid=[video_grid], seconds=[1.5])


@pytest.mark.parametrize("side", ["left", "right"])
def test_padded_batch_with_text_only_row(model, side):
    image_grids = [(1, 4, 6), (1, 2, 2), (1, 8, 4)]
    video_grids = [(2, 4, 4)]
    rows = [
        _text(3) + _vision(IMAGE, image_grids[0]) + _text(2, 1),
        _text(7, 2),  # text only
        _text(1, 3)
        + _vision(IMAGE, image_grids[1])
        + _text(1, 4)
        + _vision(IMAGE, image_grids[2])
        + _text(9, 5),
        _text(2, 6) + _vision(VIDEO, video_grids[0]),
    ]
    ids, mask = _batch(rows, side)
    pos, delta = _compare(
        model, ids, image_grid=image_grids, video_grid=video_grids, seconds=[0.5], mask=mask
    )
    real = mask[1].astype(bool)
    np.testing.assert_array_equal(pos[:, 1, real], np.broadcast_to(np.arange(7), (3, 7)))
    assert delta[1, 0] == 0
    assert np.all(pos[:, ~mask.astype(bool)] == 0)


def test_no_mask_equals_all_ones_mask(model):
    grid = (1, 4, 4)
    ids = np.array([_text(3) + _vision(IMAGE, grid), _vision(IMAGE, grid) + _text(3, 1)])
    _compare(model, ids, image_grid=[grid, grid])
    _compare(model, ids, image_grid=[grid, grid], mask=np.ones_like(ids))


def _kwargs(**overrides):
    kwargs = dict(
        image_token_id=IMAGE, video_token_id=VIDEO, spatial_merge_size=MERGE, tokens_per_second=2
    )
    kwargs.update(overrides)
    return kwargs


def test_run_length_mismatch_raises():
    ids = np.array([_text(2) + [IMAGE] * 5 + _text(2)])
    with pytest.raises(ValueError, match=r"5 tokens.*needs 6 tokens"):
        get_rope_index(ids, image_grid_thw=[(1, 4, 6)], **_kwargs())


def test_grid_count_mismatch_raises():
    ids = np.array([_text(2) + [IMAGE] * 4 + _text(2)])
    with pytest.raises(ValueError, match="only 1 image token run"):
        get_rope_index(ids, image_grid_thw=[(1, 4, 4), (1, 4, 4)], **_kwargs())
    with pytest.raises(ValueError, match="only 0 image grid"):
        get_rope_index(ids, **_kwargs())


def test_decode_positions_continue_prompt():
    grid = (1, 4, 6)
    rows = [_text(3) + _vision(IMAGE, grid) + _text(2, 1), _text(4, 2)]
    ids, mask = _batch(rows, "left")
    pos, delta = get_rope_index(ids, image_grid_thw=[grid], attention_mask=mask, **_kwargs())
    # The next token of each row sits at the index equal to its number of real tokens.
    next_text = mask.sum(axis=1, keepdims=True)
    step = decode_positions(delta, next_text)
    assert step.shape == (3, 2, 1)
    np.testing.assert_array_equal(step[:, :, 0], np.broadcast_to(pos.max(axis=(0, 2)) + 1, (3, 2)))
