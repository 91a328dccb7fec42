"""The mini paper experiment's quick variant end to end: the data, a base model, the six run
kinds through `python -m cpt_jax.train`, and a report whose numbers are those of the runs'
results.json files; run again, it resumes instead of starting over."""

from __future__ import annotations

import dataclasses
import itertools
import json
import statistics

import pytest

from cpt_jax.config import load_run_config
from cpt_jax.data.tasks import NO_COT_SUFFIX, SYNTHETIC_PRETRAIN
from cpt_jax.data.tokenizer import task_tokenizer
from cpt_jax.experiments import mini_paper, mini_paper_report
from cpt_jax.experiments.mini_paper_report import LABELS
from cpt_jax.models.qwen2_5_vl import preset


def _cells(readme: str, label: str) -> list[str]:
    """The main table's row for `label`, as its cells."""
    section = readme.split("## Main table", 1)[1].split("##", 1)[0]
    for line in section.splitlines():
        if line.startswith(f"| {label} |"):
            return [cell.strip() for cell in line.strip("|").split("|")]
    raise AssertionError(f"no main-table row for {label!r}")


def _percent(values: list[float]) -> str:
    mean = 100 * statistics.fmean(values)
    return f"{mean:.1f}" if len(values) == 1 else (
        f"{mean:.1f} ± {100 * statistics.stdev(values):.1f}")


def test_base_mixture_warms_up_on_captions_then_alternates_cot_and_no_cot(tmp_path):
    """The base sees both prompt forms (so the no-CoT run starts from a model that knows its
    prompt), each batch mixing tasks, and only rows the stages never use."""
    scale = mini_paper.QUICK
    mini_paper.build_data(tmp_path, scale)
    config = load_run_config(mini_paper.CONFIGS / "common.yaml", scale.overrides())
    tokenizer = task_tokenizer(preset(scale.preset), tmp_path, mini_paper.BASE_TASKS
                               + SYNTHETIC_PRETRAIN)
    batches = mini_paper.base_mixture(tokenizer, tmp_path, config, scale, seed=0)
    texts = []
    for batch in itertools.islice(batches, scale.caption_warmup + 40):
        rows = [tokenizer.decode(ids[ids != tokenizer.pad_token_id]) for ids in
                batch["input_ids"]]
        texts.append(rows)
    caption = "Describe the image"
    for rows in texts[:scale.caption_warmup]:
        assert all(caption in r for r in rows)
    forms = []
    for rows in texts[scale.caption_warmup:]:
        no_cot = [NO_COT_SUFFIX.strip() in r for r in rows]
        assert len(set(no_cot)) == 1, rows  # one prompt form per batch
        forms.append(no_cot[0])
        if no_cot[0]:
            assert all("<think>" not in r.split("assistant", 1)[1] for r in rows)
        else:
            assert all("\\boxed{" in r.split("assistant", 1)[1] for r in rows)
    assert forms == [False, True] * 20
    questions = [r for rows in texts[scale.caption_warmup:] for r in rows]
    assert sum(caption in r for r in questions) == 16  # one CoT batch in ten, batch 8
    # ... which is what the report says of a base trained this way
    record = {"caption_weight": scale.caption_weight, "base_tasks": len(mini_paper.BASE_TASKS)}
    assert mini_paper_report._caption_share(record) == "one syn_caption batch in 20"
    for task in ("Is there a", "What is", "What word"):  # pope, arith and ocr rows all appear
        assert any(task in r for r in questions), task


