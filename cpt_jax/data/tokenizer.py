"""A small local byte-level BPE tokenizer with Qwen2.5-VL's special tokens and chat template.

For tests and CPU-scale runs with the `tiny` / `small` presets, whose vocabularies are far
smaller than Qwen's; real runs load the checkpoint's own tokenizer with
`transformers.AutoTokenizer.from_pretrained(path)`. It copies what matters for parity with
Qwen's tokenizer: Qwen2's pre-tokenizer (digits split one by one), byte-level BPE (any text
encodes, nothing is unknown), the special tokens at the model config's ids, eos `<|im_end|>`,
and the Qwen2.5-VL chat template. `<think>` and `</think>` are plain text, as in Qwen2.5.

Id layout: the special tokens sit at the ids given; the learned tokens (256 bytes first, then
merges in training order) fill the other ids from 0 upwards. When the corpus supports fewer
merges than there are ids, the ids left over hold `<|reserved_ID|>` entries that no text
encodes to (like Qwen's embedding rows beyond its tokenizer), so no id is a hole and none is
>= vocab_size.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence

from tokenizers import (
    AddedToken,
    Regex,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
    trainers,
)
from transformers import PreTrainedTokenizerFast

from cpt_jax.data.sources import SourceNotBuiltError, load_source
from cpt_jax.data.tasks import COT_SUFFIX, NO_COT_SUFFIX, SYNTHETIC_PRETRAIN, SYNTHETIC_STAGES
from cpt_jax.models.qwen2_5_vl.config import Qwen2_5_VLConfig

# Qwen2.5-VL's special tokens that this project uses (Qwen's ids 151643..151656).
QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|image_pad|>",
    "<|video_pad|>",
)
# The presets pad with an id of their own; Qwen pads with <|endoftext|>.
PAD_TOKEN = "<|pad|>"

# Qwen2.5-VL-7B-Instruct's chat template (chat_template.json), verbatim.
QWEN2_5_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}Picture "
    "{{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}Video "
    "{{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

# Qwen2's pre-tokenizer split (tokenizer.json): contractions, letter runs with one leading
# non-letter, single digits, punctuation runs, newlines, spaces.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)

_BUILTIN_CORPUS = r"""
You are a helpful assistant. Answer the question about the image.
What is shown in the picture? How many objects are there? Is the cube red or blue?
The small yellow sphere is to the left of the large green cylinder behind the metal car.
Which of the following options is correct? Choose the letter of the best answer: A, B, C or D.
Read the text in the image and write it down. The sign says: Open every day from 9 to 5.
The photo is too blurry to read, so the answer is unanswerable. Yes. No. True. False.
Find the value of x in the triangle. The angle measures 45 degrees and the side is 12 units.
Question: what color is the bus? Answer: white. Question: where is the cat? Answer: on the sofa.
The tissue sample shows inflamed cells under the microscope; is there evidence of a tumor?
Scientists measure the temperature of water as it boils at sea level, near one hundred degrees.
A plant needs sunlight, water and air to grow. Animals eat plants or other animals for energy.
The map shows the states and their capitals, the rivers, the mountains and the oceans.
You FIRST think about the reasoning process as an internal monologue and then provide the
final answer. The reasoning process MUST BE enclosed within <think> </think> tags. The final
answer MUST BE put in \boxed{}. You MUST provide the final answer directly.
<think>The circle has radius 3, so its area is 9 pi.</think> The answer is \boxed{28.27}.
<think>Count the red cubes: one, two, three.</think> \boxed{3}
0 1 2 3 4 5 6 7 8 9 10 12 15 20 25 30 42 50 64 75 90 100 128 180 256 360 512 1000 2048 3.14
-1 -7 +2 0.5 1.25 99.9 1/2 3/4 50% 7:30 2024-05-01 (3, 4) [1, 2] {a, b} x = 2, y = -3.
$x^2 + y^2 = r^2$, $\frac{a}{b}$, $\sqrt{2}$, $\angle ABC = 60^\circ$, $\triangle PQR$,
\frac{1}{2} \cdot \pi r^2 \times h \leq \geq \neq \approx \sin \cos \tan \theta \alpha
\beta \log_2 n \sum_{i=1}^{n} i = \frac{n(n+1)}{2} \int_0^1 x \, dx
\left( \right) \text{cm}
"""


def build_tokenizer(
    *,
    vocab_size: int,
    special_token_ids: dict[str, int],
    corpus: Iterable[str] | None = None,
) -> PreTrainedTokenizerFast:
    """A byte-level BPE trained on `corpus` (or a built-in one) with the special tokens at ids.

    `special_token_ids` maps each of QWEN_SPECIAL_TOKENS (and optionally PAD_TOKEN) to its id,
    e.g. `preset_special_tokens(config)`. The pad token is PAD_TOKEN when given, else Qwen's
    own choice `<|endoftext|>`. Deterministic: the same arguments give the same tokenizer.
    """
    _check_special_ids(vocab_size, special_token_ids)
    regular_ids = sorted(set(range(vocab_size)) - set(special_token_ids.values()))
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    if len(regular_ids) < len(alphabet):
        raise ValueError(
            f"vocab_size {vocab_size} leaves {len(regular_ids)} ids for the byte-level tokens; "
            f"at least {len(alphabet)} are needed"
        )
    trained = _new_tokenizer(models.BPE())
    trainer = trainers.BpeTrainer(
        vocab_size=len(regular_ids), initial_alphabet=alphabet, show_progress=False
    )
    trained.train_from_iterator(
        _BUILTIN_CORPUS.splitlines() if corpus is None else corpus, trainer=trainer
    )
    learned = sorted(trained.get_vocab().items(), key=lambda item: item[1])
    merges = [tuple(pair) for pair in json.loads(trained.to_str())["model"]["merges"]]
    # Learned tokens take the non-special ids in training order; any ids left become reserved.
    vocab = {token: new_id for (token, _), new_id in zip(learned, regular_ids, strict=False)}
    vocab.update({f"<|reserved_{i}|>": i for i in regular_ids[len(learned):]})
    vocab.update(special_token_ids)
    tokenizer = _new_tokenizer(models.BPE(vocab=vocab, merges=merges))
    tokenizer.add_special_tokens(
        [AddedToken(token, special=True, normalized=False) for token in special_token_ids]
    )
    for token, token_id in special_token_ids.items():
        assert tokenizer.token_to_id(token) == token_id, (token, tokenizer.token_to_id(token))
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token="<|im_end|>",
        pad_token=PAD_TOKEN if PAD_TOKEN in special_token_ids else "<|endoftext|>",
        extra_special_tokens=list(QWEN_SPECIAL_TOKENS),
        chat_template=QWEN2_5_VL_CHAT_TEMPLATE,
        clean_up_tokenization_spaces=False,
    )


def task_tokenizer(config: Qwen2_5_VLConfig, data_dir: os.PathLike | str,
                   tasks: Sequence[str] = SYNTHETIC_STAGES + SYNTHETIC_PRETRAIN
                   ) -> PreTrainedTokenizerFast:
    """A BPE for a preset model trained on the prompt suffixes and the problems and answers
    of `tasks`' built train splits (tasks not built in `data_dir` are left out)."""
    corpus = [COT_SUFFIX, NO_COT_SUFFIX]
    for task in dict.fromkeys(tasks):
        try:
            rows = load_source(task, "train", data_dir=data_dir)
        except SourceNotBuiltError:
            continue
        for example in rows:
            corpus += [example["problem"], example["answer"]]
    return build_tokenizer(vocab_size=config.text.vocab_size,
                           special_token_ids=preset_special_tokens(config), corpus=corpus)


