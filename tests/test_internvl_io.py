"""InternVL checkpoints in and out (models/internvl_io.py), and the errors bad configs give."""

from __future__ import annotations

import numpy as np
import pytest

from eureka_jax import hf_io
from eureka_jax import internvl_testing as it
from eureka_jax.errors import InputError
from eureka_jax.models import internvl_io
from eureka_jax.models.internvl import InternVLConfig

TIED, UNTIED = "qwen2_gqa1_tied", "llama_gqa2_untied"


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    return {name: it.make_hf_model_dir(tmp_path_factory.mktemp(name), seed=3, **it.VARIANTS[name])
            for name in (TIED, UNTIED)}


@pytest.fixture(scope="module")
def inputs(dirs):
    config = internvl_io.read_config(dirs[UNTIED])
    return it.hf_inputs([it.make_prompt(config, (3, 2, 4), seed=1),
                         it.make_prompt(config, (6,), seed=2)], config)


def saved_tensors(model_dir):
    file = hf_io.SafetensorsFile(model_dir / "model.safetensors")
    return {key: np.asarray(file.tensor(key)) for key in file.header}


def assert_same_params(a, b):
    assert a.keys() == b.keys()
    for path in a:
        assert a[path].dtype == b[path].dtype, path
        np.testing.assert_array_equal(a[path], b[path], err_msg=path)


@pytest.mark.parametrize("name", [UNTIED, TIED])
def test_export_reloads_in_transformers_with_same_logits(dirs, inputs, tmp_path, name):
    source = dirs[name]
    exported = internvl_io.export_model(internvl_io.load_model(source), tmp_path / "out")
    # The same tensors under the same names as transformers' own save_pretrained, bit for bit.
    original, ours = saved_tensors(source), saved_tensors(exported)
    assert ours.keys() == original.keys()
    assert ("language_model.lm_head.weight" in ours) == (name == UNTIED)
    for key in original:
        np.testing.assert_array_equal(ours[key], original[key], err_msg=key)
    reference, reloaded = it.load_reference(source), it.load_reference(exported)
    assert reloaded.config.tie_word_embeddings == (name == TIED)
    np.testing.assert_array_equal(it.reference_logits(reloaded, inputs),
                                  it.reference_logits(reference, inputs))


def test_in_memory_key_names_load_the_same(dirs, tmp_path):
    """A checkpoint saved with transformers' in-memory names (model.language_model.*,
    model.vision_tower.*, lm_head.weight) loads to the same parameters."""
    source = dirs[UNTIED]
    renamed = {_in_memory(key): array for key, array in saved_tensors(source).items()}
    assert "lm_head.weight" in renamed and "model.language_model.norm.weight" in renamed
    tmp_path.mkdir(exist_ok=True)
    hf_io.write_safetensors(tmp_path / "model.safetensors", renamed)
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    assert_same_params(internvl_io.host_params(internvl_io.load_model(tmp_path)),
                       internvl_io.host_params(internvl_io.load_model(source)))


def _in_memory(key: str) -> str:
    for old, new in internvl_io.NAMES.aliases:
        if key.startswith(old):
            return new + key[len(old):]
    return key


def test_load_export_load_is_bit_exact(dirs, tmp_path):
    for name, source in dirs.items():
        params = internvl_io.host_params(internvl_io.load_model(source))
        exported = internvl_io.export_model(internvl_io.load_model(source), tmp_path / name)
        assert_same_params(internvl_io.host_params(internvl_io.load_model(exported)), params)


def test_config_round_trips(dirs):
    from transformers import InternVLConfig as HFInternVLConfig

    for source in dirs.values():
        config = internvl_io.read_config(source)
        assert InternVLConfig.from_hf_dict(config.to_hf_dict()) == config
        hf = config.to_hf_dict()
        rebuilt = HFInternVLConfig(**{k: v for k, v in hf.items() if k != "model_type"})
        assert InternVLConfig.from_hf_dict(rebuilt.to_dict()) == config
    llama = internvl_io.read_config(dirs[UNTIED])
    assert llama.text_model_type == "llama" and not llama.text.attention_bias
    biased = InternVLConfig.from_hf_dict(it.tiny_hf_config(text_model_type="llama",
                                                           text_attention_bias=True))
    assert biased.text.attention_bias and biased.text.o_proj_bias
    assert InternVLConfig.from_hf_dict(biased.to_hf_dict()) == biased
    qwen = internvl_io.read_config(dirs[TIED])
    assert qwen.text_model_type == "qwen2" and qwen.text.attention_bias
    assert qwen.tokens_per_tile == 4 and qwen.eos_token_id == it.EOS_TOKEN_ID


