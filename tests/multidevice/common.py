"""The tiny model's training state and fixed SFT batches, shared by the multi-device scripts
(no environment set-up here: each script sets its device count before jax loads)."""

from __future__ import annotations

import jax
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from cpt_jax.data.pipeline import EncodeOptions, collate
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, preset
from cpt_jax.sft import TrainState, stack_micro_batches
from cpt_jax.sharding import shard_state

CONFIG = preset("tiny")


def example(rng: np.random.Generator, with_image: bool) -> dict:
    """An encoded SFT example: text, an image's placeholder tokens if asked, a response."""
    image, patches, grids = [], [], []
    if with_image:
        image = ([CONFIG.vision_start_token_id] + [CONFIG.image_token_id] * 4
                 + [CONFIG.vision_end_token_id])
        patches = [rng.standard_normal((16, CONFIG.vision.patch_dim), dtype=np.float32)]
        grids = [(1, 4, 4)]
    ids = rng.integers(0, 490, 6).tolist() + image + rng.integers(0, 490, 6).tolist()
    response = int(rng.integers(2, 6))
    return {"input_ids": np.asarray(ids, np.int32),
            "loss_mask": np.asarray([0] * (len(ids) - response) + [1] * response, np.int32),
            "patches": patches, "grids": grids, "instance_id": 0, "answer": ""}


def sft_batches(model: Qwen2_5_VL) -> list[dict]:
    rng = np.random.default_rng(1)
    options = EncodeOptions(length_buckets=(32,), min_patches=128)
    steps = []
    for _ in range(2):
        micro = [collate([example(rng, i % 3 == 0) for i in range(8)], options=options,
                         pad_id=CONFIG.pad_token_id, left_pad=False) for _ in range(2)]
        steps.append(stack_micro_batches(micro, model))
    return steps


def train_state(optimizer: optax.GradientTransformation,
                mesh: Mesh | None) -> tuple[Qwen2_5_VL, TrainState]:
    """The tiny model (seed 0) and its first training state, placed on `mesh` by the logical
    axes (None: one device); the step count replicated on it, as the step's output is, so that
    the second step reuses the first one's program."""
    model = Qwen2_5_VL(CONFIG, rngs=nnx.Rngs(0))
    graphdef, params, rest = nnx.split(model, nnx.Param, ...)
    step = np.zeros((), np.int32)
    if mesh is not None:
        params, rest = shard_state(params, mesh), shard_state(rest, mesh)
        step = jax.device_put(step, NamedSharding(mesh, PartitionSpec()))
    return model, TrainState(graphdef=graphdef, params=params, rest=rest,
                             opt_state=optimizer.init(params), step=step)
