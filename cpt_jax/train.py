"""Continual post-training: `python -m cpt_jax.train --config configs/X.yaml [key=value ...]`.

The run evaluates the model on every task, then trains the configured stages one after the
other (SFT or GRPO; `multitask` mixes all stages' data into one stage; `rif` filters each
GRPO stage's instances by rollouts first) and evaluates every task after each stage. It
writes, under `output_dir` (a folder or a `gs://` URL): `config.yaml` (the resolved
configuration), `metrics.jsonl` and TensorBoard events, `results.json` (the accuracy matrix
and its scores, rewritten after each evaluation), `checkpoints/` (rolling in-stage
checkpoints and each stage's final model) and, for a preset model, the tokenizer it built.
`--resume` continues from the newest rolling checkpoint with the same data order (the data
iterator's state is in the checkpoint), the same random keys (derived from the seed, the
stage and the step) and so the same final parameters as a run never stopped.

What can be wrong with the inputs (a config key, a data folder, a checkpoint of another
shape) is reported as one line before the first compile.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import optax
from flax import nnx
from tqdm import tqdm
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cpt_jax.checkpoint import CheckpointError, Checkpoints, abstract
from cpt_jax.config import (
    ConfigError,
    OptimConfig,
    RunConfig,
    grpo_config,
    load_run_config,
    mesh_shape,
    save_run_config,
    stage_algorithm,
)
from cpt_jax.data import build
from cpt_jax.data.pipeline import EncodeOptions, rl_dataset, sft_dataset
from cpt_jax.data.sources import SourceNotBuiltError, load_source
from cpt_jax.data.tasks import SYNTHETIC_GENERAL, SYNTHETIC_PRETRAIN, SYNTHETIC_STAGES, reward_fn
from cpt_jax.data.tokenizer import task_tokenizer
from cpt_jax.evaluation import evaluate_task, greedy_sampler
from cpt_jax.metrics_log import MetricsLog
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, from_pretrained, preset
from cpt_jax.optim import make_optimizer
from cpt_jax.report import write_plots
from cpt_jax.results import results, write_results
from cpt_jax.rl.grpo import GRPOTrainer
from cpt_jax.rl.rif import PassCounts, count_passes, select
from cpt_jax.rl.sampler import SamplingConfig, turn_stop_ids
from cpt_jax.run_dir import RunDir, StagingError
from cpt_jax.sft import TrainState, make_sft_step, make_sft_steps, stack_micro_batches
from cpt_jax.sharding import make_mesh, shard_batch, shard_state

TOKENIZER_DIR = "tokenizer"


@dataclass(frozen=True)
class Stage:
    """One training phase: its tasks (all of them in a multitask run) and algorithm. Row
    `index` (1-based) of the accuracy matrix is the model after it."""

    index: int
    tasks: tuple[str, ...]
    algorithm: str
    epochs: tuple[float, ...]
    steps: int | None  # fixed by the config, else from the epochs and the (filtered) data
    learning_rate: float | None = None  # overrides the algorithm's optim.learning_rate

    @property
    def name(self) -> str:
        return "+".join(self.tasks) if len(self.tasks) < 3 else f"{len(self.tasks)} tasks"


@dataclass
class Progress:
    """Where the run is: what a rolling checkpoint's metadata holds besides the arrays."""

    stage: int  # 1-based stage being trained (len(stages) + 1: all done)
    stage_step: int  # updates made in that stage
    offset: int  # updates made in the stages before it
    stage_steps: int  # updates the stage makes
    iterator: dict[str, Any] | None  # the stage's data iterator state
    matrix: list[list[float]]
    general: dict[str, list[float]]
    pass_counts: dict[str, Any] | None  # RIF counts of the stage (rif mode)
    saves: int = 0  # rolling checkpoints written: the next one's number

    @property
    def global_step(self) -> int:
        return self.offset + self.stage_step


