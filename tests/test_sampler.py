"""The group sampler against transformers and against exact distributions.

One tiny random model (initializer_range 0.2: logits std ~1.4, so greedy decoding is not decided
by rounding) serves every test. Log-probs computed by two different programs are compared up to
an error model of float32 rounding (LOGPROB_BOUND). Each distinct (SamplingConfig, shape bucket)
compiles once, so tests share samplers where they can.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import stats

from eureka_jax import hf_io, sharding, testing
from eureka_jax.batch import Buckets
from eureka_jax.errors import InputError
from eureka_jax.models.decoder import KVCache, LayerKV
from eureka_jax.policy import make_forward_logprobs, response_logits, response_logprobs
from eureka_jax.processing import QwenVLProcessor
from eureka_jax.processing.qwen_rows import collate_prompts, prompt_row
from eureka_jax.rollout import rollout_train_batch
from eureka_jax.sampler import (
    FINISH_LENGTH,
    FINISH_STOP,
    Sampler,
    SamplingConfig,
    _draw,
    filter_logits,
)

GREEDY_TOKENS = 12
TEXT_BATCH = ("text_short", "text_long", "text_medium")
BUCKETS = Buckets(lengths=(32, 64, 128), patches=(0, 64, 256))
QUESTIONS = {
    "short": "2+2",
    "medium": "What is 3 + 4? Think step by step.",
    "long": "Find the value of x such that 3x + 5 = 20. The circle has radius 4, so its area is",
}
# How close two programs' log-probs of the same tokens must be. The sampler (a prefill, then one
# query per step against the prompt cache and the generated slots) and the teacher-forced
# forward (one causal pass over prompt + response), or the sampler with another batch, buffer or
# mesh, compute the same function in programs of different shapes, so they sum in different
# orders: XLA's CPU kernels block, vectorise and split a product over threads by shape, and
# Eigen with 1 thread rounds differently from Eigen with 2, so the differences vary by machine.
# They are spread over the whole network, not one step: on identical inputs layer 0's RMSNorm
# already differs by 2 ulps and its output by 6 ulps of its largest entry, the final hidden
# states by 13, the logits by up to 2.1e-5 (seeds 0-5, |logits| <= 7.8). The logsumexp averages
# that (<= 3e-6), the target logit does not.
#
# float32 error model. A float32 sum of n products, its roundings a random walk, is off by
# ~eps*sqrt(n) relative to the magnitude of its terms (Higham & Mary, SIAM J. Sci. Comput. 41,
# 2019). Each of the 2 * layers sublayers (attention, MLP) adds such an error with n ~ D (the
# projections and RMSNorm sum over D; the MLP's down projection and the attention over keys over
# a small multiple of it), errors of different sublayers are independent and add in quadrature,
# and the LM head carries the hidden states' relative error into the logits, so logits of size
# max|z| (over the compared tokens) differ by about
#     scale = eps_f32 * sqrt(2 * layers * D) * max|z|,
# and log p = z_y - logsumexp(z) takes that once from the target logit and once from the
# logsumexp: |d log p| <= LOGPROB_BOUND["float32"] = 2 scales. The test model has 2 layers and
# D 64 (sqrt(256) = 16) and max|z| 6.6-8.9, so scale = 1.3e-5 to 1.7e-5. Measured on the test
# below over 300 sampler seeds (seed 3 is the one the test uses), max over the 128 tokens of
# |d log p| / scale: with 2 threads median 0.37, 90% 0.52, max 0.99 (seed 3: 0.99, 1.48e-5);
# with 1 thread 0.37, 0.52, 0.97 (seed 3: 0.67); 99.9% of all tokens below 0.5. The scale follows
# the architecture (60 seeds each: 4 layers max 1.01; D 128 max 0.77) but not the weights' scale
# (initializer_range 0.3: 1.39), which changes how much the layers amplify an error.
#
# bfloat16 (eps 2^-7): products accumulate in float32 and round only their outputs, so the paths'
# float32 differences rarely flip a bfloat16 rounding, and most log-probs are bitwise equal. A
# flip in a logit moves log p by at most one bfloat16 ulp of the logits, scale = eps_bf16 *
# max|z|; a flip in a hidden state by a few, on its token and, through the cache, on later ones.
# Measured over 300 seeds (2 threads; the first 100 also with 1 thread: max 1.68 again): max / scale
# median 0.0, at most 0.74 but in one seed 1.68 (seed 89: 3 ulps of a logit of 4.3 after an
# upstream flip; seed 3: 0.47), so LOGPROB_BOUND["bfloat16"] = 4 scales (0.23 for seed 3).
#
# A real mismatch moves most tokens, not a few, so the median |d log p| must stay below
# LOGPROB_MEDIAN_FACTOR scales (per-seed medians: at most 0.094 in float32 over the 300 seeds, 0 in
# bfloat16). The float32 test checks that small mismatches are caught: logits 1e-5 too large (the
# final norm's gain x (1 + 1e-5)) put the median at >= 0.60 (40 seeds), layer 0's query bias
# x (1 + 1e-4) puts the max at >= 5.3.
LOGPROB_BOUND = {"float32": 2.0, "bfloat16": 4.0}
LOGPROB_MEDIAN_FACTOR = 0.25


# ---------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return testing.make_hf_model_dir(tmp_path_factory.mktemp("sampler_model"),
                                     initializer_range=0.2)


@pytest.fixture(scope="module")
def model(model_dir):
    return hf_io.load_model(model_dir)


@pytest.fixture(scope="module")
def params(model):
    return nnx.state(model)


@pytest.fixture(scope="module")
def processor(model_dir):
    return QwenVLProcessor.from_pretrained(model_dir)


@pytest.fixture(scope="module")
def prompts(processor):
    """Encoded prompts by name: three text lengths, images of four sizes, two images at once."""
    encode = processor.encode
    return {
        **{f"text_{name}": encode(question=q) for name, q in QUESTIONS.items()},
        "image_small": encode(question="What is shown?", images=[testing.draw_image(30, 40, 1)]),
        "image_wide": encode(question="Count the shapes in the picture.",
                             images=[testing.draw_image(200, 120, 2)]),
        "image_tall": encode(question="2+2", images=[testing.draw_image(40, 130, 3)]),
        "two_images": encode(question="Compare them.", images=[testing.draw_image(60, 45, 4),
                                                              testing.draw_image(90, 60, 5)]),
    }


@pytest.fixture(scope="module")
def hf_model(model_dir):
    import torch
    from transformers import Qwen2_5_VLForConditionalGeneration

    return Qwen2_5_VLForConditionalGeneration.from_pretrained(
        str(model_dir), dtype=torch.float32).eval()


def make_batch(model, processor, encoded, keys=None, buckets=BUCKETS):
    rows = [prompt_row(e, model.config) for e in encoded]
    batch = collate_prompts(rows, buckets, pad_token_id=processor.pad_token_id, prompt_keys=keys)
    return jax.tree.map(jnp.asarray, batch)


def sample(sampler, params, batch, seed=0):
    return jax.device_get(sampler(params, batch, seed))


def rounding_scale(config, logits_BxLxV, mask_BxL):
    """How far rounding alone moves a log-probability computed by another program, for the
    masked tokens (see the error model above)."""
    dtype = logits_BxLxV.dtype
    largest = float(np.abs(np.asarray(logits_BxLxV, np.float32)).max(axis=-1)[mask_BxL].max())
    scale = float(jnp.finfo(dtype).eps) * largest
    if dtype == jnp.float32:
        scale *= np.sqrt(2 * config.text.num_hidden_layers * config.text.hidden_size)
    return scale


def logprob_mismatch(logp_BxL, expected_BxL, mask_BxL, scale):
    """(max, median) over the masked tokens of |logp - expected| / rounding scale."""
    ratio = np.abs(np.asarray(logp_BxL) - np.asarray(expected_BxL))[mask_BxL] / scale
    return float(ratio.max()), float(np.median(ratio))


def assert_logprobs_agree(logp_BxL, expected_BxL, mask_BxL, scale, bound=LOGPROB_BOUND["float32"]):
    worst, median = logprob_mismatch(logp_BxL, expected_BxL, mask_BxL, scale)
    assert worst <= bound and median <= LOGPROB_MEDIAN_FACTOR, (
        f"|d log p| / rounding scale {scale:.2e}: max {worst:.2f} (bound {bound}), "
        f"median {median:.3f} (bound {LOGPROB_MEDIAN_FACTOR})")


def generated_mask(output):
    """bool [N, L]: the tokens a SampleOutput generated (up to and including a stop token)."""
    return np.arange(output.tokens_NxL.shape[1])[None, :] < np.asarray(output.lengths_N)[:, None]


def edited_state(graphdef, state, change):
    """A copy of `state` after change(model) edits the merged model's parameters in place."""
    model = nnx.merge(graphdef, state, copy=True)
    change(model)
    return nnx.state(model)


