"""Hugging Face checkpoints in and out (eureka_jax.hf_io), and the errors bad inputs give."""

from __future__ import annotations

import json
import shutil

import ml_dtypes
import numpy as np
import pytest
from flax import nnx

from eureka_jax import hf_io, testing, verify
from eureka_jax.errors import InputError
from eureka_jax.families import qwen2_5_vl as qwen
from eureka_jax.processing import EncodedPrompt, QwenVLProcessor
from eureka_jax.processing.qwen_rows import prompt_row


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return testing.make_hf_model_dir(tmp_path_factory.mktemp("untied"), initializer_range=0.2)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    return testing.make_hf_model_dir(tmp_path_factory.mktemp("tied"), initializer_range=0.2,
                                     tie_word_embeddings=True, seed=1)


@pytest.fixture(scope="module")
def arrays(model_dir):
    """A left-padded batch: text only, and one image."""
    processor = QwenVLProcessor.from_pretrained(model_dir)
    prompts = [processor.encode(question="What is 3 + 4?"),
               processor.encode(question="What is shown?", images=[testing.draw_image(60, 45, 1)])]
    return qwen.hf_arrays(prompts, processor.pad_token_id)


def params_of(model) -> dict[str, np.ndarray]:
    return {".".join(map(str, path)): np.asarray(variable[...])
            for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}


def assert_same_params(a: dict[str, np.ndarray], b: dict[str, np.ndarray]):
    assert a.keys() == b.keys()
    for path in a:
        assert a[path].dtype == b[path].dtype, path
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)


def hf_state(directory):
    """transformers' own view of a directory: its float32 model's state dict as NumPy."""
    return {k: v.numpy() for k, v in qwen.load_reference(directory).state_dict().items()}


# ---------------------------------------------------------------------------------------------
# Round trips
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_export_reloads_in_transformers_with_same_logits(model_dir, tied_dir, arrays, tmp_path,
                                                         tied):
    source = tied_dir if tied else model_dir
    exported = hf_io.export_model(hf_io.load_model(source), tmp_path / "out", source_dir=source)
    keys = hf_io.SafetensorsFile(exported / "model.safetensors").keys()
    assert ("lm_head.weight" in keys) != tied
    for name in ("tokenizer.json", "tokenizer_config.json", "preprocessor_config.json"):
        assert (exported / name).read_bytes() == (source / name).read_bytes()
    original, reloaded = qwen.load_reference(source), qwen.load_reference(exported)
    assert reloaded.config.tie_word_embeddings == tied
    image_token_id = reloaded.config.image_token_id
    # Same weights in float32, so transformers computes the very same numbers.
    np.testing.assert_array_equal(qwen.reference_logits(reloaded, arrays, image_token_id),
                                  qwen.reference_logits(original, arrays, image_token_id))


def test_load_export_load_is_bit_exact_float32(model_dir, tied_dir, tmp_path):
    for name, source in (("untied", model_dir), ("tied", tied_dir)):
        params = params_of(hf_io.load_model(source))
        exported = hf_io.export_model(hf_io.load_model(source), tmp_path / name)
        assert_same_params(params_of(hf_io.load_model(exported)), params)
        # The file itself holds the original tensors, byte for byte.
        before = hf_io.SafetensorsFile(source / "model.safetensors")
        after = hf_io.SafetensorsFile(exported / "model.safetensors")
        assert set(before.keys()) == set(after.keys())
        for key in before.header:
            np.testing.assert_array_equal(after.tensor(key), before.tensor(key), err_msg=key)


def test_load_export_load_is_bit_exact_bfloat16(model_dir, tmp_path):
    params = params_of(hf_io.load_model(model_dir))
    first = hf_io.export_model(hf_io.load_model(model_dir), tmp_path / "bf16", dtype="bfloat16")
    assert json.loads((first / "config.json").read_text())["torch_dtype"] == "bfloat16"
    model = hf_io.load_model(first, param_dtype="bfloat16", compute_dtype="bfloat16")
    loaded = params_of(model)
    # Rounding float32 -> bfloat16 once, on export; nothing else changes.
    assert_same_params(loaded, {k: v.astype(ml_dtypes.bfloat16) for k, v in params.items()})
    second = hf_io.export_model(model, tmp_path / "bf16_again", dtype="bfloat16")
    assert (second / "model.safetensors").read_bytes() == (first / "model.safetensors").read_bytes()
    assert_same_params(params_of(hf_io.load_model(second, param_dtype="bfloat16")), loaded)


