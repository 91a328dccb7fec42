"""Parquet -> TFDS array_record -> Grain: what goes in comes back, bad rows are counted by
reason (never dropped silently), unusable files fail naming the file and column."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from cpt_jax.data import build, synthetic
from cpt_jax.data.sources import SourceNotBuiltError, load_source
from cpt_jax.data.tfds_builder import CptJax, SourceError

_STRUCT_IMAGES = pa.list_(pa.struct([("bytes", pa.binary()), ("path", pa.string())]))


def _png(width: int, height: int, colour: tuple[int, int, int] = (200, 40, 40)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _write(path: Path, rows: list[dict], *, struct: bool = False) -> Path:
    """Writes rows as the paper's users hold them; `struct` writes images as HF datasets does."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if struct:
        rows = [
            {**row, "images": [{"bytes": b, "path": None} for b in row["images"]]} for row in rows
        ]
    images_type = _STRUCT_IMAGES if struct else pa.list_(pa.binary())
    schema = pa.schema([("problem", pa.string()), ("answer", pa.string()), ("images", images_type)])
    pq.write_table(pa.Table.from_pylist(rows, schema=schema), path)
    return path


def _good_rows(count: int, offset: int = 0) -> list[dict]:
    """Rows with zero, one and two images (text-only rows exist: MMLU-Pro)."""
    rows = []
    for i in range(offset, offset + count):
        images = [_png(28 + i, 40, (i * 20 % 256, 90, 30)) for _ in range(i % 3)]
        problem = "<image>" * len(images) + f"Question {i}: what is shown? é"
        rows.append({"problem": problem, "answer": f"answer {i}", "images": images})
    return rows


def _read(task: str, split: str, data_dir: Path) -> list[dict]:
    return list(load_source(task, split, data_dir=data_dir))


@pytest.mark.parametrize(
    "layout, struct",
    [
        ("{split}.parquet", False),
        ("{task}/{split}.parquet", True),
        ("{task}_{split}.parquet", False),
    ],
)
def test_round_trip(tmp_path, layout, struct):
    splits = {"train": _good_rows(7), "validation": _good_rows(2, 100), "test": _good_rows(3, 200)}
    for split, rows in splits.items():
        _write(tmp_path / "src" / layout.format(task="textvqa", split=split), rows, struct=struct)
    data_dir = tmp_path / "tfds"
    args = ["--task", "textvqa", "--source", str(tmp_path / "src"), "--data-dir", str(data_dir)]
    assert build.main(args) == 0
    for split, rows in splits.items():
        expected = [{**row, "instance_id": i} for i, row in enumerate(rows)]
        assert _read("textvqa", split, data_dir) == expected


def test_hf_struct_with_path_only(tmp_path):
    """HF datasets may store an image as a path next to the parquet file instead of bytes."""
    image = _png(30, 30)
    (tmp_path / "src" / "pope").mkdir(parents=True)
    (tmp_path / "src" / "pope" / "cat.png").write_bytes(image)
    table = pa.Table.from_pylist(
        [{"problem": "<image>Is there a cat?", "answer": "yes",
          "images": [{"bytes": None, "path": "cat.png"}]}],
        schema=pa.schema([("problem", pa.string()), ("answer", pa.string()),
                          ("images", _STRUCT_IMAGES)]),
    )  # fmt: skip
    pq.write_table(table, tmp_path / "src" / "pope" / "test.parquet")
    build.build_task("pope", tmp_path / "src", tmp_path / "tfds")
    [row] = _read("pope", "test", tmp_path / "tfds")
    assert row["images"] == [image]


def test_bad_rows_are_skipped_and_counted(tmp_path, capsys):
    good = _good_rows(3)
    rows = [
        good[0],
        {"problem": "<image>Corrupt?", "answer": "a", "images": [_png(40, 40)[:60]]},
        {"problem": "<image>Too thin?", "answer": "b", "images": [_png(20, 300)]},
        {"problem": "<image>No answer?", "answer": "  ", "images": [_png(40, 40)]},
        {"problem": "<image><image>Two?", "answer": "c", "images": [_png(40, 40)]},
        good[1],
        good[2],
    ]
    source, data_dir = tmp_path / "src", tmp_path / "tfds"
    _write(source / "train.parquet", rows)
    _write(source / "test.parquet", [rows[1]])  # a split with no usable row at all
    args = ["--task", "scienceqa", "--source", str(source), "--data-dir", str(data_dir)]
    assert build.main(args) == 0

    assert [row["instance_id"] for row in _read("scienceqa", "train", data_dir)] == [0, 5, 6]
    reasons = {"corrupt_image": 1, "small_image": 2, "empty_answer": 3, "placeholder_mismatch": 4}
    metadata = data_dir / "cpt_jax" / "scienceqa" / str(CptJax.VERSION) / "metadata.json"
    report = json.loads(metadata.read_text())["build_report"]
    assert report["train"]["rows"] == 7 and report["train"]["kept"] == 3
    assert report["train"]["skipped"] == {reason: 1 for reason in reasons}
    assert report["train"]["offending_rows"] == {r: [i] for r, i in reasons.items()}
    assert report["test"] == {**report["test"], "rows": 1, "kept": 0}

    printed = capsys.readouterr().out
    for reason in reasons:
        assert f"{reason}=1" in printed
    with pytest.raises(SourceNotBuiltError, match="no usable rows.*corrupt_image"):
        load_source("scienceqa", "test", data_dir=data_dir)