@pytest.fixture(scope="module")
def greedy_sampler(model):
    return Sampler.for_model(model, SamplingConfig(greedy=True, max_new_tokens=GREEDY_TOKENS))


@pytest.fixture(scope="module")
def temperature_sampler(model):
    """Plain temperature-1 sampling with nucleus filtering, shared by several tests."""
    return Sampler.for_model(model, SamplingConfig(num_samples=3, max_new_tokens=10, top_p=0.95))


@pytest.fixture(scope="module")
def response_scale(model, params):
    """Rounding scale of a SampleOutput's tokens, from their teacher-forced logits."""
    graphdef = nnx.graphdef(model)
    forward = jax.jit(lambda s, b: response_logits(nnx.merge(graphdef, s), b))

    def scale(batch, output, group):
        train_batch = rollout_train_batch(batch, jax.tree.map(jnp.asarray, output), group)
        return rounding_scale(model.config, forward(params, train_batch),
                              np.asarray(train_batch.response_mask_BxL))

    return scale


# ---------------------------------------------------------------------------------------------
# Greedy decoding == transformers generate
# ---------------------------------------------------------------------------------------------


def hf_greedy(hf_model, encoded, image_token_id, max_new_tokens):
    """transformers' greedy tokens for one unpadded prompt, and the min std of its step logits."""
    import torch

    ids = torch.as_tensor(encoded.input_ids[None].astype(np.int64))
    kwargs = {"input_ids": ids, "mm_token_type_ids": (ids == image_token_id).long()}
    if encoded.patches:
        kwargs["pixel_values"] = torch.as_tensor(np.concatenate(encoded.patches))
        kwargs["image_grid_thw"] = torch.as_tensor(encoded.image_grid_thw.astype(np.int64))
    hf_model.model.rope_deltas = None  # state kept between calls; these are independent
    with torch.no_grad():
        out = hf_model.generate(**kwargs, do_sample=False, max_new_tokens=max_new_tokens,
                                min_new_tokens=max_new_tokens, eos_token_id=None,
                                output_logits=True, return_dict_in_generate=True)
    tokens = out.sequences[0, ids.shape[1]:].numpy()
    logits_std = min(float(step.std()) for step in out.logits)
    return tokens, logits_std


