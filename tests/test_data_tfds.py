"""TfdsSource: a TFDS dataset directory written and read without TensorFlow."""

import io
import pickle
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from eureka_jax.data import load_images, load_records, open_source
from eureka_jax.data.sources import _png_bytes
from eureka_jax.errors import InputError

tfds = pytest.importorskip("tensorflow_datasets")

_COLOURS = {"r0": (200, 0, 0), "r1": (0, 200, 0), "r2": (0, 0, 200)}


class _Tiny(tfds.core.GeneratorBasedBuilder):
    VERSION = tfds.core.Version("1.0.0")

    def _info(self):
        return tfds.core.DatasetInfo(builder=self, features=tfds.features.FeaturesDict({
            "id": tfds.features.Text(),
            "question": tfds.features.Text(),
            "image": tfds.features.Image(shape=(6, 8, 3)),
            "answer": tfds.features.Text(),
            "level": tfds.features.Scalar(dtype=np.int32),
        }))

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples(), "test": self._generate_examples()}

    def _generate_examples(self):
        # Images as PIL images: TFDS encodes those with PIL (numpy arrays would need TensorFlow).
        for n, (record_id, colour) in enumerate(_COLOURS.items()):
            yield record_id, {"id": record_id, "question": f"What colour is {record_id}?",
                              "image": Image.new("RGB", (8, 6), colour), "answer": str(n),
                              "level": n}


@pytest.mark.parametrize("file_format", ["array_record", "parquet"])
def test_tfds_directory_reads_through_open_source(tmp_path, file_format):
    builder = _Tiny(data_dir=str(tmp_path), file_format=file_format)
    builder.download_and_prepare()
    directory = Path(builder.data_dir)  # DATA_DIR/NAME/1.0.0
    names = {p.name for p in directory.iterdir()}
    assert {"dataset_info.json", "features.json", f"__tiny-train.{file_format}-00000-of-00001"} \
        <= names, names

    with pytest.raises(InputError, match="split"):
        open_source(directory)  # two splits: must choose
    source = open_source(directory, split="train")
    assert len(source) == 3
    records = sorted((source[i] for i in range(3)), key=lambda r: r.id)  # TFDS shuffles
    for n, record in enumerate(records):
        record_id = f"r{n}"
        assert (record.id, record.question, record.answer) == (
            record_id, f"What colour is {record_id}?", str(n))
        assert record.extra == {"level": n}
        (image,) = load_images(record)
        assert image.size == (8, 6) and image.getpixel((3, 2)) == _COLOURS[record_id]
        assert isinstance(record.images[0], bytes)  # the stored PNG, not re-encoded

    # Pickles without its reader (workers reopen), and the tfds: prefix works too.
    again = pickle.loads(pickle.dumps(source))
    assert again[0] == source[0]
    assert len(load_records(f"tfds:{directory}", split="test")[0]) == 3
    assert "tensorflow" not in sys.modules


def test_tfds_missing_package_and_bad_dir(tmp_path, monkeypatch):
    with pytest.raises(InputError, match="dataset_info.json"):
        open_source(f"tfds:{tmp_path}")
    (tmp_path / "dataset_info.json").write_text("{}")
    (tmp_path / "features.json").write_text("{}")
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(InputError, match="pip install tensorflow-datasets"):
        open_source(tmp_path)


def test_tfds_decoded_image_arrays_become_png():
    png = _png_bytes(np.asarray(Image.new("RGB", (4, 3), (1, 2, 3))))
    assert Image.open(io.BytesIO(png)).getpixel((0, 0)) == (1, 2, 3)
