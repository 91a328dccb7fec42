"""The learnability experiment end to end on the tiny preset: a few steps, a few examples."""

from __future__ import annotations

import json

import pytest

from cpt_jax.data.tasks import SYNTHETIC_GENERAL, SYNTHETIC_STAGES
from cpt_jax.data.tokenizer import task_tokenizer
from cpt_jax.experiments import learnability
from cpt_jax.models.qwen2_5_vl import preset


def test_learnability_writes_results_and_table(tmp_path):
    out = tmp_path / "report"
    assert learnability.main(["--out", str(out), "--preset", "tiny", "--steps", "3",
                              "--eval-examples", "8", "--train-examples", "8",
                              "--new-tokens", "2", "--caption-weight", "1",
                              "--tasks", "syn_texture,syn_geometry",
                              "--caption-warmup", "1", "--blind-baseline", "--mixed-batches",
                              "--save", str(tmp_path / "model"),
                              "--data-dir", str(tmp_path / "tfds")]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["preset"] == "tiny" and results["steps"] == 3
    assert results["caption_weight"] == 1 and results["caption_warmup"] == 1
    assert results["vision_lr_scale"] == 0.1 and results["blind_baseline"]
    assert results["mixed_batches"]
    assert results["trained_tasks"] == ["syn_texture", "syn_geometry"]
    assert (tmp_path / "model" / "config.json").exists()
    assert (tmp_path / "model" / "tokenizer.json").exists()
    assert set(results["tasks"]) == set(SYNTHETIC_STAGES + SYNTHETIC_GENERAL)
    for task, row in results["tasks"].items():
        assert row["n"] == 8, task
        for key in ("untrained", "trained", "majority", "blank", "blind"):
            assert 0.0 <= row[key] <= 1.0, (task, key)
        if row["role"] == "stage":
            assert 0.0 <= row["lookup"] <= 1.0, task
        else:
            assert row["lookup"] is None, task
        assert row["majority"] > 0.0, task
    readme = (out / "README.md").read_text()
    assert "| task | paper analogue |" in readme and "1 syn_caption batches" in readme
    assert "| majority | lookup | untrained |" in readme
    assert "| blank | blind-trained | n |" in readme and "first 1 steps on syn_caption" in readme
    assert "every batch drawn from all of them shuffled together" in readme
    assert "mixture of the train splits of syn_texture, syn_geometry\n" in readme
    assert "1 syn_caption batches per round of 2" in readme
    untrained = [t for t in SYNTHETIC_STAGES if t not in ("syn_texture", "syn_geometry")]
    assert f"Not trained on in this run: {', '.join(untrained)}." in readme
    for task in results["tasks"]:
        assert f"| {task} |" in readme

    # Which task each row came from, told by its answer: texture is yes/no, choice a letter.
    tokenizer = task_tokenizer(preset("tiny"), tmp_path / "tfds")
    tasks = ("syn_texture", "syn_choice")

    def kinds(mixed: bool) -> list[set[bool]]:
        batches = learnability.mixture(tokenizer, tmp_path / "tfds", batch_size=4, seed=0,
                                       tasks=tasks, mixed=mixed)
        return [{a.lower() in ("yes", "no") for a in next(batches)["answer"]}
                for _ in range(8)]

    assert all(len(k) == 1 for k in kinds(mixed=False))
    assert sum(len(k) == 2 for k in kinds(mixed=True)) >= 4


def test_learnability_rejects_an_unknown_task(tmp_path, capsys):
    with pytest.raises(SystemExit):
        learnability.main(["--out", str(tmp_path), "--tasks", "syn_texture,syn_colour"])
    assert "--tasks: syn_colour not among the stage tasks" in capsys.readouterr().err
