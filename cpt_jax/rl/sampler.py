"""The rollout sampler: a group of answers per prompt from one prefill and a KV-cache decode loop.

One `jax.jit` runs a whole rollout batch with static shapes: the left-padded prompts (and their
images) are prefilled once, into a cache of exactly their slots; a `GroupCache` then adds
`max_new_tokens` slots for each of the `group_size` answers of every prompt, so the image is
encoded, the prompt prefilled and its keys and values stored once per group (each decode step
reads them once per group, in one product with all the group's queries), and a
`lax.while_loop` decodes one token per step for every answer until each has produced a stop
token or the budget is spent.

Log-probabilities are those of the distribution the policy is trained on:
log softmax(logits / temperature) of the chosen token (temperature 1 when greedy), before
top-p / top-k truncation, as EasyR1 computes its actor's log-probs. Top-p and top-k only decide
which tokens may be drawn.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import PreTrainedTokenizerBase

from cpt_jax.models.qwen2_5_vl import GroupCache, Qwen2_5_VL, VisionInputs


@dataclass(frozen=True)
class SamplingConfig:
    """How answers are drawn. temperature 0 is greedy; top_k 0 and top_p 1 switch those off."""

    max_new_tokens: int
    group_size: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens must be >= 1, got {self.max_new_tokens}")
        if self.group_size < 1:
            raise ValueError(f"group_size must be >= 1, got {self.group_size}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")

    @classmethod
    def greedy(cls, max_new_tokens: int) -> SamplingConfig:
        """Validation mode: one greedy answer per prompt."""
        return cls(max_new_tokens=max_new_tokens, temperature=0.0)

    @classmethod
    def validation(cls, max_new_tokens: int, temperature: float = 0.5) -> SamplingConfig:
        """The paper's validation mode: one answer per prompt at temperature 0.5."""
        return cls(max_new_tokens=max_new_tokens, temperature=temperature)


class Prompts(NamedTuple):
    """A jit-ready prompt batch: left-padded ids [b, p], M-RoPE positions [3, b, p], mask
    [b, p] and the packed images (None for text-only batches)."""

    input_ids: jax.Array
    positions: jax.Array
    attention_mask: jax.Array
    vision: VisionInputs | None


class Rollout(NamedTuple):
    """Answers, prompt-major: row k * group_size + j is answer j to prompt k.

    tokens [rows, max_new_tokens] (pad id after the stop token), logprobs [rows, max_new_tokens]
    (0 after it), mask [rows, max_new_tokens] (1 for generated tokens, the stop token
    included), lengths [rows] (= mask.sum(-1)), finished [rows] (a stop token was produced).
    """

    tokens: jax.Array
    logprobs: jax.Array
    mask: jax.Array
    lengths: jax.Array
    finished: jax.Array


def prepare_prompts(model: Qwen2_5_VL, batch: dict[str, np.ndarray]) -> Prompts:
    """A pipeline prompt batch (`rl_dataset` / `eval_dataset`: left-padded ids, packed patches
    padded to their bucket) -> `Prompts`, positions and vision layout computed on the host."""
    images = {}
    if len(batch["image_grid_thw"]):
        images = {"pixel_values": batch["pixel_values"][:int(batch["num_patches"])],
                  "image_grid_thw": batch["image_grid_thw"],
                  "pad_patches_to": batch["pixel_values"].shape[0]}
    ids, positions, mask, vision, _ = model.prepare_inputs(
        batch["input_ids"], attention_mask=batch["attention_mask"], **images)
    return Prompts(ids, positions, mask, vision)


def _truncate(scaled: jax.Array, top_k: int, top_p: float) -> jax.Array:
    """Logits outside the top-k and outside the smallest set of mass >= top_p set to -inf."""
    if top_k and top_k < scaled.shape[-1]:
        kth = jax.lax.top_k(scaled, top_k)[0][..., -1:]
        scaled = jnp.where(scaled < kth, -jnp.inf, scaled)
    if top_p < 1.0:
        scaled = jnp.where(_nucleus(jax.nn.softmax(scaled, axis=-1), top_p), scaled, -jnp.inf)
    return scaled