@pytest.mark.parametrize("names", [
    TEXT_BATCH, ("image_small", "text_long", "image_wide", "two_images"),
], ids=["text", "images_mixed"])
def test_greedy_matches_transformers(names, model, params, processor, prompts, hf_model,
                                     greedy_sampler):
    out = sample(greedy_sampler, params, make_batch(model, processor, [prompts[n] for n in names]))
    max_new = GREEDY_TOKENS
    for row, name in enumerate(names):
        expected, logits_std = hf_greedy(hf_model, prompts[name], model.config.image_token_id,
                                         max_new)
        assert logits_std >= 0.1, f"{name}: logits too flat for a meaningful greedy comparison"
        np.testing.assert_array_equal(out.tokens_NxL[row], expected, err_msg=name)
    assert (out.lengths_N == max_new).all() and (out.finish_N == FINISH_LENGTH).all()


def assert_greedy_like_transformers_and_default(sampler, model, params, processor, prompts,
                                                hf_model, greedy_sampler, response_scale):
    """`sampler` on an image prompt and a long text prompt: transformers' greedy tokens, and the
    default sampler's log-probs up to float32 rounding (the bound above the fixtures)."""
    names = ("image_small", "text_long")
    batch = make_batch(model, processor, [prompts[n] for n in names])
    out = sample(sampler, params, batch)
    for row, name in enumerate(names):
        expected, _ = hf_greedy(hf_model, prompts[name], model.config.image_token_id,
                                GREEDY_TOKENS)
        np.testing.assert_array_equal(out.tokens_NxL[row], expected, err_msg=name)
    default = sample(greedy_sampler, params, batch)
    assert_logprobs_agree(out.logprobs_NxL, default.logprobs_NxL, generated_mask(default),
                          response_scale(batch, default, 1))


