"""The InternVL port's logits equal transformers' InternVLForConditionalGeneration (float32) on
tiny random checkpoints: Qwen2 and Llama decoders, GQA groups 1, 2 and 4, tied and untied heads,
and the vision options (QK norm, RMSNorm, final LayerNorm, vision_feature_layer) spread over them.

Bound: max |ours - reference| <= 1e-5 * max |reference| on logits with std >= 0.1 (initializer
range 0.2). The port runs each variant's prompts as ONE left-padded batch with a tile budget
(the sampler's and trainer's input); transformers runs each prompt alone, and a left-padded
batch of two with explicit position_ids.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from eureka_jax import internvl_testing as it
from eureka_jax.models import internvl_io
from eureka_jax.models.internvl import InternVL

REL_TOLERANCE = 1e-5
MIN_LOGIT_STD = 0.1
LENGTH, TILES = 48, 5  # the port's bucket: longest prompt 31 tokens, most tiles 5
BF16_REL_TOLERANCE = 0.1
BF16_MIN_GREEDY_AGREEMENT = 0.85


def port_logits(model, batch) -> np.ndarray:
    batch = jax.tree.map(jnp.asarray, batch)

    @jax.jit
    def forward(batch):
        return model(batch.input_ids_BxT, batch.positions_3xBxT, batch.attention_mask_BxT,
                     batch.vision, batch.token_source_BxT)

    return np.asarray(forward(batch))


class Run:
    """One variant: its checkpoint, the port's batched logits and the reference model."""

    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.model = internvl_io.load_model(model_dir)
        self.config = self.model.config
        self.prompts = {name: it.make_prompt(self.config, spec, seed)
                        for seed, (name, spec) in enumerate(it.PROMPTS.items())}
        self.batch = it.prompt_batch(list(self.prompts.values()), self.config, length=LENGTH,
                                     tiles=TILES)
        self.logits_BxTxV = port_logits(self.model, self.batch)
        self.reference = it.load_reference(model_dir)

    def ours(self, name):
        """The port's logits for one prompt, padding dropped: (T, V)."""
        row = list(self.prompts).index(name)
        return self.logits_BxTxV[row][self.batch.attention_mask_BxT[row]]

    def reference_logits(self, names):
        inputs = it.hf_inputs([self.prompts[n] for n in names], self.config)
        return it.reference_logits(self.reference, inputs), inputs


_RUNS: dict[str, Run] = {}


def _run(name, tmp_path_factory) -> Run:
    if name not in _RUNS:
        model_dir = it.make_hf_model_dir(tmp_path_factory.mktemp(name), **it.VARIANTS[name])
        _RUNS[name] = Run(model_dir)
    return _RUNS[name]


