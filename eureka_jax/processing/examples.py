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


def examples_to_bytes(examples: list[Example]) -> bytes:
    """Examples as the bytes of one .npz (no pickles): what processes exchange."""
    import json

    import numpy as np

    from eureka_jax.checkpointing import npz_bytes

    arrays = {}
    for i, example in enumerate(examples):
        arrays.update(families.row_to_arrays(example.row, f"{i}"))
        arrays.update({f"{i}/record_id": np.asarray(example.record_id),
                       f"{i}/answer": np.asarray(example.answer),
                       f"{i}/index": np.asarray(example.index),
                       f"{i}/extra": np.asarray(json.dumps(example.extra))})
    arrays["count"] = np.asarray(len(examples))
    return npz_bytes(arrays)


def examples_from_bytes(data: bytes) -> list[Example]:
    import json

    from eureka_jax.checkpointing import arrays_of_npz

    arrays = arrays_of_npz(data)
    return [Example(row=families.row_from_arrays(arrays, f"{i}"),
                    record_id=str(arrays[f"{i}/record_id"]), answer=str(arrays[f"{i}/answer"]),
                    index=int(arrays[f"{i}/index"]),
                    extra=json.loads(str(arrays[f"{i}/extra"])))
            for i in range(int(arrays["count"]))]


def gather_examples(local: list[Example], share: int | None = None) -> list[Example]:
    """The whole batch of examples on every process, from each process's share: `local` holds,
    for every chunk of the batch, this process's `share` consecutive examples of it (a pipeline
    with `chunk_share`, eureka_jax/data/pipeline.py); share None: the batch is one chunk and
    shares may differ in size. Returns the chunks in order, each with the processes' shares in
    process order: the batch one process reading everything would see. A collective that every
    process must call; one process returns `local` as it is."""
    import jax

    from eureka_jax import distributed

    if share is not None and len(local) % share:
        raise ValueError(f"{len(local)} examples are not whole shares of {share}")
    if jax.process_count() == 1:
        return list(local)
    shares = [examples_from_bytes(blob)
              for blob in distributed.gather_bytes(examples_to_bytes(local))]
    if share is None:
        return [example for process in shares for example in process]
    return [example for start in range(0, len(local), share)
            for process in shares for example in process[start:start + share]]
