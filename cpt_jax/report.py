"""Plots of a run: `python -m cpt_jax.report <output_dir>` writes, under `<output_dir>/plots/`,

- `accuracy_matrix.png`: the accuracy matrix as a heatmap (row i: after stage i),
- `task_curves.png`: each task's accuracy across the stages (forgetting shows as a fall
  after the task's own stage), with the general-ability tasks dashed,
- `training.png`: the training loss (SFT) and mean reward (GRPO) per step.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt  # noqa: E402

from cpt_jax.metrics_log import read_metrics  # noqa: E402
from cpt_jax.run_dir import RunDir  # noqa: E402


def _stage_labels(result: dict[str, Any]) -> list[str]:
    return ["base"] + [f"{i + 1}: {'+'.join(s['tasks']) if len(s['tasks']) < 3 else 'all'}"
                       for i, s in enumerate(result["stages"])][:len(result["matrix"]) - 1]


def plot_matrix(result: dict[str, Any], path: Path) -> None:
    matrix, tasks = result["matrix"], result["tasks"]
    fig, ax = plt.subplots(figsize=(1.2 + 0.9 * len(tasks), 1.0 + 0.5 * len(matrix)))
    image = ax.imshow([[100 * a for a in row] for row in matrix], cmap="viridis", vmin=0,
                      vmax=100, aspect="auto")
    for i, row in enumerate(matrix):
        for j, value in enumerate(row):
            ax.text(j, i, f"{100 * value:.0f}", ha="center", va="center",
                    color="white" if value < 0.6 else "black", fontsize=8)
    ax.set_xticks(range(len(tasks)), tasks, rotation=35, ha="right")
    ax.set_yticks(range(len(matrix)), _stage_labels(result))
    ax.set_xlabel("evaluated task")
    ax.set_ylabel("after stage")
    scores = ", ".join(f"{name} {result[key]:.3f}" for key, name in
                       (("avg_acc", "AvgAcc"), ("fm", "FM"), ("bwt", "BWT"))
                       if result.get(key) is not None)
    ax.set_title(f"accuracy (%) — {scores}", fontsize=9)
    fig.colorbar(image, ax=ax, fraction=0.03)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_task_curves(result: dict[str, Any], path: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 4))
    rows = range(len(result["matrix"]))
    for j, task in enumerate(result["tasks"]):
        ax.plot(rows, [100 * row[j] for row in result["matrix"]], marker="o", label=task)
    for task, values in result.get("general", {}).items():
        ax.plot(range(len(values)), [100 * v for v in values], linestyle="--", marker="x",
                label=f"{task} (general)")
    ax.set_xticks(list(rows), _stage_labels(result), rotation=35, ha="right", fontsize=7)
    ax.set_ylabel("accuracy (%)")
    ax.set_title("accuracy of every task after each stage")
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_training(records: Sequence[dict[str, Any]], path: Path) -> None:
    steps = [r for r in records if r.get("event") is None]
    series = [(key, label) for key, label in (("loss", "SFT loss"), ("reward/mean", "mean reward"))
              if any(key in r for r in steps)]
    fig, axes = plt.subplots(1, max(1, len(series)), figsize=(5 * max(1, len(series)), 3.2),
                             squeeze=False)
    for ax, (key, label) in zip(axes[0], series, strict=False):
        points = [(r["global_step"], r[key]) for r in steps if key in r]
        ax.plot([p[0] for p in points], [p[1] for p in points], linewidth=1)
        for boundary in sorted({r["global_step"] - r["step"] for r in steps})[1:]:
            ax.axvline(boundary, color="grey", linewidth=0.5, linestyle=":")
        ax.set_xlabel("step (dotted: stage boundaries)")
        ax.set_ylabel(label)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_plots(output_dir: Path) -> list[Path]:
    results_path = output_dir / "results.json"
    if not results_path.exists():
        raise FileNotFoundError(f"{results_path} does not exist: is {output_dir} a run's "
                                f"output_dir?")
    result = json.loads(results_path.read_text())
    plots = output_dir / "plots"
    plots.mkdir(exist_ok=True)
    written = [plots / "accuracy_matrix.png", plots / "task_curves.png", plots / "training.png"]
    plot_matrix(result, written[0])
    plot_task_curves(result, written[1])
    plot_training(read_metrics(output_dir), written[2])
    return written


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m cpt_jax.report",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("output_dir", help="a run's output_dir (a folder or a gs:// URL)")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="cpt_jax_report_") as staging:
        files = RunDir(args.output_dir, staging)  # a URL's files, downloaded and uploaded
        files.pull()
        try:
            written = write_plots(files.local)
        except FileNotFoundError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
        files.push()
    for path in written:
        print(f"{args.output_dir}/{path.relative_to(files.local).as_posix()}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
