"""The synthetic dataset: deterministic, and every answer can be read back from the pixels."""

import filecmp
import json
import re

import numpy as np
import pytest
from scipy import ndimage

from eureka_jax.commands import make_synthetic as make_synthetic_command
from eureka_jax.data import load_records
from eureka_jax.data.synthetic import (
    COLOURS,
    DIFFICULTIES,
    TASKS,
    digit_box,
    digit_segment_rects,
    make_item,
    make_synthetic,
)

# Segments lit per digit on a seven-segment display (a top, b upper right, c lower right,
# d bottom, e lower left, f upper left, g middle), written out here independently of the module.
SEVEN_SEGMENT = {"abcdef": 0, "bc": 1, "abdeg": 2, "abcdg": 3, "bcfg": 4, "acdfg": 5,
                 "acdefg": 6, "abc": 7, "abcdefg": 8, "abcdfg": 9}


def _shapes(image):
    """[(kind, colour name)] of the shapes in an image, found as connected components of
    non-white pixels and told apart by how much of their bounding box they fill."""
    pixels = np.asarray(image)
    labels, count = ndimage.label((pixels != 255).any(axis=-1))
    shapes = []
    for i, box in enumerate(ndimage.find_objects(labels), start=1):
        mask = labels[box] == i
        fill = mask.mean()
        kind = "square" if fill > 0.92 else "circle" if fill > 0.62 else "triangle"
        rgb = tuple(int(c) for c in pixels[box][mask][0])
        shapes.append((kind, next(n for n, c in COLOURS.items() if c == rgb)))
    return shapes


def _read_digit(image, level):
    pixels = np.asarray(image)
    lit = ""
    rects = digit_segment_rects(digit_box(level, None), level.image_size)
    for name, (x0, y0, x1, y1) in rects.items():
        if (pixels[(y0 + y1) // 2, (x0 + x1) // 2] != 255).any():
            lit += name
    return SEVEN_SEGMENT["".join(sorted(lit))]


@pytest.mark.parametrize("difficulty", list(DIFFICULTIES))
def test_answers_match_the_pixels(difficulty):
    level = DIFFICULTIES[difficulty]
    for index in range(48):
        item = make_item("train", index, seed=3, tasks=TASKS, difficulty=difficulty)
        assert item.image.size == (level.image_size, level.image_size)
        if item.task in ("count", "add"):
            shape = re.search(r"(?:the|many) (\w+)s", item.question)
            counted = sum(kind == shape.group(1) for kind, _ in _shapes(item.image))
            addend = re.search(r"add (\d+)", item.question)
            expected = counted + (int(addend.group(1)) if addend else 0)
            assert item.answer == str(expected), (index, item.question)
        elif item.task == "colour":
            (colour,) = [c for kind, c in _shapes(item.image) if kind == "square"]
            assert item.answer == str(list(COLOURS).index(colour) + 1)
            assert f"{colour}={item.answer}" in item.question
        elif not level.jitter:  # digits are read at their fixed place
            assert item.answer == str(_read_digit(item.image, level))


def test_every_answer_and_task_appears():
    items = [make_item("train", i, seed=0, tasks=TASKS) for i in range(200)]
    answers = {task: {it.answer for it in items if it.task == task} for task in TASKS}
    assert answers["count"] == {"1", "2", "3", "4"}
    assert answers["digit"] == {str(d) for d in range(10)}
    assert answers["colour"] == {"1", "2", "3", "4"}
    assert all(len(it.question) <= 64 for it in items)  # short prompts for a tiny model


def test_deterministic_by_seed_and_index(tmp_path):
    first = make_synthetic(tmp_path / "a", num_train=12, num_eval=4, seed=5)
    make_synthetic(tmp_path / "b", num_train=12, num_eval=4, seed=5)
    make_synthetic(tmp_path / "c", num_train=20, num_eval=4, seed=5)
    make_synthetic(tmp_path / "d", num_train=12, num_eval=4, seed=6)
    for split in ("train", "eval"):
        assert filecmp.cmp(tmp_path / "a" / f"{split}.jsonl", tmp_path / "b" / f"{split}.jsonl",
                           shallow=False)
    assert filecmp.cmp(first.eval_jsonl, tmp_path / "c" / "eval.jsonl", shallow=False)
    _, mismatch, _ = filecmp.cmpfiles(tmp_path / "a" / "images" / "train",
                                      tmp_path / "b" / "images" / "train",
                                      [f"{i:06d}.png" for i in range(12)], shallow=False)
    assert mismatch == []
    assert (tmp_path / "a" / "train.jsonl").read_text() != (tmp_path / "d" / "train.jsonl") \
        .read_text()


def test_cli_writes_a_dataset_the_loader_reads(tmp_path):
    argv = ["--output", str(tmp_path), "--num-train", "8", "--num-eval", "4", "--seed", "1",
            "--tasks", "count,add", "--difficulty", "medium"]
    assert make_synthetic_command.main(argv) == 0
    records, skipped = load_records(tmp_path / "train.jsonl", decode_images=True)
    assert skipped == {} and len(records) == 8
    assert {r.extra["task"] for r in records} == {"count", "add"}
    assert all(r.extra["difficulty"] == "medium" and r.images[0].size == (84, 84)
               for r in records)
    assert json.loads((tmp_path / "synthetic.json").read_text())["seed"] == 1
    assert len(load_records(tmp_path / "eval.jsonl")[0]) == 4
