"""Host-side index arrays for the Qwen2.5-VL vision tower's window attention.

The window permutation and the attention segments depend on the image/video
grids, so they are computed with NumPy outside jit and passed in as arrays.
Layout matches transformers' `get_vision_window_index`, `get_vision_cu_seqlens`
and `get_vision_position_ids` as used by
`Qwen2_5_VisionTransformerPretrainedModel.forward`:

* patches arrive grouped by merged token (`m*m` consecutive patches form one
  merged token), merged tokens row-major per frame, frames in order;
* the tower reorders merged tokens so that each window of
  `window_size // patch_size // m` merged tokens square is contiguous (windows
  row-major per frame, tokens row-major inside a window; edge windows are
  partial), runs all blocks in that order, and restores the order after the
  patch merger;
* windowed blocks attend within a window, full-attention blocks within a frame.
  Both segmentations are applied to the permuted sequence.
"""

from __future__ import annotations

import dataclasses

import numpy as np


@dataclasses.dataclass(frozen=True, eq=False)
class VisionLayout:
    """Index arrays for one packed batch of images/videos (see module docstring)."""

    window_index: (
        np.ndarray
    )  # [num_merged] int32: original merged-token index at each permuted slot
    reverse_index: np.ndarray  # [num_merged] int32: argsort(window_index), undoes the permutation
    rotary_positions: np.ndarray  # [num_patches, 2] int32: (h, w) patch coordinates, permuted order
    window_segment_ids: np.ndarray  # [num_patches] int32: window id per patch, permuted order
    frame_segment_ids: np.ndarray  # [num_patches] int32: frame id per patch, permuted order


def vision_layout(
    grid_thw: np.ndarray, *, spatial_merge_size: int, window_size: int, patch_size: int
) -> VisionLayout:
    """Build the window permutation, rotary positions and attention segments.

    `grid_thw` is [n, 3] (t, h, w in patches) in the order the entries are
    concatenated in pixel_values. Segment ids are dense (0, 1, ...) and never
    describe an empty segment.
    """
    grids = np.asarray(grid_thw, dtype=np.int64)
    if grids.ndim != 2 or grids.shape[1] != 3 or len(grids) == 0:
        raise ValueError(f"grid_thw must have shape [n, 3] with n >= 1, got {grids.shape}")
    m = spatial_merge_size
    if np.any(grids <= 0) or np.any(grids[:, 1:] % m):
        raise ValueError(
            f"grid t, h, w must be positive and h, w multiples of {m}, got {grids.tolist()}"
        )
    window = window_size // m // patch_size
    if window < 1:
        raise ValueError(
            f"window_size={window_size} is smaller than one merged token "
            f"({m} x {patch_size} pixels)"
        )

    orders, merged_h, merged_w, window_ids, frame_ids = [], [], [], [], []
    merged_offset = window_offset = frame_offset = 0
    for t, h, w in grids.tolist():
        lh, lw = h // m, w // m
        nh, nw = -(-lh // window), -(-lw // window)
        # Merged-token coordinates in original (frame, row, col) order.
        ti, hi, wi = (
            a.ravel()
            for a in np.meshgrid(np.arange(t), np.arange(lh), np.arange(lw), indexing="ij")
        )
        window_id = (ti * nh + hi // window) * nw + wi // window
        # Sort key: window first, then row-major inside the window.
        key = (window_id * window + hi % window) * window + wi % window
        order = np.argsort(key, kind="stable")
        orders.append(order + merged_offset)
        merged_h.append(hi)
        merged_w.append(wi)
        window_ids.append(window_id[order] + window_offset)
        frame_ids.append(ti[order] + frame_offset)
        merged_offset += t * lh * lw
        window_offset += t * nh * nw
        frame_offset += t

    window_index = np.concatenate(orders)
    # Windows are sorted and offset per entry, so inverse of unique gives dense ids in order.
    _, dense_windows = np.unique(np.concatenate(window_ids), return_inverse=True)
    unit = m * m
    inner_h, inner_w = np.divmod(np.arange(unit), m)
    rotary_h = np.concatenate(merged_h)[window_index][:, None] * m + inner_h
    rotary_w = np.concatenate(merged_w)[window_index][:, None] * m + inner_w
    return VisionLayout(
        window_index=window_index.astype(np.int32),
        reverse_index=np.argsort(window_index).astype(np.int32),
        rotary_positions=np.stack([rotary_h.ravel(), rotary_w.ravel()], axis=-1).astype(np.int32),
        window_segment_ids=np.repeat(dense_windows, unit).astype(np.int32),
        frame_segment_ids=np.repeat(np.concatenate(frame_ids), unit).astype(np.int32),
    )
