"""Learning, measured: a short SFT run on one synthetic task, then a short GRPO run from the
checkpoint it leaves, with the GRPO log step by step.

    python -m cpt_jax.experiments.learning --out reports/learning [--task syn_texture]
        [--preset small | --init MODEL_DIR] [--train-examples 128] [--sft-steps 80]
        [--grpo-steps 30]

0. The model: the preset, randomly initialised, or `--init`: a Hugging Face folder with its
   tokenizer (e.g. the model `python -m cpt_jax.experiments.learnability --save` leaves).
1. SFT (no chain of thought, bare answers) on the task's first `--train-examples` training
   instances.
2. The SFT model is saved as a Hugging Face folder (`<out>/sft_checkpoint`) and loaded back.
3. GRPO from that checkpoint on the same instances, with the no-CoT reward (accuracy only),
   `--group-size` answers per prompt at temperature 1; every step's reward, KL, clip fractions,
   entropy and grad norm go to `<out>/grpo_log.jsonl`.
Before and after each phase, on the training instances and on the test split: greedy
exact-match accuracy, and the pass rate at temperature 1 (the mean accuracy reward of
`--eval-samples` answers per prompt: the quantity GRPO raises). Writes `<out>/results.json`
and `<out>/README.md`.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cpt_jax.data import build
from cpt_jax.data.pipeline import rl_dataset, sft_dataset
from cpt_jax.data.sources import load_source
from cpt_jax.data.tasks import SYNTHETIC_STAGES, reward_fn
from cpt_jax.data.tokenizer import task_tokenizer
from cpt_jax.experiments.learnability import (
    CPU_MODEL_OPTIONS,
    OPTIONS,
    evaluate_task,
    git_commit,
    greedy_sampler,
)
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, from_pretrained, preset, save_pretrained
from cpt_jax.optim import make_optimizer
from cpt_jax.rl.grpo import GRPOConfig, GRPOTrainer
from cpt_jax.rl.rif import count_passes
from cpt_jax.rl.sampler import SamplingConfig
from cpt_jax.sft import TrainState, make_sft_step, stack_micro_batches

SPLITS = ("train", "test")
NEW_TOKENS = 8


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cpt_jax.experiments.learning",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--task", default="syn_texture", choices=SYNTHETIC_STAGES)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--init", type=Path, default=None,
                        help="start from this Hugging Face folder (model and tokenizer) "
                             "instead of a randomly initialised preset")
    parser.add_argument("--train-examples", type=int, default=128)
    parser.add_argument("--eval-examples", type=int, default=128, help="test prompts")
    parser.add_argument("--sft-steps", type=int, default=80)
    parser.add_argument("--sft-lr", type=float, default=1e-3)
    parser.add_argument("--vision-lr-scale", type=float, default=0.1,
                        help="the vision tower's SFT learning rate relative to --sft-lr (the "
                             "learnability recipe's)")
    parser.add_argument("--batch-size", type=int, default=8, help="SFT batch")
    parser.add_argument("--grpo-steps", type=int, default=30)
    parser.add_argument("--grpo-lr", type=float, default=1e-4)
    parser.add_argument("--kl-coef", type=float, default=0.01)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--eval-samples", type=int, default=8,
                        help="answers per prompt for the pass rate at temperature 1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("train_examples", "eval_examples", "grpo_steps", "prompts_per_step",
                 "eval_samples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    if args.sft_steps < 0:
        parser.error("--sft-steps must be >= 0 (0: GRPO straight from the initial model)")
    if args.init is not None and not (args.init / "config.json").exists():
        parser.error(f"--init {args.init}: no config.json there")
    return args


class Measure:
    """Greedy accuracy and pass rate at temperature 1 on both splits, one sampler each."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, data_dir: Path, task: str,
                 args: argparse.Namespace):
        self.tokenizer, self.data_dir, self.task, self.args = tokenizer, data_dir, task, args
        self.samplers: dict[str, Any] = {}

    def __call__(self, model: Qwen2_5_VL, label: str) -> dict[str, float]:
        args, out = self.args, {}
        if "greedy" not in self.samplers:  # one jitted sampler for every measurement
            self.samplers["greedy"] = greedy_sampler(model, self.tokenizer, NEW_TOKENS)
        sample = self.samplers["greedy"]
        for split in SPLITS:
            examples = args.train_examples if split == "train" else args.eval_examples
            greedy = evaluate_task(model, self.tokenizer, self.data_dir, self.task,
                                   examples=examples, batch_size=8, new_tokens=NEW_TOKENS,
                                   sample=sample, split=split)
            source = load_source(self.task, split, data_dir=self.data_dir)
            counts = count_passes(
                model, nnx.split(model)[1:], source[:examples], task=self.task,
                tokenizer=self.tokenizer, score_fn=reward_fn(self.task, cot=False),
                sampling=SamplingConfig(NEW_TOKENS, group_size=args.eval_samples),
                batch_size=8, options=OPTIONS, key=jax.random.key(args.seed + 99),
                stop_ids=[self.tokenizer.convert_tokens_to_ids("<|im_end|>")])
            out[f"{split}/accuracy"] = greedy["accuracy"]
            out[f"{split}/majority"] = greedy["majority"]
            out[f"{split}/pass_rate"] = counts.summary()["pass_rate"]
        print(f"{label}: " + ", ".join(f"{k} {v:.3f}" for k, v in out.items()), flush=True)
        return out


