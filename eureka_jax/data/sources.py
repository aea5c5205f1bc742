"""Random-access record sources: MM-Eureka jsonl, parquet tables, HF `datasets` and TFDS dirs.

`open_source(path)` picks the source by the path; `source[i]` builds the i-th `Record` or raises
`BadRecordError`. Sources parse lazily (the pipeline reads records in worker threads) and pickle
without their tables, so worker processes reopen files instead of receiving copies.

Accepted record layouts (jsonl lines and table rows alike):
- MM-Eureka qwen: {id, message, answer}; `message` is a JSON string (or list) of chat messages,
  user content a list of {"type": "image", "image": ref} / {"type": "text", "text": ...} items.
- MM-Eureka v1 (InternVL): {id, conversations, image_urls, answer}.
- plain: {id, question (or problem), image or images, answer}.
Image refs: file:// URIs, absolute paths, paths relative to the data file's directory, data: URIs
with base64 bytes, raw bytes, or HF Image structs {"bytes", "path"}. Other fields go to
`Record.extra`.

HF `datasets` directories (Dataset.save_to_disk) are read with pyarrow alone, assuming the layout
datasets 2.x-4.x writes: state.json listing "_data_files", each an Arrow IPC *stream* file
(RecordBatchStreamWriter), image columns stored as struct<bytes, path>; a DatasetDict is a
dataset_dict.json {"splits": [...]} with one such directory per split.

TFDS directories (a prepared dataset version dir holding dataset_info.json and features.json, in
array_record or parquet format, or any path given as "tfds:DIR") are read with
tensorflow-datasets' random-access data source, without TensorFlow. Image features are read
undecoded (the stored PNG/JPEG bytes); text features become str.
"""

from __future__ import annotations

import base64
import binascii
import bisect
import dataclasses
import io
import json
import os
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from eureka_jax.data.records import (
    BadRecordError,
    BadRecordPolicy,
    ImageRef,
    Record,
    load_images,
)
from eureka_jax.errors import InputError

# Fields with a meaning; everything else in a record goes to Record.extra.
_KNOWN_FIELDS = frozenset(
    {"id", "message", "conversations", "image_urls", "question", "problem", "image", "images",
     "answer"}
)
_QUESTION_FIELDS = ("message", "conversations", "question", "problem")


class RecordSource(Protocol):
    """What the pipeline needs: a length and records by index."""

    path: str

    def __len__(self) -> int: ...

    def __getitem__(self, index: int) -> Record: ...


def open_source(path: str | os.PathLike, *, split: str | None = None) -> RecordSource:
    """A source for a .jsonl file, a .parquet file, a HF datasets directory or a TFDS directory
    (`split` picks one split of a DatasetDict or TFDS directory; it may be omitted when there is
    only one)."""
    if str(path).startswith(_TFDS_PREFIX):
        return TfdsSource(str(path)[len(_TFDS_PREFIX):], split)
    path = Path(path)
    if path.is_dir() and is_tfds_dir(path):
        return TfdsSource(path, split)
    if path.is_dir():
        return ArrowDatasetSource(hf_dataset_dir(path, split))
    if not path.is_file():
        raise InputError(f"{path}: no such file or directory; check the path.")
    if path.suffix in (".jsonl", ".json"):
        return JsonlSource(path)
    if path.suffix == ".parquet":
        return ParquetSource(path)
    raise InputError(
        f"{path}: unknown data format {path.suffix!r}. Use a .jsonl file (MM-Eureka format), a "
        ".parquet file, a directory written by datasets' save_to_disk, or a TFDS directory."
    )


def load_records(
    path: str | os.PathLike,
    *,
    split: str | None = None,
    skip_bad_records: bool = False,
    decode_images: bool = False,
) -> tuple[list[Record], dict[str, int]]:
    """All good records of a file, and the skip counts by reason. `decode_images` also checks
    that every image decodes (slower; the pipeline does this lazily anyway)."""
    policy = BadRecordPolicy(skip_bad_records)
    records = list(iter_records(open_source(path, split=split), policy, decode_images))
    return records, dict(policy.skipped)


def iter_records(
    source: RecordSource, policy: BadRecordPolicy, decode_images: bool = False
) -> Iterator[Record]:
    """Good records in order; bad ones go to `policy` (raise, or log and count)."""
    for index in range(len(source)):
        try:
            record = source[index]
            if decode_images:
                record = dataclasses.replace(record, images=load_images(record))
        except BadRecordError as error:
            policy.handle(error)
            continue
        yield record


# ----------------------------------------------------------------------------- jsonl


