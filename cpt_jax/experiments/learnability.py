"""Learnability of the synthetic benchmark: untrained vs briefly SFT-trained accuracy per task.

    python -m cpt_jax.experiments.learnability --out reports/synthetic_learnability \
        [--preset mini] [--steps N] [--tasks T1,T2] [--caption-warmup W] [--caption-weight C] \
        [--vision-lr-scale S] [--blind-baseline] [--eval-examples M] [--data-dir DIR]

Builds the synthetic benchmark and a tokenizer for the preset, evaluates the randomly
initialised model on every stage task and both general tasks (greedy, no chain of thought,
exact match), trains it with SFT (first W syn_caption batches alone, then the round-robin
mixture of the stage tasks' train splits, all seven or those named by --tasks, with C
syn_caption batches per round), evaluates again, and writes `<out>/results.json` and
`<out>/README.md`.

Three references say whether a task is learnt from the images: the majority baseline (share
of the most frequent answer among the evaluated examples); the trained model evaluated with
every image blanked (all pixel values 0); and, with `--blind-baseline`, the same recipe
trained from the same initialisation with every image blanked (the question-only baseline: as
good as the text alone allows in this budget).
"""

from __future__ import annotations

import argparse
import collections
import itertools
import json
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import grain
import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import PreTrainedTokenizerBase

from cpt_jax.data import build
from cpt_jax.data.pipeline import EncodeOptions, eval_dataset, sft_dataset
from cpt_jax.data.sources import SourceNotBuiltError, load_source
from cpt_jax.data.synthetic import SYNTHETIC_MAX_PIXELS, SYNTHETIC_MIN_PIXELS
from cpt_jax.data.tasks import (
    SYNTHETIC_GENERAL,
    SYNTHETIC_PRETRAIN,
    SYNTHETIC_STAGES,
    get_task,
)
from cpt_jax.data.tokenizer import task_tokenizer
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, preset, save_pretrained
from cpt_jax.optim import make_optimizer
from cpt_jax.rewards import exact_match
from cpt_jax.rl.groups import answer_texts
from cpt_jax.rl.sampler import Rollout, SamplingConfig, make_sampler, prepare_prompts
from cpt_jax.sft import TrainState, make_sft_step, stack_micro_batches

