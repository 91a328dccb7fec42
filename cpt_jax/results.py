"""The continual-learning scores of an accuracy matrix, and the run's `results.json`.

`matrix[i][j]` is the accuracy on task j after stage i, row 0 being the model before any
training. With T trained stages and `trained_at[j]` the stage that trained task j:

- AvgAcc: the mean of the last row over the trained tasks.
- FM (forgetting measure, <= 0 when the model forgets): the mean, over the tasks trained
  before the last stage, of the final accuracy minus the best accuracy the task had from its
  own stage up to the stage before the last.
- BWT (backward transfer): the mean, over the same tasks, of the final accuracy minus the
  accuracy right after the task's own stage.

FM and BWT are None when no task was trained before the last stage (one stage, or the
multi-task run).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any


def continual_scores(matrix: Sequence[Sequence[float]],
                     trained_at: Sequence[int | None]) -> dict[str, float | None]:
    """avg_acc, fm and bwt of `matrix` ([T + 1][tasks]); `trained_at[j]` is the 1-based stage
    that trained task j (None: not trained in this run, left out of all three)."""
    if not matrix or any(len(row) != len(trained_at) for row in matrix):
        raise ValueError(f"the matrix's rows must each have {len(trained_at)} entries")
    last = len(matrix) - 1
    trained = [j for j, stage in enumerate(trained_at) if stage is not None]
    for j in trained:
        if not 1 <= trained_at[j] <= last:
            raise ValueError(f"task {j} is trained at stage {trained_at[j]}, outside 1..{last}")
    avg = sum(matrix[last][j] for j in trained) / len(trained) if trained else None
    earlier = [j for j in trained if trained_at[j] < last]
    if not earlier:
        return {"avg_acc": avg, "fm": None, "bwt": None}
    fm = sum(matrix[last][j] - max(matrix[i][j] for i in range(trained_at[j], last))
             for j in earlier) / len(earlier)
    bwt = sum(matrix[last][j] - matrix[trained_at[j]][j] for j in earlier) / len(earlier)
    return {"avg_acc": avg, "fm": fm, "bwt": bwt}


def results(tasks: Sequence[str], matrix: Sequence[Sequence[float]],
            trained_at: Sequence[int | None], general: Mapping[str, Sequence[float]],
            **extra: Any) -> dict[str, Any]:
    """The results.json object: tasks, matrix, the scores, the general-ability accuracies per
    row (`general[task][i]`: after stage i), and any `extra` fields."""
    return {"tasks": list(tasks), "matrix": [list(map(float, row)) for row in matrix],
            **continual_scores(matrix, trained_at),
            "general": {task: list(map(float, row)) for task, row in general.items()},
            **extra}


def write_results(path: os.PathLike | str, content: Mapping[str, Any]) -> None:
    """Written to a temporary file and renamed, so a kill never leaves half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(content, indent=2) + "\n")
    os.replace(partial, path)
