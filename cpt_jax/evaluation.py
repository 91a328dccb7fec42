"""Task accuracy of a model: greedy answers to a task's test split, scored by the paper's reward.

The accuracy of an answer is the reward's accuracy component (`cpt_jax.data.tasks.reward_fn`):
with chain of thought the `\\boxed{}` answer graded by mathruler, without it the direct
answer. Decoding is greedy and stops at the end of the assistant turn; one jitted sampler
serves every task, so an evaluation of all tasks compiles once per prompt shape.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import grain
from flax import nnx
from transformers import PreTrainedTokenizerBase

from cpt_jax.data.pipeline import EncodeOptions, eval_dataset
from cpt_jax.data.tasks import reward_fn
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL
from cpt_jax.rl.groups import answer_texts
from cpt_jax.rl.sampler import (
    Rollout,
    SamplingConfig,
    make_sampler,
    prepare_prompts,
    turn_stop_ids,
)
from cpt_jax.sharding import to_host


@dataclass
class TaskAccuracy:
    task: str
    accuracy: float
    n: int
    samples: list[dict[str, str]] = field(default_factory=list)


def greedy_sampler(model: Qwen2_5_VL, tokenizer: PreTrainedTokenizerBase,
                   max_new_tokens: int) -> Callable[..., Rollout]:
    """The jitted greedy sampler for this model shape, stopping at the end of the turn."""
    pad = model.config.pad_token_id
    return make_sampler(model, SamplingConfig.greedy(max_new_tokens),
                        stop_ids=turn_stop_ids(tokenizer), pad_id=pad if pad is not None else 0)


def evaluate_task(model: Qwen2_5_VL, states: Sequence[nnx.State], source: grain.MapDataset, *,
                  task: str, tokenizer: PreTrainedTokenizerBase,
                  sample: Callable[..., Rollout], batch_size: int, options: EncodeOptions,
                  keep_samples: int = 3, process_index: int = 0,
                  process_count: int = 1) -> TaskAccuracy:
    """Accuracy over every example of `source`, answered by `sample` with the model `states`
    (`model` gives the shapes only). In a multi-host run every process calls it with its
    index: each encodes its share of the prompts, and all get the same accuracy."""
    score = reward_fn(task, cot=options.cot)
    correct, count, samples = 0.0, 0, []
    for batch in eval_dataset(source, task=task, tokenizer=tokenizer, batch_size=batch_size,
                              options=options, process_index=process_index,
                              process_count=process_count):
        rollout = sample(states, prepare_prompts(model, batch))
        texts = answer_texts(tokenizer, to_host(rollout.tokens), to_host(rollout.mask))
        valid = [i for i, ok in enumerate(batch["valid"]) if ok]
        answers = [str(batch["answer"][i]) for i in valid]
        scores = score([texts[i] for i in valid], answers)
        correct += sum(s["accuracy"] for s in scores)
        count += len(valid)
        samples += [{"prediction": texts[i], "answer": a}
                    for i, a in zip(valid, answers, strict=True)][:keep_samples - len(samples)]
    return TaskAccuracy(task, correct / max(1, count), count, samples)
