"""Grain pipelines from built task sources to fixed-shape batches for the model.

Three kinds, one encoding path:
- `sft_dataset`: shuffled, repeated; prompt + answer with the prompt masked out of the loss.
- `rl_dataset`: shuffled, repeated; left-padded prompts with their answers and instance ids,
  for rollouts (the sampler appends the answer tokens after the prompt).
- `eval_dataset`: every example once, in order; the last batch is filled with copies of a
  real example marked `valid = False`, so every batch has the same shape.

Static shapes under `jit`: token rows are padded to the smallest of a few length buckets that
holds the batch, and the packed image patches to the next power of two, so a stage compiles a
handful of programs rather than one per batch. Datasets are deterministic by seed and their
iterators checkpoint with `get_state`/`set_state`.

Multi-host: every process walks the same global order of examples (reading records is cheap),
encodes only its share of each batch (example i of a batch on process i % process_count: the
image decoding and patching, the costly part), and the encoded shares are gathered so that
every process holds the same global batch, which `shard_batch` then places on the mesh. The
data order, and so a run's results, do not depend on the number of processes.
"""

from __future__ import annotations

import dataclasses
import pickle
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grain
import numpy as np
from transformers import PreTrainedTokenizerBase

from cpt_jax.data.processor import MAX_PIXELS, MIN_PIXELS, decode_image, preprocess_image
from cpt_jax.data.prompts import encode_prompt, encode_sft_example
from cpt_jax.data.tasks import prompt_text

PATCH_DIM = 3 * 2 * 14 * 14
# Batches are prefetched a few at a time: Grain's default (16 threads, 500 elements) would
# buffer 500 batches, gigabytes of patches, and its threads only contend for the GIL here.
READ_OPTIONS = grain.ReadOptions(num_threads=1, prefetch_buffer_size=4)


@dataclasses.dataclass(frozen=True)
class EncodeOptions:
    """How examples become tokens and patches (the paper's settings by default)."""

    length_buckets: tuple[int, ...] = (1024, 2048, 4096, 7168)
    min_pixels: int = MIN_PIXELS
    max_pixels: int = MAX_PIXELS
    cot: bool = True
    min_patches: int = 64  # smallest patch bucket (patch counts are padded to powers of two)
    merge_size: int = 2

    def bucket(self, length: int, what: str) -> int:
        for size in self.length_buckets:
            if length <= size:
                return size
        raise ValueError(f"{what} has {length} tokens, more than the largest length bucket "
                         f"{self.length_buckets[-1]} (EncodeOptions.length_buckets)")

    def patch_bucket(self, patches: int) -> int:
        return patch_bucket(patches, self.min_patches)


def patch_bucket(patches: int, minimum: int) -> int:
    """Patch counts padded to a power of two (at least `minimum`): few distinct shapes."""
    return max(minimum, 1 << max(0, patches - 1).bit_length())


def encode_share(examples: Sequence[Any], encode: Callable[[Any], Any], process_index: int,
                 process_count: int) -> list[Any]:
    """A global batch with this process's share encoded (positions i with i % process_count ==
    process_index) and None in the other processes' places."""
    return [encode(e) if i % process_count == process_index else None
            for i, e in enumerate(examples)]


def merge_shares(shares: Sequence[Sequence[Any]]) -> list[Any]:
    """Every process's `encode_share` of one batch (in process order) -> the encoded batch."""
    return [shares[i % len(shares)][i] for i in range(len(shares[0]))]


def gather_from_processes(value: Any) -> list[Any]:
    """`value` of every process, in process order (a collective: all processes call it)."""
    from jax.experimental import multihost_utils
    data = np.frombuffer(pickle.dumps(value), np.uint8)
    sizes = np.asarray(multihost_utils.process_allgather(np.asarray([data.size]))).ravel()
    padded = np.zeros(int(sizes.max()), np.uint8)
    padded[:data.size] = data
    gathered = np.asarray(multihost_utils.process_allgather(padded))
    return [pickle.loads(row[:size].tobytes()) for row, size in zip(gathered, sizes, strict=True)]


@dataclasses.dataclass(frozen=True)
class GlobalBatches:
    """Iterable of collated global batches from per-process encoded shares (module docstring).

    shares: this process's `encode_share` of each batch; its iterators' state is the
    checkpointed data position, the same on every process."""

    shares: grain.IterDataset
    collate: Callable[[list[Any]], dict[str, np.ndarray]]
    process_count: int = 1

    def __iter__(self) -> GlobalBatchIterator:
        return GlobalBatchIterator(self, iter(self.shares))