@pytest.mark.parametrize("phases", [1, 5, GREEDY_TOKENS])
def test_generated_buffer_grows_in_phases(phases, model, params, processor, prompts, hf_model,
                                          greedy_sampler, response_scale):
    """However many times the generated-token buffer grows (1: one buffer for all 12 tokens; 5:
    buffers of 3, 5, 8, 10, 12 slots; 12: one slot more each step), the tokens are
    transformers' and the log-probs those of the default (4-phase) sampler, up to float32
    rounding (the products have other lengths; the bound above the fixtures)."""
    config = dataclasses.replace(greedy_sampler.config, cache_phases=phases)
    assert len(config.phase_ends()) == phases and config.phase_ends()[-1] == GREEDY_TOKENS
    sampler = Sampler(greedy_sampler.graphdef, config)
    assert_greedy_like_transformers_and_default(sampler, model, params, processor, prompts,
                                                hf_model, greedy_sampler, response_scale)


@pytest.mark.parametrize("layer_loop", ["scan", "unrolled"])
def test_both_layer_loops_decode_like_transformers(layer_loop, model, params, processor, prompts,
                                                   hf_model, greedy_sampler, response_scale):
    """Decoding scanned over the stacked layers or unrolled over per-layer weights: transformers'
    tokens, and the default sampler's log-probs up to float32 rounding. "auto" picks unrolled
    on CPU and scan on TPU (plan lowers for TPU devices from this CPU host)."""
    config = dataclasses.replace(greedy_sampler.config, layer_loop=layer_loop)
    sampler = Sampler(greedy_sampler.graphdef, config)
    assert_greedy_like_transformers_and_default(sampler, model, params, processor, prompts,
                                                hf_model, greedy_sampler, response_scale)
    auto = SamplingConfig(layer_loop="auto")
    assert (auto.for_platform("cpu").layer_loop, auto.for_platform("tpu").layer_loop) == (
        "unrolled", "scan")
    assert config.for_platform("cpu").layer_loop == layer_loop
    with pytest.raises(InputError, match="layer_loop must be one of"):
        SamplingConfig(layer_loop="vmap")


def test_early_stop_skips_the_later_phases(model, params, processor, prompts, greedy_sampler):
    """Every sample stops in the first phase: the later phases' loops run no step."""
    batch = make_batch(model, processor, [prompts["text_short"]])
    first = int(sample(greedy_sampler, params, batch).tokens_NxL[0, 1])
    config = dataclasses.replace(greedy_sampler.config, stop_token_ids=(first,))
    out = sample(Sampler(greedy_sampler.graphdef, config), params, batch)
    stop_at = int(np.argmax(np.asarray(out.tokens_NxL[0]) == first))
    assert stop_at <= 1 and int(out.num_steps) == stop_at + 1 <= config.phase_ends()[0]
    assert int(out.lengths_N[0]) == stop_at + 1 and int(out.finish_N[0]) == FINISH_STOP


def test_cache_grow_keeps_the_filled_slots():
    # Two stacked layers [Y, N, K, H, L] / [Y, N, K, L, H], two samples, two filled slots.
    layers = LayerKV(prompt_k=jnp.ones((2, 1, 1, 2, 3)), prompt_v=jnp.ones((2, 1, 1, 3, 2)),
                     gen_k=jnp.arange(16.0).reshape(2, 2, 1, 2, 2),
                     gen_v=jnp.arange(16.0).reshape(2, 2, 1, 2, 2) + 20)
    cache = KVCache(layers=layers, prompt_valid_PxT=jnp.ones((1, 3), bool))
    grown = cache.grow(5)
    assert grown.gen_length == 5 and grown.layers.gen_v.shape == (2, 2, 1, 5, 2)
    assert grown.layers.gen_k.shape == (2, 2, 1, 2, 5)
    np.testing.assert_array_equal(grown.layers.gen_k[..., :2], layers.gen_k)
    np.testing.assert_array_equal(grown.layers.gen_v[:, :, :, :2], layers.gen_v)
    assert not grown.layers.gen_k[..., 2:].any() and not grown.layers.gen_v[:, :, :, 2:].any()
    assert cache.grow(2) is cache
    with pytest.raises(ValueError, match="shrink"):
        cache.grow(1)