def test_missing_column_names_file_and_column(tmp_path, capsys):
    path = tmp_path / "src" / "gqa_train.parquet"
    path.parent.mkdir()
    pq.write_table(pa.table({"problem": ["<image>q"], "images": [[_png(40, 40)]]}), path)
    with pytest.raises(SourceError, match=rf"{path}: missing column\(s\) answer"):
        build.build_task("gqa", tmp_path / "src", tmp_path / "tfds")
    args = ["--task", "gqa", "--source", str(tmp_path / "src"), "--data-dir", str(tmp_path / "t")]
    assert build.main(args) == 1
    assert f"{path}: missing column(s) answer" in capsys.readouterr().err
    assert not CptJax(config="gqa", data_dir=str(tmp_path / "t")).is_prepared()


def test_build_twice_is_idempotent_and_stale_sources_are_refused(tmp_path):
    source, data_dir = tmp_path / "src", tmp_path / "tfds"
    _write(source / "train.parquet", _good_rows(5))
    first = build.build_task("vizwiz", source, data_dir)
    files = {p: p.stat().st_mtime_ns for p in (data_dir / "cpt_jax").rglob("*") if p.is_file()}
    second = build.build_task("vizwiz", source, data_dir)
    assert (first.reused, second.reused) == (False, True)
    assert second.report == first.report
    assert {p: p.stat().st_mtime_ns for p in files} == files
    assert len(_read("vizwiz", "train", data_dir)) == 5

    _write(source / "train.parquet", _good_rows(6))
    with pytest.raises(build.StaleBuildError, match="--overwrite"):
        build.build_task("vizwiz", source, data_dir)
    assert build.build_task("vizwiz", source, data_dir, overwrite=True).report["train"]["kept"] == 6
    assert len(_read("vizwiz", "train", data_dir)) == 6


def test_unbuilt_task_gives_the_build_command(tmp_path):
    with pytest.raises(SourceNotBuiltError, match="python -m cpt_jax.data.build --task pathvqa"):
        load_source("pathvqa", "train", data_dir=tmp_path)
    with pytest.raises(SourceNotBuiltError, match="python -m cpt_jax.data.build --synthetic"):
        load_source("syn_count", "train", data_dir=tmp_path)
    _write(tmp_path / "src" / "train.parquet", _good_rows(2))
    build.build_task("pathvqa", tmp_path / "src", tmp_path)
    with pytest.raises(SourceNotBuiltError, match="no split 'test'.*built splits: train"):
        load_source("pathvqa", "test", data_dir=tmp_path)


def test_all_builds_every_task_found(tmp_path, capsys):
    _write(tmp_path / "src" / "gqa" / "train.parquet", _good_rows(2))
    _write(tmp_path / "src" / "mmmu_test.parquet", _good_rows(3))
    args = ["--all", "--source", str(tmp_path / "src"), "--data-dir", str(tmp_path / "tfds")]
    assert build.main(args) == 0
    assert len(_read("gqa", "train", tmp_path / "tfds")) == 2
    assert len(_read("mmmu", "test", tmp_path / "tfds")) == 3
    lines = capsys.readouterr().out.splitlines()
    table = lines[next(i for i, line in enumerate(lines) if line.startswith("task ")) :]
    assert [line.split()[:4] for line in table[1:3]] == [
        ["gqa", "train", "2", "2"],
        ["mmmu", "test", "3", "3"],
    ]


def test_synthetic_benchmark_goes_through_the_same_builder(tmp_path, capsys):
    args = ["--synthetic", "--train", "20", "--test", "10", "--data-dir", str(tmp_path)]
    assert build.main(args) == 0
    printed = capsys.readouterr().out
    for task in synthetic.SYNTHETIC_STAGES + synthetic.SYNTHETIC_GENERAL:
        assert task in printed
        test_rows = _read(task, "test", tmp_path)
        assert [row["instance_id"] for row in test_rows] == list(range(10))
        expected = synthetic.generate(task, split="test", num=10, seed=0)
        assert [{k: row[k] for k in ("problem", "answer", "images")} for row in test_rows] == (
            expected
        )
    assert len(_read("syn_choice", "train", tmp_path)) == 20