def plan_stages(config: RunConfig) -> list[Stage]:
    """The configured stages; a multitask run trains one stage on all of them at once."""
    if config.mode == "multitask":
        algorithms = {stage_algorithm(config, s) for s in config.stages}
        if len(algorithms) > 1:
            raise ConfigError(f"stages: a multitask run trains one algorithm, got "
                              f"{sorted(algorithms)}")
        steps = [s.steps for s in config.stages]
        return [Stage(1, tuple(s.task for s in config.stages), algorithms.pop(),
                      tuple(s.epochs for s in config.stages),
                      sum(steps) if None not in steps else None)]
    return [Stage(i + 1, (s.task,), stage_algorithm(config, s), (s.epochs,), s.steps,
                  s.learning_rate) for i, s in enumerate(config.stages)]


def _unique(items: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(items))


class ContinualRun:
    """A configured run, ready to train: data found, tokenizer and model built, the
    checkpoint restored when resuming. `run()` does the long work."""

    def __init__(self, config: RunConfig, *, resume: bool = False):
        self.config = config
        self.run_dir = RunDir(config.output_dir, config.staging_dir,
                              process_index=jax.process_index())
        self.out = self.run_dir.local  # where config, metrics, results and plots are written
        self.leader = jax.process_index() == 0
        # Each process encodes its share of every batch (see cpt_jax.data.pipeline).
        self.processes = {"process_index": jax.process_index(),
                          "process_count": jax.process_count()}
        self.mesh = make_mesh(mesh_shape(config.mesh, jax.device_count()))
        self.stages = plan_stages(config)
        self.tasks = _unique([t for stage in self.stages for t in stage.tasks])
        self.general = [t for t in _unique(config.data.general_tasks) if t not in self.tasks]
        self.options = encode_options(config)
        checkpoints = self.run_dir.checkpoints
        if not resume and checkpoints.exists() and any(checkpoints.iterdir()):
            raise CheckpointError(f"{checkpoints} holds a run already: pass --resume to "
                                  f"continue it, or set output_dir=<another folder>")
        self.run_dir.start(resume=resume)
        self.data_dir = Path(config.data.data_dir)
        self._prepare_synthetic()
        self.train_sources = {t: _head(load_source(t, "train", data_dir=self.data_dir),
                                       config.data.train_examples) for t in self.tasks}
        self.eval_sources = {t: _head(load_source(t, "test", data_dir=self.data_dir),
                                      config.eval.examples) for t in self.tasks + self.general}
        self.tokenizer = self._tokenizer()
        self.model = build_model(config)
        graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)
        self.graphdef = graphdef
        self.params = shard_state(params, self.mesh)
        self.rest = shard_state(rest, self.mesh)
        self.base = (_copy(self.params) if self._needs_reference("base") else None)
        self.checkpoints = Checkpoints(config.output_dir, keep=config.checkpoint.keep)
        self.progress: Progress | None = None
        self._programs: dict[tuple[str, int | None], Any] = {}
        self._restored: dict[str, Any] | None = None
        if resume:
            self._restore_latest()

    # -- set-up ----------------------------------------------------------------------------

    def _prepare_synthetic(self) -> None:
        """With `data.synthetic`, builds the offline benchmark into the data dir unless it
        is there (other tasks must have been built with `python -m cpt_jax.data.build`)."""
        data = self.config.data
        if not data.synthetic:
            return
        wanted = SYNTHETIC_STAGES + SYNTHETIC_GENERAL + SYNTHETIC_PRETRAIN
        try:
            for task in wanted:
                load_source(task, "test", data_dir=self.data_dir)
            return
        except SourceNotBuiltError:
            pass
        if self.leader:
            print(f"building the synthetic benchmark into {self.data_dir}", flush=True)
            code = build.main(["--synthetic", "--train", str(data.synthetic_train), "--test",
                               str(data.synthetic_test), "--seed", str(self.config.seed),
                               "--data-dir", str(self.data_dir)])
            if code:
                raise SourceNotBuiltError(f"building the synthetic benchmark into "
                                          f"{self.data_dir} failed (see above)")
        _barrier("synthetic data")

    def _tokenizer(self) -> PreTrainedTokenizerBase:
        """The configured tokenizer, the model folder's, or (a preset model) one trained on
        the synthetic tasks' text and kept in the output dir, so a resumed run uses it."""
        model = self.config.model
        source = model.tokenizer or model.path
        if source is not None:
            return AutoTokenizer.from_pretrained(source)
        saved = self.out / TOKENIZER_DIR
        if saved.exists():
            return AutoTokenizer.from_pretrained(saved)
        tokenizer = task_tokenizer(preset(model.preset), self.data_dir,
                                   SYNTHETIC_STAGES + SYNTHETIC_PRETRAIN + tuple(self.tasks))
        if self.leader:
            tokenizer.save_pretrained(saved)
        return tokenizer

    def _needs_reference(self, kind: str) -> bool:
        return (self.config.grpo.kl_coef > 0 and self.config.grpo.reference == kind
                and any(s.algorithm == "grpo" for s in self.stages))

    def _restore_latest(self) -> None:
        """The newest rolling checkpoint, onto this run's mesh; a checkpoint of another
        model shape fails here, naming the array, before any long work."""
        step = self.checkpoints.latest_step()
        if step is None:
            raise CheckpointError(f"--resume: no checkpoint under {self.run_dir.checkpoints}")
        progress = Progress(**self.checkpoints.meta(step)["progress"])
        if not 1 <= progress.stage <= len(self.stages):
            raise CheckpointError(f"{self.run_dir.checkpoints}: checkpoint {step} is at stage "
                                  f"{progress.stage}, this config has {len(self.stages)}")
        stage = self.stages[progress.stage - 1]
        target = self._state(self.params,
                             self._optimizer(stage, max(1, progress.stage_steps)))
        saved, _ = self.checkpoints.restore(step, abstract(_arrays(target)))
        self.params = saved["params"]
        self._restored = saved
        self.progress = progress

    # -- the run ---------------------------------------------------------------------------

    def run(self) -> dict[str, Any]:
        """Trains and evaluates every stage not done yet; returns the results."""
        if self.leader:
            save_run_config(self.config, self.out / "config.yaml")
        self.sample = greedy_sampler(self.model, self.tokenizer, self.config.eval.max_new_tokens)
        resumed = self.progress
        self.log = MetricsLog(self.out, resume_from=resumed.global_step if resumed else None,
                              enabled=self.leader)
        try:
            with jax.set_mesh(self.mesh):  # activations pinned by the model's logical axes
                if resumed is None:
                    self.progress = Progress(stage=1, stage_step=0, offset=0, stage_steps=0,
                                             iterator=None, matrix=[], general={t: [] for t in
                                                                                self.general},
                                             pass_counts=None)
                    self._evaluate()
                start = self.progress.stage
                for stage in self.stages[start - 1:]:
                    self._train_stage(stage, resuming=resumed is not None and stage.index == start)
                    self._evaluate()
                self.checkpoints.wait()
        finally:
            self.log.close()
            self.checkpoints.close()
        return self._results(complete=True)

    def _train_stage(self, stage: Stage, *, resuming: bool) -> None:
        progress = self.progress
        if resuming:
            source = self._stage_source(stage, progress.pass_counts)
        else:
            counts = self._rif_counts(stage) if self.config.mode == "rif" else None
            source = self._stage_source(stage, counts)
            progress.pass_counts = counts
            progress.stage_step, progress.iterator = 0, None
            progress.stage_steps = self._steps(stage, len(source)) if len(source) else 0
        if progress.stage_steps == 0:
            print(f"stage {stage.index} ({stage.name}): no instances left to train on",
                  flush=True)
        total = max(1, progress.stage_steps)
        state = self._state(self.params, self._optimizer(stage, total))
        if resuming:
            state = state.replace(**self._restored)
        key = jax.random.fold_in(jax.random.key(self.config.seed), stage.index)
        batches, step_fn = self._stepper(stage, source, total, self._reference(stage))
        per_call = self.config.sft.steps_per_call if stage.algorithm == "sft" else 1
        if progress.iterator is not None:
            batches.set_state(progress.iterator)
        else:
            self._save(state, batches)
        bar = tqdm(total=progress.stage_steps, initial=progress.stage_step, disable=not self.leader,
                   desc=f"stage {stage.index}/{len(self.stages)} {stage.name} {stage.algorithm}")
        every = self.config.checkpoint.every
        while progress.stage_step < progress.stage_steps:
            # A call of several steps ends at the next checkpoint or the stage's end, never
            # past it: those steps that do not fill a call run one at a time.
            ahead = min(progress.stage_steps - progress.stage_step,
                        every - progress.stage_step % every)
            count = per_call if ahead >= per_call else 1
            started = time.perf_counter()
            state, metrics = step_fn(state, batches, jax.random.fold_in(key, progress.stage_step),
                                     count)
            seconds = (time.perf_counter() - started) / count
            for step_metrics in metrics:
                progress.stage_step += 1
                record = {"stage": stage.index, "task": stage.name,
                          "algorithm": stage.algorithm, "step": progress.stage_step,
                          "global_step": progress.global_step,
                          **{k: float(v) for k, v in step_metrics.items()}, "seconds": seconds}
                self.log.write(record)
                bar.set_postfix({k: f"{record[k]:.3f}" for k in ("loss", "reward/mean")
                                 if k in record})
                bar.update()
            done = progress.stage_step == progress.stage_steps
            if not done and progress.stage_step % every == 0:
                self._save(state, batches)
        bar.close()
        self.params, self.rest = state.params, state.rest
        self.checkpoints.save_stage(stage.index, self.params, {
            "stage": stage.index, "tasks": list(stage.tasks), "algorithm": stage.algorithm,
            "global_step": progress.global_step})
        progress.offset += progress.stage_steps
        progress.stage, progress.stage_step, progress.stage_steps = stage.index + 1, 0, 0
        progress.iterator, progress.pass_counts = None, None

    def _stepper(self, stage: Stage, source: grain.MapDataset, total_steps: int,
                 reference: tuple[nnx.State, nnx.State] | None):
        """The stage's data iterator and `step(state, batches, key, count) -> (state, [metrics
        of each step])`, which makes `count` updates (more than one only for SFT)."""
        config, seed = self.config, self.config.seed + stage.index
        task = stage.tasks[0]  # the template and reward are the same for every task
        if stage.algorithm == "sft":
            micro = config.sft.micro_batches
            batches = iter(sft_dataset(source, task=task, tokenizer=self.tokenizer,
                                       batch_size=config.sft.batch_size // micro, seed=seed,
                                       options=self.options,
                                       response_template=config.sft.response_template,
                                       **self.processes))

            def step(state, batches, key, count):
                stacked = stack_micro_batches([next(batches) for _ in range(micro * count)],
                                              self.model, steps=count)
                state, metrics = self._program(stage, total_steps, count)(
                    state, shard_batch(stacked, self.mesh, steps_axis=count > 1))
                if count == 1:
                    return state, [metrics]
                return state, [{k: v[i] for k, v in metrics.items()} for i in range(count)]

            return batches, step
        batches = iter(rl_dataset(source, task=task, tokenizer=self.tokenizer,
                                  batch_size=config.grpo.prompts_per_step, seed=seed,
                                  options=self.options, **self.processes))
        program = self._program(stage, total_steps)
        program.score_fn = reward_fn(task, config.data.cot)
        program.reference = reference

        def step(state, batches, key, count):
            state, metrics, _ = program.step(state, batches, key, task=stage.name)
            return state, [metrics]

        return batches, step

    def _program(self, stage: Stage, total_steps: int, steps: int = 1) -> Any:
        """The jitted SFT step (`steps` > 1: that many updates per call) or the GRPO trainer
        (sampler, log-probs, update) for a stage, shared by the stages whose optimiser
        schedules are the same (compiled once)."""
        algorithm, optim = stage.algorithm, self._optim(stage)
        schedule_steps = (None if optim.schedule == "constant" and optim.warmup_ratio == 0
                          else total_steps)
        cache_key = (algorithm, schedule_steps, optim.learning_rate, steps)
        if cache_key not in self._programs:
            optimizer = self._optimizer(stage, total_steps)
            micro = self.config.sft.micro_batches
            self._programs[cache_key] = (
                (make_sft_step(self.model, optimizer, micro_batches=micro) if steps == 1 else
                 make_sft_steps(self.model, optimizer, micro_batches=micro, steps=steps))
                if algorithm == "sft" else
                GRPOTrainer(self.model, optimizer, grpo_config(self.config.grpo),
                            tokenizer=self.tokenizer,
                            score_fn=reward_fn(self.tasks[0], self.config.data.cot),
                            reference=(self.params, self.rest),  # replaced by each stage's
                            place=lambda b: shard_batch(b, self.mesh)))
        return self._programs[cache_key]

    def _stage_source(self, stage: Stage, counts: dict[str, Any] | None) -> grain.MapDataset:
        """The stage's training rows: its task's (RIF-filtered) train split, or in a multitask
        run every task's, each repeated by its epochs, concatenated."""
        if counts is not None:
            passes = PassCounts(counts["task"], int(counts["group_size"]),
                                {int(k): int(v) for k, v in counts["counts"].items()})
            return select(self.train_sources[stage.tasks[0]],
                          passes.kept_ids(self.config.rif.filter))
        if len(stage.tasks) == 1:
            return self.train_sources[stage.tasks[0]]
        parts = []
        for task, epochs in zip(stage.tasks, stage.epochs, strict=True):
            rows = self.train_sources[task]
            parts.append(grain.MapDataset.range(round(epochs * len(rows))).map(
                lambda k, rows=rows: rows[k % len(rows)]))
        return grain.MapDataset.concatenate(parts)

    def _steps(self, stage: Stage, rows: int) -> int:
        """Updates of the stage: fixed, or its epochs over `rows` (already repeated by epoch
        in a multitask run) in batches of the algorithm's size."""
        if stage.steps is not None:
            return stage.steps
        per_step = (self.config.sft.batch_size if stage.algorithm == "sft"
                    else self.config.grpo.prompts_per_step)
        epochs = stage.epochs[0] if len(stage.tasks) == 1 else 1.0
        return math.ceil(epochs * rows / per_step)

    def _rif_counts(self, stage: Stage) -> dict[str, Any] | None:
        """Offline RIF before a GRPO stage: the current model's passes per instance."""
        if stage.algorithm != "grpo":
            return None
        rif, task = self.config.rif, stage.tasks[0]
        sampling = SamplingConfig(max_new_tokens=self.config.grpo.max_new_tokens,
                                  group_size=rif.group_size, temperature=rif.temperature,
                                  top_p=self.config.grpo.top_p)
        counts = count_passes(
            self.model, (self.params, self.rest), self.train_sources[task], task=task,
            tokenizer=self.tokenizer, score_fn=reward_fn(task, self.config.data.cot),
            sampling=sampling, batch_size=rif.batch_size, options=self.options,
            key=jax.random.fold_in(jax.random.key(self.config.seed + 1), stage.index),
            stop_ids=turn_stop_ids(self.tokenizer), **self.processes)
        summary = counts.summary()
        self.log.write({"stage": stage.index, "task": task, "event": "rif", "step": 0,
                        "global_step": self.progress.global_step,
                        **{f"rif/{k}": v for k, v in summary.items()}})
        if self.leader:
            (self.out / "rif").mkdir(parents=True, exist_ok=True)
            counts.save(self.out / "rif" / f"stage{stage.index}_{task}.json")
        print(f"RIF stage {stage.index} {task}: kept {summary[f'kept_fraction/{rif.filter}']:.1%} "
              f"({rif.filter})", flush=True)
        return {"task": task, "group_size": counts.group_size,
                "counts": {str(k): v for k, v in counts.counts.items()}}

    def _reference(self, stage: Stage) -> tuple[nnx.State, nnx.State] | None:
        """GRPO's KL reference: the base model, or the model before this stage."""
        if not self._needs_reference("base") and not self._needs_reference("previous"):
            return None
        if self.config.grpo.reference == "base":
            return self.base, self.rest
        if stage.index == 1:
            return _copy(self.params), self.rest
        previous, _ = self.checkpoints.restore_stage(stage.index - 1, abstract(self.params))
        return previous, self.rest

    def _optim(self, stage: Stage) -> OptimConfig:
        """The stage's optimiser settings: its algorithm's, at the stage's own rate if set."""
        optim = self.config.sft.optim if stage.algorithm == "sft" else self.config.grpo.optim
        if stage.learning_rate is None:
            return optim
        return dataclasses.replace(optim, learning_rate=stage.learning_rate)

    def _optimizer(self, stage: Stage, total_steps: int) -> optax.GradientTransformation:
        optim = self._optim(stage)
        return make_optimizer(learning_rate=optim.learning_rate, total_steps=total_steps,
                              warmup_ratio=optim.warmup_ratio, schedule=optim.schedule,
                              weight_decay=optim.weight_decay, grad_clip=optim.grad_clip,
                              moments_dtype=jnp.bfloat16 if optim.bf16_moments else None)

    def _state(self, params: nnx.State, optimizer: optax.GradientTransformation) -> TrainState:
        """A stage's first state: the parameters and a fresh optimiser state (sharded like
        them)."""
        return TrainState(graphdef=self.graphdef, params=params, rest=self.rest,
                          opt_state=optimizer.init(params), step=jnp.zeros((), jnp.int32))

    def _save(self, state: TrainState, batches: Any) -> None:
        """A rolling checkpoint, numbered by count: a stage left with no instances (RIF)
        starts the next at the same global step."""
        self.progress.iterator = batches.get_state()
        self.progress.saves += 1
        self.checkpoints.save(self.progress.saves, _arrays(state),
                              {"progress": vars(self.progress)})
        self._upload()

    def _evaluate(self) -> None:
        """A new row of the accuracy matrix (and of the general-ability table)."""
        progress, row = self.progress, len(self.progress.matrix)
        started = time.perf_counter()
        accuracies = {task: evaluate_task(self.model, (self.params, self.rest), source,
                                          task=task, tokenizer=self.tokenizer,
                                          sample=self.sample,
                                          batch_size=self.config.eval.batch_size,
                                          options=self.options, **self.processes).accuracy
                      for task, source in self.eval_sources.items()}
        progress.matrix.append([accuracies[t] for t in self.tasks])
        for task in self.general:
            progress.general[task].append(accuracies[task])
        self.log.write({"stage": row, "task": "eval", "event": "eval", "step": 0,
                        "global_step": progress.offset,
                        **{f"accuracy/{t}": a for t, a in accuracies.items()},
                        "seconds": time.perf_counter() - started})
        print(f"accuracy after stage {row}: "
              + " ".join(f"{t} {100 * a:.1f}" for t, a in accuracies.items()), flush=True)
        if self.leader:
            write_results(self.out / "results.json",
                          self._results(complete=row == len(self.stages)))
        self._upload()

    def _upload(self) -> None:
        """A `gs://` run's new records to the bucket (the first process writes them all)."""
        if self.leader:
            self.log.flush()
            self.run_dir.push()

    def _results(self, *, complete: bool) -> dict[str, Any]:
        trained_at: list[int | None] = [None] * len(self.tasks)
        for stage in reversed(self.stages):
            for task in stage.tasks:
                trained_at[self.tasks.index(task)] = stage.index
        rows = self.progress.matrix
        done = [t if t is not None and t < len(rows) else None for t in trained_at]
        return results(self.tasks, rows, done, self.progress.general,
                       mode=self.config.mode,
                       stages=[{"tasks": list(s.tasks), "algorithm": s.algorithm}
                               for s in self.stages],
                       complete=complete)