def test_sharded_load_equals_single_device(dirs):
    from eureka_jax import sharding

    mesh = sharding.make_mesh((2, 2, 2))
    model = internvl_io.load_model(dirs[UNTIED], mesh=mesh)
    kernel = model.layers.mlp.gate_proj.kernel[...]  # [layers, D, F]
    assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
    assert_same_params(internvl_io.host_params(model),
                       internvl_io.host_params(internvl_io.load_model(dirs[UNTIED])))


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def _hf(**text_changes):
    hf = it.tiny_hf_config()
    hf["text_config"].update(text_changes)
    return hf


def test_unknown_text_model_type_names_the_field():
    with pytest.raises(InputError, match=r"text_config\.model_type 'mistral' .*qwen2.*llama"):
        InternVLConfig.from_hf_dict(_hf(model_type="mistral"))


def test_unsupported_configs_are_rejected(dirs, tmp_path):
    with pytest.raises(InputError, match="rope_type 'linear'"):
        InternVLConfig.from_hf_dict(_hf(rope_parameters={"rope_type": "linear", "factor": 2.0,
                                                         "rope_theta": 1e4}))
    with pytest.raises(InputError, match="mlp_bias=true is not supported"):
        InternVLConfig.from_hf_dict(_hf(model_type="llama", mlp_bias=True))
    with pytest.raises(InputError, match="model_type='qwen2_5_vl'"):
        InternVLConfig.from_hf_dict({**it.tiny_hf_config(), "model_type": "qwen2_5_vl"})
    with pytest.raises(InputError, match="image_seq_length 256 disagrees"):
        InternVLConfig.from_hf_dict({**it.tiny_hf_config(), "image_seq_length": 256})
    with pytest.raises(InputError, match="only one layer index"):
        InternVLConfig.from_hf_dict({**it.tiny_hf_config(), "vision_feature_layer": [-1, -2]})
    # A checkpoint that lacks a tensor the config implies.
    source = dirs[UNTIED]
    tensors = saved_tensors(source)
    del tensors["multi_modal_projector.linear_2.bias"]
    hf_io.write_safetensors(tmp_path / "model.safetensors", tensors)
    (tmp_path / "config.json").write_text((source / "config.json").read_text())
    with pytest.raises(InputError, match="missing 1 tensors.*multi_modal_projector.linear_2"):
        internvl_io.load_model(tmp_path)


def test_dynamic_rope_accepted_up_to_max_positions(tmp_path):
    """Dynamic NTK scaling (InternLM2.5's rope) changes nothing below max_position_embeddings
    (512 here): such a checkpoint matches transformers there; a longer sequence is refused
    instead of computed wrongly."""
    import jax

    model_dir = it.make_hf_model_dir(tmp_path, seed=4, text_model_type="llama",
                                     text_attention_bias=True, dynamic_rope_factor=2.0)
    model = internvl_io.load_model(model_dir)
    config = model.config
    assert config.rope_type == "dynamic" and config.to_hf_dict()["text_config"][
        "rope_parameters"]["factor"] == 2.0
    prompt = it.make_prompt(config, (4, 1, 5), seed=0)
    batch = jax.tree.map(np.asarray, it.prompt_batch([prompt], config,
                                                     length=len(prompt.input_ids_T), tiles=1))
    ours = np.asarray(jax.jit(model.__call__)(batch.input_ids_BxT, batch.positions_3xBxT,
                                              batch.attention_mask_BxT, batch.vision,
                                              batch.token_source_BxT))
    reference = it.reference_logits(it.load_reference(model_dir), it.hf_inputs([prompt], config))
    assert np.abs(ours - reference).max() <= 1e-5 * np.abs(reference).max()
    model.text_rotary_table(512)
    with pytest.raises(InputError, match="exceeds max_position_embeddings 512"):
        model.text_rotary_table(513)