class JsonlSource:
    """One record per non-blank line; image paths resolve against the file's directory."""

    def __init__(self, path: str | os.PathLike):
        self.path = str(path)
        with open(self.path, encoding="utf-8") as f:
            self._lines = [(n, line) for n, line in enumerate(f, start=1) if line.strip()]

    def __len__(self) -> int:
        return len(self._lines)

    def __getitem__(self, index: int) -> Record:
        line_number, line = self._lines[index]
        try:
            fields = json.loads(line)
        except json.JSONDecodeError as e:
            fields = e
        if not isinstance(fields, dict):
            raise BadRecordError(
                "bad_json", f"the line is not a JSON object ({fields})",
                "Each line must be one JSON object.", self.path, line_number, None,
            )
        return record_from_fields(
            fields, base_dir=os.path.dirname(os.path.abspath(self.path)),
            source_file=self.path, source_line=line_number,
        )


# ----------------------------------------------------------------------------- tables


class _TableSource:
    """Rows of one or more Arrow tables, opened lazily (and again in each worker process)."""

    def __init__(self, path: str, files: list[str]):
        self.path = path
        self._files = files
        self._tables: list[pa.Table] | None = None
        self._starts = [0]
        for table in self._open():
            _check_columns(table.column_names, path)
            self._starts.append(self._starts[-1] + table.num_rows)

    def _read(self, file: str) -> pa.Table:
        raise NotImplementedError

    def _open(self) -> list[pa.Table]:
        if self._tables is None:
            self._tables = [self._read(f) for f in self._files]
        return self._tables

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_tables": None}

    def __len__(self) -> int:
        return self._starts[-1]

    def __getitem__(self, index: int) -> Record:
        if not 0 <= index < len(self):
            raise IndexError(index)
        file_index = bisect.bisect_right(self._starts, index) - 1
        row = index - self._starts[file_index]
        fields = self._open()[file_index].slice(row, 1).to_pylist()[0]
        file = self._files[file_index]
        return record_from_fields(
            fields, base_dir=os.path.dirname(os.path.abspath(file)),
            source_file=file, source_line=row + 1,
        )


class ParquetSource(_TableSource):
    """An MMK12-style parquet file: question, image (bytes or {bytes, path}), answer, id."""

    def __init__(self, path: str | os.PathLike):
        super().__init__(str(path), [str(path)])

    def _read(self, file: str) -> pa.Table:
        return pq.read_table(file, memory_map=True)


class ArrowDatasetSource(_TableSource):
    """One split directory written by HF datasets' save_to_disk (see the module docstring)."""

    def __init__(self, directory: str | os.PathLike):
        directory = Path(directory)
        files = [str(directory / name) for name in _arrow_files(directory)]
        super().__init__(str(directory), files)

    def _read(self, file: str) -> pa.Table:
        source = pa.memory_map(file)
        try:
            return pa.ipc.open_stream(source).read_all()
        except pa.ArrowInvalid:
            # Not the stream format datasets writes; accept the random-access file format too.
            return pa.ipc.open_file(pa.memory_map(file)).read_all()


def hf_dataset_dir(directory: Path, split: str | None) -> Path:
    """The directory of one saved Dataset: `directory` itself, or its `split` subdirectory when
    it holds a saved DatasetDict."""
    if (directory / "state.json").is_file():
        return directory
    dict_file = directory / "dataset_dict.json"
    if not dict_file.is_file():
        raise InputError(
            f"{directory}: not a saved HF dataset (no state.json or dataset_dict.json). Pass a "
            ".jsonl or .parquet file, or a directory written by Dataset.save_to_disk."
        )
    splits = json.loads(dict_file.read_text())["splits"]
    if split is None and len(splits) == 1:
        split = splits[0]
    if split not in splits:
        raise InputError(
            f"{directory}: a DatasetDict with splits {splits}; choose one with split=NAME "
            f"(--split NAME){'' if split is None else f', not {split!r}'}."
        )
    return directory / split


def hf_dataset_splits(directory: Path) -> list[str] | None:
    """The splits of a saved DatasetDict directory, or None for a single saved Dataset."""
    dict_file = directory / "dataset_dict.json"
    return json.loads(dict_file.read_text())["splits"] if dict_file.is_file() else None


def _arrow_files(directory: Path) -> list[str]:
    state = json.loads((directory / "state.json").read_text())
    names = [entry["filename"] for entry in state.get("_data_files", [])]
    names = names or sorted(p.name for p in directory.glob("data-*.arrow"))
    if not names:
        raise InputError(f"{directory}: state.json lists no data files and no data-*.arrow exist.")
    return names


def _check_columns(columns: list[str], path: str) -> None:
    if "answer" not in columns or not any(c in columns for c in _QUESTION_FIELDS):
        raise InputError(
            f"{path}: columns {columns} lack 'answer' or a question column (one of "
            f"{list(_QUESTION_FIELDS)}). Rename the columns."
        )


# ----------------------------------------------------------------------------- tfds

