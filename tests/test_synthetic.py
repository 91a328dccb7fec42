"""The offline synthetic benchmark: deterministic, the paper data's schema, disjoint splits,
balanced answers, and answers that can be read back from the pixels alone."""

from __future__ import annotations

import io
import os
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from scipy import ndimage
from scipy.spatial import ConvexHull

from cpt_jax.data.synthetic import (
    COLOURS,
    SYNTHETIC_GENERAL,
    SYNTHETIC_PRETRAIN,
    SYNTHETIC_STAGES,
    WORDS,
    contact_sheet,
    generate,
    write_benchmark,
    write_parquet,
)

REPO = Path(__file__).resolve().parents[1]
TASKS = SYNTHETIC_STAGES + SYNTHETIC_GENERAL + SYNTHETIC_PRETRAIN
LETTER_TASKS = {"syn_choice", "syn_general_arith"}
YES_NO_TASKS = {"syn_texture", "syn_general_pope"}
COLOUR_NAMES = {rgb: name for name, rgb in COLOURS.items()}


def _pixels(row: dict) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(row["images"][0])).convert("RGB"))


def test_task_names_in_paper_order():
    assert SYNTHETIC_STAGES == (
        "syn_choice",
        "syn_ocr",
        "syn_unanswerable",
        "syn_spatial",
        "syn_geometry",
        "syn_texture",
        "syn_count",
    )
    assert SYNTHETIC_GENERAL == ("syn_general_pope", "syn_general_arith")
    assert SYNTHETIC_PRETRAIN == ("syn_caption",)
    assert len(set(WORDS)) == 8


@pytest.mark.parametrize("task", TASKS)
def test_deterministic_by_seed(task):
    rows = generate(task, split="train", num=12, seed=1)
    assert rows == generate(task, split="train", num=12, seed=1)
    assert rows[:5] == generate(task, split="train", num=5, seed=1)  # row i does not depend on num
    other = generate(task, split="train", num=12, seed=2)
    assert sum(a != b for a, b in zip(rows, other, strict=True)) >= 10


@pytest.mark.parametrize("task", TASKS)
def test_schema_and_image_sizes(task):
    for row in generate(task, split="test", num=40, seed=0):
        assert set(row) == {"problem", "answer", "images"}
        assert isinstance(row["problem"], str) and isinstance(row["answer"], str)
        assert row["answer"] and row["answer"] == row["answer"].strip()
        assert row["problem"].count("<image>") == len(row["images"])
        assert len(row["images"]) == (0 if task == "syn_general_arith" else 1)
        if row["images"]:
            assert row["problem"].startswith("<image>")
            image = Image.open(io.BytesIO(row["images"][0]))
            assert image.format == "PNG" and image.mode == "RGB"
            assert all(side % 28 == 0 and 56 <= side <= 112 for side in image.size), image.size
        if task in LETTER_TASKS:
            assert row["answer"] in "ABCD"
            assert all(f"\n{letter}. " in row["problem"] for letter in "ABCD")


@pytest.mark.parametrize("task", TASKS)
def test_train_and_test_share_no_problem_image_pair(task):
    def keys(split: str, num: int) -> set:
        rows = generate(task, split=split, num=num, seed=0)
        return {(r["problem"], tuple(r["images"])) for r in rows}

    assert not keys("train", 300) & keys("test", 100)


@pytest.mark.parametrize("task", TASKS)
def test_answers_are_not_guessable_from_the_majority(task):
    answers = Counter(r["answer"] for r in generate(task, split="test", num=200, seed=0))
    shares = {a: n / 200 for a, n in answers.items()}
    assert max(shares.values()) <= 0.5, answers
    if task in YES_NO_TASKS:
        assert shares == {"yes": 0.5, "no": 0.5}
    if task in LETTER_TASKS:
        assert shares == dict.fromkeys("ABCD", 0.25)
    if task == "syn_unanswerable":
        assert 0.2 <= shares["unanswerable"] <= 0.4
    if task == "syn_ocr":
        assert set(answers) == set(WORDS) and max(shares.values()) <= 0.2
    if task == "syn_geometry":
        assert shares == dict.fromkeys("3456", 0.25)
    if task == "syn_spatial":
        assert set(answers) == {"left", "right", "above", "below"}
        assert max(shares.values()) <= 0.3
    if task == "syn_count":
        assert len(answers) >= 6 and max(shares.values()) <= 0.35


