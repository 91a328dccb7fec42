"""Running `cpt_jax.train` in a subprocess, and reading a finished run's outputs back in tests."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
from flax import nnx

from cpt_jax import train
from cpt_jax.checkpoint import Checkpoints, abstract
from cpt_jax.config import load_run_config

ROOT = Path(__file__).resolve().parents[1]


def train_process(args: list[str], log: Path) -> subprocess.Popen:
    """`python -m cpt_jax.train ARGS` on the CPU, its output in the file `log`: a pipe that
    nobody reads while the run goes on could fill up and stall it."""
    with log.open("w") as output:
        return subprocess.Popen([sys.executable, "-m", "cpt_jax.train", *args], cwd=ROOT,
                                env={**os.environ, "JAX_PLATFORMS": "cpu"}, stdout=output,
                                stderr=subprocess.STDOUT)


def finish(process: subprocess.Popen, log: Path) -> None:
    """Waits for a `train_process` and asserts it succeeded, showing its log's end if not."""
    assert process.wait(timeout=600) == 0, log.read_text()[-3000:]


def stage_params(out: Path, stage: int, config_path: Path) -> dict[str, np.ndarray]:
    """Stage `stage`'s saved parameters, restored onto this process's default device."""
    config = load_run_config(config_path)
    params = nnx.state(train.build_model(config, abstract_only=True), nnx.Param)
    checkpoints = Checkpoints(out)
    try:
        restored, _ = checkpoints.restore_stage(stage, abstract(params))
    finally:
        checkpoints.close()
    return {"/".join(map(str, k)): np.asarray(v.get_value())
            for k, v in nnx.to_flat_state(restored)}