def encode_options(config: RunConfig) -> EncodeOptions:
    """How the run's examples become tokens and patches (its `data` section)."""
    data = config.data
    return EncodeOptions(length_buckets=tuple(data.length_buckets), min_pixels=data.min_pixels,
                         max_pixels=data.max_pixels, cot=data.cot, min_patches=data.min_patches)


def build_model(config: RunConfig, *, abstract_only: bool = False) -> Qwen2_5_VL:
    """The configured model: a Hugging Face folder's weights, or a preset's random ones
    (seeded by `seed`); `abstract_only` gives shapes without values (a restore target)."""
    model = config.model
    options = dict(dtype=jnp.dtype(model.dtype), param_dtype=jnp.dtype(model.param_dtype),
                   remat=model.remat, scan_layers=model.scan_layers,
                   max_frame_patches=model.max_frame_patches)
    if model.path is not None:
        if abstract_only:
            return nnx.eval_shape(lambda: from_pretrained(model.path, **options))
        return from_pretrained(model.path, **options)

    def create() -> Qwen2_5_VL:
        return Qwen2_5_VL(preset(model.preset), **options, rngs=nnx.Rngs(config.seed))
    return nnx.eval_shape(create) if abstract_only else create()


def _head(source: grain.MapDataset, limit: int | None) -> grain.MapDataset:
    return source if limit is None else source[:min(limit, len(source))]


