"""The group sampler: P prompts x G samples in one compiled program per shape bucket.

    vision tower once per prompt -> prefill once per prompt into a KV cache that the G samples of
    the group share (never copied G times) -> lax.while_loop decoding (temperature / top-k /
    top-p, stop ids) that ends when every sample has stopped -> tokens, log-probs, lengths, finish
    reasons.

The parameters are an argument of the compiled function (not constants baked into it), so the
trainer calls the same program with its current weights: no second inference engine, no weight
copy. Log-probs are computed in float32 from the same logits the trainer recomputes, so the
sampler/trainer mismatch is zero up to the order of floating-point reductions.

Reproducibility: the random key of sample g of a prompt at decoding step i is
fold_in(fold_in(fold_in(seed, prompt_key), g), i). `prompt_key` is supplied per prompt by the
caller (a dataset index, say), so a sample does not depend on which batch, row or mesh it ran in.

Reads per decoding step: all parameters once, each prompt's K/V once for its whole group (one
product for the G samples), and each sample's generated K/V buffer. That buffer grows in
`cache_phases` steps (one while_loop per phase, each compiled for its buffer length), so a step
reads at most one phase's worth of empty slots: over a full run, about (1 + 1/phases) / 2 of
what a buffer sized for max_new_tokens from the start would cost.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx, struct

from eureka_jax.batch import PromptBatch
from eureka_jax.errors import InputError
from eureka_jax.models.decoder import KVCache

FINISH_STOP, FINISH_LENGTH = 1, 2
FINISH_REASONS = {0: "running", FINISH_STOP: "stop", FINISH_LENGTH: "length"}
LAYER_LOOPS = ("auto", "scan", "unrolled")


@dataclasses.dataclass(frozen=True)
class SamplingConfig:
    """Static sampling settings (a change compiles a new program)."""

    num_samples: int = 1  # G: samples per prompt
    max_new_tokens: int = 128
    temperature: float = 1.0
    top_k: int = 0  # 0 disables top-k
    top_p: float = 1.0  # 1.0 disables nucleus sampling
    greedy: bool = False
    stop_token_ids: tuple[int, ...] = ()
    # The generated-token KV buffer grows this many times (see the module docstring). More
    # phases read fewer empty slots but compile the decoding step once per phase, and each
    # growth briefly holds the old and the new buffer; 1 = one buffer sized for max_new_tokens.
    cache_phases: int = 4
    # How a decoding step runs the decoder layers: "scan" over the stacked weights (one compiled
    # layer, whatever the depth), "unrolled" over per-layer weights sliced out once per call
    # (a copy of the decoder's weights while sampling; the step compiles once per layer), or
    # "auto": unrolled on CPU, scan elsewhere. XLA:CPU copies a dynamic slice of every weight
    # out of the stack at every step before its matmul (benchmarks/sampler.py, 98M-parameter
    # decoder, 1 x 1: 24.4 ms a step scanned, 15.4 unrolled, 15.2 for the matmuls alone); on
    # TPU and GPU the slice feeds the matmul in place.
    layer_loop: str = "auto"

    def __post_init__(self):
        if self.num_samples < 1:
            raise InputError(f"sampling.num_samples must be >= 1 (got {self.num_samples})")
        if self.max_new_tokens < 1:
            raise InputError(f"sampling.max_new_tokens must be >= 1 (got {self.max_new_tokens})")
        if not self.greedy and self.temperature <= 0:
            raise InputError("sampling.temperature must be > 0 (use greedy=True for argmax)")
        if not 0 < self.top_p <= 1:
            raise InputError(f"sampling.top_p must be in (0, 1] (got {self.top_p})")
        if self.top_k < 0:
            raise InputError(f"sampling.top_k must be >= 0 (got {self.top_k})")
        if self.cache_phases < 1:
            raise InputError(f"sampling.cache_phases must be >= 1 (got {self.cache_phases})")
        if self.layer_loop not in LAYER_LOOPS:
            raise InputError(f"sampling.layer_loop must be one of {LAYER_LOOPS} "
                             f"(got {self.layer_loop!r})")

    def for_platform(self, platform: str) -> SamplingConfig:
        """This config with layer_loop "auto" resolved for a device platform ("cpu", "tpu")."""
        if self.layer_loop != "auto":
            return self
        return dataclasses.replace(self, layer_loop="unrolled" if platform == "cpu" else "scan")

    def phase_ends(self) -> tuple[int, ...]:
        """The decoding step at which each phase ends, which is also its buffer length (the
        token fed at step i goes to slot i - 1): max_new_tokens split into near-equal parts."""
        phases = min(self.cache_phases, self.max_new_tokens)
        return tuple(sorted({-(-self.max_new_tokens * (i + 1) // phases) for i in range(phases)}))


@struct.dataclass
class SampleOutput:
    """N = P*G samples, prompt-major (sample g of prompt p is row p*G + g)."""

    tokens_NxL: jax.Array  # int32 generated ids; 0 after the end
    logprobs_NxL: jax.Array  # float32 log-prob of each token under its sampling distribution
    lengths_N: jax.Array  # int32 generated tokens, including the stop token
    finish_N: jax.Array  # int32: FINISH_STOP or FINISH_LENGTH
    num_steps: jax.Array  # int32 scalar: tokens generated per row, < L when all stopped early


@struct.dataclass
class _DecodeState:
    step: jax.Array  # int32 scalar: tokens generated so far
    last_token_N: jax.Array  # int32: the token to feed next
    tokens_NxL: jax.Array
    logprobs_NxL: jax.Array
    done_N: jax.Array  # bool
    finish_N: jax.Array
    cache: KVCache


def filter_logits(logits_NxV: jax.Array, config: SamplingConfig) -> jax.Array:
    """Temperature, then top-k, then top-p (the order transformers uses); float32 out, with the
    filtered-out tokens at the lowest float32. Tokens tied with the k-th largest, or with the
    last token of the nucleus, are all kept (top-k: as transformers; top-p: where a sort would
    keep an arbitrary subset of the ties)."""
    logits = logits_NxV.astype(jnp.float32) / config.temperature
    neg_inf = jnp.finfo(jnp.float32).min
    if config.top_k and config.top_k < logits.shape[-1]:
        # min() of the k values, not values[..., -1]: XLA rewrites a slice of top_k into a full
        # sort of the vocabulary, ~50x slower on CPU.
        kth_largest = jax.lax.top_k(logits, config.top_k)[0].min(axis=-1, keepdims=True)
        logits = jnp.where(logits < kth_largest, neg_inf, logits)
    if config.top_p < 1.0:
        mass_NxV = jnp.exp(logits - logits.max(axis=-1, keepdims=True))
        keep = _bits(mass_NxV) >= _nucleus_cut(mass_NxV, config.top_p)[:, None]
        logits = jnp.where(keep, logits, neg_inf)
    return logits


def _bits(x):
    """float32 -> int32 bit pattern; for x >= 0 the patterns order like the values."""
    return jax.lax.bitcast_convert_type(x, jnp.int32)


def _nucleus_cut(mass_NxV, top_p: float):
    """Bit pattern of the smallest kept (unnormalised, max 1) probability under top-p.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p, i.e.
    the tokens with p >= x* where x* is the largest x such that mass(p >= x) >= top_p. x* is
    found exactly by bisection over float32 bit patterns (31 halvings of [0, 1]), 31 masked sums
    over the vocabulary instead of a sort of it (a sort is ~15x slower on CPU).
    """
    n = mass_NxV.shape[0]
    bits_NxV = _bits(mass_NxV)
    target_N = top_p * mass_NxV.sum(axis=-1)

    def halve(_, bounds):
        low_N, high_N = bounds  # invariant: mass(>= low) >= target > mass(>= high)
        mid_N = low_N + (high_N - low_N) // 2
        mass_N = jnp.sum(jnp.where(bits_NxV >= mid_N[:, None], mass_NxV, 0.0), axis=-1)
        enough_N = mass_N >= target_N
        return jnp.where(enough_N, mid_N, low_N), jnp.where(enough_N, high_N, mid_N)

    above_one = _bits(jnp.float32(1.0)) + 1
    low_N, _ = jax.lax.fori_loop(0, 31, halve, (jnp.zeros((n,), jnp.int32),
                                                jnp.full((n,), above_one, jnp.int32)))
    return low_N


_DRAW_BLOCK = 128


def _draw(logits_NxV, keys_N):
    """One token per row, with probability softmax(logits), by inverse-CDF sampling; also each
    row's logsumexp(logits), from the same exponentials (one pass over the vocabulary fewer).

    One uniform number per row: a Gumbel-max draw (jax.random.categorical) needs V random
    numbers per row, which at 128 rows x 32k vocabulary costs a third of a decoding step on CPU.
    The CDF is built in two levels (sums of blocks of 128 tokens, then the one block the uniform
    lands in), since a length-V cumulative sum is itself slow on CPU. Tokens of zero probability
    are never drawn, even when rounding puts the uniform past the last running sum.
    """
    n, v = logits_NxV.shape
    blocks = -(-v // _DRAW_BLOCK)
    max_N = logits_NxV.max(axis=-1)
    mass_NxV = jnp.exp(logits_NxV - max_N[:, None])
    mass_NxCxB = jnp.pad(mass_NxV, ((0, 0), (0, blocks * _DRAW_BLOCK - v))).reshape(
        n, blocks, _DRAW_BLOCK)
    block_mass_NxC = mass_NxCxB.sum(axis=-1)
    block_cum_NxC = jnp.cumsum(block_mass_NxC, axis=-1)
    uniform_N = jax.vmap(lambda key: jax.random.uniform(key, (), jnp.float32))(keys_N)
    target_N = uniform_N * block_cum_NxC[:, -1]

    def first_above(cum_NxM, mass_NxM):
        """First index whose running sum exceeds the target, else the last one with mass."""
        last_with_mass = mass_NxM.shape[1] - 1 - jnp.argmax(mass_NxM[:, ::-1] > 0, axis=-1)
        return jnp.minimum(jnp.sum(cum_NxM <= target_N[:, None], axis=-1), last_with_mass)

    block_N = first_above(block_cum_NxC, block_mass_NxC)
    before_N = jnp.where(block_N > 0, jnp.take_along_axis(
        block_cum_NxC, jnp.maximum(block_N - 1, 0)[:, None], axis=-1)[:, 0], 0.0)
    inner_NxB = jnp.take_along_axis(mass_NxCxB, block_N[:, None, None], axis=1)[:, 0]
    inner_cum_NxB = before_N[:, None] + jnp.cumsum(inner_NxB, axis=-1)
    token_N = block_N * _DRAW_BLOCK + first_above(inner_cum_NxB, inner_NxB)
    return token_N, max_N + jnp.log(block_cum_NxC[:, -1])


def _choose(logits_NxV, keys_N, config: SamplingConfig):
    """(token, log-prob of the token under the distribution it was drawn from)."""
    if config.greedy:
        logits_NxV = logits_NxV.astype(jnp.float32)
        token_N = jnp.argmax(logits_NxV, axis=-1)
        log_normaliser_N = jax.nn.logsumexp(logits_NxV, axis=-1)
    else:
        logits_NxV = filter_logits(logits_NxV, config)
        token_N, log_normaliser_N = _draw(logits_NxV, keys_N)
    token_logit_N = jnp.take_along_axis(logits_NxV, token_N[:, None], axis=-1)[:, 0]
    return token_N.astype(jnp.int32), token_logit_N - log_normaliser_N


def _sample_keys(seed, prompt_key_N, sample_index_N, step):
    base = jax.random.key(seed)

    def key_of(prompt_key, sample_index):
        key = jax.random.fold_in(jax.random.fold_in(base, prompt_key), sample_index)
        return jax.random.fold_in(key, step)

    return jax.vmap(key_of)(prompt_key_N, sample_index_N)


def generate(model, batch: PromptBatch, seed, config: SamplingConfig) -> SampleOutput:
    """Pure function of (model, batch, seed): trace it under jit (see `Sampler`)."""
    group = config.num_samples
    p = batch.input_ids_BxT.shape[0]
    n, max_new = p * group, config.max_new_tokens
    stop_ids = jnp.asarray(config.stop_token_ids or (-1,), jnp.int32)

    # Prompt: vision tower and prefill once per prompt; the group shares the prompt's cache.
    features = None if batch.vision is None else model.encode_images(batch.vision)
    x_BxTxD = model.embed(batch.input_ids_BxT, features, batch.token_source_BxT)
    hidden_BxTxD, prompt_kv = model.decode(x_BxTxD, batch.positions_3xBxT,
                                           batch.attention_mask_BxT.astype(bool))
    phase_ends = config.phase_ends()
    cache = KVCache.from_prompt(prompt_kv, batch.attention_mask_BxT, group, phase_ends[0])
    first_logits_BxV = model.logits(hidden_BxTxD[:, -1:])[:, 0]
    # A decoding position is below prompt bucket + max_new (image positions are compressed).
    rotary_table = model.text_rotary_table(batch.input_ids_BxT.shape[1] + max_new)

    def repeat(x):
        return jnp.repeat(x, group, axis=0)

    next_position_N = repeat(batch.next_position_B)
    prompt_key_N = repeat(batch.prompt_key_B)
    sample_index_N = jnp.tile(jnp.arange(group, dtype=jnp.uint32), p)

    def pick(logits_NxV, step):
        return _choose(logits_NxV, _sample_keys(seed, prompt_key_N, sample_index_N, step), config)

    token_N, logp_N = pick(repeat(first_logits_BxV), 0)
    state = _DecodeState(
        step=jnp.int32(1),
        last_token_N=token_N,
        tokens_NxL=jnp.zeros((n, max_new), jnp.int32).at[:, 0].set(token_N),
        logprobs_NxL=jnp.zeros((n, max_new), jnp.float32).at[:, 0].set(logp_N),
        done_N=jnp.isin(token_N, stop_ids),
        finish_N=jnp.where(jnp.isin(token_N, stop_ids), FINISH_STOP, 0).astype(jnp.int32),
        cache=cache,
    )

    config = config.for_platform(jax.default_backend())  # Sampler resolves it by the weights
    # Sliced once here, outside the decoding loops: read in place by every step.
    layers = model.layer_modules() if config.layer_loop == "unrolled" else None

    def keep_going_until(end):
        return lambda state: (state.step < end) & ~jnp.all(state.done_N)

    def step_fn(state: _DecodeState):
        x_Nx1xD = model.embed(state.last_token_N[:, None])
        # The token fed at step i was generated at step i - 1: it goes to generated slot i - 1.
        hidden, cache = model.decode_step(x_Nx1xD, next_position_N + state.step - 1, state.cache,
                                          state.step - 1, rotary_table, layers=layers)
        token_N, logp_N = pick(model.logits(hidden)[:, 0], state.step)
        live_N = ~state.done_N
        token_N = jnp.where(live_N, token_N, 0)
        logp_N = jnp.where(live_N, logp_N, 0.0)
        stopped_N = live_N & jnp.isin(token_N, stop_ids)
        return _DecodeState(
            step=state.step + 1,
            last_token_N=token_N,
            tokens_NxL=state.tokens_NxL.at[:, state.step].set(token_N),
            logprobs_NxL=state.logprobs_NxL.at[:, state.step].set(logp_N),
            done_N=state.done_N | stopped_N,
            finish_N=jnp.where(stopped_N, FINISH_STOP, state.finish_N),
            cache=cache,
        )

    # One loop per buffer length; once every sample has stopped, the later loops run no step.
    for end in phase_ends:
        state = state.replace(cache=state.cache.grow(end))
        state = jax.lax.while_loop(keep_going_until(end), step_fn, state)
    is_stop_NxL = jnp.isin(state.tokens_NxL, stop_ids)
    # Length = index of the first stop token + 1, or everything generated.
    first_stop_N = jnp.argmax(is_stop_NxL, axis=-1)
    lengths_N = jnp.where(jnp.any(is_stop_NxL, axis=-1), first_stop_N + 1, state.step)
    finish_N = jnp.where(state.finish_N == 0, FINISH_LENGTH, state.finish_N)
    return SampleOutput(state.tokens_NxL, state.logprobs_NxL, lengths_N.astype(jnp.int32),
                        finish_N, state.step)


class Sampler:
    """Compiles `generate` once per (shape bucket, sampling config) and counts compilations."""

    def __init__(self, graphdef: nnx.GraphDef, config: SamplingConfig):
        self.graphdef = graphdef
        self.config = config
        self.num_compilations = 0

        def run(state, batch, seed, config):
            self.num_compilations += 1  # runs only while tracing, i.e. once per compilation
            return generate(nnx.merge(graphdef, state), batch, seed, config)

        self._run = jax.jit(run, static_argnums=3)

    @classmethod
    def for_model(cls, model, config: SamplingConfig) -> Sampler:
        return cls(nnx.graphdef(model), config)

    def __call__(self, state: nnx.State, batch: PromptBatch, seed: int) -> SampleOutput:
        return self._run(state, batch, jnp.uint32(seed), self._config_for(state))

    def lower(self, state, batch):
        """The program `__call__` runs, lowered for these (possibly abstract) arguments and any
        seed: for ahead-of-time compilation and memory analysis (eureka_jax.plan)."""
        return self._run.lower(state, batch, jax.ShapeDtypeStruct((), jnp.uint32),
                               self._config_for(state))

    def _config_for(self, state) -> SamplingConfig:
        """The config with layer_loop resolved for the platform the weights live on (plan
        lowers for TPU devices on a CPU host)."""
        sharding = getattr(jax.tree.leaves(state)[0], "sharding", None)
        platform = (next(iter(sharding.device_set)).platform if sharding is not None
                    else jax.default_backend())
        return self.config.for_platform(platform)


def decode_texts(tokenizer, tokens_NxL, lengths_N) -> list[str]:
    """Completion texts (special tokens dropped) from host arrays of a SampleOutput."""
    return [tokenizer.decode(row[:length].tolist(), skip_special_tokens=True)
            for row, length in zip(tokens_NxL, lengths_N, strict=True)]