# ---------------------------------------------------------------------------------------------
# Sampler log-probs == teacher-forced log-probs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_logprobs_match_teacher_forced_forward(dtype, model_dir, processor, prompts):
    """Sampled tokens' log-probs == the teacher-forced forward's, up to rounding (the error model
    above the fixtures); in float32, a 1e-5 error in the logits or 1e-4 in one bias is caught."""
    model = hf_io.load_model(model_dir, param_dtype=dtype, compute_dtype=dtype)
    graphdef, state = nnx.split(model)
    group = 4
    sampler = Sampler(graphdef, SamplingConfig(num_samples=group, max_new_tokens=16))
    names = ("image_small", "text_long")
    batch = make_batch(model, processor, [prompts[n] for n in names])
    output = sampler(state, batch, 3)
    train_batch = rollout_train_batch(batch, output, group)

    def forward(s, b):
        model = nnx.merge(graphdef, s)
        return response_logprobs(model, b)[0], response_logits(model, b)

    forward = jax.jit(forward)
    teacher_forced, logits = forward(state, train_batch)
    mask = np.asarray(train_batch.response_mask_BxL)
    scale = rounding_scale(model.config, logits, mask)
    sampled = np.asarray(output.logprobs_NxL)
    diff = np.abs(np.asarray(teacher_forced) - sampled)[mask]
    worst, median = logprob_mismatch(teacher_forced, sampled, mask, scale)
    print(f"\n{dtype}: sampler vs teacher-forced log-probs over {mask.sum()} tokens: "
          f"max |diff| {diff.max():.3e}, median {np.median(diff):.3e}; / rounding scale "
          f"{scale:.2e}: max {worst:.2f}, median {median:.3f}")
    assert_logprobs_agree(teacher_forced, sampled, mask, scale, LOGPROB_BOUND[dtype])
    if dtype != "float32":
        return
    # The rollout's forward one prompt's group per pass (image prompt, then text prompt) gives
    # the whole-batch forward's log-probs.
    pieced = make_forward_logprobs(graphdef, sequences_per_pass=group)(state, train_batch)
    np.testing.assert_allclose(np.asarray(pieced)[mask], np.asarray(teacher_forced)[mask],
                               rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="do not split"):
        make_forward_logprobs(graphdef, sequences_per_pass=3)(state, train_batch)

    def logits_larger(m):  # every logit 1e-5 (relative) too large
        m.norm.scale[...] *= 1 + 1e-5

    def query_bias_off(m):  # the first decoder layer's (index 0 of the stacked layer axis)
        bias = m.layers.self_attn.q_proj.bias
        bias[...] = bias[...].at[0].multiply(1 + 1e-4)

    larger, _ = forward(edited_state(graphdef, state, logits_larger), train_batch)
    biased, _ = forward(edited_state(graphdef, state, query_bias_off), train_batch)
    larger_max, larger_median = logprob_mismatch(larger, sampled, mask, scale)
    biased_max, biased_median = logprob_mismatch(biased, sampled, mask, scale)
    print(f"logits 1e-5 too large: max {larger_max:.2f}, median {larger_median:.3f}; "
          f"query bias 1e-4 off: max {biased_max:.2f}, median {biased_median:.3f}")
    assert larger_median > LOGPROB_MEDIAN_FACTOR
    assert biased_max > LOGPROB_BOUND["float32"]


# ---------------------------------------------------------------------------------------------
# Sampling draws from exactly the filtered distribution
# ---------------------------------------------------------------------------------------------


