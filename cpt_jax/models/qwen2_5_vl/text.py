"""The Qwen2 text decoder with multimodal rotary (M-RoPE), scanned layers and a KV cache."""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from cpt_jax.sharding import constrain

from .config import TextConfig
from .layers import (
    Dense,
    RMSNorm,
    SwiGLU,
    apply_rotary,
    chunked_attention,
    make_param,
    scan_layers,
    shared_prefix_attention,
    stack_layers,
    unstack_layers,
)

# Logical axes of the hidden states [b, s, hidden], of the stacked cache
# [layers, b, slots, kv_heads, head_dim] and of one layer's cache [b, kv_heads, slots,
# head_dim], pinned under a mesh (cpt_jax.sharding.constrain).
ACTIVATION_AXES = ("batch", None, None)
CACHE_AXES = (None, "batch", None, "kv_heads", None)
LAYER_CACHE_AXES = ("batch", "kv_heads", None, None)
LAYER_KV_AXES = CACHE_AXES[1:]  # one layer's keys or values [b, s, kv_heads, head_dim]


class KVCache(NamedTuple):
    """Keys and values of every layer, with what decoding needs to continue.

    k, v: [layers, batch, max_len, kv_heads, head_dim] for the scanned decoder, or a tuple of
    one [batch, kv_heads, max_len, head_dim] array per layer for the unrolled one (heads
    before slots: attention's products read it as it is, where XLA's CPU backend
    transpose-copied the slot-major cache twice per layer and step, a quarter of the step); valid:
    [batch, max_len], True where a slot holds a real (not padding) token; index: the next slot
    to write (rows are aligned: left padding keeps every row's last prompt token in the same
    slot); next_position: [batch], the M-RoPE position of the next token (text tokens use one
    position on all three streams).
    """

    k: jax.Array | tuple[jax.Array, ...]
    v: jax.Array | tuple[jax.Array, ...]
    valid: jax.Array
    index: jax.Array
    next_position: jax.Array

    @classmethod
    def init(cls, config: TextConfig, batch: int, max_len: int, dtype: jnp.dtype, *,
             per_layer: bool = False) -> KVCache:
        heads, head_dim = config.num_key_value_heads, config.head_dim
        if per_layer:
            k, v = (tuple(jnp.zeros((batch, heads, max_len, head_dim), dtype)
                          for _ in range(config.num_hidden_layers)) for _ in range(2))
        else:
            k, v = (jnp.zeros((config.num_hidden_layers, batch, max_len, heads, head_dim), dtype)
                    for _ in range(2))
        return cls(k, v, jnp.zeros((batch, max_len), bool), jnp.zeros((), jnp.int32),
                   jnp.zeros((batch,), jnp.int32))

    @property
    def per_layer(self) -> bool:
        return isinstance(self.k, tuple)

    def logical_axes(self) -> KVCache:
        """The logical axis names of each array, in the cache's own structure."""
        kv = tuple(LAYER_CACHE_AXES for _ in self.k) if self.per_layer else CACHE_AXES
        return KVCache(kv, kv, ("batch", None), (), ("batch",))


class GroupCache(NamedTuple):
    """A rollout's cache: each prompt's keys and values once, from its prefill (`prompt`, one
    row per prompt), and each answer's own (`answers`, `group_size` rows per prompt,
    prompt-major). Attention reads the prompt's part once per group
    (`shared_prefix_attention`) where a cache repeated per answer was read, and stored, once
    per answer."""

    prompt: KVCache
    answers: KVCache

    @classmethod
    def after_prefill(cls, prompt: KVCache, group_size: int, answer_len: int) -> GroupCache:
        """`prompt` (a filled prefill cache) with room for `answer_len` tokens of each of
        `group_size` answers per prompt, whose positions continue the prompt's."""
        rows = prompt.valid.shape[0] * group_size
        if prompt.per_layer:  # [b, kv_heads, slots, d] per layer
            k, v = (tuple(jnp.zeros((rows, x.shape[1], answer_len, x.shape[3]), x.dtype)
                          for x in stack) for stack in (prompt.k, prompt.v))
        else:  # [layers, b, slots, kv_heads, d]
            k, v = (jnp.zeros((x.shape[0], rows, answer_len, *x.shape[3:]), x.dtype)
                    for x in (prompt.k, prompt.v))
        answers = KVCache(k, v, jnp.zeros((rows, answer_len), bool), jnp.zeros((), jnp.int32),
                          jnp.repeat(prompt.next_position, group_size, axis=0))
        return cls(prompt, answers)

    @property
    def per_layer(self) -> bool:
        return self.answers.per_layer

    @property
    def next_position(self) -> jax.Array:
        return self.answers.next_position

    def logical_axes(self) -> GroupCache:
        """The logical axis names of each array, in the cache's own structure."""
        return GroupCache(self.prompt.logical_axes(), self.answers.logical_axes())