@pytest.fixture(scope="module", params=list(it.VARIANTS))
def run(request, tmp_path_factory):
    return _run(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def base_run(tmp_path_factory):
    return _run(next(iter(it.VARIANTS)), tmp_path_factory)


def assert_parity(ours_TxV, reference_TxV, what):
    reference_std = reference_TxV.std()
    assert reference_std >= MIN_LOGIT_STD, f"{what}: reference logits too flat ({reference_std})"
    max_diff = np.abs(ours_TxV - reference_TxV).max()
    bound = REL_TOLERANCE * np.abs(reference_TxV).max()
    assert max_diff <= bound, f"{what}: max |diff| {max_diff:.3e} > {bound:.3e}"


@pytest.mark.parametrize("prompt", list(it.PROMPTS))
def test_logits_match_transformers_per_prompt(run, prompt):
    reference_1xTxV, _ = run.reference_logits([prompt])
    assert_parity(run.ours(prompt), reference_1xTxV[0], prompt)


def test_left_padded_batch_of_two_matches_transformers(run):
    names = ["text", "two_images"]
    reference_BxTxV, inputs = run.reference_logits(names)
    for b, name in enumerate(names):
        valid = inputs["attention_mask"][b].numpy().astype(bool)
        assert_parity(run.ours(name), reference_BxTxV[b][valid], f"batch row {b} ({name})")


def test_images_change_the_logits(base_run):
    """The image prompts' parity is not vacuous: other pixels move the logits far beyond the
    bound (from the first image token on)."""
    import torch

    run = base_run
    reference_1xTxV, inputs = run.reference_logits(["many_tiles"])
    inputs["pixel_values"] = torch.flip(inputs["pixel_values"], dims=[0])
    moved_1xTxV = it.reference_logits(run.reference, inputs)
    change = np.abs(moved_1xTxV - reference_1xTxV).max()
    assert change > 1000 * REL_TOLERANCE * np.abs(reference_1xTxV).max(), change


def test_position_embedding_interpolated_for_other_tile_sizes(base_run):
    """Tiles of 84 px on a checkpoint trained at 56 px: transformers resamples the 4 x 4 position
    embedding to 6 x 6 (bicubic); so does the port."""
    run = base_run
    prompt = it.make_prompt(run.config, (3, 2, 4), seed=9, tile=84)
    batch = it.prompt_batch([prompt], run.config, length=32, tiles=3)
    ours_TxV = port_logits(run.model, batch)[0][batch.attention_mask_BxT[0]]
    reference_1xTxV = it.reference_logits(run.reference, it.hf_inputs([prompt], run.config))
    assert_parity(ours_TxV, reference_1xTxV[0], "84 px tiles")


def test_unjitted_forward_matches_transformers(base_run):
    """The same model op by op (no jax.jit), on one prompt alone and unpadded."""
    run = base_run
    prompt = run.prompts["two_images"]
    batch = jax.tree.map(jnp.asarray, it.prompt_batch([prompt], run.config,
                                                      length=len(prompt.input_ids_T), tiles=5))
    eager_TxV = np.asarray(run.model(batch.input_ids_BxT, batch.positions_3xBxT,
                                     batch.attention_mask_BxT, batch.vision,
                                     batch.token_source_BxT))[0]
    reference_1xTxV, _ = run.reference_logits(["two_images"])
    assert_parity(eager_TxV, reference_1xTxV[0], "un-jitted two_images")


def test_gradients_reach_the_vision_tower_and_skip_padding_tiles(base_run):
    """The loss's gradient is finite with NaN pixels in a padding tile (they are zeroed before
    the tower), reaches the vision tower, and stops at its output under freeze_vision."""
    from flax import nnx

    run = base_run
    batch = it.prompt_batch([run.prompts["one_tile"]], run.config, length=16, tiles=2)
    batch.vision.pixels_BxIxCxSxS[0, 1] = np.nan
    batch = jax.tree.map(jnp.asarray, batch)

    graphdef, state = nnx.split(run.model)

    def loss(state):
        logits = nnx.merge(graphdef, state)(
            batch.input_ids_BxT, batch.positions_3xBxT, batch.attention_mask_BxT, batch.vision,
            batch.token_source_BxT)
        return jnp.where(batch.attention_mask_BxT[..., None], logits, 0.0).std()

    grads = jax.jit(jax.grad(loss))(state)
    assert all(np.isfinite(np.asarray(g)).all() for g in jax.tree.leaves(grads))
    assert np.abs(np.asarray(grads["vision_tower"]["layers"]["mlp"]["fc1"]["kernel"][...])).max(
        ) > 1e-4

    frozen_config = run.config.replace(freeze_vision=True)
    frozen_graphdef = nnx.graphdef(nnx.eval_shape(lambda: InternVL(frozen_config, nnx.Rngs(0))))

    def features_sum(state):
        return nnx.merge(frozen_graphdef, state).encode_images(batch.vision).sum()

    frozen = jax.jit(jax.grad(features_sum))(state)
    assert all((np.asarray(g) == 0).all() for g in jax.tree.leaves(frozen))


def test_bfloat16_agreement(base_run, capsys):
    """bfloat16 parameters and compute against float32 transformers: a loose, measured bound."""
    run = base_run
    model = internvl_io.load_model(run.model_dir, param_dtype="bfloat16",
                                   compute_dtype="bfloat16")
    logits_BxTxV = port_logits(model, run.batch).astype(np.float32)
    diffs, agree = [], []
    for row, name in enumerate(run.prompts):
        reference_TxV = run.reference_logits([name])[0][0]
        ours_TxV = logits_BxTxV[row][run.batch.attention_mask_BxT[row]]
        diffs.append(np.abs(ours_TxV - reference_TxV).max() / np.abs(reference_TxV).max())
        agree.append((ours_TxV.argmax(-1) == reference_TxV.argmax(-1)).mean())
    with capsys.disabled():
        print(f"\nInternVL bfloat16 vs float32 transformers: rel_diff max {max(diffs):.4f}, "
              f"greedy agreement min {min(agree):.3f}")
    assert max(diffs) <= BF16_REL_TOLERANCE and min(agree) >= BF16_MIN_GREEDY_AGREEMENT