EVAL_TASKS = SYNTHETIC_STAGES + SYNTHETIC_GENERAL
WARMUP_RATIO = 0.05  # of the learning rate, over all steps
# Synthetic prompts are under 128 tokens and 8 images hold at most 512 patches: one program.
# The fastest CPU settings (benchmarks/README.md): unrolled layers, and full vision attention
# bounded to one synthetic image's patches.
CPU_MODEL_OPTIONS = {"scan_layers": False, "max_frame_patches": SYNTHETIC_MAX_PIXELS // 196}
OPTIONS = EncodeOptions(length_buckets=(128, 256), min_pixels=SYNTHETIC_MIN_PIXELS,
                        max_pixels=SYNTHETIC_MAX_PIXELS, cot=False, min_patches=512)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cpt_jax.experiments.learnability",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="results.json and README.md")
    parser.add_argument("--preset", default="mini", help="a name under configs/model/")
    parser.add_argument("--steps", type=int, default=2000,
                        help="SFT steps of batch 8, caption warm-up included (mini: about "
                             "0.65 s each on one CPU core)")
    parser.add_argument("--eval-examples", type=int, default=128, help="test examples per task")
    parser.add_argument("--train-examples", type=int, default=2000, help="train rows per task")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--tasks", default=",".join(SYNTHETIC_STAGES),
                        help="comma-separated stage tasks to train on (all are evaluated)")
    parser.add_argument("--caption-weight", type=int, default=3,
                        help="syn_caption batches per round of the stage tasks' batches")
    parser.add_argument("--caption-warmup", type=int, default=500,
                        help="syn_caption-only steps before the mixture (part of --steps)")
    parser.add_argument("--mixed-batches", action="store_true",
                        help="draw every stage batch from all seven tasks shuffled together "
                             "(default: one task per batch, round-robin)")
    parser.add_argument("--vision-lr-scale", type=float, default=0.1,
                        help="the vision tower's learning rate over the language model's")
    parser.add_argument("--blind-baseline", action="store_true",
                        help="also train the same recipe on blanked images (question-only)")
    parser.add_argument("--new-tokens", type=int, default=8, help="greedy decoding budget")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="compute dtype (parameters stay float32)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--save", type=Path, default=None,
                        help="also save the trained model and tokenizer as a Hugging Face folder")
    parser.add_argument("--data-dir", type=Path, default=None,
                        help="where to build the benchmark (default: a temporary folder)")
    args = parser.parse_args(argv)
    args.tasks = [t.strip() for t in args.tasks.split(",") if t.strip()]
    unknown = [t for t in args.tasks if t not in SYNTHETIC_STAGES]
    if unknown or not args.tasks:
        parser.error(f"--tasks: {', '.join(unknown) or 'none given'} not among the stage tasks "
                     f"{', '.join(SYNTHETIC_STAGES)}")
    if args.caption_weight < 0 or args.caption_warmup < 0:
        parser.error("--caption-weight and --caption-warmup must be >= 0")
    if args.caption_warmup >= args.steps:
        parser.error("--caption-warmup must be below --steps")
    if args.vision_lr_scale <= 0:
        parser.error("--vision-lr-scale must be > 0")
    if min(args.steps, args.eval_examples, args.train_examples, args.new_tokens) < 1:
        parser.error("--steps, --eval-examples, --train-examples and --new-tokens must be >= 1")
    return args


def greedy_sampler(model: Qwen2_5_VL, tokenizer: PreTrainedTokenizerBase,
                   new_tokens: int) -> Callable[..., Rollout]:
    """The jitted greedy sampler that stops at `<|im_end|>` (one per model shape)."""
    pad = model.config.pad_token_id
    return make_sampler(model, SamplingConfig.greedy(new_tokens),
                        stop_ids=[tokenizer.convert_tokens_to_ids("<|im_end|>")],
                        pad_id=pad if pad is not None else 0)


def evaluate_task(model: Qwen2_5_VL, tokenizer: PreTrainedTokenizerBase, data_dir: Path,
                  task: str, *, examples: int, batch_size: int, new_tokens: int,
                  sample: Callable[..., Rollout] | None = None,
                  split: str = "test", blank: bool = False) -> dict[str, Any]:
    """Greedy exact-match accuracy on the first `examples` rows of `task`'s `split`, with the
    majority baseline (share of the most frequent answer) and a few sample predictions;
    `blank` zeroes every image's pixel values (what the model gets from the text alone)."""
    sample = sample or greedy_sampler(model, tokenizer, new_tokens)
    states = nnx.split(model)[1:]
    source = load_source(task, split, data_dir=data_dir)
    source = source[:min(examples, len(source))]
    correct, answers, samples = 0, [], []
    for batch in eval_dataset(source, task=task, tokenizer=tokenizer, batch_size=batch_size,
                              options=OPTIONS):
        rollout = sample(states, prepare_prompts(model, blank_images(batch) if blank else batch))
        predictions = answer_texts(tokenizer, np.asarray(rollout.tokens),
                                   np.asarray(rollout.mask))
        for prediction, answer, valid in zip(predictions, batch["answer"], batch["valid"],
                                             strict=True):
            if valid:
                correct += exact_match(prediction, answer)
                answers.append(answer)
                if len(samples) < 3:
                    samples.append({"prediction": prediction, "answer": answer})
    top = collections.Counter(_norm(a) for a in answers).most_common(1)[0]
    return {"accuracy": correct / len(answers), "n": len(answers),
            "majority": top[1] / len(answers), "majority_answer": top[0], "samples": samples}


