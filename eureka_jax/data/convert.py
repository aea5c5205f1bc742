"""Convert any readable source (MMK12-style parquet, HF datasets directory, jsonl) to MM-Eureka
jsonl with PNG image files.

    out_dir/NAME.jsonl              {"id", "message": "<JSON chat messages>", "answer", ...extra}
    out_dir/images/NAME/000012_0.png

NAME is the split (for a saved DatasetDict every split is converted unless one is chosen), else
the input's file or directory name. Image paths in the jsonl are relative to out_dir, so the
directory can be moved; `absolute_paths` writes file:///abs URIs instead, which the original
MM-Eureka trainer (which opens paths relative to its working directory) also accepts. Every image
is decoded on the way, so the output holds no missing or corrupt image.
"""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import json
import os
from pathlib import Path

from eureka_jax.data.records import BadRecordPolicy, Record
from eureka_jax.data.sources import hf_dataset_splits, iter_records, open_source


@dataclasses.dataclass(frozen=True)
class ConvertReport:
    outputs: dict[str, int]  # jsonl path -> records written
    skipped: dict[str, int]  # bad-record reason -> count (all outputs together)


def convert(
    input_path: str | os.PathLike,
    output_dir: str | os.PathLike,
    *,
    split: str | None = None,
    skip_bad_records: bool = False,
    absolute_paths: bool = False,
) -> ConvertReport:
    input_path, output_dir = Path(input_path), Path(output_dir)
    if input_path.is_dir() and split is None:
        splits = hf_dataset_splits(input_path) or [None]
    else:
        splits = [split]
    policy = BadRecordPolicy(skip_bad_records)
    outputs = {}
    for name in splits:
        source = open_source(input_path, split=name)
        out_name = name or (input_path.stem if input_path.is_file() else input_path.name)
        records = iter_records(source, policy, decode_images=True)
        jsonl = output_dir / f"{out_name}.jsonl"
        outputs[str(jsonl)] = _write_jsonl(records, jsonl, out_name, absolute_paths)
    return ConvertReport(outputs, dict(policy.skipped))


def _write_jsonl(records, jsonl: Path, name: str, absolute_paths: bool) -> int:
    image_dir = jsonl.parent / "images" / name
    image_dir.mkdir(parents=True, exist_ok=True)
    tmp = jsonl.with_suffix(".jsonl.tmp")
    written = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for index, record in enumerate(records):
            refs = []
            for k, image in enumerate(record.images):
                relative = f"images/{name}/{index:06d}_{k}.png"
                image.save(jsonl.parent / relative)
                refs.append((jsonl.parent / relative).resolve().as_uri() if absolute_paths
                            else relative)
            f.write(json.dumps(to_mmeureka_line(record, refs), ensure_ascii=False) + "\n")
            written += 1
    tmp.replace(jsonl)
    return written


def to_mmeureka_line(record: Record, image_refs: list[str]) -> dict:
    """The MM-Eureka jsonl object for a record whose images are stored at `image_refs`."""
    messages = []
    if record.system_prompt is not None:
        messages.append({"role": "system", "content": record.system_prompt})
    content = [{"type": "image", "image": ref} for ref in image_refs]
    content.append({"type": "text", "text": record.question})
    messages.append({"role": "user", "content": content})
    extra = {k: _jsonable(v) for k, v in record.extra.items() if not _is_binary(v)}
    message = json.dumps(messages, ensure_ascii=False)
    return {"id": record.id, "message": message, "answer": record.answer, **extra}


def _is_binary(value) -> bool:
    # Binary extra columns (e.g. a second image column) are not text; they are left out.
    return isinstance(value, (bytes, bytearray))


def _jsonable(value):
    if isinstance(value, (datetime.date, datetime.time, decimal.Decimal)):
        return str(value)
    if isinstance(value, dict):
        return {k: _jsonable(v) for k, v in value.items() if not _is_binary(v)}
    if isinstance(value, list):
        return [_jsonable(v) for v in value if not _is_binary(v)]
    return value