def _copy(tree: Any) -> Any:
    """A copy with the same shardings (a step donates, and so deletes, its input arrays)."""
    return jax.tree.map(jnp.copy, tree)


def _arrays(state: TrainState) -> dict[str, Any]:
    """What a rolling checkpoint holds of a training state."""
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step}


def _barrier(name: str) -> None:
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cpt_jax.train", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, required=True, help="a YAML file in configs/")
    parser.add_argument("overrides", nargs="*",
                        help="key=value, e.g. grpo.optim.learning_rate=2e-6")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in output_dir from its newest checkpoint")
    parser.add_argument("--distributed", action="store_true",
                        help="call jax.distributed.initialize() first (multi-host: on a TPU pod "
                             "slice it finds the other hosts itself)")
    parser.add_argument("--coordinator", help="with --distributed: host:port of process 0")
    parser.add_argument("--num-processes", type=int)
    parser.add_argument("--process-id", type=int)
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.distributed:
        jax.distributed.initialize(coordinator_address=args.coordinator,
                                   num_processes=args.num_processes, process_id=args.process_id)
    try:
        config = load_run_config(args.config, args.overrides, device_count=jax.device_count())
        run = ContinualRun(config, resume=args.resume)
    except (ConfigError, CheckpointError, SourceNotBuiltError, StagingError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = run.run()
    if run.leader:
        plots = write_plots(run.out)
        run.run_dir.push()
        scores = ", ".join(f"{k} {result[k]:.3f}" for k in ("avg_acc", "fm", "bwt")
                           if result[k] is not None)
        print(f"done: {run.run_dir}/results.json ({scores}); plots in {run.run_dir}/"
              f"{plots[0].parent.name}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
