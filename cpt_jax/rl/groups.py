"""Rollout groups: a prompt with its sampled answers and their scores, and the fixed-shape
training batches built from a list of them (each prompt once, its answers beside it).

Working per group (rather than per prompt batch) is what lets online filtering drop the
groups that carry no signal and fill the step from later prompt batches: the training batch is
assembled from whichever groups were kept, padded to the same static shapes every time.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import jax
import numpy as np
from transformers import PreTrainedTokenizerBase

from cpt_jax.data.pipeline import patch_bucket
from cpt_jax.data.tasks import ScoreFn
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, VisionInputs
from cpt_jax.rl.sampler import Rollout
from cpt_jax.sharding import to_host


@dataclass
class Group:
    """One prompt and its `n` answers. prompt_ids holds the prompt's real tokens (no padding),
    patches / grids its images; tokens, mask and logprobs are the sampler's [n, max_new]."""

    instance_id: int
    answer: str
    prompt_ids: np.ndarray
    patches: np.ndarray
    grids: np.ndarray
    tokens: np.ndarray
    mask: np.ndarray
    logprobs: np.ndarray
    texts: list[str]
    scores: list[dict[str, float]]
    task: str = ""

    @property
    def rewards(self) -> np.ndarray:
        return np.asarray([s["overall"] for s in self.scores], np.float32)

    @property
    def num_correct(self) -> int:
        return int(sum(s["accuracy"] >= 1.0 for s in self.scores))

    @property
    def zero_variance(self) -> bool:
        """All answers got the same reward: GRPO gives them zero advantage, no signal."""
        rewards = self.rewards
        return bool(np.all(rewards == rewards[0]))


def answer_texts(tokenizer: PreTrainedTokenizerBase, tokens: np.ndarray,
                 mask: np.ndarray) -> list[str]:
    """Generated ids [rows, n] -> texts, special tokens (the stop token) dropped."""
    return [tokenizer.decode(row[keep.astype(bool)].tolist(), skip_special_tokens=True)
            for row, keep in zip(tokens, mask, strict=True)]


def split_into_groups(batch: dict[str, np.ndarray], rollout: Rollout, *,
                      tokenizer: PreTrainedTokenizerBase, score_fn: ScoreFn,
                      group_size: int, task: str = "") -> list[Group]:
    """A pipeline prompt batch and its rollout -> one scored `Group` per valid prompt row."""
    tokens, mask, logprobs = (to_host(x) for x in (rollout.tokens, rollout.mask,
                                                    rollout.logprobs))
    texts = answer_texts(tokenizer, tokens, mask)
    per_image = batch["image_grid_thw"].prod(axis=-1) if len(batch["image_grid_thw"]) else []
    image_starts = np.concatenate([[0], np.cumsum(batch["image_counts"])])
    patch_starts = np.concatenate([[0], np.cumsum(per_image)]).astype(int)
    valid = batch.get("valid", np.ones(len(batch["input_ids"]), bool))
    groups = []
    for row in range(batch["input_ids"].shape[0]):
        if not valid[row]:
            continue
        first, last = image_starts[row], image_starts[row + 1]
        rows = slice(row * group_size, (row + 1) * group_size)
        answer = str(batch["answer"][row])
        groups.append(Group(
            instance_id=int(batch["instance_id"][row]), answer=answer,
            prompt_ids=batch["input_ids"][row][batch["attention_mask"][row].astype(bool)],
            patches=batch["pixel_values"][patch_starts[first]:patch_starts[last]],
            grids=np.asarray(batch["image_grid_thw"][first:last]).reshape(-1, 3),
            tokens=tokens[rows], mask=mask[rows], logprobs=logprobs[rows], texts=texts[rows],
            scores=score_fn(texts[rows], [answer] * group_size), task=task))
    return groups


