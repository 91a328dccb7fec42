"""The run configuration: YAML files merged with `key=value` overrides, checked against typed
dataclasses before anything is built or compiled.

    config = load_run_config("configs/tiny_cpt.yaml", ["grpo.optim.learning_rate=2e-6"])

A file may start from another (`base: other.yaml`, relative to it) and set only what differs.
OmegaConf's structured configs do the typing (an unknown key or a value of the wrong type is
refused, naming it); `check` adds the rules that span fields (a batch that does not divide
over the mesh, a group of one for GRPO, a stage on a task that does not exist, ...). Every
problem is a `ConfigError` of one line that names the file or override and the key.
"""

from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from omegaconf import MISSING, DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cpt_jax.data.tasks import TASKS
from cpt_jax.rl.grpo import GRPOConfig
from cpt_jax.run_dir import is_url, unsupported_url

ALGORITHMS = ("sft", "grpo")
MODES = ("sequential", "multitask", "rif")
DTYPES = ("float32", "bfloat16")


_ABSENT = object()


PATCH_PIXELS = 14 * 14  # one vision patch of every Qwen2.5-VL size


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key (and file)."""


@dataclass
class OptimConfig:
    """AdamW with global-norm clipping on a warm-up + cosine or constant schedule."""

    learning_rate: float = 1e-6
    schedule: str = "constant"
    warmup_ratio: float = 0.0
    weight_decay: float = 0.01
    grad_clip: float = 1.0
    bf16_moments: bool = True


@dataclass
class ModelConfig:
    """`path` (a Hugging Face folder) wins over `preset` (random weights, for CPU runs).
    `scan_layers` false unrolls the layer loops (faster CPU steps, longer compiles).
    `max_frame_patches` bounds the patches of one image (`Qwen2_5_VL`): null attends over
    all packed patches in the vision tower's full-attention blocks; at least
    data.max_pixels / 196 lets them skip the other images."""

    preset: str | None = "tiny"
    path: str | None = None
    tokenizer: str | None = None
    dtype: str = "float32"
    param_dtype: str = "float32"
    remat: bool = False
    scan_layers: bool = True
    max_frame_patches: int | None = None


@dataclass
class DataConfig:
    data_dir: str = "data"
    synthetic: bool = False
    synthetic_train: int = 2000
    synthetic_test: int = 200
    length_buckets: list[int] = field(default_factory=lambda: [1024, 2048, 4096, 7168])
    min_pixels: int = 200_704
    max_pixels: int = 1_003_520
    min_patches: int = 64
    cot: bool = True
    general_tasks: list[str] = field(default_factory=list)
    train_examples: int | None = None  # the first rows of each train split (None: all)


@dataclass
class EvalConfig:
    """Greedy evaluation of every task's test split before the first stage and after each;
    `examples` caps the rows per task (None: the whole split)."""

    batch_size: int = 8
    max_new_tokens: int = 1024
    examples: int | None = None


@dataclass
class CheckpointConfig:
    """A rolling checkpoint every `every` steps within a stage (the newest `keep` are kept);
    each stage's final model is kept for good."""

    every: int = 100
    keep: int = 2


@dataclass
class RIFConfig:
    """Rollout-based instance filtering before each stage of a `rif` run: `group_size`
    answers per training instance at `temperature`; keep the `solvable` instances (one answer
    correct, the paper's filter) or the `learnable` ones (some but not all correct)."""

    filter: str = "solvable"
    group_size: int = 8
    temperature: float = 1.0
    batch_size: int = 8


@dataclass
class SFTConfig:
    """The paper's SFT: lr 1e-5, cosine, warm-up 0.1, on the bare answer. `response_template`
    formats the target from the answer (`{answer}`): "\\boxed{{{answer}}}" trains the boxed
    form the chain-of-thought reward reads. `steps_per_call` updates run in one jitted call
    (`make_sft_steps`): 13-16 % faster per step on a CPU, where each call maps its
    temporaries afresh. A call never runs past a checkpoint or the stage's end; the steps
    left before one run singly, a second program to compile."""

    batch_size: int = 8
    micro_batches: int = 1
    steps_per_call: int = 1
    response_template: str = "{answer}"
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(
        learning_rate=1e-5, schedule="cosine", warmup_ratio=0.1))


