"""An offline synthetic benchmark: seven small visual tasks, one per paper stage, plus two
held-out general tasks, generated procedurally so tests and demos need no download.

    python -m cpt_jax.data.synthetic --out DIR [--train 2000] [--test 200] [--seed 0]
                                     [--sheet contact_sheet.png]

Rows have the schema of the paper's data (one parquet file per task and split): `problem`
(text with one `<image>` placeholder, none for text-only rows), `answer` (text) and `images`
(a list of PNG bytes). Each task is the small analogue of one paper task:

| task | analogue | question | answer |
|---|---|---|---|
| syn_choice | ScienceQA | colour, count or shape, options in a fixed order | letter A-D |
| syn_ocr | TextVQA | the word written (prompt carries OCR tokens) | one of 8 words |
| syn_unanswerable | VizWiz | the shape's colour; no shape in ~30% | colour / "unanswerable" |
| syn_spatial | GQA | red shape left/right of, or above/below, the blue one | side |
| syn_geometry | Geometry3K | how many sides the regular polygon has | 3-6 |
| syn_texture | PathVQA | is the tile striped | yes / no |
| syn_count | Super-CLEVR | how many red objects (or all objects) | integer |
| syn_general_pope | POPE (held out) | is there a <shape> | yes / no |
| syn_general_arith | MMLU-Pro (held out, text only) | arithmetic | letter A-D |

Within each question template of a stage task the answer is a function of the image alone
(no answer needs the question's words compared with the picture): a model of a few million
parameters learns that from a few thousand examples on a CPU, where the compositional forms
("Is the texture X?", options in random order) stayed at chance (see
`reports/synthetic_learnability/`). The held-out POPE analogue keeps the compositional form.

Images are small on purpose: both sides are multiples of 28 between 56 and 112 px, so the
Qwen2.5-VL processor run with `min_pixels=SYNTHETIC_MIN_PIXELS` and
`max_pixels=SYNTHETIC_MAX_PIXELS` keeps them at their size and yields 4 to 16 merged image
tokens per image. Text is drawn with Pillow's built-in bitmap font scaled by whole numbers and
shapes without anti-aliasing, so every pixel is an exact colour, the same on every machine
(the split hash reads pixels, not PNG bytes, for the same reason).

Every row is drawn from its own generator seeded by (task, split, seed, index), so a run is
deterministic and `generate(num=10)` is a prefix of `generate(num=100)`. Train and test never
share a (problem, image) pair: a row belongs to the split given by one bit of a hash of its
problem and pixels, and a row drawn for the other split is drawn again.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import textwrap
import zlib
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image, ImageDraw, ImageFont

from cpt_jax.data.tasks import SYNTHETIC_GENERAL, SYNTHETIC_PRETRAIN, SYNTHETIC_STAGES

SYNTHETIC_MIN_PIXELS = 56 * 56
SYNTHETIC_MAX_PIXELS = 112 * 112

SPLITS = ("train", "test")

RGB = tuple[int, int, int]
COLOURS: dict[str, RGB] = {
    "red": (220, 30, 30),
    "green": (30, 150, 50),
    "blue": (30, 70, 220),
    "yellow": (240, 200, 0),
    "purple": (140, 50, 180),
    "orange": (250, 120, 20),
}
SHAPES = ("circle", "square", "triangle", "star", "diamond")
# Light backgrounds, none of them a palette colour, so objects stand out by exact colour.
BACKGROUNDS = (
    (255, 255, 255),
    (236, 236, 236),
    (248, 242, 226),
    (226, 236, 248),
    (232, 246, 230),
    (246, 232, 240),
)
INKS = ((0, 0, 0), (40, 40, 90), (90, 20, 20), (20, 70, 30))
# Few words, written large: reading is a classification a small model learns from pixels.
WORDS = ("cat", "sun", "bus", "stop", "lamp", "park", "music", "water")
TEXTURES = {"striped": "stripes", "dotted": "dots", "checkered": "checks", "plain": "plain"}
_COLOUR_NAMES = tuple(COLOURS)
CHOICE_COLOURS = ("red", "green", "blue", "yellow")  # syn_choice's options, in this order
CHOICE_SHAPES = ("circle", "square", "triangle", "star")
LETTERS = "ABCD"
CELL = 28  # objects sit one per 28 px grid cell, so they never touch
_SIDES = (56, 84, 112)
_CHOICE_SUFFIX = "Answer with the option's letter."

Draft = tuple[str, str, Image.Image | None]  # problem without the placeholder, answer, image


@dataclass(frozen=True)
class _Obj:
    """One drawn shape: its name, colour name, top-left corner and side in pixels."""

    shape: str
    colour: str
    x: int
    y: int
    size: int


# --------------------------------------------------------------------------- drawing helpers


def _pick(rng: np.random.Generator, items: Sequence, k: int | None = None) -> Any:
    """One item (k None) or k distinct items, as plain Python values."""
    if k is None:
        return items[int(rng.integers(len(items)))]
    return [items[int(i)] for i in rng.choice(len(items), size=k, replace=False)]


def _canvas(
    rng: np.random.Generator, widths: Sequence[int] = _SIDES, heights: Sequence[int] = _SIDES
) -> Image.Image:
    """A blank image of a random allowed size on a random light background."""
    size = (_pick(rng, widths), _pick(rng, heights))
    return Image.new("RGB", size, _pick(rng, BACKGROUNDS))


def _place(
    rng: np.random.Generator,
    image: Image.Image,
    shapes: Sequence[str],
    colours: Sequence[str],
    *,
    distinct: str = "",
) -> list[_Obj]:
    """Put one object per shape in distinct grid cells (distinct columns or rows if asked)."""
    cols, rows = image.width // CELL, image.height // CELL
    n = len(shapes)
    if distinct == "cols":
        cells = [(c, int(rng.integers(rows))) for c in _pick(rng, range(cols), n)]
    elif distinct == "rows":
        cells = [(int(rng.integers(cols)), r) for r in _pick(rng, range(rows), n)]
    else:
        cells = [divmod(i, rows) for i in _pick(rng, range(cols * rows), n)]
    objs = []
    for (c, r), shape, colour in zip(cells, shapes, colours, strict=True):
        size = int(rng.integers(16, 25))
        x = c * CELL + int(rng.integers(2, CELL - size - 1))
        y = r * CELL + int(rng.integers(2, CELL - size - 1))
        objs.append(_Obj(shape, colour, x, y, size))
    draw = ImageDraw.Draw(image)
    for obj in objs:
        _draw_shape(draw, obj)
    return objs


def _draw_shape(draw: ImageDraw.ImageDraw, obj: _Obj) -> None:
    """Fill one shape inside its size x size box, without anti-aliasing."""
    x, y, s, fill = obj.x, obj.y, obj.size, COLOURS[obj.colour]
    x1, y1, cx, cy = x + s - 1, y + s - 1, x + (s - 1) / 2, y + (s - 1) / 2
    if obj.shape == "circle":
        draw.ellipse((x, y, x1, y1), fill=fill)
    elif obj.shape == "square":
        draw.rectangle((x + 1, y + 1, x1 - 1, y1 - 1), fill=fill)
    elif obj.shape == "triangle":
        draw.polygon([(cx, y), (x1, y1), (x, y1)], fill=fill)
    elif obj.shape == "diamond":
        draw.polygon([(cx, y), (x1, cy), (cx, y1), (x, cy)], fill=fill)
    else:  # star: ten points alternating between the outer and an inner radius
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        radii = np.where(np.arange(10) % 2, 0.42, 1.0) * (s - 1) / 2
        cy = y + (s - 1) * 0.55  # the star's box is lower than it is wide: centre it
        xs, ys = cx + radii * np.cos(angles), cy + radii * np.sin(angles)
        draw.polygon(list(zip(xs, ys, strict=True)), fill=fill)


@cache
def _glyphs(text: str, scale: int) -> Image.Image:
    """A binary mask of `text` in Pillow's bitmap font, scaled up by a whole factor."""
    font = ImageFont.load_default_imagefont()
    left, top, right, bottom = font.getbbox(text)
    mask = Image.new("1", (right - left, bottom - top))
    ImageDraw.Draw(mask).text((-left, -top), text, fill=1, font=font)
    mask = mask.crop(mask.getbbox())  # tight box, so placement arithmetic is exact
    return mask.resize((mask.width * scale, mask.height * scale), Image.Resampling.NEAREST)


