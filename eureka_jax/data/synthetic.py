"""A synthetic visual-reasoning dataset with verifiable numeric answers, drawn with PIL.

The CPU demo's tiny VLM must learn it in minutes, so images are small (56 px at "easy": 2x2
cells of 28 px, i.e. one merged Qwen2.5-VL token per cell), shapes are big, flat and one per cell,
questions are short, and every answer is an integer (the accuracy reward parses answers with
math_verify, which does not parse words such as "red").

Tasks:
  count   "How many circles are in the image?"                      -> "3"
  digit   a seven-segment digit: "What digit is shown?"             -> "7"
  colour  "What colour is the square? (red=1, green=2, blue=3, yellow=4)" -> "2"
  add     "Count the circles, then add 2."                          -> "5"

Item i of a split depends only on (seed, split, i), so a larger dataset extends a smaller one and
the eval split does not change with num_train. Written as MM-Eureka jsonl (image paths relative
to the jsonl file) plus PNG files, so the ordinary loader reads it. The records carry no system
message: the run's configured system prompt applies (MMEUREKA_SYSTEM_PROMPT by default).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

TASKS = ("count", "digit", "colour", "add")
CELL = 28  # px: one 2x2 patch merge of Qwen2.5-VL, i.e. one LM token per cell
SHAPES = ("circle", "square", "triangle")
COLOURS = {  # name -> RGB; the colour task answers with the 1-based position in this dict
    "red": (220, 30, 30),
    "green": (30, 160, 30),
    "blue": (30, 60, 220),
    "yellow": (230, 190, 0),
}
BACKGROUND = (255, 255, 255)
# Seven-segment layout: a top, b upper right, c lower right, d bottom, e lower left, f upper left,
# g middle.
DIGIT_SEGMENTS = {
    0: "abcdef", 1: "bc", 2: "abdeg", 3: "abcdg", 4: "bcfg",
    5: "acdfg", 6: "acdefg", 7: "abc", 8: "abcdefg", 9: "abcdfg",
}
_SPLIT_CODES = {"train": 0, "eval": 1}
_INFO_FILE = "synthetic.json"


@dataclasses.dataclass(frozen=True)
class Difficulty:
    """image_size: square side in px, a multiple of CELL (the grid is image_size // CELL cells
      on a side). count_shapes: shapes the count/add tasks may ask about. max_distractors: other
      shapes drawn alongside. shape_size: (min, max) side of a shape in px. jitter: random
      position inside the cell, and random digit placement."""

    name: str
    image_size: int
    max_count: int
    max_distractors: int
    max_addend: int
    count_shapes: tuple[str, ...]
    shape_size: tuple[int, int]
    jitter: bool

    def __post_init__(self):
        cells = (self.image_size // CELL) ** 2
        assert self.image_size % CELL == 0 and self.max_count + self.max_distractors <= cells
        assert self.shape_size[1] <= CELL - 4  # keeps a 2 px gap so shapes never touch


DIFFICULTIES = {
    "easy": Difficulty("easy", 56, 4, 0, 3, ("circle",), (20, 20), False),
    "medium": Difficulty("medium", 84, 6, 2, 5, SHAPES, (14, 22), True),
    "hard": Difficulty("hard", 112, 9, 4, 9, SHAPES, (12, 24), True),
}


@dataclasses.dataclass(frozen=True)
class SyntheticItem:
    image: Image.Image
    question: str
    answer: str
    task: str
    short_question: str = ""  # a terse form for tiny models, whose attention long prompts dilute


@dataclasses.dataclass(frozen=True)
class SyntheticDataset:
    train_jsonl: Path
    eval_jsonl: Path


def make_synthetic(
    out_dir: str | os.PathLike,
    num_train: int,
    num_eval: int,
    seed: int = 0,
    tasks: tuple[str, ...] = TASKS,
    difficulty: str | Difficulty = "easy",
    short_questions: bool = False,
) -> SyntheticDataset:
    """Writes out_dir/{train,eval}.jsonl and out_dir/images/{train,eval}/NNNNNN.png. Returns at
    once if out_dir already holds this exact dataset (same arguments)."""
    level = _difficulty(difficulty)
    unknown = set(tasks) - set(TASKS)
    if unknown or not tasks:
        raise ValueError(f"tasks must be a non-empty subset of {TASKS}, got {tasks}")
    out_dir = Path(out_dir)
    result = SyntheticDataset(out_dir / "train.jsonl", out_dir / "eval.jsonl")
    info = {
        "num_train": num_train, "num_eval": num_eval, "seed": seed, "tasks": list(tasks),
        "difficulty": dataclasses.asdict(level), "short_questions": short_questions,
    }
    info_path = out_dir / _INFO_FILE
    if info_path.is_file() and json.loads(info_path.read_text()) == _jsonable(info):
        return result
    info_path.unlink(missing_ok=True)  # written last: its presence means the dataset is complete
    for split, count in (("train", num_train), ("eval", num_eval)):
        _write_split(out_dir, split, count, seed, tasks, level, short_questions)
    info_path.write_text(json.dumps(info, indent=1))
    return result


def make_item(split: str, index: int, seed: int, tasks: tuple[str, ...],
              difficulty: str | Difficulty = "easy", short_questions: bool = False
              ) -> SyntheticItem:
    """Item `index` of a split; tasks take turns so that they are balanced."""
    rng = np.random.default_rng([seed, _SPLIT_CODES[split], index])
    task = tasks[index % len(tasks)]
    item = _TASK_FNS[task](rng, _difficulty(difficulty))
    return dataclasses.replace(item, question=item.short_question) if short_questions else item


def _write_split(out_dir: Path, split: str, count: int, seed: int, tasks, level,
                 short_questions: bool) -> None:
    image_dir = out_dir / "images" / split
    image_dir.mkdir(parents=True, exist_ok=True)
    lines = []
    for index in range(count):
        item = make_item(split, index, seed, tasks, level, short_questions)
        image_name = f"images/{split}/{index:06d}.png"
        item.image.save(out_dir / image_name)
        message = [{"role": "user", "content": [
            {"type": "image", "image": image_name},
            {"type": "text", "text": item.question},
        ]}]
        lines.append(json.dumps({
            "id": f"{split}-{index:06d}", "message": json.dumps(message), "answer": item.answer,
            "task": item.task, "difficulty": level.name,
        }))
    tmp = out_dir / f"{split}.jsonl.tmp"
    tmp.write_text("".join(line + "\n" for line in lines))
    tmp.replace(out_dir / f"{split}.jsonl")


def _difficulty(difficulty: str | Difficulty) -> Difficulty:
    if isinstance(difficulty, Difficulty):
        return difficulty
    if difficulty not in DIFFICULTIES:
        raise ValueError(f"difficulty must be one of {list(DIFFICULTIES)}, got {difficulty!r}")
    return DIFFICULTIES[difficulty]


def _jsonable(value):
    return json.loads(json.dumps(value))


# ----------------------------------------------------------------------------- tasks


def _count(rng: np.random.Generator, level: Difficulty) -> SyntheticItem:
    shape, count, image = _draw_count_scene(rng, level)
    return SyntheticItem(image, f"How many {shape}s are in the image?", str(count), "count",
                         f"{shape.capitalize()}s?")


def _add(rng: np.random.Generator, level: Difficulty) -> SyntheticItem:
    shape, count, image = _draw_count_scene(rng, level)
    addend = int(rng.integers(1, level.max_addend + 1))
    question = f"Count the {shape}s, then add {addend}."
    return SyntheticItem(image, question, str(count + addend), "add",
                         f"{shape.capitalize()}s+{addend}?")


def _colour(rng: np.random.Generator, level: Difficulty) -> SyntheticItem:
    names = list(COLOURS)
    colour = names[int(rng.integers(len(names)))]
    others = [n for n in names if n != colour]
    cells = _pick_cells(rng, level, 1 + int(rng.integers(0, level.max_distractors + 1)))
    image, draw = _blank(level)
    _draw_shape(draw, rng, level, cells[0], "square", COLOURS[colour])
    for cell in cells[1:]:  # distractors: never a square, never the square's colour
        kind = ("circle", "triangle")[int(rng.integers(2))]
        _draw_shape(draw, rng, level, cell, kind, COLOURS[others[int(rng.integers(3))]])
    legend = ", ".join(f"{name}={i}" for i, name in enumerate(names, start=1))
    question = f"What colour is the square? ({legend})"
    return SyntheticItem(image, question, str(names.index(colour) + 1), "colour", "Colour?")


def _digit(rng: np.random.Generator, level: Difficulty) -> SyntheticItem:
    digit = int(rng.integers(10))
    image, draw = _blank(level)
    colour = list(COLOURS.values())[int(rng.integers(len(COLOURS)))]
    rects = digit_segment_rects(digit_box(level, rng), level.image_size)
    for segment in DIGIT_SEGMENTS[digit]:
        draw.rectangle(rects[segment], fill=colour)
    return SyntheticItem(image, "What digit is shown?", str(digit), "digit", "Digit?")


_TASK_FNS = {"count": _count, "digit": _digit, "colour": _colour, "add": _add}


# ----------------------------------------------------------------------------- drawing


def _draw_count_scene(rng: np.random.Generator, level: Difficulty):
    """(asked shape, how many of it, image) with distractor shapes of other kinds."""
    shape = level.count_shapes[int(rng.integers(len(level.count_shapes)))]
    count = int(rng.integers(1, level.max_count + 1))
    distractors = int(rng.integers(0, level.max_distractors + 1))
    other_kinds = [k for k in SHAPES if k != shape]
    image, draw = _blank(level)
    colours = list(COLOURS.values())
    for n, cell in enumerate(_pick_cells(rng, level, count + distractors)):
        kind = shape if n < count else other_kinds[int(rng.integers(len(other_kinds)))]
        _draw_shape(draw, rng, level, cell, kind, colours[int(rng.integers(len(colours)))])
    return shape, count, image


def _blank(level: Difficulty) -> tuple[Image.Image, ImageDraw.ImageDraw]:
    image = Image.new("RGB", (level.image_size, level.image_size), BACKGROUND)
    return image, ImageDraw.Draw(image)


def _pick_cells(rng: np.random.Generator, level: Difficulty, n: int) -> list[tuple[int, int]]:
    side = level.image_size // CELL
    flat = rng.choice(side * side, size=n, replace=False)
    return [(int(i) % side, int(i) // side) for i in flat]


def _draw_shape(draw, rng, level: Difficulty, cell: tuple[int, int], kind: str, colour) -> None:
    low, high = level.shape_size
    size = int(rng.integers(low, high + 1))
    if level.jitter:  # anywhere in the cell, keeping 2 px clear of its border
        dx, dy = (int(rng.integers(2, CELL - 2 - size + 1)) for _ in range(2))
    else:
        dx = dy = (CELL - size) // 2
    x0, y0 = cell[0] * CELL + dx, cell[1] * CELL + dy
    x1, y1 = x0 + size - 1, y0 + size - 1
    if kind == "circle":
        draw.ellipse((x0, y0, x1, y1), fill=colour)
    elif kind == "square":
        draw.rectangle((x0, y0, x1, y1), fill=colour)
    else:
        draw.polygon([((x0 + x1) / 2, y0), (x0, y1), (x1, y1)], fill=colour)


def digit_box(level: Difficulty, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(x0, y0, x1, y1) of the digit: half the width and 3/4 of the height, centred unless the
    level jitters (then scaled 0.8-1.0 and shifted)."""
    size = level.image_size
    scale = float(rng.uniform(0.8, 1.0)) if level.jitter else 1.0
    width, height = round(size * 0.5 * scale), round(size * 0.75 * scale)
    if level.jitter:
        x0 = int(rng.integers(2, size - width - 1))
        y0 = int(rng.integers(2, size - height - 1))
    else:
        x0, y0 = (size - width) // 2, (size - height) // 2
    return x0, y0, x0 + width - 1, y0 + height - 1


def digit_segment_rects(box: tuple[int, int, int, int], image_size: int) -> dict[str, tuple]:
    """Rectangle (x0, y0, x1, y1) of each segment a-g inside `box`."""
    x0, y0, x1, y1 = box
    t = max(3, image_size // 10)  # stroke thickness
    ym = (y0 + y1) // 2
    return {
        "a": (x0, y0, x1, y0 + t - 1),
        "b": (x1 - t + 1, y0, x1, ym),
        "c": (x1 - t + 1, ym, x1, y1),
        "d": (x0, y1 - t + 1, x1, y1),
        "e": (x0, ym, x0 + t - 1, y1),
        "f": (x0, y0, x0 + t - 1, ym),
        "g": (x0, ym - t // 2, x1, ym - t // 2 + t - 1),
    }