def _plain(annotation: Any) -> Any:
    """OmegaConf types a Literal field as the type of its values."""
    if typing.get_origin(annotation) is typing.Literal:
        return type(typing.get_args(annotation)[0])
    return annotation


# `cpt_jax.rl.grpo.GRPOConfig`'s fields (derived, so the two cannot drift apart), plus the
# prompts per step, the KL reference ("base": the stage-0 model; "previous": the last stage's)
# and the optimiser.
GRPOSection = dataclasses.make_dataclass("GRPOSection", [
    *((f.name, _plain(typing.get_type_hints(GRPOConfig)[f.name]), field(default=f.default))
      for f in dataclasses.fields(GRPOConfig)),
    ("prompts_per_step", int, field(default=8)),
    ("reference", str, field(default="base")),
    ("optim", OptimConfig, field(default_factory=OptimConfig)),
])


def grpo_config(section: Any) -> GRPOConfig:
    """The algorithm's settings from the config's `grpo` section."""
    return GRPOConfig(**{f.name: getattr(section, f.name)
                         for f in dataclasses.fields(GRPOConfig)})


@dataclass
class StageConfig:
    task: str = MISSING
    algorithm: str | None = None
    epochs: float = 1.0
    steps: int | None = None
    learning_rate: float | None = None  # this stage's peak rate, else its algorithm's optim's


@dataclass
class MeshConfig:
    """Device mesh axis sizes; one of them may be -1 for "the remaining devices"."""

    data: int = -1
    fsdp: int = 1
    tp: int = 1


