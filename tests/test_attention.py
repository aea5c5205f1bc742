"""eureka_jax.attention against a float64 NumPy reference, every backend that runs on CPU.

The chunked XLA path is checked on block sizes that do and do not divide T, causal attention
with left padding (a whole padded row included), GQA ratios 1/2/4, vision-style segments (windows
of unequal lengths, padding -1) with and without the distance bound, float32 and bfloat16, and
its custom VJP against the dense path's gradients. The Pallas splash path runs in TPU interpret
mode on tiny shapes (one 128 tile per side after padding T to 256); the cuDNN call's plumbing runs
through jax.nn.dot_product_attention(implementation="xla"). Every call is jitted.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eureka_jax import attention as attn
from eureka_jax import sharding
from eureka_jax.errors import InputError
from eureka_jax.models.decoder import TextConfig
from eureka_jax.models.qwen2_5_vl import Qwen25VL, Qwen25VLConfig, VisionConfig, VisionInputs
from eureka_jax.processing.layout import vision_layout

F32_TOLERANCE = 2e-5  # float32 attention vs float64: a few ulps of values of size ~1
BF16_TOLERANCE = 3e-2  # bfloat16 inputs and products vs float64 (8 significant bits)


# ---------------------------------------------------------------------------------------------
# Reference and inputs
# ---------------------------------------------------------------------------------------------


def reference(q, k, v, *, causal, kv_valid=None, segments=None, max_distance=None):
    """float64 loops: query t attends to the keys the mask allows; no key -> mean of values."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, n, h = q.shape
    group = n // k.shape[2]
    out = np.zeros_like(q)
    for row in range(b):
        for i in range(t):
            allowed = np.ones(t, bool) if kv_valid is None else kv_valid[row].copy()
            if segments is not None:
                allowed &= (segments[row] == segments[row, i]) & (segments[row] >= 0)
            if causal:
                allowed &= np.arange(t) <= i
            if max_distance is not None:
                allowed &= np.abs(np.arange(t) - i) <= max_distance
            for head in range(n):
                keys, values = k[row, :, head // group], v[row, :, head // group]
                if not allowed.any():
                    out[row, i, head] = values.mean(0)
                    continue
                scores = keys[allowed] @ q[row, i, head] / np.sqrt(h)
                weights = np.exp(scores - scores.max())
                out[row, i, head] = weights @ values[allowed] / weights.sum()
    return out


def qkv(b, t, n, kv_heads, h, seed=0, dtype=jnp.float32):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(b, t, n, h)) * 1.5
    k = rng.normal(size=(b, t, kv_heads, h)) * 1.5
    v = rng.normal(size=(b, t, kv_heads, h))
    return tuple(jnp.asarray(x, dtype) for x in (q, k, v))


