"""The run's metrics, written twice: one JSON object per line in `metrics.jsonl` (for scripts
and the report) and TensorBoard event files (for watching a run).

Each record carries `stage`, `task`, `step` (the step within the stage) and `global_step`
(the TensorBoard x axis): the updates made so far in the run, an update's record being
written after it. A resumed run appends after dropping the records of steps past the
checkpoint it restarts from, so the file never holds a step twice.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from tensorboardX import SummaryWriter


class MetricsLog:
    def __init__(self, output_dir: os.PathLike | str, *, resume_from: int | None = None,
                 enabled: bool = True):
        """`resume_from`: the global step of the checkpoint a resumed run restarts from
        (later records are dropped); None starts a new file. `enabled=False` (processes other
        than the first) writes nothing."""
        self.enabled = enabled
        if not enabled:
            return
        self.path = Path(output_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        if resume_from is None:
            self.path.write_text("")
        elif self.path.exists():
            kept = [line for line in self.path.read_text().splitlines()
                    if line.strip() and json.loads(line)["global_step"] <= resume_from]
            self.path.write_text("".join(line + "\n" for line in kept))
        self._file = self.path.open("a")
        self._writer = SummaryWriter(logdir=str(Path(output_dir) / "tensorboard"),
                                     purge_step=None if resume_from is None else resume_from + 1)

    def write(self, record: Mapping[str, Any]) -> None:
        """One record: JSON as given; every numeric field as a TensorBoard scalar."""
        if not self.enabled:
            return
        self._file.write(json.dumps(record) + "\n")
        self._file.flush()
        step = int(record["global_step"])
        for key, value in record.items():
            if key not in ("stage", "step", "global_step") and isinstance(value, int | float):
                self._writer.add_scalar(key, value, step)

    def flush(self) -> None:
        """Writes out the TensorBoard events buffered so far (before an upload)."""
        if self.enabled:
            self._writer.flush()

    def close(self) -> None:
        if not self.enabled:
            return
        self._file.close()
        self._writer.close()


def read_metrics(output_dir: os.PathLike | str) -> list[dict[str, Any]]:
    path = Path(output_dir) / "metrics.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