def shared_prefix_batch(groups: Sequence[Group], model: Qwen2_5_VL, *, prompt_length: int,
                        rows_per_micro_batch: int, min_patches: int = 64,
                        pad_id: int = 0) -> dict[str, Any]:
    """Groups -> the GRPO update's input with each prompt held once, stacked on a leading
    micro-batch axis.

    A micro-batch holds whole groups (or, when a group is larger than a micro-batch, a run of
    one group's answers): `prompt_ids` / `prompt_positions` / `prompt_mask` / `vision` have
    one row per prompt, left-padded to `prompt_length`, with that prompt's images once; the
    answer arrays (`answer_ids`, `response_mask`, `sampler_logprobs`) have one
    row per answer, prompt-major, `max_new` columns; every micro-batch's patches are padded
    to the same power-of-two bucket. The forward encodes the images and runs the prompt once
    per group (`grpo.shared_prefix_logprobs`); a layout with the prompt repeated per answer
    encoded each image and ran each prompt `group_size` times.
    """
    sizes = {len(g.tokens) for g in groups}
    if len(sizes) != 1:
        raise ValueError(f"groups of different sizes {sorted(sizes)} do not share one layout")
    group_size = sizes.pop()
    rows = rows_per_micro_batch
    if rows % group_size and group_size % rows:
        raise ValueError(f"rows_per_micro_batch {rows} and group size {group_size}: one must "
                         f"divide the other")
    if (len(groups) * group_size) % rows:
        raise ValueError(f"{len(groups) * group_size} answers do not split into micro-batches "
                         f"of {rows} rows")
    if max(len(g.prompt_ids) for g in groups) > prompt_length:
        raise ValueError(f"a prompt is longer than prompt_length {prompt_length}")
    answers = min(rows, group_size)  # per prompt row of a micro-batch
    parts = [(g, j) for g in groups for j in range(0, group_size, answers)]
    per_micro = max(1, rows // group_size)
    micro = [parts[i:i + per_micro] for i in range(0, len(parts), per_micro)]
    largest = max(sum(len(g.patches) for g, _ in m) for m in micro)
    patches = patch_bucket(largest, min_patches) if largest else None
    prepared = [_shared_micro_batch(m, answers, model, prompt_length, patches, pad_id)
                for m in micro]
    return jax.tree.map(lambda *xs: np.stack([np.asarray(x) for x in xs]), *prepared)


def _shared_micro_batch(parts: Sequence[tuple[Group, int]], answers: int, model: Qwen2_5_VL,
                        prompt_length: int, patches: int | None, pad_id: int
                        ) -> dict[str, Any]:
    ids = np.full((len(parts), prompt_length), pad_id, np.int32)
    attention = np.zeros((len(parts), prompt_length), np.int32)
    for i, (group, _) in enumerate(parts):
        ids[i, prompt_length - len(group.prompt_ids):] = group.prompt_ids
        attention[i, prompt_length - len(group.prompt_ids):] = 1
    images = {}
    if patches is not None and sum(len(g.grids) for g, _ in parts):
        images = {"pixel_values": np.concatenate([g.patches for g, _ in parts]),
                  "pad_patches_to": patches,
                  "image_grid_thw": np.concatenate([g.grids for g, _ in parts])}
    ids_j, positions, mask, vision, _ = model.prepare_inputs(ids, attention_mask=attention,
                                                             **images)
    if vision is None and patches is not None:  # a text-only micro-batch among image ones
        vision = VisionInputs.blank(model.config.vision, pad_to=patches)

    def answer_rows(field: str) -> np.ndarray:
        return np.concatenate([getattr(g, field)[j:j + answers] for g, j in parts])

    return {"prompt_ids": np.asarray(ids_j), "prompt_positions": np.asarray(positions),
            "prompt_mask": np.asarray(mask), "vision": vision,
            "answer_ids": answer_rows("tokens").astype(np.int32),
            "response_mask": answer_rows("mask").astype(np.int32),
            "sampler_logprobs": answer_rows("logprobs").astype(np.float32)}
