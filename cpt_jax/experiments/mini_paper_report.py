"""The mini paper experiment's report: `<out>/README.md` and its summary plots, from the runs'
results.json and metrics.jsonl files under `<out>/runs/` and the base model's `<out>/base.json`,
with `<out>/NOTES.md` (the notes a person writes after a run) appended when it exists, so that
regenerating the report does not lose them.

Every figure in the README is computed here from those files (a test checks the main table
against them); the comparison with the paper's ordering is stated whichever way it comes out.
"""

from __future__ import annotations

import datetime
import json
import platform
import statistics
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from cpt_jax.data.tasks import get_task  # noqa: E402

# Table 1 headline figures of the 7B runs (DESIGN.md section 1); what it does not give is "-".
PAPER = {"sft": {"avg_acc": 54.0, "fm": -10.4, "general": 40.1},
         "grpo": {"avg_acc": 60.0, "fm": -2.3, "general": 54.2},
         "multitask": {"avg_acc": 62.9}}
PAPER_BASE_GENERAL = 52.1  # MMMU of the base model
LABELS = {"sft": "SFT sequential", "grpo": "GRPO sequential", "multitask": "multi-task (SFT)",
          "rif_grpo": "RIF-GRPO", "grpo_no_kl": "GRPO, no KL", "grpo_no_cot": "GRPO, no CoT"}


def method_of(run: str) -> str:
    return run.rsplit("_seed", 1)[0]


def load_run(folder: Path) -> dict[str, Any]:
    results = json.loads((folder / "results.json").read_text())
    records = [json.loads(line) for line in (folder / "metrics.jsonl").open()]
    timing = json.loads((folder / "timing.json").read_text())
    return {"results": results, "records": records, "seconds": timing["seconds"]}


def general_curve(results: dict[str, Any]) -> list[float]:
    """Mean accuracy over the general tasks at each row (base, after each stage)."""
    curves = list(results["general"].values())
    return [statistics.fmean(values) for values in zip(*curves, strict=True)]


def steps_per_stage(records: Sequence[dict[str, Any]]) -> dict[int, int]:
    steps: dict[int, int] = {}
    for record in records:
        if "event" not in record:
            steps[record["stage"]] = steps.get(record["stage"], 0) + 1
    return steps


