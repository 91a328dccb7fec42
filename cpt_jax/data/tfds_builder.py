"""TFDS builder for one task of the paper's data: parquet in, array_record out, no TensorFlow.

The paper's users hold one parquet file per task and split with columns `problem`, `answer` and
`images` (a list of encoded images: raw bytes, or `{bytes, path}` structs as Hugging Face
`datasets` writes them). Every task, real or synthetic, goes through `CptJax`, one
`BuilderConfig` per task, so all data reaches training through one code path.

Rows that cannot be trained on are skipped and counted by reason, never dropped silently: the
counts, with the first offending row indices, are stored in the dataset's `metadata.json`
(written atomically with the dataset by TFDS) under `build_report`. A file that cannot be read
as a task split at all (unreadable, missing or mistyped columns) is a `SourceError`.
"""

from __future__ import annotations

import io
import os
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import tensorflow_datasets as tfds
from PIL import Image

from cpt_jax.data.processor import MIN_SIDE, ImageError, decode_image
from cpt_jax.data.tasks import TASKS

ALL_TASKS = tuple(TASKS)
SPLITS = ("train", "validation", "test")
COLUMNS = ("problem", "answer", "images")
IMAGE_PLACEHOLDER = "<image>"
MAX_OFFENDING_ROWS = 5  # row indices kept per reason: enough to find the pattern, small JSON.
_READ_BATCH_ROWS = 256  # parquet rows decoded at once: bounded memory for image-heavy files.


class SourceError(ValueError):
    """A parquet file that cannot be read as a task split at all (no row would be usable)."""


def find_split_files(source: os.PathLike | str, task: str, *, bare: bool = True) -> dict[str, Path]:
    """The parquet file of each split of `task` under `source`, in the layouts users hold.

    Layouts, first match wins (they are never mixed): `<source>/<task>/<split>.parquet`,
    `<source>/<task>_<split>.parquet`, and, when `bare` (`source` holds this one task only),
    `<source>/<split>.parquet`.
    """
    source = Path(source)
    layouts = [lambda split: source / task / f"{split}.parquet"]
    layouts.append(lambda split: source / f"{task}_{split}.parquet")
    if bare:
        layouts.append(lambda split: source / f"{split}.parquet")
    for layout in layouts:
        found = {split: layout(split) for split in SPLITS if layout(split).is_file()}
        if found:
            return found
    return {}


def _open_parquet(path: Path) -> pq.ParquetFile:
    """Opens `path` and checks the schema, so a wrong file fails once, naming what is wrong."""
    try:
        parquet = pq.ParquetFile(path)
    except (OSError, pa.ArrowException) as error:
        raise SourceError(f"{path}: not a readable parquet file ({error})") from error
    schema = parquet.schema_arrow
    missing = [name for name in COLUMNS if name not in schema.names]
    if missing:
        raise SourceError(
            f"{path}: missing column(s) {', '.join(missing)} (has {', '.join(schema.names)})"
        )
    for name in ("problem", "answer"):
        column_type = schema.field(name).type
        if not (pa.types.is_string(column_type) or pa.types.is_large_string(column_type)):
            raise SourceError(f"{path}: column {name} must hold strings, not {column_type}")
    images_type = schema.field("images").type
    if not (pa.types.is_list(images_type) or pa.types.is_large_list(images_type)) or not (
        pa.types.is_binary(images_type.value_type)
        or pa.types.is_large_binary(images_type.value_type)
        or (
            pa.types.is_struct(images_type.value_type)
            and images_type.value_type.get_field_index("bytes") >= 0
        )
    ):
        raise SourceError(
            f"{path}: column images must be a list of encoded images (bytes or "
            f"{{bytes, path}} structs), not {images_type}"
        )
    return parquet


def _read_rows(path: Path) -> Iterator[dict[str, Any]]:
    """The rows of `path` in file order: a row's position is its stable instance id."""
    for batch in _open_parquet(path).iter_batches(batch_size=_READ_BATCH_ROWS, columns=COLUMNS):
        yield from batch.to_pylist()


def _image_bytes(entry: bytes | dict | None, base: Path) -> bytes | None:
    """The encoded bytes of one `images` entry; HF structs may carry only a path to the file."""
    if isinstance(entry, dict):
        if entry.get("bytes") is not None:
            return entry["bytes"]
        path = entry.get("path")
        if path and (base / path).is_file():  # an absolute `path` ignores `base`
            return (base / path).read_bytes()
        return None
    return entry


def check_image(data: bytes, *, source: str) -> str | None:
    """Why an encoded image is unusable ('corrupt_image', 'small_image'), or None if usable.

    Uses the processor's own decode and size filter, so what the builder keeps is exactly
    what training can read; the whole image is decoded, so truncated files are caught here
    rather than in the middle of a run.
    """
    try:
        decode_image(data, source=source)
    except ImageError:
        # One error type covers both causes: a readable header with a short side tells them apart.
        try:
            with Image.open(io.BytesIO(data)) as image:
                return "small_image" if min(image.size) < MIN_SIDE else "corrupt_image"
        except Exception:  # PIL raises OSError, SyntaxError, ValueError, ... for bad headers
            return "corrupt_image"
    return None


