"""The GRPO step: rollouts -> rewards -> advantages -> old and reference log-probs -> clipped
policy-gradient updates with a KL term, as EasyR1 runs it.

One step consumes one rollout batch of `prompts_per_step` prompts x `group_size` answers:
1. the sampler draws the answers (one jitted program), the host decodes and scores them;
2. with `online_filter`, groups whose answers all got the same reward (no signal) are
   dropped and later prompt batches are sampled to fill the step (DAPO's dynamic sampling);
3. GRPO (or RLOO) advantages per group; the training batch is padded to static shapes, each
   prompt and its images held once per group (`groups.shared_prefix_batch`): the forwards
   below run a prompt once and its answers against its keys and values (`PromptKV`), not the
   prompt once per answer;
4. the log-probs of the answers under the policy before the update ("old") and under the
   reference model, one jitted forward each; with one update per rollout (`on_policy`) the
   old log-probs are the update's own, held constant, and that forward is skipped (TRL does
   the same with one iteration);
5. `ppo_epochs` passes over `mini_batches` optimizer updates, each accumulating gradients over
   micro-batches with `lax.scan`: loss = policy loss + kl_coef x KL, both token means over the
   micro-batch, divided by the number of micro-batches (EasyR1); the answers' pass is
   differentiated and summed before the prompts' pass.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, Literal, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from transformers import PreTrainedTokenizerBase

from cpt_jax.data.tasks import ScoreFn
from cpt_jax.models.qwen2_5_vl import PromptKV, Qwen2_5_VL
from cpt_jax.optim import current_learning_rate
from cpt_jax.rl import algorithms
from cpt_jax.rl.groups import Group, shared_prefix_batch, split_into_groups
from cpt_jax.rl.sampler import SamplingConfig, make_sampler, prepare_prompts, turn_stop_ids
from cpt_jax.sft import TrainState, per_position, target_logprobs
from cpt_jax.sharding import constrain_state

UpdateBatch = dict[str, Any]
MODEL_INPUTS = ("prompt_ids", "prompt_positions", "prompt_mask", "vision", "answer_ids",
                 "response_mask")


@dataclass(frozen=True)
class GRPOConfig:
    """The algorithm's settings; the defaults are the paper's (DESIGN.md section 1)."""

    group_size: int = 8
    max_new_tokens: int = 1024
    temperature: float = 1.0
    top_p: float = 0.99
    top_k: int = 0
    advantage: Literal["grpo", "rloo"] = "grpo"
    ppo_epochs: int = 1
    mini_batches: int = 1
    micro_batch_rows: int = 8
    clip_low: float = 0.2
    clip_high: float = 0.3
    clip_dual: float = 3.0
    kl_coef: float = 0.01
    kl_kind: algorithms.KLKind = "low_var_kl"
    loss_agg: algorithms.LossAgg = "token-mean"
    online_filter: bool = False
    max_fill_batches: int = 4
    min_patches: int = 64

    def __post_init__(self) -> None:
        if self.group_size < 2:
            raise ValueError(f"group_size must be > 1 for GRPO/RLOO, got {self.group_size}")
        if self.advantage not in ("grpo", "rloo"):
            raise ValueError(f"advantage must be 'grpo' or 'rloo', got {self.advantage!r}")
        for name in ("ppo_epochs", "mini_batches", "micro_batch_rows", "max_fill_batches"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.kl_coef < 0:
            raise ValueError(f"kl_coef must be >= 0, got {self.kl_coef}")
        if self.micro_batch_rows % self.group_size and self.group_size % self.micro_batch_rows:
            raise ValueError(f"micro_batch_rows {self.micro_batch_rows} must be a multiple or "
                             f"a divisor of group_size {self.group_size} (a micro-batch holds "
                             f"whole groups or equal parts of one)")

    @property
    def on_policy(self) -> bool:
        """One update per rollout: the policy it starts from is the one that sampled, so the
        old log-probs equal the update's own (ratio 1, the clip never binds)."""
        return self.ppo_epochs == 1 and self.mini_batches == 1

    @property
    def sampling(self) -> SamplingConfig:
        return SamplingConfig(max_new_tokens=self.max_new_tokens, group_size=self.group_size,
                              temperature=self.temperature, top_p=self.top_p, top_k=self.top_k)

    def check_batch(self, prompts_per_step: int) -> None:
        """The rollout batch must split into mini-batches of whole groups, and those into
        micro-batches of `micro_batch_rows` answers."""
        if prompts_per_step % self.mini_batches:
            raise ValueError(f"prompts_per_step {prompts_per_step} is not divisible by "
                             f"mini_batches {self.mini_batches}")
        rows = prompts_per_step // self.mini_batches * self.group_size
        if rows % self.micro_batch_rows:
            raise ValueError(f"micro_batch_rows {self.micro_batch_rows} does not divide a "
                             f"mini-batch of {rows} answers")