@dataclass
class RunConfig:
    output_dir: str = "outputs/run"  # a folder, or gs://bucket/path (cpt_jax.run_dir)
    staging_dir: str | None = None  # a gs:// run's local copy of its logs (default: under /tmp)
    mode: str = "sequential"
    algorithm: str = "grpo"
    seed: int = 0
    stages: list[StageConfig] = field(default_factory=list)
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    grpo: GRPOSection = field(default_factory=GRPOSection)  # type: ignore[valid-type]
    mesh: MeshConfig = field(default_factory=MeshConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    rif: RIFConfig = field(default_factory=RIFConfig)


def _one_line(error: OmegaConfBaseException) -> str:
    """OmegaConf's message without its multi-line context block, led by the key."""
    message = str(error).strip().splitlines()[0]
    key = getattr(error, "full_key", None)
    return f"{key}: {message}" if key and key not in message else message


def load_run_config(path: os.PathLike | str | None, overrides: Sequence[str] = (),
                    *, device_count: int | None = None) -> RunConfig:
    """The YAML file at `path` (or the defaults) with `overrides` ("a.b=value") applied,
    typed and checked. `device_count` enables the mesh checks."""
    merged: DictConfig = OmegaConf.structured(RunConfig)
    if path is not None:
        for source in _config_chain(Path(path)):
            try:
                layer = OmegaConf.load(source)
                layer.pop("base", None)
                merged = OmegaConf.merge(merged, layer)
            except OmegaConfBaseException as error:
                raise ConfigError(f"{source}: {_one_line(error)}") from None
    for override in overrides:
        key, equals, raw = override.partition("=")
        if not equals or not key:
            raise ConfigError(f"override {override!r} is not of the form key=value")
        try:
            value = OmegaConf.from_dotlist([f"value={raw}"])["value"]  # YAML-typed, as CLIs do
            if OmegaConf.select(merged, key, default=_ABSENT) is _ABSENT:
                raise ConfigError(f"override {override!r}: no key {key!r} in the config")
            OmegaConf.update(merged, key, value, merge=True)
        except OmegaConfBaseException as error:
            raise ConfigError(f"override {override!r}: {_one_line(error)}") from None
    config: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    check(config, device_count=device_count)
    return config


def _config_chain(path: Path) -> list[Path]:
    """The file and the files its `base:` key names (relative to it), base first: a config
    that differs from another in a few keys says only those."""
    chain: list[Path] = []
    while True:
        if not path.exists():
            named = f" (the base of {chain[0]})" if chain else ""
            raise ConfigError(f"config file {path}{named} does not exist")
        if path.resolve() in (p.resolve() for p in chain):
            raise ConfigError(f"{chain[-1]}: `base:` files form a cycle at {path}")
        chain.insert(0, path)
        try:
            base = OmegaConf.load(path).get("base")
        except OmegaConfBaseException as error:
            raise ConfigError(f"{path}: {_one_line(error)}") from None
        if base is None:
            return chain
        path = path.parent / str(base)


def _choice(value: Any, allowed: Sequence[str], key: str) -> None:
    if value not in allowed:
        raise ConfigError(f"{key}: {value!r} is not one of {', '.join(allowed)}")


def stage_algorithm(config: RunConfig, stage: StageConfig) -> str:
    return stage.algorithm or config.algorithm


def run_algorithms(config: RunConfig) -> set[str]:
    """The algorithms a run's stages use ("sft", "grpo"); RIF samples, so it implies GRPO."""
    algorithms = {stage_algorithm(config, s) for s in config.stages}
    return algorithms | {"grpo"} if config.mode == "rif" else algorithms


def mesh_shape(mesh: MeshConfig, device_count: int) -> tuple[int, int, int]:
    """(data, fsdp, tp) with a -1 resolved to the devices left over."""
    sizes = [mesh.data, mesh.fsdp, mesh.tp]
    if sizes.count(-1) > 1 or any(s == 0 or s < -1 for s in sizes):
        raise ConfigError(f"mesh: sizes {sizes} must be positive, with at most one -1")
    known = 1
    for size in sizes:
        known *= size if size > 0 else 1
    if -1 in sizes:
        if device_count % known:
            raise ConfigError(f"mesh: {device_count} devices do not divide by {known}")
        sizes[sizes.index(-1)] = device_count // known
    if sizes[0] * sizes[1] * sizes[2] != device_count:
        raise ConfigError(f"mesh: data x fsdp x tp = {sizes} does not use the {device_count} "
                          f"devices")
    return sizes[0], sizes[1], sizes[2]


def check(config: RunConfig, *, device_count: int | None = None) -> None:
    """The rules that span fields; each failure names the key."""
    _choice(config.mode, MODES, "mode")
    _choice(config.algorithm, ALGORITHMS, "algorithm")
    _choice(config.model.dtype, DTYPES, "model.dtype")
    _choice(config.model.param_dtype, DTYPES, "model.param_dtype")
    _choice(config.grpo.kl_kind, ("kl", "abs", "mse", "low_var_kl"), "grpo.kl_kind")
    _choice(config.grpo.reference, ("base", "previous"), "grpo.reference")
    for key, optim in (("sft.optim", config.sft.optim), ("grpo.optim", config.grpo.optim)):
        _choice(optim.schedule, ("cosine", "constant"), f"{key}.schedule")
        if optim.learning_rate <= 0:
            raise ConfigError(f"{key}.learning_rate must be > 0, got {optim.learning_rate}")
    try:
        target = config.sft.response_template.format(answer="\0")
    except (KeyError, IndexError, ValueError) as error:
        raise ConfigError(f"sft.response_template: {config.sft.response_template!r} does not "
                          f"format with only {{answer}} ({error!r}); write braces as {{{{ }}}}"
                          ) from None
    if "\0" not in target:
        raise ConfigError(f"sft.response_template: {config.sft.response_template!r} has no "
                          f"{{answer}}")
    frame_patches = config.model.max_frame_patches
    if frame_patches is not None and frame_patches < config.data.max_pixels // PATCH_PIXELS:
        raise ConfigError(f"model.max_frame_patches: {frame_patches} is below the "
                          f"{config.data.max_pixels // PATCH_PIXELS} patches of an image at "
                          f"data.max_pixels ({config.data.max_pixels} / {PATCH_PIXELS})")
    if error := unsupported_url(config.output_dir):
        raise ConfigError(error)
    if config.staging_dir is not None and is_url(config.staging_dir):
        raise ConfigError(f"staging_dir: {config.staging_dir!r} must be a local folder")
    if config.model.path is None and config.model.preset is None:
        raise ConfigError("model: set model.path (a Hugging Face folder) or model.preset")
    if not config.stages:
        raise ConfigError("stages: the run needs at least one stage")
    for i, stage in enumerate(config.stages):
        if stage.task not in TASKS:
            raise ConfigError(f"stages[{i}].task: unknown task {stage.task!r}")
        if stage.algorithm is not None:
            _choice(stage.algorithm, ALGORITHMS, f"stages[{i}].algorithm")
        if stage.steps is None and stage.epochs <= 0:
            raise ConfigError(f"stages[{i}]: epochs must be > 0 (or set steps)")
        if stage.learning_rate is not None and stage.learning_rate <= 0:
            raise ConfigError(f"stages[{i}].learning_rate must be > 0, got "
                              f"{stage.learning_rate}")
        if stage.learning_rate is not None and config.mode == "multitask":
            raise ConfigError(f"stages[{i}].learning_rate: a multitask run trains one stage; "
                              f"set sft.optim.learning_rate / grpo.optim.learning_rate")
    for task in config.data.general_tasks:
        if task not in TASKS:
            raise ConfigError(f"data.general_tasks: unknown task {task!r}")
    algorithms = run_algorithms(config)
    grpo_stages = [s for s in config.stages if stage_algorithm(config, s) == "grpo"]
    if "grpo" in algorithms:
        try:  # GRPOConfig's own checks, named as keys of the `grpo` section
            grpo_config(config.grpo).check_batch(config.grpo.prompts_per_step)
        except ValueError as error:
            raise ConfigError(f"grpo.{error}") from None
    _choice(config.rif.filter, ("solvable", "learnable"), "rif.filter")
    for key, value in (("eval.batch_size", config.eval.batch_size),
                       ("eval.max_new_tokens", config.eval.max_new_tokens),
                       ("checkpoint.every", config.checkpoint.every),
                       ("checkpoint.keep", config.checkpoint.keep),
                       ("rif.batch_size", config.rif.batch_size),
                       ("sft.batch_size", config.sft.batch_size),
                       ("sft.steps_per_call", config.sft.steps_per_call)):
        if value < 1:
            raise ConfigError(f"{key} must be >= 1, got {value}")
    if config.data.train_examples is not None and config.data.train_examples < 1:
        raise ConfigError(f"data.train_examples must be >= 1 (or null for all), got "
                          f"{config.data.train_examples}")
    if config.eval.examples is not None and config.eval.examples < 1:
        raise ConfigError(f"eval.examples must be >= 1 (or null for all), got "
                          f"{config.eval.examples}")
    if config.mode == "rif" and config.rif.group_size < 2:
        raise ConfigError(f"rif.group_size must be > 1, got {config.rif.group_size}")
    if config.sft.batch_size % config.sft.micro_batches:
        raise ConfigError(f"sft.batch_size {config.sft.batch_size} is not divisible by "
                          f"sft.micro_batches {config.sft.micro_batches}")
    if device_count is not None:
        data, fsdp, _ = mesh_shape(config.mesh, device_count)
        shards = data * fsdp
        micro = config.sft.batch_size // config.sft.micro_batches
        if "sft" in algorithms and micro % shards:
            raise ConfigError(f"sft: a micro-batch of {micro} rows does not divide over the "
                              f"mesh's {shards} data x fsdp shards")
        if grpo_stages and config.grpo.micro_batch_rows % shards:
            raise ConfigError(f"grpo.micro_batch_rows {config.grpo.micro_batch_rows} does not "
                              f"divide over the mesh's {shards} data x fsdp shards")


def save_run_config(config: RunConfig, path: os.PathLike | str) -> None:
    """The resolved configuration as YAML (next to the checkpoints)."""
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    Path(path).write_text(OmegaConf.to_yaml(OmegaConf.structured(config)))
