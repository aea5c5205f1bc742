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

REL_TOLERANCE = 1e-5
MIN_LOGIT_STD = 0.1
LENGTH, TILES = 48, 5  # the port's bucket: longest prompt 31 tokens, most tiles 5


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
