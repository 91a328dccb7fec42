"""Model FLOPs of Qwen2.5-VL by formula: what MFU divides by.

Counted as the literature counts them (PaLM's appendix B): 2 FLOPs per parameter that
multiplies a token (or a patch) in the forward pass, plus attention's score and value products
(4 x width per query-key pair), and 3 x the forward for a training step (the backward pass
costs twice the forward). Masked or padded work that a kernel may still do is not counted:
padding tokens, padding patches and attention across images are waste, not model FLOPs.
"""

from __future__ import annotations

from collections.abc import Sequence

from cpt_jax.models.qwen2_5_vl.config import TextConfig, VisionConfig


def text_params_per_token(text: TextConfig, *, head: bool = True) -> int:
    """Decoder parameters that multiply each token: the layers and (with `head`) the output
    head (the embedding lookup is no matmul)."""
    h, i = text.hidden_size, text.intermediate_size
    head_dim = h // text.num_attention_heads
    attention = h * h * 2 + 2 * h * text.num_key_value_heads * head_dim
    return text.num_hidden_layers * (attention + 3 * h * i) + (h * text.vocab_size if head else 0)


def vision_params_per_patch(vision: VisionConfig) -> int:
    """Vision parameters that multiply each patch: the patch embedding, the blocks, and the
    merger's share (its two layers run once per group of merge_unit patches)."""
    h, i = vision.hidden_size, vision.intermediate_size
    merged = h * vision.merge_unit
    merger = (merged * merged + merged * vision.out_hidden_size) / vision.merge_unit
    return int(vision.patch_dim * h + vision.depth * (4 * h * h + 3 * h * i) + merger)


def text_forward_flops(text: TextConfig, lengths: Sequence[int],
                       head_positions: Sequence[int] | None = None) -> float:
    """A forward pass over rows of these real lengths (every position attends the whole row,
    as PaLM counts, without halving for the causal mask), with the output head at
    `head_positions` positions of each row (default: all; an SFT loss needs only the ones
    that predict its response tokens)."""
    width = text.num_attention_heads * (text.hidden_size // text.num_attention_heads)
    per_token = 2 * text_params_per_token(text, head=False)
    heads = lengths if head_positions is None else head_positions
    return float(sum(per_token * n + 4 * text.num_hidden_layers * width * n * n
                     for n in lengths) + 2 * text.hidden_size * text.vocab_size * sum(heads))


def vision_forward_flops(vision: VisionConfig, frames: Sequence[int]) -> float:
    """The vision tower over frames of these patch counts: the full-attention blocks attend
    within a frame, the others within a window (of at most `window_tokens` patches)."""
    window = (vision.window_size // vision.patch_size) ** 2
    full_blocks = len(vision.fullatt_block_indexes)
    windowed = vision.depth - full_blocks
    per_patch = 2 * vision_params_per_patch(vision)
    total = 0.0
    for p in frames:
        attended = full_blocks * p + windowed * min(p, window)
        total += per_patch * p + 4 * vision.hidden_size * p * attended
    return total


def decode_step_flops(text: TextConfig, contexts: Sequence[int]) -> float:
    """One decoding step of rows that attend these numbers of cached tokens (the new one
    included)."""
    width = text.num_attention_heads * (text.hidden_size // text.num_attention_heads)
    per_token = 2 * text_params_per_token(text)
    return float(sum(per_token + 4 * text.num_hidden_layers * width * n for n in contexts))