def summarize(runs: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: the seeds' AvgAcc, FM, BWT, final and base general accuracy, wall time."""
    methods: dict[str, dict[str, Any]] = {}
    for name, run in runs.items():
        entry = methods.setdefault(method_of(name), {"runs": [], "avg_acc": [], "fm": [],
                                                     "bwt": [], "general": [],
                                                     "general_base": [], "seconds": []})
        results = run["results"]
        curve = general_curve(results)
        entry["runs"].append(name)
        for key in ("avg_acc", "fm", "bwt"):
            if results[key] is not None:
                entry[key].append(results[key])
        entry["general"].append(curve[-1])
        entry["general_base"].append(curve[0])
        entry["seconds"].append(run["seconds"])
    return methods


def mean_sd(values: Sequence[float], scale: float = 100.0) -> str:
    """"m ± sd" (sd over seeds) in percent, "m" for one value, "-" for none."""
    if not values:
        return "-"
    mean = statistics.fmean(values) * scale
    if len(values) == 1:
        return f"{mean:.1f}"
    return f"{mean:.1f} ± {statistics.stdev(values) * scale:.1f}"


def _paper(method: str, key: str) -> str:
    value = PAPER.get(method, {}).get(key)
    return "-" if value is None else f"{value:.1f}"


def _minutes(seconds: Sequence[float]) -> str:
    return " / ".join(f"{s / 60:.1f}" for s in seconds)


def main_table(methods: dict[str, dict[str, Any]]) -> str:
    lines = ["| run | seeds | AvgAcc | FM | BWT | general, base -> final | wall time, min "
             "| paper AvgAcc | paper FM | paper general (MMMU) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for method, m in methods.items():
        lines.append(
            f"| {LABELS.get(method, method)} | {len(m['runs'])} | {mean_sd(m['avg_acc'])} | "
            f"{mean_sd(m['fm'])} | {mean_sd(m['bwt'])} | {mean_sd(m['general_base'])} -> "
            f"{mean_sd(m['general'])} | {_minutes(m['seconds'])} | {_paper(method, 'avg_acc')} "
            f"| {_paper(method, 'fm')} | {_paper(method, 'general')} |")
    return "\n".join(lines)


def matrix_table(runs: Sequence[dict[str, Any]]) -> str:
    """The accuracy matrix, mean over the runs (seeds), in percent; row 0 is the base."""
    results = [r["results"] for r in runs]
    tasks = results[0]["tasks"]
    stages = results[0].get("stages") or []
    lines = ["| after | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    for i in range(len(results[0]["matrix"])):
        label = "base" if i == 0 else f"stage {i} ({', '.join(stages[i - 1]['tasks'])})" if (
            len(stages[i - 1]["tasks"]) == 1) else f"stage {i} (all tasks)"
        values = [statistics.fmean(r["matrix"][i][j] for r in results)
                  for j in range(len(tasks))]
        lines.append(f"| {label} | " + " | ".join(f"{100 * v:.1f}" for v in values) + " |")
    return "\n".join(lines)


def general_curves(runs: dict[str, dict[str, Any]]) -> dict[str, list[list[float]]]:
    """Each method's `general_curve`s, one per seed."""
    by_method: dict[str, list[list[float]]] = {}
    for name, run in runs.items():
        by_method.setdefault(method_of(name), []).append(general_curve(run["results"]))
    return by_method


def general_table(runs: dict[str, dict[str, Any]]) -> str:
    """Mean general-task accuracy after each stage, mean over each method's seeds."""
    by_method = general_curves(runs)
    width = max(len(c[0]) for c in by_method.values())
    lines = ["| run | base | " + " | ".join(f"after {i}" for i in range(1, width)) + " |",
             "|---|" + "---|" * width]
    for method, curves in by_method.items():
        mean = [statistics.fmean(c[i] for c in curves) for i in range(len(curves[0]))]
        cells = [f"{100 * v:.1f}" for v in mean] + ["-"] * (width - len(mean))
        lines.append(f"| {LABELS.get(method, method)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def rif_section(runs: dict[str, dict[str, Any]]) -> str:
    rif = [run for name, run in runs.items() if method_of(name) == "rif_grpo"]
    grpo = [run for name, run in runs.items() if method_of(name) == "grpo"]
    if not rif:
        return "No RIF-GRPO run in this report."
    run = rif[0]
    kept = {r["stage"]: r for r in run["records"] if r.get("event") == "rif"}
    steps = steps_per_stage(run["records"])
    full = steps_per_stage(grpo[0]["records"]) if grpo else {}
    tasks = run["results"]["tasks"]
    lines = ["| stage | task | kept (solvable) | pass rate of the 8 samples | GRPO steps, RIF "
             "| GRPO steps, all rows |", "|---|---|---|---|---|---|"]
    for stage in sorted(kept):
        r = kept[stage]
        kept_share = r["rif/kept_fraction/solvable"]
        lines.append(f"| {stage} | {tasks[stage - 1]} | {100 * kept_share:.1f}% "
                     f"| {100 * r['rif/pass_rate']:.1f}% | {steps.get(stage, 0)} | "
                     f"{full.get(stage, '-')} |")
    total_rif, total_full = sum(steps.values()), sum(full.values())
    text = "\n".join(lines)
    if grpo:
        grpo_minutes = statistics.fmean(g["seconds"] for g in grpo) / 60
        text += (f"\n\nRIF-GRPO trained {total_rif} GRPO steps against {total_full} for GRPO on "
                 f"every row ({100 * (1 - total_rif / max(1, total_full)):.0f}% fewer), and took "
                 f"{run['seconds'] / 60:.1f} min in all, its sampling passes included, against "
                 f"{grpo_minutes:.1f} min for GRPO sequential (mean of its seeds).")
    return text


def outcome(methods: dict[str, dict[str, Any]]) -> list[str]:
    """The paper's orderings, each checked against these runs, whichever way they come out."""
    def mean(method: str, key: str) -> float | None:
        values = methods.get(method, {}).get(key) or []
        return statistics.fmean(values) if values else None

    def spread(method: str, key: str) -> float:
        values = methods.get(method, {}).get(key) or []
        return statistics.stdev(values) if len(values) > 1 else 0.0

    claims = [("GRPO forgets less than SFT (FM closer to 0)", "grpo", "sft", "fm"),
              ("GRPO reaches a higher AvgAcc than SFT", "grpo", "sft", "avg_acc"),
              ("GRPO keeps more general ability than SFT", "grpo", "sft", "general"),
              ("multi-task SFT reaches a higher AvgAcc than GRPO", "multitask", "grpo",
               "avg_acc"),
              ("GRPO without KL forgets about as little as GRPO (FM within 2 points)",
               "grpo_no_kl", "grpo", "fm")]
    lines = []
    for text, a, b, key in claims:
        x, y = mean(a, key), mean(b, key)
        if x is None or y is None:
            lines.append(f"- {text}: not measured here.")
            continue
        if key == "fm" and a == "grpo_no_kl":
            verdict = "holds" if abs(x - y) <= 0.02 else "does not hold"
        else:
            verdict = "holds" if x > y else "no difference" if x == y else "does not hold"
        noise = max(spread(a, key), spread(b, key))
        note = (f" (the difference, {100 * abs(x - y):.1f} points, is within one seed "
                f"standard deviation, {100 * noise:.1f})" if noise and abs(x - y) <= noise
                else "")
        lines.append(f"- {text}: **{verdict}** here: "
                     f"{LABELS[a]} {100 * x:.1f}, {LABELS[b]} {100 * y:.1f}{note}.")
    return lines


def plot_summary(methods: dict[str, dict[str, Any]], path: Path) -> None:
    names = list(methods)
    figure, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    for axis, key, title in zip(axes, ("avg_acc", "fm", "general"),
                                ("AvgAcc (%)", "FM (%, 0 = no forgetting)",
                                 "general tasks after the last stage (%)"), strict=True):
        means = [100 * statistics.fmean(methods[n][key]) if methods[n][key] else 0.0
                 for n in names]
        errors = [100 * statistics.stdev(methods[n][key]) if len(methods[n][key]) > 1 else 0.0
                  for n in names]
        axis.bar(range(len(names)), means, yerr=errors, capsize=3, color="#4c72b0")
        axis.set_xticks(range(len(names)), [LABELS.get(n, n) for n in names], rotation=30,
                        ha="right", fontsize=8)
        axis.set_title(title, fontsize=9)
        axis.axhline(0, color="black", linewidth=0.5)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def plot_general(runs: dict[str, dict[str, Any]], path: Path) -> None:
    figure, axis = plt.subplots(figsize=(6.5, 3.6))
    for method, curves in general_curves(runs).items():
        mean = [100 * statistics.fmean(c[i] for c in curves) for i in range(len(curves[0]))]
        axis.plot(range(len(mean)), mean, marker="o", label=LABELS.get(method, method))
    axis.set_xlabel("after stage (0 = base)")
    axis.set_ylabel("general tasks, mean accuracy (%)")
    axis.legend(fontsize=7)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def _caption_share(training: dict[str, Any]) -> str:
    """What share of the base's mixed batches are syn_caption, from its training record: the
    chain-of-thought half has `caption_weight` per round of `base_tasks` mixed batches (records
    written before those fields had 1 and 9)."""
    weight = training.get("caption_weight", 1)
    if weight == 0:
        return "no syn_caption batches"
    share = Fraction(weight, 2 * (training.get("base_tasks", 9) + weight))
    return (f"{'one' if share.numerator == 1 else share.numerator} syn_caption batch"
            f"{'' if share.numerator == 1 else 'es'} in {share.denominator}")


def write_report(out: Path, run_names: Sequence[str], *, command: str, commit: str,
                 quick: bool, seconds: float) -> Path:
    runs = {name: load_run(out / "runs" / name) for name in run_names}
    base = json.loads((out / "base.json").read_text())
    methods = summarize(runs)
    plot_summary(methods, out / "summary.png")
    plot_general(runs, out / "general.png")
    training = base["training"]
    base_rows = "\n".join(
        f"| {task} | {get_task(task).paper_task} | {get_task(task).role} | "
        f"{100 * r['greedy']:.1f} | {100 * r['pass@1']:.1f} | {100 * r['pass@8']:.1f} | "
        f"{100 * r['greedy_no_cot']:.1f} | {r['n']} |"
        for task, r in base["tasks"].items())
    matrices = "\n\n".join(
        f"**{LABELS.get(method, method)}** (mean of {len(m['runs'])} run"
        f"{'s' if len(m['runs']) > 1 else ''}; `runs/{m['runs'][0]}/plots/` has its plots):\n\n"
        + matrix_table([runs[name] for name in m["runs"]])
        for method, m in methods.items())
    variant = "quick (CI-sized) variant" if quick else "full experiment"
    stages = max(len(run["results"]["stages"]) for run in runs.values())
    text = f"""# The paper's experiment at CPU scale ({variant})

- Command: `{command}` (commit `{commit}`), {datetime.date.today().isoformat()}, on
  {platform.processor() or platform.machine()} ({platform.system()}); this invocation took
  {seconds / 60:.1f} min (runs it found finished are not counted again).
- Base model: the `{training['preset']}` preset trained from scratch, {training['steps']} SFT
  steps of batch {training['batch_size']} ({training['caption_warmup']} on syn_caption alone,
  then batches that each mix the seven stage tasks and the two general tasks, on training rows
  no stage uses, with {_caption_share(training)}), AdamW lr
  {training['learning_rate']:g} (vision tower x{training['vision_lr_scale']:g}); every other
  batch has the chain-of-thought prompt and targets of the form
  `{training['response_template'].format(answer='ANSWER')}`, the others the no-CoT prompt and
  the bare answer; {training['seconds'] / 60:.1f} min.
- Runs: `configs/mini_paper/<run>.yaml` from the base, {stages} stages in the paper's order
  (one epoch each over the stage's first training rows; multi-task: one stage over all of
  them). Accuracy: greedy decoding, the chain-of-thought reward's accuracy (the boxed answer
  graded by mathruler; no-CoT run: its own prompt and accuracy), on each task's first test rows.
  AvgAcc, FM and BWT as in `cpt_jax.results` (FM: the mean of final minus best earlier
  accuracy, so negative is forgetting). Figures in %, mean ± standard deviation over seeds.

## Base model

Greedy accuracy, and pass@1 / pass@8 of 8 answers sampled at temperature 1, per task, with the
chain-of-thought prompt and reward; and greedy accuracy with the no-CoT prompt and reward:

| task | paper analogue | role | greedy | pass@1 | pass@8 | greedy, no CoT | n |
|---|---|---|---|---|---|---|---|
{base_rows}

## Main table

{main_table(methods)}

The paper's figures are its 7B model's Table 1 headline numbers as noted in DESIGN.md (its
general column: MMMU, base {PAPER_BASE_GENERAL}); "-" where those notes give none.

![AvgAcc, FM and general ability per run](summary.png)

## What the paper found, checked here

{chr(10).join(outcome(methods))}

## Accuracy matrices

{matrices}

## General ability across stages

Mean accuracy over the held-out general tasks (syn_general_pope, syn_general_arith; never
trained by a stage):

{general_table(runs)}

![general ability across stages](general.png)

## RIF

{rif_section(runs)}
"""
    notes = out / "NOTES.md"
    if notes.exists():
        text += f"\n## Notes (written by hand, kept in `NOTES.md`)\n\n{notes.read_text()}"
    path = out / "README.md"
    path.write_text(text)
    return path
