"""The grain pipeline: order, shuffling, epochs, sharding, bad records, exact resume."""

import itertools
import json

import pytest
from PIL import Image

from eureka_jax.data import BadRecordError, PipelineConfig, make_pipeline, open_source
from eureka_jax.errors import InputError

NUM_RECORDS = 20
BAD_IDS = ("r07", "r13")  # r07's image is missing, r13 has no answer


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    directory = tmp_path_factory.mktemp("pipeline")
    Image.new("RGBA", (6, 4), (0, 0, 0, 0)).save(directory / "x.png")
    lines = []
    for i in range(NUM_RECORDS):
        record = {"id": f"r{i:02d}", "question": f"Q{i}?", "image": "x.png", "answer": str(i)}
        if record["id"] == "r07":
            record["image"] = "missing.png"
        if record["id"] == "r13":
            del record["answer"]
        lines.append(json.dumps(record) + "\n")
    (directory / "d.jsonl").write_text("".join(lines))
    return open_source(directory / "d.jsonl")


def record_id(record):
    """A trivial preprocess (module level, so it pickles to worker processes)."""
    return record.id


def _pipeline(source, process_index=0, process_count=1, **config):
    config = {"batch_size": 3, "skip_bad_records": True, **config}
    return make_pipeline(source, record_id, PipelineConfig(**config),
                         process_index=process_index, process_count=process_count)


def _ids(batches):
    return [i for batch in batches for i in batch]


GOOD_IDS = [f"r{i:02d}" for i in range(NUM_RECORDS) if f"r{i:02d}" not in BAD_IDS]


def test_unshuffled_single_pass_keeps_order_and_counts_bad_records(source):
    iterator = iter(_pipeline(source, shuffle=False, num_epochs=1, drop_remainder=False))
    batches = list(iterator)
    assert [len(b) for b in batches] == [3, 3, 3, 3, 3, 3]
    assert _ids(batches) == GOOD_IDS
    skipped = iterator.skipped
    assert (skipped["missing_image"], skipped["missing_answer"]) == (1, 1)
    assert sum(skipped.values()) == 2


def test_preprocess_gets_decoded_rgb_images(source):
    seen = []
    pipeline = make_pipeline(source, lambda r: seen.append(r.images) or r.id,
                             PipelineConfig(batch_size=1, shuffle=False, num_epochs=1,
                                            skip_bad_records=True, num_threads=0),
                             process_index=0, process_count=1)
    next(iter(pipeline))
    (image,) = seen[0]
    assert isinstance(image, Image.Image) and image.mode == "RGB"
    assert image.getpixel((0, 0)) == (255, 255, 255)  # transparent -> white


def test_bad_record_raises_without_skipping(source):
    iterator = iter(_pipeline(source, shuffle=False, skip_bad_records=False))
    next(iterator), next(iterator)
    with pytest.raises(BadRecordError) as info:
        next(iterator)  # the third batch needs r07
    assert "d.jsonl:8" in str(info.value) and "'r07'" in str(info.value)


def test_shuffle_is_seeded_and_differs_per_epoch(source):
    def two_epochs(seed):
        return _ids(_pipeline(source, seed=seed, num_epochs=2, drop_remainder=False))

    first = two_epochs(seed=1)
    assert first == two_epochs(seed=1)
    assert first != two_epochs(seed=2)
    epoch_1, epoch_2 = first[:len(GOOD_IDS)], first[len(GOOD_IDS):]
    assert sorted(epoch_1) == sorted(epoch_2) == GOOD_IDS
    assert epoch_1 != epoch_2 and epoch_1 != GOOD_IDS


def test_processes_get_disjoint_equal_shards(source):
    shards = [_ids(_pipeline(source, process_index=p, process_count=3, num_epochs=1,
                             batch_size=1, seed=4)) for p in range(3)]
    assert all(set(a).isdisjoint(b) for a, b in itertools.combinations(shards, 2))
    all_ids = [f"r{i:02d}" for i in range(NUM_RECORDS)]
    # 20 records over 3 processes: 6 each; the 2 left over (r18, r19) are dropped this epoch.
    expected = [set(all_ids[p:18:3]) - set(BAD_IDS) for p in range(3)]
    assert [set(s) for s in shards] == expected


def test_chunk_shares_interleave_to_the_one_process_order(tmp_path):
    """2 processes taking halves of every chunk of 4 rebuild the one-process order of records,
    across epochs."""
    lines = [json.dumps({"id": f"r{i:02d}", "question": "Q?", "answer": "1"}) + "\n"
             for i in range(18)]
    (tmp_path / "d.jsonl").write_text("".join(lines))
    source = open_source(tmp_path / "d.jsonl")

    def ids(chunk_share, batch_size):
        pipeline = make_pipeline(source, record_id, PipelineConfig(
            batch_size=batch_size, seed=3, num_threads=0), chunk_share=chunk_share)
        iterator = iter(pipeline)
        return _ids(next(iterator) for _ in range(10))

    whole = ids((4, 0, 4), 4)
    halves = [ids((4, 0, 2), 2), ids((4, 2, 4), 2)]
    rebuilt = [i for chunk in range(10) for half in halves for i in half[2 * chunk:2 * chunk + 2]]
    assert rebuilt == whole
    assert sorted(whole[:18]) == [f"r{i:02d}" for i in range(18)]  # one shuffled epoch
    assert whole[18:36] != whole[:18]
    with pytest.raises(ValueError, match="empty or outside"):
        make_pipeline(source, record_id, PipelineConfig(batch_size=1), chunk_share=(4, 3, 5))


def test_too_little_data_is_an_input_error(source):
    with pytest.raises(InputError, match="less than one batch"):
        _pipeline(source, batch_size=30, num_epochs=1)


@pytest.mark.parametrize("num_threads, num_workers", [
    (0, 0), (3, 0), pytest.param(1, 2, marks=pytest.mark.slow),  # ~10 s: spawns 4 processes
])
def test_state_round_trip_resumes_exactly(source, num_threads, num_workers):
    def pipeline():
        return _pipeline(source, seed=7, num_threads=num_threads, num_workers=num_workers)

    uninterrupted = iter(pipeline())
    expected = [next(uninterrupted) for _ in range(5)]
    state = json.loads(json.dumps(uninterrupted.get_state()))  # as a checkpoint stores it
    skipped = uninterrupted.skipped
    expected += [next(uninterrupted) for _ in range(7)]  # 2 epochs and some: crosses boundaries

    resumed = iter(pipeline())
    resumed.set_state(state)
    assert resumed.skipped == skipped
    assert [next(resumed) for _ in range(7)] == expected[5:]
    assert sum(resumed.skipped.values()) == 4  # r07 and r13, in each of two epochs
    uninterrupted.close()
    resumed.close()