def _write(
    image: Image.Image, text: str, xy: tuple[float, float], ink: RGB, scale: int = 2
) -> None:
    """Stamp `text` with its top-left corner at xy, clamped into the image."""
    mask = _glyphs(text, scale)
    x = int(min(max(xy[0], 1), image.width - mask.width - 1))
    y = int(min(max(xy[1], 1), image.height - mask.height - 1))
    image.paste(ink, (x, y, x + mask.width, y + mask.height), mask)


def _options(
    rng: np.random.Generator, question: str, correct: str, pool: Sequence[str], letter: int
) -> tuple[str, str]:
    """The question with four options, `correct` at position `letter` and the rest drawn from
    `pool`, and the answer letter."""
    others = _pick(rng, [p for p in pool if p != correct], 3)
    return _lettered(question, others[:letter] + [correct] + others[letter:]), LETTERS[letter]


def _lettered(question: str, options: Sequence[str]) -> str:
    """A question with options A-D in the given order and the answer instruction."""
    lines = "\n".join(f"{LETTERS[i]}. {o}" for i, o in enumerate(options))
    return f"{question}\n{lines}\n{_CHOICE_SUFFIX}"


# --------------------------------------------------------------------------- tasks


def _choice(rng: np.random.Generator, index: int) -> Draft:
    """ScienceQA analogue: four lettered options about the scene, always listed in the same
    order per question, so the letter follows from the image; letters balanced by index."""
    letter, kind = index % 4, index // 4 % 3
    image = _canvas(rng)
    if kind == 0:  # the colour of the only shape
        colour = CHOICE_COLOURS[letter]
        _place(rng, image, [_pick(rng, SHAPES)], [colour])
        return _lettered("What colour is the shape?", CHOICE_COLOURS), LETTERS[letter], image
    if kind == 1:  # how many shapes
        n = letter + 1
        _place(rng, image, [_pick(rng, SHAPES) for _ in range(n)], _pick(rng, _COLOUR_NAMES, n))
        question = _lettered("How many shapes are in the image?", ["1", "2", "3", "4"])
        return question, LETTERS[letter], image
    shape, n = CHOICE_SHAPES[letter], int(rng.integers(1, 3))  # one or two copies of one shape
    _place(rng, image, [shape] * n, [_pick(rng, _COLOUR_NAMES) for _ in range(n)])
    return _lettered("Which shape is in the image?", CHOICE_SHAPES), LETTERS[letter], image


