"""The learning experiment end to end on the tiny preset: SFT then GRPO from a random model,
and GRPO straight from a saved Hugging Face folder (`--init`, `--sft-steps 0`)."""

from __future__ import annotations

import json

import pytest

from cpt_jax.experiments import learning

COMMON = ["--task", "syn_texture", "--train-examples", "8", "--eval-examples", "8",
          "--grpo-steps", "2", "--prompts-per-step", "2", "--group-size", "2",
          "--eval-samples", "2"]


@pytest.mark.slow
def test_sft_then_grpo_then_grpo_from_the_saved_model(tmp_path):
    first = tmp_path / "first"
    assert learning.main(["--out", str(first), "--preset", "tiny", "--sft-steps", "2",
                          *COMMON]) == 0
    results = json.loads((first / "results.json").read_text())
    assert results["preset"] == "tiny" and len(results["sft_losses"]) == 2
    log = [json.loads(line) for line in (first / "grpo_log.jsonl").read_text().splitlines()]
    assert [r["step"] for r in log] == [1, 2]
    for phase in ("initial", "sft", "grpo"):
        for key in ("train/accuracy", "test/accuracy", "train/pass_rate", "test/pass_rate"):
            assert 0.0 <= results[phase][key] <= 1.0, (phase, key)
    assert "the `tiny` preset, randomly initialised" in (first / "README.md").read_text()

    second = tmp_path / "second"
    checkpoint = first / "sft_checkpoint"
    assert learning.main(["--out", str(second), "--init", str(checkpoint), "--sft-steps", "0",
                          *COMMON]) == 0
    again = json.loads((second / "results.json").read_text())
    # The saved model is the one measured "after SFT" in the first run: same greedy accuracy.
    assert again["initial"]["test/accuracy"] == results["sft"]["test/accuracy"]
    assert again["sft"] == again["initial"] and again["sft_losses"] == []
    readme = (second / "README.md").read_text()
    assert f"Initial model: `{checkpoint}`" in readme and "No SFT phase" in readme


def test_init_needs_a_model_folder(tmp_path, capsys):
    with pytest.raises(SystemExit):
        learning.main(["--out", str(tmp_path), "--init", str(tmp_path / "nowhere")])
    assert "no config.json" in capsys.readouterr().err
