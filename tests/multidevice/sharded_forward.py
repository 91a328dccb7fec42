"""Run in a fresh process with 8 host CPU devices (XLA_FLAGS set below, before jax loads):
places the tiny model's parameters on several (data, fsdp, tp) meshes by their logical axes
and prints, as JSON, each mesh's max |logit diff| against one device and the shardings of a
few parameters."""

from __future__ import annotations

import json
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, preset  # noqa: E402
from cpt_jax.sharding import make_mesh, shard_state  # noqa: E402

MESHES = ((8, 1, 1), (1, 8, 1), (1, 4, 2), (2, 2, 2))


def main() -> None:
    model = Qwen2_5_VL(preset("tiny"), rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 490, (8, 16))
    ids, positions, mask, _, _ = model.prepare_inputs(ids)

    @jax.jit
    def logits(state, ids, positions, mask):
        return nnx.merge(graphdef, state).forward(ids, positions, mask)[0]

    reference = np.asarray(logits(state, ids, positions, mask))
    report = {"devices": jax.device_count(), "meshes": {}}
    for shape in MESHES:
        mesh = make_mesh(shape)
        sharded = shard_state(state, mesh)
        out = np.asarray(logits(sharded, ids, positions, mask))
        params = {
            "embed_tokens": sharded["language_model"]["embed_tokens"],
            "gate_proj": sharded["language_model"]["layers"]["mlp"]["gate_proj"]["kernel"],
            "k_proj": sharded["language_model"]["layers"]["self_attn"]["k_proj"]["kernel"],
        }
        report["meshes"][str(shape)] = {
            "max_diff": float(np.abs(out - reference).max()),
            "specs": {k: [list(a) if isinstance(a, tuple) else a for a in v.sharding.spec]
                      for k, v in params.items()},
            "shard_shapes": {k: list(v.addressable_shards[0].data.shape)
                             for k, v in params.items()},
            "shapes": {k: list(v.shape) for k, v in params.items()},
        }
    print(json.dumps(report))


if __name__ == "__main__":
    main()