@dataclasses.dataclass
class GlobalBatchIterator(Iterator[dict[str, np.ndarray]]):
    batches: GlobalBatches
    shares: grain.DatasetIterator

    def __next__(self) -> dict[str, np.ndarray]:
        share = next(self.shares)
        shares = gather_from_processes(share) if self.batches.process_count > 1 else [share]
        return self.batches.collate(merge_shares(shares))

    def get_state(self) -> dict[str, Any]:
        return self.shares.get_state()

    def set_state(self, state: dict[str, Any]) -> None:
        self.shares.set_state(state)

    def close(self) -> None:
        """Stops the prefetch threads (or worker processes) now."""
        self.shares.close()


def _images(example: dict[str, Any], options: EncodeOptions, task: str):
    patches, grids = [], []
    for i, data in enumerate(example["images"]):
        image = decode_image(data, source=f"{task} instance {example['instance_id']} image {i}")
        pixels, grid = preprocess_image(image, min_pixels=options.min_pixels,
                                        max_pixels=options.max_pixels,
                                        merge_size=options.merge_size)
        patches.append(pixels)
        grids.append(grid)
    return patches, grids


def encode_sft(example: dict[str, Any], *, task: str, tokenizer: PreTrainedTokenizerBase,
               options: EncodeOptions, response_template: str = "{answer}") -> dict[str, Any]:
    """One example -> input_ids, loss_mask (1 on the response and its `<|im_end|>`), images.

    `response_template` formats the target from the answer: the paper's SFT trains on the bare
    answer; "\\\\boxed{{{answer}}}" trains the boxed form the reward reads.
    """
    patches, grids = _images(example, options, task)
    problem = prompt_text(task, example["problem"], cot=options.cot)
    response = response_template.format(answer=example["answer"])
    ids, mask = encode_sft_example(tokenizer, problem, response, grids,
                                   merge_size=options.merge_size)
    return {"input_ids": np.asarray(ids, np.int32), "loss_mask": np.asarray(mask, np.int32),
            "patches": patches, "grids": grids, "instance_id": example["instance_id"],
            "answer": example["answer"]}


def encode_prompt_only(example: dict[str, Any], *, task: str,
                       tokenizer: PreTrainedTokenizerBase,
                       options: EncodeOptions) -> dict[str, Any]:
    """One example -> prompt ids (ending in the assistant turn) and images, for sampling."""
    patches, grids = _images(example, options, task)
    problem = prompt_text(task, example["problem"], cot=options.cot)
    ids = encode_prompt(tokenizer, problem, grids, merge_size=options.merge_size)
    return {"input_ids": np.asarray(ids, np.int32), "patches": patches, "grids": grids,
            "instance_id": example["instance_id"], "answer": example["answer"]}


def collate(examples: Sequence[dict[str, Any]], *, options: EncodeOptions, pad_id: int,
            left_pad: bool, valid: Sequence[bool] | None = None) -> dict[str, np.ndarray]:
    """Pads a list of encoded examples into one fixed-shape batch.

    Returns input_ids / attention_mask (and loss_mask for SFT) [batch, bucket], pixel_values
    [patch bucket, 1176] with image_grid_thw [num_images, 3] (images in row order) and
    image_counts [batch] (images per row), num_patches (the real patch count), instance_id
    [batch], answer [batch] (object),
    valid [batch] (False for filler rows of the last evaluation batch).
    """
    longest = max(examples, key=lambda e: len(e["input_ids"]))
    length = options.bucket(len(longest["input_ids"]), f"instance {longest['instance_id']}")
    batch = len(examples)
    ids = np.full((batch, length), pad_id, np.int32)
    attention = np.zeros((batch, length), np.int32)
    has_loss = "loss_mask" in examples[0]
    loss = np.zeros((batch, length), np.int32)
    for row, example in enumerate(examples):
        n = len(example["input_ids"])
        cols = slice(length - n, length) if left_pad else slice(0, n)
        ids[row, cols] = example["input_ids"]
        attention[row, cols] = 1
        if has_loss:
            loss[row, cols] = example["loss_mask"]
    patches = [p for e in examples for p in e["patches"]]
    grids = [g for e in examples for g in e["grids"]]
    num_patches = sum(len(p) for p in patches)
    pixel_values = np.zeros((options.patch_bucket(num_patches), PATCH_DIM), np.float32)
    if patches:
        pixel_values[:num_patches] = np.concatenate(patches)
    out = {
        "input_ids": ids,
        "attention_mask": attention,
        "pixel_values": pixel_values,
        "image_grid_thw": np.asarray(grids, np.int32).reshape(-1, 3),
        "image_counts": np.asarray([len(e["grids"]) for e in examples], np.int32),
        "num_patches": np.int32(num_patches),
        "instance_id": np.asarray([e["instance_id"] for e in examples], np.int64),
        "answer": np.asarray([e["answer"] for e in examples], object),
        "valid": np.asarray(valid if valid is not None else [True] * batch, bool),
    }
    if has_loss:
        out["loss_mask"] = loss
    return out


