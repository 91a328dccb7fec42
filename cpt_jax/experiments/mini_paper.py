"""The paper's experiment at CPU scale: SFT vs GRPO vs multi-task vs RIF-GRPO (and GRPO without
KL, without chain of thought) over the seven synthetic stages, from one base model.

    python -m cpt_jax.experiments.mini_paper --out reports/mini_paper [--quick]
        [--work outputs/mini_paper] [--jobs 2] [--seeds 3]

1. Data: the synthetic benchmark, built once into `<work>/data`.
2. A base model: the `mini` preset trained from scratch with SFT on a base mixture (syn_caption
   first, then batches that mix the seven stage tasks and the two general tasks), on training
   rows the stages never use; every other batch has the chain-of-thought prompt and the target
   `<think>...</think> \\boxed{answer}`, the others the no-CoT prompt and the bare answer, so
   that both prompt forms (the no-CoT run's too) start from a model that knows them. Saved as
   a Hugging Face folder (`<work>/base`); its greedy accuracy (both prompts), pass@1 and pass@8
   (8 answers at temperature 1) per task go to `<out>/base.json`.
3. The runs: `python -m cpt_jax.train --config configs/mini_paper/<run>.yaml` from the base, as
   subprocesses (`--jobs` at a time, each on its own core where the OS allows), with a shared
   JAX compilation cache; `--seeds` seeds for SFT and GRPO sequential, one for the others.
4. The report: `<out>/README.md` (`cpt_jax.experiments.mini_paper_report`), each run's
   results.json, metrics.jsonl and plots under `<out>/runs/<run>/`, and the summary plots.

It resumes where it stopped: a built data set, a saved base and a finished run are kept; an
unfinished run continues from its newest checkpoint (`--resume`). Finished runs' checkpoints
are deleted (their results and logs are kept). `--quick` is the same pipeline at a size that
finishes in minutes (CI runs it).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import itertools
import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from transformers import AutoTokenizer, PreTrainedTokenizerBase

from cpt_jax.config import RunConfig, load_run_config
from cpt_jax.data import build, synthetic
from cpt_jax.data.sources import load_source
from cpt_jax.data.tasks import SYNTHETIC_GENERAL, SYNTHETIC_PRETRAIN, SYNTHETIC_STAGES, reward_fn
from cpt_jax.data.tokenizer import task_tokenizer
from cpt_jax.evaluation import evaluate_task, greedy_sampler
from cpt_jax.experiments import learnability
from cpt_jax.experiments.mini_paper_report import write_report
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, from_pretrained, preset, save_pretrained
from cpt_jax.rl.rif import count_passes
from cpt_jax.rl.sampler import SamplingConfig, turn_stop_ids
from cpt_jax.train import encode_options

CONFIGS = Path(__file__).resolve().parents[2] / "configs" / "mini_paper"
# Run name -> config file; the first two get --seeds seeds, the others one.
RUNS = {"sft": "sft.yaml", "grpo": "grpo.yaml", "multitask": "multitask.yaml",
        "rif_grpo": "rif_grpo.yaml", "grpo_no_kl": "grpo_no_kl.yaml",
        "grpo_no_cot": "grpo_no_cot.yaml"}
SEEDED = ("sft", "grpo")
PASS_SAMPLES = 8
BASE_TASKS = SYNTHETIC_STAGES + SYNTHETIC_GENERAL


@dataclasses.dataclass(frozen=True)
class Scale:
    """How big the experiment is: the full one, or `--quick` for CI."""

    preset: str
    train_rows: int  # built per task: the runs use the first `run_rows`, the base the rest
    run_rows: int
    test_rows: int
    eval_batch: int
    base_steps: int
    caption_warmup: int
    caption_weight: int = 1  # syn_caption batches per round of chain-of-thought base batches
    stages: int = len(SYNTHETIC_STAGES)  # the first this many of the paper's seven
    base_lr: float = 1e-3
    vision_lr_scale: float = 0.1
    batch_size: int = 8

    def overrides(self) -> list[str]:
        """What the runs' configs need changed at this scale."""
        stages = ", ".join(f"{{task: {task}}}" for task in SYNTHETIC_STAGES[:self.stages])
        return [f"model.preset={self.preset}", f"data.train_examples={self.run_rows}",
                f"eval.examples={self.test_rows}", f"eval.batch_size={self.eval_batch}",
                f"stages=[{stages}]"]


