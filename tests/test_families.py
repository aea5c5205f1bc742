"""Model families as plug-ins (eureka_jax/families): choosing a family from a checkpoint, the
family-independent collation and checkpointing of prompt rows, and the rule that model classes
are imported only by their family's code."""

from __future__ import annotations

import ast
import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest

from eureka_jax import families
from eureka_jax.batch import Buckets
from eureka_jax.errors import InputError
from eureka_jax.rollout import ScoredGroup, pack_groups, unpack_groups

PACKAGE = Path(__file__).resolve().parent.parent / "eureka_jax"


@pytest.fixture(scope="module")
def qwen_dir(tmp_path_factory):
    directory = tmp_path_factory.mktemp("qwen")
    families.get("qwen2_5_vl").make_tiny_model_dir(directory, seed=0)
    return directory


def test_family_comes_from_config_json(qwen_dir, tmp_path):
    assert families.for_model_dir(qwen_dir).name == "qwen2_5_vl"
    model = families.for_model_dir(qwen_dir).load_model(qwen_dir)
    assert families.for_config(model.config).name == "qwen2_5_vl"

    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llava"}))
    with pytest.raises(InputError, match=r"config.json: model_type 'llava' is not supported"):
        families.for_model_dir(tmp_path)
    with pytest.raises(InputError, match="no config.json"):
        families.for_model_dir(tmp_path / "missing")
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(InputError, match="not valid JSON"):
        families.for_model_dir(tmp_path)
    with pytest.raises(InputError, match="'mystery' is not supported"):
        families.get("mystery")


def _qwen_row(qwen_dir, question: str, with_image: bool):
    from eureka_jax.testing import draw_image

    family = families.for_model_dir(qwen_dir)
    processor = family.load_processor(qwen_dir)
    config = family.read_config(qwen_dir)
    images = [draw_image(56, 84, 3)] if with_image else []
    return family.prompt_row(processor.encode(question=question, images=images), config,
                             name=question)


def test_collation_dispatches_on_the_row_type(qwen_dir):
    rows = [_qwen_row(qwen_dir, "What is 2+2?", False), _qwen_row(qwen_dir, "Colour?", True)]
    buckets = Buckets(lengths=(256,), patches=(0, 64))
    batch = families.collate_prompts(rows, buckets, pad_token_id=0, prompt_keys=[7, 9])
    direct = families.get("qwen2_5_vl").collate_prompts(rows, buckets, pad_token_id=0,
                                                        prompt_keys=[7, 9])
    for ours, theirs in zip(jax_leaves(batch), jax_leaves(direct), strict=True):
        np.testing.assert_array_equal(ours, theirs)
    with pytest.raises(InputError, match="empty batch"):
        families.collate_prompts([], buckets, pad_token_id=0)
    with pytest.raises(TypeError, match="not the prompt row of a registered model family"):
        families.for_row(object())


def jax_leaves(tree):
    import jax

    return jax.tree.leaves(tree)


def _group(row, seed: int) -> ScoredGroup:
    rng = np.random.default_rng(seed)
    return ScoredGroup(
        row=row, record_id=f"r{seed}", tokens_GxL=rng.integers(0, 50, (2, 5)).astype(np.int32),
        logprobs_GxL=rng.normal(size=(2, 5)).astype(np.float32),
        lengths_G=np.asarray([3, 5]), rewards_G=rng.random(2).astype(np.float32),
        advantages_G=rng.normal(size=2).astype(np.float32))


def _assert_groups_equal(ours: ScoredGroup, theirs: ScoredGroup):
    assert type(ours.row) is type(theirs.row) and ours.record_id == theirs.record_id
    for field in dataclasses.fields(theirs.row):
        np.testing.assert_array_equal(getattr(ours.row, field.name),
                                      getattr(theirs.row, field.name))
    for name in ScoredGroup._GROUP_FIELDS:
        np.testing.assert_array_equal(getattr(ours, name), getattr(theirs, name))


def test_carried_groups_round_trip_through_checkpoint_arrays(qwen_dir):
    groups = [_group(_qwen_row(qwen_dir, "What is 2+2?", False), 0),
              _group(_qwen_row(qwen_dir, "Colour?", True), 1)]
    arrays = pack_groups(groups)
    assert str(arrays["g1/family"]) == "qwen2_5_vl"
    restored = unpack_groups(arrays)
    assert isinstance(restored[0].row.next_position, int)
    for ours, theirs in zip(restored, groups, strict=True):
        _assert_groups_equal(ours, theirs)

    # Checkpoints written before model families (no family key, next_position beside the row).
    legacy = {k: v for k, v in arrays.items() if not k.endswith("/family")}
    for i in range(len(groups)):
        legacy[f"g{i}/next_position"] = legacy.pop(f"g{i}/row/next_position")
    for ours, theirs in zip(unpack_groups(legacy), groups, strict=True):
        _assert_groups_equal(ours, theirs)


def test_examples_round_trip_through_the_bytes_processes_exchange(qwen_dir):
    from eureka_jax.processing.examples import (
        Example,
        examples_from_bytes,
        examples_to_bytes,
        gather_examples,
    )

    examples = [Example(row=_qwen_row(qwen_dir, "What is 2+2?", False), record_id="a",
                        answer="4", index=3, extra={"source": "x", "level": 2}),
                Example(row=_qwen_row(qwen_dir, "Colour?", True), record_id="b", answer="red",
                        index=11)]
    restored = examples_from_bytes(examples_to_bytes(examples))
    for ours, theirs in zip(restored, examples, strict=True):
        assert (ours.record_id, ours.answer, ours.index, ours.extra) == (
            theirs.record_id, theirs.answer, theirs.index, theirs.extra)
        _assert_groups_equal(_group(ours.row, 0), _group(theirs.row, 0))
    assert gather_examples(examples, share=1) == examples  # one process: as it is
    with pytest.raises(ValueError, match="not whole shares"):
        gather_examples(examples, share=3)


# Files that belong to a model family (its model, checkpoint I/O, processor and prompt rows,
# plug-in module) and the shared decoder pieces they build on.
FAMILY_FILES = {
    "models/qwen2_5_vl.py", "models/presets.py", "hf_io.py", "processing/qwen_rows.py",
    "families/qwen2_5_vl.py",
    "models/internvl.py", "models/internvl_io.py", "models/internvl_convert.py",
    "processing/internvl.py", "families/internvl.py", "internvl_testing.py", "testing.py",
}
MODEL_MODULES = {"eureka_jax.models.qwen2_5_vl", "eureka_jax.models.internvl"}
MODEL_CLASSES = {"Qwen25VL", "Qwen25VLConfig", "InternVL", "InternVLConfig"}


def test_model_classes_are_imported_only_by_their_family():
    offenders = []
    for path in sorted(PACKAGE.rglob("*.py")):
        relative = path.relative_to(PACKAGE).as_posix()
        if relative in FAMILY_FILES:
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module in MODEL_MODULES:
                named = {alias.name for alias in node.names} & MODEL_CLASSES
                if named:
                    offenders.append(f"{relative}:{node.lineno} imports {sorted(named)}")
    assert not offenders, "model classes imported outside their family: " + "; ".join(offenders)