def _ocr(rng: np.random.Generator, index: int) -> Draft:
    """TextVQA analogue: read a word; the prompt lists it among two distractor OCR tokens."""
    image, word = _word_image(rng)
    tokens = [word, *_pick(rng, [w for w in WORDS if w != word], 2)]
    tokens = _pick(rng, tokens, 3)
    return f"What word is written in the image?\nReading: {' '.join(tokens)}", word, image


def _word_image(rng: np.random.Generator) -> tuple[Image.Image, str]:
    """A word from WORDS written large near the middle of a small canvas."""
    image = _canvas(rng, widths=(112,), heights=(56,))
    word = _pick(rng, WORDS)
    mask = _glyphs(word, 3)
    x = (image.width - mask.width) // 2 + int(rng.integers(-4, 5))
    y = (image.height - mask.height) // 2 + int(rng.integers(-4, 5))
    _write(image, word, (x, y), _pick(rng, INKS), 3)
    return image, word


def _unanswerable(rng: np.random.Generator, index: int) -> Draft:
    """VizWiz analogue: the colour of the shape, unanswerable in about 30% of rows, where the
    photo missed it (an empty canvas)."""
    image = _canvas(rng)
    if rng.random() < 0.3:
        return "What colour is the shape?", "unanswerable", image
    (obj,) = _place(rng, image, [_pick(rng, SHAPES)], [_pick(rng, _COLOUR_NAMES)])
    return "What colour is the shape?", obj.colour, image


def _spatial(rng: np.random.Generator, index: int) -> Draft:
    """GQA analogue: where the red shape is relative to the blue one: left or right (distinct
    columns) on even index, above or below (distinct rows) on odd."""
    shapes = [_pick(rng, SHAPES) for _ in range(2)]
    if index % 2 == 0:
        image = _canvas(rng, widths=(84, 112))
        red, blue = _place(rng, image, shapes, ["red", "blue"], distinct="cols")
        answer = "left" if red.x < blue.x else "right"
        return "Is the red shape to the left or to the right of the blue shape?", answer, image
    image = _canvas(rng, heights=(84, 112))
    red, blue = _place(rng, image, shapes, ["red", "blue"], distinct="rows")
    answer = "above" if red.y < blue.y else "below"
    return "Is the red shape above or below the blue shape?", answer, image


