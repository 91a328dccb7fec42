"""Will a run fit a TPU slice? Compile its programs for the topology, from this machine.

    python -m cpt_jax.plan --config configs/paper/qwen2_5_vl_7b_grpo.yaml --topology v5p:2x2x1
                           [--json] [--mfu 0.4] [key=value ...]

The model is built abstractly (shapes only: the architecture comes from `model.path`'s
config.json when that folder exists, else from `model.preset`), the config's mesh is laid over
the topology's devices with the logical-axis rules every run uses, and the programs the
trainer runs are lowered with abstract, sharded inputs and compiled by the real TPU compiler
(libtpu, `pip install -r requirements-tpu.txt`): the SFT step, the GRPO update, the sampler's
prefill and one decode step, the whole rollout (prefill + decode loop, the program the
trainer runs), and the reference / old-policy forward. Each program's per-device bytes come
from XLA's `memory_analysis()`; the peak is the largest program's arguments + temporaries +
outputs not aliased to (donated) arguments. Model FLOPs are counted by formula (XLA's cost
analysis counts a scanned layer once), and the step time is what they take at `--mfu` of the
chips' bf16 peak.

Inputs have the largest shapes the config allows: every row as long as the largest length
bucket, one image per row at `data.max_pixels`, answers of `grpo.max_new_tokens`.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("TPU_SKIP_MDS_QUERY", "1")
# Several processes (pytest workers, a plan beside a run) may hold libtpu at once.
os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402
from jax.sharding import NamedSharding, PartitionSpec  # noqa: E402

from cpt_jax.config import (  # noqa: E402
    ConfigError,
    RunConfig,
    grpo_config,
    load_run_config,
    mesh_shape,
    run_algorithms,
)
from cpt_jax.data.pipeline import patch_bucket  # noqa: E402
from cpt_jax.flops import text_params_per_token, vision_params_per_patch  # noqa: E402
from cpt_jax.models.qwen2_5_vl import (  # noqa: E402
    GroupCache,
    Qwen2_5_VL,
    Qwen2_5_VLConfig,
    load_config,
    preset,
)
from cpt_jax.optim import make_optimizer  # noqa: E402
from cpt_jax.rl.groups import Group, shared_prefix_batch  # noqa: E402
from cpt_jax.rl.grpo import (  # noqa: E402
    MODEL_INPUTS,
    GRPOConfig,
    logprob_program,
    make_grpo_update,
)
from cpt_jax.rl.sampler import Prompts, prepare_prompts, sampler_program  # noqa: E402
from cpt_jax.sft import (  # noqa: E402
    TrainState,
    make_sft_step,
    make_sft_steps,
    stack_micro_batches,
)
from cpt_jax.sharding import (  # noqa: E402
    batch_shardings,
    logical_spec,
    make_mesh,
    state_shardings,
)

GiB = 2**30
# device_kind -> (HBM bytes, peak dense bf16 FLOP/s) per chip, from Google's TPU pages.
CHIPS: dict[str, tuple[int, float]] = {
    "TPU v4": (32 * GiB, 275e12),
    "TPU v5 lite": (16 * GiB, 197e12),
    "TPU v5": (95 * GiB, 459e12),
    "TPU v6 lite": (32 * GiB, 918e12),
}
PATCH_DIM = 1176


@dataclasses.dataclass
class ProgramReport:
    argument_bytes: int
    temp_bytes: int
    output_bytes: int
    alias_bytes: int
    peak_bytes: int
    compile_seconds: float
    error: str | None = None


class PlanError(ValueError):
    """A topology, config or model that cannot be planned; the message names it."""


def topology_devices(name: str) -> list[jax.Device]:
    """The abstract devices of a TPU topology such as "v5p:2x2x1" (needs libtpu). A v4 chip's
    two TensorCores are one megacore device, as JAX shows them on a v4 VM (libtpu's default
    description splits them into two devices of half the HBM)."""
    from jax.experimental import topologies
    extra = {"chip_config_name": "megacore"} if name.startswith("v4:") else {}
    try:
        return list(topologies.get_topology_desc(topology_name=name, platform="tpu",
                                                  **extra).devices)
    except Exception as error:  # libtpu missing, or a name it does not know
        raise PlanError(f"--topology {name}: {str(error).splitlines()[0]} (TPU compilation "
                        f"needs libtpu: pip install -r requirements-tpu.txt)") from None


def chip_figures(devices: Sequence[jax.Device]) -> tuple[int, float]:
    """(HBM bytes, peak bf16 FLOP/s) per device (a chip may show as several devices)."""
    kind = devices[0].device_kind
    if kind not in CHIPS:
        raise PlanError(f"no HBM figure for device kind {kind!r}; known: {', '.join(CHIPS)}")
    chips = len({tuple(d.coords) for d in devices})
    hbm, flops = CHIPS[kind]
    per_chip = len(devices) // chips
    return hbm // per_chip, flops / per_chip


def architecture(config: RunConfig) -> Qwen2_5_VLConfig:
    """The model's shape: `model.path`'s config.json when the folder exists, else the preset."""
    path = config.model.path
    if path is not None and (Path(path) / "config.json").exists():
        return load_config(path)
    if config.model.preset is None:
        raise PlanError(f"model.path {path} has no config.json and model.preset is not set: "
                        f"plan needs one of them for the architecture")
    return preset(config.model.preset)


def abstract_model(config: RunConfig, arch: Qwen2_5_VLConfig) -> Qwen2_5_VL:
    model = config.model
    return nnx.eval_shape(lambda: Qwen2_5_VL(arch, dtype=jnp.dtype(model.dtype),
                                             param_dtype=jnp.dtype(model.param_dtype),
                                             remat=model.remat, rngs=nnx.Rngs(0)))


def _abstract(tree: Any, shardings: Any) -> Any:
    """Shape/dtype/sharding descriptions of a tree's arrays (nnx Variables kept as such)."""
    def one(value: Any, sharding: Any) -> Any:
        return jax.ShapeDtypeStruct(np.shape(value), value.dtype, sharding=sharding)

    is_var = lambda x: isinstance(x, nnx.Variable)  # noqa: E731
    return jax.tree.map(lambda v, s: v.replace(one(v.get_value(), s.get_value()))
                        if is_var(v) else one(v, s), tree, shardings, is_leaf=is_var)


