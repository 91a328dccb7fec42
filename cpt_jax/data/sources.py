"""Random-access sources over the built TFDS datasets, for Grain pipelines."""

from __future__ import annotations

import os
from typing import Any

import grain
import tensorflow_datasets as tfds

from cpt_jax.data.tasks import SYNTHETIC_GENERAL, SYNTHETIC_PRETRAIN, SYNTHETIC_STAGES, get_task
from cpt_jax.data.tfds_builder import CptJax, build_report


class SourceNotBuiltError(FileNotFoundError):
    """The task or split asked for has not been built into the data dir."""


def _as_python(record: dict[str, Any]) -> dict[str, Any]:
    """TFDS hands Text features back as UTF-8 bytes without TensorFlow: give callers str."""
    return {
        "problem": record["problem"].decode("utf-8"),
        "answer": record["answer"].decode("utf-8"),
        "images": list(record["images"]),
        "instance_id": int(record["instance_id"]),
    }


def load_source(task: str, split: str, *, data_dir: os.PathLike | str) -> grain.MapDataset:
    """The built rows of `task`/`split` as a `grain.MapDataset`, in parquet row order.

    Each element is a dict: `problem` (str, with one `<image>` placeholder per image),
    `answer` (str), `images` (list[bytes], the encoded images as stored in the parquet file)
    and `instance_id` (int, the row's index in its parquet file: stable across rebuilds, so RIF
    pass counts and evaluation results can refer to instances). Rows skipped at build time are
    absent, so `instance_id` may have gaps.
    """
    get_task(task)  # an unknown name fails here, listing the known ones
    data_dir = os.fspath(data_dir)
    what = (
        "--synthetic"
        if task in SYNTHETIC_STAGES + SYNTHETIC_GENERAL + SYNTHETIC_PRETRAIN
        else f"--task {task} --source DIR"
    )
    hint = f"run: python -m cpt_jax.data.build {what} --data-dir {data_dir}"
    builder = CptJax(config=task, data_dir=data_dir)
    if not builder.is_prepared():
        raise SourceNotBuiltError(f"task {task} is not built in data dir {data_dir}; {hint}")
    if split not in builder.info.splits:
        report = build_report(builder).get(split)
        if report:  # the split was read, but no row of it was usable
            raise SourceNotBuiltError(
                f"task {task} split {split} in data dir {data_dir} has no usable rows: all "
                f"{report['rows']} rows of {report['file']} were skipped {report['skipped']}"
            )
        built = ", ".join(builder.info.splits) or "none"
        raise SourceNotBuiltError(
            f"task {task} has no split {split!r} in data dir {data_dir} (built splits: "
            f"{built}); check the source has {split}.parquet, then {hint} --overwrite"
        )
    records = tfds.data_source(f"cpt_jax/{task}", split=split, data_dir=data_dir, download=False)
    return grain.MapDataset.source(records).map(_as_python)
