"""The Qwen2.5-VL vision tower: patch embedding, windowed ViT blocks with 2-D rotary, patch merger.

Everything that depends on the image sizes (window order, attention segments, rotary
coordinates) is computed on the host by `vision_layout` and passed in as arrays, so the tower
itself is one jit-able program over a packed sequence of patches from any number of images and
video frames.
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cpt_jax.sharding import constrain

from .config import VisionConfig
from .layers import (
    QUERY_CHUNK,
    Dense,
    RMSNorm,
    SwiGLU,
    apply_rotary,
    dot_product_attention,
    map_in_chunks,
    scan_layers,
    stack_layers,
)
from .vision_layout import VisionLayout, vision_layout

NORM_EPS = 1e-6  # fixed in transformers, not read from the config
PADDING_SEGMENT = -1  # the attention segment id of padding patches


# The packed patches' hidden states [patches, hidden] spread over the batch's devices under a
# mesh (cpt_jax.sharding.constrain): every device would otherwise run every image of the batch.
PATCH_AXES = ("batch", None)


class VisionInputs(NamedTuple):
    """Packed patches of all images/videos in a batch and their host-computed layout.

    pixel_values: [num_patches, patch_dim]; window_index, reverse_index: [num_patches / 4];
    rotary_positions: [num_patches, 2] (h, w); window_segment_ids, frame_segment_ids:
    [num_patches]. Index arrays are in window order, as the blocks see the tokens.
    """

    pixel_values: jax.Array
    window_index: jax.Array
    reverse_index: jax.Array
    rotary_positions: jax.Array
    window_segment_ids: jax.Array
    frame_segment_ids: jax.Array

    @classmethod
    def build(cls, pixel_values: np.ndarray, grid_thw: np.ndarray, config: VisionConfig,
              *, pad_to: int | None = None) -> VisionInputs:
        """Lays out the patches of `grid_thw`; `pad_to` pads them to a fixed count so that
        batches with different image sizes share one compiled program (padding patches form
        their own attention segment, id -1, and their features are never used)."""
        grid_thw = np.asarray(grid_thw, dtype=np.int64).reshape(-1, 3)
        expected = int(np.prod(grid_thw, axis=-1).sum())
        if pixel_values.shape != (expected, config.patch_dim):
            raise ValueError(
                f"pixel_values has shape {tuple(pixel_values.shape)} but grid_thw "
                f"{grid_thw.tolist()} needs ({expected}, {config.patch_dim})")
        layout: VisionLayout = vision_layout(
            grid_thw, spatial_merge_size=config.spatial_merge_size,
            window_size=config.window_size, patch_size=config.patch_size)
        arrays = [pixel_values, layout.window_index, layout.reverse_index,
                  layout.rotary_positions, layout.window_segment_ids, layout.frame_segment_ids]
        if pad_to is not None and pad_to != expected:
            arrays = _pad(arrays, expected, pad_to, config.merge_unit)
        return cls(*(jnp.asarray(a) for a in arrays))

    @classmethod
    def blank(cls, config: VisionConfig, *, pad_to: int) -> VisionInputs:
        """One black 2x2-patch image padded to `pad_to`: what a text-only micro-batch carries
        when it is stacked with image ones (no token reads its features)."""
        side = config.spatial_merge_size
        return cls.build(np.zeros((side * side, config.patch_dim), np.float32),
                         np.asarray([[1, side, side]]), config, pad_to=pad_to)


def _pad(arrays: list[np.ndarray], size: int, pad_to: int, unit: int) -> list[np.ndarray]:
    if pad_to < size or pad_to % unit:
        raise ValueError(f"pad_to={pad_to} must be >= the number of patches ({size}) and a "
                         f"multiple of {unit}")
    pixels, window_index, reverse_index, rotary, window_ids, frame_ids = arrays
    extra = pad_to - size
    merged_pad = np.arange(size // unit, pad_to // unit, dtype=np.int32)
    return [np.concatenate([pixels, np.zeros((extra, pixels.shape[1]), pixels.dtype)]),
            np.concatenate([window_index, merged_pad]),
            np.concatenate([reverse_index, merged_pad]),
            np.concatenate([rotary, np.zeros((extra, 2), rotary.dtype)]),
            np.concatenate([window_ids, np.full(extra, PADDING_SEGMENT, np.int32)]),
            np.concatenate([frame_ids, np.full(extra, PADDING_SEGMENT, np.int32)])]


class VisionAttention(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 max_frame_patches: int | None, rngs: nnx.Rngs):
        heads, head_dim = config.num_heads, config.head_dim
        self.qkv = Dense((config.hidden_size,), (3, heads, head_dim), in_axes=("vision_embed",),
                         out_axes=(None, "vision_heads", "head_dim"), use_bias=True, dtype=dtype,
                         param_dtype=param_dtype, rngs=rngs)
        self.proj = Dense((heads, head_dim), (config.hidden_size,),
                          in_axes=("vision_heads", "head_dim"), out_axes=("vision_embed",),
                          use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.window_tokens = config.window_patches
        self.max_frame_patches = max_frame_patches

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments: Segments,
                 full: jax.Array) -> jax.Array:
        """`full` (a traced bool) picks attention within each frame over attention within each
        window; only the chosen kind runs."""
        qkv = self.qkv(x)  # [n, 3, heads, head_dim]
        q, k, v = qkv[:, 0], qkv[:, 1], qkv[:, 2]
        # The 2-D rotary runs in fp32 whatever the compute dtype.
        q = apply_rotary(q.astype(jnp.float32), cos, sin).astype(x.dtype)
        k = apply_rotary(k.astype(jnp.float32), cos, sin).astype(x.dtype)
        out = jax.lax.cond(
            full,
            lambda: self.frame_attention(q, k, v, segments),
            lambda: blocked_segment_attention(q, k, v, segments.windows, self.window_tokens,
                                              segments.windows_in_blocks, reach=1))
        return self.proj(out)

    def frame_attention(self, q: jax.Array, k: jax.Array, v: jax.Array,
                        segments: Segments) -> jax.Array:
        """Attention within each frame: over neighbouring chunks when frames are known to be
        at most `max_frame_patches` long and that is cheaper, else over the whole sequence."""
        block = self.max_frame_patches
        if block is not None and 5 * -(-block // 2) < q.shape[0]:
            return blocked_segment_attention(q, k, v, segments.frames, block,
                                             segments.frames_in_blocks, reach=2)
        return segment_attention(q, k, v, segments.frames)


class Segments(NamedTuple):
    """Attention segment ids per token (window order), windows and frames, and whether each
    kind lies in blocks (`segments_in_blocks`) of the window and of `max_frame_patches`."""

    windows: jax.Array
    frames: jax.Array
    windows_in_blocks: jax.Array
    frames_in_blocks: jax.Array


def segments_in_blocks(ids: jax.Array, block: int) -> jax.Array:
    """True when no segment crosses a boundary between consecutive blocks of `block` tokens
    (padding, id -1, may): attention within each block then sees every segment whole."""
    bounds = np.arange(block, ids.shape[0], block)
    if not len(bounds):
        return jnp.asarray(True)
    after = ids[bounds]
    return ~jnp.any((after == ids[bounds - 1]) & (after != PADDING_SEGMENT))


def blocked_segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, ids: jax.Array,
                              block: int, in_blocks: jax.Array, reach: int) -> jax.Array:
    """Attention within segments of at most `block` tokens: within each block of `block`
    tokens when `in_blocks` (a traced bool, `segments_in_blocks`) holds, as when every image
    of a batch has the same size; else over neighbouring chunks (`local_segment_attention`
    with chunks of block / reach). Only the chosen form runs; the first computes the scores it
    keeps, the second (2 reach + 1) / reach times as many."""
    return jax.lax.cond(
        in_blocks,
        lambda: local_segment_attention(q, k, v, ids, block, reach=0),
        lambda: local_segment_attention(q, k, v, ids, -(-block // reach), reach=reach))


def segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, ids: jax.Array,
                      query_chunk: int = QUERY_CHUNK) -> jax.Array:
    """Attention between tokens of equal segment id, over the whole packed sequence.

    Past `query_chunk` tokens the queries go `query_chunk` at a time, each chunk's scores
    recomputed in the backward pass, so memory grows as n x query_chunk instead of n x n: the
    packed images of one GRPO micro-batch (8 images of 4,900 patches) would otherwise hold
    over 100 GB of scores per full-attention block on a 7B model's 16 heads.
    """
    def attend(queries: jax.Array, query_ids: jax.Array) -> jax.Array:
        mask = query_ids[:, None] == ids[None, :]
        return dot_product_attention(queries[None], k[None], v[None], mask[None])[0]

    return map_in_chunks(attend, (q, ids), query_chunk)


def local_segment_attention(q: jax.Array, k: jax.Array, v: jax.Array, ids: jax.Array,
                            chunk: int, reach: int = 1,
                            query_chunk: int = QUERY_CHUNK) -> jax.Array:
    """`segment_attention` for contiguous segments of at most `reach * chunk + 1` tokens.

    The sequence is cut into chunks of `chunk` tokens; a token's segment then lies within
    `reach` chunks on either side of its own, so each query chunk only needs those 2 * reach
    + 1 key chunks: cost n x (2 * reach + 1) * chunk instead of n x n, with the same result.
    Reach 0 is for segments that no chunk boundary cuts (`blocked_segment_attention`). Where
    the scores would outgrow `segment_attention`'s (query_chunk x n), the query chunks go a
    group at a time as there.
    """
    n = q.shape[0]
    n_chunks = -(-n // chunk)
    pad = n_chunks * chunk - n
    q, k, v = (jnp.pad(t, ((0, pad), (0, 0), (0, 0))) for t in (q, k, v))
    ids = jnp.pad(ids, (0, pad), constant_values=PADDING_SEGMENT - 1)  # no patch sees these

    def with_neighbours(t: jax.Array, fill: int) -> jax.Array:
        t = t.reshape(n_chunks, chunk, *t.shape[1:])
        t = jnp.pad(t, ((reach, reach),) + ((0, 0),) * (t.ndim - 1), constant_values=fill)
        return jnp.concatenate([t[i:i + n_chunks] for i in range(2 * reach + 1)], axis=1)

    def attend(queries: jax.Array, query_ids: jax.Array, keys: jax.Array, values: jax.Array,
               key_ids: jax.Array) -> jax.Array:
        mask = query_ids[:, :, None] == key_ids[:, None, :]
        return dot_product_attention(queries, keys, values, mask)

    out = map_in_chunks(attend, (q.reshape(n_chunks, chunk, *q.shape[1:]),
                                 ids.reshape(n_chunks, chunk), with_neighbours(k, 0),
                                 with_neighbours(v, 0), with_neighbours(ids, PADDING_SEGMENT - 2)),
                        max(1, query_chunk * n // (chunk * chunk * (2 * reach + 1))))
    return out.reshape(n_chunks * chunk, *out.shape[2:])[:n]


class VisionBlock(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 max_frame_patches: int | None, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = RMSNorm(config.hidden_size, eps=NORM_EPS, axis_name="vision_embed",
                             param_dtype=param_dtype)
        self.norm2 = RMSNorm(config.hidden_size, eps=NORM_EPS, axis_name="vision_embed",
                             param_dtype=param_dtype)
        self.attn = VisionAttention(config, max_frame_patches=max_frame_patches, **kw)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size,
                          axes=("vision_embed", "vision_mlp"), use_bias=True, **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, segments: Segments,
                 full: jax.Array) -> jax.Array:
        x = x + self.attn(self.norm1(x), cos, sin, segments, full)
        return x + self.mlp(self.norm2(x))


class PatchMerger(nnx.Module):
    """RMSNorm, then each 2x2 group of neighbouring patches -> Linear-GELU-Linear."""

    def __init__(self, config: VisionConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        merged = config.hidden_size * config.merge_unit
        kw = dict(use_bias=True, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.ln_q = RMSNorm(config.hidden_size, eps=NORM_EPS, axis_name="vision_embed",
                            param_dtype=param_dtype)
        self.fc1 = Dense((merged,), (merged,), in_axes=("vision_mlp",), out_axes=("vision_mlp",),
                         **kw)
        self.fc2 = Dense((merged,), (config.out_hidden_size,), in_axes=("vision_mlp",),
                         out_axes=("embed",), **kw)
        self.merged = merged

    def __call__(self, x: jax.Array) -> jax.Array:
        x = self.ln_q(x).reshape(-1, self.merged)
        return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class VisionTower(nnx.Module):
    def __init__(self, config: VisionConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 remat: bool, scan_layers: bool = True, max_frame_patches: int | None = None,
                 rngs: nnx.Rngs):
        """`max_frame_patches`, when given, promises that no frame (an image, or one temporal
        slice of a video) has more patches: full attention then costs O(n x frame) instead of
        O(n^2) over the n packed patches. `Qwen2_5_VL.prepare_inputs` enforces it."""
        self.config = config
        self.max_frame_patches = max_frame_patches
        self.dtype = dtype
        self.remat = remat
        self.scan = scan_layers
        self.patch_embed = Dense((config.patch_dim,), (config.hidden_size,), in_axes=(None,),
                                 out_axes=("vision_embed",), use_bias=False, dtype=dtype,
                                 param_dtype=param_dtype, rngs=rngs)
        self.blocks = stack_layers(
            lambda r: VisionBlock(config, dtype=dtype, param_dtype=param_dtype,
                                  max_frame_patches=max_frame_patches, rngs=r),
            config.depth, rngs)
        self.merger = PatchMerger(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def rotary(self, positions: jax.Array) -> tuple[jax.Array, jax.Array]:
        """cos/sin [n, 1, head_dim] for (h, w) coordinates, computed in fp32."""
        quarter = self.config.head_dim // 2
        inv_freq = 1.0 / (self.config.rope_theta
                          ** (jnp.arange(0, quarter, 2, dtype=jnp.float32) / quarter))
        freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [n, 2, head_dim/4]
        freqs = freqs.reshape(positions.shape[0], -1)  # (h freqs, w freqs)
        emb = jnp.concatenate([freqs, freqs], axis=-1)[:, None, :]
        return jnp.cos(emb), jnp.sin(emb)

    def __call__(self, inputs: VisionInputs) -> jax.Array:
        """Returns merged features [num_patches / 4, out_hidden_size] in the original order."""
        unit = self.config.merge_unit
        x = self.patch_embed(inputs.pixel_values)
        n, d = x.shape
        x = x.reshape(n // unit, unit, d)[inputs.window_index].reshape(n, d)
        cos, sin = self.rotary(inputs.rotary_positions)
        windows, frames = inputs.window_segment_ids, inputs.frame_segment_ids
        segments = Segments(
            windows, frames, segments_in_blocks(windows, self.config.window_patches),
            segments_in_blocks(frames, self.max_frame_patches or frames.shape[0]))

        def step(block, h, is_full):
            return constrain(block(h, cos, sin, segments, is_full), PATCH_AXES), None

        full_attention = np.isin(np.arange(self.config.depth), self.config.fullatt_block_indexes)
        x, _ = scan_layers(self.blocks, step, constrain(x, PATCH_AXES),
                           jnp.asarray(full_attention), remat=self.remat, scan=self.scan)
        merged = self.merger(x)
        return merged[inputs.reverse_index]