def filtered_distribution(logits_V, temperature, top_k, top_p):
    """transformers' warpers in float64: temperature, then top-k, then top-p (the smallest set
    of most likely tokens whose cumulative probability reaches top_p), renormalised. Also the
    probability margin of the top-p cut, to reject cases where float32 rounding could flip it."""
    z = logits_V.astype(np.float64) / temperature
    order = np.argsort(-z, kind="stable")
    if top_k:
        z[order[top_k:]] = -np.inf
    p = np.exp(z - z.max())
    p /= p.sum()
    if top_p >= 1.0:
        return p, np.inf
    cumulative = np.cumsum(p[order])
    n_keep = min(int(np.searchsorted(cumulative, top_p)) + 1, len(p))
    margin = min(abs(cumulative[n_keep - 1] - top_p),
                 abs(cumulative[n_keep - 2] - top_p) if n_keep > 1 else 1.0)
    keep = np.zeros(len(p), bool)
    keep[order[:n_keep]] = True
    p = np.where(keep, p, 0.0)
    return p / p.sum(), margin


def chi_square_pvalue(counts_V, probs_V, min_expected=5.0):
    """Pearson's test; tokens with expected count < min_expected are pooled into one bin."""
    expected = probs_V * counts_V.sum()
    big = expected >= min_expected
    observed_bins = np.r_[counts_V[big], counts_V[~big].sum()]
    expected_bins = np.r_[expected[big], expected[~big].sum()]
    if expected_bins[-1] < min_expected:  # pool the remainder into the smallest big bin
        smallest = np.argmin(expected_bins[:-1])
        observed_bins[smallest] += observed_bins[-1]
        expected_bins[smallest] += expected_bins[-1]
        observed_bins, expected_bins = observed_bins[:-1], expected_bins[:-1]
    return stats.chisquare(observed_bins, expected_bins).pvalue, len(expected_bins)


@pytest.mark.parametrize("temperature,top_k,top_p",
                         [(1.0, 0, 0.9), (0.5, 40, 1.0), (2.0, 300, 0.5)])
def test_filter_logits_keeps_the_reference_support(temperature, top_k, top_p):
    logits = np.random.default_rng(0).normal(0, 3, (64, 1000)).astype(np.float32)
    config = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    kept = np.asarray(jax.jit(filter_logits, static_argnums=1)(logits, config)) > -1e30
    for row, kept_V in zip(logits, kept, strict=True):
        probs, margin = filtered_distribution(row, temperature, top_k, top_p)
        if margin > 1e-5:  # else float32 rounding may legitimately move the cut
            np.testing.assert_array_equal(kept_V, probs > 0)


def test_draw_only_picks_tokens_with_mass():
    """Inverse-CDF draws over 3 blocks of 128 tokens (the last one padded); the normaliser it
    returns is logsumexp."""
    neg = np.finfo(np.float32).min
    keys = jax.random.split(jax.random.key(0), 256)
    draw = jax.jit(_draw)
    for support in ([0], [299], [127, 128], [5, 250, 299]):
        logits = np.full((256, 300), neg, np.float32)
        logits[:, support] = np.linspace(-1.0, 2.0, len(support))
        tokens, log_normaliser = draw(jnp.asarray(logits), keys)
        assert set(np.asarray(tokens).tolist()) == set(support)
        expected = np.log(np.exp(logits[0, support].astype(np.float64)).sum())
        np.testing.assert_allclose(log_normaliser, expected, rtol=1e-6)


@pytest.mark.parametrize("temperature,top_k,top_p", [(0.7, 16, 0.8), (1.3, 0, 0.6)])
def test_first_token_distribution(temperature, top_k, top_p, model, params, processor, prompts,
                                  hf_model):
    copies, group = 4, 1000  # 4000 draws: one prompt under four prompt keys, G = 1000 each
    encoded = prompts["text_medium"]
    config = SamplingConfig(num_samples=group, max_new_tokens=1, temperature=temperature,
                            top_k=top_k, top_p=top_p)
    batch = make_batch(model, processor, [encoded] * copies, keys=[11, 12, 13, 14])
    tokens = sample(Sampler.for_model(model, config), params, batch, seed=2024).tokens_NxL[:, 0]

    import torch

    with torch.no_grad():  # transformers' next-token logits for the prompt, in float64 below
        logits_V = hf_model(input_ids=torch.as_tensor(encoded.input_ids[None].astype(np.int64))
                            ).logits[0, -1].double().numpy()
    probs, margin = filtered_distribution(logits_V, temperature, top_k, top_p)
    support = probs > 0
    assert margin > 1e-4, "top-p cut too close to a token boundary for float32"
    assert 5 <= support.sum() < len(probs) / 2, "pick settings that filter but leave a choice"

    counts = np.bincount(tokens, minlength=len(probs))
    outside = np.flatnonzero(counts * ~support)
    assert not len(outside), f"sampled tokens outside the filtered support: {outside}"
    pvalue, bins = chi_square_pvalue(counts, probs)
    print(f"\nT={temperature} top_k={top_k} top_p={top_p}: support {support.sum()} tokens, "
          f"{len(tokens)} draws, {bins} bins, chi-square p={pvalue:.3f}")
    assert pvalue > 1e-3