def preset_special_tokens(config: Qwen2_5_VLConfig) -> dict[str, int]:
    """Special token ids implied by a model config (the presets and Qwen's own configs).

    The config names all but `<|im_start|>`: bos is `<|endoftext|>` and eos `<|im_end|>` (as
    in Qwen2.5-VL-Instruct). `<|im_start|>` takes bos + 1 when free (Qwen's own layout), else
    the highest free id (tiny: 510, small: 8188). A pad id distinct from bos becomes PAD_TOKEN
    (tiny: 511, small: 8191); without one, `<|endoftext|>` pads, as in Qwen.
    """
    ids = {
        "<|endoftext|>": config.bos_token_id,
        "<|im_end|>": config.eos_token_id,
        "<|vision_start|>": config.vision_start_token_id,
        "<|vision_end|>": config.vision_end_token_id,
        "<|image_pad|>": config.image_token_id,
        "<|video_pad|>": config.video_token_id,
    }
    if config.pad_token_id is not None and config.pad_token_id != config.bos_token_id:
        ids[PAD_TOKEN] = config.pad_token_id
    taken, vocab_size = set(ids.values()), config.text.vocab_size
    if config.bos_token_id + 1 < vocab_size and config.bos_token_id + 1 not in taken:
        ids["<|im_start|>"] = config.bos_token_id + 1
    else:
        free = [i for i in range(vocab_size - 1, -1, -1) if i not in taken]
        if not free:
            raise ValueError(f"no free id for <|im_start|> in a vocabulary of {vocab_size}")
        ids["<|im_start|>"] = free[0]
    _check_special_ids(vocab_size, ids)
    return ids


def _new_tokenizer(model: models.BPE) -> Tokenizer:
    """Qwen2's pipeline around a BPE model: NFC, regex split, byte-level map and decoder."""
    tokenizer = Tokenizer(model)
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(_QWEN2_SPLIT), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    return tokenizer


def _check_special_ids(vocab_size: int, special_token_ids: dict[str, int]) -> None:
    missing = [t for t in QWEN_SPECIAL_TOKENS if t not in special_token_ids]
    unknown = sorted(set(special_token_ids) - {*QWEN_SPECIAL_TOKENS, PAD_TOKEN})
    if missing or unknown:
        raise ValueError(f"special_token_ids: missing {missing}, unknown {unknown}")
    bad = {t: i for t, i in special_token_ids.items() if not 0 <= i < vocab_size}
    if bad:
        raise ValueError(f"special token ids outside the vocabulary [0, {vocab_size}): {bad}")
    if len(set(special_token_ids.values())) != len(special_token_ids):
        raise ValueError(f"special tokens share ids: {special_token_ids}")