def _geometry(rng: np.random.Generator, index: int) -> Draft:
    """Geometry3K analogue: how many sides a drawn regular polygon has (3 to 6; balanced by
    index), filled, near the middle, turned a little."""
    sides = 3 + index % 4
    image = Image.new("RGB", (112, 112), _pick(rng, BACKGROUNDS))
    radius = rng.uniform(38, 50)
    cx, cy = (56 + rng.uniform(-4, 4) for _ in range(2))
    angles = -np.pi / 2 + rng.uniform(-0.15, 0.15) + 2 * np.pi * np.arange(sides) / sides
    points = [(cx + radius * np.cos(a), cy + radius * np.sin(a)) for a in angles]
    ImageDraw.Draw(image).polygon(points, fill=_pick(rng, [*INKS, *COLOURS.values()]))
    return "How many sides does the polygon have?", str(sides), image


def _texture(rng: np.random.Generator, index: int) -> Draft:
    """PathVQA analogue: is the tile striped (yes on even index; else dotted, checkered or
    plain)."""
    width, height = _pick(rng, _SIDES), _pick(rng, _SIDES)
    actual = "striped" if index % 2 == 0 else _pick(rng, [t for t in TEXTURES if t != "striped"])
    answer = "yes" if actual == "striped" else "no"
    return "Is the texture striped?", answer, _tile(rng, actual, width, height)


