"""The dense projection every layer uses (decoder.project): the same values and gradients as the
plain product, and a backward pass XLA compiles without moving activation gradients through a
transpose (on CPU that copy made a dense layer's backward 1.4x slower)."""

import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from eureka_jax.models import decoder
from eureka_jax.models.qwen2_5_vl import Qwen25VLConfig

HIGHEST = jax.lax.Precision.HIGHEST


def test_project_matches_the_plain_product_and_its_gradients():
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 5, 6)), jnp.float32)
    kernel = jnp.asarray(rng.standard_normal((6, 4)), jnp.float32)

    def ours(x, kernel, in_axis):
        return jnp.sum(jnp.sin(decoder.project(x, kernel, kernel_in_axis=in_axis)))

    def reference(x, kernel):
        return jnp.sum(jnp.sin(jnp.einsum("btd,df->btf", x, kernel, precision=HIGHEST)))

    expected = jax.grad(reference, argnums=(0, 1))(x, kernel)
    for in_axis, k in ((0, kernel), (1, kernel.T)):
        assert decoder.project(x, k, kernel_in_axis=in_axis).shape == (2, 5, 4)
        np.testing.assert_allclose(ours(x, k, in_axis), reference(x, kernel), rtol=1e-6)
        grad_x, grad_k = jax.grad(ours, argnums=(0, 1))(x, k, in_axis)
        np.testing.assert_allclose(grad_x, expected[0], rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(grad_k if in_axis == 0 else grad_k.T, expected[1],
                                   rtol=1e-5, atol=1e-6)


def test_the_backward_of_scanned_mlp_layers_has_no_transpose():
    """Gradients of three SwiGLU layers run as the decoder runs them (stacked, lax.scan) on a
    [B, T, D] batch: the compiled program contracts the activations and their gradients as they
    lie. With the [B, T, D] activations fed to the product directly, XLA:CPU compiled three
    [F, B, T] transposes of the MLP's output gradients into this program."""
    config = Qwen25VLConfig()
    d, f = 32, 96

    class Layer(nnx.Module):
        def __init__(self, rngs):
            self.mlp = decoder.GatedMLP(d, f, "silu", ("embed", "mlp"), use_bias=False,
                                        config=config, rngs=rngs)

        def __call__(self, x):
            return x + self.mlp(x)

    graphdef, state = nnx.split(decoder.stacked(Layer, 3, nnx.Rngs(0)))
    x_BxTxD = jax.random.normal(jax.random.key(1), (4, 16, d))

    def loss(state, x):
        layers = nnx.merge(graphdef, state)
        y, _ = decoder.scan_layers(layers, lambda layer, h, _: (layer(h), None), x)
        return jnp.sum(y * y)

    program = jax.jit(jax.grad(loss)).lower(state, x_BxTxD).compile().as_text()
    transposes = re.findall(r"= f32\[[\d,]+\]\{[\d,]+\} transpose\(", program)
    assert not transposes, f"{len(transposes)} transposes in the compiled backward"
