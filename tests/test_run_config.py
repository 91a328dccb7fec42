"""The run configuration: YAML + overrides typed by the dataclasses, and one-line errors that
name the file, override or key, raised before anything is built."""

from __future__ import annotations

import re

import pytest

from cpt_jax.config import (
    ConfigError,
    MeshConfig,
    grpo_config,
    load_run_config,
    mesh_shape,
    save_run_config,
)

YAML = """
output_dir: out
stages:
  - task: syn_choice
  - {task: syn_ocr, algorithm: sft, epochs: 2}
grpo:
  group_size: 4
  prompts_per_step: 4
  micro_batch_rows: 8
sft:
  batch_size: 8
"""


@pytest.fixture
def path(tmp_path):
    file = tmp_path / "run.yaml"
    file.write_text(YAML)
    return file


def test_file_and_overrides_are_typed(path):
    config = load_run_config(path, ["grpo.optim.learning_rate=2e-6", "stages.1.epochs=3",
                                    "data.length_buckets=[128,256]", "model.path=/ckpt",
                                    "output_dir=elsewhere"], device_count=8)
    assert config.grpo.optim.learning_rate == 2e-6 and config.grpo.group_size == 4
    assert [(s.task, s.algorithm, s.epochs) for s in config.stages] == [
        ("syn_choice", None, 1.0), ("syn_ocr", "sft", 3.0)]
    assert config.data.length_buckets == [128, 256]
    assert config.model.path == "/ckpt" and config.output_dir == "elsewhere"
    assert config.sft.optim.schedule == "cosine" and config.grpo.optim.schedule == "constant"


@pytest.mark.parametrize("override, message", [
    ("grpo.lr=1", "no key 'grpo.lr'"),
    ("grpo.group_size=abc", "grpo.group_size: Value 'abc'"),
    ("grpo.group_size=1", "grpo.group_size must be > 1"),
    ("stages.0.task=foo", "stages[0].task: unknown task 'foo'"),
    ("stages.5.task=foo", "no key 'stages.5.task'"),
    ("stages.1.algorithm=dpo", "stages[1].algorithm: 'dpo'"),
    ("mode=online", "mode: 'online'"),
    ("mesh.fsdp=3", "mesh: 8 devices do not divide by 3"),
    ("mesh.tp=-1", "at most one -1"),
    ("sft.micro_batches=3", "sft.batch_size 8 is not divisible by sft.micro_batches 3"),
    ("sft.steps_per_call=0", "sft.steps_per_call must be >= 1, got 0"),
    ("grpo.micro_batch_rows=32", "grpo.micro_batch_rows 32 does not divide a mini-batch of 16"),
    ("grpo.micro_batch_rows=6", "grpo.micro_batch_rows 6 must be a multiple or a divisor of "
                                "group_size 4"),
    ("grpo.mini_batches=3", "grpo.prompts_per_step 4 is not divisible by mini_batches 3"),
    ("grpo.advantage=ppo", "grpo.advantage must be 'grpo' or 'rloo'"),
    ("model.dtype=float16", "model.dtype: 'float16'"),
    ("data.general_tasks=[nope]", "data.general_tasks: unknown task 'nope'"),
    ("stages.1.learning_rate=0", "stages[1].learning_rate must be > 0, got 0.0"),
    ("stages.1.learning_rate=fast", "stages[1].learning_rate: Value 'fast'"),
    ("sft.response_template=plain", "sft.response_template: 'plain' has no {answer}"),
    ("sft.response_template=boxed{answer", "sft.response_template: 'boxed{answer' does not "
                                           "format with only {answer}"),
    ("nokey", "not of the form key=value"),
    ("output_dir=s3://bucket/run", "output_dir: 's3://bucket/run': the only URLs supported "
                                   "are gs://"),
    ("staging_dir=gs://bucket/x", "staging_dir: 'gs://bucket/x' must be a local folder"),
    ("model.max_frame_patches=4096", "model.max_frame_patches: 4096 is below the 5120 patches "
                                     "of an image at data.max_pixels (1003520 / 196)"),
])
def test_bad_overrides_name_the_key(path, override, message):
    with pytest.raises(ConfigError, match="^.*" + re.escape(message)) as error:
        load_run_config(path, [override], device_count=8)
    assert "\n" not in str(error.value)


def test_stage_learning_rate_only_where_stages_train_apart(path):
    config = load_run_config(path, ["stages.1.learning_rate=3e-5"], device_count=8)
    assert [s.learning_rate for s in config.stages] == [None, 3e-5]
    with pytest.raises(ConfigError, match=r"stages\[1\].learning_rate: a multitask run"):
        load_run_config(path, ["stages.1.learning_rate=3e-5", "mode=multitask"],
                        device_count=8)


def test_batches_must_divide_over_the_mesh(path):
    load_run_config(path, ["mesh.data=4", "mesh.fsdp=2"], device_count=8)
    with pytest.raises(ConfigError, match="sft: a micro-batch of 8 rows does not divide over"):
        load_run_config(path, ["mesh.data=16"], device_count=16)
    with pytest.raises(ConfigError, match="grpo.micro_batch_rows 8 does not divide over"):
        load_run_config(path, ["mesh.data=16", "sft.batch_size=16"], device_count=16)


def test_bad_files_name_the_file_and_key(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("grpo:\n  bogus: 1\nstages: [{task: syn_choice}]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: .*Key 'bogus' not in 'GRPOSection'"):
        load_run_config(bad)
    bad.write_text("grpo:\n  group_size: many\nstages: [{task: syn_choice}]\n")
    with pytest.raises(ConfigError, match=r"bad.yaml: grpo.group_size: Value 'many'"):
        load_run_config(bad)
    with pytest.raises(ConfigError, match="missing.yaml does not exist"):
        load_run_config(tmp_path / "missing.yaml")
    bad.write_text("output_dir: x\n")
    with pytest.raises(ConfigError, match="at least one stage"):
        load_run_config(bad)


def test_mesh_shape_resolves_the_rest():
    assert mesh_shape(MeshConfig(), 8) == (8, 1, 1)
    assert mesh_shape(MeshConfig(data=2, fsdp=-1, tp=2), 8) == (2, 2, 2)
    with pytest.raises(ConfigError, match="does not use the 8 devices"):
        mesh_shape(MeshConfig(data=2, fsdp=2, tp=1), 8)


def test_the_grpo_section_is_the_algorithm_config(path):
    config = load_run_config(path, ["grpo.kl_coef=0.0", "grpo.advantage=rloo"])
    algorithm = grpo_config(config.grpo)
    assert algorithm.group_size == 4 and algorithm.kl_coef == 0.0
    assert algorithm.advantage == "rloo" and algorithm.top_p == 0.99


def test_saved_config_loads_back_equal(path, tmp_path):
    config = load_run_config(path, ["grpo.kl_coef=0.0"])
    save_run_config(config, tmp_path / "out" / "config.yaml")
    assert load_run_config(tmp_path / "out" / "config.yaml") == config
