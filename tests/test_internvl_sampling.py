"""The group sampler (eureka_jax.sampler.generate, unchanged) on the InternVL port: greedy tokens
equal transformers' `generate`, its log-probs equal the teacher-forced forward's, and a (2, 2, 2)
mesh samples what one device samples.

The batch is four left-padded prompts (text only, one tile, five tiles, two images) with a tile
budget of 5; transformers generates each prompt alone (its generate derives position_ids from
the attention mask, as the port's positions are). Both stop at the tiny config's eos token.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from eureka_jax import internvl_testing as it
from eureka_jax import sharding
from eureka_jax.models import internvl_io
from eureka_jax.sampler import Sampler, SamplingConfig

MAX_NEW = 10
LENGTH, TILES = 32, 5
# Two programs computing the same log-probs in different shapes (prefill + one-token steps vs
# one causal pass) round differently; on these 2-layer, width-64 models the difference is ~1e-6.
LOGPROB_TOLERANCE = 1e-5
GREEDY = SamplingConfig(greedy=True, max_new_tokens=MAX_NEW, stop_token_ids=(it.EOS_TOKEN_ID,))


class Run:
    def __init__(self, model_dir):
        self.model_dir = model_dir
        self.model = internvl_io.load_model(model_dir)
        self.config = self.model.config
        self.prompts = [it.make_prompt(self.config, spec, seed)
                        for seed, spec in enumerate(it.PROMPTS.values())]
        self.batch = it.prompt_batch(self.prompts, self.config, length=LENGTH, tiles=TILES)
        sampler = Sampler.for_model(self.model, GREEDY)
        out = sampler(nnx.state(self.model), jax.tree.map(jnp.asarray, self.batch), seed=0)
        self.out = jax.tree.map(np.asarray, out)


VARIANTS = ("qwen2_gqa2_untied", "llama_gqa4_tied")
_RUNS: dict[str, Run] = {}


def _run(name, tmp_path_factory) -> Run:
    if name not in _RUNS:
        model_dir = it.make_hf_model_dir(tmp_path_factory.mktemp(name), seed=5,
                                         **it.VARIANTS[name])
        _RUNS[name] = Run(model_dir)
    return _RUNS[name]


@pytest.fixture(scope="module", params=VARIANTS)
def run(request, tmp_path_factory):
    return _run(request.param, tmp_path_factory)


@pytest.fixture(scope="module")
def qwen_run(tmp_path_factory):
    return _run(VARIANTS[0], tmp_path_factory)


def test_greedy_tokens_equal_transformers_generate(run):
    import torch

    reference = it.load_reference(run.model_dir)
    for row, prompt in enumerate(run.prompts):
        inputs = it.hf_inputs([prompt], run.config)
        del inputs["position_ids"]  # generate computes them from the attention mask
        with torch.no_grad():
            generated = reference.generate(**inputs, do_sample=False, max_new_tokens=MAX_NEW,
                                           eos_token_id=it.EOS_TOKEN_ID,
                                           pad_token_id=it.PAD_TOKEN_ID)
        expected = generated[0, inputs["input_ids"].shape[1]:].numpy()
        length = run.out.lengths_N[row]
        assert length == len(expected), (row, run.out.tokens_NxL[row], expected)
        np.testing.assert_array_equal(run.out.tokens_NxL[row, :length], expected,
                                      err_msg=f"row {row}")


def teacher_forced_logprobs(model, batch, tokens_NxL) -> np.ndarray:
    """log p(token) [N, L] from one causal pass over prompt + generated tokens (1 sample per
    prompt), the tokens after a row's end masked out (their values are not compared)."""
    t = batch.input_ids_BxT.shape[1]
    length = tokens_NxL.shape[1]
    ids = np.concatenate([batch.input_ids_BxT, tokens_NxL], axis=1)
    mask = np.concatenate([batch.attention_mask_BxT, np.ones_like(tokens_NxL, bool)], axis=1)
    response_positions = batch.next_position_B[:, None] + np.arange(length)
    positions = np.concatenate(
        [batch.positions_3xBxT, np.broadcast_to(response_positions, (3, *tokens_NxL.shape))],
        axis=2)
    sources = np.concatenate([batch.token_source_BxT, np.full(tokens_NxL.shape, -1)], axis=1)

    @jax.jit
    def logprobs(ids, positions, mask, vision, sources, tokens):
        logits = model(ids, positions, mask, vision, sources)[:, t - 1: t - 1 + length]
        logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
        return jnp.take_along_axis(logp, tokens[..., None], axis=-1)[..., 0]

    return np.asarray(logprobs(ids, positions, mask, batch.vision, sources, tokens_NxL))


def test_sampler_logprobs_equal_teacher_forced(run):
    out = run.out
    valid_NxL = np.arange(MAX_NEW)[None] < out.lengths_N[:, None]
    forced_NxL = teacher_forced_logprobs(run.model, run.batch, out.tokens_NxL)
    diff = np.abs(np.where(valid_NxL, out.logprobs_NxL - forced_NxL, 0.0)).max()
    assert diff <= LOGPROB_TOLERANCE, diff
    assert (out.logprobs_NxL[valid_NxL] < 0).all()


def test_sharded_sampling_equals_one_device(qwen_run):
    """Parameters sharded over fsdp and tensor, 4 prompts (and their 20 tiles) over data x fsdp.
    This caught a partitioner miscompile that swapped tiles between rows (see Projector)."""
    run = qwen_run
    mesh = sharding.make_mesh((2, 2, 2))
    with sharding.activate(mesh):
        model = internvl_io.load_model(run.model_dir, mesh=mesh)
        graphdef, state = nnx.split(model)
        kernel = state["layers"]["mlp"]["gate_proj"]["kernel"][...]
        assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        out = Sampler(graphdef, GREEDY)(state, jax.device_put(run.batch, replicated), seed=0)
        out = jax.tree.map(np.asarray, out)
    np.testing.assert_array_equal(out.tokens_NxL, run.out.tokens_NxL)
    np.testing.assert_array_equal(out.lengths_N, run.out.lengths_N)
    valid_NxL = np.arange(MAX_NEW)[None] < out.lengths_N[:, None]
    diff = np.abs(np.where(valid_NxL, out.logprobs_NxL - run.out.logprobs_NxL, 0.0)).max()
    assert diff <= LOGPROB_TOLERANCE, diff