def _nucleus(probs: jax.Array, top_p: float, iterations: int = 40) -> jax.Array:
    """The top-p nucleus as a mask: the tokens with probability >= t for the largest t whose
    set still holds mass >= top_p, i.e. the smallest set of most likely tokens that does.

    t is found by bisection on [0, max p] instead of sorting the vocabulary (a sort per step
    is most of a decode step on CPU); 40 halvings resolve probabilities 1e-12 apart, so the
    set differs from the sorted one only between tokens that close (ties).
    """
    low = jnp.zeros((*probs.shape[:-1], 1), probs.dtype)  # mass(low) = 1 >= top_p
    high = jnp.max(probs, axis=-1, keepdims=True) * 2  # mass(high) = 0 < top_p

    def halve(_, bounds: tuple[jax.Array, jax.Array]) -> tuple[jax.Array, jax.Array]:
        low, high = bounds
        middle = (low + high) / 2
        enough = jnp.sum(jnp.where(probs >= middle, probs, 0.0), -1, keepdims=True) >= top_p
        return jnp.where(enough, middle, low), jnp.where(enough, high, middle)

    low, _ = jax.lax.fori_loop(0, iterations, halve, (low, high))
    return probs >= low


def _draw(key: jax.Array, logits: jax.Array) -> jax.Array:
    """One token per row of softmax(logits), by inverting the cumulative distribution at one
    uniform number per row.

    The Gumbel-max trick (`jax.random.categorical`) draws a random number per vocabulary
    entry: 6.4 of the 7.5 ms that sampling 32 rows of 8,192 ids took per decode step on one
    CPU core, against 1.2 ms for this. Token i is drawn when u falls in its cumulative
    interval, so a token of probability 0 never is; the float32 sums shift the mass of tokens
    below ~1e-7 probability by about that much."""
    probs = jax.nn.softmax(logits, axis=-1)
    cumulative = jnp.cumsum(probs, axis=-1)
    u = jax.random.uniform(key, (*probs.shape[:-1], 1), probs.dtype) * cumulative[..., -1:]
    drawn = jnp.sum(cumulative <= u, axis=-1)
    last = probs.shape[-1] - 1 - jnp.argmax(probs[..., ::-1] > 0, axis=-1)  # u rounded up
    return jnp.minimum(drawn, last)


