"""Dataset record -> Example: the prompt encoded by the model family's processor and laid out as
its prompt row, with what the rewards need. The training pipeline (in grain worker processes)
and evaluation share it."""

from __future__ import annotations

import dataclasses
from typing import Any

from eureka_jax import families
from eureka_jax.data import BadRecordError, Record
from eureka_jax.errors import InputError


@dataclasses.dataclass(frozen=True)
class Example:
    """What the data pipeline yields per record: the prompt row (its family's row class) and
    what the rewards need."""

    row: Any
    record_id: str
    answer: str
    index: int  # position in the dataset: the prompt's sampling key
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)


class make_preprocess:  # noqa: N801 (a picklable function for grain worker processes)
    """Record (with decoded images) -> Example; over-budget prompts are bad records."""

    def __init__(self, processor, model_config, system_prompt: str | None,
                 max_prompt_length: int):
        self.processor = processor
        self.model_config = model_config
        self.family = families.for_config(model_config)
        self.system_prompt = system_prompt
        self.max_prompt_length = max_prompt_length

    def __call__(self, record: Record) -> Example:
        name = f"{record.location} (id {record.id})"
        try:
            encoded = self.processor.encode(
                question=record.question, images=record.images,
                system=record.system_prompt or self.system_prompt,
                max_length=self.max_prompt_length, name=name)
            row = self.family.prompt_row(encoded, self.model_config, name=name)
        except BadRecordError:
            raise
        except InputError as error:
            fix = ("raise data.length_buckets / data.patch_buckets or lower data.max_pixels "
                   "(Qwen2.5-VL) / data.max_tiles (InternVL)")
            raise BadRecordError.for_record(record, "over_budget", str(error), fix) from error
        return Example(row=row, record_id=record.id, answer=record.answer,
                       index=record.source_line, extra=dict(record.extra))