# ---------------------------------------------------------------------------------------------
# Reproducibility: seed, batch composition, mesh
# ---------------------------------------------------------------------------------------------


def test_samples_depend_on_seed_and_prompt_key_only(model, params, processor, prompts,
                                                    temperature_sampler, response_scale):
    a, b, c = prompts["text_medium"], prompts["text_short"], prompts["text_long"]
    first = make_batch(model, processor, [a, b], keys=[10, 11])
    again = sample(temperature_sampler, params, first, seed=5)
    out = sample(temperature_sampler, params, first, seed=5)
    np.testing.assert_array_equal(out.tokens_NxL, again.tokens_NxL)
    np.testing.assert_array_equal(out.logprobs_NxL, again.logprobs_NxL)
    other_seed = sample(temperature_sampler, params, first, seed=6)
    assert (other_seed.tokens_NxL != out.tokens_NxL).any()
    group = temperature_sampler.config.num_samples
    # The G samples of a group differ from each other.
    assert len({tuple(t) for t in out.tokens_NxL[:group]}) == group

    # Prompt `a` (key 10) as row 1 of a batch with another companion: same samples.
    moved = sample(temperature_sampler, params, make_batch(model, processor, [c, a],
                                                           keys=[12, 10]), seed=5)
    np.testing.assert_array_equal(moved.tokens_NxL[group:], out.tokens_NxL[:group])
    assert_logprobs_agree(moved.logprobs_NxL[group:], out.logprobs_NxL[:group],
                          generated_mask(out)[:group], response_scale(first, out, group))
    # A different key for the same prompt gives different samples.
    rekeyed = sample(temperature_sampler, params, make_batch(model, processor, [c, a],
                                                             keys=[12, 99]), seed=5)
    assert (rekeyed.tokens_NxL[group:] != out.tokens_NxL[:group]).any()
    assert temperature_sampler.num_compilations == 1


def test_sharded_sampling_equals_unsharded(model_dir, model, params, processor, prompts,
                                           temperature_sampler, response_scale):
    names = ("text_long", "text_short")
    batch = make_batch(model, processor, [prompts[n] for n in names], keys=[1, 2])
    expected = sample(temperature_sampler, params, batch, seed=7)

    mesh = sharding.make_mesh((2, 2, 2))
    with sharding.activate(mesh):
        sharded_model = hf_io.load_model(model_dir, mesh=mesh)
        graphdef, state = nnx.split(sharded_model)
        kernel = state["layers"]["mlp"]["gate_proj"]["kernel"][...]  # [layers, D, F]
        assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        sampler = Sampler(graphdef, temperature_sampler.config)
        out = sample(sampler, state, jax.device_put(batch, replicated), seed=7)
    np.testing.assert_array_equal(out.tokens_NxL, expected.tokens_NxL)
    group = temperature_sampler.config.num_samples
    assert_logprobs_agree(out.logprobs_NxL, expected.logprobs_NxL, generated_mask(expected),
                          response_scale(batch, expected, group))
    np.testing.assert_array_equal(out.lengths_N, expected.lengths_N)


# ---------------------------------------------------------------------------------------------
# Static shapes: one compilation per bucket
# ---------------------------------------------------------------------------------------------