class PromptPass(NamedTuple):
    """What the answers' pass needs of their prompts' pass: each prompt's last hidden state
    [prompts, 1, hidden] (it predicts answer token 0) and its keys and values (`PromptKV`)."""

    last_hidden: jax.Array
    kv: PromptKV


def prompt_pass(model: Qwen2_5_VL, micro: UpdateBatch) -> PromptPass:
    """The prompts (and their images) of `groups.shared_prefix_batch`'s layout, once each."""
    hidden, kv = model.hidden_states(micro["prompt_ids"], micro["prompt_positions"],
                                     micro["prompt_mask"], micro.get("vision"), keep_kv=True)
    return PromptPass(hidden[:, -1:], kv)


def answer_logprobs(model: Qwen2_5_VL, micro: UpdateBatch, prompt: PromptPass,
                    temperature: float) -> tuple[jax.Array, jax.Array]:
    """log softmax(logits / temperature) of each answer token given the tokens before it, and
    the entropy of that distribution: the answers run as one group per prompt over their
    prompt's keys and values (as a `GroupCache` in decoding). [answers, max_new] each: column
    t is answer token t."""
    prompts = micro["prompt_ids"].shape[0]
    rows, answer_length = micro["answer_ids"].shape
    group = rows // prompts
    start = jnp.repeat(prompt.kv.next_position, group, axis=0)
    positions = start[:, None] + jnp.arange(answer_length, dtype=jnp.int32)
    positions = jnp.broadcast_to(positions[None], (3, rows, answer_length))
    answer_hidden, _ = model.hidden_states(micro["answer_ids"], positions,
                                           micro["response_mask"], prefix=prompt.kv)
    # Answer token t is predicted by the hidden state before it: the prompt's last for t = 0.
    before = jnp.concatenate([jnp.repeat(prompt.last_hidden, group, axis=0),
                              answer_hidden[:, :-1]], axis=1)
    scale = 1.0 / (temperature if temperature > 0 else 1.0)

    def stats(logits: jax.Array, targets: jax.Array) -> tuple[jax.Array, jax.Array]:
        logits = logits * scale
        return target_logprobs(logits, targets), algorithms.entropy_from_logits(logits)

    return per_position(model, before, micro["answer_ids"], stats)


def shared_prefix_logprobs(model: Qwen2_5_VL, micro: UpdateBatch, temperature: float
                           ) -> tuple[jax.Array, jax.Array]:
    """`answer_logprobs` after `prompt_pass`: each prompt's work is done once per group
    instead of once per answer."""
    return answer_logprobs(model, micro, prompt_pass(model, micro), temperature)


def make_logprob_fn(model: nnx.Module, temperature: float
                    ) -> Callable[[Sequence[nnx.State], UpdateBatch], jax.Array]:
    """`fn(states, batch) -> logprobs [M, m, max_new]` over stacked micro-batches, one jitted
    program (for the old policy's and the reference model's log-probs; no gradients)."""
    fn = logprob_program(model, temperature)
    return lambda states, batch: fn(tuple(states), batch)


