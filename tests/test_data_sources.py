"""Record sources (jsonl, parquet, HF datasets directory), bad-record policy, converter."""

import io
import json
import logging
import pickle

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from eureka_jax.commands import convert as convert_command
from eureka_jax.data import (
    BadRecordError,
    convert,
    load_images,
    load_records,
    open_source,
)
from eureka_jax.errors import InputError


def _png(path, colour=(10, 200, 30), size=(8, 6)):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)
    return path


def _png_bytes(colour, size=(8, 6)):
    buffer = io.BytesIO()
    Image.new("RGB", size, colour).save(buffer, format="PNG")
    return buffer.getvalue()


def _message(images, text, system=None):
    messages = [{"role": "system", "content": system}] if system else []
    content = [{"type": "image", "image": ref} for ref in images]
    messages.append({"role": "user", "content": content + [{"type": "text", "text": text}]})
    return json.dumps(messages)


def _write_jsonl(path, objects):
    path.write_text("".join(json.dumps(o) + "\n" for o in objects))
    return path


# ----------------------------------------------------------------------------- jsonl


def test_jsonl_mmeureka_image_refs_resolve(tmp_path):
    absolute = _png(tmp_path / "abs" / "a.png")
    _png(tmp_path / "data" / "images" / "b.png")
    jsonl = _write_jsonl(tmp_path / "data" / "train.jsonl", [
        {"id": "r1", "message": _message([f"file://{absolute}"], "Q1?", system="Be brief."),
         "answer": "3", "subject": "geometry"},
        {"id": "r2", "message": _message(["images/b.png"], "Q2?"), "answer": 4},
        {"id": "r3", "message": _message(["file://images/b.png", str(absolute)], "Q3?"),
         "answer": "x"},
    ])
    records, skipped = load_records(jsonl)
    assert skipped == {}
    r1, r2, r3 = records
    assert (r1.id, r1.question, r1.answer, r1.system_prompt) == ("r1", "Q1?", "3", "Be brief.")
    assert r1.images == [str(absolute)] and r1.extra == {"subject": "geometry"}
    relative = str(tmp_path / "data" / "images" / "b.png")
    assert r2.images == [relative] and r2.answer == "4" and r2.system_prompt is None
    assert r3.images == [relative, str(absolute)]
    assert (r3.source_file, r3.source_line) == (str(jsonl), 3)
    assert load_images(r3)[0].mode == "RGB"


def test_jsonl_plain_and_v1_layouts(tmp_path):
    _png(tmp_path / "a.png")
    _png(tmp_path / "b.png")
    jsonl = _write_jsonl(tmp_path / "d.jsonl", [
        {"id": 7, "question": "How many?", "image": "a.png", "answer": "2"},
        {"question": "Which?", "images": ["a.png", "b.png"], "answer": "B"},
        {"id": "v1", "conversations": [{"role": "system", "content": "sys"},
                                       {"role": "user", "content": "Solve it."}],
         "image_urls": ["file://a.png"], "answer": "1"},
    ])
    plain, plain_multi, v1 = load_records(jsonl)[0]
    assert plain.id == "7" and plain.images == [str(tmp_path / "a.png")]
    assert plain_multi.id == "d-2" and len(plain_multi.images) == 2  # id from the line number
    assert (v1.question, v1.system_prompt, v1.images) == ("Solve it.", "sys",
                                                         [str(tmp_path / "a.png")])


def test_missing_image_error_names_file_line_and_id(tmp_path, caplog):
    _png(tmp_path / "ok.png")
    jsonl = _write_jsonl(tmp_path / "train.jsonl", [
        {"id": "good", "message": _message(["ok.png"], "Q?"), "answer": "1"},
        {"id": "lost-42", "message": _message(["file://gone/missing.png"], "Q?"), "answer": "1"},
    ])
    with pytest.raises(InputError) as info:
        load_records(jsonl)
    message = str(info.value)
    assert f"{jsonl}:2" in message and "lost-42" in message and "missing.png" in message
    assert "skip_bad_records" in message  # says what to do
    assert info.value.reason == "missing_image"
    assert str(pickle.loads(pickle.dumps(info.value))) == message  # crosses worker processes

    with caplog.at_level(logging.WARNING):
        records, skipped = load_records(jsonl, skip_bad_records=True)
    assert [r.id for r in records] == ["good"] and skipped == {"missing_image": 1}
    assert "lost-42" in caplog.text  # skipped records are logged, never silently dropped