# --------------------------------------------------------------------------- pixel oracles


def _objects(pixels: np.ndarray) -> list[tuple[str, str, float, float]]:
    """(colour, shape, centre x, centre y) of every object, from the pixels alone: a blob is a
    connected run of non-background pixels; its shape follows from how much of its bounding
    box it fills and where its widest row is."""
    labels, _ = ndimage.label((pixels != pixels[0, 0]).any(-1), structure=np.ones((3, 3)))
    found = []
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        mask = labels[box] == i
        colours = np.unique(pixels[box][mask], axis=0)
        assert len(colours) == 1, colours  # flat fills, no anti-aliasing
        fill = mask.mean()
        widest = np.argmax(mask.sum(1)) / (mask.shape[0] - 1)
        if fill > 0.95:
            shape = "square"
        elif fill > 0.65:
            shape = "circle"
        elif fill < 0.46:
            shape = "star"
        else:
            shape = "triangle" if widest > 0.9 else "diamond"
        centre_y, centre_x = (s.start + (s.stop - s.start) / 2 for s in box)
        found.append((COLOUR_NAMES[tuple(colours[0].tolist())], shape, centre_x, centre_y))
    return found


def _count(problem: str, pixels: np.ndarray) -> str:
    objects = _objects(pixels)
    if colour := re.search(r"How many (\w+) objects", problem):
        return str(sum(c == colour[1] for c, *_ in objects))
    return str(len(objects))


def _texture_name(pixels: np.ndarray) -> str:
    """Stripes: every row (or every column) is one colour; dots cover far less of the tile
    than their background, checks about half."""
    _, counts = np.unique(pixels.reshape(-1, 3), axis=0, return_counts=True)
    if len(counts) == 1:
        return "plain"
    if (pixels == pixels[:, :1]).all() or (pixels == pixels[:1]).all():
        return "striped"
    return "dotted" if counts.min() / counts.sum() < 0.3 else "checkered"


def _texture(problem: str, pixels: np.ndarray) -> str:
    return "yes" if f"texture {_texture_name(pixels)}?" in problem else "no"


