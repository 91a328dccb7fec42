"""Reading a finished run's outputs back in tests."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from flax import nnx

from cpt_jax import train
from cpt_jax.checkpoint import Checkpoints, abstract
from cpt_jax.config import load_run_config


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