def left_padding(b, t):
    """Row 0 unpadded, row 1 left-padded, row 2 (if any) all padding."""
    valid = np.ones((b, t), bool)
    valid[1, : t // 3] = False
    if b > 2:
        valid[2] = False
    return valid


def window_segments(b, t, lengths=(16, 9, 16, 3, 12, 7)):
    """Contiguous windows of unequal lengths (at most 16), then padding (-1); row 1 also starts
    with another layout so the rows differ."""
    segments = np.full((b, t), -1, np.int32)
    for row in range(b):
        order = lengths if row % 2 == 0 else lengths[::-1]
        ids = np.concatenate([np.full(n, i) for i, n in enumerate(order)])[: t - 5]
        segments[row, : len(ids)] = ids + 100 * row
    return segments


WINDOW_BOUND = 15  # window_segments: windows of at most 16 positions

CASES = {
    "causal_left_padding": lambda b, t: dict(causal=True, kv_valid=left_padding(b, t)),
    "windows_bounded": lambda b, t: dict(causal=False, segments=window_segments(b, t),
                                         max_distance=WINDOW_BOUND),
    "images_unbounded": lambda b, t: dict(causal=False, segments=window_segments(
        b, t, lengths=(30, 41))),
    "causal_local_padding": lambda b, t: dict(causal=True, kv_valid=left_padding(b, t),
                                              max_distance=10),
}


def run(q, k, v, *, causal, kv_valid=None, segments=None, max_distance=None, **options):
    """attention(...) jitted, the masks as arrays."""
    fn = functools.partial(attn.attention, causal=causal, max_distance=max_distance, **options)
    masks = dict(kv_valid_BxS=None if kv_valid is None else jnp.asarray(kv_valid),
                 segment_ids_BxS=None if segments is None else jnp.asarray(segments))
    return jax.jit(lambda q, k, v, masks: fn(q, k, v, **masks))(q, k, v, masks)


def assert_close(ours, expected, tolerance, what=""):
    ours = np.asarray(jnp.asarray(ours, jnp.float32), np.float64)
    assert np.isfinite(ours).all(), what
    error = np.abs(ours - expected).max()
    assert error <= tolerance, f"{what}: max |diff| {error:.3e} > {tolerance:.1e}"


# ---------------------------------------------------------------------------------------------
# xla (chunked) and dense
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("group", [1, 2, 4])
@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("implementation", ["xla", "dense"])
def test_matches_reference(implementation, case, group):
    b, t = 3, 100
    masks = CASES[case](b, t)
    q, k, v = qkv(b, t, 4, 4 // group, 8, seed=group)
    expected = reference(q, k, v, **masks)
    # Blocks that do not divide T: 24-query blocks over 40-key chunks.
    out = run(q, k, v, implementation=implementation, block_q=24, block_k=40, **masks)
    assert out.shape == q.shape and out.dtype == q.dtype
    assert_close(out, expected, F32_TOLERANCE, f"{implementation} {case} G={group}")


@pytest.mark.parametrize("block_q,block_k", [(8, 8), (16, 5), (7, 33), (100, 100), (128, 512),
                                             (1, 64)])
@pytest.mark.parametrize("case", ["causal_left_padding", "windows_bounded"])
def test_xla_block_sizes(case, block_q, block_k):
    b, t = 2, 100
    masks = CASES[case](b, t)
    q, k, v = qkv(b, t, 4, 2, 8)
    out = run(q, k, v, implementation="xla", block_q=block_q, block_k=block_k, **masks)
    assert_close(out, reference(q, k, v, **masks), F32_TOLERANCE, f"blocks {block_q}x{block_k}")


def test_xla_default_blocks_vision_shape():
    """The default tiles (128-query blocks, one 128 + 2 * bound key chunk) on a window-ordered
    stream longer than one block."""
    b, t = 1, 300
    segments = window_segments(b, t, lengths=(64, 40, 64, 16, 64, 30))
    q, k, v = qkv(b, t, 2, 2, 16)
    masks = dict(causal=False, segments=segments, max_distance=63)
    out = run(q, k, v, implementation="xla", **masks)
    assert_close(out, reference(q, k, v, **masks), F32_TOLERANCE)


@pytest.mark.parametrize("case", ["causal_left_padding", "windows_bounded"])
@pytest.mark.parametrize("implementation", ["xla", "dense"])
def test_bfloat16(implementation, case):
    b, t = 2, 64
    masks = CASES[case](b, t)
    q, k, v = qkv(b, t, 4, 2, 16, dtype=jnp.bfloat16)
    out = run(q, k, v, implementation=implementation, block_q=16, block_k=24, **masks)
    assert out.dtype == jnp.bfloat16
    assert_close(out, reference(q, k, v, **masks), BF16_TOLERANCE, implementation)


@pytest.mark.parametrize("case", list(CASES))
def test_xla_gradients_match_dense(case):
    """The custom VJP (tile-by-tile recomputation) against autodiff of the dense path, through a
    loss that weights every output element differently."""
    b, t = 3, 50
    masks = CASES[case](b, t)
    q, k, v = qkv(b, t, 4, 2, 8, seed=3)
    weights = jnp.asarray(np.random.default_rng(4).normal(size=q.shape), jnp.float32)

    def grads(implementation, **blocks):
        def loss(q, k, v):
            return jnp.sum(run(q, k, v, implementation=implementation, **blocks, **masks)
                           * weights)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    expected = grads("dense")
    for name, ours, dense in zip("qkv", grads("xla", block_q=16, block_k=12), expected,
                                 strict=True):
        scale = float(jnp.abs(dense).max())
        assert_close(ours, np.asarray(dense, np.float64), 1e-5 * max(scale, 1.0), f"d{name}")


def test_xla_bfloat16_gradients_match_dense():
    b, t = 2, 50
    masks = CASES["causal_left_padding"](b, t)
    q, k, v = qkv(b, t, 4, 2, 8, seed=8, dtype=jnp.bfloat16)

    def grads(implementation, **blocks):
        def loss(q, k, v):
            out = run(q, k, v, implementation=implementation, **blocks, **masks)
            return jnp.sum(out.astype(jnp.float32) * jnp.cos(jnp.arange(8)))
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for name, ours, dense in zip("qkv", grads("xla", block_q=16, block_k=12), grads("dense"),
                                 strict=True):
        assert ours.dtype == jnp.bfloat16
        scale = float(jnp.abs(dense.astype(jnp.float32)).max())
        assert_close(ours, np.asarray(dense.astype(jnp.float32), np.float64),
                     BF16_TOLERANCE * scale, f"d{name}")


def test_xla_memory_is_linear_in_length():
    """Forward and backward of the chunked path keep no [B, N, T, S] tensor: XLA's own count of
    temporary bytes hardly grows from T=2048 to 4096 and stays a fraction of one score tensor."""
    b, n, h = 1, 4, 32

    def temp_bytes(implementation, t):
        q, k, v = qkv(b, t, n, n, h)
        valid = jnp.ones((b, t), bool)

        def loss(q, k, v):
            return attn.attention(q, k, v, causal=True, kv_valid_BxS=valid,
                                  implementation=implementation).sum()
        compiled = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(q, k, v).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    scores_bytes = b * n * 4096 * 4096 * 4
    assert temp_bytes("dense", 4096) >= scores_bytes  # the reference does materialise them
    chunked = temp_bytes("xla", 4096)
    assert chunked < scores_bytes / 8
    assert chunked < 1.25 * temp_bytes("xla", 2048)


def test_model_window_bound_covers_the_layout_windows():
    """The vision tower's distance bound (window_patches - 1) holds for the windows that
    processing/layout.py builds: each window is one contiguous run of at most window_patches."""
    for window_size, grids in [(112, [[1, 12, 16], [2, 6, 4], [1, 34, 2]]), (56, [[1, 10, 6]])]:
        config = VisionConfig(window_size=window_size)
        layout = vision_layout(grids, patch_budget=2048, window_size=window_size)
        segments = layout.window_segment_P[: layout.num_patches]
        starts = np.flatnonzero(np.r_[True, segments[1:] != segments[:-1]])
        lengths = np.diff(np.r_[starts, len(segments)])
        assert len(np.unique(segments)) == len(starts), "a window is not contiguous"
        assert lengths.max() == config.window_patches, (window_size, lengths.max())


def test_model_dense_and_xla_agree():
    """The model with attention_impl "xla" (what "auto" picks on CPU) against "dense": vision
    tower on a real window layout and a left-padded decoder forward, plus their gradients."""
    def make(impl):
        config = Qwen25VLConfig(
            vision=VisionConfig(depth=2, hidden_size=32, intermediate_size=64, num_heads=2,
                                out_hidden_size=64, fullatt_block_indexes=(1,)),
            text=TextConfig(vocab_size=97, hidden_size=64, intermediate_size=96,
                            num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=2,
                            mrope_section=(2, 3, 3)),
            attention_impl=impl)
        return Qwen25VL(config, nnx.Rngs(0))

    rng = np.random.default_rng(0)
    layout = vision_layout([[1, 12, 16], [1, 6, 4]], patch_budget=256)
    config = make("dense").config
    vision = VisionInputs(
        patches_BxPxC=jnp.asarray(rng.normal(size=(1, 256, config.vision.patch_features)),
                                  jnp.float32),
        pos_hw_BxPx2=jnp.asarray(layout.pos_hw_Px2[None]),
        window_segment_BxP=jnp.asarray(layout.window_segment_P[None]),
        image_segment_BxP=jnp.asarray(layout.image_segment_P[None]))
    t = 40
    ids = jnp.asarray(rng.integers(0, 97, size=(2, t)))
    mask = jnp.asarray(left_padding(2, t))
    positions = jnp.broadcast_to(jnp.cumsum(mask, axis=1) - 1, (3, 2, t)).clip(0)

    def outputs(model):
        @nnx.jit
        def forward(model):
            def loss(model):
                features = model.encode_images(vision)
                logits = model(ids, positions, mask)
                return (jnp.sum(features**2) + jnp.sum(jnp.where(mask[..., None], logits, 0)**2),
                        (features, logits))
            return nnx.grad(loss, has_aux=True)(model)
        grads, (features, logits) = forward(model)
        return features, logits, grads

    dense, xla = outputs(make("dense")), outputs(make("xla"))
    real = layout.num_patches // config.vision.merge_unit
    np.testing.assert_allclose(xla[0][:, :real], dense[0][:, :real], rtol=0, atol=2e-5)
    np.testing.assert_allclose(np.asarray(xla[1])[np.asarray(mask)],
                               np.asarray(dense[1])[np.asarray(mask)], rtol=0, atol=2e-5)
    for path, ours in nnx.to_flat_state(xla[2]):
        expected = dict(nnx.to_flat_state(dense[2]))[path]
        scale = float(jnp.abs(expected[...]).max())
        np.testing.assert_allclose(ours[...], expected[...], rtol=0, atol=1e-4 * max(scale, 1),
                                   err_msg=str(path))


# ---------------------------------------------------------------------------------------------
# Choosing the backend
# ---------------------------------------------------------------------------------------------


def test_implementation_is_validated():
    q, k, v = qkv(1, 8, 2, 2, 8)
    with pytest.raises(InputError, match="attention_impl"):
        attn.attention(q, k, v, causal=True, implementation="flash")
    with pytest.raises(InputError, match="attention_impl"):
        Qwen25VLConfig(attention_impl="splash")
    assert attn.resolve_implementation("auto", jnp.float32) == "xla"  # CPU
    assert attn.resolve_implementation("dense", jnp.bfloat16) == "dense"


def test_cudnn_rejects_float32():
    q, k, v = qkv(1, 8, 2, 2, 8)
    with pytest.raises(InputError, match="bfloat16"):
        run(q, k, v, causal=True, implementation="cudnn")


# ---------------------------------------------------------------------------------------------
# cudnn plumbing (the same jax.nn.dot_product_attention call with the XLA implementation)
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_dot_product_attention_call_matches_reference(case):
    b, t = 3, 40
    masks = CASES[case](b, t)
    q, k, v = qkv(b, t, 4, 2, 8)

    @jax.jit
    def call(q, k, v, kv_valid, segments):
        b, t, n, h = q.shape
        kv_heads = k.shape[2]
        valid = kv_valid if segments is None else kv_valid & (segments >= 0)
        mask = attn._Mask(masks["causal"], masks.get("max_distance"))
        out = attn._dot_product_attention(q.reshape(b, t, kv_heads, n // kv_heads, h), k, v,
                                          segments, valid, mask, implementation="xla")
        has_key = attn._rows_with_keys(segments, valid, mask)
        return attn._fill_keyless_rows(out, v, has_key).reshape(q.shape)

    kv_valid = masks.get("kv_valid", np.ones((b, t), bool))
    segments = masks.get("segments")
    out = call(q, k, v, jnp.asarray(kv_valid), None if segments is None else jnp.asarray(segments))
    assert_close(out, reference(q, k, v, **masks), F32_TOLERANCE, case)


# ---------------------------------------------------------------------------------------------
# pallas_tpu in TPU interpret mode
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def tpu_interpret():
    from jax.experimental.pallas import tpu as pltpu

    with pltpu.force_tpu_interpret_mode():
        yield


SPLASH_CASES = {
    "causal_left_padding": lambda b, t: dict(causal=True, kv_valid=left_padding(b, t)),
    "windows_bounded": lambda b, t: dict(causal=False, segments=window_segments(b, t),
                                         max_distance=WINDOW_BOUND),
    "images_unbounded": CASES["images_unbounded"],
}


@pytest.mark.parametrize("case", list(SPLASH_CASES))
def test_pallas_tpu_matches_reference(case, tpu_interpret):
    b, t = 2, 200  # padded to 256: two 128 tiles per side
    masks = SPLASH_CASES[case](b, t)
    q, k, v = qkv(b, t, 2, 1, 128)
    out = run(q, k, v, implementation="pallas_tpu", block_q=128, block_k=128, **masks)
    assert_close(out, reference(q, k, v, **masks), F32_TOLERANCE, case)


def test_pallas_tpu_gradients_match_dense(tpu_interpret):
    b, t = 1, 200
    masks = CASES["causal_left_padding"](2, t)
    masks["kv_valid"] = masks["kv_valid"][1:]
    q, k, v = qkv(b, t, 2, 1, 128, seed=5)
    weights = jnp.asarray(np.random.default_rng(6).normal(size=q.shape), jnp.float32)

    def grads(implementation, **blocks):
        def loss(q, k, v):
            return jnp.sum(run(q, k, v, implementation=implementation, **blocks, **masks)
                           * weights)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))(q, k, v)

    for name, ours, dense in zip("qkv", grads("pallas_tpu", block_q=128, block_k=128),
                                 grads("dense"), strict=True):
        scale = float(jnp.abs(dense).max())
        assert_close(ours, np.asarray(dense, np.float64), 1e-5 * max(scale, 1.0), f"d{name}")


def test_pallas_tpu_on_a_mesh(tpu_interpret):
    """Under an active mesh the kernel runs per shard (shard_map over batch and kv heads)."""
    b, t = 2, 130
    masks = CASES["causal_left_padding"](b, t)
    q, k, v = qkv(b, t, 4, 2, 128, seed=7)
    mesh = sharding.make_mesh((2, 1, 2))
    with sharding.activate(mesh):
        out = run(q, k, v, implementation="pallas_tpu", block_q=128, block_k=128, **masks)
    assert_close(out, reference(q, k, v, **masks), F32_TOLERANCE)
