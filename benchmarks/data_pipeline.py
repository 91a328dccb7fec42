"""SFT and RL data pipelines (examples/s) against the train step's consumption rate.

    JAX_PLATFORMS=cpu python benchmarks/data_pipeline.py

Builds the synthetic benchmark (`python -m cpt_jax.data.build --synthetic`, --train rows per
task) into a temporary data dir, trains the `small` preset's tokenizer (vocab 8192) on the
prompts and answers of the seven stage tasks, and feeds `sft_dataset` / `rl_dataset` (batch 8,
the synthetic min/max pixels, --length-buckets) for a few tasks and for the mix of the seven
stage tasks (`grain.IterDataset.mix` of the per-task pipelines' encoded shares, equal
weights).

1. Pipeline: steady-state examples/s of each iterator. The first --skip batches are not timed
   (the first batch waits for Grain's 16 prefetch threads to start, and the batches those
   threads finished meanwhile arrive at once after it); the next --batches are. Twice: in
   process (the pipelines as they are: Grain's default ReadOptions, 16 threads, no worker
   process) and with `mp_prefetch(MultiprocessingOptions(num_workers=--workers))`
   (--workers-skip, --workers-batches: worker queues hold one batch each, no head start;
   timing stops early after --workers-max-s seconds, for pipelines that crawl).
   The time to the first batch and the cold rate (start-up included) are kept too.
2. Peer, the consumption rate of what takes the batches. SFT: the project's train step,
   `cpt_jax.sft.make_sft_step` (one micro-batch; `make_optimizer` with the paper's SFT
   settings: AdamW, lr 1e-5, cosine with 10% warm-up, clip 1.0) on `Qwen2_5_VL(preset(
   "small"))` (fp32, no remat), fed the SAME batches the in-process pipeline produced (the
   first --step-batches timed ones, right after that pipeline's run, so that load from
   elsewhere falls on both alike) through `stack_micro_batches` (patches padded to the
   batch's patch bucket). RL: the consumer is a rollout, not written yet; its proxy is the
   jitted prefill of the batch's prompts (`prepare_inputs(..., pad_patches_to=...)`) into a KV
   cache of prompt + --new-tokens slots and the first greedy token (a real rollout also
   decodes every response, G samples per prompt: the proxy is a lower bound on its time, and
   the RL ratio a lower bound on the margin). Compile time (one compile and one untimed run
   per shape) and the host-side preparation (`stack_micro_batches` / `prepare_inputs`) are
   reported apart and never enter the step time.
3. ratio = pipeline examples/s / step examples/s: above 1 the pipeline keeps up.
4. Where pipeline time goes: the stages of `encode_sft` / `encode_prompt_only` (in their
   order) and `collate` timed one by one over --stage-examples examples, single thread.
5. Diagnostics: the mix rebuilt from the package's `encode_*` / `collate` with
   `ReadOptions(num_threads=0)` (no prefetch threads), in process and with worker processes;
   and the host memory one idle SFT iterator fills within --idle-s seconds.

Writes a JSON report to --out and prints markdown tables.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import datetime
import gc
import io
import json
import os
import platform
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import grain
import jax
import jax.numpy as jnp
import numpy as np
from absl import flags
from flax import nnx
from machine import cpu_model, package_version

from cpt_jax.data import build
from cpt_jax.data.pipeline import (
    EncodeOptions,
    GlobalBatches,
    collate,
    encode_prompt_only,
    encode_sft,
    rl_dataset,
    sft_dataset,
)
from cpt_jax.data.processor import decode_image, preprocess_image
from cpt_jax.data.prompts import (
    DEFAULT_SYSTEM,
    encode_prompt,
    encode_sft_example,
)
from cpt_jax.data.sources import load_source
from cpt_jax.data.synthetic import SYNTHETIC_MAX_PIXELS, SYNTHETIC_MIN_PIXELS
from cpt_jax.data.tasks import COT_SUFFIX, SYNTHETIC_STAGES, prompt_text
from cpt_jax.data.tokenizer import build_tokenizer, preset_special_tokens
from cpt_jax.models.qwen2_5_vl import KVCache, Qwen2_5_VL, preset
from cpt_jax.optim import make_optimizer
from cpt_jax.sft import TrainState, make_sft_step, stack_micro_batches

DEFAULT_OUT = Path(__file__).parent / "results" / "data_pipeline.json"
DEFAULT_TASKS = ("syn_choice", "syn_ocr", "syn_count")
MIX = "mix"
KINDS = ("sft", "rl")
PRESET = "small"


# ----------------------------------------------------------------------------- setup
def build_data(data_dir: Path, train: int, seed: int) -> float:
    """The synthetic benchmark into `data_dir` (build's own summary and progress bars muted)."""
    import tensorflow_datasets as tfds

    tfds.disable_progress_bar()
    start = time.perf_counter()
    sink = io.StringIO()
    with contextlib.redirect_stdout(sink), contextlib.redirect_stderr(sink):
        code = build.main(["--synthetic", "--train", str(train), "--test", "8",
                           "--seed", str(seed), "--data-dir", str(data_dir)])
    if code:
        raise RuntimeError(f"building the synthetic benchmark failed:\n{sink.getvalue()}")
    return time.perf_counter() - start


def make_tokenizer(config, data_dir: Path):
    """The `small` preset's tokenizer trained on the stage tasks' prompts and answers.

    The prompts are the problems as the pipelines write them (with the CoT suffix) plus the
    system prompt: on the bare problems alone, BPE never sees the ~40 words of boilerplate that
    every prompt carries and splits them nearly byte by byte (the suffix becomes 144 tokens
    instead of 43), which would make token counts far from a real tokenizer's.
    """
    corpus = [DEFAULT_SYSTEM]
    for task in SYNTHETIC_STAGES:
        for example in load_source(task, "train", data_dir=data_dir):
            corpus += [prompt_text(task, example["problem"], cot=True), example["answer"]]
    start = time.perf_counter()
    tokenizer = build_tokenizer(vocab_size=config.text.vocab_size,
                                special_token_ids=preset_special_tokens(config), corpus=corpus)
    learned = sum(1 for t in tokenizer.get_vocab() if not t.startswith("<|reserved_"))
    return tokenizer, dict(corpus_texts=len(corpus), train_s=time.perf_counter() - start,
                           vocab_size=len(tokenizer), learned_tokens=learned,
                           cot_suffix_tokens=len(tokenizer.encode(COT_SUFFIX,
                                                                  add_special_tokens=False)))


# ----------------------------------------------------------------------------- pipelines
def pipeline_factory(kind: str, sources: dict, tokenizer, options: EncodeOptions, batch: int,
                     seed: int, read_options: grain.ReadOptions | None = None) -> Callable:
    """`make(task) -> IterDataset`: the package's pipeline, or (with `read_options`) the same
    stages rebuilt from its public pieces with other Grain read options (diagnostics)."""
    def make(task):
        if read_options is None:
            fn = sft_dataset if kind == "sft" else rl_dataset
            return fn(sources[task], task=task, tokenizer=tokenizer, batch_size=batch,
                      seed=seed, options=options)
        # Mirrors sft_dataset / rl_dataset (one process): shuffle, repeat, encode, collate.
        pad_id = int(tokenizer.pad_token_id)
        if kind == "sft":
            def encode(e):
                return encode_sft(e, task=task, tokenizer=tokenizer, options=options)
        else:
            def encode(e):
                return encode_prompt_only(e, task=task, tokenizer=tokenizer, options=options)
        dataset = sources[task].shuffle(seed=seed).repeat(None).map(encode)
        return dataset.batch(batch, drop_remainder=True, batch_fn=lambda es: collate(
            es, options=options, pad_id=pad_id, left_pad=kind == "rl")).to_iter_dataset(
            read_options)
    return make


def workload_dataset(make: Callable, workload: str) -> grain.IterDataset | GlobalBatches:
    """One task's pipeline, or the mix of the seven stage tasks' (their encoded shares mixed,
    one collate: the tasks share their batch options)."""
    if workload != MIX:
        return make(workload)
    parts = [make(task) for task in SYNTHETIC_STAGES]
    if isinstance(parts[0], GlobalBatches):
        return dataclasses.replace(parts[0],
                                   shares=grain.IterDataset.mix([p.shares for p in parts]))
    return grain.IterDataset.mix(parts)


def with_workers(dataset: grain.IterDataset | GlobalBatches,
                 workers: int) -> grain.IterDataset | GlobalBatches:
    """The pipeline with its encoding in `workers` worker processes."""
    options = grain.MultiprocessingOptions(num_workers=workers)
    if isinstance(dataset, GlobalBatches):
        return dataclasses.replace(dataset, shares=dataset.shares.mp_prefetch(options))
    return dataset.mp_prefetch(options)


def time_iterator(dataset: grain.IterDataset, *, skip: int, batches: int, keep: int,
                  max_s: float | None = None) -> dict:
    """Arrival times of skip + batches batches (fewer when the timed window passes `max_s`,
    at least 3); the rate over the timed ones (steady state) and over all of them from the
    iterator's creation (cold, start-up included)."""
    start = time.perf_counter()
    iterator = iter(dataset)
    arrivals, kept, n = [], [], 0
    try:
        for i in range(skip + batches):
            b = next(iterator)
            arrivals.append(time.perf_counter() - start)
            n = len(b["input_ids"])
            if i >= skip and len(kept) < keep:
                kept.append(b)
            if (max_s is not None and i >= skip + 2
                    and arrivals[-1] - arrivals[skip - 1] > max_s):
                break
    finally:
        closing = time.perf_counter()
        iterator.close()  # stops prefetch threads / worker processes
        del iterator
        gc.collect()
        close_s = time.perf_counter() - closing
    # Prefetch threads still running a batch finish before the next measurement.
    deadline = time.perf_counter() + 30
    while time.perf_counter() < deadline and any(
            t.name.startswith("grain-prefetch") for t in threading.enumerate()):
        time.sleep(0.05)
    time.sleep(0.2)
    window = arrivals[-1] - arrivals[skip - 1]
    batches = len(arrivals) - skip
    return dict(first_batch_s=arrivals[0], skipped_batches=skip, timed_batches=batches,
                timed_s=window, batches_per_s=batches / window,
                examples_per_s=batches * n / window,
                cold_examples_per_s=(skip + batches) * n / arrivals[-1], close_s=close_s,
                arrivals_s=[round(a, 5) for a in arrivals], _kept=kept)


def batch_stats(batches: list[dict]) -> dict:
    """Shapes and how much of them is padding, over the kept batches."""
    tokens = sum(int(b["attention_mask"].sum()) for b in batches)
    slots = sum(b["attention_mask"].size for b in batches)
    patches = sum(int(b["num_patches"]) for b in batches)
    patch_slots = sum(len(b["pixel_values"]) for b in batches)
    shapes = sorted({(b["input_ids"].shape[1], len(b["pixel_values"])) for b in batches})
    return dict(batches=len(batches), shapes_len_patches=[list(s) for s in shapes],
                real_token_fraction=tokens / slots, real_patch_fraction=patches / patch_slots,
                mean_real_tokens_per_example=tokens / sum(len(b["input_ids"]) for b in batches),
                mean_patches_per_example=patches / sum(len(b["input_ids"]) for b in batches))


def measure_pipelines(workloads, sources, tokenizer, options, consumer, args) -> dict:
    """Per kind and workload: the in-process pipeline, the consumer on the batches it
    produced, then the pipeline with worker processes, one right after the other (so that
    load from elsewhere on the machine falls on a pipeline and its consumer alike)."""
    results: dict = {w: {} for w in workloads}
    for kind in KINDS:
        make = pipeline_factory(kind, sources, tokenizer, options, args.batch, args.seed)
        for workload in workloads:
            run = time_iterator(workload_dataset(make, workload), skip=args.skip,
                                batches=args.batches, keep=args.batches)
            batches = run.pop("_kept")
            entry = dict(in_process=run, batches=batch_stats(batches))
            line = f"{kind} {workload}: pipeline in process {run['examples_per_s']:.0f} ex/s"
            entry["step"] = consumer.measure(kind, batches[:args.step_batches])
            del batches
            line += (f"; {entry['step']['consumer']} {entry['step']['median_step_s']:.3f} s/batch"
                     f" = {entry['step']['examples_per_s']:.1f} ex/s")
            if args.workers:
                mp = time_iterator(with_workers(workload_dataset(make, workload), args.workers),
                    skip=args.workers_skip, batches=args.workers_batches, keep=0,
                    max_s=args.workers_max_s)
                mp.pop("_kept")
                entry["workers"] = mp
                line += (f"; pipeline with {args.workers} workers {mp['examples_per_s']:.0f} "
                         f"ex/s (first batch after {mp['first_batch_s']:.1f} s)")
            results[workload][kind] = entry
            print(line, flush=True)
    return results


def measure_read_options(sources, tokenizer, options, args) -> dict:
    """The mix rebuilt with ReadOptions(num_threads=0): in process and with worker processes."""
    out: dict = {}
    read_options = grain.ReadOptions(num_threads=0, prefetch_buffer_size=0)
    for kind in KINDS:
        make = pipeline_factory(kind, sources, tokenizer, options, args.batch, args.seed,
                                read_options=read_options)
        runs = {"in_process": time_iterator(workload_dataset(make, MIX), skip=args.skip,
                                            batches=args.batches, keep=0)}
        if args.workers:
            runs["workers"] = time_iterator(with_workers(workload_dataset(make, MIX),
                                                         args.workers),
                skip=args.workers_skip, batches=args.workers_batches, keep=0,
                max_s=args.workers_max_s)
        for run in runs.values():
            run.pop("_kept")
        out[kind] = runs
        print(f"{kind} mix, ReadOptions(num_threads=0): " + ", ".join(
            f"{k} {r['examples_per_s']:.0f} ex/s" for k, r in runs.items()), flush=True)
    return out


def _rss_bytes() -> int:
    return int(Path(f"/proc/{os.getpid()}/statm").read_text().split()[1]) * os.sysconf(
        "SC_PAGE_SIZE")


def _trim_heap() -> None:
    """Frees what earlier measurements left, so that RSS growth is this iterator's."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def measure_idle_buffer(sources, tokenizer, options, args) -> dict:
    """Host memory that one SFT iterator fills ahead while its consumer takes no batch."""
    make = pipeline_factory("sft", sources, tokenizer, options, args.batch, args.seed)
    _trim_heap()
    before = _rss_bytes()
    iterator = iter(make("syn_geometry"))  # every image 112x112: the same batch size always
    first = next(iterator)
    time.sleep(args.idle_s)
    grown = _rss_bytes() - before
    iterator.close()
    batch_bytes = sum(v.nbytes for v in first.values() if isinstance(v, np.ndarray))
    del iterator, first
    gc.collect()
    time.sleep(0.3)
    out = dict(idle_s=args.idle_s, rss_growth_bytes=grown, batch_bytes=batch_bytes,
               batches_held_estimate=grown / batch_bytes,
               grain_default_prefetch_buffer_size=grain.ReadOptions().prefetch_buffer_size,
               grain_default_num_threads=grain.ReadOptions().num_threads)
    print(f"idle SFT iterator: +{grown / 2**20:.0f} MiB host memory after {args.idle_s:.0f} s "
          f"(~{out['batches_held_estimate']:.0f} batches of {batch_bytes / 2**20:.1f} MiB)",
          flush=True)
    return out


# ----------------------------------------------------------------------------- stages
def measure_stages(workloads, sources, tokenizer, options, args) -> dict:
    """Single-thread time per example of each stage, in the order `encode_sft` /
    `encode_prompt_only` run them, then `collate` per batch; one pass per kind after an untimed
    one (the tokenizer's word cache and the compiled chat template warm, as from the second
    epoch on)."""
    tasks = [w for w in workloads if w != MIX] or list(SYNTHETIC_STAGES)
    per_task = max(args.batch, args.stage_examples // len(tasks))
    clock = time.perf_counter
    pad_id = int(tokenizer.pad_token_id)
    out: dict = {"examples": per_task * len(tasks), "tasks": tasks}
    for kind in KINDS:
        times = dict.fromkeys(("read", "decode", "preprocess", "text", "collate"), 0.0)
        for timed in (False, True):
            for task in tasks:
                encoded = []
                for index in range(per_task):
                    t0 = clock()
                    example = sources[task][index]
                    t1 = clock()
                    patches, grids = [], []
                    t_decode = t_preprocess = 0.0
                    for data in example["images"]:
                        t = clock()
                        image = decode_image(data, source=task)
                        t_decode += clock() - t
                        t = clock()
                        pixels, grid = preprocess_image(image, min_pixels=options.min_pixels,
                                                        max_pixels=options.max_pixels,
                                                        merge_size=options.merge_size)
                        t_preprocess += clock() - t
                        patches.append(pixels)
                        grids.append(grid)
                    t2 = clock()
                    problem = prompt_text(task, example["problem"], cot=options.cot)
                    if kind == "sft":
                        ids, mask = encode_sft_example(tokenizer, problem, example["answer"],
                                                       grids, merge_size=options.merge_size)
                        item = {"input_ids": np.asarray(ids, np.int32),
                                "loss_mask": np.asarray(mask, np.int32)}
                    else:
                        ids = encode_prompt(tokenizer, problem, grids,
                                            merge_size=options.merge_size)
                        item = {"input_ids": np.asarray(ids, np.int32)}
                    t3 = clock()
                    item.update(patches=patches, grids=grids, answer=example["answer"],
                                instance_id=example["instance_id"])
                    encoded.append(item)
                    if timed:
                        times["read"] += t1 - t0
                        times["decode"] += t_decode
                        times["preprocess"] += t_preprocess
                        times["text"] += t3 - t2
                for i in range(0, len(encoded) - args.batch + 1, args.batch):
                    t = clock()
                    collate(encoded[i:i + args.batch], options=options, pad_id=pad_id,
                            left_pad=kind == "rl")
                    if timed:
                        times["collate"] += clock() - t
        n = per_task * len(tasks)
        batched = (per_task // args.batch) * args.batch * len(tasks)
        parts = {
            "read record (array_record + bytes to str)": 1e3 * times["read"] / n,
            "image decode (PNG)": 1e3 * times["decode"] / n,
            "image preprocess (resize, normalise, patchify)": 1e3 * times["preprocess"] / n,
            "tokenize (chat template, BPE, image pads)": 1e3 * times["text"] / n,
            "collate (per example)": 1e3 * times["collate"] / batched,
        }
        total = sum(parts.values())
        out[kind] = dict(ms_per_example=parts, total_ms=total,
                         sequential_examples_per_s=1e3 / total)
    return out


# ----------------------------------------------------------------------------- consumers
class Consumers:
    """The batches' consumers, compiled once per batch shape (compile and a first, untimed
    run reported apart): SFT, the project's own step (`cpt_jax.sft.make_sft_step`, one
    micro-batch, `make_optimizer` with the paper's SFT settings); RL, a proxy of a rollout
    (prefill of the prompts + the first greedy token)."""

    def __init__(self, model: Qwen2_5_VL, new_tokens: int, total_steps: int):
        optimizer = make_optimizer(learning_rate=1e-5, total_steps=total_steps,
                                   warmup_ratio=0.1, schedule="cosine")
        self.model = model
        self.state = TrainState.create(model, optimizer)  # the first step donates the arrays
        graphdef = self.state.graphdef
        cfg = model.config.text

        def prefill(params, rest, ids, positions, mask, vision):
            m = nnx.merge(graphdef, params, rest)
            cache = KVCache.init(cfg, ids.shape[0], ids.shape[1] + new_tokens, m.dtype)
            logits, _ = m.forward(ids, positions, mask, vision, cache)
            return jnp.argmax(logits[:, -1], axis=-1)

        self.jitted = dict(sft=make_sft_step(model, optimizer, micro_batches=1),
                           rl=jax.jit(prefill))
        self.compiled: dict = {}
        self.compile_info: dict = {"sft": {}, "rl": {}}

    def _host_inputs(self, kind: str, b: dict) -> tuple[tuple, tuple]:
        """(the jitted function's data arguments, on the device; their shape key)."""
        if kind == "sft":
            inputs = jax.device_put(stack_micro_batches([b], self.model))
            key = (*inputs["input_ids"].shape[1:], inputs["vision"].pixel_values.shape[1])
            return (inputs,), key
        n = int(b["num_patches"])
        ids, positions, mask, vision, _ = self.model.prepare_inputs(
            b["input_ids"], attention_mask=b["attention_mask"],
            pixel_values=b["pixel_values"][:n], image_grid_thw=b["image_grid_thw"],
            pad_patches_to=len(b["pixel_values"]))
        return (ids, positions, mask, vision), (*ids.shape, len(b["pixel_values"]))

    def _run(self, kind: str, executable, inputs: tuple) -> float | None:
        if kind == "sft":
            self.state, metrics = jax.block_until_ready(executable(self.state, *inputs))
            return float(metrics["loss"])
        jax.block_until_ready(executable(self.state.params, self.state.rest, *inputs))
        return None

    def _state_args(self, kind: str) -> tuple:
        return (self.state,) if kind == "sft" else (self.state.params, self.state.rest)

    def measure(self, kind: str, batches: list[dict]) -> dict:
        step_s, prepare_s, losses = [], [], []
        for b in batches:
            t = time.perf_counter()
            inputs, key = self._host_inputs(kind, b)
            jax.block_until_ready(inputs)
            prepare_s.append(time.perf_counter() - t)
            if (kind, *key) not in self.compiled:
                t = time.perf_counter()
                executable = self.jitted[kind].lower(*self._state_args(kind), *inputs).compile()
                self.compiled[kind, *key] = executable
                compile_s = time.perf_counter() - t
                t = time.perf_counter()  # first run untimed: allocations, thread pools
                self._run(kind, executable, inputs)
                self.compile_info[kind]["x".join(map(str, key))] = dict(
                    compile_s=compile_s, first_run_s=time.perf_counter() - t)
            t = time.perf_counter()
            loss = self._run(kind, self.compiled[kind, *key], inputs)
            step_s.append(time.perf_counter() - t)
            if loss is not None:
                losses.append(loss)
        if not all(np.isfinite(losses)):
            raise RuntimeError(f"non-finite training loss: {losses}")
        median = statistics.median(step_s)
        return dict(consumer="SFT step" if kind == "sft" else "prefill proxy",
                    step_s=step_s, median_step_s=median,
                    examples_per_s=len(batches[0]["input_ids"]) / median,
                    prepare_inputs_s=statistics.median(prepare_s), losses=losses)


# ----------------------------------------------------------------------------- report
def _ratio(x: float) -> str:
    return f"{x:.0f}" if x >= 10 else f"{x:.1f}"


def markdown_tables(report: dict) -> str:
    r = report["results"]
    workers = report["workload"]["workers"]
    out = []
    for kind, consumer in (("sft", "SFT step"), ("rl", "rollout proxy: prefill")):
        cols = [f"{kind.upper()} workload", "pipeline ex/s, in process (first batch)"]
        if workers:
            cols.append(f"pipeline ex/s, {workers} workers (first batch)")
        cols += [f"{consumer} ex/s", "ratio, in process"]
        if workers:
            cols.append(f"ratio, {workers} workers")
        cols += ["batch shapes (len x patches)", "real tokens / patches"]
        rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        for workload, entry in r["per_workload"].items():
            e = entry[kind]
            p = e["pipeline"]
            cells = [workload, f"{e['pipeline_in_process_ex_s']:.0f} "
                               f"({p['in_process']['first_batch_s']:.1f} s)"]
            if workers:
                cells.append(f"{e['pipeline_workers_ex_s']:.0f} "
                             f"({p['workers']['first_batch_s']:.1f} s)")
            cells += [f"{e['consumer_ex_s']:.2f}", f"**{_ratio(e['ratio_in_process'])}**"]
            if workers:
                cells.append(_ratio(e["ratio_workers"]))
            cells += [", ".join(f"{a}x{b}" for a, b in e["batch_shapes"]),
                      f"{e['real_token_fraction']:.0%} / {e['real_patch_fraction']:.0%}"]
            rows.append("| " + " | ".join(cells) + " |")
        out.append("\n".join(rows))

    diag = r["diagnostics"]["read_options_num_threads_0"]
    mix = r["per_workload"].get(MIX)
    if mix:
        rows = ["| mix pipeline, ex/s | SFT | RL |", "|---|---|---|"]
        rows.append("| package's pipelines (ReadOptions default: 16 threads), in process | "
                    + " | ".join(f"{mix[k]['pipeline_in_process_ex_s']:.0f}" for k in KINDS)
                    + " |")
        if workers:
            rows.append(f"| package's pipelines, {workers} workers | " + " | ".join(
                f"{mix[k]['pipeline_workers_ex_s']:.0f}" for k in KINDS) + " |")
        rows.append("| same stages with ReadOptions(num_threads=0), in process | " + " | ".join(
            f"{diag[k]['in_process']['examples_per_s']:.0f}" for k in KINDS) + " |")
        if workers:
            rows.append(f"| same stages with ReadOptions(num_threads=0), {workers} workers | "
                        + " | ".join(f"{diag[k]['workers']['examples_per_s']:.0f}"
                                     for k in KINDS) + " |")
        out.append("\n".join(rows))

    stages = r["stages"]
    rows = ["| stage (single thread, ms per example) | SFT | RL |", "|---|---|---|"]
    for name in stages["sft"]["ms_per_example"]:
        rows.append(f"| {name} | {stages['sft']['ms_per_example'][name]:.3f} | "
                    f"{stages['rl']['ms_per_example'][name]:.3f} |")
    rows.append(f"| **total** of the stages (= {stages['sft']['sequential_examples_per_s']:.0f} / "
                f"{stages['rl']['sequential_examples_per_s']:.0f} ex/s on one thread) | "
                f"{stages['sft']['total_ms']:.3f} | {stages['rl']['total_ms']:.3f} |")
    out.append("\n".join(rows))
    return "\n\n".join(out)


def main(argv: list[str] | None = None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", nargs="+", default=list(DEFAULT_TASKS),
                        choices=SYNTHETIC_STAGES, help="stage tasks, measured with the mix")
    parser.add_argument("--train", type=int, default=512, help="training rows per task")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--length-buckets", type=int, nargs="+", default=[128, 192, 256])
    parser.add_argument("--skip", type=int, default=24, help="untimed batches first")
    parser.add_argument("--batches", type=int, default=40, help="timed batches per pipeline")
    parser.add_argument("--workers", type=int, default=2,
                        help="Grain worker processes for mp_prefetch (0: in process only)")
    parser.add_argument("--workers-skip", type=int, default=2,
                        help="untimed batches first with worker processes (their output "
                             "queues hold one batch per worker: little head start)")
    parser.add_argument("--workers-batches", type=int, default=20,
                        help="timed batches per pipeline with worker processes")
    parser.add_argument("--workers-max-s", type=float, default=4.0,
                        help="stop timing a worker-process pipeline after this many seconds "
                             "(the slowest deliver < 10 ex/s; >= 3 batches are timed)")
    parser.add_argument("--step-batches", type=int, default=2,
                        help="batches per workload timed through the train-step proxies")
    parser.add_argument("--new-tokens", type=int, default=64,
                        help="KV-cache slots after the prompt in the prefill proxy")
    parser.add_argument("--stage-examples", type=int, default=200)
    parser.add_argument("--idle-s", type=float, default=3.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--data-dir", type=Path,
                        help="reuse a built synthetic benchmark (default: a temporary one)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args(argv)
    if min(args.skip, args.workers_skip) < 1 or min(args.batches, args.workers_batches) < 20:
        parser.error("--skip and --workers-skip must be >= 1, --batches and "
                     "--workers-batches >= 20")
    if args.step_batches < 1 or args.step_batches > args.batches:
        parser.error("--step-batches must be in [1, --batches]")
    if not flags.FLAGS.is_parsed():  # grain 0.2.18 reads an absl flag (google/grain#1355)
        flags.FLAGS.mark_as_parsed()

    t_start = time.perf_counter()
    load_start = os.getloadavg()  # other processes on the machine skew every number here
    busy_start = _busy_cpu_s()
    workloads = [*args.tasks, MIX]
    config = preset(PRESET)
    options = EncodeOptions(length_buckets=tuple(sorted(args.length_buckets)),
                            min_pixels=SYNTHETIC_MIN_PIXELS, max_pixels=SYNTHETIC_MAX_PIXELS)
    with tempfile.TemporaryDirectory() as tmp:
        data_dir = args.data_dir or Path(tmp)
        build_s = build_data(data_dir, args.train, args.seed) if args.data_dir is None else 0.0
        sources = {t: load_source(t, "train", data_dir=data_dir) for t in SYNTHETIC_STAGES}
        tokenizer, tokenizer_info = make_tokenizer(config, data_dir)
        print(f"synthetic benchmark built in {build_s:.1f} s ({args.train} train rows per task);"
              f" tokenizer vocab {tokenizer_info['vocab_size']}, trained in "
              f"{tokenizer_info['train_s']:.1f} s", flush=True)
        model = Qwen2_5_VL(config, dtype=jnp.float32, param_dtype=jnp.float32, remat=False,
                           rngs=nnx.Rngs(args.seed))
        n_params = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
        consumer = Consumers(model, args.new_tokens, total_steps=1000)
        pipelines = measure_pipelines(workloads, sources, tokenizer, options, consumer, args)
        read_options = measure_read_options(sources, tokenizer, options, args)
        idle = measure_idle_buffer(sources, tokenizer, options, args)
        stages = measure_stages(workloads, sources, tokenizer, options, args)

    per_workload = {}
    for workload in workloads:
        per_workload[workload] = {}
        for kind in KINDS:
            p = pipelines[workload][kind]
            c = p["step"]
            entry = dict(
                pipeline_in_process_ex_s=p["in_process"]["examples_per_s"],
                consumer=c["consumer"], consumer_ex_s=c["examples_per_s"],
                ratio_in_process=p["in_process"]["examples_per_s"] / c["examples_per_s"],
                batch_shapes=p["batches"]["shapes_len_patches"],
                real_token_fraction=p["batches"]["real_token_fraction"],
                real_patch_fraction=p["batches"]["real_patch_fraction"],
                pipeline=p)
            if args.workers:
                entry["pipeline_workers_ex_s"] = p["workers"]["examples_per_s"]
                entry["ratio_workers"] = p["workers"]["examples_per_s"] / c["examples_per_s"]
            per_workload[workload][kind] = entry
    ratios = {f"{w}/{k}": per_workload[w][k]["ratio_in_process"] for w in workloads
              for k in KINDS}
    wall = time.perf_counter() - t_start
    busy_end = _busy_cpu_s()
    others_cpu_s = (busy_end[0] - busy_start[0]) - (busy_end[1] - busy_start[1])
    report = dict(
        benchmark="data_pipeline",
        date=datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        machine=dict(cpu_count=os.cpu_count(), platform=platform.platform(),
                     processor=cpu_model(), python=sys.version.split()[0],
                     jax_backend=jax.default_backend(),
                     loadavg_1_5_15min=dict(start=load_start, end=os.getloadavg()),
                     other_processes_cpu_s=others_cpu_s,
                     other_processes_share_of_machine=others_cpu_s / (wall * os.cpu_count())),
        versions={name: package_version(name) for name in (
            "jax", "jaxlib", "flax", "optax", "grain", "array_record", "tensorflow-datasets",
            "transformers", "tokenizers", "pillow", "numpy")},
        preset=PRESET, parameters=int(n_params),
        workload=dict(
            tasks=args.tasks, mix=f"grain.IterDataset.mix of {list(SYNTHETIC_STAGES)}, equal "
                                  "weights (batch-level: each batch comes from one task)",
            train_rows_per_task=args.train, batch=args.batch,
            length_buckets=list(options.length_buckets), min_pixels=options.min_pixels,
            max_pixels=options.max_pixels, min_patches=options.min_patches, cot=options.cot,
            tokenizer=tokenizer_info, skip_batches=args.skip, timed_batches=args.batches,
            workers=args.workers, workers_skip_batches=args.workers_skip,
            workers_timed_batches=args.workers_batches, workers_max_s=args.workers_max_s,
            step_batches=args.step_batches, new_tokens=args.new_tokens,
            dtype="float32", remat=False, seed=args.seed,
            sft_consumer="cpt_jax.sft.make_sft_step(micro_batches=1) with make_optimizer("
                         "learning_rate=1e-5, total_steps=1000, warmup_ratio=0.1, cosine)",
            rl_consumer=f"jit(prefill into KV cache of prompt + {args.new_tokens} slots + "
                        "argmax of the last logits); a lower bound on a rollout's time"),
        results=dict(per_workload=per_workload, ratio_in_process=ratios, stages=stages,
                     diagnostics=dict(read_options_num_threads_0=read_options,
                                      idle_iterator_memory=idle),
                     compile=consumer.compile_info),
        target="pipeline examples/s >= train-step examples/s on this CPU: ratio >= 1.0 for "
               "SFT and RL",
        target_met=all(v >= 1.0 for v in ratios.values()),
        total_wall_s=wall,
    )
    print()
    print(markdown_tables(report))
    print(f"\ntarget (ratio >= 1.0 everywhere, in process) met: {report['target_met']}")
    print(f"other processes took {others_cpu_s:.0f} CPU-s during the run "
          f"({report['machine']['other_processes_share_of_machine']:.0%} of the machine)")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {args.out} ({report['total_wall_s']:.0f} s in all)")
    return report


def _busy_cpu_s() -> tuple[float, float]:
    """(CPU seconds the whole machine has been busy, CPU seconds of this process and its
    reaped children), to tell how much of the machine other processes took meanwhile."""
    try:
        fields = [int(x) for x in Path("/proc/stat").read_text().split("\n")[0].split()[1:]]
        # user nice system idle iowait irq softirq (steal and guest left out)
        machine = (sum(fields[:7]) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        machine = float("nan")
    t = os.times()
    return machine, t.user + t.system + t.children_user + t.children_system


if __name__ == "__main__":
    main()