_TFDS_PREFIX = "tfds:"


def is_tfds_dir(directory: Path) -> bool:
    """Whether `directory` is a prepared TFDS dataset version directory."""
    return (directory / "dataset_info.json").is_file() and (directory / "features.json").is_file()


def _import_tfds():
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise InputError(
            f"reading a TFDS dataset needs tensorflow-datasets ({e}); install it with "
            "`pip install tensorflow-datasets` (TensorFlow itself is not needed)."
        ) from e
    return tfds


class TfdsSource:
    """One split of a TFDS dataset directory (array_record or parquet files), read through
    `tfds.builder_from_directory(dir).as_data_source(split)`; opened lazily in each process."""

    def __init__(self, directory: str | os.PathLike, split: str | None = None):
        directory = Path(directory)
        if not is_tfds_dir(directory):
            raise InputError(
                f"{directory}: not a TFDS dataset directory (no dataset_info.json and "
                "features.json). Pass the prepared version directory, e.g. DATA_DIR/NAME/1.0.0."
            )
        self.path = str(directory)
        builder = self._builder()
        splits = sorted(builder.info.splits)
        if split is None and len(splits) == 1:
            split = splits[0]
        if split is None or split.partition("[")[0] not in splits:
            raise InputError(
                f"{directory}: a TFDS dataset with splits {splits}; choose one with split=NAME "
                f"(--split NAME){'' if split is None else f', not {split!r}'}."
            )
        self.split = split
        features = builder.info.features
        self._text_fields = frozenset(
            k for k, f in features.items() if type(f).__name__ == "Text"
        )
        self._image_fields = frozenset(
            k for k, f in features.items() if type(f).__name__ == "Image"
        )
        self._data = None
        self._length = len(self._open())

    def _builder(self):
        tfds = _import_tfds()
        try:
            return tfds.builder_from_directory(self.path)
        except Exception as e:  # noqa: BLE001 - tfds raises many kinds; report them alike
            raise InputError(f"{self.path}: cannot open the TFDS dataset ({e}).") from e

    def _open(self):
        if self._data is None:
            tfds = _import_tfds()
            builder = self._builder()
            decoders = {name: tfds.decode.SkipDecoding() for name in self._image_fields}
            try:
                self._data = builder.as_data_source(self.split, decoders=decoders)
            except Exception as e:  # noqa: BLE001
                raise InputError(
                    f"{self.path}: cannot read split {self.split!r} ({e}). TFDS random access "
                    "needs the array_record or parquet file format."
                ) from e
        return self._data

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_data": None}

    def __len__(self) -> int:
        return self._length

    def __getitem__(self, index: int) -> Record:
        if not 0 <= index < len(self):
            raise IndexError(index)
        example = self._open()[index]
        fields = {name: self._field(name, value) for name, value in example.items()}
        return record_from_fields(
            fields, base_dir=self.path, source_file=f"{self.path}[{self.split}]",
            source_line=index + 1,
        )

    def _field(self, name: str, value):
        if name in self._text_fields and isinstance(value, bytes):
            return value.decode("utf-8", errors="replace")
        if isinstance(value, np.ndarray):
            if value.dtype == np.uint8 and value.ndim in (3, 4):  # decoded image(s)
                return _png_bytes(value) if value.ndim == 3 else [_png_bytes(v) for v in value]
            if value.dtype == object:  # a sequence of encoded images or strings
                return [self._field(name, v) for v in value]
            return value.tolist()
        if isinstance(value, np.generic):
            return value.item()
        return value


def _png_bytes(array) -> bytes:
    from PIL import Image

    if array.shape[-1] == 1:
        array = array[..., 0]
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


# ----------------------------------------------------------------------------- one record


def record_from_fields(
    fields: dict[str, Any], *, base_dir: str, source_file: str, source_line: int
) -> Record:
    """Builds a Record from one jsonl object or table row (any layout in the module docstring)."""
    record_id = fields.get("id")
    record_id = f"{Path(source_file).stem}-{source_line}" if record_id is None else str(record_id)

    def bad(reason: str, problem: str, fix: str) -> BadRecordError:
        return BadRecordError(reason, problem, fix, source_file, source_line, record_id)

    system_prompt = None
    if "message" in fields or "conversations" in fields:
        key = "message" if "message" in fields else "conversations"
        messages = fields[key]
        if isinstance(messages, str):
            try:
                messages = json.loads(messages)
            except json.JSONDecodeError as e:
                raise bad("bad_message", f"{key!r} is not valid JSON ({e})",
                          f"Store the chat messages as a JSON list in {key!r}.") from e
        system_prompt, question, image_refs = _parse_messages(messages, key, bad)
        image_refs += _as_list(fields.get("image_urls"))
    else:
        question = fields.get("question", fields.get("problem"))
        if question is not None and not isinstance(question, str):
            raise bad("empty_question", "'question' is not a string", "Store the question text.")
        image_refs = _as_list(fields.get("images", fields.get("image")))

    if not question or not question.strip():
        raise bad("empty_question", "the question text is empty", "Add the question text.")
    answer = fields.get("answer")
    if isinstance(answer, (int, float)) and not isinstance(answer, bool):
        answer = str(answer)
    if not isinstance(answer, str) or not answer.strip():
        raise bad("missing_answer", f"the answer is missing or empty ({answer!r})",
                  "Add the gold answer as a string, e.g. \"answer\": \"3\".")
    images = [_resolve_image(ref, base_dir, bad) for ref in image_refs]
    return Record(
        id=record_id,
        question=question.strip(),
        images=images,
        answer=answer.strip(),
        system_prompt=system_prompt,
        source_file=source_file,
        source_line=source_line,
        extra={k: v for k, v in fields.items() if k not in _KNOWN_FIELDS},
    )


