"""Qwen2.5-VL for conditional generation: vision tower + text decoder + language-model head.

Two levels of API:
- `forward(...)` is the jit-able core: every input is an array of static shape (token ids, 3-D
  positions, mask, packed patches with their layout, an optional KV cache).
- `__call__`, `prefill` and `decode` are the convenient host-side entry points: they compute
  the M-RoPE positions and the vision layout in NumPy, check that image tokens and image
  features agree, then call `forward`.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from .config import Qwen2_5_VLConfig
from .layers import make_param, matmul_flat
from .rope_index import get_rope_index
from .text import GroupCache, KVCache, PromptKV, TextDecoder
from .vision import VisionInputs, VisionTower


class Qwen2_5_VL(nnx.Module):
    def __init__(self, config: Qwen2_5_VLConfig, *, dtype: jnp.dtype = jnp.float32,
                 param_dtype: jnp.dtype = jnp.float32, remat: bool = False,
                 scan_layers: bool = True, max_frame_patches: int | None = None,
                 rngs: nnx.Rngs | None = None):
        """`dtype` is the compute dtype, `param_dtype` the storage dtype of the parameters;
        `remat` recomputes each layer in the backward pass instead of storing it;
        `scan_layers=False` unrolls the layer loops (faster train steps and decoding on a CPU,
        longer compiles; the KV cache is then one array per layer);
        `max_frame_patches` bounds the patches of any one frame, which lets the vision tower's
        full attention skip the other frames (`VisionTower`); None attends over all."""
        rngs = rngs if rngs is not None else nnx.Rngs(0)
        self.config = config
        self.dtype = dtype
        self.visual = VisionTower(config.vision, dtype=dtype, param_dtype=param_dtype,
                                  remat=remat, scan_layers=scan_layers,
                                  max_frame_patches=max_frame_patches, rngs=rngs)
        self.language_model = TextDecoder(config.text, dtype=dtype, param_dtype=param_dtype,
                                          remat=remat, scan_layers=scan_layers, rngs=rngs)
        self.lm_head = (None if config.tie_word_embeddings else
                        make_param(rngs, (config.text.hidden_size, config.text.vocab_size),
                                   ("embed", "vocab"), param_dtype))

    # ----------------------------------------------------------------- jit-able core
    def forward(self, input_ids: jax.Array, positions: jax.Array, attention_mask: jax.Array,
                vision: VisionInputs | None = None, cache: KVCache | GroupCache | None = None,
                layers: list[nnx.Module] | None = None
                ) -> tuple[jax.Array, KVCache | GroupCache | None]:
        """input_ids [b, s] int, positions [3, b, s] int, attention_mask [b, s] (1 = real).

        `vision` packs the patches of all images (first) and then all videos of the batch;
        their merged features replace the image / video placeholder tokens in row-major order.
        `layers`: `decoder_layers()`, split once for many cached calls of an unrolled model.
        Returns float32 logits [b, s, vocab] and the updated cache (None without one).
        """
        hidden, cache = self.hidden_states(input_ids, positions, attention_mask, vision, cache,
                                           layers)
        return self.logits(hidden), cache

    def hidden_states(self, input_ids: jax.Array, positions: jax.Array,
                      attention_mask: jax.Array, vision: VisionInputs | None = None,
                      cache: KVCache | GroupCache | None = None,
                      layers: list[nnx.Module] | None = None, *,
                      prefix: PromptKV | None = None, keep_kv: bool = False
                      ) -> tuple[jax.Array, KVCache | GroupCache | PromptKV | None]:
        """`forward` without the language-model head: the final-normed hidden states
        [b, s, hidden]. Callers that need a few positions' logits (a prefill needs the last)
        apply `logits` to those, instead of materialising [b, s, vocab] in float32.
        `prefix` and `keep_kv`: a group's answers after their prompt without a cache
        (`TextDecoder`)."""
        embeds = self.language_model.embed(input_ids)
        if vision is not None:
            embeds = self._insert_vision_features(input_ids, embeds, self.visual(vision))
        return self.language_model(embeds, positions, attention_mask, cache, layers,
                                   prefix=prefix, keep_kv=keep_kv)

    def decoder_layers(self) -> list[nnx.Module] | None:
        """The text layers split out of their stacks once, for a decode loop to pass to every
        step (`TextDecoder.unrolled_layers`); None for a scanned model."""
        return self.language_model.unrolled_layers()

    def logits(self, hidden: jax.Array) -> jax.Array:
        """float32 logits [..., vocab] of hidden states [..., hidden]."""
        if self.lm_head is None:
            kernel = self.language_model.embed_tokens[...].T
        else:
            kernel = self.lm_head[...]
        return matmul_flat(hidden, kernel.astype(self.dtype),
                           preferred_element_type=jnp.float32).astype(jnp.float32)

    def _insert_vision_features(self, input_ids: jax.Array, embeds: jax.Array,
                                features: jax.Array) -> jax.Array:
        is_image = (input_ids == self.config.image_token_id).reshape(-1)
        is_video = (input_ids == self.config.video_token_id).reshape(-1)
        image_rank = jnp.cumsum(is_image) - 1
        video_rank = jnp.sum(is_image) + jnp.cumsum(is_video) - 1
        index = jnp.where(is_image, image_rank, jnp.where(is_video, video_rank, 0))
        gathered = features.astype(embeds.dtype)[jnp.clip(index, 0, features.shape[0] - 1)]
        flat = embeds.reshape(-1, embeds.shape[-1])
        flat = jnp.where((is_image | is_video)[:, None], gathered, flat)
        return flat.reshape(embeds.shape)

    # ----------------------------------------------------------------- host-side entry points
    def __call__(self, input_ids, *, attention_mask=None, pixel_values=None, image_grid_thw=None,
                 pixel_values_videos=None, video_grid_thw=None, second_per_grid_ts=None,
                 position_ids=None) -> jax.Array:
        """Logits [batch, seq, vocab] (float32).

        input_ids: [batch, seq] int. attention_mask: [batch, seq], 1 for real tokens and 0 for
        padding (left or right). pixel_values: [num_image_patches, 1176], the patches of every
        image in the batch, in the order the images appear (row-major); image_grid_thw:
        [num_images, 3]. pixel_values_videos / video_grid_thw: the same for videos, and
        second_per_grid_ts: [num_videos] seconds per temporal patch. position_ids: [3, batch,
        seq] M-RoPE positions (or [batch, seq] for text positions); computed when omitted.
        """
        ids, positions, mask, vision, _ = self.prepare_inputs(
            input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
            image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
            position_ids=position_ids)
        logits, _ = self.forward(ids, positions, mask, vision)
        return logits

    def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype | None = None) -> KVCache:
        return self.language_model.init_cache(batch, max_len, dtype or self.dtype)

    def prefill(self, input_ids, *, max_len: int, attention_mask=None, pixel_values=None,
                image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                second_per_grid_ts=None, position_ids=None) -> tuple[jax.Array, KVCache]:
        """Runs the prompt into a new cache of `max_len` slots; returns (logits, cache).

        Pad prompts on the left so that every row's next token goes into the same slot.
        """
        ids, positions, mask, vision, _ = self.prepare_inputs(
            input_ids, attention_mask=attention_mask, pixel_values=pixel_values,
            image_grid_thw=image_grid_thw, pixel_values_videos=pixel_values_videos,
            video_grid_thw=video_grid_thw, second_per_grid_ts=second_per_grid_ts,
            position_ids=position_ids)
        if ids.shape[1] > max_len:
            raise ValueError(f"prompt length {ids.shape[1]} exceeds the cache size {max_len}")
        cache = self.init_cache(ids.shape[0], max_len)
        return self.forward(ids, positions, mask, vision, cache)

    def decode(self, token_ids: jax.Array, cache: KVCache | GroupCache,
               layers: list[nnx.Module] | None = None
               ) -> tuple[jax.Array, KVCache | GroupCache]:
        """Appends text tokens [batch, n]; returns (logits [batch, n, vocab], cache). A loop
        of decode calls passes `layers=decoder_layers()`, split before the loop."""
        token_ids = jnp.asarray(token_ids)
        steps = token_ids.shape[1]
        positions = cache.next_position[:, None] + jnp.arange(steps, dtype=jnp.int32)
        positions = jnp.broadcast_to(positions[None], (3, *positions.shape))
        mask = jnp.ones(token_ids.shape, bool)
        return self.forward(token_ids, positions, mask, None, cache, layers)

    def prepare_inputs(self, input_ids, *, attention_mask=None, pixel_values=None,
                       image_grid_thw=None, pixel_values_videos=None, video_grid_thw=None,
                       second_per_grid_ts=None, position_ids=None, pad_patches_to=None):
        """Host-side preparation: returns (input_ids, positions [3,b,s], attention_mask,
        VisionInputs or None, rope_deltas [b,1]) as arrays ready for `forward`.

        `pad_patches_to` pads the packed patches to a fixed count (static shapes under jit).
        """
        cfg = self.config
        ids = np.asarray(input_ids)
        if ids.ndim != 2:
            raise ValueError(f"input_ids must be [batch, seq], got shape {ids.shape}")
        mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask)
        if mask.shape != ids.shape:
            raise ValueError(f"attention_mask shape {mask.shape} != input_ids shape {ids.shape}")
        mask = mask.astype(bool)
        real_ids = np.where(mask, ids, -1)
        image_grid = _grid(image_grid_thw)
        video_grid = _grid(video_grid_thw)
        merge = cfg.vision.merge_unit
        for name, token_id, grid, pixels in (
                ("image", cfg.image_token_id, image_grid, pixel_values),
                ("video", cfg.video_token_id, video_grid, pixel_values_videos)):
            n_tokens = int((real_ids == token_id).sum())
            n_features = int(grid.prod(axis=-1).sum()) // merge
            if (pixels is None) != (len(grid) == 0):
                raise ValueError(f"pass pixel_values for {name}s together with their grid_thw")
            bound, frames = self.visual.max_frame_patches, grid[:, 1:].prod(axis=-1)
            if bound is not None and len(grid) and frames.max() > bound:
                raise ValueError(
                    f"{name} grid {grid[frames.argmax()].tolist()} has {frames.max()} patches per "
                    f"frame, more than the model's max_frame_patches ({bound}): raise "
                    f"max_frame_patches or lower max_pixels")
            if n_tokens != n_features:
                raise ValueError(
                    f"{name} tokens and {name} features do not match: the input holds "
                    f"{n_tokens} {name} tokens (id {token_id}) but the {name} grids "
                    f"{grid.tolist()} give {n_features} merged patches")
        if position_ids is None:
            positions, deltas = get_rope_index(
                ids, image_token_id=cfg.image_token_id, video_token_id=cfg.video_token_id,
                spatial_merge_size=cfg.vision.spatial_merge_size,
                tokens_per_second=cfg.vision.tokens_per_second,
                image_grid_thw=image_grid if len(image_grid) else None,
                video_grid_thw=video_grid if len(video_grid) else None,
                second_per_grid_ts=second_per_grid_ts, attention_mask=mask)
        else:
            positions = np.asarray(position_ids)
            if positions.ndim == 2:
                positions = np.broadcast_to(positions[None], (3, *positions.shape))
            if positions.shape != (3, *ids.shape):
                raise ValueError(f"position_ids shape {positions.shape} must be [3, batch, seq] "
                                 f"= {(3, *ids.shape)}")
            deltas = (positions.max(axis=(0, 2)) + 1 - mask.sum(-1))[:, None]
        vision = None
        pixel_parts = [np.asarray(p) for p in (pixel_values, pixel_values_videos) if p is not None]
        if pixel_parts:
            vision = VisionInputs.build(np.concatenate(pixel_parts, axis=0),
                                        np.concatenate([image_grid, video_grid], axis=0),
                                        cfg.vision, pad_to=pad_patches_to)
        return (jnp.asarray(ids, jnp.int32), jnp.asarray(positions, jnp.int32),
                jnp.asarray(mask), vision, np.asarray(deltas))


def _grid(grid_thw) -> np.ndarray:
    if grid_thw is None:
        return np.zeros((0, 3), np.int64)
    return np.asarray(grid_thw, np.int64).reshape(-1, 3)