def blank_images(batch: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """The batch with every pixel value 0 (the same grey image size for size)."""
    return {**batch, "pixel_values": np.zeros_like(batch["pixel_values"])}


def evaluate(model: Qwen2_5_VL, tokenizer: PreTrainedTokenizerBase, data_dir: Path, *,
             examples: int, batch_size: int, new_tokens: int,
             blank: bool = False) -> dict[str, dict[str, Any]]:
    """`evaluate_task` on every stage and general task."""
    sample = greedy_sampler(model, tokenizer, new_tokens)
    results = {}
    for task in EVAL_TASKS:
        results[task] = evaluate_task(model, tokenizer, data_dir, task, examples=examples,
                                      batch_size=batch_size, new_tokens=new_tokens,
                                      sample=sample, blank=blank)
        r = results[task]
        print(f"  {task:20s} acc {r['accuracy']:.3f} (n {r['n']}, majority "
              f"{r['majority']:.3f}) e.g. {r['samples'][:2]}", flush=True)
    return results


def mixture(tokenizer: PreTrainedTokenizerBase, data_dir: Path, *, batch_size: int,
            seed: int, tasks: Sequence[str] = SYNTHETIC_STAGES, caption_weight: int = 0,
            caption_warmup: int = 0, options: EncodeOptions = OPTIONS,
            response_template: str = "{answer}", skip_rows: int = 0,
            mixed: bool = False) -> Iterator[dict[str, np.ndarray]]:
    """SFT batches of `tasks`: one task per batch, round-robin, or with `mixed` every batch
    drawn from all of them shuffled together (as many batches per round as there are tasks);
    with `caption_weight` W, each round also has W batches of syn_caption (dense
    descriptions), and with `caption_warmup` N the first N batches are syn_caption alone.
    `skip_rows` leaves out the first training rows of `tasks` (those a later experiment trains
    on).

    Why captions: most stage answers depend on the image only jointly with the question (is
    the texture *X*?), which gives a vision tower trained from scratch no gradient to start
    from; a caption depends on the image alone, so it teaches the features first. Why mixed
    batches: with one task per batch, each update pulls the shared weights towards one task,
    and a small model ends the schedule holding only the skills of its last few hundred
    steps (reports/synthetic_learnability)."""
    def source(task: str) -> grain.MapDataset:
        rows = load_source(task, "train", data_dir=data_dir)
        return rows[skip_rows:] if skip_rows and task not in SYNTHETIC_PRETRAIN else rows

    def batches(rows: grain.MapDataset, task: str, i: int) -> Iterator[dict[str, np.ndarray]]:
        # Every task has the same prompt template, so a mixed batch encodes as its first task.
        return iter(sft_dataset(rows, task=task, tokenizer=tokenizer, batch_size=batch_size,
                                seed=seed + i, options=options,
                                response_template=response_template))

    if mixed:
        iterators = {"mixed": batches(grain.MapDataset.concatenate([source(t) for t in tasks]),
                                      tasks[0], 0)}
        stage_round = ["mixed"] * len(tasks)
    else:
        iterators = {task: batches(source(task), task, i) for i, task in enumerate(tasks)}
        stage_round = list(tasks)
    if caption_weight or caption_warmup:
        caption = SYNTHETIC_PRETRAIN[0]
        iterators[caption] = batches(source(caption), caption, len(tasks))
    for _ in range(caption_warmup):
        yield next(iterators[SYNTHETIC_PRETRAIN[0]])
    for name in itertools.cycle([*stage_round, *SYNTHETIC_PRETRAIN * caption_weight]):
        yield next(iterators[name])


def train(model: Qwen2_5_VL, batches: Iterator[dict[str, np.ndarray]], *, steps: int,
          learning_rate: float, vision_lr_scale: float = 1.0, warmup_ratio: float = 0.1,
          blank: bool = False) -> tuple[Qwen2_5_VL, list[float], float]:
    """`steps` SFT updates (AdamW, warm-up, cosine; the vision tower at `vision_lr_scale` times
    the rate; every image blanked if `blank`); returns the trained model, the loss per step and
    the seconds per step after the first (compiling) one."""
    optimizer = make_optimizer(learning_rate=learning_rate, total_steps=steps,
                               warmup_ratio=warmup_ratio, vision_lr_scale=vision_lr_scale)
    step = make_sft_step(model, optimizer, micro_batches=1)
    state = TrainState.create(model, optimizer)
    losses, start = [], time.perf_counter()
    for i in range(steps):
        batch = next(batches)
        state, metrics = step(state, stack_micro_batches([blank_images(batch) if blank else batch],
                                                         model))
        losses.append(float(metrics["loss"]))
        if i == 0:
            start = time.perf_counter()
        if i % 10 == 0 or i == steps - 1:
            print(f"  step {i + 1}/{steps} loss {losses[-1]:.4f} token acc "
                  f"{float(metrics['accuracy']):.3f} lr {float(metrics['learning_rate']):.2e} "
                  f"{time.perf_counter() - start:.1f} s", flush=True)
    per_step = (time.perf_counter() - start) / max(1, steps - 1)
    return state.model(), losses, per_step


def git_commit() -> str:
    try:
        return subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True,
                              check=True, cwd=Path(__file__).parent).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _pct(x: float) -> str:
    return f"{100 * x:.1f}"