def _scene(pixels: np.ndarray) -> str:
    """The objects' colours and shapes in reading order (row of grid cells, then column)."""
    cells = sorted(_objects(pixels), key=lambda o: (o[3] // 28, o[2] // 28))
    return ", ".join(f"{colour} {shape}" for colour, shape, *_ in cells)


def _colour_of(problem: str, pixels: np.ndarray) -> str:
    assert problem.endswith("What colour is the shape?")
    colours = [c for c, *_ in _objects(pixels)]
    assert len(colours) <= 1
    return colours[0] if colours else "unanswerable"


def _spatial(problem: str, pixels: np.ndarray) -> str:
    objects = {c: (x, y) for c, _, x, y in _objects(pixels)}
    assert set(objects) == {"red", "blue"}
    (red_x, red_y), (blue_x, blue_y) = objects["red"], objects["blue"]
    if problem.endswith("to the left or to the right of the blue shape?"):
        return "left" if red_x < blue_x else "right"
    assert problem.endswith("above or below the blue shape?")
    return "above" if red_y < blue_y else "below"


def _choice(problem: str, pixels: np.ndarray) -> str:
    """The option naming the only colour, the number of objects or their one shape."""
    options = dict(re.findall(r"^([ABCD])\. (\w+)$", problem, re.MULTILINE))
    objects = _objects(pixels)
    if "What colour" in problem:
        (value,) = [c for c, *_ in objects]
    elif "How many" in problem:
        value = str(len(objects))
    else:
        (value,) = {s for _, s, *_ in objects}
    (letter,) = [k for k, v in options.items() if v == value]
    return letter


def _sides(problem: str, pixels: np.ndarray) -> str:
    """Sides of the one polygon: the convex hull's edges longer than 6 px, counted where the
    heading turns by more than 15 degrees (pixel steps along a side turn less)."""
    ys, xs = np.nonzero((pixels != pixels[0, 0]).any(-1))
    points = np.stack([xs, ys], 1).astype(float)
    hull = points[ConvexHull(points).vertices]
    edges = np.roll(hull, -1, 0) - hull
    heading = np.degrees(np.arctan2(edges[:, 1], edges[:, 0]))[np.hypot(*edges.T) > 6]
    turns = np.abs((heading - np.roll(heading, 1) + 180) % 360 - 180)
    return str(int((turns > 15).sum()))


def _pope(problem: str, pixels: np.ndarray) -> str:
    shape = re.search(r"Is there a (\w+) in", problem)[1]
    return "yes" if any(s == shape for _, s, *_ in _objects(pixels)) else "no"


@pytest.mark.parametrize(
    "task, oracle",
    [
        ("syn_choice", _choice),
        ("syn_geometry", _sides),
        ("syn_count", _count),
        ("syn_texture", _texture),
        ("syn_unanswerable", _colour_of),
        ("syn_spatial", _spatial),
        ("syn_general_pope", _pope),
    ],
)
def test_answers_agree_with_the_pixels(task, oracle):
    for split in ("train", "test"):
        for row in generate(task, split=split, num=80, seed=5):
            assert oracle(row["problem"], _pixels(row)) == row["answer"], row["problem"]


def test_captions_agree_with_the_pixels():
    """Tiles by the texture oracle, scenes by the object oracle, words by the word list."""
    kinds = Counter()
    for row in generate("syn_caption", split="train", num=90, seed=5):
        answer, pixels = row["answer"], _pixels(row)
        if answer.startswith("the word "):
            assert answer.removeprefix("the word ") in WORDS
            kinds["word"] += 1
        elif answer.endswith(" texture"):
            assert answer == f"{_texture_name(pixels)} texture"
            kinds["texture"] += 1
        else:
            assert answer == _scene(pixels)
            kinds["scene"] += 1
    assert kinds == {"word": 30, "texture": 30, "scene": 30}, kinds


# --------------------------------------------------------------------------- files


def test_parquet_round_trip(tmp_path):
    path = write_parquet("syn_choice", "train", 16, 3, tmp_path)
    assert path == tmp_path / "syn_choice" / "train.parquet"
    table = pq.read_table(path)
    assert table.schema.field("problem").type == pa.string()
    assert table.schema.field("answer").type == pa.string()
    assert table.schema.field("images").type == pa.list_(pa.binary())
    assert table.to_pylist() == generate("syn_choice", split="train", num=16, seed=3)
    arith = pq.read_table(write_parquet("syn_general_arith", "test", 4, 0, tmp_path))
    assert arith.column("images").to_pylist() == [[]] * 4


def test_benchmark_layout(tmp_path):
    paths = write_benchmark(tmp_path, train=3, test=2)
    assert set(paths) == set(TASKS)
    for task in TASKS:
        assert {p.stem for p in (tmp_path / task).iterdir()} == {"train", "test"}
        assert pq.read_metadata(tmp_path / task / "test.parquet").num_rows == 2


def test_contact_sheet(tmp_path):
    examples = {t: generate(t, split="test", num=2, seed=0) for t in TASKS}
    sheet = Image.open(contact_sheet(examples, tmp_path / "sheet.png"))
    assert sheet.width == 2 * (2 * 112 + 16) and sheet.height > 9 * 2 * 112


def test_command_line(tmp_path):
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    command = [sys.executable, "-m", "cpt_jax.data.synthetic", "--out", str(tmp_path)]
    command += ["--train", "4", "--test", "2"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    expected = 2 * len(TASKS)
    assert result.stdout.count("rows") == expected


def test_unknown_task_or_split():
    with pytest.raises(ValueError, match="unknown synthetic task"):
        generate("scienceqa", split="train", num=1, seed=0)
    with pytest.raises(ValueError, match="unknown split"):
        generate("syn_choice", split="validation", num=1, seed=0)
