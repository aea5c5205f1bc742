"""The decoder layers and vision blocks run as one lax.scan over stacked parameters: a program's
size does not grow with depth, every remat policy computes the same gradient, and each stacked
layer is initialised from its own keys."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eureka_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig, VisionInputs
from eureka_jax.testing import tiny_hf_config


def _config(text_layers: int, vision_depth: int, **runtime) -> Qwen25VLConfig:
    hf = tiny_hf_config(num_hidden_layers=text_layers, depth=vision_depth,
                        fullatt_block_indexes=list(range(1, vision_depth, 2)))
    return Qwen25VLConfig.from_hf_dict(hf.to_dict(), **runtime)


def _text_batch(batch: int = 2, length: int = 6, vocab: int = 500):
    ids_BxT = jnp.asarray(np.random.default_rng(0).integers(0, vocab, (batch, length)), jnp.int32)
    positions_3xBxT = jnp.broadcast_to(jnp.arange(length), (3, batch, length))
    return ids_BxT, positions_3xBxT, jnp.ones((batch, length), jnp.int32)


def _abstract(config: Qwen25VLConfig):
    return nnx.split(nnx.eval_shape(lambda: Qwen25VL(config, nnx.Rngs(0))))


def _lowered_size(loss, *abstract_args) -> int:
    """Characters of the StableHLO of `loss`'s gradient with respect to its first argument."""
    return len(jax.jit(jax.grad(loss)).lower(*abstract_args).as_text())


def _decoder_gradient_size(config: Qwen25VLConfig) -> int:
    graphdef, state = _abstract(config)
    ids, positions, mask = (jax.ShapeDtypeStruct(x.shape, x.dtype) for x in _text_batch(1, 8))

    def loss(state, ids, positions, mask):
        return nnx.merge(graphdef, state)(ids, positions, mask).mean()

    return _lowered_size(loss, state, ids, positions, mask)


def _vision_gradient_size(config: Qwen25VLConfig) -> int:
    graphdef, state = _abstract(config)
    patches = 16  # one 56x56 image: a 4x4 patch grid
    vision = VisionInputs(
        patches_BxPxC=jax.ShapeDtypeStruct((1, patches, config.vision.patch_features),
                                           jnp.float32),
        pos_hw_BxPx2=jax.ShapeDtypeStruct((1, patches, 2), jnp.int32),
        window_segment_BxP=jax.ShapeDtypeStruct((1, patches), jnp.int32),
        image_segment_BxP=jax.ShapeDtypeStruct((1, patches), jnp.int32))

    def loss(state, vision):
        return nnx.merge(graphdef, state).encode_images(vision).mean()

    return _lowered_size(loss, state, vision)


@pytest.mark.parametrize("remat", ["none", "full"])
def test_program_size_does_not_grow_with_depth(remat):
    shallow = _decoder_gradient_size(_config(2, 4, remat=remat))
    deep = _decoder_gradient_size(_config(8, 4, remat=remat))
    print(f"decoder gradient program ({remat} remat): {shallow} chars with 2 layers, {deep} with 8")
    assert deep / shallow < 1.3


def test_vision_program_size_does_not_grow_with_depth():
    shallow = _vision_gradient_size(_config(2, 4))
    deep = _vision_gradient_size(_config(2, 16))
    print(f"vision gradient program: {shallow} chars with 4 blocks, {deep} with 16")
    assert deep / shallow < 1.3


@pytest.mark.parametrize("remat", ["full", "dots"])
def test_remat_policies_give_the_same_gradient(remat):
    ids, positions, mask = _text_batch()
    grads = {}
    for policy in ("none", remat):
        model = Qwen25VL(_config(3, 4, remat=policy), nnx.Rngs(0))
        graphdef, state = nnx.split(model)

        def loss(state, graphdef=graphdef):
            logits = nnx.merge(graphdef, state)(ids, positions, mask)
            return jax.nn.log_softmax(logits)[..., 0].mean()

        grads[policy] = jax.jit(jax.grad(loss))(state)
    for (path, a), (_, b) in zip(nnx.to_flat_state(grads["none"]),
                                 nnx.to_flat_state(grads[remat]), strict=True):
        np.testing.assert_allclose(np.asarray(a[...]), np.asarray(b[...]), rtol=1e-5,
                                   atol=1e-7, err_msg=".".join(map(str, path)))


def test_each_stacked_layer_has_its_own_initialisation():
    model = Qwen25VL(_config(3, 4), nnx.Rngs(0))
    kernel = np.asarray(model.layers.self_attn.q_proj.kernel[...])
    assert kernel.shape[0] == 3
    assert not np.allclose(kernel[0], kernel[1]) and not np.allclose(kernel[1], kernel[2])
    blocks = np.asarray(model.visual.blocks.attn.qkv.kernel[...])
    assert blocks.shape[0] == 4 and not np.allclose(blocks[0], blocks[1])
