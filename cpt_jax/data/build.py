"""`python -m cpt_jax.data.build`: parquet files of the paper's tasks, or the synthetic benchmark,
into the TFDS array_record datasets that `cpt_jax.data.sources.load_source` reads.

    python -m cpt_jax.data.build --task textvqa --source DIR [--data-dir DIR]
    python -m cpt_jax.data.build --all --source DIR
    python -m cpt_jax.data.build --synthetic [--train 2000 --test 200 --seed 0]

Synthetic data is first written as parquet and then built by the same builder as real data, so
both share one path. Building is idempotent: a built task is reused, unless its source files
changed (then it is an error until `--overwrite`).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow.parquet as pq
import tensorflow_datasets as tfds

from cpt_jax.data.synthetic import write_benchmark
from cpt_jax.data.tfds_builder import (
    ALL_TASKS,
    CptJax,
    SourceError,
    build_report,
    find_split_files,
)

DEFAULT_DATA_DIR = "~/tensorflow_datasets"  # TFDS's own default, spelled out for the messages


class StaleBuildError(RuntimeError):
    """A task is built, but from source files other than the ones given now."""


@dataclass
class TaskResult:
    """One task's build: its per-split report, how long it took, and whether it was reused."""

    task: str
    report: dict[str, dict[str, Any]]
    seconds: float
    reused: bool


def _check_same_source(task: str, source: Path, report: dict[str, dict[str, Any]]) -> None:
    """Refuses to reuse a build whose split files differ (by split, rows, size) from `source`:
    silently training on stale data is worse than asking for `--overwrite`."""
    now = {
        split: (pq.ParquetFile(path).metadata.num_rows, path.stat().st_size)
        for split, path in find_split_files(source, task).items()
    }
    then = {
        split: (split_report["rows"], split_report["file_bytes"])
        for split, split_report in report.items()
    }
    if now != then:
        raise StaleBuildError(
            f"cpt_jax/{task} was built from other files (split: (rows, bytes) then {then}, now "
            f"{now}); rerun with --overwrite to rebuild it"
        )


def build_task(
    task: str, source: os.PathLike | str, data_dir: os.PathLike | str, *, overwrite: bool = False
) -> TaskResult:
    """Builds (or reuses) `cpt_jax/<task>` in `data_dir` from the parquet files under `source`."""
    builder = CptJax(config=task, data_dir=os.fspath(data_dir), source=source)
    reused = builder.is_prepared() and not overwrite
    if reused:
        _check_same_source(task, Path(source), build_report(builder))
    mode = tfds.download.GenerateMode
    config = tfds.download.DownloadConfig(
        download_mode=mode.REUSE_CACHE_IF_EXISTS if overwrite else mode.REUSE_DATASET_IF_EXISTS
    )
    start = time.perf_counter()
    # Nothing is downloaded: keep TFDS's download folder out of the data dir.
    with tempfile.TemporaryDirectory() as downloads:
        builder.download_and_prepare(download_dir=downloads, download_config=config)
    return TaskResult(task, build_report(builder), time.perf_counter() - start, reused)


def format_summary(results: list[TaskResult]) -> str:
    """One line per task and split: rows read, kept, skipped by reason, seconds for the task."""
    header = ("task", "split", "rows", "kept", "skipped", "seconds", "status")
    lines = [header]
    for result in results:
        for split, report in result.report.items():
            skipped = ", ".join(f"{reason}={count}" for reason, count in report["skipped"].items())
            status = "reused" if result.reused else "built"
            lines.append(
                (
                    result.task,
                    split,
                    str(report["rows"]),
                    str(report["kept"]),
                    skipped or "-",
                    f"{result.seconds:.1f}",
                    status,
                )
            )
    widths = [max(len(line[column]) for line in lines) for column in range(len(header))]
    return "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(line, widths, strict=True)).rstrip()
        for line in lines
    )


def _parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m cpt_jax.data.build",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    what = parser.add_mutually_exclusive_group(required=True)
    what.add_argument("--task", choices=ALL_TASKS, help="build one task from --source")
    what.add_argument("--all", action="store_true", help="build every task found under --source")
    what.add_argument(
        "--synthetic",
        action="store_true",
        help="write the synthetic benchmark, then build all its tasks",
    )
    parser.add_argument(
        "--source",
        type=Path,
        help="folder with <split>.parquet, <task>/<split>.parquet or "
        "<task>_<split>.parquet (splits: train, validation, test)",
    )
    parser.add_argument(
        "--data-dir",
        type=Path,
        default=Path(DEFAULT_DATA_DIR),
        help=f"where the TFDS datasets go (default {DEFAULT_DATA_DIR})",
    )
    parser.add_argument(
        "--overwrite", action="store_true", help="rebuild tasks that are already built"
    )
    synthetic = parser.add_argument_group("synthetic benchmark sizes (with --synthetic)")
    synthetic.add_argument("--train", type=int, default=2000, help="training rows per task")
    synthetic.add_argument("--test", type=int, default=200, help="test rows per task")
    synthetic.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    if args.synthetic == (args.source is not None):
        parser.error("--source is needed with --task and --all, and not used with --synthetic")
    args.data_dir = args.data_dir.expanduser()
    return args


def _build_all(tasks: list[str], source: Path, args: argparse.Namespace) -> int:
    """Builds `tasks`, carrying on past a task whose files are unusable; prints the summary."""
    results, failures = [], []
    for task in tasks:
        try:
            results.append(build_task(task, source, args.data_dir, overwrite=args.overwrite))
        except (SourceError, StaleBuildError) as error:
            failures.append(f"{task}: {error}")
    if results:
        print(format_summary(results))
        print(f"build reports: {args.data_dir}/cpt_jax/<task>/{CptJax.VERSION}/metadata.json")
    for failure in failures:
        print(f"FAILED {failure}", file=sys.stderr)
    return 1 if failures else 0


def main(argv: list[str] | None = None) -> int:
    args = _parse_args(argv)
    if args.task:
        return _build_all([args.task], args.source, args)
    if args.all:
        tasks = [task for task in ALL_TASKS if find_split_files(args.source, task, bare=False)]
        if not tasks:
            print(f"no task's parquet files under {args.source}", file=sys.stderr)
            return 1
        return _build_all(tasks, args.source, args)
    with tempfile.TemporaryDirectory() as tmp:
        written = write_benchmark(tmp, train=args.train, test=args.test, seed=args.seed)
        return _build_all(list(written), Path(tmp), args)


if __name__ == "__main__":
    sys.exit(main())