def test_work_folder_built_by_other_generators_is_refused(tmp_path, capsys):
    data, scale = tmp_path / "work" / "data", mini_paper.QUICK
    mini_paper.build_data(data, scale)
    stamp = (data / "fingerprint.txt").read_text().strip()
    assert stamp == mini_paper.data_fingerprint(scale)
    built = (data / "cpt_jax").stat().st_mtime_ns
    mini_paper.build_data(data, scale)  # this code's data: kept as it is
    assert (data / "cpt_jax").stat().st_mtime_ns == built
    # Another scale, or a generator that changed since, gives another fingerprint.
    assert mini_paper.data_fingerprint(dataclasses.replace(scale, train_rows=41)) != stamp
    (data / "fingerprint.txt").write_text("0123456789abcdef\n")
    with pytest.raises(mini_paper.StaleWorkError, match="0123456789abcdef"):
        mini_paper.build_data(data, scale)
    (data / "fingerprint.txt").unlink()  # built before the stamp existed
    args = ["--quick", "--out", str(tmp_path / "report"), "--work", str(tmp_path / "work")]
    assert mini_paper.main(args) == 2
    error = capsys.readouterr().err
    assert f"{data} holds a synthetic benchmark" in error and "missing" in error
    assert (data / "cpt_jax").stat().st_mtime_ns == built  # nothing deleted


@pytest.mark.slow
def test_quick_variant_runs_everything_and_reports_the_runs_numbers(tmp_path):
    out, work = tmp_path / "report", tmp_path / "work"
    args = ["--quick", "--out", str(out), "--work", str(work), "--jobs", "2"]
    assert mini_paper.main(args) == 0
    readme = (out / "README.md").read_text()
    runs = sorted(p.name for p in (out / "runs").iterdir())
    assert runs == sorted(f"{m}_seed0" for m in mini_paper.RUNS)
    for name in runs:
        method = name.rsplit("_seed", 1)[0]
        results = json.loads((out / "runs" / name / "results.json").read_text())
        assert results["complete"]
        assert len(results["matrix"]) == (2 if method == "multitask" else 3)  # 2 stages
        cells = _cells(readme, LABELS[method])
        assert cells[1] == "1"  # seeds
        assert cells[2] == _percent([results["avg_acc"]])
        assert cells[3] == ("-" if results["fm"] is None else _percent([results["fm"]]))
        assert cells[4] == ("-" if results["bwt"] is None else _percent([results["bwt"]]))
        general = [statistics.fmean(row) for row in zip(*results["general"].values(),
                                                        strict=True)]
        assert cells[5] == f"{_percent([general[0]])} -> {_percent([general[-1]])}"
        timing = json.loads((out / "runs" / name / "timing.json").read_text())
        assert cells[6] == f"{timing['seconds'] / 60:.1f}"
        # Finished runs keep their results and logs, not their checkpoints.
        assert not (work / "runs" / name / "checkpoints").exists()
    base = json.loads((out / "base.json").read_text())
    assert set(base["tasks"]) == set(mini_paper.BASE_TASKS)
    base_section = readme.split("## Base model", 1)[1].split("##", 1)[0]
    for task, row in base["tasks"].items():
        line = next(x for x in base_section.splitlines() if x.startswith(f"| {task} |"))
        cells = [cell.strip() for cell in line.strip("|").split("|")]
        assert cells[3:] == [f"{100 * row[k]:.1f}" for k in (
            "greedy", "pass@1", "pass@8", "greedy_no_cot")] + [str(row["n"])], task
        assert row["pass@1"] <= row["pass@8"]
    assert (out / "summary.png").stat().st_size > 0 and (out / "general.png").stat().st_size > 0
    assert "commit `" in readme and "--quick" in readme

    # Again, with one run's results gone: only that run is made again, and the regenerated
    # report keeps the hand-written notes.
    timings = {n: (work / "runs" / n / "timing.json").read_text() for n in runs}
    (work / "runs" / "multitask_seed0" / "results.json").unlink()
    (out / "NOTES.md").write_text("The base model is at chance on syn_choice.\n")
    assert mini_paper.main(args) == 0
    assert (out / "README.md").read_text().endswith(
        "kept in `NOTES.md`)\n\nThe base model is at chance on syn_choice.\n")
    for name in runs:
        again = (work / "runs" / name / "timing.json").read_text()
        assert (again == timings[name]) == (name != "multitask_seed0"), name
