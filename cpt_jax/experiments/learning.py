"""Learning, measured: a short SFT run on one synthetic task, then a short GRPO run from the
checkpoint it leaves, with the GRPO log step by step.

    python -m cpt_jax.experiments.learning --out reports/learning [--task syn_texture]
        [--preset small] [--sft-steps 300] [--grpo-steps 30] [--seed 0]

1. SFT (no chain of thought, bare answers) on the task's train split; greedy exact-match
   accuracy on its test split before and after.
2. The SFT model is saved as a Hugging Face folder (`<out>/sft_checkpoint`) and loaded back.
3. GRPO from that checkpoint with the no-CoT reward (accuracy only), `--group-size` answers
   per prompt at temperature 1; every step's reward, accuracy, KL and clip fractions go to
   `<out>/grpo_log.jsonl`. The held-out pass rate at temperature 1 (the quantity GRPO
   raises) and greedy accuracy are measured before and after.
Writes `<out>/results.json` and `<out>/README.md`.
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

from cpt_jax.data import build
from cpt_jax.data.pipeline import rl_dataset, sft_dataset
from cpt_jax.data.sources import load_source
from cpt_jax.data.tasks import SYNTHETIC_STAGES, reward_fn
from cpt_jax.experiments.learnability import OPTIONS, _commit, evaluate_task, make_tokenizer
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, from_pretrained, preset, save_pretrained
from cpt_jax.optim import make_optimizer
from cpt_jax.rl.grpo import GRPOConfig, GRPOTrainer
from cpt_jax.rl.rif import count_passes
from cpt_jax.rl.sampler import SamplingConfig
from cpt_jax.sft import TrainState, make_sft_step, stack_micro_batches


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cpt_jax.experiments.learning",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--task", default="syn_texture", choices=SYNTHETIC_STAGES)
    parser.add_argument("--preset", default="small")
    parser.add_argument("--sft-steps", type=int, default=300)
    parser.add_argument("--sft-lr", type=float, default=1e-3)
    parser.add_argument("--grpo-steps", type=int, default=30)
    parser.add_argument("--grpo-lr", type=float, default=2e-5)
    parser.add_argument("--kl-coef", type=float, default=0.01)
    parser.add_argument("--prompts-per-step", type=int, default=8)
    parser.add_argument("--group-size", type=int, default=8)
    parser.add_argument("--batch-size", type=int, default=8, help="SFT batch")
    parser.add_argument("--train-examples", type=int, default=2000)
    parser.add_argument("--eval-examples", type=int, default=128)
    parser.add_argument("--eval-samples", type=int, default=8,
                        help="answers per test prompt for the pass rate at temperature 1")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    for name in ("sft_steps", "grpo_steps", "prompts_per_step", "eval_examples"):
        if getattr(args, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")
    return args


def _sft(model: Qwen2_5_VL, batches: Iterator[dict[str, np.ndarray]], steps: int,
         lr: float) -> tuple[Qwen2_5_VL, list[float]]:
    optimizer = make_optimizer(learning_rate=lr, total_steps=steps, warmup_ratio=0.1)
    step = make_sft_step(model, optimizer, micro_batches=1)
    state = TrainState.create(model, optimizer)
    losses = []
    for i in range(steps):
        state, metrics = step(state, stack_micro_batches([next(batches)], model))
        losses.append(float(metrics["loss"]))
        if i % 25 == 0 or i == steps - 1:
            print(f"  sft step {i + 1}/{steps} loss {losses[-1]:.4f}", flush=True)
    return state.model(), losses


def _pass_rate(model: Qwen2_5_VL, tokenizer, data_dir: Path, task: str, *, examples: int,
               samples: int, seed: int) -> float:
    """Mean accuracy of `samples` answers per test prompt at temperature 1 (top-p 1)."""
    source = load_source(task, "test", data_dir=data_dir)
    source = source[:min(examples, len(source))]
    counts = count_passes(model, nnx.split(model)[1:], source, task=task, tokenizer=tokenizer,
                          score_fn=reward_fn(task, cot=False),
                          sampling=SamplingConfig(max_new_tokens=8, group_size=samples),
                          batch_size=8, options=OPTIONS, key=jax.random.key(seed + 99),
                          stop_ids=[tokenizer.convert_tokens_to_ids("<|im_end|>")])
    return counts.summary()["pass_rate"]


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    started = time.perf_counter()
    args.out.mkdir(parents=True, exist_ok=True)
    data_dir = Path(tempfile.mkdtemp(prefix="learning_tfds_"))
    try:
        return _run(args, data_dir, started, argv)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


def _run(args: argparse.Namespace, data_dir: Path, started: float,
         argv: Sequence[str] | None) -> int:
    if build.main(["--synthetic", "--train", str(args.train_examples), "--test",
                   str(args.eval_examples), "--seed", str(args.seed), "--data-dir",
                   str(data_dir)]) != 0:
        return 1
    config = preset(args.preset)
    tokenizer = make_tokenizer(config, data_dir)
    task, results = args.task, {}
    model = Qwen2_5_VL(config, rngs=nnx.Rngs(args.seed))
    eval_kw = {"examples": args.eval_examples, "batch_size": 8, "new_tokens": 8}
    rate_kw = {"examples": args.eval_examples, "samples": args.eval_samples, "seed": args.seed}
    results["untrained_accuracy"] = evaluate_task(model, tokenizer, data_dir, task,
                                                  **eval_kw)["accuracy"]

    print(f"SFT on {task}, {args.sft_steps} steps:", flush=True)
    sft_start = time.perf_counter()
    batches = iter(sft_dataset(load_source(task, "train", data_dir=data_dir), task=task,
                               tokenizer=tokenizer, batch_size=args.batch_size, seed=args.seed,
                               options=OPTIONS))
    model, losses = _sft(model, batches, args.sft_steps, args.sft_lr)
    results["sft_seconds"] = time.perf_counter() - sft_start
    results["sft_losses"] = losses
    checkpoint = args.out / "sft_checkpoint"
    save_pretrained(model, checkpoint)
    tokenizer.save_pretrained(checkpoint)
    model = from_pretrained(checkpoint)
    sft_eval = evaluate_task(model, tokenizer, data_dir, task, **eval_kw)
    results["sft_accuracy"], results["majority"] = sft_eval["accuracy"], sft_eval["majority"]
    results["sft_pass_rate"] = _pass_rate(model, tokenizer, data_dir, task, **rate_kw)
    print(f"after SFT: greedy accuracy {results['sft_accuracy']:.3f} (majority "
          f"{results['majority']:.3f}), pass rate at T=1 {results['sft_pass_rate']:.3f}",
          flush=True)

    print(f"GRPO from {checkpoint}, {args.grpo_steps} steps:", flush=True)
    grpo_start = time.perf_counter()
    grpo = GRPOConfig(group_size=args.group_size, max_new_tokens=8, top_p=1.0,
                      micro_batch_rows=args.group_size * 2, kl_coef=args.kl_coef,
                      min_patches=512)
    optimizer = make_optimizer(learning_rate=args.grpo_lr, total_steps=args.grpo_steps)
    reference = jax.tree.map(jnp.copy, nnx.split(model, nnx.Param, ...)[1:])
    trainer = GRPOTrainer(model, optimizer, grpo, tokenizer=tokenizer,
                          score_fn=reward_fn(task, cot=False), reference=reference)
    state = TrainState.create(model, optimizer)
    prompts = iter(rl_dataset(load_source(task, "train", data_dir=data_dir), task=task,
                              tokenizer=tokenizer, batch_size=args.prompts_per_step,
                              seed=args.seed + 1, options=OPTIONS))
    log_path = args.out / "grpo_log.jsonl"
    key = jax.random.key(args.seed)
    with log_path.open("w") as log:
        for i in range(args.grpo_steps):
            key, sub = jax.random.split(key)
            state, metrics, _ = trainer.step(state, prompts, sub, task)
            record = {"step": i + 1, **{k: round(v, 5) for k, v in metrics.items()}}
            log.write(json.dumps(record) + "\n")
            print(f"  grpo step {i + 1}/{args.grpo_steps} reward {metrics['reward/mean']:.3f} "
                  f"kl {metrics.get('actor/kl_loss', 0):.4f} clip "
                  f"{metrics['actor/pg_clipfrac_higher']:.3f}", flush=True)
    results["grpo_seconds"] = time.perf_counter() - grpo_start
    model = state.model()
    results["grpo_accuracy"] = evaluate_task(model, tokenizer, data_dir, task,
                                             **eval_kw)["accuracy"]
    results["grpo_pass_rate"] = _pass_rate(model, tokenizer, data_dir, task, **rate_kw)
    results.update({
        "task": task, "preset": args.preset, "args": {k: str(v) for k, v in vars(args).items()},
        "commit": _commit(), "seconds": time.perf_counter() - started,
        "command": " ".join(["python -m cpt_jax.experiments.learning",
                             *(argv if argv is not None else sys.argv[1:])]),
    })
    (args.out / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    write_readme(args.out / "README.md", results, log_path)
    print(json.dumps({k: v for k, v in results.items() if k != "sft_losses"}, indent=1))
    return 0


def write_readme(path: Path, results: dict[str, Any], log_path: Path) -> None:
    log = [json.loads(line) for line in log_path.read_text().splitlines()]
    rows = "\n".join(f"| {r['step']} | {r['reward/mean']:.3f} | {r['reward/std']:.3f} | "
                     f"{r.get('actor/kl_loss', 0):.4f} | {r['actor/pg_clipfrac_higher']:.3f} | "
                     f"{r['actor/entropy']:.3f} | {r['actor/grad_norm']:.3f} |" for r in log)
    first = np.mean([r["reward/mean"] for r in log[:5]])
    last = np.mean([r["reward/mean"] for r in log[-5:]])
    pct = lambda x: f"{100 * x:.1f}"  # noqa: E731
    path.write_text(f"""# Learning on `{results['task']}` with the `{results['preset']}` model

Command: `{results['command']}` (commit `{results['commit']}`), {results['seconds']:.0f} s.

| | untrained | after SFT | after GRPO | majority |
|---|---|---|---|---|
| greedy exact match (%) | {pct(results['untrained_accuracy'])} | {pct(results['sft_accuracy'])} \
| {pct(results['grpo_accuracy'])} | {pct(results['majority'])} |
| pass rate at temperature 1 (%) | | {pct(results['sft_pass_rate'])} \
| {pct(results['grpo_pass_rate'])} | |

SFT: {len(results['sft_losses'])} steps in {results['sft_seconds']:.0f} s, loss \
{np.mean(results['sft_losses'][:5]):.3f} (first 5) -> {np.mean(results['sft_losses'][-5:]):.3f} \
(last 5). GRPO: {len(log)} steps in {results['grpo_seconds']:.0f} s; training reward \
{first:.3f} (mean of the first 5 steps) -> {last:.3f} (last 5).

## GRPO, step by step (`grpo_log.jsonl`)

| step | reward mean | reward std | KL (k3) | clip frac | entropy | grad norm |
|---|---|---|---|---|---|---|
{rows}
""")


if __name__ == "__main__":
    sys.exit(main())