# The `mini` preset: `small` does not learn to read the synthetic images from scratch in a CPU
# budget (reports/synthetic_learnability); quick: the `tiny` one, which only shows the loop.
# The base at lr 5e-4 with the vision tower at the full rate reads more tasks than at 1e-3 or
# with the tower at x0.1 (reports/mini_paper/base_variants.md). Stages of 36 steps (288 rows):
# at 12 neither method moved far from the base; the base keeps 928 rows of each task, as at 96.
FULL = Scale(preset="mini", train_rows=1216, run_rows=288, test_rows=64, eval_batch=32,
             base_steps=2000, caption_warmup=300, base_lr=5e-4, vision_lr_scale=1.0)
QUICK = Scale(preset="tiny", train_rows=40, run_rows=16, test_rows=8, eval_batch=8,
              base_steps=8, caption_warmup=2, stages=2)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cpt_jax.experiments.mini_paper",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="the report folder")
    parser.add_argument("--work", type=Path, default=None,
                        help="data, base model and run folders (default: outputs/mini_paper, "
                             "or outputs/mini_paper_quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="the CI-sized variant")
    parser.add_argument("--seeds", type=int, default=None,
                        help="seeds of SFT and GRPO sequential (default 3; 1 with --quick)")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1),
                        help="runs at a time, each pinned to one core where possible")
    parser.add_argument("--runs", nargs="+", choices=list(RUNS), default=list(RUNS),
                        help="which runs (default: all)")
    args = parser.parse_args(argv)
    if args.seeds is None:
        args.seeds = 1 if args.quick else 3
    args.work = args.work or Path("outputs/mini_paper_quick" if args.quick
                                  else "outputs/mini_paper")
    if args.jobs < 1 or args.seeds < 1:
        parser.error("--jobs and --seeds must be >= 1")
    return args


# ----------------------------------------------------------------------------- data and base
class StaleWorkError(RuntimeError):
    """The work folder holds data built by other generators or at another scale."""


def data_fingerprint(scale: Scale) -> str:
    """The benchmark this code builds at this scale, in a few bytes: the sizes and the first
    generated rows of every task (a changed generator changes them)."""
    digest = hashlib.blake2b(f"{scale.train_rows} {scale.test_rows}".encode(), digest_size=8)
    for task in (*BASE_TASKS, *SYNTHETIC_PRETRAIN):
        for split in ("train", "test"):
            for row in synthetic.generate(task, split=split, num=4, seed=0):
                digest.update(json.dumps([task, row["problem"], row["answer"]]).encode())
    return digest.hexdigest()


def build_data(data_dir: Path, scale: Scale) -> None:
    """The synthetic benchmark at this scale, unless this code built it there already; data
    that other code or another scale built is an error (the base and the runs trained on it
    are stale too), never silently reused nor deleted."""
    stamp, expected = data_dir / "fingerprint.txt", data_fingerprint(scale)
    if stamp.exists() and stamp.read_text().strip() == expected:
        return
    if stamp.exists() or (data_dir.exists() and any(data_dir.iterdir())):
        raise StaleWorkError(
            f"{data_dir} holds a synthetic benchmark that this code at this scale did not "
            f"build ({stamp.name}: {stamp.read_text().strip() if stamp.exists() else 'missing'}"
            f", expected {expected}); the base and runs beside it are stale: delete "
            f"{data_dir.parent} or pass another --work")
    if build.main(["--synthetic", "--train", str(scale.train_rows), "--test",
                   str(scale.test_rows), "--data-dir", str(data_dir)]) != 0:
        raise RuntimeError(f"building the synthetic benchmark into {data_dir} failed")
    stamp.write_text(expected + "\n")