def _sft(model: Qwen2_5_VL, batches: Iterator[dict[str, np.ndarray]], steps: int,
         lr: float, vision_lr_scale: float) -> tuple[Qwen2_5_VL, list[float]]:
    optimizer = make_optimizer(learning_rate=lr, total_steps=steps, warmup_ratio=0.1,
                               vision_lr_scale=vision_lr_scale)
    step = make_sft_step(model, optimizer, micro_batches=1)
    state = TrainState.create(model, optimizer)
    losses = []
    for i in range(steps):
        state, metrics = step(state, stack_micro_batches([next(batches)], model))
        losses.append(float(metrics["loss"]))
        if i % 10 == 0 or i == steps - 1:
            print(f"  sft step {i + 1}/{steps} loss {losses[-1]:.4f}", flush=True)
    return state.model(), losses


def _grpo(model: Qwen2_5_VL, tokenizer: PreTrainedTokenizerBase, train, task: str,
          args: argparse.Namespace, log_path: Path) -> Qwen2_5_VL:
    grpo = GRPOConfig(group_size=args.group_size, max_new_tokens=NEW_TOKENS, top_p=1.0,
                      micro_batch_rows=args.group_size * 2, kl_coef=args.kl_coef,
                      min_patches=512)
    optimizer = make_optimizer(learning_rate=args.grpo_lr, total_steps=args.grpo_steps)
    reference = jax.tree.map(jnp.copy, nnx.split(model, nnx.Param, ...)[1:])
    trainer = GRPOTrainer(model, optimizer, grpo, tokenizer=tokenizer,
                          score_fn=reward_fn(task, cot=False), reference=reference)
    state = TrainState.create(model, optimizer)
    prompts = iter(rl_dataset(train, task=task, tokenizer=tokenizer,
                              batch_size=args.prompts_per_step, seed=args.seed + 1,
                              options=OPTIONS))
    key = jax.random.key(args.seed)
    with log_path.open("w") as log:
        for i in range(args.grpo_steps):
            key, sub = jax.random.split(key)
            started = time.perf_counter()
            state, metrics, _ = trainer.step(state, prompts, sub, task)
            record = {"step": i + 1, "seconds": round(time.perf_counter() - started, 2),
                      **{k: round(v, 5) for k, v in metrics.items()}}
            log.write(json.dumps(record) + "\n")
            print(f"  grpo step {i + 1}/{args.grpo_steps} reward {metrics['reward/mean']:.3f} "
                  f"kl {metrics.get('actor/kl_loss', 0):.4f} clip "
                  f"{metrics['actor/pg_clipfrac_higher']:.3f} {record['seconds']} s", flush=True)
    return state.model()


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    started, commit = time.perf_counter(), git_commit()  # the code that runs, not later commits
    args.out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix="learning_tfds_"))
    try:
        if build.main(["--synthetic", "--train", str(args.train_examples), "--test",
                       str(args.eval_examples), "--seed", str(args.seed), "--data-dir",
                       str(data_dir)]) != 0:
            return 1
        results = _run(args, data_dir)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    results.update({
        "task": args.task, "preset": None if args.init else args.preset, "commit": commit,
        "args": {k: str(v) for k, v in vars(args).items()},
        "seconds": time.perf_counter() - started,
        "command": " ".join(["python -m cpt_jax.experiments.learning",
                             *(argv if argv is not None else sys.argv[1:])]),
    })
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_readme(args.out / "README.md", results, args.out / "grpo_log.jsonl")
    print(f"wrote {args.out}/results.json and README.md in {results['seconds']:.0f} s")
    return 0


