"""Host-side 3-D multimodal RoPE (M-RoPE) positions for Qwen2.5-VL.

The positions depend on data (where the vision tokens are and how large each
image/video grid is), so they are computed with NumPy before the jitted model
runs. The layout matches transformers' `Qwen2_5_VLModel.get_rope_index`:

* text tokens advance all three axes (temporal, height, width) together by 1;
* a vision run of `t * (h/m) * (w/m)` tokens gets a (t, h, w) meshgrid offset by
  the current position, with the temporal axis scaled by
  `tokens_per_second * second_per_grid_ts` (videos only) and truncated to int;
* after a vision run the position advances by `max(h, w) / m` only (the temporal
  extent is not counted);
* `rope_delta = max(position) + 1 - num_real_tokens` per row, which is added to
  the 1-D text positions during cached decoding.
"""

from __future__ import annotations

import numpy as np

_TEXT, _IMAGE, _VIDEO = 0, 1, 2
_KIND_NAMES = {_IMAGE: "image", _VIDEO: "video"}


def _as_grids(grid_thw: np.ndarray | None) -> np.ndarray:
    if grid_thw is None:
        return np.zeros((0, 3), dtype=np.int64)
    grids = np.asarray(grid_thw, dtype=np.int64)
    if grids.ndim != 2 or grids.shape[1] != 3:
        raise ValueError(f"grid_thw must have shape [n, 3], got {grids.shape}")
    return grids


def _runs(token_type: np.ndarray) -> list[tuple[int, int, int]]:
    """Split a row into maximal runs of equal token type: (type, start, end)."""
    if token_type.size == 0:
        return []
    boundaries = np.flatnonzero(np.diff(token_type)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [token_type.size]])
    return [(int(token_type[s]), int(s), int(e)) for s, e in zip(starts, ends, strict=True)]


def _vision_positions(
    start: int, grid: np.ndarray, spatial_merge_size: int, time_interval: np.float32
) -> np.ndarray:
    """[3, t * h/m * w/m] positions of one image/video, in token (t, h, w row-major) order."""
    t, h, w = (int(x) for x in grid)
    # float32 product then truncation, as torch does with the processor's float32 seconds.
    temporal = (np.arange(t, dtype=np.float32) * time_interval).astype(np.int64) + start
    height = np.arange(h // spatial_merge_size, dtype=np.int64) + start
    width = np.arange(w // spatial_merge_size, dtype=np.int64) + start
    tt, hh, ww = np.meshgrid(temporal, height, width, indexing="ij")
    return np.stack([tt.ravel(), hh.ravel(), ww.ravel()])


def get_rope_index(
    input_ids: np.ndarray,
    *,
    image_token_id: int,
    video_token_id: int,
    spatial_merge_size: int,
    tokens_per_second: float,
    image_grid_thw: np.ndarray | None = None,
    video_grid_thw: np.ndarray | None = None,
    second_per_grid_ts: np.ndarray | None = None,
    attention_mask: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Compute M-RoPE positions and per-row decode deltas.

    A maximal run of image (video) tokens is one image (video); grids are
    consumed in order across the whole batch, row 0 first. Padding positions
    (attention_mask == 0) get position 0; a row with no real tokens gets delta 0.

    Returns:
        position_ids: [3, batch, seq] int32 (temporal, height, width).
        rope_deltas: [batch, 1] int32.
    """
    input_ids = np.asarray(input_ids)
    if input_ids.ndim != 2:
        raise ValueError(f"input_ids must have shape [batch, seq], got {input_ids.shape}")
    batch, seq = input_ids.shape
    if attention_mask is None:
        mask = np.ones((batch, seq), dtype=bool)
    else:
        mask = np.asarray(attention_mask).astype(bool)
        if mask.shape != input_ids.shape:
            raise ValueError(
                f"attention_mask shape {mask.shape} != input_ids shape {input_ids.shape}"
            )

    grids = {_IMAGE: _as_grids(image_grid_thw), _VIDEO: _as_grids(video_grid_thw)}
    num_videos = len(grids[_VIDEO])
    if second_per_grid_ts is None:
        seconds = np.ones(num_videos, dtype=np.float32)
    else:
        seconds = np.asarray(second_per_grid_ts, dtype=np.float32).reshape(-1)
        if seconds.size != num_videos:
            raise ValueError(
                f"second_per_grid_ts has {seconds.size} entries but video_grid_thw has {num_videos}"
            )
    consumed = {_IMAGE: 0, _VIDEO: 0}

    token_type = np.where(
        input_ids == image_token_id, _IMAGE, np.where(input_ids == video_token_id, _VIDEO, _TEXT)
    )
    position_ids = np.zeros((3, batch, seq), dtype=np.int32)
    rope_deltas = np.zeros((batch, 1), dtype=np.int32)

    for row in range(batch):
        row_types = token_type[row, mask[row]]
        chunks = []
        current = 0
        for kind, start, end in _runs(row_types):
            length = end - start
            if kind == _TEXT:
                chunks.append(np.broadcast_to(np.arange(current, current + length), (3, length)))
                current += length
                continue
            index = consumed[kind]
            name = _KIND_NAMES[kind]
            if index >= len(grids[kind]):
                raise ValueError(
                    f"row {row}: found {name} #{index} ({length} tokens at real position {start}) "
                    f"but only {len(grids[kind])} {name} grid(s) were given"
                )
            grid = grids[kind][index]
            t, h, w = (int(x) for x in grid)
            expected = t * (h // spatial_merge_size) * (w // spatial_merge_size)
            if length != expected:
                raise ValueError(
                    f"row {row}: {name} #{index} has {length} tokens at real position {start}, "
                    f"but its "
                    f"grid (t={t}, h={h}, w={w}) with spatial_merge_size={spatial_merge_size} "
                    f"needs {expected} tokens"
                )
            if kind == _VIDEO:
                interval = np.float32(tokens_per_second) * seconds[index]
            else:
                interval = np.float32(1.0)
            chunks.append(_vision_positions(current, grid, spatial_merge_size, interval))
            current += max(h, w) // spatial_merge_size
            consumed[kind] += 1
        if not chunks:
            continue
        row_positions = np.concatenate(chunks, axis=1)
        position_ids[:, row, mask[row]] = row_positions
        rope_deltas[row, 0] = row_positions.max() + 1 - row_positions.shape[1]

    for kind, grid in grids.items():
        if consumed[kind] != len(grid):
            name = _KIND_NAMES[kind]
            raise ValueError(
                f"{len(grid)} {name} grid(s) were given but only {consumed[kind]} {name} "
                f"token run(s) were found in input_ids"
            )
    return position_ids, rope_deltas


def decode_positions(rope_deltas: np.ndarray, text_positions: np.ndarray) -> np.ndarray:
    """[3, batch, seq] M-RoPE positions for tokens generated after the prompt.

    `text_positions` ([batch, seq] or [seq]) is the index of each new token among
    the row's real tokens, i.e. `cumsum(attention_mask) - 1`; without padding this
    is just the cache position. With left padding it is NOT the cache position:
    the deltas are relative to the unpadded row.
    """
    positions = np.asarray(text_positions) + np.asarray(rope_deltas).reshape(-1, 1)
    return np.broadcast_to(positions[None], (3, *positions.shape)).astype(np.int32)
