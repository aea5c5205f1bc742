"""The group sampler against transformers and against exact distributions.

One tiny random model (initializer_range 0.2: logits std ~1.4, so greedy decoding is not decided
by rounding and float32 log-probs stay small enough to compare to 1e-5) serves every test. Each
distinct (SamplingConfig, shape bucket) compiles once, so tests share samplers where they can.
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
from eureka_jax.batching import Buckets, collate_prompts, prompt_row, response_logprobs
from eureka_jax.errors import InputError
from eureka_jax.models.qwen2_5_vl import KVCache, LayerKV
from eureka_jax.processing import QwenVLProcessor
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
# bfloat16 sampler vs bfloat16 teacher-forced forward. bfloat16 keeps 8 significant bits, and XLA
# orders reductions differently for different shapes (prefill + one-token steps vs one long
# forward; batch and bucket size), so hidden states differ by an ulp here and there and logits of
# magnitude ~5 move by a few hundredths. Measured on this test: max 0.027, mean 5e-4; with a
# third prompt (image_wide, bucket 128): max 0.073, mean 0.015, and there the teacher-forced
# forward of one prompt alone vs in the batch differs by as much (0.07).
BF16_LOGPROB_BOUND = 0.15


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


@pytest.fixture(scope="module")
def greedy_sampler(model):
    return Sampler.for_model(model, SamplingConfig(greedy=True, max_new_tokens=GREEDY_TOKENS))


@pytest.fixture(scope="module")
def temperature_sampler(model):
    """Plain temperature-1 sampling with nucleus filtering, shared by several tests."""
    return Sampler.for_model(model, SamplingConfig(num_samples=3, max_new_tokens=10, top_p=0.95))


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


@pytest.mark.parametrize("phases", [1, 5, GREEDY_TOKENS])
def test_generated_buffer_grows_in_phases(phases, model, params, processor, prompts, hf_model,
                                          greedy_sampler):
    """However many times the generated-token buffer grows (1: one buffer for all 12 tokens; 5:
    buffers of 3, 5, 8, 10, 12 slots; 12: one slot more each step), the tokens are
    transformers' and the log-probs those of the default (4-phase) sampler, up to float32
    rounding (the products have other lengths)."""
    config = dataclasses.replace(greedy_sampler.config, cache_phases=phases)
    assert len(config.phase_ends()) == phases and config.phase_ends()[-1] == GREEDY_TOKENS
    sampler = Sampler(greedy_sampler.graphdef, config)
    names = ("image_small", "text_long")
    batch = make_batch(model, processor, [prompts[n] for n in names])
    out = sample(sampler, params, batch)
    for row, name in enumerate(names):
        expected, _ = hf_greedy(hf_model, prompts[name], model.config.image_token_id,
                                GREEDY_TOKENS)
        np.testing.assert_array_equal(out.tokens_NxL[row], expected, err_msg=name)
    default = sample(greedy_sampler, params, batch)
    np.testing.assert_allclose(out.logprobs_NxL, default.logprobs_NxL, rtol=0, atol=1e-5)


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
    layer = LayerKV(prompt_k=jnp.ones((1, 1, 2, 3)), prompt_v=jnp.ones((1, 1, 3, 2)),
                    gen_k=jnp.arange(8.0).reshape(2, 1, 2, 2),
                    gen_v=jnp.arange(8.0).reshape(2, 1, 2, 2) + 10)
    cache = KVCache(layers=(layer,), prompt_valid_PxT=jnp.ones((1, 3), bool))
    grown = cache.grow(5)
    assert grown.gen_length == 5 and grown.layers[0].gen_v.shape == (2, 1, 5, 2)
    np.testing.assert_array_equal(grown.layers[0].gen_k[..., :2], layer.gen_k)
    np.testing.assert_array_equal(grown.layers[0].gen_v[:, :, :2], layer.gen_v)
    assert not grown.layers[0].gen_k[..., 2:].any() and not grown.layers[0].gen_v[:, :, 2:].any()
    assert cache.grow(2) is cache
    with pytest.raises(ValueError, match="shrink"):
        cache.grow(1)


# ---------------------------------------------------------------------------------------------
# Sampler log-probs == teacher-forced log-probs
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype,bound", [("float32", 1e-5), ("bfloat16", BF16_LOGPROB_BOUND)])
def test_logprobs_match_teacher_forced_forward(dtype, bound, model_dir, processor, prompts):
    model = hf_io.load_model(model_dir, param_dtype=dtype, compute_dtype=dtype)
    graphdef, state = nnx.split(model)
    group = 4
    sampler = Sampler(graphdef, SamplingConfig(num_samples=group, max_new_tokens=16))
    names = ("image_small", "text_long")
    batch = make_batch(model, processor, [prompts[n] for n in names])
    output = sampler(state, batch, 3)
    train_batch = rollout_train_batch(batch, output, group)
    forward = jax.jit(lambda s, b: response_logprobs(nnx.merge(graphdef, s), b)[0])
    teacher_forced = np.asarray(forward(state, train_batch))
    mask = np.asarray(train_batch.response_mask_BxL)
    diff = np.abs(teacher_forced - np.asarray(output.logprobs_NxL))[mask]
    print(f"\n{dtype}: sampler vs teacher-forced log-probs over {mask.sum()} tokens: "
          f"max |diff| {diff.max():.3e}, mean {diff.mean():.3e}")
    assert diff.max() <= bound


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
                                                    temperature_sampler):
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
    np.testing.assert_allclose(moved.logprobs_NxL[group:], out.logprobs_NxL[:group], atol=1e-5)
    # A different key for the same prompt gives different samples.
    rekeyed = sample(temperature_sampler, params, make_batch(model, processor, [c, a],
                                                             keys=[12, 99]), seed=5)
    assert (rekeyed.tokens_NxL[group:] != out.tokens_NxL[:group]).any()
    assert temperature_sampler.num_compilations == 1


def test_sharded_sampling_equals_unsharded(model_dir, model, params, processor, prompts,
                                           temperature_sampler):
    names = ("text_long", "text_short")
    batch = make_batch(model, processor, [prompts[n] for n in names], keys=[1, 2])
    expected = sample(temperature_sampler, params, batch, seed=7)

    mesh = sharding.make_mesh((2, 2, 2))
    with sharding.activate(mesh):
        sharded_model = hf_io.load_model(model_dir, mesh=mesh)
        graphdef, state = nnx.split(sharded_model)
        kernel = state["layers"][0]["mlp"]["gate_proj"]["kernel"][...]
        assert len(kernel.sharding.device_set) == 8 and not kernel.sharding.is_fully_replicated
        replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
        sampler = Sampler(graphdef, temperature_sampler.config)
        out = sample(sampler, state, jax.device_put(batch, replicated), seed=7)
    np.testing.assert_array_equal(out.tokens_NxL, expected.tokens_NxL)
    np.testing.assert_allclose(out.logprobs_NxL, expected.logprobs_NxL, atol=1e-5)
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
    with pytest.raises(InputError, match=r"batch row 1: patches per prompt 112 exceeds .* 64"):
        collate_prompts(rows, Buckets(lengths=(128,), patches=(0, 64)), pad_token_id=0)


def test_unreadable_image(processor, tmp_path):
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(InputError, match="broken.png.*cannot be decoded"):
        processor.encode(question="?", images=[str(broken)])
    with pytest.raises(InputError, match="missing.png.*not found"):
        processor.encode(question="?", images=[str(tmp_path / "missing.png")])