def check_row(row: dict[str, Any], base: Path, *, source: str) -> str | None:
    """Why a row cannot be trained on or evaluated, or None if it can; `source` names the row
    in image errors."""
    problem, answer = row["problem"], row["answer"]
    images = [_image_bytes(entry, base) for entry in row["images"] or []]
    if not problem or not problem.strip():
        return "empty_problem"
    if not answer or not answer.strip():
        return "empty_answer"
    if problem.count(IMAGE_PLACEHOLDER) != len(images):
        return "placeholder_mismatch"
    if any(data is None for data in images):
        return "missing_image"
    return next(filter(None, (check_image(data, source=source) for data in images)), None)


@dataclass
class SplitReport:
    """What became of one split's rows: kept, or skipped by reason with the first row indices."""

    file: str
    rows: int = 0
    kept: int = 0
    skipped: Counter = field(default_factory=Counter)
    offending_rows: dict[str, list[int]] = field(default_factory=dict)

    def skip(self, index: int, reason: str) -> None:
        self.skipped[reason] += 1
        examples = self.offending_rows.setdefault(reason, [])
        if len(examples) < MAX_OFFENDING_ROWS:
            examples.append(index)

    def to_json(self) -> dict[str, Any]:
        return {
            "file": self.file,
            "file_bytes": os.path.getsize(self.file),
            "rows": self.rows,
            "kept": self.kept,
            "skipped": dict(sorted(self.skipped.items())),
            "offending_rows": dict(sorted(self.offending_rows.items())),
        }


def scan_split(path: Path) -> tuple[list[int], SplitReport]:
    """Validates every row of `path`: the indices of usable rows, and the report."""
    report = SplitReport(file=str(path.resolve()))
    kept = []
    for index, row in enumerate(_read_rows(path)):
        report.rows += 1
        reason = check_row(row, path.parent, source=f"{path} row {index}")
        if reason:
            report.skip(index, reason)
        else:
            kept.append(index)
    report.kept = len(kept)
    return kept, report


class CptJax(tfds.core.GeneratorBasedBuilder):
    """One task of the paper's data (or of the synthetic benchmark) as `cpt_jax/<task>`.

    `source` is only needed to build; reading a built dataset needs just `data_dir`.
    """

    name = "cpt_jax"
    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "problem, answer, encoded images, instance_id (parquet row index)."}
    BUILDER_CONFIGS = [
        tfds.core.BuilderConfig(name=task.name, description=task.description)
        for task in TASKS.values()
    ]
    # TFDS finds a builder's code (only to look for a checksums file of downloads, which local
    # data has none of) through `importlib_resources`, a package it does not install on
    # Python >= 3.9: without this, a builder defined in an installed package cannot build.
    code_path = None

    def __init__(self, *, source: os.PathLike | str | None = None, **kwargs: Any):
        self._source = source
        # array_record: random access for Grain, and the one format TFDS writes without TF.
        super().__init__(file_format="array_record", **kwargs)

    def is_prepared(self) -> bool:
        # TFDS warns that the version folder "has no dataset_info.json" before every first build.
        return self.data_path.exists() and super().is_prepared()

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo is built directly: `dataset_info_from_configs` reads package metadata
        # files this package does not have.
        return tfds.core.DatasetInfo(
            builder=self,
            description=(
                f"{self.builder_config.name} ({self.builder_config.description}), one task "
                "of the continual post-training study (arXiv 2507.05386)."
            ),
            features=tfds.features.FeaturesDict(
                {
                    "problem": tfds.features.Text(),
                    "answer": tfds.features.Text(),
                    # Encoded bytes: tfds.features.Image would need TensorFlow to encode/decode,
                    # and the model's processor decodes images itself anyway.
                    "images": tfds.features.Sequence(
                        tfds.features.Tensor(shape=(), dtype=np.object_)
                    ),
                    "instance_id": tfds.features.Scalar(dtype=np.int64),
                }
            ),
            metadata=tfds.core.MetadataDict(),
            # Records stay in row order (keys are row indices); Grain shuffles at read time.
            disable_shuffling=True,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> dict[str, Any]:
        """Validates every split first so a split with no usable rows is reported, not written
        (TFDS refuses to write an empty split)."""
        del dl_manager  # the data is local
        task = self.builder_config.name
        if self._source is None:
            raise SourceError(f"building cpt_jax/{task} needs a source directory")
        files = find_split_files(self._source, task)
        if not files:
            raise SourceError(
                f"no parquet split files for task {task} under {self._source} (looked for "
                f"{task}/<split>.parquet, {task}_<split>.parquet, <split>.parquet; "
                f"splits: {', '.join(SPLITS)})"
            )
        reports, generators = {}, {}
        for split, path in files.items():
            kept, report = scan_split(path)
            reports[split] = report.to_json()
            if kept:
                generators[split] = self._generate_examples(path, kept)
        self.info.metadata["build_report"] = reports
        if not generators:
            raise SourceError(f"no usable rows for task {task}: {reports}")
        return generators

    def _generate_examples(
        self, path: Path, kept: list[int]
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        """The rows `scan_split` kept, keyed by row index (the stable instance id)."""
        wanted = set(kept)
        for index, row in enumerate(_read_rows(path)):
            if index in wanted:
                images = [_image_bytes(entry, path.parent) for entry in row["images"] or []]
                example = {"problem": row["problem"], "answer": row["answer"]}
                yield index, {**example, "images": images, "instance_id": index}


def build_report(builder: CptJax) -> dict[str, dict[str, Any]]:
    """The per-split build report of a built dataset (see the module docstring)."""
    return dict(builder.info.metadata.get("build_report", {}))
