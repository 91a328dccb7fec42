"""Rollout-based instance filtering (RIF), offline: before a stage, the current model answers
every training instance `n` times and only the instances worth training on are kept.

- "solvable" (the paper's released filter): at least one of the n answers is correct.
- "learnable" (stricter): some but not all are correct; an instance every answer solves has
  zero reward variance and gives GRPO no gradient.

The per-instance pass counts are saved (JSON) so a resumed or audited run sees the same
selection; `select` turns them into the filtered training source.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import grain
import jax
import numpy as np
from flax import nnx
from transformers import PreTrainedTokenizerBase

from cpt_jax.data.pipeline import EncodeOptions, eval_dataset
from cpt_jax.data.tasks import ScoreFn
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL
from cpt_jax.rl.groups import split_into_groups
from cpt_jax.rl.sampler import SamplingConfig, make_sampler, prepare_prompts

FilterMode = Literal["solvable", "learnable"]


@dataclass
class PassCounts:
    """How many of `group_size` answers were correct, per training instance of one task."""

    task: str
    group_size: int
    counts: dict[int, int]

    def keeps(self, count: int, mode: FilterMode) -> bool:
        if mode == "solvable":
            return count > 0
        if mode == "learnable":
            return 0 < count < self.group_size
        raise ValueError(f"unknown RIF mode {mode!r} (solvable or learnable)")

    def kept_ids(self, mode: FilterMode) -> list[int]:
        return sorted(i for i, c in self.counts.items() if self.keeps(c, mode))

    def kept_fraction(self, mode: FilterMode) -> float:
        return len(self.kept_ids(mode)) / max(1, len(self.counts))

    def summary(self) -> dict[str, float]:
        """Kept fractions for both modes, and the share of instances all answers solve."""
        counts = np.asarray(list(self.counts.values()))
        return {"instances": float(len(counts)),
                "kept_fraction/solvable": self.kept_fraction("solvable"),
                "kept_fraction/learnable": self.kept_fraction("learnable"),
                "all_correct_fraction": float(np.mean(counts == self.group_size)),
                "pass_rate": float(counts.mean() / self.group_size) if len(counts) else 0.0}

    def save(self, path: os.PathLike | str) -> None:
        Path(path).write_text(json.dumps(
            {"task": self.task, "group_size": self.group_size,
             "counts": {str(k): v for k, v in sorted(self.counts.items())}}, indent=1) + "\n")

    @classmethod
    def load(cls, path: os.PathLike | str) -> PassCounts:
        try:
            data = json.loads(Path(path).read_text())
            return cls(data["task"], int(data["group_size"]),
                       {int(k): int(v) for k, v in data["counts"].items()})
        except (OSError, ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}: not a RIF pass-count file ({error})") from error


def count_passes(model: Qwen2_5_VL, states: Sequence[nnx.State], source: grain.MapDataset, *,
                 task: str, tokenizer: PreTrainedTokenizerBase, score_fn: ScoreFn,
                 sampling: SamplingConfig, batch_size: int, options: EncodeOptions,
                 key: jax.Array, stop_ids: Sequence[int], process_index: int = 0,
                 process_count: int = 1) -> PassCounts:
    """Samples `sampling.group_size` answers for every instance of `source` and counts the
    correct ones (accuracy score 1). In a multi-host run every process calls it with its index
    (each encodes its share of the prompts) and gets every instance's count."""
    pad = model.config.pad_token_id
    sample = make_sampler(model, sampling, stop_ids=stop_ids, pad_id=pad if pad is not None else 0)
    counts: dict[int, int] = {}
    for batch in eval_dataset(source, task=task, tokenizer=tokenizer, batch_size=batch_size,
                              options=options, process_index=process_index,
                              process_count=process_count):
        key, sub = jax.random.split(key)
        rollout = sample(states, prepare_prompts(model, batch), sub)
        for group in split_into_groups(batch, rollout, tokenizer=tokenizer, score_fn=score_fn,
                                       group_size=sampling.group_size, task=task):
            counts[group.instance_id] = group.num_correct
    return PassCounts(task, sampling.group_size, counts)


def select(source: grain.MapDataset, ids: Sequence[int]) -> grain.MapDataset:
    """The rows of `source` whose instance_id is in `ids`, in source order."""
    wanted = set(ids)
    rows = [i for i in range(len(source)) if source[i]["instance_id"] in wanted]
    missing = wanted - {source[i]["instance_id"] for i in rows}
    if missing:
        raise ValueError(f"instance ids {sorted(missing)[:5]} are not in the source "
                         f"({len(missing)} missing): pass counts from another data set?")
    return grain.MapDataset.range(len(rows)).map(lambda k: source[rows[k]])
