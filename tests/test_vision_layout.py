"""Compare the NumPy vision window layout against transformers' vision_utils helpers."""

from __future__ import annotations

import numpy as np
import pytest
import torch  # noqa: E402
from transformers import vision_utils  # noqa: E402

from cpt_jax.models.qwen2_5_vl.vision_layout import vision_layout  # noqa: E402

PATCH, MERGE = 14, 2
UNIT = MERGE * MERGE

# (grid_thw entries, window_size). Grid sides are in patches; merged-token sides are half that.
# With window 112 a window is 4x4 merged tokens (8 patches), with 56 it is 2x2 (4 patches).
FIXED_CASES = [
    ([(1, 2, 2)], 112),  # 1x1 merged tokens
    ([(1, 2, 2)], 56),
    ([(1, 8, 8)], 112),  # exactly one window: transformers pads a full extra window
    ([(1, 16, 24)], 112),  # multiples of the window on both sides
    ([(1, 16, 24)], 56),
    ([(1, 10, 14)], 112),  # partial edge windows
    ([(1, 10, 14)], 56),
    ([(2, 12, 8)], 112),  # video t=2
    ([(3, 6, 10)], 56),  # video t=3
    ([(1, 2, 2), (1, 8, 8), (2, 4, 6), (1, 18, 2)], 112),  # several entries at once
    ([(3, 4, 4), (1, 2, 2), (1, 6, 12)], 56),
]


def _random_cases(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    cases = []
    for _ in range(n):
        entries = [
            (
                int(rng.choice([1, 1, 2, 3])),
                2 * int(rng.integers(1, 15)),
                2 * int(rng.integers(1, 15)),
            )
            for _ in range(int(rng.integers(1, 5)))
        ]
        cases.append((entries, int(rng.choice([56, 112]))))
    return cases


CASES = FIXED_CASES + _random_cases(24)


def _segments_from_cu(cu: np.ndarray) -> np.ndarray:
    lengths = np.diff(cu)
    assert np.all(lengths > 0), f"reference has an empty segment: {cu}"
    return np.repeat(np.arange(len(lengths)), lengths)


def _same_partition(a: np.ndarray, b: np.ndarray) -> bool:
    return a.shape == b.shape and bool(
        np.array_equal(a[:, None] == a[None, :], b[:, None] == b[None, :])
    )


def _reference(grid: np.ndarray, window_size: int):
    grid_t = torch.tensor(grid, dtype=torch.long)
    window_index, cu_window = vision_utils.get_vision_window_index(
        grid_t, spatial_merge_size=MERGE, window_size=window_size, patch_size=PATCH
    )
    cu_frames = vision_utils.get_vision_cu_seqlens(grid_t)
    positions = vision_utils.get_vision_position_ids(grid_t, MERGE)
    # The model permutes cos/sin (computed from these positions) in groups of UNIT rows.
    num_patches = positions.shape[0]
    positions = positions.reshape(num_patches // UNIT, UNIT, -1)[window_index].reshape(
        num_patches, -1
    )
    return window_index.numpy(), cu_window.numpy(), cu_frames.numpy(), positions.numpy()


@pytest.mark.parametrize(("entries", "window_size"), CASES)
def test_matches_transformers(entries, window_size):
    grid = np.array(entries)
    ref_index, ref_cu_window, ref_cu_frames, ref_positions = _reference(grid, window_size)
    layout = vision_layout(
        grid, spatial_merge_size=MERGE, window_size=window_size, patch_size=PATCH
    )
    num_patches = int(np.prod(grid, axis=1).sum())

    for name in (
        "window_index",
        "reverse_index",
        "rotary_positions",
        "window_segment_ids",
        "frame_segment_ids",
    ):
        assert getattr(layout, name).dtype == np.int32, name
    np.testing.assert_array_equal(layout.window_index, ref_index)
    np.testing.assert_array_equal(layout.reverse_index, np.argsort(ref_index))
    np.testing.assert_array_equal(
        layout.window_index[layout.reverse_index], np.arange(num_patches // UNIT)
    )
    np.testing.assert_array_equal(layout.rotary_positions, ref_positions)

    assert ref_cu_window[-1] == num_patches and ref_cu_frames[-1] == num_patches
    assert _same_partition(layout.window_segment_ids, _segments_from_cu(ref_cu_window))
    assert _same_partition(layout.frame_segment_ids, _segments_from_cu(ref_cu_frames))
    # Dense ids, one per non-empty segment.
    for ids, cu in (
        (layout.window_segment_ids, ref_cu_window),
        (layout.frame_segment_ids, ref_cu_frames),
    ):
        np.testing.assert_array_equal(np.unique(ids), np.arange(len(cu) - 1))


@pytest.mark.parametrize(("entries", "window_size"), CASES[:12])
def test_frames_unchanged_by_window_permutation(entries, window_size):
    """The window permutation stays inside each frame, so frame segments are order-independent."""
    grid = np.array(entries)
    layout = vision_layout(
        grid, spatial_merge_size=MERGE, window_size=window_size, patch_size=PATCH
    )
    frame_of_merged = layout.frame_segment_ids[::UNIT]
    np.testing.assert_array_equal(frame_of_merged[layout.reverse_index], frame_of_merged)
    # Every window lies inside a single frame.
    for window in np.unique(layout.window_segment_ids):
        assert len(np.unique(layout.frame_segment_ids[layout.window_segment_ids == window])) == 1


def test_invalid_grid_raises():
    with pytest.raises(ValueError, match="multiples of 2"):
        vision_layout(
            np.array([(1, 3, 4)]), spatial_merge_size=MERGE, window_size=112, patch_size=PATCH
        )
    with pytest.raises(ValueError, match="smaller than one merged token"):
        vision_layout(
            np.array([(1, 4, 4)]), spatial_merge_size=MERGE, window_size=14, patch_size=PATCH
        )