def choose_tokens(logits: jax.Array, key: jax.Array, config: SamplingConfig,
                  banned: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """Next tokens [rows] from last-position logits [rows, vocab], with their log-probs.

    `banned` ids are never drawn (like top-k / top-p, a truncation of the distribution the
    log-probs are taken from)."""
    logits = logits.astype(jnp.float32)
    scaled = logits / config.temperature if config.temperature > 0 else logits
    logprobs = jax.nn.log_softmax(scaled, axis=-1)
    if banned is not None:
        scaled = scaled.at[:, banned].set(-jnp.inf)
    if config.temperature == 0:
        tokens = jnp.argmax(scaled, axis=-1)
    else:
        tokens = _draw(key, _truncate(scaled, config.top_k, config.top_p))
    chosen = jnp.take_along_axis(logprobs, tokens[:, None], axis=-1)[:, 0]
    return tokens.astype(jnp.int32), chosen


def make_sampler(model: Qwen2_5_VL, config: SamplingConfig, *, stop_ids: Sequence[int],
                 pad_id: int) -> Callable[..., Rollout]:
    """`sample(states, prompts, key) -> Rollout`, one jitted program per prompt shape.

    `states` is the model's state as one or more `nnx.State`s (`nnx.split(model)[1:]`, or a
    train state's params and other variables); `prompts` from `prepare_prompts`; `key` a PRNG
    key (unused when greedy). `stop_ids` end an answer (Qwen's `<|im_end|>` and
    `<|endoftext|>`); `pad_id` fills the rest of its row. The vision tokens (image, video,
    vision start) are never drawn: in an answer they would be read back as an image to insert
    when the answer is trained on.
    """
    jitted = sampler_program(model, config, stop_ids=stop_ids, pad_id=pad_id)
    return lambda states, prompts, key=None: jitted(
        tuple(states), prompts, key if key is not None else jax.random.key(0))


def sampler_program(model: Qwen2_5_VL, config: SamplingConfig, *, stop_ids: Sequence[int],
                    pad_id: int) -> Callable[..., Rollout]:
    """`make_sampler`'s jitted program itself, `(states tuple, prompts, key) -> Rollout`: what
    `cpt_jax.plan` lowers and compiles for a TPU topology."""
    if not stop_ids:
        raise ValueError("make_sampler needs at least one stop token id")
    graphdef = nnx.graphdef(model)
    cfg = model.config
    banned = jnp.asarray([i for i in (cfg.image_token_id, cfg.video_token_id,
                                      cfg.vision_start_token_id) if i is not None], jnp.int32)
    stops = jnp.asarray(list(stop_ids), jnp.int32)
    n, budget = config.group_size, config.max_new_tokens

    def sample(states: Sequence[nnx.State], prompts: Prompts, key: jax.Array) -> Rollout:
        model = nnx.merge(graphdef, *states)
        batch, prompt_len = prompts.input_ids.shape
        layers = model.decoder_layers()  # split once, not at every step (None when scanned)
        cache = model.init_cache(batch, prompt_len)
        hidden, cache = model.hidden_states(prompts.input_ids, prompts.positions,
                                            prompts.attention_mask, prompts.vision, cache,
                                            layers)
        cache = GroupCache.after_prefill(cache, n, budget)
        rows = batch * n
        keys = jax.random.split(key, budget)
        last = jnp.repeat(model.logits(hidden[:, -1]), n, axis=0)
        first, first_lp = choose_tokens(last, keys[0], config, banned)
        tokens = jnp.full((rows, budget), pad_id, jnp.int32).at[:, 0].set(first)
        logprobs = jnp.zeros((rows, budget), jnp.float32).at[:, 0].set(first_lp)
        mask = jnp.zeros((rows, budget), jnp.int32).at[:, 0].set(1)
        done = jnp.isin(first, stops)

        def not_finished(carry: tuple[Any, ...]) -> jax.Array:
            step, done = carry[0], carry[4]
            return (step < budget) & ~jnp.all(done)

        def decode_one(carry: tuple[Any, ...]) -> tuple[Any, ...]:
            step, tokens, logprobs, mask, done, cache = carry
            previous = jax.lax.dynamic_index_in_dim(tokens, step - 1, axis=1)
            logits, cache = model.decode(previous, cache, layers)
            token, logprob = choose_tokens(logits[:, -1], keys[step], config, banned)
            alive = ~done
            column = (jnp.where(alive, token, pad_id), jnp.where(alive, logprob, 0.0),
                      alive.astype(jnp.int32))
            tokens, logprobs, mask = (
                jax.lax.dynamic_update_index_in_dim(array, value, step, axis=1)
                for array, value in zip((tokens, logprobs, mask), column, strict=True))
            return step + 1, tokens, logprobs, mask, done | (alive & jnp.isin(token, stops)), cache

        carry = (jnp.ones((), jnp.int32), tokens, logprobs, mask, done, cache)
        _, tokens, logprobs, mask, done, _ = jax.lax.while_loop(not_finished, decode_one, carry)
        return Rollout(tokens, logprobs, mask, mask.sum(axis=-1), done)

    return jax.jit(sample)


def turn_stop_ids(tokenizer: PreTrainedTokenizerBase) -> list[int]:
    """Qwen's end-of-turn and end-of-text tokens, whichever the tokenizer has."""
    ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<|im_end|>", "<|endoftext|>")]
    ids = [i for i in ids if i is not None and i != tokenizer.unk_token_id]
    if not ids:
        raise ValueError("the tokenizer has neither <|im_end|> nor <|endoftext|>: pass stop ids")
    return ids