def standard_error(accuracy: float, n: int) -> float:
    """The binomial standard error of an accuracy over n examples."""
    return (accuracy * (1 - accuracy) / n) ** 0.5


def question_only(row: dict[str, Any]) -> float:
    """The best accuracy without the images: the majority answer, the question lookup, the
    trained model on blanked images, and the blind-trained model where one was trained."""
    return max(row["majority"], row.get("lookup") or 0.0, row["blank"], row.get("blind", 0.0))


def question_lookup(data_dir: Path, task: str, examples: int) -> float | None:
    """Accuracy on the first `examples` test rows of a predictor that never sees the image:
    the most frequent training answer of the same problem text, else the most frequent
    training answer (what a model could learn from the text alone, in the limit)."""
    by_problem: dict[str, collections.Counter] = collections.defaultdict(collections.Counter)
    try:
        train_rows = load_source(task, "train", data_dir=data_dir)
    except SourceNotBuiltError:  # a data dir built before general tasks had train splits
        return None
    for row in train_rows:
        by_problem[row["problem"]][_norm(row["answer"])] += 1
    overall = sum(by_problem.values(), collections.Counter()).most_common(1)[0][0]
    test = load_source(task, "test", data_dir=data_dir)
    rows = [test[i] for i in range(min(examples, len(test)))]
    hits = sum((by_problem[r["problem"]].most_common(1)[0][0] if r["problem"] in by_problem
                else overall) == _norm(r["answer"]) for r in rows)
    return hits / len(rows)


def _norm(answer: str) -> str:
    return answer.strip().lower()