def base_mixture(tokenizer: PreTrainedTokenizerBase, data_dir: Path, config: RunConfig,
                 scale: Scale, *, seed: int) -> Iterator[dict[str, np.ndarray]]:
    """SFT batches for the base: `caption_warmup` syn_caption batches, then, alternately, a
    chain-of-thought batch (the answer in `config.sft.response_template`; `caption_weight` in
    each round of as many of these as there are base tasks, plus those, are syn_caption) and a
    no-CoT batch (the bare answer). Each batch mixes rows of every stage
    and general task, from the training rows after the first `run_rows`, which the stages use.
    Mixed batches: with one task per batch, `mini` kept only the tasks of its last few hundred
    steps (reports/synthetic_learnability)."""
    options = encode_options(config)
    common = dict(batch_size=scale.batch_size, tasks=BASE_TASKS, skip_rows=scale.run_rows,
                  mixed=True)
    cot = learnability.mixture(
        tokenizer, data_dir, seed=seed, caption_weight=scale.caption_weight,
        caption_warmup=scale.caption_warmup,
        options=dataclasses.replace(options, cot=True),
        response_template=config.sft.response_template, **common)
    no_cot = learnability.mixture(tokenizer, data_dir, seed=seed + 1,
                                  options=dataclasses.replace(options, cot=False), **common)
    yield from itertools.islice(cot, scale.caption_warmup)
    for pair in zip(cot, no_cot, strict=True):
        yield from pair


def train_base(work: Path, config: RunConfig, scale: Scale, *, seed: int = 0) -> dict[str, Any]:
    """Trains and saves the base model (unless saved already); returns its training record."""
    target = work / "base"
    record_path = work / "base_training.json"
    if (target / "config.json").exists() and record_path.exists():
        return json.loads(record_path.read_text())
    data_dir = work / "data"
    model_config = preset(config.model.preset)
    tokenizer = task_tokenizer(model_config, data_dir, SYNTHETIC_STAGES + SYNTHETIC_PRETRAIN
                               + SYNTHETIC_GENERAL)
    model = Qwen2_5_VL(model_config, dtype=jnp.float32, param_dtype=jnp.float32,
                       **learnability.CPU_MODEL_OPTIONS, rngs=nnx.Rngs(seed))
    started = time.perf_counter()
    model, losses, per_step = learnability.train(
        model, base_mixture(tokenizer, data_dir, config, scale, seed=seed),
        steps=scale.base_steps, learning_rate=scale.base_lr,
        vision_lr_scale=scale.vision_lr_scale, warmup_ratio=learnability.WARMUP_RATIO)
    partial = work / "base.partial"
    shutil.rmtree(partial, ignore_errors=True)
    save_pretrained(model, partial)
    tokenizer.save_pretrained(partial)
    shutil.rmtree(target, ignore_errors=True)
    partial.rename(target)
    record = {"preset": config.model.preset, "steps": scale.base_steps,
              "caption_warmup": scale.caption_warmup, "caption_weight": scale.caption_weight,
              "base_tasks": len(BASE_TASKS), "learning_rate": scale.base_lr,
              "vision_lr_scale": scale.vision_lr_scale, "batch_size": scale.batch_size,
              "response_template": config.sft.response_template, "mixed_batches": True,
              "no_cot_share": 0.5,
              "seconds": time.perf_counter() - started, "seconds_per_step": per_step,
              "first_loss": losses[0], "final_loss": float(np.mean(losses[-10:]))}
    record_path.write_text(json.dumps(record, indent=2) + "\n")
    return record


