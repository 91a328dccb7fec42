"""A `gs://` output_dir, against a GCS server in a second process (`gcs_emulator`): the run's
files and Orbax checkpoints land in the bucket; a run killed with SIGKILL resumes from the
bucket alone, from a new staging folder (another VM), and ends equal to a run never stopped;
its stage exports to a folder transformers loads."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import numpy as np
import pytest
import transformers
from etils import epath
from gcs_emulator import BUCKET, gcs_emulator
from run_outputs import ROOT, finish, stage_params, train_process

from cpt_jax.checkpoint import Checkpoints
from cpt_jax.export import export_stage
from cpt_jax.run_dir import RunDir, StagingError

CONFIG = str(ROOT / "configs/tiny_cpt.yaml")


@pytest.fixture(scope="module")
def gcs():
    with gcs_emulator() as env:
        yield env


def _overrides(data_dir: Path, url: str, staging: Path) -> list[str]:
    """configs/tiny_cpt.yaml cut down to two SFT stages of 4 steps, a checkpoint every 2."""
    return [f"output_dir={url}", f"staging_dir={staging}", f"data.data_dir={data_dir}",
            "data.synthetic=false", "eval.examples=8", "data.general_tasks=[syn_general_pope]",
            "stages=[{task: syn_choice, steps: 4}, {task: syn_texture, steps: 4}]",
            "checkpoint.every=2"]


def _steps(metrics: str) -> list[tuple[int, int]]:
    records = [json.loads(line) for line in metrics.splitlines() if line.strip()]
    return [(r["stage"], r["step"]) for r in records if r.get("event") is None]


def test_staging_uploads_changes_and_pulls_into_a_new_folder(gcs, tmp_path):
    url = f"gs://{BUCKET}/staging"
    first = RunDir(url, str(tmp_path / "a"))
    first.start(resume=False)
    with (first.local / "metrics.jsonl").open("a") as log:
        log.write('{"n": 1}\n')
    first.push()
    with (first.local / "metrics.jsonl").open("a") as log:  # GCS cannot append: re-uploaded
        log.write('{"n": 2}\n')
    (first.local / "plots").mkdir()
    (first.local / "plots" / "a.png").write_bytes(b"\x89PNG")
    (first.local / "results.json.partial").write_text("{")  # still being written: not sent
    first.push()
    (first.checkpoints / "rolling").mkdir(parents=True)  # Orbax's, never pulled
    (first.checkpoints / "rolling" / "x").write_text("array bytes")

    remote = epath.Path(url)
    assert (remote / "metrics.jsonl").read_text() == '{"n": 1}\n{"n": 2}\n'
    assert not (remote / "results.json.partial").exists()
    second = RunDir(url, str(tmp_path / "b"))
    second.start(resume=True)
    files = sorted(p.relative_to(second.local).as_posix() for p in second.local.rglob("*")
                   if p.is_file())
    assert files == [".cpt_jax_staging", "metrics.jsonl", "plots/a.png"]
    assert (second.local / "metrics.jsonl").read_text() == '{"n": 1}\n{"n": 2}\n'

    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    with pytest.raises(StagingError, match="staging_dir: .*mine holds files that no gs:// run"):
        RunDir(url, str(tmp_path / "mine")).start(resume=False)
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep me"


@pytest.mark.slow
def test_a_run_to_gcs_resumes_from_the_bucket_and_exports(gcs, synthetic_benchmark, tmp_path):
    data, whole, cut = synthetic_benchmark, f"gs://{BUCKET}/whole", f"gs://{BUCKET}/cut"
    logs = {name: tmp_path / f"{name}.log" for name in ("whole", "killed", "resumed")}
    reference = train_process(["--config", CONFIG, *_overrides(data, whole, tmp_path / "w")],
                              logs["whole"])
    # Killed in stage 2, then resumed on "another VM": a new staging folder, the bucket only.
    killed = train_process(["--config", CONFIG, *_overrides(data, cut, tmp_path / "c1")],
                           logs["killed"])
    staged = tmp_path / "c1" / "metrics.jsonl"
    deadline = time.time() + 600
    while time.time() < deadline and killed.poll() is None:
        if staged.exists() and (2, 3) in _steps(staged.read_text().rpartition("\n")[0]):
            break
        time.sleep(0.2)
    assert killed.poll() is None, logs["killed"].read_text()[-3000:]
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    bucket = epath.Path(cut)
    assert not json.loads((bucket / "results.json").read_text())["complete"]
    resumed = train_process(["--config", CONFIG, *_overrides(data, cut, tmp_path / "c2"),
                             "--resume"], logs["resumed"])
    finish(resumed, logs["resumed"])
    finish(reference, logs["whole"])

    steps = [(1, k) for k in range(1, 5)] + [(2, k) for k in range(1, 5)]
    for url in (whole, cut):
        bucket = epath.Path(url)
        assert json.loads((bucket / "results.json").read_text())["complete"]
        assert _steps((bucket / "metrics.jsonl").read_text()) == steps
        assert {p.name for p in (bucket / "plots").iterdir()} == {
            "accuracy_matrix.png", "task_curves.png", "training.png"}
        assert any(p.name.startswith("events.out.tfevents")
                   for p in (bucket / "tensorboard").iterdir())
        assert (bucket / "config.yaml").exists() and (bucket / "tokenizer").exists()
        checkpoints = Checkpoints(url)
        assert checkpoints.saved_stages() == [1, 2] and checkpoints.latest_step() is not None
        checkpoints.close()
    assert (json.loads(epath.Path(cut, "results.json").read_text())
            == json.loads(epath.Path(whole, "results.json").read_text()))
    config = tmp_path / "c2" / "config.yaml"
    a, b = stage_params(cut, 2, config), stage_params(whole, 2, config)
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)

    exported = tmp_path / "hf"
    export_stage(f"{cut}/checkpoints/stages/2", exported)
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(exported)
    np.testing.assert_array_equal(hf.model.language_model.embed_tokens.weight.detach().numpy(),
                                  a["language_model/embed_tokens"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == hf.config.text_config.eos_token_id
