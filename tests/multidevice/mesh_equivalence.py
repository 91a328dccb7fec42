"""Run in a fresh process with 8 host CPU devices (XLA_FLAGS set below, before jax loads).

For several (data, fsdp, tp) meshes it places the tiny model's parameters by their logical
axes and prints, as one JSON line: the max |logit diff| of a forward pass against one device,
the shardings and shard shapes of a few parameters, and for two SFT steps (2 micro-batches
of 8 rows, images in some rows) the losses and the max |param diff| against one device, and
whether the optimiser moments are sharded like their parameters; and the same for two GRPO
updates (clipped policy loss + low-variance KL, 2 micro-batches of 2 prompts and their 8
answers) on fixed old / reference log-probs and advantages, with how many times each step
compiled on the mesh (once: the second step must reuse the first's program)."""

from __future__ import annotations

import contextlib
import json
import os

os.environ["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
os.environ["JAX_PLATFORMS"] = "cpu"

import jax  # noqa: E402
import numpy as np  # noqa: E402
from common import CONFIG, example, sft_batches, train_state  # noqa: E402
from flax import nnx  # noqa: E402

from cpt_jax.checkpoint import Checkpoints, abstract  # noqa: E402
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL  # noqa: E402
from cpt_jax.optim import make_optimizer  # noqa: E402
from cpt_jax.rl.groups import Group, shared_prefix_batch  # noqa: E402
from cpt_jax.rl.grpo import GRPOConfig, make_grpo_update  # noqa: E402
from cpt_jax.sft import TrainState, make_sft_step  # noqa: E402
from cpt_jax.sharding import (  # noqa: E402
    make_mesh,
    shard_batch,
    shard_state,
    state_shardings,
)

MESHES = ((1, 4, 2), (2, 2, 2))  # fsdp with tp; all three (data too)


_LOWERINGS = [0]  # programs lowered to XLA so far: each compile, cached on disk or not, is one


def _count_lowering(event: str, seconds: float, **_) -> None:
    if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
        _LOWERINGS[0] += 1


jax.monitoring.register_event_duration_secs_listener(_count_lowering)


def _train(mesh, optimizer, make_step, batches) -> tuple[TrainState, list[float], int]:
    """`make_step(model, optimizer)`'s steps over `batches(model)` from the tiny model's first
    state, on `mesh` (None: one device) set as the trainer sets it (the state's scalars are
    created replicated on it, so the first step and the next share one program): the last
    state, the losses, and how many times the step compiled."""
    with contextlib.nullcontext() if mesh is None else jax.set_mesh(mesh):
        model, state = train_state(optimizer, mesh)
        step = make_step(model, optimizer)
        losses, compiles = [], 0
        for batch in batches(model):
            batch = batch if mesh is None else shard_batch(batch, mesh)
            before = _LOWERINGS[0]
            state, metrics = step(state, batch)
            compiles += _LOWERINGS[0] - before
            losses.append(float(metrics["loss"]))
    return state, losses, compiles


def _sft(mesh) -> tuple[list[float], list[np.ndarray], bool, int]:
    """Two SFT steps from the same initial model, on `mesh` (None: one device); the last value
    is how many times the step compiled."""
    optimizer = make_optimizer(learning_rate=1e-4, total_steps=4)  # the scale of the paper's 1e-5
    state, losses, compiles = _train(
        mesh, optimizer, lambda model, opt: make_sft_step(model, opt, micro_batches=2),
        sft_batches)
    mu = state.opt_state.inner_state[1].mu  # the chain: clip, scale_by_adam, decay, lr
    same = all(m.sharding.is_equivalent_to(p.sharding, p.ndim)
               for m, p in zip(jax.tree.leaves(mu), jax.tree.leaves(state.params), strict=True))
    return losses, [np.asarray(p) for p in jax.tree.leaves(state.params)], same, compiles


def _grpo_batches(model: Qwen2_5_VL) -> list[dict]:
    """Two GRPO update batches in the update's layout (each prompt once, its 4 answers beside
    it; 2 micro-batches of 2 prompts and 8 answers; images in every other prompt), with
    advantages per answer and old / reference log-probs near the model's (ratios off 1, so
    the clip and the KL matter)."""
    rng = np.random.default_rng(2)
    batches = []
    for _ in range(2):
        groups = []
        for i in range(4):
            prompt = example(rng, with_image=i % 2 == 0)
            answers = rng.integers(0, 490, (4, 6)).astype(np.int32)
            mask = (np.arange(6) < rng.integers(2, 7, (4, 1))).astype(np.int32)
            patches = (np.concatenate(prompt["patches"]) if prompt["patches"]
                       else np.zeros((0, CONFIG.vision.patch_dim), np.float32))
            groups.append(Group(instance_id=i, answer="", prompt_ids=prompt["input_ids"],
                                patches=patches, grids=np.asarray(prompt["grids"]).reshape(-1, 3),
                                tokens=answers, mask=mask, logprobs=np.zeros((4, 6), np.float32),
                                texts=[""] * 4, scores=[{}] * 4))
        batch = shared_prefix_batch(groups, model, prompt_length=24, rows_per_micro_batch=8,
                                    min_patches=128, pad_id=CONFIG.pad_token_id)
        batch.pop("sampler_logprobs")
        shape = batch["answer_ids"].shape
        batch["advantages"] = rng.standard_normal(shape[:2]).astype(np.float32)
        batch["old_logprobs"] = (-6.0 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
        batch["ref_logprobs"] = (-6.0 + 0.3 * rng.standard_normal(shape)).astype(np.float32)
        batches.append(batch)
    return batches


def _grpo(mesh) -> tuple[list[float], list[np.ndarray], int]:
    """Two GRPO updates from the same initial model, on `mesh` (None: one device); the last
    value is how many times the update compiled."""
    optimizer = make_optimizer(learning_rate=1e-4, total_steps=4, schedule="constant")
    state, losses, compiles = _train(
        mesh, optimizer, lambda model, opt: make_grpo_update(
            model, opt, GRPOConfig(group_size=4, micro_batch_rows=8)), _grpo_batches)
    return losses, [np.asarray(p) for p in jax.tree.leaves(state.params)], compiles


def main() -> None:
    model = Qwen2_5_VL(CONFIG, rngs=nnx.Rngs(0))
    graphdef, state = nnx.split(model)
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 490, (8, 16))
    ids, positions, mask, _, _ = model.prepare_inputs(ids)

    @jax.jit
    def logits(state, ids, positions, mask):
        return nnx.merge(graphdef, state).forward(ids, positions, mask)[0]

    reference = np.asarray(logits(state, ids, positions, mask))
    sft_losses, sft_params, _, _ = _sft(None)
    grpo_losses, grpo_params, _ = _grpo(None)
    report = {"devices": jax.device_count(), "sft_losses": sft_losses,
              "grpo_losses": grpo_losses, "meshes": {}}
    for shape in MESHES:
        mesh = make_mesh(shape)
        sharded = shard_state(state, mesh)
        out = np.asarray(logits(sharded, ids, positions, mask))
        params = {
            "embed_tokens": sharded["language_model"]["embed_tokens"],
            "gate_proj": sharded["language_model"]["layers"]["mlp"]["gate_proj"]["kernel"],
            "k_proj": sharded["language_model"]["layers"]["self_attn"]["k_proj"]["kernel"],
        }
        losses, params_after, moments_sharded, sft_compiles = _sft(mesh)
        rl_losses, rl_params, grpo_compiles = _grpo(mesh)
        report["meshes"][str(shape)] = {
            "max_diff": float(np.abs(out - reference).max()),
            "sft_losses": losses,
            "sft_param_diff": max(float(np.abs(a - b).max())
                                  for a, b in zip(params_after, sft_params, strict=True)),
            "sft_moments_sharded_like_params": moments_sharded,
            "compiles": {"sft": sft_compiles, "grpo": grpo_compiles},
            "grpo_losses": rl_losses,
            "grpo_param_diff": max(float(np.abs(a - b).max())
                                   for a, b in zip(rl_params, grpo_params, strict=True)),
            "specs": {k: [list(a) if isinstance(a, tuple) else a for a in v.sharding.spec]
                      for k, v in params.items()},
            "shard_shapes": {k: list(v.addressable_shards[0].data.shape)
                             for k, v in params.items()},
            "shapes": {k: list(v.shape) for k, v in params.items()},
        }
    report["checkpoint"] = _checkpoint_across_meshes(state)
    print(json.dumps(report))


def _checkpoint_across_meshes(state: nnx.State) -> dict:
    """Saved from the (1, 4, 2) mesh, restored onto (2, 2, 2) and onto one device."""
    import tempfile

    written = shard_state(state, make_mesh((1, 4, 2)))
    out = {}
    with tempfile.TemporaryDirectory() as folder:
        checkpoints = Checkpoints(folder)
        checkpoints.save(1, written, {"mesh": [1, 4, 2]})
        checkpoints.wait()
        for name, mesh in (("(2, 2, 2)", make_mesh((2, 2, 2))),
                           ("one device", make_mesh((1, 1, 1), jax.devices()[:1]))):
            target = abstract(state, state_shardings(state, mesh))
            restored, _ = checkpoints.restore(1, target)
            leaves = zip(jax.tree.leaves(restored), jax.tree.leaves(state),
                         jax.tree.leaves(target), strict=True)
            out[name] = all(np.array_equal(np.asarray(r), np.asarray(s))
                            and r.sharding.is_equivalent_to(t.sharding, r.ndim)
                            for r, s, t in leaves)
        checkpoints.close()
    return out


if __name__ == "__main__":
    main()