def evaluate_base(work: Path, config: RunConfig, scale: Scale) -> dict[str, Any]:
    """Greedy accuracy, pass@1 and pass@8 (8 answers at temperature 1) per task on the test
    rows the runs evaluate, with the chain-of-thought prompt and reward; and greedy accuracy
    with the no-CoT prompt and reward (where the no-CoT run starts)."""
    model = from_pretrained(work / "base", dtype=jnp.float32, param_dtype=jnp.float32,
                            **learnability.CPU_MODEL_OPTIONS)
    tokenizer = AutoTokenizer.from_pretrained(work / "base")
    states = nnx.split(model, nnx.Param, ...)[1:]
    options = encode_options(config)
    sample = greedy_sampler(model, tokenizer, config.eval.max_new_tokens)
    sampling = SamplingConfig(max_new_tokens=config.grpo.max_new_tokens,
                              group_size=PASS_SAMPLES, temperature=1.0, top_p=config.grpo.top_p)
    tasks = {}
    for i, task in enumerate(BASE_TASKS):
        source = load_source(task, "test", data_dir=work / "data")
        source = source[:min(scale.test_rows, len(source))]
        greedy = evaluate_task(model, states, source, task=task, tokenizer=tokenizer,
                               sample=sample, batch_size=config.eval.batch_size,
                               options=options)
        no_cot = evaluate_task(model, states, source, task=task, tokenizer=tokenizer,
                               sample=sample, batch_size=config.eval.batch_size,
                               options=dataclasses.replace(options, cot=False))
        passes = count_passes(model, states, source, task=task, tokenizer=tokenizer,
                              score_fn=reward_fn(task, cot=True), sampling=sampling,
                              batch_size=config.rif.batch_size, options=options,
                              key=jax.random.key(1000 + i), stop_ids=turn_stop_ids(tokenizer))
        counts = np.asarray(list(passes.counts.values()))
        tasks[task] = {"greedy": greedy.accuracy, "greedy_no_cot": no_cot.accuracy,
                       "pass@1": float(counts.mean() / PASS_SAMPLES),
                       f"pass@{PASS_SAMPLES}": float(np.mean(counts > 0)), "n": greedy.n,
                       "samples": greedy.samples}
        print(f"  base {task:18s} greedy {greedy.accuracy:.3f} (no CoT {no_cot.accuracy:.3f}) "
              f"pass@1 "
              f"{tasks[task]['pass@1']:.3f} pass@8 {tasks[task]['pass@8']:.3f}", flush=True)
    return tasks


# ----------------------------------------------------------------------------------- runs
@dataclasses.dataclass(frozen=True)
class RunSpec:
    method: str
    seed: int

    @property
    def name(self) -> str:
        return f"{self.method}_seed{self.seed}"


def run_specs(methods: Sequence[str], seeds: int) -> list[RunSpec]:
    return [RunSpec(m, s) for m in methods for s in range(seeds if m in SEEDED else 1)]


def _finished(results_path: Path) -> bool:
    try:
        return bool(json.loads(results_path.read_text()).get("complete"))
    except (OSError, ValueError):
        return False