def _pad_id(tokenizer: PreTrainedTokenizerBase) -> int:
    return int(tokenizer.pad_token_id if tokenizer.pad_token_id is not None
               else tokenizer.eos_token_id)


def _global_batches(examples: grain.MapDataset, encode: Callable[[Any], Any],
                   collate_fn: Callable[[list[Any]], dict[str, np.ndarray]], *,
                   batch_size: int, drop_remainder: bool, process_index: int,
                   process_count: int) -> GlobalBatches:
    shares = examples.batch(batch_size, drop_remainder=drop_remainder, batch_fn=list).map(
        lambda batch: encode_share(batch, encode, process_index, process_count))
    return GlobalBatches(shares.to_iter_dataset(READ_OPTIONS), collate_fn, process_count)


def sft_dataset(source: grain.MapDataset, *, task: str, tokenizer: PreTrainedTokenizerBase,
                batch_size: int, seed: int, options: EncodeOptions = EncodeOptions(),
                num_epochs: int | None = None, process_index: int = 0, process_count: int = 1,
                response_template: str = "{answer}") -> GlobalBatches:
    """Shuffled SFT batches (a new order each epoch); `num_epochs=None` repeats forever."""
    pad_id = _pad_id(tokenizer)
    return _global_batches(
        source.shuffle(seed=seed).repeat(num_epochs),
        lambda e: encode_sft(e, task=task, tokenizer=tokenizer, options=options,
                             response_template=response_template),
        lambda es: collate(es, options=options, pad_id=pad_id, left_pad=False),
        batch_size=batch_size, drop_remainder=True, process_index=process_index,
        process_count=process_count)


def rl_dataset(source: grain.MapDataset, *, task: str, tokenizer: PreTrainedTokenizerBase,
               batch_size: int, seed: int, options: EncodeOptions = EncodeOptions(),
               num_epochs: int | None = None, process_index: int = 0,
               process_count: int = 1) -> GlobalBatches:
    """Shuffled batches of left-padded prompts with their answers, for rollouts."""
    pad_id = _pad_id(tokenizer)
    return _global_batches(
        source.shuffle(seed=seed).repeat(num_epochs),
        lambda e: encode_prompt_only(e, task=task, tokenizer=tokenizer, options=options),
        lambda es: collate(es, options=options, pad_id=pad_id, left_pad=True),
        batch_size=batch_size, drop_remainder=True, process_index=process_index,
        process_count=process_count)


def eval_dataset(source: grain.MapDataset, *, task: str, tokenizer: PreTrainedTokenizerBase,
                 batch_size: int, options: EncodeOptions = EncodeOptions(),
                 process_index: int = 0, process_count: int = 1) -> GlobalBatches:
    """Every example once, in order, in full batches (`valid` marks the real rows; the filler
    rows of the last batch repeat the last example)."""
    size = len(source)
    if size == 0:
        raise ValueError(f"{task}: no examples to evaluate")
    padded = -(-size // batch_size) * batch_size
    pad_id = _pad_id(tokenizer)
    return _global_batches(
        grain.MapDataset.range(padded),
        lambda i: (encode_prompt_only(source[min(i, size - 1)], task=task, tokenizer=tokenizer,
                                      options=options), i < size),
        lambda pairs: collate([p[0] for p in pairs], options=options, pad_id=pad_id,
                              left_pad=True, valid=[p[1] for p in pairs]),
        batch_size=batch_size, drop_remainder=False, process_index=process_index,
        process_count=process_count)
