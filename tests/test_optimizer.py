"""The optimizer: bfloat16 parameters with float32 master weights follow float32 training (the
parameters are its weights rounded once), where plain bfloat16 updates below an ulp vanish."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

from eureka_jax.configs_common import base_config
from eureka_jax.train import MasterWeightsState, make_optimizer


def run(params, optim, steps=50):
    tx, _ = make_optimizer(optim, total_updates=steps)
    state = tx.init(params)

    @jax.jit
    def step(params, state, t):
        grads = jax.tree.map(lambda p: jnp.cos(t + jnp.arange(p.size).reshape(p.shape))
                             .astype(p.dtype), params)
        updates, state = tx.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    for t in range(steps):
        params, state = step(params, state, jnp.float32(t))
    return params, state


def optim_config(master: bool):
    optim = base_config().optim
    optim.lr, optim.warmup_fraction, optim.master_weights = 1e-3, 0.0, master
    return optim


def test_master_weights_follow_float32_training():
    weights = {"w": jnp.linspace(1.0, 1.9, 64).reshape(8, 8)}
    exact, _ = run(jax.tree.map(lambda x: x.astype(jnp.float32), weights), optim_config(False))
    low = jax.tree.map(lambda x: x.astype(jnp.bfloat16), weights)
    plain, _ = run(low, optim_config(False))
    mastered, state = run(low, optim_config(True))

    assert mastered["w"].dtype == jnp.bfloat16
    assert isinstance(state, MasterWeightsState) and state.master["w"].dtype == jnp.float32
    # The master copy is float32 training from the rounded start; the parameters its rounding.
    start = low["w"].astype(jnp.float32)
    moved = np.asarray(exact["w"]) - np.asarray(weights["w"])
    np.testing.assert_allclose(np.asarray(state.master["w"]) - np.asarray(start), moved,
                               rtol=0, atol=5e-5)  # bf16-rounded gradients: ~1% of a move
    np.testing.assert_array_equal(mastered["w"], state.master["w"].astype(jnp.bfloat16))
    # Without the master copy, steps of lr 1e-3 on weights in [1, 2) (a bf16 ulp is 2**-7)
    # round away: the parameters barely move.
    plain_moved = np.abs(np.asarray(plain["w"], np.float32) - np.asarray(start)).mean()
    mastered_moved = np.abs(np.asarray(mastered["w"], np.float32) - np.asarray(start)).mean()
    assert plain_moved < 0.2 * mastered_moved