def _parse_messages(messages, key: str, bad) -> tuple[str | None, str, list]:
    """(system prompt, question text, image refs) from OpenAI/Qwen-style chat messages."""
    fix = (f"{key!r} must be a list of chat messages with one user turn, e.g. [{{\"role\": "
           "\"user\", \"content\": [{\"type\": \"image\", \"image\": \"file:///a.png\"}, "
           "{\"type\": \"text\", \"text\": \"...\"}]}].")
    if not isinstance(messages, list) or not all(isinstance(m, dict) for m in messages):
        raise bad("bad_message", f"{key!r} is not a list of message objects", fix)
    system = [m for m in messages if m.get("role") == "system"]
    users = [m for m in messages if m.get("role") == "user"]
    others = [m.get("role") for m in messages if m.get("role") not in ("system", "user")]
    if len(users) != 1 or len(system) > 1 or others:
        roles = [m.get("role") for m in messages]
        raise bad("bad_message", f"{key!r} has roles {roles}; expected one user turn and at most "
                  "one system turn", fix)
    system_texts, system_images = _parse_content(system[0].get("content"), bad, fix) if system \
        else ([], [])
    texts, images = _parse_content(users[0].get("content"), bad, fix)
    if system_images:
        raise bad("bad_message", "the system message contains an image", fix)
    system_prompt = "\n".join(system_texts) if system else None
    return system_prompt, "\n".join(texts), images


def _parse_content(content, bad, fix) -> tuple[list[str], list]:
    if isinstance(content, str):
        return [content], []
    if not isinstance(content, list):
        raise bad("bad_message", f"message content is {type(content).__name__}, not text or a "
                  "list of items", fix)
    texts, images = [], []
    for item in content:
        kind = item.get("type") if isinstance(item, dict) else None
        if kind == "text":
            texts.append(item.get("text") or "")
        elif kind == "image":
            images.append(item.get("image"))
        elif kind == "image_url":
            url = item.get("image_url")
            images.append(url.get("url") if isinstance(url, dict) else url)
        else:
            raise bad("bad_message", f"unsupported content item {item!r}", fix)
    return texts, images


def _as_list(value) -> list:
    if value is None:
        return []
    return list(value) if isinstance(value, (list, tuple)) else [value]


def _resolve_image(ref, base_dir: str, bad) -> ImageRef:
    """An absolute path (checked to exist) or encoded bytes."""
    if isinstance(ref, dict):  # HF Image struct: embedded bytes win over the original path
        ref = ref.get("bytes") or ref.get("path")
    if isinstance(ref, (bytes, bytearray)):
        return bytes(ref)
    if not isinstance(ref, str) or not ref:
        raise bad("bad_image", f"image reference {ref!r} is not a path, URI or bytes",
                  "Give each image as a file path or file:// URI.")
    if ref.startswith("data:"):
        try:
            return base64.b64decode(ref.partition(",")[2], validate=True)
        except binascii.Error as e:
            raise bad("bad_image", f"image data URI is not valid base64 ({e})",
                      "Re-encode the image.") from e
    if ref.startswith(("http://", "https://")):
        raise bad("bad_image", f"remote image {ref} is not supported",
                  "Download the images and refer to local files.")
    # file:///abs/a.png -> /abs/a.png; file://images/a.png (relative, as some data sets write it)
    # -> images/a.png, resolved against the data file's directory like a plain relative path.
    path = urllib.parse.unquote(ref[len("file://"):]) if ref.startswith("file://") else ref
    path = os.path.normpath(os.path.join(base_dir, os.path.expanduser(path)))
    if not os.path.isfile(path):
        raise bad("missing_image", f"image {ref!r} not found (looked for {path})",
                  "Fix the path (relative paths are relative to the data file's directory) or add "
                  "the missing file.")
    return path