def test_multi_shard_export_with_index_reloads(model_dir, tmp_path):
    max_shard_bytes = 40_000
    model = hf_io.load_model(model_dir)
    exported = hf_io.export_model(model, tmp_path / "sharded", max_shard_bytes=max_shard_bytes)
    assert not (exported / "model.safetensors").exists()
    index = json.loads((exported / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) >= 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    for shard in shards:
        file = hf_io.SafetensorsFile(exported / shard)
        sizes = [file.tensor(k).nbytes for k in file.header]
        assert sum(sizes) <= max_shard_bytes or len(sizes) == 1, (shard, sizes)
    assert index["metadata"]["total_size"] == sum(a.nbytes for a in params_of(model).values())
    assert_same_params(params_of(hf_io.load_model(exported)), params_of(model))
    original = hf_state(model_dir)
    reloaded = hf_state(exported)
    assert original.keys() == reloaded.keys()
    for key in original:
        np.testing.assert_array_equal(reloaded[key], original[key], err_msg=key)


def hub_style_config(nested: dict) -> dict:
    """config.json as on the hub (Qwen/Qwen2.5-VL-7B-Instruct): text fields at the top level,
    rope_scaling {"type": "mrope", ...}, rope_theta top-level, vision in_chans."""
    text = dict(nested["text_config"])
    rope = text.pop("rope_parameters")
    for key in ("model_type", "layer_types"):
        text.pop(key, None)
    vision = {k: v for k, v in nested["vision_config"].items()
              if k not in ("in_channels", "rope_parameters", "model_type", "initializer_range")}
    vision.update(in_chans=3, spatial_patch_size=vision["patch_size"])
    flat = {k: v for k, v in nested.items() if k not in ("text_config", "vision_config", "dtype")}
    flat.update(text)
    flat.update(
        rope_theta=rope["rope_theta"],
        rope_scaling={"type": "mrope", "mrope_section": rope["mrope_section"]},
        vision_config=vision,
        torch_dtype="float32",
    )
    return flat


def test_hub_style_flat_config_loads(model_dir, arrays, tmp_path):
    hub_dir = tmp_path / "hub"
    shutil.copytree(model_dir, hub_dir)
    flat = hub_style_config(json.loads((model_dir / "config.json").read_text()))
    assert "text_config" not in flat and flat["hidden_size"] == 64
    (hub_dir / "config.json").write_text(json.dumps(flat))
    assert hf_io.read_config(hub_dir) == hf_io.read_config(model_dir)
    assert hf_io.read_config(hub_dir).text.mrope_section == (2, 3, 3)
    assert_same_params(params_of(hf_io.load_model(hub_dir)), params_of(hf_io.load_model(model_dir)))
    # transformers reads the flat file as the same model: the flat config is a faithful one.
    image_token_id = flat["image_token_id"]
    np.testing.assert_array_equal(
        qwen.reference_logits(qwen.load_reference(hub_dir), arrays, image_token_id),
        qwen.reference_logits(qwen.load_reference(model_dir), arrays, image_token_id))
    (hub_dir / "config.json").write_text(json.dumps({**flat, "rope_theta": 12345.0}))
    assert hf_io.read_config(hub_dir).text.rope_theta == 12345.0


# ---------------------------------------------------------------------------------------------
# Bad checkpoints
# ---------------------------------------------------------------------------------------------


def _rewrite_weights(directory, change):
    file = hf_io.SafetensorsFile(directory / "model.safetensors")
    tensors = {key: np.array(file.tensor(key)) for key in file.header}
    change(tensors)
    hf_io.write_safetensors(directory / "model.safetensors", tensors)


def _truncate(directory):
    file = directory / "model.safetensors"
    file.write_bytes(file.read_bytes()[: file.stat().st_size // 2])


def _pickle_only(directory):
    (directory / "model.safetensors").unlink()
    (directory / "pytorch_model.bin").write_bytes(b"\x80\x04not really a pickle")


def _config(directory, **changes):
    config = json.loads((directory / "config.json").read_text())
    (directory / "config.json").write_text(json.dumps({**config, **changes}))


def _index_with_missing_shard(directory):
    weight_map = {"model.norm.weight": "model-00002-of-00002.safetensors"}
    index = {"metadata": {}, "weight_map": weight_map}
    (directory / "model.safetensors.index.json").write_text(json.dumps(index))


BAD_CHECKPOINTS = {
    "no_safetensors": (lambda d: (d / "model.safetensors").unlink(),
                       r"no model\.safetensors or model\.safetensors\.index\.json"),
    "truncated": (_truncate, r"model\.safetensors: truncated safetensors file"),
    "missing_key": (lambda d: _rewrite_weights(d, lambda t: t.pop("model.norm.weight")),
                    r"checkpoint is missing 1 tensors, e\.g\. \['model\.norm\.weight'\]"),
    "wrong_shape": (lambda d: _rewrite_weights(
        d, lambda t: t.update({"model.norm.weight": np.ones(65, np.float32)})),
        r"tensor model\.norm\.weight has shape \(65,\), the config implies \(64,\)"),
    "unknown_tensor": (lambda d: _rewrite_weights(
        d, lambda t: t.update({"model.layers.0.mlp.extra.weight": np.ones(3, np.float32)})),
        r"tensors the Qwen2\.5-VL port does not know: \['model\.layers\.0\.mlp\.extra\.weight'\]"),
    "unknown_architecture": (
        lambda d: _config(d, model_type="llama", architectures=["LlamaForCausalLM"]),
        r"model_type='llama' architectures=\['LlamaForCausalLM'\]; eureka_jax supports "
        r"Qwen2\.5-VL"),
    "pickle_only": (_pickle_only, r"holds only pickle weights \(\.bin/\.pt\)"),
    "missing_shard": (_index_with_missing_shard,
                      r"lists model-00002-of-00002\.safetensors for model\.norm\.weight, but .* is "
                      r"missing"),
    "no_config": (lambda d: (d / "config.json").unlink(), r"no config\.json"),
    "config_not_json": (lambda d: (d / "config.json").write_text("{"), r"not valid JSON"),
}


@pytest.mark.parametrize("case", list(BAD_CHECKPOINTS))
def test_bad_checkpoint_gives_a_clear_input_error(model_dir, tmp_path, case):
    damage, message = BAD_CHECKPOINTS[case]
    broken = tmp_path / "broken"
    shutil.copytree(model_dir, broken)
    damage(broken)
    with pytest.raises(InputError, match=message):
        hf_io.load_model(broken)


# ---------------------------------------------------------------------------------------------
# Bad prompts and images
# ---------------------------------------------------------------------------------------------


def test_image_tokens_that_do_not_match_the_images(model_dir):
    """Text encoded with one image size, pixels from another: caught before the model runs."""
    config = hf_io.read_config(model_dir)
    processor = QwenVLProcessor.from_pretrained(model_dir)
    bigger = QwenVLProcessor.from_pretrained(model_dir, min_pixels=16 * 28 * 28)
    image = testing.draw_image(60, 45, 1)
    prompt = processor.encode(question="What is shown?", images=[image])
    other = bigger.encode(question="What is shown?", images=[image])
    mixed = EncodedPrompt(prompt.input_ids, other.image_grid_thw, other.patches, prompt.text)
    with pytest.raises(InputError, match=r"record 3: row 0 image 0 has 4 image tokens but its "
                                         r"grid 1x8x10 needs 20"):
        prompt_row(mixed, config, name="record 3")
    arrays = qwen.hf_arrays([mixed], processor.pad_token_id)
    with pytest.raises(InputError, match=r"row 0 image 0 has 4 <\|image_pad\|> tokens but its "
                                         r"grid \[1, 8, 10\] gives 20"):
        qwen.port_inputs(arrays, config)


def test_tiny_image_is_upscaled_as_transformers_does(model_dir):
    """Images below min_pixels (even below one 28x28 merged patch) are upscaled, not rejected:
    a 5x3 image becomes 84x56 (6 merged tokens), like Qwen2VLImageProcessorPil, and the port
    matches transformers on it."""
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    processor = QwenVLProcessor.from_pretrained(model_dir)
    image = testing.draw_image(5, 3, 7)
    prompt = processor.encode(question="What colour is it?", images=[image])
    expected = Qwen2VLImageProcessorPil.from_pretrained(model_dir)(images=[image],
                                                                   return_tensors="np")
    np.testing.assert_array_equal(prompt.image_grid_thw, [[1, 4, 6]])
    np.testing.assert_array_equal(prompt.image_grid_thw, expected["image_grid_thw"])
    np.testing.assert_array_equal(prompt.patches[0], expected["pixel_values"])
    arrays = qwen.hf_arrays([prompt], processor.pad_token_id)
    model = hf_io.load_model(model_dir)
    ours = verify.port_logits(model, qwen.port_inputs(arrays, model.config))
    reference = qwen.reference_logits(qwen.load_reference(model_dir), arrays,
                                        model.config.image_token_id)
    stats = verify.compare(ours, reference, arrays["attention_mask"])
    assert stats["rel_diff"] <= 1e-5 and stats["greedy_agree"] == 1.0, stats


def test_extreme_aspect_ratio_is_rejected_by_both(model_dir):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import (
        Qwen2VLImageProcessorPil,
    )

    image = testing.draw_image(402, 2, 8)  # aspect ratio 201 > 200
    processor = QwenVLProcessor.from_pretrained(model_dir)
    with pytest.raises(InputError, match=r"record 5 image 0 is 402x2 pixels, aspect ratio 201"):
        processor.encode(question="What is it?", images=[image], name="record 5")
    with pytest.raises(ValueError, match="aspect ratio must be smaller than 200"):
        Qwen2VLImageProcessorPil.from_pretrained(model_dir)(images=[image])
