"""Prompts in Qwen2.5-VL's chat form: problem text with `<image>` placeholders -> token ids.

The user turn is built as EasyR1 builds it (the paper's GRPO code): the problem is split at
each `<image>`, an image part stands for each placeholder and the text pieces between them
are kept verbatim (empty ones dropped). The chat template then writes each image as
`<|vision_start|><|image_pad|><|vision_end|>`, and the pad is expanded here to the image's
t*h*w / merge_size**2 tokens, as `Qwen2_5_VLProcessor` expands it.
"""

from __future__ import annotations

from typing import Any

from transformers import PreTrainedTokenizerBase

IMAGE_PLACEHOLDER = "<image>"
IMAGE_PAD = "<|image_pad|>"
DEFAULT_SYSTEM = "You are a helpful assistant."


def chat_messages(problem: str, *, system: str = DEFAULT_SYSTEM) -> list[dict[str, Any]]:
    """[system, user] messages for the chat template; the user content is a list of parts."""
    content: list[dict[str, Any]] = []
    for i, text in enumerate(problem.split(IMAGE_PLACEHOLDER)):
        if i:
            content.append({"type": "image"})
        if text:
            content.append({"type": "text", "text": text})
    return [{"role": "system", "content": system}, {"role": "user", "content": content}]


def encode_prompt(
    tokenizer: PreTrainedTokenizerBase,
    problem: str,
    image_grids: list[tuple[int, int, int]],
    *,
    system: str = DEFAULT_SYSTEM,
    merge_size: int = 2,
) -> list[int]:
    """Prompt ids ending in `<|im_start|>assistant\\n`, each image pad expanded to its tokens.

    `image_grids` are the (t, h, w) patch grids of the problem's images, in order.
    """
    n_placeholders = problem.count(IMAGE_PLACEHOLDER)
    if n_placeholders != len(image_grids):
        raise ValueError(
            f"the problem has {n_placeholders} {IMAGE_PLACEHOLDER} placeholder(s) but "
            f"{len(image_grids)} image(s) were given"
        )
    text = tokenizer.apply_chat_template(
        chat_messages(problem, system=system), tokenize=False, add_generation_prompt=True
    )
    ids = tokenizer.encode(text, add_special_tokens=False)
    pad_id = tokenizer.convert_tokens_to_ids(IMAGE_PAD)
    if ids.count(pad_id) != len(image_grids):
        raise ValueError(
            f"the prompt holds {ids.count(pad_id)} {IMAGE_PAD} tokens for {len(image_grids)} "
            f"image(s): the problem text must not contain {IMAGE_PAD} itself"
        )
    grids = iter(image_grids)
    out: list[int] = []
    for token in ids:
        if token == pad_id:
            t, h, w = next(grids)
            out.extend([pad_id] * (t * h * w // merge_size**2))
        else:
            out.append(token)
    return out


def encode_sft_example(
    tokenizer: PreTrainedTokenizerBase,
    problem: str,
    response: str,
    image_grids: list[tuple[int, int, int]],
    *,
    system: str = DEFAULT_SYSTEM,
    merge_size: int = 2,
) -> tuple[list[int], list[int]]:
    """(input_ids, loss_mask) for SFT: loss on the response and its closing `<|im_end|>` only.

    Prompt and response are tokenized apart, as LLaMA-Factory does and as a sampler sees them
    (the response follows the prompt's ids). LLaMA-Factory's Qwen2-VL template also trains on
    the "\\n" after `<|im_end|>`; it is left out here: generation stops at `<|im_end|>` (eos),
    so that token is never predicted, and the sequence ends where a sampled one would.
    """
    prompt = encode_prompt(tokenizer, problem, image_grids, system=system, merge_size=merge_size)
    answer = tokenizer.encode(response, add_special_tokens=False)
    answer.append(tokenizer.convert_tokens_to_ids("<|im_end|>"))
    return prompt + answer, [0] * len(prompt) + [1] * len(answer)