def logprob_program(model: nnx.Module, temperature: float
                    ) -> Callable[[tuple[nnx.State, ...], UpdateBatch], jax.Array]:
    """`make_logprob_fn`'s jitted program itself (states as a tuple): what `cpt_jax.plan`
    compiles as the reference forward."""
    graphdef = nnx.graphdef(model)

    @jax.jit
    def fn(states: tuple[nnx.State, ...], batch: UpdateBatch) -> jax.Array:
        model = nnx.merge(graphdef, *states)
        return jax.lax.map(
            lambda micro: shared_prefix_logprobs(model, micro, temperature)[0], batch)

    return fn


def grpo_loss(model: Qwen2_5_VL, micro: UpdateBatch, config: GRPOConfig,
              prompt: PromptPass | None = None) -> tuple[jax.Array, dict[str, jax.Array]]:
    """One micro-batch's policy loss + kl_coef x KL, and its metrics; `prompt`: the prompts'
    pass, when the caller has made it. Without `old_logprobs` in the micro-batch
    (`GRPOConfig.on_policy`), the old policy is this one."""
    if prompt is None:
        prompt = prompt_pass(model, micro)
    logprobs, entropy = answer_logprobs(model, micro, prompt, config.temperature)
    mask = micro["response_mask"]
    old = micro.get("old_logprobs", jax.lax.stop_gradient(logprobs))
    pg_loss, metrics = algorithms.policy_loss(
        logprobs, old, micro["advantages"], mask, clip_low=config.clip_low,
        clip_high=config.clip_high, clip_dual=config.clip_dual, loss_agg=config.loss_agg)
    loss = pg_loss
    metrics = {**metrics, "pg_loss": pg_loss, "entropy": algorithms.masked_mean(entropy, mask)}
    if config.kl_coef > 0:
        kl = algorithms.kl_loss(logprobs, micro["ref_logprobs"], mask, kind=config.kl_kind,
                                loss_agg=config.loss_agg)
        loss = loss + config.kl_coef * kl
        metrics["kl_loss"] = kl
    return loss, {**metrics, "loss": loss}


def make_grpo_update(model: nnx.Module, optimizer: optax.GradientTransformation,
                     config: GRPOConfig) -> Callable[[TrainState, UpdateBatch],
                                                     tuple[TrainState, dict[str, jax.Array]]]:
    """`update(state, batch) -> (state, metrics)`: one optimizer update from stacked
    micro-batches (`batch` arrays lead with [micro_batches, rows]), jitted, state donated.

    Gradients of loss / micro_batches are summed over the micro-batches (EasyR1); metrics are
    their means, plus grad_norm (before clipping) and learning_rate.
    """
    graphdef = nnx.graphdef(model)

    def update(state: TrainState, batch: UpdateBatch) -> tuple[TrainState, dict[str, jax.Array]]:
        micro_batches = batch["answer_ids"].shape[0]

        def add(grads: nnx.State, more: nnx.State) -> nnx.State:
            return constrain_state(jax.tree.map(lambda g, m: g + m.astype(jnp.float32),
                                                grads, more))

        def accumulate(grads, micro):
            """The answers' gradient is added to `grads` before the prompts' pass is
            differentiated, so one parameter-sized gradient is alive beside `grads`, not two
            (autodiff of the whole loss held both: the 7B update on a v5p-8 needed 58.1 GiB
            per chip, now 53.4)."""
            def prompts(params: nnx.State) -> PromptPass:
                return prompt_pass(nnx.merge(graphdef, params, state.rest), micro)

            def answers(params: nnx.State, prompt: PromptPass):
                model = nnx.merge(graphdef, params, state.rest)
                loss, metrics = grpo_loss(model, micro, config, prompt)
                return loss / micro_batches, metrics

            prompt, prompts_vjp = jax.vjp(prompts, state.params)
            loss, answers_vjp, metrics = jax.vjp(answers, state.params, prompt, has_aux=True)
            answer_grads, prompt_cotangent = answers_vjp(jnp.ones_like(loss))
            grads = add(grads, answer_grads)
            # The prompts' backward pass waits for that sum, and the answers' gradient dies.
            grads, prompt_cotangent = jax.lax.optimization_barrier((grads, prompt_cotangent))
            (prompt_grads,) = prompts_vjp(prompt_cotangent)
            return add(grads, prompt_grads), metrics

        zeros = constrain_state(jax.tree.map(lambda p: jnp.zeros(p.shape, jnp.float32),
                                             state.params))
        grads, metrics = jax.lax.scan(accumulate, zeros, batch)
        updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
        params = optax.apply_updates(state.params, updates)
        metrics = {**jax.tree.map(jnp.mean, metrics), "grad_norm": optax.tree.norm(grads),
                   "learning_rate": current_learning_rate(opt_state)}
        return state.replace(params=params, opt_state=opt_state, step=state.step + 1), metrics

    return jax.jit(update, donate_argnums=0)