def write_readme(path: Path, results: dict[str, Any]) -> None:
    """The table and a plain statement of the outcome."""
    blind = results.get("blind_baseline", False)
    rows, improved, trivial = [], [], []
    trained = results.get("trained_tasks", list(SYNTHETIC_STAGES))
    untrained = [t for t in SYNTHETIC_STAGES if t not in trained]
    which = ("the seven stage tasks' train splits" if not untrained
             else f"the train splits of {', '.join(trained)}")
    for task, r in results["tasks"].items():
        se = standard_error(r["trained"], r["n"])
        lookup = "-" if r["lookup"] is None else _pct(r["lookup"])
        rows.append(f"| {task} | {get_task(task).paper_task} | {get_task(task).role} | "
                    f"{_pct(r['majority'])} | {lookup} | {_pct(r['untrained'])} | "
                    f"{_pct(r['trained'])} "
                    f"± {_pct(se)} | {_pct(r['blank'])} | "
                    + (f"{_pct(r['blind'])} | " if blind else "") + f"{r['n']} |")
        if task in trained:
            reads = r["trained"] - question_only(r) > 2 * se
            (improved if reads else trivial).append(task)
    baselines = "majority, lookup, blank" + (", blind-trained" if blind else "")
    outcome = (f"Trained stage tasks whose trained accuracy beats every question-only baseline "
               f"({baselines}) by more than two standard errors: {', '.join(improved) or 'none'}. "
               f"Stage tasks that do not, in this budget: {', '.join(trivial) or 'none'}."
               + (f" Not trained on in this run: {', '.join(untrained)}." if untrained else ""))
    weight, warmup = results.get("caption_weight", 0), results.get("caption_warmup", 0)
    captions = (f", and {weight} syn_caption batches per round of {len(trained)}" if weight
                else "")
    first = f"the first {warmup} steps on syn_caption alone, then " if warmup else ""
    mixed = results.get("mixed_batches")
    per_batch = ("every batch drawn from all of them shuffled together" if mixed
                 else "one task per batch")
    order = "the" if mixed else "the round-robin"
    blind_column, blind_rule = "", ""
    if blind:
        blind_column = " blind-trained |"
        blind_rule = ("\n  Blind-trained: the same recipe from the same initialisation with "
                      "every image blanked, in training and evaluation.")
    text = f"""# Synthetic benchmark: learnability by the `{results['preset']}` model

- Command: `{results['command']}` (commit `{results['commit']}`).
- Training: SFT with {first}{order} mixture of {which}
  ({per_batch}{captions}), batch {results['batch_size']}, {results['steps']} steps, \
AdamW lr {results['learning_rate']:g} (vision tower x{results.get('vision_lr_scale', 1.0):g}) \
with warm-up {results.get('warmup_ratio', 0.1):g} and cosine decay, {results['dtype']} compute;
  {results['seconds_per_step']:.2f} s per step, {results['seconds']:.0f} s for the whole run on \
{results['device']}. Training loss {results['first_loss']:.3f} at the first step, \
{results['final_loss']:.3f} over the last ten.
- Evaluation: greedy decoding without chain of thought (up to {results['new_tokens']} new \
tokens, stop at
  `<|im_end|>`), exact match (`cpt_jax.rewards.exact_match`) on the first n test examples of
  each task. Majority: the share of the most frequent answer among those examples. Lookup:
  a predictor without the image, the most frequent training answer of the same problem text
  (else of the task). The
  general tasks are held out (never trained on). Accuracies in %, trained ± one standard
  error. Blank: the trained model with every image's pixel values set to 0.{blind_rule}

| task | paper analogue | role | majority | lookup | untrained | trained | blank |{blind_column} n |
|---|---|---|---|---|---|---|---|{'---|' if blind else ''}---|
{chr(10).join(rows)}

{outcome}
"""
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    started, commit = time.perf_counter(), git_commit()  # the code that runs, not later commits
    args.out.mkdir(parents=True, exist_ok=True)
    data_dir = args.data_dir or Path(tempfile.mkdtemp(prefix="learnability_tfds_"))
    try:
        print(f"building the synthetic benchmark into {data_dir}", flush=True)
        if build.main(["--synthetic", "--train", str(args.train_examples), "--test",
                       str(args.eval_examples), "--seed", str(args.seed), "--data-dir",
                       str(data_dir)]) != 0:
            return 1
        config = preset(args.preset)
        tokenizer = task_tokenizer(config, data_dir)
        model = Qwen2_5_VL(config, dtype=jnp.dtype(args.dtype), param_dtype=jnp.float32,
                           **CPU_MODEL_OPTIONS, rngs=nnx.Rngs(args.seed))
        eval_kw = {"examples": args.eval_examples, "batch_size": args.batch_size,
                   "new_tokens": args.new_tokens}
        print("untrained:", flush=True)
        before = evaluate(model, tokenizer, data_dir, **eval_kw)

        def recipe(model: Qwen2_5_VL, blank: bool) -> tuple[Qwen2_5_VL, list[float], float]:
            batches = mixture(tokenizer, data_dir, batch_size=args.batch_size, seed=args.seed,
                              tasks=args.tasks, caption_weight=args.caption_weight,
                              caption_warmup=args.caption_warmup, mixed=args.mixed_batches)
            return train(model, batches, steps=args.steps, learning_rate=args.learning_rate,
                         vision_lr_scale=args.vision_lr_scale, warmup_ratio=WARMUP_RATIO,
                         blank=blank)

        # Held-out tasks are never trained on here: no text-only predictor learns them.
        lookups = {task: question_lookup(data_dir, task, args.eval_examples)
                   if get_task(task).role == "stage" else None for task in EVAL_TASKS}
        print(f"training {args.steps} steps:", flush=True)
        model, losses, per_step = recipe(model, blank=False)
        if args.save is not None:
            save_pretrained(model, args.save)
            tokenizer.save_pretrained(args.save)
        print("trained:", flush=True)
        after = evaluate(model, tokenizer, data_dir, **eval_kw)
        print("trained, images blanked:", flush=True)
        blank = evaluate(model, tokenizer, data_dir, **eval_kw, blank=True)
        blind = None
        if args.blind_baseline:
            print(f"training {args.steps} steps on blanked images:", flush=True)
            model = Qwen2_5_VL(config, dtype=jnp.dtype(args.dtype), param_dtype=jnp.float32,
                               **CPU_MODEL_OPTIONS, rngs=nnx.Rngs(args.seed))
            model, _, _ = recipe(model, blank=True)
            print("blind-trained, images blanked:", flush=True)
            blind = evaluate(model, tokenizer, data_dir, **eval_kw, blank=True)
    finally:
        if args.data_dir is None:
            shutil.rmtree(data_dir, ignore_errors=True)
    tasks = {task: {"untrained": before[task]["accuracy"], "trained": after[task]["accuracy"],
                    "blank": blank[task]["accuracy"],
                    **({"blind": blind[task]["accuracy"]} if blind else {}),
                    "majority": before[task]["majority"],
                    "lookup": lookups[task],
                    "majority_answer": before[task]["majority_answer"], "n": before[task]["n"],
                    "role": get_task(task).role, "paper_task": get_task(task).paper_task,
                    "untrained_samples": before[task]["samples"],
                    "trained_samples": after[task]["samples"]}
             for task in EVAL_TASKS}
    results = {
        "preset": args.preset, "steps": args.steps, "batch_size": args.batch_size,
        "learning_rate": args.learning_rate, "dtype": args.dtype, "seed": args.seed,
        "caption_weight": args.caption_weight, "caption_warmup": args.caption_warmup,
        "mixed_batches": args.mixed_batches, "trained_tasks": args.tasks,
        "vision_lr_scale": args.vision_lr_scale, "warmup_ratio": WARMUP_RATIO,
        "blind_baseline": args.blind_baseline,
        "train_examples_per_task": args.train_examples, "new_tokens": args.new_tokens,
        "seconds_per_step": per_step, "seconds": time.perf_counter() - started,
        "first_loss": losses[0], "final_loss": float(np.mean(losses[-10:])),
        "device": f"{jax.devices()[0].platform} ({jax.device_count()} device(s))",
        "commit": commit,
        "command": " ".join(["python -m cpt_jax.experiments.learnability",
                             *(argv if argv is not None else sys.argv[1:])]),
        "tasks": tasks,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2) + "\n")
    write_readme(args.out / "README.md", results)
    print(f"wrote {args.out}/results.json and README.md in {results['seconds']:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