def _tile(rng: np.random.Generator, actual: str, width: int, height: int) -> Image.Image:
    """A width x height tile with the texture `actual` (a TEXTURES key) in random colours."""
    yy, xx = np.indices((height, width))
    kind = TEXTURES[actual]
    if kind == "stripes":
        half = int(rng.integers(2, 7))
        along = yy if rng.random() < 0.5 else xx
        mask = (along + int(rng.integers(2 * half))) // half % 2 == 0
    elif kind == "checks":
        side = int(rng.integers(4, 15))
        mask = ((yy + int(rng.integers(side))) // side + (xx + int(rng.integers(side))) // side) % 2
        mask = mask == 0
    elif kind == "dots":
        gap = int(rng.integers(8, 15))
        radius = rng.uniform(1.5, gap / 4)
        dy, dx = (yy + int(rng.integers(gap))) % gap, (xx + int(rng.integers(gap))) % gap
        mask = (dy - gap / 2) ** 2 + (dx - gap / 2) ** 2 <= radius**2
    else:
        mask = np.zeros((height, width), bool)
    fg = np.array(_pick(rng, [*COLOURS.values(), *INKS]), np.uint8)
    bg = np.array(_pick(rng, BACKGROUNDS), np.uint8)
    if kind == "plain" and rng.random() < 0.5:  # plain tiles in either tone
        bg = fg
    pixels = np.where(mask[..., None], fg, bg).astype(np.uint8)
    return Image.fromarray(pixels)


def _count(rng: np.random.Generator, index: int) -> Draft:
    """Super-CLEVR analogue: count the red objects among others (zero included), or all."""
    image = _canvas(rng, widths=(84, 112), heights=(84, 112))
    if rng.random() < 0.25:
        n = int(rng.integers(1, 7))
        colours = [_pick(rng, _COLOUR_NAMES) for _ in range(n)]
        _place(rng, image, [_pick(rng, SHAPES) for _ in range(n)], colours)
        return "How many objects are there?", str(n), image
    target = int(rng.integers(0, 5))
    others = int(rng.integers(max(0, 1 - target), 7 - target))
    not_red = [c for c in _COLOUR_NAMES if c != "red"]
    colours = ["red"] * target + [_pick(rng, not_red) for _ in range(others)]
    _place(rng, image, [_pick(rng, SHAPES) for _ in colours], colours)
    return "How many red objects are there?", str(target), image


def _pope(rng: np.random.Generator, index: int) -> Draft:
    """POPE analogue (held out): is a shape present; yes on even index."""
    image = _canvas(rng)
    n = int(rng.integers(1, 5))
    shapes = [_pick(rng, SHAPES) for _ in range(n)]
    _place(rng, image, shapes, [_pick(rng, _COLOUR_NAMES) for _ in range(n)])
    present = index % 2 == 0
    asked = _pick(rng, shapes) if present else _pick(rng, [s for s in SHAPES if s not in shapes])
    return f"Is there a {asked} in the image?", "yes" if present else "no", image


def _arith(rng: np.random.Generator, index: int) -> Draft:
    """MMLU-Pro analogue (held out, text only): arithmetic with four lettered options."""
    op = _pick(rng, ("plus", "minus", "times"))
    if op == "times":
        a, b = int(rng.integers(2, 13)), int(rng.integers(2, 21))
        value, near = a * b, [a, b, 1, 2, 10]
    else:
        a, b = sorted(int(v) for v in rng.integers(2, 100, size=2))[::-1]
        value, near = (a + b, [1, 2, 10]) if op == "plus" else (a - b, [1, 2, 10])
    wrong = sorted({value + s * d for d in near for s in (-1, 1)} - {value})
    wrong = [w for w in wrong if w >= 0]
    pool = [str(w) for w in wrong]
    question, answer = _options(rng, f"What is {a} {op} {b}?", str(value), pool, index % 4)
    return question, answer, None


def _caption(rng: np.random.Generator, index: int) -> Draft:
    """Base-mixture pre-training (no paper stage): describe the image. Many supervised tokens
    per image, where a stage task gives one answer: every object's colour and shape in reading
    order (row by row, left to right), a tile's texture, or the written word."""
    kind = index % 3
    if kind == 0:
        image = _canvas(rng)
        n = int(rng.integers(1, 5))
        objs = _place(rng, image, [_pick(rng, SHAPES) for _ in range(n)],
                      [_pick(rng, _COLOUR_NAMES) for _ in range(n)])
        objs = sorted(objs, key=lambda o: (o.y // CELL, o.x // CELL))
        return CAPTION_QUESTION, ", ".join(f"{o.colour} {o.shape}" for o in objs), image
    if kind == 1:
        width, height = _pick(rng, _SIDES), _pick(rng, _SIDES)
        actual = _pick(rng, list(TEXTURES))
        return CAPTION_QUESTION, f"{actual} texture", _tile(rng, actual, width, height)
    image, word = _word_image(rng)
    return CAPTION_QUESTION, f"the word {word}", image


CAPTION_QUESTION = "Describe the image."

_TASKS: dict[str, Callable[[np.random.Generator, int], Draft]] = {
    "syn_choice": _choice,
    "syn_ocr": _ocr,
    "syn_unanswerable": _unanswerable,
    "syn_spatial": _spatial,
    "syn_geometry": _geometry,
    "syn_texture": _texture,
    "syn_count": _count,
    "syn_general_pope": _pope,
    "syn_general_arith": _arith,
    "syn_caption": _caption,
}


# --------------------------------------------------------------------------- rows and files


def _bucket(problem: str, image: Image.Image | None) -> int:
    """The split (0 train, 1 test) a (problem, image) pair belongs to: one hash bit."""
    digest = hashlib.blake2b(problem.encode(), digest_size=8)
    if image is not None:
        digest.update(f"{image.size}".encode())
        digest.update(image.tobytes())
    return digest.digest()[0] & 1


def _png(image: Image.Image) -> bytes:
    """Encode as PNG (deterministic for a given Pillow and zlib)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def generate(task: str, *, split: str, num: int, seed: int) -> list[dict]:
    """`num` rows {problem, answer, images} of one task and split, deterministic by seed."""
    if task not in _TASKS:
        raise ValueError(f"unknown synthetic task {task!r}; known: {list(_TASKS)}")
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; known: {SPLITS}")
    make, bucket = _TASKS[task], SPLITS.index(split)
    rows = []
    for index in range(num):
        rng = np.random.default_rng([zlib.crc32(task.encode()), bucket, seed, index])
        while True:
            question, answer, image = make(rng, index)
            if _bucket(question, image) == bucket:
                break
        if image is None:
            rows.append({"problem": question, "answer": answer, "images": []})
        else:
            problem, images = f"<image>{question}", [_png(image)]
            rows.append({"problem": problem, "answer": answer, "images": images})
    return rows


SCHEMA = pa.schema(
    [("problem", pa.string()), ("answer", pa.string()), ("images", pa.list_(pa.binary()))]
)


def write_parquet(task: str, split: str, num: int, seed: int, out_dir: str | Path) -> Path:
    """Write `<out_dir>/<task>/<split>.parquet` with the paper data's columns."""
    path = Path(out_dir) / task / f"{split}.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    rows = generate(task, split=split, num=num, seed=seed)
    pq.write_table(pa.Table.from_pylist(rows, schema=SCHEMA), path)
    return path


def write_benchmark(
    out_dir: str | Path, *, train: int = 2000, test: int = 200, seed: int = 0
) -> dict[str, dict[str, Path]]:
    """Every task's train and test split. No stage trains on a general task; its train split
    is for a base model (the mini paper experiment's base mixture), as a real base model knows
    general tasks before any stage."""
    paths: dict[str, dict[str, Path]] = {}
    for task in SYNTHETIC_STAGES + SYNTHETIC_GENERAL + SYNTHETIC_PRETRAIN:
        paths[task] = {s: write_parquet(task, s, n, seed, out_dir)
                       for s, n in (("train", train), ("test", test))}
    return paths


def contact_sheet(examples: dict[str, list[dict]], path: str | Path, zoom: int = 2) -> Path:
    """A PNG grid, one row per task, each example's image (zoomed) above its problem and
    answer: for eyeballing that images are legible and agree with their answers."""
    font = ImageFont.load_default(size=11)
    width, text_lines = 112 * zoom + 16, 9
    height = 4 + 14 + 112 * zoom + 4 + 14 * text_lines + 6
    per_row = max(len(v) for v in examples.values())
    sheet = Image.new("RGB", (width * per_row, height * len(examples)), (255, 255, 255))
    draw = ImageDraw.Draw(sheet)
    for r, (task, rows) in enumerate(examples.items()):
        for c, row in enumerate(rows):
            x, y = c * width + 8, r * height + 4
            draw.text((x, y), task, fill=(120, 120, 120), font=font)
            if row["images"]:
                image = Image.open(io.BytesIO(row["images"][0])).convert("RGB")
                size = (image.width * zoom, image.height * zoom)
                image = image.resize(size, Image.Resampling.NEAREST)
                sheet.paste(image, (x, y + 14))
                draw.rectangle((x - 1, y + 13, x + image.width, y + 14 + image.height), outline=0)
            lines = []
            for line in row["problem"].replace("<image>", "").splitlines():
                lines += textwrap.wrap(line, (width - 12) // 6) or [""]
            lines = lines[: text_lines - 2] + [f"-> {row['answer']}"]
            ty = y + 18 + 112 * zoom
            for k, line in enumerate(lines):
                ink = (200, 0, 0) if k == len(lines) - 1 else (0, 0, 0)
                draw.text((x, ty + 14 * k), line, fill=ink, font=font)
    path = Path(path)
    sheet.save(path)
    return path


def _summary(rows: list[dict]) -> str:
    """Row count, distinct answers, majority share and the most common answers."""
    counts = Counter(r["answer"] for r in rows)
    top = ", ".join(f"{a}:{n / len(rows):.2f}" for a, n in counts.most_common(6))
    majority = counts.most_common(1)[0][1] / len(rows)
    return f"{len(rows):5d} rows  {len(counts):3d} answers  max {majority:.2f}  [{top}]"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="output folder")
    parser.add_argument("--train", type=int, default=2000, help="train rows per stage task")
    parser.add_argument("--test", type=int, default=200, help="test rows per task")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--sheet", help="also save a contact sheet PNG (2 test rows per task)")
    args = parser.parse_args()
    paths = write_benchmark(args.out, train=args.train, test=args.test, seed=args.seed)
    for task, splits in paths.items():
        for split, path in splits.items():
            rows = pq.read_table(path).to_pylist()
            print(f"{task:18s} {split:5s} {_summary(rows)}")
    if args.sheet:
        examples = {t: generate(t, split="test", num=2, seed=args.seed) for t in paths}
        print("contact sheet:", contact_sheet(examples, args.sheet))


if __name__ == "__main__":
    main()