class PromptKV(NamedTuple):
    """The keys and values of prompts from an uncached pass (`TextDecoder(..., keep_kv=True)`),
    for a pass of their answers to attend over (`prefix=`) as `GroupCache` lets a decode step:
    k, v [layers, prompts, len, kv_heads, head_dim] (rotated), valid [prompts, len] (True =
    a real token), next_position [prompts] (the M-RoPE position after the prompt).

    Made for the training passes of GRPO: the answers' pass takes layer l's slices as layer
    l's scan input. A cache carried through the layer scan instead is saved once per layer for
    the gradient, the layer count times its size (5 GiB per chip for the 3B model's 4,096-token
    prompt, the most of its GRPO update's growth)."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array
    next_position: jax.Array


class SharedPrefix(NamedTuple):
    """One layer's part of a `PromptKV`: what that layer's answer queries attend over besides
    their own keys (`shared_prefix_attention`)."""

    k: jax.Array
    v: jax.Array
    valid: jax.Array


class CacheSlot(NamedTuple):
    """The cache as it passes through one layer, and where that layer writes: the whole
    stacked cache and the layer's index in it (scanned), or the layer's own arrays (`layer`
    None, unrolled). With a `GroupCache`, `prompt` is its prompt part in the same layout
    (stacked or this layer's), which the layer reads and never writes.

    Carrying the stacked arrays through the layer scan and writing only the new tokens keeps
    the update in place, instead of rebuilding the cache from per-layer outputs every step.
    """

    k: jax.Array
    v: jax.Array
    layer: jax.Array | None
    index: jax.Array
    prompt: KVCache | None = None


def mrope_cos_sin(positions: jax.Array, config: TextConfig,
                  dtype: jnp.dtype) -> tuple[jax.Array, jax.Array]:
    """cos/sin [batch, seq, 1, head_dim] from 3-D positions [3, batch, seq].

    The rotary frequencies are split into `mrope_section` chunks that read the temporal, height
    and width position streams in turn.
    """
    half = config.head_dim // 2
    exponents = jnp.arange(0, half, dtype=jnp.float32) * 2 / config.head_dim
    inv_freq = 1.0 / (config.rope_theta**exponents)
    freqs = positions.astype(jnp.float32)[..., None] * inv_freq  # [3, b, s, half]
    stream = jnp.repeat(jnp.arange(3), jnp.asarray(config.mrope_section),
                        total_repeat_length=half)
    freqs = jnp.take_along_axis(freqs, stream[None, None, None, :], axis=0)[0]
    emb = jnp.concatenate([freqs, freqs], axis=-1)[:, :, None, :]
    return jnp.cos(emb).astype(dtype), jnp.sin(emb).astype(dtype)


class Attention(nnx.Module):
    def __init__(self, config: TextConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        h, hd = config.hidden_size, config.head_dim
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.q_proj = Dense((h,), (config.num_attention_heads, hd), in_axes=("embed",),
                            out_axes=("heads", "head_dim"), use_bias=True, **kw)
        self.k_proj = Dense((h,), (config.num_key_value_heads, hd), in_axes=("embed",),
                            out_axes=("kv_heads", "head_dim"), use_bias=True, **kw)
        self.v_proj = Dense((h,), (config.num_key_value_heads, hd), in_axes=("embed",),
                            out_axes=("kv_heads", "head_dim"), use_bias=True, **kw)
        self.o_proj = Dense((config.num_attention_heads, hd), (h,), in_axes=("heads", "head_dim"),
                            out_axes=("embed",), use_bias=False, **kw)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 slot: CacheSlot | None, prefix: SharedPrefix | None = None
                 ) -> tuple[jax.Array, CacheSlot | tuple[jax.Array, jax.Array]]:
        """Returns the output and the updated `slot`, or without one this pass's own keys and
        values [b, s, kv_heads, head_dim]. Without a slot, the queries attend over their own
        keys and, with a `prefix`, over their prompt's (rows prompt-major, as in
        `GroupCache`)."""
        q = apply_rotary(self.q_proj(x), cos, sin)
        k = apply_rotary(self.k_proj(x), cos, sin)
        v = self.v_proj(x)
        if slot is not None and slot.layer is None:  # one layer's [b, kv_heads, slots, d]
            start = (0, 0, slot.index, 0)
            all_k, all_v = (jax.lax.dynamic_update_slice(
                cached, jnp.swapaxes(new, 1, 2).astype(cached.dtype), start)
                for cached, new in ((slot.k, k), (slot.v, v)))
            slot = slot._replace(k=all_k, v=all_v)
            return self.o_proj(_cached_attention(q, all_k, all_v, mask, slot.prompt, None,
                                                 heads_major=True)), slot
        if slot is not None:
            start = (slot.layer, 0, slot.index, 0, 0)
            all_k = jax.lax.dynamic_update_slice(slot.k, k[None].astype(slot.k.dtype), start)
            all_v = jax.lax.dynamic_update_slice(slot.v, v[None].astype(slot.v.dtype), start)
            slot = slot._replace(k=all_k, v=all_v)
            return self.o_proj(_cached_attention(q, all_k[slot.layer], all_v[slot.layer], mask,
                                                 slot.prompt, slot.layer)), slot
        if prefix is not None:
            return self.o_proj(shared_prefix_attention(q, k, v, mask, prefix.k, prefix.v,
                                                       prefix.valid)), (k, v)
        return self.o_proj(chunked_attention(q, k, v, mask)), (k, v)


def _cached_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array,
                      prompt: KVCache | None, layer: jax.Array | None,
                      heads_major: bool = False) -> jax.Array:
    """Attention over one layer's cache, and over the group's shared prompt part when there
    is one (`layer` picks it from a stacked prompt cache; None: `prompt` holds this layer's
    arrays)."""
    k, v = k.astype(q.dtype), v.astype(q.dtype)
    if prompt is None:
        return chunked_attention(q, k, v, mask, heads_major=heads_major)
    prefix_k, prefix_v = (prompt.k, prompt.v) if layer is None else (prompt.k[layer],
                                                                     prompt.v[layer])
    return shared_prefix_attention(q, k, v, mask, prefix_k.astype(q.dtype),
                                   prefix_v.astype(q.dtype), prompt.valid, heads_major)


class DecoderLayer(nnx.Module):
    def __init__(self, config: TextConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 rngs: nnx.Rngs):
        norm = dict(eps=config.rms_norm_eps, axis_name="embed", param_dtype=param_dtype)
        self.input_layernorm = RMSNorm(config.hidden_size, **norm)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, **norm)
        self.self_attn = Attention(config, dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.mlp = SwiGLU(config.hidden_size, config.intermediate_size, axes=("embed", "mlp"),
                          use_bias=False, dtype=dtype, param_dtype=param_dtype, rngs=rngs)

    def __call__(self, x: jax.Array, cos: jax.Array, sin: jax.Array, mask: jax.Array,
                 slot: CacheSlot | None, prefix: SharedPrefix | None = None
                 ) -> tuple[jax.Array, CacheSlot | tuple[jax.Array, jax.Array]]:
        attn, slot = self.self_attn(self.input_layernorm(x), cos, sin, mask, slot, prefix)
        x = x + attn
        return x + self.mlp(self.post_attention_layernorm(x)), slot


class TextDecoder(nnx.Module):
    def __init__(self, config: TextConfig, *, dtype: jnp.dtype, param_dtype: jnp.dtype,
                 remat: bool, scan_layers: bool = True, rngs: nnx.Rngs):
        self.config = config
        self.dtype = dtype
        self.remat = remat
        self.scan = scan_layers
        self.embed_tokens = make_param(rngs, (config.vocab_size, config.hidden_size),
                                       ("vocab", "embed"), param_dtype)
        self.layers = stack_layers(
            lambda r: DecoderLayer(config, dtype=dtype, param_dtype=param_dtype, rngs=r),
            config.num_hidden_layers, rngs)
        self.norm = RMSNorm(config.hidden_size, eps=config.rms_norm_eps, axis_name="embed",
                            param_dtype=param_dtype)

    def embed(self, input_ids: jax.Array) -> jax.Array:
        return self.embed_tokens[...][input_ids].astype(self.dtype)

    def init_cache(self, batch: int, max_len: int, dtype: jnp.dtype) -> KVCache:
        """An empty cache in the layout this decoder's cached passes use: one array per layer
        when the layers are unrolled, stacked when they are scanned."""
        return KVCache.init(self.config, batch, max_len, dtype, per_layer=not self.scan)

    def unrolled_layers(self) -> list[DecoderLayer] | None:
        """The layers as separate modules for the unrolled cached pass (None when scanned).

        A decode loop calls this once, outside the loop, and passes the result to every step:
        split inside the loop, XLA's CPU backend copies every weight out of its stack at each
        step (the sampler ran 12 % slower than scanned)."""
        return None if self.scan else unstack_layers(self.layers)

    def __call__(self, embeds: jax.Array, positions: jax.Array, attention_mask: jax.Array,
                 cache: KVCache | GroupCache | None = None,
                 layers: list[DecoderLayer] | None = None, *, prefix: PromptKV | None = None,
                 keep_kv: bool = False
                 ) -> tuple[jax.Array, KVCache | GroupCache | PromptKV | None]:
        """embeds [b, s, hidden], positions [3, b, s], attention_mask [b, s] (True = real token).

        Without a cache, attention is causal over this sequence. With one, this sequence's keys
        and values are written at `cache.index` and the queries see every valid earlier slot;
        a per-layer cache runs the layers unrolled, `layers` (`unrolled_layers()`) or else
        this call's own split of the stacks. With a `GroupCache` (rows = its answer rows),
        they are written to the answers' part, and the queries also see their prompt's whole
        valid part. Returns the final-normed hidden states
        [b, s, hidden] and the updated cache.

        Without a cache, `keep_kv` returns this pass's keys and values as a `PromptKV` in the
        cache's place, and `prefix` (a `PromptKV` of this batch's prompts, rows prompt-major)
        lets the queries also see their prompt's: a group's answers after their prompt, as
        with a `GroupCache`, with nothing carried through the layers (the training passes).
        """
        seq = embeds.shape[1]
        embeds = constrain(embeds, ACTIVATION_AXES)
        attention_mask = attention_mask.astype(bool)
        cos, sin = mrope_cos_sin(positions, self.config, self.dtype)
        if cache is None:
            causal = jnp.tril(jnp.ones((seq, seq), bool))
            mask = causal[None] & attention_mask[:, None, :]

            def step(layer, x, prefix_kv):
                shared = None if prefix is None else SharedPrefix(*prefix_kv, prefix.valid)
                x, (k, v) = layer(x, cos, sin, mask, None, shared)
                kv = ((constrain(k, LAYER_KV_AXES), constrain(v, LAYER_KV_AXES)) if keep_kv
                      else None)
                return constrain(x, ACTIVATION_AXES), kv

            x, kv = scan_layers(self.layers, step, embeds,
                                None if prefix is None else (prefix.k, prefix.v),
                                remat=self.remat, scan=self.scan)
            if not keep_kv:
                return self.norm(x), None
            return self.norm(x), PromptKV(*kv, attention_mask,
                                          _next_position(positions, attention_mask))

        group = cache if isinstance(cache, GroupCache) else None
        prompt, cache = (group.prompt, group.answers) if group else (None, cache)
        index = cache.index
        valid = jax.lax.dynamic_update_slice(cache.valid, attention_mask, (0, index))
        slots = jnp.arange(valid.shape[1])
        mask = (slots[None, :] <= index + jnp.arange(seq)[:, None])[None] & valid[:, None, :]

        if cache.per_layer:
            x, ks, vs = embeds, [], []
            prompts = (zip(prompt.k, prompt.v, strict=True) if prompt
                       else [(None, None)] * len(cache.k))
            for layer, k, v, (prompt_k, prompt_v) in zip(
                    layers or unstack_layers(self.layers), cache.k, cache.v, prompts, strict=True):
                shared = prompt._replace(k=prompt_k, v=prompt_v) if prompt else None
                x, slot = layer(x, cos, sin, mask, CacheSlot(k, v, None, index, shared))
                x = constrain(x, ACTIVATION_AXES)
                ks.append(constrain(slot.k, LAYER_CACHE_AXES))
                vs.append(constrain(slot.v, LAYER_CACHE_AXES))
            k, v = tuple(ks), tuple(vs)
        else:
            def cached_step(layer, carry, layer_index):
                x, k, v = carry
                x, slot = layer(x, cos, sin, mask, CacheSlot(k, v, layer_index, index, prompt))
                return (constrain(x, ACTIVATION_AXES), constrain(slot.k, CACHE_AXES),
                        constrain(slot.v, CACHE_AXES)), None

            layer_indices = jnp.arange(self.config.num_hidden_layers)
            (x, k, v), _ = scan_layers(self.layers, cached_step, (embeds, cache.k, cache.v),
                                       layer_indices, remat=self.remat)
        cache = KVCache(k, v, valid, index + seq,
                        jnp.maximum(_next_position(positions, attention_mask),
                                    cache.next_position))
        if group:
            cache = GroupCache(prompt, cache)
        return self.norm(x), cache


def _next_position(positions: jax.Array, attention_mask: jax.Array) -> jax.Array:
    """[b]: the M-RoPE position after each row's last real token (0 for a row with none)."""
    return jnp.max(jnp.where(attention_mask, positions.max(axis=0), -1), axis=-1) + 1
