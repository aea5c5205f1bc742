"""The port on a (data 2, fsdp 2, tensor 2) mesh of 8 fake CPU devices: the one-device logits."""

from __future__ import annotations

import jax
import numpy as np
import pytest
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec

from eureka_jax import hf_io, sharding, testing, verify
from eureka_jax.commands import logits as logits_command
from eureka_jax.families import qwen2_5_vl as qwen
from eureka_jax.processing import QwenVLProcessor

MESH_SHAPE = (2, 2, 2)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return testing.make_hf_model_dir(tmp_path_factory.mktemp("model"), initializer_range=0.2)


@pytest.fixture(scope="module")
def arrays(model_dir):
    """Four rows, so that the batch dimension divides data x fsdp = 4 and is sharded too."""
    processor = QwenVLProcessor.from_pretrained(model_dir)
    prompts = [
        processor.encode(question="What is 3 + 4?"),
        processor.encode(question="Describe the picture.", images=[testing.draw_image(60, 90, 1)]),
        processor.encode(question="Which is larger?", images=[testing.draw_image(200, 120, 2),
                                                              testing.draw_image(30, 40, 3)]),
        processor.encode(question="Find x such that 3x + 5 = 20."),
    ]
    return qwen.hf_arrays(prompts, processor.pad_token_id)


@pytest.fixture(scope="module")
def mesh():
    assert jax.device_count() >= 8, "tests/conftest.py must set 8 fake CPU devices"
    return sharding.make_mesh(MESH_SHAPE, jax.devices()[:8])


def test_parameters_are_sharded(model_dir, mesh):
    model = hf_io.load_model(model_dir, mesh=mesh)
    specs = {".".join(map(str, path)): variable[...].sharding.spec
             for path, variable in nnx.to_flat_state(nnx.state(model, nnx.Param))}
    # (vocab, embed) -> (tensor, fsdp): 618 and 64 both divide by 2.
    assert specs["embed_tokens"] == PartitionSpec("tensor", "fsdp")
    # Stacked decoder layers: the leading layer axis is never sharded.
    assert specs["layers.mlp.down_proj.kernel"] == PartitionSpec(None, "tensor", "fsdp")
    assert specs["layers.input_layernorm.scale"] == PartitionSpec(None, None)
    assert specs["visual.blocks.attn.qkv.kernel"][0] is None
    embedding = model.embed_tokens[...]
    assert len(embedding.sharding.device_set) == 8
    assert embedding.addressable_shards[0].data.shape == (618 // 2, 64 // 2)
    sharded = [path for path, spec in specs.items() if any(axis is not None for axis in spec)]
    assert len(sharded) > len(specs) // 2, f"only {len(sharded)} of {len(specs)} sharded"


def test_activations_follow_the_rules(model_dir, mesh):
    model = hf_io.load_model(model_dir, mesh=mesh)
    ids_BxT = np.zeros((4, 8), np.int32)
    with sharding.activate(mesh):
        embedded = jax.jit(lambda m, ids: m.embed(ids))(model, ids_BxT)
    # ("batch", "length", "act_embed"): batch over data x fsdp, the rest replicated.
    expected = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), None, None))
    assert embedded.sharding.is_equivalent_to(expected, embedded.ndim), embedded.sharding


def test_sharded_logits_equal_single_device(model_dir, mesh, arrays, tmp_path):
    single = hf_io.load_model(model_dir)
    config = single.config
    expected = verify.port_logits(single, qwen.port_inputs(arrays, config))
    model = hf_io.load_model(model_dir, mesh=mesh)
    with sharding.activate(mesh):
        logits = verify.port_logits(model, qwen.port_inputs(arrays, config))
    stats = verify.compare(logits, expected, arrays["attention_mask"])
    # Not bit-exact (1.3e-6 measured): sharded matmuls sum partial products in another order.
    assert stats["rel_diff"] <= 1e-5 and stats["greedy_agree"] == 1.0, stats

    # The logits command on the same mesh (the compiled program is reused).
    inputs, output = tmp_path / "in.npz", tmp_path / "out.npz"
    np.savez(inputs, **arrays)
    argv = ["--model", str(model_dir), "--inputs", str(inputs), "--output", str(output),
            "--mesh", ",".join(map(str, MESH_SHAPE))]
    assert logits_command.main(argv) == 0
    with np.load(output) as npz:
        np.testing.assert_array_equal(npz["logits"], logits)


def test_batches_are_placed_row_split_over_data_and_fsdp():
    from eureka_jax.batch import PromptBatch, batch_shardings

    mesh = sharding.make_mesh((2, 2, 2))

    def prompts(rows, lead=()):
        def a(*shape):
            return np.zeros((*lead, *shape), np.int32)
        return PromptBatch(input_ids_BxT=a(rows, 5), attention_mask_BxT=a(rows, 5),
                           positions_3xBxT=a(3, rows, 5), next_position_B=a(rows),
                           prompt_key_B=a(rows), token_source_BxT=a(rows, 5))

    rows = ("data", "fsdp")
    specs = batch_shardings(prompts(4), mesh)
    assert specs.input_ids_BxT.spec == PartitionSpec(rows, None)
    assert specs.prompt_key_B.spec == PartitionSpec(rows)
    assert specs.positions_3xBxT.spec == PartitionSpec(None, rows, None)
    # 6 rows do not divide over 4 shards: replicated.
    assert batch_shardings(prompts(6), mesh).input_ids_BxT.spec == PartitionSpec(None, None)
    stacked = batch_shardings(prompts(4, lead=(3,)), mesh, micro_axis=True)
    assert stacked.input_ids_BxT.spec == PartitionSpec(None, rows, None)
    assert stacked.positions_3xBxT.spec == PartitionSpec(None, None, rows, None)
    placed = jax.device_put(prompts(4), specs)
    assert placed.input_ids_BxT.addressable_shards[0].data.shape == (1, 5)