def group_advantages(groups: Sequence[Group], config: GRPOConfig) -> np.ndarray:
    """Per-answer advantages [sum of group sizes], prompt-major, by the configured estimator."""
    rewards = jnp.asarray(np.concatenate([g.rewards for g in groups]))
    estimate = (algorithms.grpo_advantages if config.advantage == "grpo"
                else algorithms.rloo_advantages)
    return np.asarray(estimate(rewards, config.group_size))


class GRPOTrainer:
    """Runs GRPO steps for one model shape: holds the jitted sampler, log-prob and update
    programs, the reference model's state and the scoring function.

    `reference` is the reference model's state (the stage-0 base in the paper; a previous
    stage's model is as good), used only when kl_coef > 0.
    """

    def __init__(self, model: Qwen2_5_VL, optimizer: optax.GradientTransformation,
                 config: GRPOConfig, *, tokenizer: PreTrainedTokenizerBase, score_fn: ScoreFn,
                 reference: Sequence[nnx.State] | None = None,
                 stop_ids: Sequence[int] | None = None,
                 place: Callable[[UpdateBatch], UpdateBatch] | None = None):
        self.config = config
        self.place = place or (lambda batch: batch)
        self.tokenizer = tokenizer
        self.score_fn = score_fn
        self.reference = tuple(reference) if reference is not None else None
        if config.kl_coef > 0 and self.reference is None:
            raise ValueError("kl_coef > 0 needs the reference model's state (reference=...)")
        pad = model.config.pad_token_id
        self.pad_id = pad if pad is not None else 0
        stops = list(stop_ids) if stop_ids is not None else turn_stop_ids(tokenizer)
        self._template = model  # shape only: prepare_inputs and the graph definition
        self.sample = make_sampler(model, config.sampling, stop_ids=stops, pad_id=self.pad_id)
        self.logprobs = make_logprob_fn(model, config.temperature)
        self.update = make_grpo_update(model, optimizer, config)

    def rollout_groups(self, states: Sequence[nnx.State], batch: dict[str, np.ndarray],
                       key: jax.Array, task: str = "") -> list[Group]:
        """Sample and score one prompt batch: one `Group` per valid prompt."""
        rollout = self.sample(states, prepare_prompts(self._template, batch), key)
        return split_into_groups(batch, rollout, tokenizer=self.tokenizer,
                                 score_fn=self.score_fn, group_size=self.config.group_size,
                                 task=task)

    def collect(self, state: TrainState, prompt_batches: Iterator[dict[str, np.ndarray]],
                key: jax.Array, task: str = "") -> tuple[list[Group], dict[str, float], int]:
        """The step's groups: one prompt batch, or with online filtering as many as it takes
        (at most max_fill_batches) to fill it with groups whose rewards differ; if they run
        out, dropped groups fill the rest (zero advantage) and `filter/filled` counts them.
        Also returns the widest prompt batch's padded length."""
        states = (state.params, state.rest)
        kept, dropped, sampled, wanted, width = [], [], 0, None, 0
        while wanted is None or (len(kept) < wanted and sampled < self.config.max_fill_batches):
            batch = next(prompt_batches)
            wanted = wanted or int(batch["valid"].sum() if "valid" in batch
                                   else len(batch["input_ids"]))
            width = max(width, batch["input_ids"].shape[1])
            key, sub = jax.random.split(key)
            groups = self.rollout_groups(states, batch, sub, task)
            sampled += 1
            if not self.config.online_filter:
                kept = groups
                break
            kept += [g for g in groups if not g.zero_variance]
            dropped += [g for g in groups if g.zero_variance]
        filled = max(0, wanted - len(kept))
        chosen = kept[:wanted] + dropped[:filled]
        every = kept + dropped
        stats = {"filter/prompt_batches": float(sampled),
                 "filter/kept_fraction": len(kept) / max(1, len(every)),
                 "filter/filled": float(filled)}
        return chosen, stats, width

    def step(self, state: TrainState, prompt_batches: Iterator[dict[str, np.ndarray]],
             key: jax.Array, task: str = "") -> tuple[TrainState, dict[str, float], list[Group]]:
        """One GRPO step; returns the new state, the step's metrics and its scored groups."""
        config = self.config
        groups, metrics, prompt_length = self.collect(state, prompt_batches, key, task)
        config.check_batch(len(groups))
        advantages = group_advantages(groups, config)
        per_mini = len(groups) // config.mini_batches
        minis = []
        for k in range(config.mini_batches):
            chosen = groups[k * per_mini:(k + 1) * per_mini]
            batch = shared_prefix_batch(chosen, self._template, prompt_length=prompt_length,
                                        rows_per_micro_batch=config.micro_batch_rows,
                                        min_patches=config.min_patches, pad_id=self.pad_id)
            rows = slice(k * per_mini * config.group_size, (k + 1) * per_mini * config.group_size)
            batch["advantages"] = advantages[rows].reshape(batch["answer_ids"].shape[:2])
            batch.pop("sampler_logprobs")
            batch = self.place(batch)
            inputs = {name: batch[name] for name in MODEL_INPUTS}  # one pytree: one program
            if not config.on_policy:
                batch["old_logprobs"] = self.logprobs((state.params, state.rest), inputs)
            if config.kl_coef > 0:
                batch["ref_logprobs"] = self.logprobs(self.reference, inputs)
            minis.append(batch)
        update_metrics = []
        for _ in range(config.ppo_epochs):
            for batch in minis:
                state, m = self.update(state, batch)
                update_metrics.append(m)
        metrics.update({f"actor/{k}": float(np.mean([float(m[k]) for m in update_metrics]))
                        for k in update_metrics[0]})
        metrics.update(rollout_metrics(groups))
        return state, metrics, groups


def rollout_metrics(groups: Sequence[Group]) -> dict[str, float]:
    """Reward mean / std, accuracy, format rate, answer length, share of answers cut off."""
    scores = [s for g in groups for s in g.scores]
    rewards = np.asarray([s["overall"] for s in scores])
    lengths = np.concatenate([g.mask.sum(-1) for g in groups])
    budget = groups[0].mask.shape[1]
    return {"reward/mean": float(rewards.mean()), "reward/std": float(rewards.std()),
            "reward/accuracy": float(np.mean([s["accuracy"] for s in scores])),
            "reward/format": float(np.mean([s["format"] for s in scores])),
            "response/length": float(lengths.mean()),
            "response/clip_ratio": float(np.mean(lengths >= budget)),
            "reward/zero_variance_groups": float(np.mean([g.zero_variance for g in groups]))}
