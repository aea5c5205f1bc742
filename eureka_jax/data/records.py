"""The record every source yields, the bad-record error and policy, and image decoding.

A `Record` is one prompt: question text, images, gold answer. Sources (sources.py) build records
from jsonl / parquet / HF datasets directories; the pipeline (pipeline.py) decodes the images and
hands the record to the preprocessing function.

Bad input never disappears silently: a source raises `BadRecordError` (an InputError naming the
file, line and record id), and `BadRecordPolicy` either re-raises it or, when skipping was asked
for, logs it and counts it under a stable reason key (for metrics).
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from typing import Any

from PIL import Image

from eureka_jax.errors import InputError
from eureka_jax.processing.image import load_image, to_rgb

log = logging.getLogger(__name__)

# The 7B system prompt of the MM-Eureka qwen branch. Their Python source escapes the backslash
# twice, so their prompt literally contains "\\boxed"; we use a single backslash, which is what the
# prompt means and how the model is asked to answer.
MMEUREKA_SYSTEM_PROMPT = (
    "Solve the question. The user asks a question, and you solves it. You first thinks about the "
    "reasoning process in the mind and then provides the user with the answer. The answer is in "
    "latex format and wrapped in $...$. The final answer must be wrapped using the \\boxed{} "
    "command. The reasoning process and answer are enclosed within <think> </think> and <answer> "
    "</answer> tags, respectively, i.e., <think> Since $1+1=2$, so the answer is $2$. </think>"
    "<answer> The answer is $\\boxed{2}$ </answer>, which means assistant's output should start "
    "with <think> and end with </answer>."
)

# An image as a source gives it (absolute path or encoded bytes), or decoded by the pipeline.
ImageRef = str | bytes | Image.Image

# Reason keys for skip counts (metric names use them). Sources use these; preprocessing may raise
# BadRecordError with its own reason (e.g. a prompt longer than the largest bucket).
BAD_RECORD_REASONS = (
    "bad_json",  # the line is not a JSON object
    "bad_message",  # chat messages unparseable, no user turn, unsupported content
    "empty_question",
    "missing_answer",
    "missing_image",  # image file not found
    "bad_image",  # image cannot be decoded, or an unsupported reference (URL)
    "over_budget",  # prompt tokens or image patches exceed the configured buckets
)


@dataclasses.dataclass(frozen=True)
class Record:
    """One prompt with its gold answer.

    images: absolute file paths or encoded bytes as sources give them; the pipeline replaces them
      with decoded RGB PIL images before calling the preprocessing function.
    system_prompt: the record's own system message, or None to use the run's default.
    source_file, source_line: where the record came from, for error messages. source_line is the
      1-based line of a jsonl file, or the 1-based row of a parquet / arrow table.
    extra: every other field of the input (e.g. subject, task), passed through unchanged.
    """

    id: str
    question: str
    images: list[ImageRef]
    answer: str
    system_prompt: str | None = None
    source_file: str = ""
    source_line: int = 0
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def location(self) -> str:
        return format_location(self.source_file, self.source_line)


def format_location(source_file: str, source_line: int) -> str:
    """'data.jsonl:12' for text files, 'data.parquet row 12' for tables."""
    if source_file.endswith((".jsonl", ".json")):
        return f"{source_file}:{source_line}"
    return f"{source_file} row {source_line}"


class BadRecordError(InputError):
    """One bad record; `reason` is a short key such as those in BAD_RECORD_REASONS."""

    def __init__(
        self, reason: str, problem: str, fix: str, source_file: str, source_line: int, record_id
    ):
        self.reason = reason
        self.problem = problem
        self.fix = fix
        self.source_file = source_file
        self.source_line = source_line
        self.record_id = record_id
        where = format_location(source_file, source_line)
        name = "id unknown" if record_id is None else f"id {record_id!r}"
        super().__init__(
            f"{where} (record {name}): {problem}. {fix} "
            "To skip such records instead (they are counted and logged), set skip_bad_records=True."
        )

    def __reduce__(self):  # worker processes send the error to the main process pickled
        args = (self.reason, self.problem, self.fix, self.source_file, self.source_line,
                self.record_id)
        return type(self), args

    @classmethod
    def for_record(cls, record: Record, reason: str, problem: str, fix: str) -> BadRecordError:
        return cls(reason, problem, fix, record.source_file, record.source_line, record.id)


class BadRecordPolicy:
    """Raise on a bad record, or skip it: log it and count it by reason."""

    def __init__(self, skip_bad_records: bool):
        self.skip_bad_records = skip_bad_records
        self.skipped: collections.Counter[str] = collections.Counter()

    def handle(self, error: BadRecordError) -> None:
        if not self.skip_bad_records:
            raise error
        self.skipped[error.reason] += 1
        log.warning("skipping bad record: %s", error)


def load_images(record: Record) -> list[Image.Image]:
    """Decodes the record's images to RGB; raises BadRecordError for missing or corrupt ones."""
    return [_load_image(record, image, i) for i, image in enumerate(record.images)]


def _load_image(record: Record, image: ImageRef, index: int) -> Image.Image:
    # Decoding (EXIF orientation, transparency onto white) is processing's, so that what the
    # pipeline validates is exactly what the model sees.
    if isinstance(image, Image.Image):
        return to_rgb(image)
    what = f"image {index}" + (f" ({image})" if isinstance(image, str) else " (embedded bytes)")
    if isinstance(image, str) and not os.path.isfile(image):
        raise BadRecordError.for_record(
            record, "missing_image", f"{what} not found", "Fix the path or add the file."
        )
    try:
        return to_rgb(load_image(image, name=what))
    except InputError as e:
        cause = e.__cause__ or e
        raise BadRecordError.for_record(
            record, "bad_image", f"{what} cannot be decoded ({type(cause).__name__}: {cause})",
            "Replace the image (PNG or JPEG).",
        ) from e