def _run(args: argparse.Namespace, data_dir: Path) -> dict[str, Any]:
    if args.init is not None:
        model = from_pretrained(args.init, **CPU_MODEL_OPTIONS)
        tokenizer = AutoTokenizer.from_pretrained(args.init)
    else:
        config = preset(args.preset)
        tokenizer = task_tokenizer(config, data_dir)
        model = Qwen2_5_VL(config, **CPU_MODEL_OPTIONS, rngs=nnx.Rngs(args.seed))
    task = args.task
    train = load_source(task, "train", data_dir=data_dir)
    measure = Measure(tokenizer, data_dir, task, args)
    results: dict[str, Any] = {"initial": measure(model, "initial model")}
    if args.sft_steps == 0:
        results.update(sft_losses=[], sft_seconds=0.0, sft=results["initial"])
        return _grpo_phase(model, tokenizer, train, task, args, measure, results)

    print(f"SFT on {len(train)} {task} instances, {args.sft_steps} steps:", flush=True)
    phase = time.perf_counter()
    batches = iter(sft_dataset(train, task=task, tokenizer=tokenizer,
                               batch_size=args.batch_size, seed=args.seed, options=OPTIONS))
    model, results["sft_losses"] = _sft(model, batches, args.sft_steps, args.sft_lr,
                                             args.vision_lr_scale)
    results["sft_seconds"] = time.perf_counter() - phase
    checkpoint = args.out / "sft_checkpoint"
    save_pretrained(model, checkpoint)
    tokenizer.save_pretrained(checkpoint)
    model = from_pretrained(checkpoint, **CPU_MODEL_OPTIONS)
    results["sft"] = measure(model, "after SFT")
    return _grpo_phase(model, tokenizer, train, task, args, measure, results)


def _grpo_phase(model: Qwen2_5_VL, tokenizer: PreTrainedTokenizerBase, train, task: str,
                args: argparse.Namespace, measure: Measure,
                results: dict[str, Any]) -> dict[str, Any]:
    print(f"GRPO, {args.grpo_steps} steps:", flush=True)
    phase = time.perf_counter()
    model = _grpo(model, tokenizer, train, task, args, args.out / "grpo_log.jsonl")
    results["grpo_seconds"] = time.perf_counter() - phase
    results["grpo"] = measure(model, "after GRPO")
    return results


def write_readme(path: Path, results: dict[str, Any], log_path: Path) -> None:
    log = [json.loads(line) for line in log_path.read_text().splitlines()]
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    table = []
    for split in SPLITS:
        for metric, name in (("accuracy", "greedy exact match"),
                             ("pass_rate", "pass rate at temperature 1")):
            key = f"{split}/{metric}"
            table.append(f"| {split} | {name} | {pct(results['initial'][key])} | "
                         f"{pct(results['sft'][key])} | {pct(results['grpo'][key])} | "
                         f"{pct(results['sft'][f'{split}/majority'])} |")
    rows = "\n".join(f"| {r['step']} | {r['reward/mean']:.3f} | {r['reward/std']:.3f} | "
                     f"{r['reward/zero_variance_groups']:.2f} | {r.get('actor/kl_loss', 0):.4f} "
                     f"| {r['actor/pg_clipfrac_higher']:.3f} | {r['actor/entropy']:.3f} | "
                     f"{r['actor/grad_norm']:.3f} | {r['seconds']:.1f} |" for r in log)
    first = np.mean([r["reward/mean"] for r in log[:5]])
    last = np.mean([r["reward/mean"] for r in log[-5:]])
    losses = results["sft_losses"]
    initial = (f"the `{results['preset']}` preset, randomly initialised"
               if results["args"]["init"] == "None" else f"`{results['args']['init']}`")
    sft = (f"SFT: {len(losses)} steps of batch {results['args']['batch_size']} at lr "
           f"{results['args']['sft_lr']} (vision tower x{results['args']['vision_lr_scale']}) "
           f"in {results['sft_seconds']:.0f} s, loss "
           f"{np.mean(losses[:5]):.3f} (first 5 steps) -> {np.mean(losses[-5:]):.3f} (last 5)."
           if losses else "No SFT phase (`--sft-steps 0`): GRPO starts from the initial model.")
    path.write_text(f"""# Learning on `{results["task"]}`

Command: `{results['command']}` (commit `{results['commit']}`), {results['seconds']:.0f} s.

Initial model: {initial}. All figures in %. "train" is the
{results['args']['train_examples']} instances both phases train on; "test" is the task's test
split (never trained on).

| split | metric | initial | after SFT | after GRPO | majority answer |
|---|---|---|---|---|---|
{chr(10).join(table)}

{sft} GRPO: {len(log)} steps in
{results['grpo_seconds']:.0f} s; training reward {first:.3f} (mean of the first 5 steps) ->
{last:.3f} (last 5).

## GRPO, step by step (`grpo_log.jsonl`)

| step | reward | reward std | tied groups | KL (k3) | clip frac | entropy | grad norm | s |
|---|---|---|---|---|---|---|---|---|
{rows}
""")


if __name__ == "__main__":
    sys.exit(main())
