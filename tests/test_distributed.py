"""Two processes on this machine (`jax.distributed` over loopback, gloo collectives, 2 CPU
devices each) make two SFT steps on a mesh over all 4 devices and save / restore an Orbax
checkpoint together; they agree with one process holding 4 devices."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np

SCRIPT = Path(__file__).parent / "multidevice" / "two_process.py"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _report(stdout: str) -> dict:
    return json.loads(stdout.strip().splitlines()[-1])  # gloo prints its own lines first


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