def _stacked(batch: dict[str, Any], shardings: dict[str, Any], *leading: int) -> Any:
    """One concrete micro-batch [1, ...] described as arrays [*leading, ...] (micro-batches;
    steps and micro-batches)."""
    return jax.tree.map(lambda v, s: jax.ShapeDtypeStruct((*leading, *np.shape(v)[1:]),
                                                          np.asarray(v).dtype, sharding=s),
                        batch, shardings)


def image_grid(max_pixels: int, merge: int = 2, patch: int = 14) -> tuple[int, int, int]:
    """The (t, h, w) patch grid of the largest square image within `max_pixels`."""
    side = int(math.isqrt(max_pixels // (merge * patch) ** 2)) * merge
    return 1, side, side


class Planner:
    """The abstract model, mesh, state and worst-case inputs of a config on a topology."""

    def __init__(self, config: RunConfig, devices: Sequence[jax.Device]):
        self.config = config
        self.devices = list(devices)
        self.mesh = make_mesh(mesh_shape(config.mesh, len(devices)), devices)
        self.arch = architecture(config)
        self.model = abstract_model(config, self.arch)
        graphdef, params, rest = nnx.split(self.model, nnx.Param, ...)
        self.graphdef = graphdef
        self.params = _abstract(params, state_shardings(params, self.mesh))
        self.rest = _abstract(rest, state_shardings(rest, self.mesh))
        self.grid = image_grid(config.data.max_pixels)
        self.image_tokens = int(np.prod(self.grid)) // self.arch.vision.merge_unit

    @functools.cached_property
    def grpo(self) -> GRPOConfig:
        """The GRPO settings of the config's `grpo` section (checked when first asked for: an
        SFT-only config never builds them)."""
        return grpo_config(self.config.grpo)

    # -- inputs ---------------------------------------------------------------------------

    def _row_ids(self, length: int, image_at: int) -> np.ndarray:
        """A row of `length` token ids with one image's tokens from `image_at`."""
        ids = np.full(length, 100, np.int32)
        ids[image_at - 1] = self.arch.vision_start_token_id
        ids[image_at:image_at + self.image_tokens] = self.arch.image_token_id
        ids[image_at + self.image_tokens] = self.arch.vision_end_token_id
        return ids

    def _check_fits(self, length: int, key: str) -> None:
        if self.image_tokens + 8 > length:
            raise PlanError(f"{key}: {length} tokens cannot hold an image of {self.grid} "
                            f"patches ({self.image_tokens} tokens; data.max_pixels "
                            f"{self.config.data.max_pixels})")

    def sft_batch(self) -> Any:
        sft = self.config.sft
        rows, length = sft.batch_size // sft.micro_batches, max(self.config.data.length_buckets)
        self._check_fits(length, "data.length_buckets")
        patches = int(np.prod(self.grid))
        batch = {
            "input_ids": np.stack([self._row_ids(length, 8) for _ in range(rows)]),
            "attention_mask": np.ones((rows, length), np.int32),
            "loss_mask": np.ones((rows, length), np.int32),
            "pixel_values": np.zeros((patch_bucket(rows * patches, self.config.data.min_patches),
                                      PATCH_DIM), np.float32),
            "image_grid_thw": np.asarray([self.grid] * rows, np.int64),
            "num_patches": np.asarray(rows * patches)}
        stacked = stack_micro_batches([batch], self.model)
        if sft.steps_per_call == 1:
            return _stacked(stacked, batch_shardings(stacked, self.mesh), sft.micro_batches)
        shardings = batch_shardings(jax.tree.map(lambda v: v[None], stacked), self.mesh,
                                    steps_axis=True)
        return _stacked(stacked, shardings, sft.steps_per_call, sft.micro_batches)

    def prompt_length(self) -> int:
        length = max(self.config.data.length_buckets)
        self._check_fits(length, "data.length_buckets")
        return length

    def update_batch(self) -> tuple[Any, int]:
        """One GRPO mini-batch as the update sees it, and its number of micro-batches."""
        grpo, prompt_length = self.config.grpo, self.prompt_length()
        rows = grpo.micro_batch_rows
        patches = np.zeros((int(np.prod(self.grid)), PATCH_DIM), np.float32)
        prompt = self._row_ids(prompt_length, 8)
        new = grpo.max_new_tokens
        # One micro-batch: whole groups, or the part of one group that a micro-batch holds.
        per_prompt = min(rows, grpo.group_size)
        groups = [Group(instance_id=0, answer="", prompt_ids=prompt, patches=patches,
                        grids=np.asarray([self.grid]),
                        tokens=np.full((per_prompt, new), 100, np.int32),
                        mask=np.ones((per_prompt, new), np.int32),
                        logprobs=np.zeros((per_prompt, new), np.float32),
                        texts=[""] * per_prompt, scores=[{}] * per_prompt)
                  for _ in range(max(1, rows // grpo.group_size))]
        batch = shared_prefix_batch(groups, self.model, prompt_length=prompt_length,
                                    rows_per_micro_batch=rows, min_patches=grpo.min_patches)
        batch.pop("sampler_logprobs")
        batch["advantages"] = np.zeros(batch["answer_ids"].shape[:2], np.float32)
        wanted = (["old_logprobs"] * (not self.grpo.on_policy)
                  + ["ref_logprobs"] * (grpo.kl_coef > 0))
        for key in wanted:
            batch[key] = np.zeros(batch["answer_ids"].shape, np.float32)
        answers = grpo.prompts_per_step // grpo.mini_batches * grpo.group_size
        micro_batches = answers // rows
        return _stacked(batch, batch_shardings(batch, self.mesh), micro_batches), micro_batches

    def prompts(self) -> Prompts:
        """A rollout's prompt batch: `prompts_per_step` prompts, left-padded."""
        count, length = self.config.grpo.prompts_per_step, self.prompt_length()
        patches = int(np.prod(self.grid))
        batch = {"input_ids": np.stack([self._row_ids(length, 8) for _ in range(count)]),
                 "attention_mask": np.ones((count, length), np.int32),
                 "pixel_values": np.zeros((patch_bucket(count * patches,
                                                        self.config.grpo.min_patches),
                                           PATCH_DIM), np.float32),
                 "image_grid_thw": np.asarray([self.grid] * count, np.int64),
                 "num_patches": np.asarray(count * patches)}
        prompts = prepare_prompts(self.model, batch)
        as_dict = prompts._asdict()
        shardings = batch_shardings(as_dict, self.mesh)
        return Prompts(**_abstract(as_dict, shardings))

    # -- programs ------------------------------------------------------------------------

    def optimizer(self, algorithm: str) -> Any:
        optim = self.config.sft.optim if algorithm == "sft" else self.config.grpo.optim
        return make_optimizer(learning_rate=optim.learning_rate, total_steps=1000,
                              warmup_ratio=optim.warmup_ratio, schedule=optim.schedule,
                              weight_decay=optim.weight_decay, grad_clip=optim.grad_clip,
                              moments_dtype=jnp.bfloat16 if optim.bf16_moments else None)

    def train_state(self, optimizer: Any) -> TrainState:
        """The abstract train state; the optimiser's moments sharded like their parameters."""
        opt_state = jax.eval_shape(optimizer.init, self.params)
        opt_state = _abstract(opt_state, state_shardings(opt_state, self.mesh))
        step = jax.ShapeDtypeStruct((), jnp.int32,
                                    sharding=NamedSharding(self.mesh, PartitionSpec()))
        return TrainState(graphdef=self.graphdef, params=self.params, rest=self.rest,
                          opt_state=opt_state, step=step)

    def programs(self) -> dict[str, Callable[[], tuple[Any, tuple[Any, ...]]]]:
        """name -> a thunk giving (the jitted program, its abstract arguments), for the
        config's algorithms."""
        config = self.config
        algorithms = run_algorithms(config)
        found: dict[str, Callable[[], tuple[Any, tuple[Any, ...]]]] = {}
        if "sft" in algorithms:
            # With several steps per call, the call of that many (the larger program).
            found["sft_step"] = lambda: (
                make_sft_step(self.model, self.optimizer("sft"),
                              micro_batches=config.sft.micro_batches)
                if config.sft.steps_per_call == 1 else
                make_sft_steps(self.model, self.optimizer("sft"),
                               micro_batches=config.sft.micro_batches,
                               steps=config.sft.steps_per_call),
                (self.train_state(self.optimizer("sft")), self.sft_batch()))
        if "grpo" in algorithms:
            grpo = self.grpo
            states = (self.params, self.rest)
            found["rollout"] = lambda: (
                sampler_program(self.model, grpo.sampling, stop_ids=[0], pad_id=0),
                (states, self.prompts(), jax.random.key(0)))
            found["prefill"] = lambda: (self._prefill(), (states, self.prompts()))
            found["decode_step"] = lambda: (self._decode(), (states, self._cache()))
            found["logprobs"] = lambda: (
                logprob_program(self.model, grpo.temperature),
                (states, _without_update_keys(self.update_batch()[0])))
            found["grpo_update"] = lambda: (
                make_grpo_update(self.model, self.optimizer("grpo"), grpo),
                (self.train_state(self.optimizer("grpo")), self.update_batch()[0]))
        return found

    def _prefill(self) -> Any:
        graphdef, budget = self.graphdef, self.config.grpo.max_new_tokens
        group = self.config.grpo.group_size

        @jax.jit
        def prefill(states: tuple[nnx.State, ...], prompts: Prompts) -> Any:
            model = nnx.merge(graphdef, *states)
            cache = model.init_cache(*prompts.input_ids.shape)
            hidden, cache = model.hidden_states(prompts.input_ids, prompts.positions,
                                                prompts.attention_mask, prompts.vision, cache)
            return model.logits(hidden[:, -1]), GroupCache.after_prefill(cache, group, budget)
        return prefill

    def _cache(self) -> Any:
        """The cache a decode step reads (each prompt once, prompts x group_size answers),
        sharded by the axes the decoder pins it to."""
        grpo = self.config.grpo
        cache = jax.eval_shape(lambda: GroupCache.after_prefill(
            self.model.init_cache(grpo.prompts_per_step, self.prompt_length()),
            grpo.group_size, grpo.max_new_tokens))
        leaves, treedef = jax.tree.flatten(cache)
        names = jax.tree.leaves(cache.logical_axes(), is_leaf=lambda n: isinstance(n, tuple) and
                                all(isinstance(e, str | None) for e in n))
        return jax.tree.unflatten(treedef, [jax.ShapeDtypeStruct(
            x.shape, x.dtype, sharding=NamedSharding(self.mesh, logical_spec(n, x.shape,
                                                                             self.mesh)))
            for x, n in zip(leaves, names, strict=True)])

    def _decode(self) -> Any:
        graphdef = self.graphdef
        rows = self.config.grpo.prompts_per_step * self.config.grpo.group_size

        @jax.jit
        def decode(states: tuple[nnx.State, ...], cache: Any) -> Any:
            model = nnx.merge(graphdef, *states)
            logits, cache = model.decode(jnp.zeros((rows, 1), jnp.int32), cache)
            return logits[:, -1], cache
        return decode

    # -- FLOPs ----------------------------------------------------------------------------

    def model_flops_per_step(self) -> dict[str, float]:
        """Model FLOPs of one step of each algorithm: 2 per parameter per token forward, 6
        forward + backward, plus attention's score and value products."""
        text, vision = self.arch.text, self.arch.vision
        n_text = text_params_per_token(text)
        n_vision = vision_params_per_patch(vision)
        patches = int(np.prod(self.grid))

        def forward(rows: int, length: int) -> float:
            attention = 4 * text.num_hidden_layers * text.hidden_size * length * length
            vision_attn = 4 * vision.depth * vision.hidden_size * patches * patches
            return rows * (2 * n_text * length + attention + 2 * n_vision * patches
                           + vision_attn)

        config, found = self.config, {}
        algorithms = run_algorithms(config)
        if "sft" in algorithms:
            found["sft"] = 3 * forward(config.sft.batch_size, max(config.data.length_buckets))
        if "grpo" in algorithms:
            grpo = config.grpo
            prompts, answers = grpo.prompts_per_step, grpo.prompts_per_step * grpo.group_size
            length = self.prompt_length() + grpo.max_new_tokens
            # The sampler and the scoring forwards alike run each prompt once and its answers'
            # tokens against its cache.
            scored = (forward(prompts, self.prompt_length())
                      + answers * grpo.max_new_tokens * 2 * n_text
                      + answers * 4 * text.num_hidden_layers * text.hidden_size
                      * grpo.max_new_tokens * length)
            old = not self.grpo.on_policy  # else the update's own log-probs serve
            # Sampling, the old and reference log-probs, and forward + backward per epoch.
            found["grpo"] = (1 + old + (grpo.kl_coef > 0) + 3 * grpo.ppo_epochs) * scored
        return found


def _without_update_keys(batch: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in batch.items() if k in MODEL_INPUTS}


def measure(lowered: Any) -> ProgramReport:
    """Compile and read the per-device bytes; a program the compiler refuses for HBM is
    reported with the temporaries it asked for (and `error` says so)."""
    started = time.perf_counter()
    try:
        compiled = lowered.compile()
    except jax.errors.JaxRuntimeError as failure:
        message = str(failure)
        asked = re.search(r"HLO temporaries \(([\d.]+)([KMGT])\)", message)
        if "RESOURCE_EXHAUSTED" not in message or asked is None:
            raise
        temp = int(float(asked.group(1)) * 2 ** (10 * "KMGT".index(asked.group(2)) + 10))
        return ProgramReport(argument_bytes=0, temp_bytes=temp, output_bytes=0,
                             alias_bytes=0, peak_bytes=temp,
                             compile_seconds=time.perf_counter() - started,
                             error=message.splitlines()[0][:300])
    seconds = time.perf_counter() - started
    memory = compiled.memory_analysis()
    arguments, temp = memory.argument_size_in_bytes, memory.temp_size_in_bytes
    output, alias = memory.output_size_in_bytes, memory.alias_size_in_bytes
    return ProgramReport(argument_bytes=arguments, temp_bytes=temp, output_bytes=output,
                         alias_bytes=alias, peak_bytes=arguments + temp + output - alias,
                         compile_seconds=seconds)


def plan(config: RunConfig, topology: str, *, mfu: float = 0.4,
         only: Sequence[str] | None = None) -> dict[str, Any]:
    """Compile the config's programs for `topology`; the report as a JSON-ready dict."""
    devices = topology_devices(topology)
    hbm, peak_flops = chip_figures(devices)
    planner = Planner(config, devices)
    reports = {}
    for name, build in planner.programs().items():
        if only is None or name in only:
            program, arguments = build()
            with jax.set_mesh(planner.mesh):  # activations pinned as the trainer pins them
                reports[name] = measure(program.lower(*arguments))
            print(f"  {name}: compiled in {reports[name].compile_seconds:.1f} s",
                  file=sys.stderr, flush=True)
    peak = max(r.peak_bytes for r in reports.values())
    refused = [name for name, r in reports.items() if r.error]
    flops = planner.model_flops_per_step()
    return {
        "topology": topology, "devices": len(devices),
        "device_kind": devices[0].device_kind,
        "hosts": len({d.process_index for d in devices}),
        "mesh": dict(planner.mesh.shape),
        "hbm_bytes_per_device": hbm,
        "programs": {name: dataclasses.asdict(r) for name, r in reports.items()},
        "peak_bytes": peak, "fits": peak <= hbm and not refused,
        "headroom_bytes": hbm - peak, "refused": refused,
        "model_flops_per_step": sum(flops.values()), "model_flops": flops,
        "mfu": mfu,
        "step_seconds_at_mfu": {k: f / (len(devices) * peak_flops * mfu)
                                for k, f in flops.items()},
    }


def suggest(config: RunConfig, topology: str, report: dict[str, Any],
            mfu: float) -> str | None:
    """When the plan does not fit: the first fsdp-heavier mesh or smaller micro-batch of the
    run's algorithms that does, or None. Each candidate is compiled for the programs that did
    not fit (more sharding or smaller micro-batches do not grow the others)."""
    if report["fits"]:
        return None
    hbm = report["hbm_bytes_per_device"]
    failing = [name for name, r in report["programs"].items()
               if r["error"] or r["peak_bytes"] > hbm]
    algorithms = run_algorithms(config)
    devices = report["devices"]
    tries: list[tuple[str, RunConfig]] = []
    for fsdp in _divisors(devices):
        if fsdp > config.mesh.fsdp:
            mesh = dataclasses.replace(config.mesh, data=devices // fsdp // config.mesh.tp
                                       if devices % (fsdp * config.mesh.tp) == 0 else -1,
                                       fsdp=fsdp)
            tries.append((f"mesh.fsdp={fsdp} mesh.data={mesh.data}",
                          dataclasses.replace(config, mesh=mesh)))
    sft = config.sft
    for micro in _divisors(sft.batch_size) if "sft" in algorithms else []:
        if micro > sft.micro_batches:
            tries.append((f"sft.micro_batches={micro}", dataclasses.replace(
                config, sft=dataclasses.replace(sft, micro_batches=micro))))
    for rows in (sorted(_divisors(config.grpo.micro_batch_rows), reverse=True)
                 if "grpo" in algorithms else []):
        if rows < config.grpo.micro_batch_rows:
            tries.append((f"grpo.micro_batch_rows={rows}", dataclasses.replace(
                config, grpo=dataclasses.replace(config.grpo, micro_batch_rows=rows))))
    for label, candidate in tries:
        try:
            if plan(candidate, topology, mfu=mfu, only=failing)["fits"]:
                return label
        except (ConfigError, PlanError, ValueError):
            continue
    return None


def _divisors(n: int) -> list[int]:
    return [d for d in range(1, n + 1) if n % d == 0]


def table(report: dict[str, Any]) -> str:
    gib = lambda b: f"{b / GiB:8.2f}"  # noqa: E731
    lines = [f"topology {report['topology']}: {report['devices']} x {report['device_kind']} "
             f"({report['hosts']} host(s)), mesh {report['mesh']}, HBM "
             f"{report['hbm_bytes_per_device'] / GiB:.1f} GiB per device",
             f"{'program':<12} {'args GiB':>8} {'temp GiB':>8} {'out GiB':>8} {'peak GiB':>8} "
             f"{'compile s':>9}"]
    for name, r in report["programs"].items():
        lines.append(f"{name:<12} {gib(r['argument_bytes'])} {gib(r['temp_bytes'])} "
                     f"{gib(r['output_bytes'] - r['alias_bytes'])} {gib(r['peak_bytes'])} "
                     f"{r['compile_seconds']:9.1f}")
    verdict = "fits" if report["fits"] else "does NOT fit"
    for name in report["refused"]:
        lines.append(f"{name}: the compiler refused it: {report['programs'][name]['error']}")
    lines.append(f"peak {report['peak_bytes'] / GiB:.2f} GiB per device: {verdict} "
                 f"({report['headroom_bytes'] / GiB:+.2f} GiB headroom)")
    for name, flops in report["model_flops"].items():
        lines.append(f"{name} step: {flops:.3e} model FLOPs, "
                     f"{report['step_seconds_at_mfu'][name]:.1f} s at "
                     f"{100 * report['mfu']:.0f}% MFU")
    if report.get("suggestion"):
        lines.append(f"suggestion: {report['suggestion']} fits")
    elif "suggestion" in report and not report["fits"]:
        lines.append("suggestion: no larger fsdp or smaller micro-batch tried fits; "
                     "a larger topology is needed")
    return "\n".join(lines)


def _parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m cpt_jax.plan",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, type=Path)
    parser.add_argument("--topology", required=True, help="e.g. v5p:2x2x1, v4:2x2x1, v5e:2x4")
    parser.add_argument("--json", action="store_true", help="print the report as JSON")
    parser.add_argument("--mfu", type=float, default=0.4, help="for the implied step time")
    parser.add_argument("--programs", default=None,
                        help="comma-separated subset (sft_step, rollout, prefill, "
                             "decode_step, logprobs, grpo_update)")
    parser.add_argument("--no-suggest", action="store_true",
                        help="skip the search for a setting that fits")
    parser.add_argument("overrides", nargs="*", help="key=value config overrides")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parse_args(argv)
    try:
        devices = topology_devices(args.topology)
        config = load_run_config(args.config, args.overrides, device_count=len(devices))
        only = args.programs.split(",") if args.programs else None
        report = plan(config, args.topology, mfu=args.mfu, only=only)
        if not args.no_suggest:
            report["suggestion"] = suggest(config, args.topology, report, args.mfu)
    except (ConfigError, PlanError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
