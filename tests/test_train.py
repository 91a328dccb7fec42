"""The continual trainer end to end on the synthetic benchmark with the tiny model: outputs
(results.json, metrics.jsonl, TensorBoard events, plots, stage checkpoints, an export that
transformers loads), kill -9 + --resume equal to a run never stopped, and one-line errors for
bad input before any long work."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import transformers
from run_outputs import finish, stage_params, train_process

from cpt_jax import train
from cpt_jax.checkpoint import Checkpoints
from cpt_jax.export import export_stage
from cpt_jax.metrics_log import read_metrics
from cpt_jax.results import continual_scores

ROOT = Path(__file__).resolve().parents[1]


def _overrides(data_dir: Path, out: Path, *extra: str) -> list[str]:
    """configs/tiny_cpt.yaml cut down: two stages, small evaluations."""
    return [f"output_dir={out}", f"data.data_dir={data_dir}", "data.synthetic=false",
            "eval.examples=8", "data.general_tasks=[syn_general_pope]",
            "stages=[{task: syn_choice, steps: 4}, {task: syn_texture, steps: 4}]", *extra]


def test_continual_scores_by_hand():
    # Three tasks trained at stages 1, 2, 3; rows: base, after 1, after 2, after 3.
    matrix = [[0.1, 0.0, 0.2],
              [0.6, 0.1, 0.2],
              [0.4, 0.7, 0.3],
              [0.3, 0.5, 0.9]]
    scores = continual_scores(matrix, [1, 2, 3])
    assert scores["avg_acc"] == pytest.approx((0.3 + 0.5 + 0.9) / 3)
    # FM: task 0 best of rows 1..2 is 0.6 -> 0.3 - 0.6; task 1 best of row 2 is 0.7 -> -0.2.
    assert scores["fm"] == pytest.approx(((0.3 - 0.6) + (0.5 - 0.7)) / 2)
    # BWT: final minus right after its own stage: 0.3 - 0.6 and 0.5 - 0.7.
    assert scores["bwt"] == pytest.approx(((0.3 - 0.6) + (0.5 - 0.7)) / 2)
    matrix[2][0] = 0.8  # a later peak counts for FM, not for BWT
    assert continual_scores(matrix, [1, 2, 3])["fm"] == pytest.approx(((0.3 - 0.8) - 0.2) / 2)
    assert continual_scores(matrix, [1, 2, 3])["bwt"] == pytest.approx(((0.3 - 0.6) - 0.2) / 2)
    one = continual_scores(matrix[:2], [1, None, None])
    assert one == {"avg_acc": 0.6, "fm": None, "bwt": None}


def test_sft_run_writes_everything_and_exports(synthetic_benchmark, tmp_path):
    out = tmp_path / "run"
    assert train.main(["--config", str(ROOT / "configs/tiny_cpt.yaml"),
                       *_overrides(synthetic_benchmark, out, "checkpoint.every=2")]) == 0
    result = json.loads((out / "results.json").read_text())
    assert result["tasks"] == ["syn_choice", "syn_texture"] and result["complete"]
    assert len(result["matrix"]) == 3 and all(len(row) == 2 for row in result["matrix"])
    expected = continual_scores(result["matrix"], [1, 2])
    assert {k: result[k] for k in ("avg_acc", "fm", "bwt")} == expected
    assert list(result["general"]) == ["syn_general_pope"]
    assert len(result["general"]["syn_general_pope"]) == 3

    records = read_metrics(out)
    steps = [r for r in records if r.get("event") is None]
    assert [(r["stage"], r["step"], r["global_step"]) for r in steps] == (
        [(1, k, k) for k in range(1, 5)] + [(2, k, 4 + k) for k in range(1, 5)])
    assert all(np.isfinite(r["loss"]) and r["task"] in ("syn_choice", "syn_texture")
               for r in steps)
    evals = [r for r in records if r.get("event") == "eval"]
    assert [r["global_step"] for r in evals] == [0, 4, 8]
    assert [r["accuracy/syn_texture"] for r in evals] == [row[1] for row in result["matrix"]]
    assert list((out / "tensorboard").glob("events.out.tfevents.*"))
    assert {p.name for p in (out / "plots").glob("*.png")} == {
        "accuracy_matrix.png", "task_curves.png", "training.png"}
    assert sorted(int(p.name) for p in (out / "checkpoints/stages").iterdir()) == [1, 2]

    exported = tmp_path / "hf"
    export_stage(out / "checkpoints/stages/2", exported)
    hf = transformers.Qwen2_5_VLForConditionalGeneration.from_pretrained(exported)
    params = stage_params(out, 2, out / "config.yaml")
    embed = hf.model.language_model.embed_tokens.weight.detach().numpy()
    np.testing.assert_array_equal(embed, params["language_model/embed_tokens"])
    tokenizer = transformers.AutoTokenizer.from_pretrained(exported)
    assert tokenizer.convert_tokens_to_ids("<|im_end|>") == hf.config.text_config.eos_token_id \
        or tokenizer.eos_token == "<|im_end|>"
    with torch.no_grad():
        ids = torch.tensor([[1, 2, 3, 4]])
        assert np.isfinite(hf(input_ids=ids).logits.numpy()).all()


def test_several_sft_steps_per_call_train_as_single_steps(synthetic_benchmark, tmp_path):
    """sft.steps_per_call=2 with a checkpoint every 3 steps of 4: each stage's steps 1-2 run
    in one call, 3 and 4 alone (a call stops at the checkpoint and at the stage's end). The
    log, the checkpoints and the trained parameters match a run of single steps."""
    runs = {}
    for per_call in (1, 2):
        out = tmp_path / f"per_call_{per_call}"
        assert train.main(["--config", str(ROOT / "configs/tiny_cpt.yaml"),
                           *_overrides(synthetic_benchmark, out, "checkpoint.every=3",
                                       "eval.examples=4", f"sft.steps_per_call={per_call}")]) == 0
        records = [r for r in read_metrics(out) if r.get("event") is None]
        checkpoints = Checkpoints(out)
        try:  # where each kept rolling checkpoint was taken
            saves = [(meta["progress"]["stage"], meta["progress"]["stage_step"])
                     for meta in map(checkpoints.meta, checkpoints.rolling.all_steps())]
        finally:
            checkpoints.close()
        runs[per_call] = records, saves, stage_params(out, 2, out / "config.yaml")
    (single, single_saves, single_params), (paired, paired_saves, paired_params) = (
        runs[1], runs[2])
    assert [(r["stage"], r["step"], r["global_step"]) for r in paired] == (
        [(1, k, k) for k in range(1, 5)] + [(2, k, 4 + k) for k in range(1, 5)])
    assert paired_saves == single_saves == [(2, 0), (2, 3)]
    for got, want in zip(paired, single, strict=True):
        assert got["tokens"] == want["tokens"]
        for key in ("loss", "grad_norm", "learning_rate"):
            assert got[key] == pytest.approx(want[key], rel=1e-5), (key, got["global_step"])
    # The pair's two records share the call's time; the single steps' do not.
    assert paired[0]["seconds"] == paired[1]["seconds"] != paired[2]["seconds"]
    for key, want in single_params.items():
        np.testing.assert_allclose(paired_params[key], want,
                                   atol=1e-5 * (1 + np.abs(want).max()), err_msg=key)


def _run(args: list[str], **kwargs) -> subprocess.Popen:
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    return subprocess.Popen([sys.executable, "-m", "cpt_jax.train", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            **kwargs)


@pytest.mark.slow
def test_a_stage_trains_at_its_own_learning_rate(synthetic_benchmark, tmp_path):
    """stages.N.learning_rate replaces the algorithm's peak rate for that stage only: the
    logged rate of every update says which optimiser ran."""
    out = tmp_path / "run"
    assert train.main(["--config", str(ROOT / "configs/tiny_cpt.yaml"),
                       *_overrides(synthetic_benchmark, out, "stages.1.learning_rate=3e-3")]) == 0
    steps = [r for r in read_metrics(out) if r.get("event") is None]
    first = [r["learning_rate"] for r in steps if r["stage"] == 1]
    second = [r["learning_rate"] for r in steps if r["stage"] == 2]
    # The same warm-up + cosine schedule over 4 steps, peaking at 1e-3 and at 3e-3.
    assert len(first) == len(second) == 4 and max(first) == pytest.approx(1e-3)
    assert second == pytest.approx([3 * rate for rate in first])


@pytest.mark.slow
def test_kill_and_resume_equals_an_uninterrupted_run(synthetic_benchmark, tmp_path):
    """Stage 1 SFT, stage 2 GRPO (sampling keys matter); killed with SIGKILL in stage 2."""
    config = str(ROOT / "configs/tiny_cpt.yaml")
    extra = ("checkpoint.every=2", "stages.1.algorithm=grpo", "grpo.group_size=4",
             "grpo.max_new_tokens=6", "grpo.prompts_per_step=2", "grpo.micro_batch_rows=8",
             "grpo.min_patches=512", "grpo.optim.learning_rate=1e-3")
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    logs = {name: tmp_path / f"{name}.log" for name in ("whole", "killed", "resumed")}
    reference = train_process(["--config", config,
                               *_overrides(synthetic_benchmark, whole, *extra)], logs["whole"])
    killed = train_process(["--config", config, *_overrides(synthetic_benchmark, cut, *extra)],
                           logs["killed"])
    deadline = time.time() + 600
    while time.time() < deadline and killed.poll() is None:
        metrics = cut / "metrics.jsonl"
        if metrics.exists() and any(json.loads(line)["global_step"] >= 7 and
                                    json.loads(line).get("event") is None
                                    for line in metrics.read_text().splitlines() if line):
            break
        time.sleep(0.2)
    assert killed.poll() is None, "the run ended before it could be killed"
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    assert not json.loads((cut / "results.json").read_text())["complete"]
    resumed = train_process(["--config", config, *_overrides(synthetic_benchmark, cut, *extra),
                             "--resume"], logs["resumed"])
    finish(resumed, logs["resumed"])
    finish(reference, logs["whole"])

    assert (json.loads((cut / "results.json").read_text())
            == json.loads((whole / "results.json").read_text()))
    a = stage_params(cut, 2, cut / "config.yaml")
    b = stage_params(whole, 2, whole / "config.yaml")
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_array_equal(a[key], b[key], err_msg=key)
    steps = [(r["stage"], r["step"]) for r in read_metrics(cut) if r.get("event") is None]
    assert steps == [(1, k) for k in range(1, 5)] + [(2, k) for k in range(1, 5)]
    losses = {k: [r.get("actor/pg_loss") for r in read_metrics(d) if r["stage"] == 2]
              for k, d in (("cut", cut), ("whole", whole))}
    assert losses["cut"] == losses["whole"]


def _error(args: list[str]) -> str:
    process = _run(args)
    output, _ = process.communicate(timeout=300)
    assert process.returncode == 2, output[-2000:]
    lines = [line for line in output.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, output[-2000:]
    return lines[0]


def test_bad_input_is_one_line_before_any_work(synthetic_benchmark, tmp_path):
    config = str(ROOT / "configs/tiny_cpt.yaml")
    message = _error(["--config", config, *_overrides(synthetic_benchmark, tmp_path / "a"),
                      "sft.learning_rate=1e-4"])
    assert "sft.learning_rate" in message
    missing = tmp_path / "no_such_folder"
    message = _error(["--config", config, *_overrides(missing, tmp_path / "b")])
    assert "syn_choice" in message and str(missing) in message
    assert not (tmp_path / "b" / "metrics.jsonl").exists()

    out = tmp_path / "c"  # a run of the tiny model's shape, then a resume with another model
    assert train.main(["--config", config, *_overrides(synthetic_benchmark, out),
                       "stages=[{task: syn_choice, steps: 2}]", "checkpoint.every=1"]) == 0
    # A stage-1 restart point exists; a resume with the small preset's shape must refuse it.
    checkpoints = Checkpoints(out)
    assert checkpoints.latest_step() is not None
    checkpoints.close()
    before = (out / "metrics.jsonl").read_text()
    message = _error(["--config", config, *_overrides(synthetic_benchmark, out),
                      "stages=[{task: syn_choice, steps: 2}]", "model.preset=small",
                      "--resume"])
    assert "has shape (512, 64) in the checkpoint" in message and "embed_tokens" in message
    assert (out / "metrics.jsonl").read_text() == before
    message = _error(["--config", config, *_overrides(synthetic_benchmark, out),
                      "stages=[{task: syn_choice, steps: 2}]"])
    assert "--resume" in message


def test_multitask_and_rif_modes(synthetic_benchmark, tmp_path):
    """multitask: one stage on both tasks' rows (their epochs' worth); rif: the pass counts of
    each stage are saved, and a stage whose instances are all unsolvable trains no steps."""
    config = str(ROOT / "configs/tiny_cpt.yaml")
    out = tmp_path / "multitask"
    assert train.main(["--config", config, *_overrides(synthetic_benchmark, out), "mode=multitask",
                       "stages=[{task: syn_choice, epochs: 1}, {task: syn_texture, "
                       "epochs: 2}]"]) == 0
    result = json.loads((out / "results.json").read_text())
    assert len(result["matrix"]) == 2 and result["fm"] is None
    steps = [r for r in read_metrics(out) if r.get("event") is None]
    assert len(steps) == -(-(16 + 2 * 16) // 8) and {r["stage"] for r in steps} == {1}

    out = tmp_path / "rif"
    assert train.main(["--config", str(ROOT / "configs/tiny_grpo.yaml"),
                       *_overrides(synthetic_benchmark, out), "mode=rif", "rif.group_size=2",
                       "stages=[{task: syn_choice, steps: 2}]"]) == 0
    counts = json.loads((out / "rif/stage1_syn_choice.json").read_text())
    assert len(counts["counts"]) == 16 and counts["group_size"] == 2
    kept = sum(c > 0 for c in counts["counts"].values())
    steps = [r for r in read_metrics(out) if r.get("event") is None]
    assert len(steps) == (2 if kept else 0)
    rif = [r for r in read_metrics(out) if r.get("event") == "rif"][0]
    assert rif["rif/kept_fraction/solvable"] == kept / 16
