"""Logical-axis rules onto a (data, fsdp, tp) mesh: the PartitionSpecs, and (in a process with
8 host CPU devices) parameters really sharded on two meshes, with the same logits and the same
two SFT steps and two GRPO updates (losses, updated parameters) as one device, each compiled
once per mesh, and a checkpoint written on one mesh restored onto another."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from jax.sharding import AbstractMesh, PartitionSpec

from cpt_jax.sharding import MESH_AXES, logical_spec

SCRIPT = Path(__file__).parent / "multidevice" / "mesh_equivalence.py"


def _mesh(data: int, fsdp: int, tp: int) -> AbstractMesh:
    return AbstractMesh((data, fsdp, tp), MESH_AXES)


def test_weights_shard_over_fsdp_and_tp():
    mesh = _mesh(1, 4, 2)
    assert logical_spec(("vocab", "embed"), (512, 64), mesh) == PartitionSpec("tp", "fsdp")
    assert logical_spec(("layers", "embed", "mlp"), (2, 64, 128), mesh) == PartitionSpec(
        None, "fsdp", "tp")
    assert logical_spec(("batch", None), (8, 16), _mesh(2, 2, 2)) == PartitionSpec(
        ("data", "fsdp"), None)


def test_indivisible_or_reused_axes_are_replicated():
    mesh = _mesh(1, 2, 4)
    # Two KV heads do not split over four tp devices: replicated, the rest still sharded.
    assert logical_spec(("layers", "embed", "kv_heads", "head_dim"), (2, 64, 2, 16),
                        mesh) == PartitionSpec(None, "fsdp", None, None)
    # A mesh axis serves one dimension of an array at most.
    assert logical_spec(("mlp", "mlp"), (8, 8), mesh) == PartitionSpec("tp", None)
    # Size-1 mesh axes are left out; unknown names are replicated.
    assert logical_spec(("embed", "mystery"), (64, 3), _mesh(8, 1, 1)) == PartitionSpec(
        None, None)


@pytest.mark.slow
def test_sharded_forward_sft_and_grpo_steps_equal_one_device_on_8_devices():
    result = subprocess.run([sys.executable, str(SCRIPT)], capture_output=True, text=True,
                            timeout=600, cwd=Path(__file__).parents[1])
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report["devices"] == 8
    for shape, mesh in report["meshes"].items():
        assert mesh["max_diff"] <= 1e-5, (shape, mesh["max_diff"])
        assert mesh["sft_param_diff"] <= 1e-5, (shape, mesh["sft_param_diff"])
        for loss, expected in zip(mesh["sft_losses"], report["sft_losses"], strict=True):
            assert abs(loss - expected) <= 1e-5 * abs(expected), (shape, loss, expected)
        assert mesh["sft_moments_sharded_like_params"], shape
        assert mesh["compiles"] == {"sft": 1, "grpo": 1}, (shape, mesh["compiles"])
        assert mesh["grpo_param_diff"] <= 1e-5, (shape, mesh["grpo_param_diff"])
        for loss, expected in zip(mesh["grpo_losses"], report["grpo_losses"], strict=True):
            assert abs(loss - expected) <= 1e-5 * max(abs(expected), 1e-3), (shape, loss)
    assert report["grpo_losses"][1] != report["grpo_losses"][0]
    mesh = report["meshes"]["(1, 4, 2)"]
    assert mesh["specs"]["embed_tokens"] == ["tp", "fsdp"]
    assert mesh["shard_shapes"]["embed_tokens"] == [256, 16]  # [512, 64] over tp 2, fsdp 4
    assert mesh["specs"]["gate_proj"] == [None, "fsdp", "tp"]
    assert mesh["shard_shapes"]["gate_proj"] == [2, 16, 64]
    assert mesh["shard_shapes"]["k_proj"] == [2, 16, 1, 16]  # 2 KV heads over tp 2
    assert report["meshes"]["(2, 2, 2)"]["shard_shapes"]["embed_tokens"] == [256, 32]
    # Written from the (1, 4, 2) mesh: restored equal, with the shardings of the new meshes.
    assert report["checkpoint"] == {"(2, 2, 2)": True, "one device": True}