def run_one(spec: RunSpec, work: Path, scale: Scale, core: int | None) -> dict[str, Any]:
    """`python -m cpt_jax.train` for one run (resumed if it has checkpoints); returns its wall
    time. A finished run is skipped."""
    out = work / "runs" / spec.name
    timing_path = out / "timing.json"
    if _finished(out / "results.json") and timing_path.exists():
        return json.loads(timing_path.read_text())
    base = (work / "base").resolve()
    command = [sys.executable, "-m", "cpt_jax.train", "--config", str(CONFIGS / RUNS[spec.method]),
               f"output_dir={out.resolve()}", f"model.path={base}", f"model.tokenizer={base}",
               f"data.data_dir={(work / 'data').resolve()}", f"seed={spec.seed}",
               *scale.overrides()]
    checkpoints = out / "checkpoints" / "rolling"
    if checkpoints.exists() and any(checkpoints.iterdir()):
        command.append("--resume")
    elif out.exists():
        shutil.rmtree(out)  # killed before its first checkpoint: start again
    out.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "JAX_COMPILATION_CACHE_DIR": str((work / "jax_cache").resolve()),
           "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0"}
    started = time.perf_counter()
    with (out / "train.log").open("a") as log:
        process = subprocess.run(_pinned(command, core), env=env, stdout=log,
                                 stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - started
    if process.returncode != 0:
        raise RuntimeError(f"run {spec.name} failed (exit {process.returncode}); its log: "
                           f"{out / 'train.log'}")
    previous = json.loads(timing_path.read_text()) if timing_path.exists() else {"seconds": 0.0}
    timing = {"seconds": previous["seconds"] + seconds, "resumed": "--resume" in command}
    timing_path.write_text(json.dumps(timing) + "\n")
    shutil.rmtree(out / "checkpoints", ignore_errors=True)  # results and logs are what stay
    print(f"  {spec.name}: done in {seconds:.0f} s", flush=True)
    return timing


def _pinned(command: list[str], core: int | None) -> list[str]:
    """The command kept on one core with `taskset` (Linux), so parallel runs do not fight
    over the same cores; unchanged where that is not available."""
    taskset = shutil.which("taskset")
    if core is None or taskset is None or not hasattr(os, "sched_getaffinity"):
        return command
    available = sorted(os.sched_getaffinity(0))
    return [taskset, "-c", str(available[core % len(available)]), *command]


def run_all(specs: Sequence[RunSpec], work: Path, scale: Scale,
            jobs: int) -> dict[str, dict[str, Any]]:
    """The runs, `jobs` at a time (job i on core i)."""
    free = list(range(jobs))
    timings: dict[str, dict[str, Any]] = {}

    def task(spec: RunSpec) -> None:
        core = free.pop()
        try:
            timings[spec.name] = run_one(spec, work, scale, core if jobs > 1 else None)
        finally:
            free.append(core)

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(task, spec) for spec in specs]:
            future.result()
    return timings


def collect(specs: Sequence[RunSpec], work: Path, out: Path) -> None:
    """Each run's results.json, metrics.jsonl, config.yaml, timing.json and plots into
    `<out>/runs/<run>/` (what the report reads and the repository keeps)."""
    for spec in specs:
        source, target = work / "runs" / spec.name, out / "runs" / spec.name
        target.mkdir(parents=True, exist_ok=True)
        for name in ("results.json", "metrics.jsonl", "config.yaml", "timing.json"):
            shutil.copy2(source / name, target / name)
        if (source / "plots").exists():
            shutil.copytree(source / "plots", target / "plots", dirs_exist_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    scale = QUICK if args.quick else FULL
    started, commit = time.perf_counter(), learnability.git_commit()  # the code that runs
    args.work.mkdir(parents=True, exist_ok=True)
    args.out.mkdir(parents=True, exist_ok=True)
    common = load_run_config(CONFIGS / "common.yaml", scale.overrides())
    print(f"data: the synthetic benchmark ({scale.train_rows} train rows per task) in "
          f"{args.work / 'data'}", flush=True)
    try:
        build_data(args.work / "data", scale)
    except StaleWorkError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(f"base: {scale.base_steps} SFT steps of the `{common.model.preset}` preset", flush=True)
    base_training = train_base(args.work, common, scale)
    base_path = args.out / "base.json"
    if base_path.exists() and json.loads(base_path.read_text()).get("training") == base_training:
        base = json.loads(base_path.read_text())
    else:
        base = {"training": base_training, "tasks": evaluate_base(args.work, common, scale)}
        base_path.write_text(json.dumps(base, indent=2) + "\n")
    specs = run_specs(args.runs, args.seeds)
    print(f"runs: {', '.join(s.name for s in specs)}, {args.jobs} at a time", flush=True)
    run_all(specs, args.work, scale, args.jobs)
    collect(specs, args.work, args.out)
    command = " ".join(["python -m cpt_jax.experiments.mini_paper",
                        *(argv if argv is not None else sys.argv[1:])])
    write_report(args.out, [s.name for s in specs], command=command,
                 commit=commit, quick=args.quick,
                 seconds=time.perf_counter() - started)
    print(f"wrote {args.out / 'README.md'} in {time.perf_counter() - started:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