@pytest.mark.parametrize("line, reason", [
    ("{not json", "bad_json"),
    ('{"id": "m", "message": "[{\\"role\\": ", "answer": "1"}', "bad_message"),
    (json.dumps({"id": "m", "message": json.dumps([{"role": "system", "content": "s"}]),
                 "answer": "1"}), "bad_message"),
    (json.dumps({"id": "m", "message": _message([], "   "), "answer": "1"}), "empty_question"),
    (json.dumps({"id": "m", "message": _message([], "Q?")}), "missing_answer"),
    (json.dumps({"id": "m", "question": "Q?", "answer": ""}), "missing_answer"),
    (json.dumps({"id": "m", "question": "Q?", "image": "http://x/a.png", "answer": "1"}),
     "bad_image"),
])
def test_bad_records_raise_or_are_counted(tmp_path, line, reason):
    jsonl = tmp_path / "bad.jsonl"
    jsonl.write_text(json.dumps({"id": "fine", "question": "Q?", "answer": "1"}) + "\n\n" + line)
    with pytest.raises(BadRecordError) as info:
        load_records(jsonl)
    assert info.value.reason == reason
    assert f"{jsonl}:3" in str(info.value)  # the blank line 2 still counts as a line
    records, skipped = load_records(jsonl, skip_bad_records=True)
    assert [r.id for r in records] == ["fine"] and skipped == {reason: 1}


def test_corrupt_image_fails_on_decode(tmp_path):
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    jsonl = _write_jsonl(tmp_path / "d.jsonl", [
        {"id": "c", "question": "Q?", "image": "broken.png", "answer": "1"}])
    (record,), _ = load_records(jsonl)  # the file exists: structure is fine
    with pytest.raises(BadRecordError, match=r"d\.jsonl:1 .*'c'.*cannot be decoded") as info:
        load_images(record)
    assert info.value.reason == "bad_image"
    assert load_records(jsonl, skip_bad_records=True, decode_images=True)[1] == {"bad_image": 1}


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "t.png")
    jsonl = _write_jsonl(tmp_path / "d.jsonl", [
        {"id": "t", "question": "Q?", "image": "t.png", "answer": "1"}])
    (record,), _ = load_records(jsonl)
    assert load_images(record)[0].getpixel((0, 0)) == (255, 255, 255)


# ----------------------------------------------------------------------------- tables


def _mmk12_table(image_as_struct: bool) -> pa.Table:
    images = [_png_bytes((255, 0, 0)), _png_bytes((0, 0, 255)), _png_bytes((0, 255, 0))]
    image_column = (pa.array([{"bytes": b, "path": None} for b in images],
                             pa.struct([("bytes", pa.binary()), ("path", pa.string())]))
                    if image_as_struct else pa.array(images, pa.binary()))
    return pa.table({
        "id": ["k0", "k1", "k2"],
        "question": ["What is 1+1?", "Area?", "Angle?"],
        "image": image_column,
        "answer": ["2", "\\frac{1}{2}", "30"],
        "subject": ["math", "math", "geometry"],
    })


@pytest.mark.parametrize("image_as_struct", [False, True])
def test_parquet_source(tmp_path, image_as_struct):
    path = tmp_path / "mmk12.parquet"
    pq.write_table(_mmk12_table(image_as_struct), path)
    source = open_source(path)
    assert len(source) == 3
    record = source[1]
    assert (record.id, record.question, record.answer) == ("k1", "Area?", "\\frac{1}{2}")
    assert record.extra == {"subject": "math"} and record.location == f"{path} row 2"
    assert load_images(record)[0].getpixel((0, 0)) == (0, 0, 255)


def test_table_sources_pickle_without_their_tables(tmp_path):
    # Worker processes receive the source pickled; they must reopen the file, not get a copy.
    table = _mmk12_table(image_as_struct=False).append_column("notes", pa.array(["x" * 20_000] * 3))
    pq.write_table(table, tmp_path / "t.parquet")
    source = open_source(tmp_path / "t.parquet")
    source[0]
    payload = pickle.dumps(source)
    assert len(payload) < 2_000
    assert pickle.loads(payload)[2].id == "k2"


def test_parquet_without_required_columns_is_an_input_error(tmp_path):
    path = tmp_path / "odd.parquet"
    pq.write_table(pa.table({"prompt": ["q"], "label": ["a"]}), path)
    with pytest.raises(InputError, match="lack 'answer'"):
        open_source(path)