def test_one_compilation_per_bucket(model, params, processor, prompts):
    p = prompts
    stream = [  # pairs of prompts of varied lengths and image sizes in two (length, patches)
        [p["text_medium"], p["text_long"]],              # (64, 0)
        [p["text_short"], p["text_medium"]],             # (64, 0)
        [p["image_small"], p["text_short"]],             # (64, 64)
        [p["text_long"], p["text_long"]],                # (64, 0)
        [p["image_tall"], p["image_small"]],             # (64, 64)
    ]
    sampler = Sampler.for_model(model, SamplingConfig(num_samples=2, max_new_tokens=2))
    seen = set()
    for step, pair in enumerate(stream):
        batch = make_batch(model, processor, pair, keys=[step, step + 100])
        seen.add((batch.input_ids_BxT.shape,
                  None if batch.vision is None else batch.vision.patches_BxPxC.shape))
        sample(sampler, params, batch, seed=step)
        assert sampler.num_compilations == len(seen), f"recompiled at batch {step}"
    assert len(seen) == 2


# ---------------------------------------------------------------------------------------------
# Stopping
# ---------------------------------------------------------------------------------------------


def test_stop_tokens_end_samples(model, params, processor, prompts, greedy_sampler):
    batch = make_batch(model, processor, [prompts[n] for n in TEXT_BATCH])
    max_new = GREEDY_TOKENS
    free = sample(greedy_sampler, params, batch)
    stop_id = int(free.tokens_NxL[0, 3])
    assert stop_id not in free.tokens_NxL[1], "pick a stop id that leaves one sample running"
    config = SamplingConfig(greedy=True, max_new_tokens=max_new, stop_token_ids=(stop_id, 5000))
    out = sample(Sampler.for_model(model, config), params, batch)
    for row, tokens in enumerate(free.tokens_NxL):
        hits = np.flatnonzero(tokens == stop_id)
        if len(hits):
            length = hits[0] + 1  # the stop token counts
            assert out.finish_N[row] == FINISH_STOP
        else:
            length = max_new
            assert out.finish_N[row] == FINISH_LENGTH
        assert out.lengths_N[row] == length
        np.testing.assert_array_equal(out.tokens_NxL[row, :length], tokens[:length])
        assert (out.tokens_NxL[row, length:] == 0).all()
        assert (out.logprobs_NxL[row, length:] == 0).all()
    assert out.finish_N[0] == FINISH_STOP and out.finish_N[1] == FINISH_LENGTH


def test_decoding_exits_when_every_sample_has_stopped(model, params, processor, prompts,
                                                      greedy_sampler):
    batch = make_batch(model, processor, [prompts[n] for n in TEXT_BATCH])
    free = sample(greedy_sampler, params, batch)
    assert free.num_steps == GREEDY_TOKENS
    # Each row stops at its third token at the latest: the loop must end there.
    stop_ids = tuple(int(t) for t in free.tokens_NxL[:, 2])
    config = SamplingConfig(greedy=True, max_new_tokens=GREEDY_TOKENS, stop_token_ids=stop_ids)
    out = sample(Sampler.for_model(model, config), params, batch)
    assert (out.finish_N == FINISH_STOP).all() and (out.lengths_N <= 3).all()
    assert out.num_steps == out.lengths_N.max()


# ---------------------------------------------------------------------------------------------
# Bad input
# ---------------------------------------------------------------------------------------------


def test_prompt_longer_than_maximum(model, processor, prompts):
    with pytest.raises(InputError, match="maximum prompt length is 16"):
        processor.encode(question=QUESTIONS["long"], max_length=16)
    rows = [prompt_row(prompts[n], model.config) for n in ("text_short", "text_long")]
    with pytest.raises(InputError, match=r"batch row 1: prompt length 55 exceeds .* 32"):
        collate_prompts(rows, Buckets(lengths=(32,), patches=(0,)), pad_token_id=0)


def test_too_many_image_patches(model, prompts):
    rows = [prompt_row(prompts[n], model.config) for n in ("image_small", "image_wide")]
    with pytest.raises(InputError, match=r"batch row 1: patches .* per prompt 112 exceeds .* 64"):
        collate_prompts(rows, Buckets(lengths=(128,), patches=(0, 64)), pad_token_id=0)


def test_unreadable_image(processor, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(InputError, match="broken.png.*cannot be decoded"):
        processor.encode(question="?", images=[str(broken)])
    with pytest.raises(InputError, match="missing.png.*not found"):
        processor.encode(question="?", images=[str(tmp_path / "missing.png")])
