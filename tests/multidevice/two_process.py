"""One process of a `jax.distributed` run over loopback with gloo collectives, 2 CPU devices
per process: `python two_process.py PROCESS_ID NUM_PROCESSES PORT CHECKPOINT_DIR`.

The processes build one (1, 2 x NUM_PROCESSES, 1) mesh over all their devices, shard the tiny
model's parameters over it (fsdp), make two SFT steps on the same global batches, save the
state with Orbax (every process writes its shards), restore it onto the mesh, and process 0
prints one JSON line: the losses, the parameters gathered from every process (a checksum per
array and the arrays' values), and whether the restored state equals the saved one. Run with
NUM_PROCESSES 1 (and 2 x 2 devices in that one process) for the single-process reference."""

from __future__ import annotations

import json
import os
import sys

PROCESS_ID, NUM_PROCESSES, PORT, CHECKPOINT_DIR = (int(sys.argv[1]), int(sys.argv[2]),
                                                   sys.argv[3], sys.argv[4])
DEVICES = 4 if NUM_PROCESSES == 1 else 2
os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES}"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402

if NUM_PROCESSES > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(f"127.0.0.1:{PORT}", num_processes=NUM_PROCESSES,
                               process_id=PROCESS_ID)

import numpy as np  # noqa: E402
from common import sft_batches, train_state  # noqa: E402
from flax import nnx  # noqa: E402
from jax.experimental import multihost_utils  # noqa: E402

from cpt_jax.checkpoint import Checkpoints, abstract  # noqa: E402
from cpt_jax.optim import make_optimizer  # noqa: E402
from cpt_jax.sft import make_sft_step  # noqa: E402
from cpt_jax.sharding import make_mesh, shard_batch  # noqa: E402


def main() -> None:
    mesh = make_mesh((1, jax.device_count(), 1))
    optimizer = make_optimizer(learning_rate=1e-4, total_steps=4)
    with jax.set_mesh(mesh):  # as the trainer: the optimiser's scalars replicated on the mesh
        model, state = train_state(optimizer, mesh)
        step = make_sft_step(model, optimizer, micro_batches=2)
        losses = []
        for batch in sft_batches(model):
            state, metrics = step(state, shard_batch(batch, mesh))
            losses.append(float(metrics["loss"]))
    saved = {"params": state.params, "opt_state": state.opt_state, "step": state.step}
    checkpoints = Checkpoints(CHECKPOINT_DIR)
    checkpoints.save(1, saved, {"losses": losses})
    checkpoints.wait()
    restored, meta = checkpoints.restore(1, abstract(saved))
    checkpoints.close()
    gather = (lambda tree: multihost_utils.process_allgather(tree, tiled=True)
              ) if NUM_PROCESSES > 1 else (lambda tree: jax.tree.map(np.asarray, tree))
    values = gather(saved)
    same = all(np.array_equal(a, b) for a, b in zip(
        jax.tree.leaves(values), jax.tree.leaves(gather(restored)), strict=True))
    sharded = any(len(p.sharding.device_set) == jax.device_count()
                  and not p.sharding.is_fully_replicated for p in jax.tree.leaves(state.params))
    if PROCESS_ID == 0:
        flat = {"/".join(map(str, k)): np.asarray(v.get_value()).ravel().tolist()
                for k, v in nnx.to_flat_state(values["params"])}
        print(json.dumps({"processes": jax.process_count(), "devices": jax.device_count(),
                          "losses": losses, "meta_losses": meta["losses"],
                          "restored_equal": same, "sharded": sharded, "params": flat}))


if __name__ == "__main__":
    main()
