"""Two processes on this machine (`jax.distributed` over loopback, gloo collectives, 2 CPU
devices each) against one process holding 4 devices: two SFT steps and an Orbax save / restore
made together; and `python -m cpt_jax.train --distributed`, a whole continual run (the
evaluations, an SFT and a GRPO stage, RIF, the checkpoints), whose metrics and saved
parameters equal the one-process run's."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from run_outputs import stage_params

from cpt_jax.data import build

SCRIPT = Path(__file__).parent / "multidevice" / "two_process.py"
ROOT = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _report(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])  # gloo prints its own lines first


@pytest.mark.slow
def test_two_processes_agree_with_one(tmp_path):
    port = str(_free_port())
    processes = [subprocess.Popen([sys.executable, str(SCRIPT), str(i), "2", port,
                                   str(tmp_path / "two")], cwd=SCRIPT.parent,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
                 for i in range(2)]
    single = subprocess.run([sys.executable, str(SCRIPT), "0", "1", "0", str(tmp_path / "one")],
                            cwd=SCRIPT.parent, capture_output=True, text=True, timeout=600)
    outputs = [p.communicate(timeout=600) for p in processes]
    for process, (_, err) in zip(processes, outputs, strict=True):
        assert process.returncode == 0, err[-3000:]
    assert single.returncode == 0, single.stderr[-3000:]
    two, one = _report(outputs[0][0]), _report(single.stdout)
    assert (two["processes"], two["devices"]) == (2, 4) and (one["processes"], one["devices"]) == (
        1, 4)
    assert two["sharded"] and two["restored_equal"] and one["restored_equal"]
    assert two["meta_losses"] == two["losses"]
    np.testing.assert_allclose(two["losses"], one["losses"], rtol=1e-5)
    assert two["params"].keys() == one["params"].keys()
    for key in one["params"]:
        np.testing.assert_allclose(two["params"][key], one["params"][key], atol=1e-5,
                                   err_msg=key)
    # Both processes wrote into one checkpoint: it holds the state of the whole mesh.
    assert (tmp_path / "two" / "checkpoints" / "rolling" / "1").is_dir()


SFT_THEN_GRPO = ("stages=[{task: syn_choice, steps: 2, algorithm: sft}, "
                 "{task: syn_texture, steps: 2}]")


def _train(out: Path, data_dir: Path, processes: int, *overrides: str) -> None:
    """configs/tiny_grpo.yaml on the stages that `overrides` name, on 4 CPU devices in all."""
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "JAX_CPU_COLLECTIVES_IMPLEMENTATION": "gloo",
           "XLA_FLAGS": f"--xla_force_host_platform_device_count={4 // processes}"}
    command = [sys.executable, "-m", "cpt_jax.train", "--config",
               str(ROOT / "configs" / "tiny_grpo.yaml"), f"output_dir={out}",
               f"data.data_dir={data_dir}", "data.synthetic=false", "eval.examples=8",
               "data.general_tasks=[syn_general_pope]", *overrides]
    port = str(_free_port())
    runs = [subprocess.Popen(
        command + ([] if processes == 1 else [
            "--distributed", "--coordinator", f"127.0.0.1:{port}", "--num-processes",
            str(processes), "--process-id", str(i)]),
        cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for i in range(processes)]
    for run in runs:
        output, _ = run.communicate(timeout=600)
        assert run.returncode == 0, output[-4000:]


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["sequential", "rif"])
def test_train_command_on_two_processes_equals_one(tmp_path, mode):
    """The whole run, not a step: every process encodes its share of each batch and the shares
    are gathered, rollout tokens are gathered for the rewards, both processes write the
    checkpoints. `sequential` runs an SFT stage, its two steps in one call
    (`sft.steps_per_call`: both steps' batches sharded over the processes at once), and a
    GRPO stage. `rif` runs the GRPO stage
    alone: the random tiny model solves nothing, so the stage keeps no instance and has no
    step, and its checkpoint follows the last rolling one at once."""
    data_dir = tmp_path / "data"
    assert build.main(["--synthetic", "--train", "16", "--test", "8", "--data-dir",
                       str(data_dir)]) == 0
    stages = SFT_THEN_GRPO if mode == "sequential" else "stages=[{task: syn_texture, steps: 2}]"
    overrides = [f"mode={mode}", "rif.group_size=4", "sft.steps_per_call=2", stages]
    _train(tmp_path / "one", data_dir, 1, *overrides)
    _train(tmp_path / "two", data_dir, 2, *overrides)
    logs = [[json.loads(line) for line in (tmp_path / run / "metrics.jsonl").open()]
            for run in ("one", "two")]
    assert [r.get("event") for r in logs[0]] == [r.get("event") for r in logs[1]]
    assert [r["stage"] for r in logs[1]] == ([0, 1, 1, 1, 2, 2, 2] if mode == "sequential"
                                             else [0, 1, 1])
    for one, two in zip(*logs, strict=True):
        assert one.keys() == two.keys()
        for key in one.keys() - {"seconds"}:
            if isinstance(one[key], float):
                assert two[key] == pytest.approx(one[key], rel=1e-5, abs=1e-6), key
            else:
                assert two[key] == one[key], key
    if mode == "sequential":  # the SFT steps ran in one call: they share its time
        for log in logs:
            sft = [r["seconds"] for r in log if r["stage"] == 1 and r.get("event") is None]
            assert len(sft) == 2 and sft[0] == sft[1]
    results = [json.loads((tmp_path / run / "results.json").read_text())
               for run in ("one", "two")]
    assert results[0]["matrix"] == results[1]["matrix"]
    for stage in (1, 2) if mode == "sequential" else (1,):
        one = stage_params(tmp_path / "one", stage, tmp_path / "one" / "config.yaml")
        two = stage_params(tmp_path / "two", stage, tmp_path / "two" / "config.yaml")
        assert one.keys() == two.keys()
        for key in one:
            np.testing.assert_allclose(two[key], one[key], atol=1e-5, err_msg=key)
    if mode == "rif":
        kept = [r for r in logs[1] if r.get("event") == "rif"]
        assert kept and kept[0]["rif/kept_fraction/solvable"] == 0.0

