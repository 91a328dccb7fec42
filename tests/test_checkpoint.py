"""Orbax checkpoints: the train state and its metadata round trip exactly, rolling checkpoints
keep the newest, stage finals stay, a half-written checkpoint is never listed, and a target of
another shape is an error naming the array."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx

from cpt_jax.checkpoint import CheckpointError, Checkpoints, abstract
from cpt_jax.models.qwen2_5_vl import Qwen2_5_VL, preset
from cpt_jax.optim import make_optimizer
from cpt_jax.sft import TrainState


def _tree(seed: int = 0, name: str = "tiny") -> dict:
    model = Qwen2_5_VL(preset(name), rngs=nnx.Rngs(seed))
    state = TrainState.create(model, make_optimizer(learning_rate=1e-3, total_steps=4,
                                                    moments_dtype=np.dtype("bfloat16")))
    return {"params": state.params, "opt_state": state.opt_state, "step": state.step + seed,
            "key": jax.random.key_data(jax.random.key(seed))}


def _equal(a, b) -> bool:
    leaves = jax.tree.leaves(jax.tree.map(
        lambda x, y: x.dtype == y.dtype and bool(np.array_equal(np.asarray(x), np.asarray(y))),
        a, b))
    return all(leaves)


def test_state_and_meta_round_trip(tmp_path):
    tree = _tree(1)
    checkpoints = Checkpoints(tmp_path)
    checkpoints.save(5, tree, {"stage": 2, "iterator": {"next_index": 17}, "pass": [1, 0]})
    checkpoints.wait()
    restored, meta = checkpoints.restore(5, abstract(tree))
    assert _equal(restored, tree)
    assert meta == {"stage": 2, "iterator": {"next_index": 17}, "pass": [1, 0]}
    checkpoints.close()


def test_rolling_keeps_the_newest_and_stages_stay(tmp_path):
    tree = _tree()
    checkpoints = Checkpoints(tmp_path, keep=2)
    for step in (1, 2, 3, 4):
        checkpoints.save(step, tree, {"step": step})
    for stage in (0, 1, 2):
        checkpoints.save_stage(stage, tree["params"], {"stage": stage})
    checkpoints.wait()
    assert list(checkpoints.rolling.all_steps()) == [3, 4] and checkpoints.latest_step() == 4
    assert checkpoints.saved_stages() == [0, 1, 2]
    params, meta = checkpoints.restore_stage(1, abstract(tree["params"]))
    assert _equal(params, tree["params"]) and meta == {"stage": 1}
    checkpoints.close()


def test_a_resumed_run_saves_a_stage_again_over_the_killed_runs_save(tmp_path):
    """A run killed after its stage-final save resumes from the stage's last rolling
    checkpoint and ends the stage again, in a new process (a new manager)."""
    killed = Checkpoints(tmp_path)
    killed.save_stage(2, _tree(0)["params"], {"stage": 2, "run": "killed"})
    killed.close()
    resumed = Checkpoints(tmp_path)
    params = _tree(1)["params"]
    resumed.save_stage(2, params, {"stage": 2, "run": "resumed"})
    resumed.wait()
    assert resumed.saved_stages() == [2]
    restored, meta = resumed.restore_stage(2, abstract(params))
    assert _equal(restored, params) and meta == {"stage": 2, "run": "resumed"}
    resumed.close()


def test_a_half_written_checkpoint_is_never_listed(tmp_path):
    """Orbax writes into a temporary folder and renames it when complete: a save killed
    midway leaves only the temporary folder, which no manager lists or restores."""
    tree = _tree()
    checkpoints = Checkpoints(tmp_path)
    checkpoints.save(3, tree, {"step": 3})
    checkpoints.close()
    partial = tmp_path / "checkpoints" / "rolling" / "4.orbax-checkpoint-tmp-1764000000000000"
    (partial / "state").mkdir(parents=True)
    (partial / "state" / "garbage").write_bytes(b"\0" * 100)
    reopened = Checkpoints(tmp_path)
    assert reopened.latest_step() == 3
    restored, _ = reopened.restore(3, abstract(tree))
    assert _equal(restored, tree)
    with pytest.raises(CheckpointError, match="no checkpoint 4"):
        reopened.restore(4, abstract(tree))
    reopened.close()


def test_another_model_shape_is_refused_naming_the_array(tmp_path):
    checkpoints = Checkpoints(tmp_path)
    checkpoints.save(1, _tree(), {})
    checkpoints.wait()
    with pytest.raises(CheckpointError, match=r"/embed_tokens/value has shape \(512, 64\) in "
                                              r"the checkpoint, the target wants \(8192, 384\)"):
        checkpoints.restore(1, abstract(_tree(name="small")))
    checkpoints.close()
