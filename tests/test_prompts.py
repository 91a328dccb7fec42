"""The local tokenizer and prompt encoding against transformers' Qwen2_5_VLProcessor."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers import Qwen2_5_VLProcessor, Qwen2VLImageProcessorPil

from cpt_jax.data.processor import preprocess_image
from cpt_jax.data.prompts import chat_messages, encode_prompt, encode_sft_example
from cpt_jax.data.tokenizer import (
    PAD_TOKEN,
    QWEN_SPECIAL_TOKENS,
    build_tokenizer,
    preset_special_tokens,
)
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VLConfig, preset

MIN_PIXELS, MAX_PIXELS = 3136, 12544
COT = (
    " You FIRST think about the reasoning process as an internal monologue and then provide the"
    " final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The"
    " final answer MUST BE put in \\boxed{}."
)


class ImageTextProcessor(Qwen2_5_VLProcessor):
    """Qwen2_5_VLProcessor without its video processor, which needs torchvision (not installed).

    transformers 5.24 refuses `video_processor=None`; images and text take the same code path.
    """

    def __init__(self, image_processor=None, tokenizer=None, chat_template=None, **kwargs):
        super().__init__(image_processor, tokenizer, chat_template=chat_template, **kwargs)


@pytest.fixture(scope="module")
def tokenizer():
    config = preset("tiny")
    return build_tokenizer(
        vocab_size=config.text.vocab_size, special_token_ids=preset_special_tokens(config)
    )


@pytest.fixture(scope="module")
def processor(tokenizer):
    image_processor = Qwen2VLImageProcessorPil(min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)
    return ImageTextProcessor(
        image_processor=image_processor, tokenizer=tokenizer, chat_template=tokenizer.chat_template
    )


def _image(height: int, width: int, seed: int) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _reference_ids(processor, messages, images) -> list[int]:
    text = processor.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    out = processor(text=text, images=images or None, return_tensors="np")
    return out["input_ids"][0].tolist()


def _grids(images) -> list[tuple[int, int, int]]:
    return [preprocess_image(i, min_pixels=MIN_PIXELS, max_pixels=MAX_PIXELS)[1] for i in images]


def test_two_image_prompt_matches_processor(tokenizer, processor) -> None:
    images = [_image(60, 90, 0), _image(200, 50, 1)]
    problem = "<image>Compare the first picture with <image> the second. Which is larger?" + COT
    # The user turn as EasyR1 writes it: no system message (the template adds the default).
    messages = [{"role": "user", "content": [
        {"type": "image"},
        {"type": "text", "text": "Compare the first picture with "},
        {"type": "image"},
        {"type": "text", "text": " the second. Which is larger?" + COT},
    ]}]
    ids = encode_prompt(tokenizer, problem, _grids(images))
    assert ids == _reference_ids(processor, messages, images)
    assert ids.count(tokenizer.convert_tokens_to_ids("<|image_pad|>")) == 6 + 14


def test_one_image_and_text_only_prompts_match_processor(tokenizer, processor) -> None:
    image = _image(33, 400, 2)
    problem = "What is written on the sign?\n<image>\nAnswer with one word."
    assert encode_prompt(tokenizer, problem, _grids([image])) == _reference_ids(
        processor, chat_messages(problem), [image]
    )
    problem = "Which number is larger, 17 or 71? $\\frac{1}{2}$" + COT
    messages = [{"role": "user", "content": problem}]
    assert encode_prompt(tokenizer, problem, []) == _reference_ids(processor, messages, [])


def test_custom_system_prompt(tokenizer) -> None:
    ids = encode_prompt(tokenizer, "Hi", [], system="Be brief.")
    assert tokenizer.decode(ids) == (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\n"
    )


def test_placeholder_count_mismatch(tokenizer) -> None:
    with pytest.raises(ValueError, match=r"2 <image> placeholder\(s\) but 1 image\(s\)"):
        encode_prompt(tokenizer, "<image> and <image>", [(1, 4, 4)])
    with pytest.raises(ValueError, match=r"0 <image> placeholder\(s\) but 1 image\(s\)"):
        encode_prompt(tokenizer, "no image here", [(1, 4, 4)])


def test_chat_messages_split() -> None:
    assert chat_messages("<image>What?<image>")[1]["content"] == [
        {"type": "image"}, {"type": "text", "text": "What?"}, {"type": "image"}
    ]


def test_sft_example(tokenizer) -> None:
    grids = [(1, 4, 6)]
    problem = "<image>How many cubes are there?" + COT
    response = "<think>I count three red cubes and one blue.</think> \\boxed{4}"
    ids, mask = encode_sft_example(tokenizer, problem, response, grids)
    prompt = encode_prompt(tokenizer, problem, grids)
    assert len(ids) == len(mask)
    assert ids[: len(prompt)] == prompt
    assert mask == [0] * len(prompt) + [1] * (len(ids) - len(prompt))
    answer = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tokenizer.decode(answer) == response + "<|im_end|>"
    assert answer[-1] == tokenizer.eos_token_id


@pytest.mark.parametrize("name", ["tiny", "small"])
def test_tokenizer_special_ids(name: str) -> None:
    config = preset(name)
    ids = preset_special_tokens(config)
    expected = {
        "<|endoftext|>": config.bos_token_id,
        "<|im_end|>": config.eos_token_id,
        "<|vision_start|>": config.vision_start_token_id,
        "<|vision_end|>": config.vision_end_token_id,
        "<|image_pad|>": config.image_token_id,
        "<|video_pad|>": config.video_token_id,
        PAD_TOKEN: config.pad_token_id,
        "<|im_start|>": {"tiny": 510, "small": 8188}[name],
    }
    assert ids == expected
    vocab_size = config.text.vocab_size
    tok = build_tokenizer(vocab_size=vocab_size, special_token_ids=ids)
    for token, token_id in ids.items():
        assert tok.convert_tokens_to_ids(token) == token_id
        assert tok.encode(token, add_special_tokens=False) == [token_id]
    assert tok.eos_token_id == config.eos_token_id and tok.pad_token_id == config.pad_token_id
    assert sorted(tok.get_vocab().values()) == list(range(vocab_size))
    assert len(tok) == vocab_size
    text = "Ünïcödé 中文 ✓ 12345 \\int_0^1 <|im_start|>user\n<|image_pad|><|im_end|>\t\r\n"
    assert max(tok.encode(text, add_special_tokens=False)) < vocab_size
    assert set(QWEN_SPECIAL_TOKENS) | {PAD_TOKEN} <= set(tok.all_special_tokens)


def test_qwen_checkpoint_layout() -> None:
    """A config with Qwen's own ids gives Qwen's layout: im_start = bos + 1, endoftext pads."""
    ids = preset_special_tokens(Qwen2_5_VLConfig())
    assert ids["<|im_start|>"] == 151644 and PAD_TOKEN not in ids


def test_think_is_text(tokenizer) -> None:
    text = "<think>a + b = 3</think> The answer is \\boxed{3}."
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert not set(ids) & set(tokenizer.all_special_ids)
    assert tokenizer.decode(ids) == text
    assert tokenizer.decode(ids, skip_special_tokens=True) == text
    assert "<think>" not in tokenizer.all_special_tokens


def test_tokenizer_deterministic_and_trained_on_corpus() -> None:
    config = preset("tiny")
    ids = preset_special_tokens(config)
    a = build_tokenizer(vocab_size=512, special_token_ids=ids)
    b = build_tokenizer(vocab_size=512, special_token_ids=ids)
    assert a.backend_tokenizer.to_str() == b.backend_tokenizer.to_str()
    corpus = ["the zygomorphic flower"] * 20
    c = build_tokenizer(vocab_size=512, special_token_ids=ids, corpus=corpus)
    assert len(c.encode(" zygomorphic", add_special_tokens=False)) == 1
    # Ids the corpus could not fill are reserved: text never encodes to them.
    reserved = {i for t, i in c.get_vocab().items() if t.startswith("<|reserved_")}
    assert reserved and not reserved & set(c.encode(" ".join(corpus), add_special_tokens=False))
    with pytest.raises(ValueError, match="share ids"):
        build_tokenizer(vocab_size=512, special_token_ids={**ids, "<|im_start|>": 500})
    with pytest.raises(ValueError, match="outside the vocabulary"):
        build_tokenizer(vocab_size=512, special_token_ids={**ids, "<|im_start|>": 512})