def write_hf_dataset(directory, table: pa.Table, rows_per_file: int):
    """What datasets' Dataset.save_to_disk writes, without the datasets library: Arrow IPC stream
    files, dataset_info.json with the features, state.json listing the files."""
    directory.mkdir(parents=True)
    features = {"id": {"dtype": "string", "_type": "Value"},
                "question": {"dtype": "string", "_type": "Value"},
                "image": {"_type": "Image"},
                "answer": {"dtype": "string", "_type": "Value"},
                "subject": {"dtype": "string", "_type": "Value"}}
    schema = table.schema.with_metadata(
        {"huggingface": json.dumps({"info": {"features": features}})})
    starts = range(0, table.num_rows, rows_per_file)
    names = [f"data-{i:05d}-of-{len(starts):05d}.arrow" for i in range(len(starts))]
    for name, start in zip(names, starts, strict=True):
        with pa.OSFile(str(directory / name), "wb") as sink, pa.ipc.new_stream(sink, schema) as w:
            w.write_table(table.slice(start, rows_per_file).cast(schema))
    (directory / "dataset_info.json").write_text(json.dumps({"features": features}))
    (directory / "state.json").write_text(json.dumps({
        "_data_files": [{"filename": n} for n in names], "_fingerprint": "0", "_format_columns":
        None, "_format_kwargs": {}, "_format_type": None, "_output_all_columns": False,
        "_split": None}))


def test_hf_dataset_directory(tmp_path):
    write_hf_dataset(tmp_path / "ds", _mmk12_table(image_as_struct=True), rows_per_file=2)
    source = open_source(tmp_path / "ds")
    assert [source[i].id for i in range(len(source))] == ["k0", "k1", "k2"]
    last = source[2]  # first row of the second arrow file
    assert last.location == f"{tmp_path / 'ds' / 'data-00001-of-00002.arrow'} row 1"
    assert load_images(last)[0].getpixel((0, 0)) == (0, 255, 0)


def test_hf_dataset_dict_needs_a_split(tmp_path):
    for split in ("train", "test"):
        write_hf_dataset(tmp_path / "dd" / split, _mmk12_table(True), rows_per_file=3)
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(InputError, match=r"splits \['train', 'test'\]"):
        open_source(tmp_path / "dd")
    assert len(open_source(tmp_path / "dd", split="test")) == 3


# ----------------------------------------------------------------------------- convert


def test_parquet_round_trip_through_convert(tmp_path):
    table = _mmk12_table(image_as_struct=True)
    pq.write_table(table, tmp_path / "mmk12.parquet")
    out = tmp_path / "out"
    assert convert_command.main(["--input", str(tmp_path / "mmk12.parquet"),
                                 "--output", str(out)]) == 0
    records, skipped = load_records(out / "mmk12.jsonl", decode_images=True)
    assert skipped == {}
    originals = table.to_pylist()
    assert [r.id for r in records] == [o["id"] for o in originals]
    for record, original in zip(records, originals, strict=True):
        assert (record.question, record.answer) == (original["question"], original["answer"])
        assert record.extra == {"subject": original["subject"]}
        expected = Image.open(io.BytesIO(original["image"]["bytes"])).convert("RGB")
        np.testing.assert_array_equal(np.asarray(record.images[0]), np.asarray(expected))
    line = json.loads((out / "mmk12.jsonl").read_text().splitlines()[0])
    assert json.loads(line["message"])[0]["content"][0] == {
        "type": "image", "image": "images/mmk12/000000_0.png"}


def test_convert_dataset_dict_all_splits_absolute_paths_and_bad_rows(tmp_path):
    table = _mmk12_table(True)
    broken = table.set_column(3, "answer", pa.array(["2", "", "30"]))
    write_hf_dataset(tmp_path / "dd" / "train", broken, rows_per_file=3)
    write_hf_dataset(tmp_path / "dd" / "test", table, rows_per_file=3)
    (tmp_path / "dd" / "dataset_dict.json").write_text(json.dumps({"splits": ["train", "test"]}))
    with pytest.raises(BadRecordError, match="'k1'"):
        convert(tmp_path / "dd", tmp_path / "out")
    report = convert(tmp_path / "dd", tmp_path / "out", skip_bad_records=True, absolute_paths=True)
    assert report.outputs == {str(tmp_path / "out" / "train.jsonl"): 2,
                              str(tmp_path / "out" / "test.jsonl"): 3}
    assert report.skipped == {"missing_answer": 1}
    line = json.loads((tmp_path / "out" / "test.jsonl").read_text().splitlines()[0])
    assert json.loads(line["message"])[0]["content"][0]["image"].startswith("file:///")
    assert len(load_records(tmp_path / "out" / "test.jsonl", decode_images=True)[0]) == 3
